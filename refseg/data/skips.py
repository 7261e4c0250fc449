"""Samples that cannot be used: the one report, the one exception, and every skip reason.

    report = SkipReport()
    records = load_split(root, "refcoco", "unc", "val", report=report)
    print(report.summary())   # "skipped 3 samples: 2 missing image file, 1 empty sentence (e.g. ...)"

A reader that finds an unusable sample raises :class:`SkipSample` (reason, detail) or adds it to a
:class:`SkipReport` directly; the reason is one of the constants below (they are the keys of
``report.counts`` and of ``metrics.json["skipped"]``). Passed to :func:`refseg.data.build_dataset`,
the report also collects the samples dropped inside Ray Data tasks (through a small Ray actor, see
:meth:`SkipReport.collector`); :meth:`SkipReport.sync` merges those in.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

logger = logging.getLogger("refseg.data")

# skip reasons (report keys), each defined once
MALFORMED_REF = "malformed ref"  # a ref dict lacking ref_id / ann_id / image_id / sent_id
MISSING_ANNOTATION = "missing annotation"
UNKNOWN_IMAGE = "image not in instances.json"
BAD_ROW = "invalid manifest row"
MISSING_FIELD = "missing manifest field"
MISSING_IMAGE_FILE = "missing image file"
MISSING_MASK_FILE = "missing mask file"
CORRUPT_IMAGE = "corrupt image"
UNREADABLE_IMAGE = "unreadable image"
INVALID_SEGMENTATION = "invalid segmentation"
ZERO_AREA = "zero-area segmentation"
SIZE_MISMATCH = "mask/image size mismatch"
EMPTY_SENTENCE = "empty sentence"
# gRefCOCO refs (refseg.data.sources.grefcoco)
UNKNOWN_SPLIT = "unknown split"  # a ref whose split is not train / val / testA / testB
NO_ANNOTATIONS = "ref without annotations"  # ann_id is an empty list
NO_TARGET_WITH_ANNOTATIONS = "no-target ref with annotations"  # [-1] (or no_target) beside real ann ids
CROWD_ONLY = "only crowd annotations"  # every annotation of a target ref is iscrowd


class RefSegDataError(ValueError):
    """A user-caused data problem (missing path, tampered file); the message names it and what to do."""


class SkipSample(Exception):
    """This sample cannot be used: ``reason`` (one of this module's constants) and ``detail`` (e.g. a path)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class SkipReport:
    """Counts skipped samples per reason and keeps the first few examples of each.

    ``add(reason, detail, count=1)`` records ``count`` skipped samples; ``total`` is the number recorded;
    ``counts`` maps reason -> count; ``examples`` maps reason -> up to ``max_examples`` details."""

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._collector: Any = None  # Ray actor handle, created by collector()

    def add(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Record ``count`` skipped samples for ``reason``; ``detail`` (e.g. a path) is kept as an example."""
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if detail and detail not in examples and len(examples) < self.max_examples:
            examples.append(detail)

    def merge(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        """Add another report's ``counts`` and ``examples``."""
        self.counts.update(counts)
        for reason, details in examples.items():
            keep = self.examples.setdefault(reason, [])
            keep.extend([d for d in details if d and d not in keep][: self.max_examples - len(keep)])

    def drain(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """(counts, examples) recorded so far; the report is empty afterwards."""
        state = dict(self.counts), self.examples
        self.counts, self.examples = Counter(), {}
        return state

    def collector(self) -> Any:
        """The Ray actor that map tasks send their skips to (created on first use; needs a Ray instance)."""
        if self._collector is None:
            import ray

            self._collector = ray.remote(num_cpus=0)(SkipReport).remote(self.max_examples)
        return self._collector

    def sync(self) -> SkipReport:
        """Merge in the skips the Ray tasks have sent to :meth:`collector` since the last sync."""
        if self._collector is not None:
            import ray

            self.merge(*ray.get(self._collector.drain.remote()))
        return self

    def send(self, collector: Any) -> None:
        """Log this (per-batch) report and, when ``collector`` is given, add it there (waits for it)."""
        if not self.counts:
            return
        logger.warning("dropped %d samples in this batch: %s (e.g. %s)", self.total, dict(self.counts), self.examples)
        if collector is not None:
            import ray

            ray.get(collector.merge.remote(dict(self.counts), self.examples))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:  # an empty report is still a report (avoid `if report:` surprises)
        return True

    def summary(self) -> str:
        """One line: ``skipped N samples: 2 missing image file, 1 empty sentence (e.g. missing image file: a.jpg)``."""
        self.sync()
        if not self.counts:
            return "skipped 0 samples"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        examples = "; ".join(f"{reason}: {', '.join(ex)}" for reason, ex in self.examples.items() if ex)
        line = f"skipped {self.total} sample{'s' if self.total != 1 else ''}: {parts}"
        return f"{line} (e.g. {examples})" if examples else line

    def __repr__(self) -> str:
        return f"SkipReport({dict(self.counts)})"
