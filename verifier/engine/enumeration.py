"""Ground truth on the runtime: evaluate region points in batches, enumerate (sub-)boxes, replay.

Every answer about a concrete point comes from the runtime's own `predict` (onnxruntime,
a quantized runner, ...): a point is misclassified when the runtime's argmax differs from the
label (ties go to the lowest class, as `np.argmax` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from verifier.engine.points import predict_points
from verifier.engine.regions import Region

BATCH = 16384  # points per runtime call: ~50 MB of float32 for a 784-value input


@dataclass(frozen=True)
class EnumResult:
    """Outcome of enumerating a (sub-)box: a confirmed counterexample, or all points clean."""

    complete: bool  # every point of the box was evaluated (or a counterexample was found)
    coeffs: np.ndarray | None  # (G,) int64 of the first misclassified point, if any
    adv_label: int | None
    points: int  # points evaluated
    ambiguous: bool = False  # misclassified in a batch, not when re-run alone: no verdict
    route: str = "enumeration"  # or "sieve": only the points a box's bounds leave open

    @property
    def clean(self) -> bool:
        """Every point evaluated and classified as the label: the box is certified."""
        return self.complete and self.coeffs is None and not self.ambiguous


def margins_and_labels(
    runtime, region: Region, s: np.ndarray, label: int
) -> tuple[np.ndarray, np.ndarray]:
    """Runtime margin `logit[label] - max other` and argmax label for each row of `s`."""
    s = np.asarray(s).reshape(-1, region.num_generators)
    if len(s) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    logits = np.asarray(predict_points(runtime, region, s), dtype=np.float64)
    labels = logits.argmax(axis=1)
    others = np.delete(logits, label, axis=1)
    return logits[:, label] - others.max(axis=1), labels


def confirm(runtime, region: Region, s: np.ndarray, label: int) -> int | None:
    """The runtime's label at `region.points(s)` when it is a misclassified point of the region."""
    s = np.asarray(s, dtype=np.int64).reshape(1, -1)
    if not region.contains(s)[0]:
        return None
    adv = int(np.asarray(predict_points(runtime, region, s)).argmax(axis=1)[0])
    return adv if adv != label else None


def replay(
    runtime, region: Region, coeffs_batch: np.ndarray, label: int, batch: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Replay coefficient vectors on a runtime: (misclassified mask, runtime labels)."""
    s = np.asarray(coeffs_batch, dtype=np.int64).reshape(-1, region.num_generators)
    labels = np.empty(len(s), dtype=np.int64)
    for start in range(0, len(s), batch):
        _, labels[start : start + batch] = margins_and_labels(
            runtime, region, s[start : start + batch], label
        )
    return labels != label, labels


def enumerate_box(
    runtime,
    region: Region,
    label: int,
    lo=None,
    hi=None,
    *,
    deadline: float = np.inf,
    batch: int = BATCH,
) -> EnumResult:
    """Evaluate every point of the sub-box [lo, hi] within budget; stop at the first error
    (`check_points`)."""
    return check_points(runtime, region, label, region.enumerate(batch, lo, hi), deadline)


def check_points(runtime, region: Region, label: int, batches, deadline: float) -> EnumResult:
    """Evaluate the points of `batches` ((B, G) coefficient arrays) on the runtime; stop at the
    first error.

    A point misclassified in a batch is re-run alone (`confirm`); if none of a batch's errors
    confirms (a runtime whose answer depends on the batch), the box gets no verdict.
    """
    points = 0
    ambiguous = False
    for s in batches:
        if time.perf_counter() > deadline:
            return EnumResult(False, None, None, points, ambiguous)
        _, labels = margins_and_labels(runtime, region, s, label)
        points += len(s)
        bad = np.flatnonzero(labels != label)
        for i in bad[:8]:
            adv = confirm(runtime, region, s[i], label)
            if adv is not None:
                return EnumResult(True, s[i].astype(np.int64), adv, points)
        ambiguous = ambiguous or len(bad) > 0
    return EnumResult(True, None, None, points, ambiguous)
