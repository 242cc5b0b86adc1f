"""The int8 quantization of a quantized model's input row, made exact per region: at run time
(dynamic range, below) or to a fixed grid (`fold_input_grid`: a static int8 model's input).

A hybrid first layer quantizes its whole input row at run time (asymmetric: scale
(max(x,0) - min(x,0)) / 255, integer zero point). When every value of the region is >= 0 and
the row's maximum M is the same at every point (a value at M that no point within budget
moves), scale and zero point are the same at every point, so the dequantized value of each
input is a known function of its own generator's coefficient: round(v / scale) * scale. For a
generator with two coefficient values that function is linear in it and is folded into the
region (x and D of the values it moves); for other generators the largest rounding over their
coefficients bounds it; values near a tie keep half a step. `bounds.rounding_errors` bounds the
same rounding by half a step per value over the whole region. A fixed grid has a fixed scale
everywhere: its rounding and clamp are folded the same way, with no sub-regions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from verifier.engine.bounds import U32, per_weight
from verifier.engine.network import Affine
from verifier.engine.regions import EPS, Region

LEVELS = 255.0  # asymmetric int8: 256 levels, (max - min) / 255 per step
INT16 = (-32768.0, 32767.0)  # what a u8 x s8 kernel's int16 pair sums saturate to
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
    if not _foldable(model, region):
        return None
    lo, hi = _value_range(region)
    top = float(hi.max())
    if lo.min() < 0 or top <= 0 or _top_generators(region, top) is not None:
        return None
    scale = top / LEVELS
    return _fold(region, lambda v: _rounding(v, scale), scale * (0.5 + SLACK), scale)


@dataclass(frozen=True)
class PairWeights:
    """A first layer's kernel pairs that can saturate (`quantize.rounding.PairSums`: inputs 2m,
    2m+1 of its K order; like-signed integer weights with |q1| + |q2| > 128, as 255 x 128 <
    32767): each as its row, its two inputs and their integer weights. What `fold_pair_sums`
    bounds the loss from, the same for every sub-region of a fold (computed once)."""

    rows: int
    row: np.ndarray  # (P,) the output row of each pair
    first: np.ndarray  # (P,) its inputs (the layer's input index)
    second: np.ndarray
    q1: np.ndarray  # (P,) their integer weights
    q2: np.ndarray


def pair_weights(model) -> PairWeights | None:
    """The first layer's `PairWeights` where `fold_pair_sums` applies (ONNX Runtime's u8 x s8
    kernels with pairs known, run on uint8: `_pair_rounding`; integer weights times a scale
    per row); None elsewhere. Worked out once per model (`bounds.per_weight`)."""
    r = _pair_rounding(model)
    if r is None:
        return None
    p, layer = r.pairs, model.chain.layers[0]
    return per_weight(layer.weight, ("integers", p.unit, p.order), lambda: _pairs(layer, p))


def _pairs(layer: Affine, p) -> PairWeights | None:
    """`pair_weights` of the layer with the kernel's units and order `p`."""
    q = layer.weight / p.unit[:, None]
    qi = np.round(q)
    if np.max(np.abs(q - qi), initial=0.0) > 1e-3:
        return None  # not integer weights times a scale per row
    rows, k = qi.shape
    index = np.arange(k) if p.order is None else np.asarray(p.order, dtype=np.int64)
    index = np.broadcast_to(np.atleast_2d(index), (rows, index.shape[-1]))
    if index.shape[1] % 2:  # an odd K: the last pair's second input is a 0 (weight 0)
        index = np.pad(index, ((0, 0), (0, 1)), constant_values=k)
    qo = np.take_along_axis(np.pad(qi, ((0, 0), (0, 1))), index, axis=1)
    q1, q2 = qo[:, 0::2], qo[:, 1::2]
    row, m = np.nonzero((q1 * q2 > 0) & (np.abs(q1) + np.abs(q2) > 128.0))
    first, second = index[row, 2 * m], index[row, 2 * m + 1]
    return PairWeights(rows, row, first, second, q1[row, m], q2[row, m])


