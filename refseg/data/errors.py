"""Errors a user can cause with their data, and the report of samples skipped while reading it.

report = SkipReport()
records = load_split(root, "refcoco", "unc", "val", report=report)
print(report.summary())   # "skipped 3 samples: 2 missing image, 1 empty sentence (e.g. ...)"
"""

from __future__ import annotations

from collections import Counter


class RefSegDataError(ValueError):
    """A user-caused data problem (missing path, tampered file); the message names it and what to do."""


class SkipReport:
    """Counts skipped samples per reason and keeps the first few examples of each.

    ``add(reason, detail, count=1)`` records skipped samples; ``total`` is the number recorded;
    ``counts`` maps reason -> count; ``examples`` maps reason -> up to ``max_examples`` details.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Record ``count`` skipped samples for ``reason``; ``detail`` (e.g. a path) is kept as an example."""
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if detail and detail not in examples and len(examples) < self.max_examples:
            examples.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:  # an empty report is still a report (avoid `if report:` surprises)
        return True

    def summary(self) -> str:
        """One line: ``skipped N samples: 2 missing image, 1 empty sentence (missing image: a.jpg; ...)``."""
        if not self.counts:
            return "skipped 0 samples"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        examples = "; ".join(f"{reason}: {', '.join(ex)}" for reason, ex in self.examples.items() if ex)
        line = f"skipped {self.total} sample{'s' if self.total != 1 else ''}: {parts}"
        return f"{line} (e.g. {examples})" if examples else line

    def __repr__(self) -> str:
        return f"SkipReport({dict(self.counts)})"
