"""The run-time int8 quantization of a dynamic-range model's input row, made exact per region.

A hybrid first layer quantizes its whole input row at run time (asymmetric: scale
(max(x,0) - min(x,0)) / 255, integer zero point). When every value of the region is >= 0 and
the row's maximum M is the same at every point (a value at M that no point within budget
moves), scale and zero point are the same at every point, so the dequantized value of each
input is a known function of its own generator's coefficient: round(v / scale) * scale. For a
generator with two coefficient values that function is linear in it and is folded into the
region (x and D of the values it moves); for other generators the largest rounding over their
coefficients bounds it; values near a tie keep half a step. `bounds.rounding_errors` bounds the
same rounding by half a step per value over the whole region.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from verifier.engine.network import Affine
from verifier.engine.regions import EPS, Region

LEVELS = 255.0  # asymmetric int8: 256 levels, (max - min) / 255 per step
# slack in units of a quantization step: float32 evaluation of v / scale (and of the scale
# itself) moves the rounded quantity by ~1e-5 steps; a value closer than this to a tie keeps
# half a step
SLACK = 1e-3


def fold_first_input(model, region: Region) -> tuple[Region, np.ndarray] | None:
    """(the region with the runtime's dequantized input as its x and directions, a bound on
    each value's remaining rounding), or None when the scale may vary over the region or the
    first layer does not quantize its input asymmetrically at run time."""
    r = model.rounding[0] if model.rounding else None
    if r is None or not r.dynamic_input or r.symmetric_input:
        return None
    if not isinstance(model.chain.layers[0], Affine):
        return None
    if np.any(np.count_nonzero(region.directions, axis=0) > 1):  # a value moved by several
        return None
    d = region.directions
    s_lo, s_hi = region.lo.astype(np.float64), region.hi.astype(np.float64)
    lo = region.x + np.minimum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    hi = region.x + np.maximum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    top = float(hi.max())
    if lo.min() < 0 or top <= 0 or _top_generators(region, top) is not None:
        return None
    scale = top / LEVELS
    owner = np.full(region.x.size, -1)
    g_idx, v_idx = np.nonzero(d)
    owner[v_idx] = g_idx
    x_q, d_q = region.x.copy(), d.copy()
    half = scale * (0.5 + SLACK)
    residual = np.full(region.x.size, half)
    two = region.hi - region.lo <= 1
    # unmoved values, values of fixed generators and of two-valued ones: folded exactly
    fixed = owner < 0
    base = region.x[fixed]
    delta0, ok0 = _rounding(base, scale)
    x_q[fixed] += np.where(ok0, delta0, 0.0)
    residual[fixed] = np.where(ok0, SLACK * scale, half)
    sel = np.flatnonzero((owner >= 0) & two[np.maximum(owner, 0)])
    g = owner[sel]
    v0 = region.x[sel] + region.lo[g] * d[g, sel]
    v1 = v0 + d[g, sel]
    single = (region.hi == region.lo)[g]  # a fixed coefficient: only v0 occurs
    e0, ok_a = _rounding(v0, scale)
    e1, ok_b = _rounding(v1, scale)
    e1 = np.where(single, e0, e1)
    ok = ok_a & (ok_b | single)
    slope = np.where(ok, e1 - e0, 0.0)
    x_q[sel] += np.where(ok, e0 - region.lo[g] * slope, 0.0)
    d_q[g, sel] += slope
    residual[sel] = np.where(ok, SLACK * scale, half)
    # values of generators with more coefficient values: the largest rounding over them
    rest = np.flatnonzero((owner >= 0) & ~two[np.maximum(owner, 0)])
    for gi in np.unique(owner[rest]):
        vals = np.flatnonzero(owner == gi)
        coeffs = np.arange(region.lo[gi], region.hi[gi] + 1, dtype=np.float64)
        v = region.x[vals][None, :] + coeffs[:, None] * d[gi, vals][None, :]
        e, fine = _rounding(v, scale)
        residual[vals] = np.where(fine.all(axis=0), np.abs(e).max(axis=0) + SLACK * scale, half)
    return replace(region, x=x_q, directions=d_q), residual


def _rounding(v: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """round(v / scale) * scale - v, and whether v / scale is clear of a tie."""
    t = v / scale
    frac = np.abs(t - np.round(t))
    return np.round(t) * scale - v, frac < 0.5 - SLACK


def _top_generators(region: Region, top: float) -> np.ndarray | None:
    """None when some value equals `top` at every point within budget (one at `top` at the
    box point nearest 0 that no generator moves, or whose generators cannot all move within
    the budget left), else the generators that move the values at the top."""
    p = np.clip(0, region.lo, region.hi)
    at_top = np.flatnonzero(region.x + p @ region.directions >= top)
    if not len(at_top):
        return np.zeros(0, dtype=np.int64)
    moving = (region.directions[:, at_top] != 0) & (region.lo < region.hi)[:, None]
    if np.any(~moving.any(axis=0)):
        return None  # a value at the top that stays there
    gens = np.flatnonzero(moving.any(axis=1))
    # moving every value at the top moves each of their generators by at least one step
    slack = region.budget - region.least_cost()
    return None if float(region.cost[gens].sum()) > slack + EPS else gens


def split_for_fold(region: Region, limit: int = 8) -> list[Region] | None:
    """Sub-regions covering `region` (every point within budget), in each of which the input
    row's scale is fixed: with T the two-valued generators that move the values at the top,
    T's first generator kept at its value nearest 0, or the first on and the second kept, ...,
    or all of T moved (split again). None when that needs more than `limit` sub-regions or a
    generator with more values."""
    out: list[Region] = []
    todo = [region]
    while todo:
        reg = todo.pop()
        if reg.least_cost() > reg.budget + EPS:
            continue  # no point within budget
        p = np.clip(0, reg.lo, reg.hi)
        d = reg.directions
        hi = reg.x + np.maximum(d * reg.lo[:, None], d * reg.hi[:, None]).sum(axis=0)
        gens = _top_generators(reg, float(hi.max()))
        if gens is None:
            out.append(reg)
            continue
        if not len(gens) or np.any(reg.hi[gens] - reg.lo[gens] != 1):
            return None
        other = np.where(p[gens] == reg.lo[gens], reg.hi[gens], reg.lo[gens])
        for j in range(len(gens) + 1):
            lo, hi_ = reg.lo.copy(), reg.hi.copy()
            lo[gens[:j]] = hi_[gens[:j]] = other[:j]  # the first j moved
            if j < len(gens):
                lo[gens[j]] = hi_[gens[j]] = p[gens[j]]  # the next one kept
            todo.append(replace(reg, lo=lo, hi=hi_))
        if len(out) + len(todo) > limit:
            return None
    return out
