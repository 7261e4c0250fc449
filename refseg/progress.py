"""One progress bar with rate and ETA for long batch jobs (``evaluate``, ``segment``, ``prepare``).

    with Progress("evaluate", total=len(records), unit="samples") as bar:
        for batch in results:
            bar.update(len(batch))

On a terminal it is one bar redrawn in place on stderr::

    [refseg] evaluate [#########...............] 120/480 samples 25% 14.2 samples/s ETA 25s

Otherwise (a log file, a ``ray job submit`` log, a pipe) it writes lines in the style of training's
``[refseg]`` progress lines: one at the first update, one every ``every_s`` seconds and one at the end::

    [refseg] evaluate 120/480 samples (25%) 14.2 samples/s ETA 25s
    [refseg] evaluate 480/480 samples (100%) 14.6 samples/s in 33s

stdout stays for the job's own results (``refseg prepare`` prints its counts as JSON there).
"""

from __future__ import annotations

import sys
import time
from typing import Self, TextIO

BAR_WIDTH = 24
EVERY_S = 10.0  # seconds between two lines when stderr is not a terminal
REDRAW_S = 0.2  # at most five redraws a second on a terminal


class Progress:
    """Counts ``total`` items of a job called ``what`` and shows how far it is (module docstring)."""

    def __init__(self, what: str, total: int, *, unit: str = "items", stream: TextIO | None = None,
                 every_s: float = EVERY_S) -> None:
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = REDRAW_S if self.tty else every_s
        self.done, self.t0, self.shown_at, self.closed = 0, time.perf_counter(), None, False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """The final line after the job; after an error only a line break ends a drawn bar."""
        if exc_type is None:
            self.close()
        elif self.tty and self.shown_at is not None:
            self.stream.write("\n")
            self.stream.flush()

    def rate(self) -> float:
        """Items per second since the job started."""
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, final: bool = False) -> str:
        """The progress text (without the terminal's carriage return)."""
        pct = 100 * self.done / self.total if self.total else 100.0
        rate = self.rate()
        if final:
            tail = f"in {time.perf_counter() - self.t0:.0f}s"
        else:
            tail = f"ETA {(self.total - self.done) / rate:.0f}s" if rate > 0 else "ETA ?"
        count = f"{self.done}/{self.total} {self.unit}"
        if self.tty:
            filled = round(BAR_WIDTH * min(pct, 100.0) / 100)
            return f"[refseg] {self.what} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {count} {pct:.0f}% " \
                   f"{rate:.1f} {self.unit}/s {tail}"
        return f"[refseg] {self.what} {count} ({pct:.0f}%) {rate:.1f} {self.unit}/s {tail}"

    def update(self, n: int = 1) -> None:
        """``n`` more items are done; shows the progress when it is time to (the last items: :meth:`close`)."""
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and (self.shown_at is None or now - self.shown_at >= self.every_s):
            self.shown_at = now
            self._show(self.line())

    def close(self) -> None:
        """The final line (once): how many items, the mean rate and the wall time."""
        if self.closed:
            return
        self.closed = True
        self._show(self.line(final=True))
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, text: str) -> None:
        self.stream.write(f"\r{text}\033[K" if self.tty else f"{text}\n")
        self.stream.flush()
