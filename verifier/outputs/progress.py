"""A live terminal view of a run: tqdm's bar, rate and ETA, plus running counts per status."""

from __future__ import annotations

import sys
import time
from collections import Counter

from tqdm import tqdm

from verifier.run.records import InputRecord


class Progress:
    """One stderr bar updated as records arrive; silent when quiet or not a terminal, where a
    single summary line is printed at the end instead."""

    def __init__(
        self, total: int, done: int = 0, label: str = "", quiet: bool = False, stream=None
    ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.total, self.done, self.start_done, self.label = total, done, done, label
        self.counts: Counter[str] = Counter()
        self.t0 = time.perf_counter()
        live = not quiet and self.stream.isatty()
        if done and not quiet:
            print(f"resuming: {done} of {total} inputs already decided", file=self.stream)
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=label,
            file=self.stream,
            disable=not live,
            unit="input",
            mininterval=0.1,
            dynamic_ncols=True,
        )

    def update(self, rec: InputRecord) -> None:
        """Count one more decided input and its float status."""
        self.done += 1
        self.counts[rec.float.status if rec.float else "misclassified"] += 1
        self.bar.set_postfix_str(self.line_counts(), refresh=False)
        self.bar.update(1)

    def line_counts(self) -> str:
        """`certified 20 refuted 10 ...`: the statuses seen so far."""
        return " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))

    def close(self) -> None:
        """Finish the bar (and print one final line when the stream is not a terminal)."""
        live = not self.bar.disable
        self.bar.close()
        if not live and not self.quiet and self.done > self.start_done:
            rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
            line = f"{self.label} {self.done}/{self.total} {rate:.1f}/s | {self.line_counts()}"
            print(line.strip(), file=self.stream)
        self.stream.flush()
