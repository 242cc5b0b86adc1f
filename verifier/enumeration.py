"""Ground truth on the runtime: evaluate region points in batches, enumerate (sub-)boxes, replay.

Every answer about a concrete point comes from the runtime's own `predict` (onnxruntime,
a quantized runner, ...): a point is misclassified when the runtime's argmax differs from the
label (ties go to the lowest class, as `np.argmax` does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from verifier.regions import EPS, Region

BATCH = 16384  # points per runtime call: ~50 MB of float32 for a 784-value input


@dataclass(frozen=True)
class EnumResult:
    """Outcome of enumerating a (sub-)box: a confirmed counterexample, or all points clean."""

    complete: bool  # every point of the box was evaluated (or a counterexample was found)
    coeffs: np.ndarray | None  # (G,) int64 of the first misclassified point, if any
    adv_label: int | None
    points: int  # points evaluated
    ambiguous: bool = False  # misclassified in a batch, not when re-run alone: no verdict

    @property
    def clean(self) -> bool:
        """Every point evaluated and classified as the label: the box is certified."""
        return self.complete and self.coeffs is None and not self.ambiguous


def runtime_inputs(runtime, region: Region, s: np.ndarray) -> np.ndarray:
    """Float32 inputs `region.points(s)` shaped for `runtime.predict`."""
    s = np.asarray(s).reshape(-1, region.num_generators)
    pts = _points(region, s)
    shape = getattr(runtime, "input_shape", None)
    return pts.reshape((len(s), *shape)) if shape else pts


def _points(region: Region, s: np.ndarray) -> np.ndarray:
    """`region.points(s)` as float32, touching only the columns the generators move.

    When every input value is moved by at most one generator (both of DLV's families), each
    moved value is a single product added to `x`, bit-identical to `region.points`.
    """
    cols = _disjoint_columns(region)
    if cols is None:
        return region.points(s).astype(np.float32)
    out = np.empty((len(s), region.x.size), dtype=np.float32)
    out[:] = region.x.astype(np.float32)
    moved = region.x[cols] + s.astype(np.float64) @ region.directions[:, cols]
    out[:, cols] = moved.astype(np.float32)
    return out


def _disjoint_columns(region: Region) -> np.ndarray | None:
    """Columns moved by some generator, or None when a column is moved by several."""
    per_col = (region.directions != 0).sum(axis=0)
    return None if np.any(per_col > 1) else np.flatnonzero(per_col)


def margins_and_labels(
    runtime, region: Region, s: np.ndarray, label: int
) -> tuple[np.ndarray, np.ndarray]:
    """Runtime margin `logit[label] - max other` and argmax label for each row of `s`."""
    s = np.asarray(s).reshape(-1, region.num_generators)
    if len(s) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    logits = np.asarray(runtime.predict(runtime_inputs(runtime, region, s)), dtype=np.float64)
    labels = logits.argmax(axis=1)
    others = np.delete(logits, label, axis=1)
    return logits[:, label] - others.max(axis=1), labels


def confirm(runtime, region: Region, s: np.ndarray, label: int) -> int | None:
    """The runtime's label at `region.points(s)` when it is a misclassified point of the region."""
    s = np.asarray(s, dtype=np.int64).reshape(1, -1)
    if not region.contains(s)[0]:
        return None
    x = region.points(s).astype(np.float32)
    shape = getattr(runtime, "input_shape", None)
    x = x.reshape((1, *shape)) if shape else x
    adv = int(np.asarray(runtime.predict(x)).argmax(axis=1)[0])
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
    """Evaluate every point of the sub-box [lo, hi] within budget; stop at the first error.

    A point misclassified in a batch is re-run alone (`confirm`); if none of a batch's errors
    confirms (a runtime whose answer depends on the batch), the box gets no verdict.
    """
    points = 0
    ambiguous = False
    for s in region.enumerate(batch, lo, hi):
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


def box_size(lo: np.ndarray, hi: np.ndarray, cost: np.ndarray, budget: float, limit: int) -> int:
    """Points of the sub-box within budget, exact or over-estimated, capped at `limit + 1`.

    The budget DP runs on a cost grid: exact when all costs are multiples of the smallest one,
    else on costs rounded down (a superset, so never an under-count).
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    cap = limit + 1
    box = _box_product(lo, hi, cap)
    if box < cap and _box_fits_budget(lo, hi, cost, budget):
        return box
    if box >= cap and _subsets_at_least(lo, hi, cost, budget) >= cap:
        return cap
    return min(box, _dp(lo, hi, cost, budget, cap))


def _subsets_at_least(lo, hi, cost, budget: float) -> int:
    """A lower bound on the points: C(F, k) subsets of the F free 0/1 generators (k = how many
    of the costliest fit the budget left), or 0 when the free generators are not 0/1."""
    free = hi > lo
    if not np.all((lo[free] == 0) & (hi[free] == 1)):
        return 0
    left = budget + EPS - float(np.abs(np.clip(0, lo, hi)) @ cost)
    costs = np.sort(cost[free])[::-1]
    k = int(np.searchsorted(np.cumsum(costs), left, side="right"))
    return math.comb(len(costs), k)


def _box_fits_budget(lo, hi, cost, budget) -> bool:
    far = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    return float(far @ cost) <= budget + EPS


def _dp(lo, hi, cost, budget: float, cap: int) -> int:
    pos = cost[cost > EPS]
    if len(pos) == 0:
        return _box_product(lo, hi, cap)
    units = None
    for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 32, 64):  # a common unit of all costs?
        unit = float(pos.min()) / k
        ratios = cost / unit
        if np.all(np.abs(ratios - np.round(ratios)) < 1e-6):
            units = np.round(ratios).astype(np.int64)
            break
    if units is None:  # no common unit: costs rounded down on a fine grid (an over-count)
        unit = float(pos.min()) / 64.0
        units = np.floor(cost / unit + 1e-9).astype(np.int64)
    total = int(np.floor(budget / unit + 1e-6))
    if total > 2_000_000:
        return _box_product(lo, hi, cap)
    counts = np.zeros(total + 1)
    counts[0] = 1.0
    for g in range(len(lo)):
        nxt = np.zeros_like(counts)
        for v in range(int(lo[g]), int(hi[g]) + 1):
            k = abs(v) * int(units[g])
            if k <= total:
                nxt[k:] += counts[: total + 1 - k]
        counts = np.minimum(nxt, float(cap))
    return int(min(counts.sum(), cap))


def _box_product(lo, hi, cap: int) -> int:
    box = 1
    for n in (hi - lo + 1).tolist():
        box = min(box * max(n, 0), cap)
    return box