def pair_sum_range(w: PairWeights, a_lo: np.ndarray, a_hi: np.ndarray):
    """(lowest, highest) sum of each pair when each input's integer lies in [a_lo, a_hi]
    (>= 0): a positive weight times the integers' ends, a negative one times them swapped."""
    a_lo, a_hi = np.append(a_lo, 0.0), np.append(a_hi, 0.0)  # the padding input is 0

    def ends(q, i):
        return np.where(q > 0, q * a_lo[i], q * a_hi[i]), np.where(q > 0, q * a_hi[i], q * a_lo[i])

    (lo1, hi1), (lo2, hi2) = ends(w.q1, w.first), ends(w.q2, w.second)
    return lo1 + lo2, hi1 + hi2


def pair_loss_range(w: PairWeights, a_lo: np.ndarray, a_hi: np.ndarray):
    """(lowest, highest) int16 saturation loss per row when each input's integer lies in
    [a_lo, a_hi]: each pair's loss S - clip(S) is nondecreasing in its sum S."""

    def loss(pair: np.ndarray) -> np.ndarray:
        return np.bincount(w.row, pair - np.clip(pair, *INT16), minlength=w.rows)

    lo, hi = pair_sum_range(w, a_lo, a_hi)
    return loss(lo), loss(hi)


def fold_pair_sums(
    model,
    region: Region,
    folded: tuple[Region, np.ndarray] | None = None,
    weights: PairWeights | None = None,
):
    """`model` with its first layer's int16 pair-sum saturation (`quantize.rounding.PairSums`:
    ONNX Runtime's u8 x s8 kernels, pairs known, a run-time uint8 input) folded in on `region`:
    each input's integer lies in a known range, and each pair's loss S - clip(S) (nondecreasing
    in its pair sum S) between its values at the ends of S's range. With `folded =
    fold_first_input(model, region)` the scale is fixed and the integers are the folded values
    over it; without, the scale max(x) / 255 ranges over [largest low, largest high] / 255
    (every value >= 0: zero point 0) and each integer over round(v / scale) for v in its range
    and every such scale. The loss times the scale has a range per row: its middle goes into
    the first layer's bias, half its width is the bound left (`known`); that loss is a
    systematic shift of 0.1-0.3 per neuron on the MNIST MLP, bounded by 0.7 both ways over a
    region. A static first layer whose input grid is folded (`folded = fold_input_grid(model,
    region)`) has its integers fixed by the grid: their ranges give the loss alike. Only where
    the kernel takes its input as uint8 (`PairSums.unsigned`: run-time quantization, or a
    fixed grid onnxruntime runs on uint8), where it saturates as modelled (checked pointwise
    on the runtime): a shift is wrong where it does not (a static int8 input: the MNIST CNN's
    QOperator logits left such a spec at x), where the two-sided bound is merely loose.
    `weights`: `pair_weights(model)` when already computed (a fold's parts).
    `model` itself when there is nothing to fold."""
    weights = pair_weights(model) if weights is None else weights
    p = model.rounding[0].pairs if weights is not None else None
    if p is None or (p.grid is not None and folded is None):
        return model
    ints = _integer_range(region, folded, p)
    if ints is None:
        return model
    a_lo, a_hi, s_lo, s_hi = ints
    r = model.rounding[0]
    p, layer = r.pairs, model.chain.layers[0]
    l_lo, l_hi = pair_loss_range(weights, a_lo, a_hi)
    # the loss in output units, loss * scale: its ends over both ranges
    low = np.minimum(l_lo * s_lo, l_lo * s_hi)
    high = np.maximum(l_hi * s_lo, l_hi * s_hi)
    mid = p.unit * (low + high) / 2.0
    # the runtime's float32 scale is within 1e-6 of the scale's range; the float32 bound of
    # the layer (`bounds.rounding_errors`) charges the shifted bias, the runtime adds its own
    n = layer.weight.shape[1] + 1
    gamma = 2.0 * n * U32 / (1.0 - n * U32)
    known = p.unit * (high - low) / 2.0 * (1.0 + 1e-6) + (1e-6 + gamma) * np.abs(mid)
    chain = replace(
        model.chain, layers=[Affine(layer.weight, layer.bias - mid), *model.chain.layers[1:]]
    )
    first = replace(r, pairs=replace(p, known=known))
    return replace(model, chain=chain, rounding=[first, *model.rounding[1:]])


