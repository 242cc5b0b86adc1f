"""Points of a region: how many there are, and what a runtime answers at them.

The one point counter (`count_points`) and the one way to run region points on a runtime
(`runtime_inputs`, `predict_points`): enumeration, z3, the search, the audit, the ladders and
the report's examples all go through these, so every route evaluates a point bit-identically.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Region(Protocol):
    """What evaluation needs of `regions.Region` (named here so `regions` may import this
    module for its point count)."""

    x: np.ndarray
    directions: np.ndarray

    @property
    def num_generators(self) -> int: ...


EPS = 1e-9  # as `regions.EPS`: rounding slack for budgets


# `region_inputs` builds inputs this many points at a time (its temporaries stay in cache: on
# the MNIST CNN's feature-region sieves 0.5 us a point at 1,024 against 2.3 at 16,384 at once),
# and from this many on takes the generators the points share once: a sieve's points share the
# values of its box's fixed generators (51 of 79 there; 1.3 us a point at 64 points either way)
INPUT_ROWS = 1024
SHARED_FROM = 256
# `predict_points` builds and runs this many bytes of float32 inputs at a time (about 1,300
# MNIST points; a core's L2 cache here), so that the runtime reads them from cache: 16,384
# points of a feature region, TFLite int8, 2.5 -> 1.7 us a point on the MNIST MLP and 6.6 ->
# 5.8 on the MNIST CNN (8,192: 6.5 -> 5.9 on the CNN, alike on the MLP; 2,048: alike)
PREDICT_BYTES = 4 << 20


def region_inputs(region: Region, coeffs: np.ndarray) -> np.ndarray:
    """`region.points(coeffs)` as float32 (B, n), computing only the values generators move.

    Where each value is moved by one generator (both of DLV's families) it is the single
    product `x_c + s_g * D_gc`, bit-identical to the matrix product (its other terms are exact
    zeros), computed only for the generators a point moves (a feature region's points move 8
    of 79: a fifth of the time of every column), and for those all the points share once;
    values moved by several generators take the matrix product. Each generator's columns come
    from a table (`MovedColumns`), a feature region's values at 1 ready-made: on the MNIST MLP's
    TFLite int8 sieve (input 575, features r=10: 410,656 points) 1.07 -> 0.75 us a point
    against the nonzero entries' index arithmetic and products done a call at a time.
    """
    s = np.asarray(coeffs).reshape(-1, region.num_generators)
    out = np.empty((len(s), region.x.size), dtype=np.float32)
    for i in range(0, len(s), INPUT_ROWS):
        _fill_inputs(region, s[i : i + INPUT_ROWS], out[i : i + INPUT_ROWS])
    return out


def _fill_inputs(region: Region, s: np.ndarray, out: np.ndarray) -> None:
    """`region_inputs` of the points `s` into `out` (C-contiguous rows)."""
    moved = region.moved
    base = moved.base
    moving = (s != 0) & moved.alone  # (N, G): the generators each point moves a value of
    if len(s) >= SHARED_FROM:  # the values of the generators all points share, written once
        shared = np.flatnonzero(moving[0] & moving.all(axis=0))
        shared = shared[np.all(s[:, shared] == s[0, shared], axis=0)]
        if len(shared):
            base = base.copy()
            base[moved.cols[shared]] = _moved_values(moved, shared, s[0, shared])
            moving[:, shared] = False
    out[:] = base
    at = np.flatnonzero(moving)  # one pass over a flat mask: half of `np.nonzero`'s time
    rows, gens = np.divmod(at, s.shape[1])
    flat = (rows * out.shape[1])[:, None] + moved.cols[gens]
    out.reshape(-1)[flat.ravel()] = _moved_values(moved, gens, s.reshape(-1)[at]).ravel()
    if len(moved.many):
        many = moved.many
        out[:, many] = (region.x[many] + s @ region.directions[:, many]).astype(np.float32)


def _moved_values(moved: MovedColumns, gens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The float32 values (K, width) of the columns generators `gens` move alone, each at its
    value in `values`: `x_c + s_g * D_gc` in float64, as the matrix product takes it."""
    v = np.asarray(values, dtype=np.float64)
    if np.all(v == 1.0):  # a feature region's every move
        return moved.at_one[gens]
    return (moved.x[gens] + v[:, None] * moved.d[gens]).astype(np.float32)


def varying_columns(s: np.ndarray) -> np.ndarray:
    """The columns of `s` (N, G) whose values are not all the first row's."""
    return np.flatnonzero(np.any(s != s[0], axis=0)) if len(s) else np.arange(s.shape[1])


@dataclass(frozen=True)
class MovedColumns:
    """How a region's generators move its input values (`regions.Region.moved` keeps it, since
    its every evaluation needs the same): per generator the columns it alone moves, padded to
    one width by repeating its last (a repeated write of the same value), their values at 0
    and their steps (float64, as the matrix product takes them) and their values at 1
    (float32); the columns several generators move; and the input as float32."""

    cols: np.ndarray  # (G, width) int64
    x: np.ndarray  # (G, width) float64
    d: np.ndarray  # (G, width) float64
    at_one: np.ndarray  # (G, width) float32
    alone: np.ndarray  # (G,) bool: the generator moves some column alone
    many: np.ndarray  # columns moved by several generators
    base: np.ndarray  # (n,) float32


def moved_columns(x: np.ndarray, directions: np.ndarray) -> MovedColumns:
    """The `MovedColumns` of the region `x + s D`."""
    g = len(directions)
    movers = np.count_nonzero(directions, axis=0)
    one = np.flatnonzero(movers == 1)
    owner = np.argmax(directions[:, one] != 0, axis=0)
    one = one[np.argsort(owner, kind="stable")]  # grouped by generator
    count = np.bincount(owner, minlength=g)
    width = max(int(count.max(initial=0)), 1)
    start = np.cumsum(count) - count
    last = np.maximum(count - 1, 0)
    at = start[:, None] + np.minimum(np.arange(width)[None, :], last[:, None])
    cols = one[np.minimum(at, len(one) - 1)] if len(one) else np.zeros((g, width), np.int64)
    xs = np.asarray(x, dtype=np.float64)[cols]
    d = directions[np.arange(g)[:, None], cols]
    return MovedColumns(
        cols=cols,
        x=xs,
        d=d,
        at_one=(xs + d).astype(np.float32),
        alone=count > 0,
        many=np.flatnonzero(movers > 1),
        base=np.asarray(x).astype(np.float32),
    )


def runtime_inputs(runtime, region: Region, coeffs: np.ndarray) -> np.ndarray:
    """Float32 inputs at `coeffs` (B, G) shaped for `runtime.predict` (flat when the runtime
    declares no `input_shape`, or is None)."""
    pts = region_inputs(region, coeffs)
    shape = getattr(runtime, "input_shape", None)
    return pts.reshape((len(pts), *shape)) if shape else pts


def predict_points(runtime, region: Region, coeffs: np.ndarray) -> np.ndarray:
    """The runtime's logits (B, classes) at the points of `coeffs` (B, G): built and run
    `PREDICT_BYTES` of inputs at a time, so that each part is still in cache when it runs."""
    coeffs = np.asarray(coeffs)
    rows = max(PREDICT_BYTES // (4 * max(region.x.size, 1)), 1)
    parts = [
        np.asarray(runtime.predict(runtime_inputs(runtime, region, coeffs[i : i + rows])))
        for i in range(0, max(len(coeffs), 1), rows)
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# points `point_seconds` runs (three times: the first call may allocate for the batch's size,
# the lesser of the other two is taken)
PROBE_POINTS = 256
# id(runtime) -> (a weak reference to it, its seconds a point); runners are dataclasses (not
# hashable), so kept by identity, each entry dropped with its runtime
_SECONDS: dict[int, tuple[weakref.ref, float]] = {}


def point_seconds(runtime, region: Region) -> float:
    """Seconds a point of `region` takes on `runtime` (its input built and run, in batches as
    the sieve runs them): measured once per runtime on the region's centre, as the lesser of
    wall and process CPU time (so a busy machine does not make a runtime look slow: under
    two other busy processes on two cores the float MNIST MLP measured 26-37 us a point in
    wall time against 15.6 alone); 0 (not measured) for a runtime that cannot be weakly
    referenced."""
    key = id(runtime)
    kept = _SECONDS.get(key)
    if kept is not None and kept[0]() is runtime:
        return kept[1]
    try:
        ref = weakref.ref(runtime, lambda _: _SECONDS.pop(key, None))
    except TypeError:
        return 0.0
    s = np.zeros((PROBE_POINTS, region.num_generators))
    predict_points(runtime, region, s)
    used = np.inf
    for _ in range(2):  # the lesser of two runs: a garbage collection may pause one
        start, cpu = time.perf_counter(), time.process_time()
        predict_points(runtime, region, s)
        # the lesser of wall and CPU time: wall time grows while other processes hold the
        # cores, CPU time with a runtime's own threads; the sieve's limit should follow neither
        used = min(used, time.perf_counter() - start, time.process_time() - cpu)
    seconds = max(used, 1e-9) / PROBE_POINTS
    _SECONDS[key] = (ref, seconds)
    return seconds


def count_points(lo, hi, cost, budget: float, limit: int = 10**12, exact: bool = False) -> int:
    """Integer points of the box `[lo, hi]` with `sum |s_g| * cost_g <= budget`, capped at
    `limit + 1` (so "more than `limit`" is seen).

    The budget DP runs on a cost grid: exact when all costs are multiples of a common unit
    (lattice regions), else on costs rounded down (a superset, so never an under-count: what
    the decision routes need, fast). `exact=True` runs the DP over the distinct used budgets
    instead (always exact, slower: for tests and `Region.size`).
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    cap = limit + 1
    box = _box_product(lo, hi, cap)
    if box < cap and _box_fits_budget(lo, hi, cost, budget):
        return box
    if box >= cap and _subsets_at_least(lo, hi, cost, budget) >= cap:
        return cap
    if exact:
        return min(box, _exact(lo, hi, cost, budget, cap))
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


def _exact(lo, hi, cost, budget: float, cap: int) -> int:
    """The exact count by a DP over the distinct used budgets."""
    states = {0.0: 1}
    for g in range(len(lo)):
        nxt: dict[float, int] = {}
        for used, n in states.items():
            for v in range(int(lo[g]), int(hi[g]) + 1):
                c = round(used + abs(v) * float(cost[g]), 9)
                if c <= budget + EPS:
                    nxt[c] = min(cap, nxt.get(c, 0) + n)
        states = nxt
        if not states:
            return 0
    return min(cap, sum(states.values()))


LABEL_BATCH = 8192  # region points per runtime call when only labels are kept


def labels_at(runtime, region: Region, s: np.ndarray) -> np.ndarray:
    """The runtime's labels at the region points with coefficients `s` (B, G)."""
    s = np.asarray(s, dtype=np.int64).reshape(-1, region.num_generators)
    out = np.empty(len(s), dtype=np.int64)
    for start in range(0, len(s), LABEL_BATCH):
        part = s[start : start + LABEL_BATCH]
        out[start : start + len(part)] = predict_points(runtime, region, part).argmax(axis=1)
    return out
