"""A live terminal view of a run: progress bar, rate, ETA and running counts per status."""

from __future__ import annotations

import sys
import time
from collections import Counter

from verifier.records import InputRecord


class Progress:
    """Redraws one stderr line as records arrive; silent when quiet or not a terminal."""

    def __init__(
        self, total: int, done: int = 0, label: str = "", quiet: bool = False, stream=None
    ) -> None:
        self.total, self.done, self.label = total, done, label
        self.start_done = done
        self.stream = stream or sys.stderr
        self.live = not quiet and self.stream.isatty()
        self.quiet = quiet
        self.counts: Counter[str] = Counter()
        self.t0 = time.perf_counter()
        self.last = 0.0
        if done and not quiet:
            print(f"resuming: {done} of {total} inputs already decided", file=self.stream)

    def update(self, rec: InputRecord) -> None:
        """Count one more decided input and redraw (at most ten times a second)."""
        self.done += 1
        self.counts[rec.float.status if rec.float else "misclassified"] += 1
        now = time.perf_counter()
        if self.live and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            self.stream.write("\r" + self.line(now) + "\033[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """`label [#####.....] 37/100 12.3/s ETA 5s | certified 20 refuted 10 ...`."""
        now = time.perf_counter() if now is None else now
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        fresh = self.done - self.start_done
        rate = fresh / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        counts = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{rate:.1f}/s ETA {eta_text} | {counts}"
        )

    def close(self) -> None:
        """Finish the line (and print a final one when the stream is not a terminal)."""
        if self.live:
            self.stream.write("\n")
        elif not self.quiet and self.done > self.start_done:
            print(self.line(), file=self.stream)
        self.stream.flush()