def exact_saturated_pairs(
    model,
    region: Region,
    folded: tuple[Region, np.ndarray] | None,
    weights: PairWeights | None = None,
):
    """(`model` with the first layer's int16 pairs that saturate at every point of `region`
    made exact, the `PairWeights` left): such a pair adds 32767 (or -32768) whatever its
    inputs, so its two weights in that row become 0 and the constant goes into the bias, where
    `fold_pair_sums` would charge the whole range of its loss. Needs the integers fixed per
    point (`folded`: the input grid or a fixed run-time scale) and the kernel as modelled
    (`pair_weights`, computed when not given); `model` itself otherwise or when no pair always
    saturates."""
    weights = pair_weights(model) if weights is None else weights
    if weights is None or folded is None:
        return model, weights
    p = model.rounding[0].pairs
    ints = _integer_range(region, folded, p)
    if ints is None:
        return model, weights
    a_lo, a_hi, scale, _ = ints
    lo, hi = pair_sum_range(weights, a_lo, a_hi)
    top, bottom = lo >= INT16[1], hi <= INT16[0]
    sat = top | bottom
    if not sat.any():
        return model, weights
    row, first, second = weights.row[sat], weights.first[sat], weights.second[sat]
    value = np.where(top[sat], INT16[1], INT16[0])
    const = p.unit[row] * scale * (value - p.offset * (weights.q1[sat] + weights.q2[sat]))
    layer = model.chain.layers[0]
    weight, bias = layer.weight.copy(), layer.bias.copy()
    weight[row, first] = weight[row, second] = 0.0
    np.add.at(bias, row, const)
    chain = replace(
        model.chain,
        layers=[Affine(weight, bias), *model.chain.layers[1:]],
        absw=[np.abs(weight), *model.chain.absw[1:]],
    )
    keep = ~sat
    left = PairWeights(
        weights.rows,
        weights.row[keep],
        weights.first[keep],
        weights.second[keep],
        weights.q1[keep],
        weights.q2[keep],
    )
    return replace(model, chain=chain), left


def _pair_rounding(model):
    """The first layer's Rounding when its pair sums' saturation is as modelled (the kernel
    runs on uint8, pairs in a known order, the input plain: a run-time quantization, or the
    model's fixed input grid), else None."""
    r = model.rounding[0] if model.rounding else None
    p = r.pairs if r is not None else None
    if p is None or p.known is not None or not p.adjacent:
        return None
    if not isinstance(model.chain.layers[0], Affine):
        return None
    if p.grid is None and (not r.dynamic_input or r.symmetric_input):
        return None  # a run-time quantized input is uint8
    if p.grid is not None and (not p.unsigned or p.grid != _input_grid(model)):
        return None
    if not (np.all(np.asarray(p.gain) == 1.0) and np.all(np.asarray(p.shift) == 0.0)):
        return None
    return r


def _integer_range(region: Region, folded: tuple[Region, np.ndarray] | None, pairs=None):
    """(lowest, highest uint8 integer per input, lowest, highest scale) of the first layer's
    quantization on `region` (`fold_pair_sums`): to `pairs.grid` (fixed, with `folded` =
    `fold_input_grid`'s), else at run time; None when a run-time value may be negative or the
    row may be all zeros."""
    if pairs is not None and pairs.grid is not None:  # the grid's integers, offset to uint8
        region_q, residual = folded
        lo, hi = _value_range(region_q)
        step, offset = pairs.grid.scale, pairs.offset
        a_lo = np.ceil((lo - residual) / step + offset - SLACK)
        a_hi = np.floor((hi + residual) / step + offset + SLACK)
        return np.clip(a_lo, 0.0, LEVELS), np.clip(a_hi, 0.0, LEVELS), step, step
    lo, hi = _value_range(region)
    s_lo, s_hi = float(lo.max()) / LEVELS, float(hi.max()) / LEVELS
    if folded is not None:  # a fixed scale: the runtime's value is within `residual` of these
        region_q, residual = folded
        lo, hi = _value_range(region_q)
        a_lo, a_hi = np.ceil((lo - residual) / s_hi), np.floor((hi + residual) / s_hi)
        s_lo = s_hi
    elif lo.min() < 0 or s_lo <= 0:
        return None
    else:  # round(v / scale), v in [lo, hi] and scale in [s_lo, s_hi]; SLACK: float32
        a_lo = np.ceil(lo / s_hi - 0.5 - SLACK)
        a_hi = np.floor(hi / s_lo + 0.5 + SLACK)
    return np.clip(a_lo, 0.0, LEVELS), np.clip(a_hi, 0.0, LEVELS), s_lo, s_hi


def fold_input_grid(model, region: Region) -> tuple[Region, np.ndarray] | None:
    """As `fold_first_input`, for a first layer whose input is quantized to one fixed grid (a
    static int8 model's input, ONNX Runtime's QuantizeLinear on it): the grid's rounding and
    clamp of each value folded in; None when the first layer rounds its input otherwise."""
    grid = _input_grid(model)
    if grid is None or not _foldable(model, region):
        return None
    half = grid.scale * (0.5 + SLACK) + max(_overshoot(region, grid), 0.0)
    return _fold(region, lambda v: _grid_rounding(v, grid), half, grid.scale)


def _input_grid(model):
    """The one fixed grid the first layer's input is rounded to, or None."""
    r = model.rounding[0] if model.rounding else None
    if r is None or r.dynamic_input:
        return None
    events = list(r.inputs)
    if r.input_grid is not None:
        return r.input_grid if not events else None
    if len(events) != 1 or events[0].grid is None or events[0].extra:
        return None
    return events[0].grid if events[0].plain else None


def _foldable(model, region: Region) -> bool:
    """A first Affine layer, and no input value moved by more than one generator."""
    if not isinstance(model.chain.layers[0], Affine):
        return False
    return not np.any(np.count_nonzero(region.directions, axis=0) > 1)


def _value_range(region: Region) -> tuple[np.ndarray, np.ndarray]:
    d = region.directions
    s_lo, s_hi = region.lo.astype(np.float64), region.hi.astype(np.float64)
    lo = region.x + np.minimum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    hi = region.x + np.maximum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    return lo, hi


def _overshoot(region: Region, grid) -> float:
    """How far the region's values may leave the grid's range (the clamp's largest move)."""
    lo, hi = _value_range(region)
    return float(max((hi - grid.hi).max(initial=0.0), (grid.lo - lo).max(initial=0.0)))


def _fold(region: Region, rounding, half: float, scale: float) -> tuple[Region, np.ndarray]:
    """Fold `rounding(v)` (-> (q(v) - v, clear of a tie)) of every input value into the
    region: exact for unmoved values and two-valued generators, else the largest over the
    generator's values; `half` where a value may sit at a tie."""
    d = region.directions
    owner = np.full(region.x.size, -1)
    g_idx, v_idx = np.nonzero(d)
    owner[v_idx] = g_idx
    x_q, d_q = region.x.copy(), d.copy()
    residual = np.full(region.x.size, half)
    two = region.hi - region.lo <= 1
    # unmoved values, values of fixed generators and of two-valued ones: folded exactly
    fixed = owner < 0
    base = region.x[fixed]
    delta0, ok0 = rounding(base)
    x_q[fixed] += np.where(ok0, delta0, 0.0)
    residual[fixed] = np.where(ok0, SLACK * scale, half)
    sel = np.flatnonzero((owner >= 0) & two[np.maximum(owner, 0)])
    g = owner[sel]
    v0 = region.x[sel] + region.lo[g] * d[g, sel]
    v1 = v0 + d[g, sel]
    single = (region.hi == region.lo)[g]  # a fixed coefficient: only v0 occurs
    e0, ok_a = rounding(v0)
    e1, ok_b = rounding(v1)
    e1 = np.where(single, e0, e1)
    ok = ok_a & (ok_b | single)
    slope = np.where(ok, e1 - e0, 0.0)
    x_q[sel] += np.where(ok, e0 - region.lo[g] * slope, 0.0)
    d_q[g, sel] += slope
    residual[sel] = np.where(ok, SLACK * scale, half)
    # values of generators with more coefficient values: the largest rounding over them
    rest = np.flatnonzero((owner >= 0) & ~two[np.maximum(owner, 0)])
    if len(rest):  # every value's coefficients in a column, padded past its generator's end
        g = owner[rest]
        steps = np.arange(int(np.max(region.hi[g] - region.lo[g])) + 1)[:, None]
        coeffs = (region.lo[g][None, :] + steps).astype(np.float64)
        inside = coeffs <= region.hi[g][None, :]
        e, fine = rounding(region.x[rest][None, :] + coeffs * d[g, rest][None, :])
        e, fine = np.where(inside, np.abs(e), 0.0), fine | ~inside
        residual[rest] = np.where(fine.all(axis=0), e.max(axis=0) + SLACK * scale, half)
    return replace(region, x=x_q, directions=d_q), residual


def _grid_rounding(v: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """q(v) - v for rounding to `grid` then clamping to its range (an integer zero point:
    round(v / scale) * scale), and whether v / scale is clear of a tie that decides q."""
    t = v / grid.scale
    qlo, qhi = np.round(grid.lo / grid.scale), np.round(grid.hi / grid.scale)
    q = np.clip(np.round(t), qlo, qhi)
    frac = np.abs(t - np.round(t))
    clear = (frac < 0.5 - SLACK) | (t > qhi + 0.5 + SLACK) | (t < qlo - 0.5 - SLACK)
    return q * grid.scale - v, clear


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


def split_for_fold(region: Region, limit: int = 8, cover=None) -> list[Region] | None:
    """Sub-regions covering `region` (every point within budget), in each of which the input
    row's scale is fixed. With T the largest value any point may take and g_1, g_2, ... the
    generators that move a value to T (at an end of their range, `_reaching`): g_1 at that
    end (the row's maximum is T), g_1 off it and g_2 at it, ..., and all of them off it (T out
    of reach: split again on the next largest). So a generator is cut once per level, not once
    per value: a lattice of k values near the top needs about k sub-regions per distinct top
    value. None when that needs more than `limit` sub-regions. `cover` (a
    `verifier.engine.proof.Cover`) records the cuts that make them, each marked as a fold."""
    out: list[Region] = []
    todo = [region]
    while todo:
        reg = todo.pop()
        if reg.empty():
            if cover is not None:
                cover.close(reg.lo, reg.hi, "empty", reg.least_cost())
            continue  # no point within budget
        top = float(_value_range(reg)[1].max())
        if _top_generators(reg, top) is None:
            out.append(reg)
            if cover is not None:
                cover.fold(reg.lo, reg.hi)
            continue
        ends = _reaching(reg, top)
        if ends is None:
            return None
        lo, hi = reg.lo.copy(), reg.hi.copy()
        for g, at_lo, at_hi in ends:
            if at_lo:  # g at lo, and the rest: cut after lo
                if cover is not None:
                    cover.split(lo, hi, g, lo[g])
                todo.append(_fixed(reg, lo, hi, g, lo[g]))
                lo = lo.copy()
                lo[g] += 1
            if at_hi and lo[g] <= hi[g]:  # the rest, and g at hi: cut after hi - 1
                if lo[g] < hi[g] and cover is not None:
                    cover.split(lo, hi, g, hi[g] - 1)
                todo.append(_fixed(reg, lo, hi, g, hi[g]))
                hi = hi.copy()
                hi[g] -= 1
            if lo[g] > hi[g]:
                break  # every point of the box has g at an end: nothing left
        else:
            todo.append(replace(reg, lo=lo, hi=hi))
        if len(out) + len(todo) > limit:
            return None
    return out


def _fixed(reg: Region, lo: np.ndarray, hi: np.ndarray, g: int, c: int) -> Region:
    """The box [lo, hi] of `reg` with generator `g` fixed at `c`."""
    lo, hi = lo.copy(), hi.copy()
    lo[g] = hi[g] = c
    return replace(reg, lo=lo, hi=hi)


def _reaching(region: Region, top: float) -> list[tuple[int, bool, bool]] | None:
    """The generators that move a value to `top` (the largest any point may take), each with
    whether it does so at the low and at the high end of its range; None when a value moved
    by several generators reaches it (no split fixes its scale)."""
    d = region.directions
    hi_v = _value_range(region)[1]
    reach = np.flatnonzero(hi_v >= top)
    if np.any(np.count_nonzero(d[:, reach], axis=0) != 1):
        return None
    out = []
    for g in np.flatnonzero(np.any(d[:, reach] != 0, axis=1)):
        dg = d[g, reach]
        out.append((int(g), bool(np.any(dg < 0)), bool(np.any(dg > 0))))
    return out
