"""Lower bounds of the margins at single points of a branch-and-bound leaf, tighter than the
leaf's linear bounds there: what the sieve (`bab.settle_node`'s `pointwise`) proves without
running the points on the runtime. The first layer is taken exact at each point; on a quantized
runtime that quantizes a ReLU's output at run time, that rounding is taken at each point too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verifier.engine.bounds import (
    HALF_STEP,
    Bounds,
    SpecChain,
    _backsub_to,
    _first_err,
    _products,
    left_times,
    pointwise_lower,
    snap,
)
from verifier.engine.network import Affine, Relu
from verifier.engine.points import varying_columns

# `first_exact_margins` takes the first ReLU at a point as relu(z) less |lam| . widen (ReLU is
# 1-Lipschitz: one pass over the points), and where that charge is more than this (logits) in
# some row, again as max(z - widen, 0) or max(z + widen, 0) by the sign of lam at the points
# left open: float32's charge is 0.04-0.06 on the MNIST MLP's feature regions (one pass: 2.4 us
# a point, against 5.9 for two); TFLite int8's is larger (the two-ReLU form proves 68-83% of
# the points the one-pass form leaves open; running it on those only: 16% less time a decision)
LIPSCHITZ_CHARGE = 0.1
# `first_exact_margins` takes the second layer's run-time input rounding at each point (about 13
# ns a moving value a point) where at most this share of the values move among the points, or
# on a runtime that runs one point per call (ONNX Runtime's dynamic copies: 23-31 us a point on
# the MNIST MLP and CNN): the MNIST CNN's lattice regions move 76 of some 1,000 (about 1 us a
# point, against TFLite dynamic's 4.5), its feature regions most (20 us, against 5)
PIN_SHARE = 0.25
# at most this many (point, first-layer output not off on the box) values a call holds at once:
# points go through `first_exact_margins` in chunks (128 MB an array; the CIFAR-10 CNN's 3,600
# first-layer outputs at the quantized enum limit's 8,192 points would be 236 MB an array, some
# six of them; the MNIST networks' 512 and 1,352 at 8,192 points fit whole)
POINT_VALUES = 1 << 24


def first_exact_margins(
    spec: SpecChain,
    b: Bounds,
    rows: np.ndarray,
    s: np.ndarray,
    target: np.ndarray | float = 0.0,
    levels: tuple | None = None,
    per_point: bool = False,
):
    """(N, len(rows)) lower bounds of the margins `rows` at the points `s` (N, G) of `b`'s box
    within budget, tighter than `b`'s linear bounds there: those bounds' rows back-substituted
    down to the first ReLU's output only, that ReLU taken at the first layer's exact output
    (`_first_relu_at_points`), never below `b`'s own bounds at the point. `levels`
    (`quantized_spec.input_levels`): where the second Affine layer's input is quantized at run
    time, that rounding is taken at each point too (`_pinned_second_input`) where that costs
    less than running the point: at every point when at most PIN_SHARE of the layer's inputs
    move among them (then before the first ReLU's passes, which it makes redundant), on a
    runtime that runs one point per call (`per_point`) at the points those passes leave at or
    below `target`; the points still left there by intervals forward through the whole spec
    (`forward_margins`, where few values move). None where the chain does not start with an
    affine layer and a ReLU, or `b` keeps no intermediate bounds. Points go in chunks of at
    most POINT_VALUES first-layer values."""
    layers = spec.layers
    if len(layers) < 3 or not isinstance(layers[1], Relu) or b.empty or b.pre[1] is None:
        return None
    m = layers[-1].weight.shape[0]
    eye = np.eye(m)[rows]
    whole = _backsub_to(spec, b.pre, len(layers), 2, eye, np.zeros(len(rows)), cut=b.cut)
    widen = first_widen(spec)
    chunk = max(POINT_VALUES // max(np.count_nonzero(b.pre[1][1] > 0.0), 1), 1)
    parts = [
        _at_points(spec, b, rows, s[i : i + chunk], target, levels, per_point, whole, widen)
        for i in range(0, len(s), chunk)
    ]
    return np.concatenate(parts) if parts else np.empty((0, len(rows)))


def _at_points(spec, b, rows, s, target, levels, per_point, whole, widen) -> np.ndarray:
    """`first_exact_margins` on one chunk of points (`whole`: the rows back-substituted to the
    first ReLU's output, `widen`: `first_widen`)."""
    level = _pinned_level(spec, levels)
    out = None
    if level is not None:
        out = _pinned_second_input(spec, b, whole, s, widen, level, PIN_SHARE)
    if out is None:
        out = _first_relu_at_points(spec, b, whole, s, widen, target)
        redo = np.flatnonzero(np.any(out <= target, axis=1))
        if level is not None and per_point and len(redo):
            pinned = _pinned_second_input(spec, b, whole, s[redo], widen, level)
            out[redo] = np.fmax(out[redo], pinned)
    if levels is not None:
        redo = np.flatnonzero(np.any(out <= target, axis=1))
        if len(redo):
            ahead = forward_margins(spec, rows, s[redo], levels, PIN_SHARE)
            if ahead is not None:
                out[redo] = np.fmax(out[redo], ahead)
    # both hold: never below b's own (fmax: a bound lost to an overflow, NaN, is not one)
    return np.fmax(out, pointwise_lower(b, s, rows))


def first_widen(spec: SpecChain) -> np.ndarray:
    """Per output of the spec's first layer, how far the runtime's value may be from the exact
    one: its own rounding bound plus its input rounding's."""
    first = spec.layers[0]
    widen = _first_err(spec)
    if spec.input_error(0) is not None:
        widen = (0.0 if widen is None else widen) + np.abs(first.weight) @ spec.input_error(0)
    return np.zeros(len(first.bias)) if widen is None else np.broadcast_to(widen, first.bias.shape)


def _first_relu_at_points(
    spec: SpecChain, b: Bounds, whole: tuple, s: np.ndarray, widen: np.ndarray, target
) -> np.ndarray:
    """`first_exact_margins`' bounds with the first ReLU taken at the first layer's exact output
    widened by its rounding bound: as one ReLU less |lam| . widen, then, where that costs more
    than LIPSCHITZ_CHARGE, as two at the points it leaves at or below `target` (`whole`: the
    rows back-substituted to that ReLU's output, and the cut lines on s)."""
    lam, c, on_s = whole
    first = spec.layers[0]
    # over the box the first ReLU's active neurons are linear in s (their outputs within z -+
    # widen) and its inactive ones 0: only the unstable ones are taken at each point
    lower, upper = b.pre[1]
    on = lower >= 0.0
    live = np.flatnonzero((lower < 0.0) & (upper > 0.0))
    lam_on, lam = lam[:, on], lam[:, live]
    c = c + lam_on @ first.bias[on] - np.abs(lam_on) @ widen[on]
    lin = lam_on @ first.weight[on]
    if on_s is not None:
        lin = lin + on_s
    weight, bias, widen = first.weight[live], first.bias[live], widen[live]
    var = varying_columns(s)
    z = _products(s, weight, bias, var)
    charge = np.abs(lam) @ widen
    rest = _products(s, lin, c, var)  # the active neurons, the cut lines and the layers above
    out = np.maximum(z, 0.0) @ lam.T - charge + rest  # relu is 1-Lipschitz: less the charge
    if np.any(charge > LIPSCHITZ_CHARGE):  # two ReLUs, at z - widen and z + widen by the sign
        redo = np.flatnonzero(np.any(out <= target, axis=1))  # of lam: at most charge more
        z = z[redo]
        low, high = np.maximum(z - widen, 0.0), np.maximum(z + widen, 0.0)
        pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        out[redo] = low @ pos.T + high @ neg.T + rest[redo]
    return out


def _pinned_level(spec: SpecChain, levels: tuple | None, k: int = 2) -> float | None:
    """The levels of Affine layer `k`'s run-time input quantization when it is taken at each
    point (`_pinned_second_input`, `forward_margins`): 255 (asymmetric, the scale max(a) / 255
    of a ReLU's output) only; a kernel that may be symmetric leaves the scale unknown. None
    also where `levels` are not of the spec's layers (a layer put before the chain's)."""
    if levels is None or len(levels) != len(spec.layers) or spec.input_error(k) is None:
        return None
    return 255.0 if levels[k] == 255.0 else None


def _pinned_second_input(
    spec: SpecChain,
    b: Bounds,
    whole: tuple,
    s: np.ndarray,
    widen: np.ndarray,
    level: float,
    share: float = 1.0,
) -> np.ndarray | None:
    """(N, rows) lower bounds of the margins at points `s` with the second Affine layer's run-time
    input quantization taken at each point rather than charged per value (`whole`: the rows
    back-substituted to that input, its rounding charged, and the cut lines on s). The input a
    is a ReLU's output, each value within [relu(z - widen), relu(z + widen)] at the point (z
    the first layer's exact output); the runtime puts it on k * scale, scale = max(a) / level
    (so within the row's max of those bounds, over level) and k an integer within HALF_STEP of
    a / scale, the assumptions the charge rests on (`_input_rounding`). Where one k is left
    (nearly every value) the value is that grid point: the charge is gone but for the scale's
    own spread. Values no generator moving among the points moves (most of a lattice region's)
    are taken once per distinct scale. A point whose every value may be 0 keeps no bound.
    None when more than `share` of the values move among the points (not worth it)."""
    lam, c, on_s = whole
    act = np.flatnonzero(b.pre[1][1] > 0.0)  # the others are 0 at every point: on the grid
    v = _first_values(spec, s, act, widen, share)
    if v is None:
        return None
    v = v.relu()
    scales, gone, group, firsts = v.scales(level)
    m = lam.T
    out = _on_grid(v.lo, v.hi, scales, m[v.vary], level)
    if len(v.still):
        old = v.group[firsts]
        at = _on_grid(v.still_lo[old], v.still_hi[old], scales[firsts], m[v.still], level)
        out += at[group]
    c = c + np.abs(lam) @ spec.input_error(2)  # the charge, taken back: the values are bounded
    out += c if on_s is None else _products(s, on_s, c, varying_columns(s))
    out[gone] = -np.inf
    return out


def _first_values(spec: SpecChain, s: np.ndarray, idx: np.ndarray, widen, share: float):
    """The first layer's outputs `idx` at points `s`, within their rounding bound `widen` of
    the exact ones (`_Values`: those no generator moving among the points moves, once); None
    when more than `share` of them move (taking them at each point is not worth it)."""
    first = spec.layers[0]
    var = varying_columns(s)
    moves = np.any(first.weight[np.ix_(idx, var)] != 0.0, axis=1)
    if np.count_nonzero(moves) > share * len(idx):
        return None
    vary, still = idx[moves], idx[~moves]
    z = _products(s, first.weight[vary], first.bias[vary], var)
    z_still = (first.weight[still] @ s[0] + first.bias[still])[None]
    w, w_still = widen[vary], widen[still]
    group = np.zeros(len(s), dtype=np.int64)
    return _Values(vary, z - w, z + w, still, z_still - w_still, z_still + w_still, group)


def _scales(top_lo, top_hi, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) bounds of each point's run-time scale, max / level, from bounds of its largest
    value (float32's slop in computing it included), and the points whose scale may be 0 (every
    value may be 0: no bound is kept there; their scales are set to 1)."""
    scales = np.stack([top_lo / level * (1.0 - 1e-6), top_hi / level * (1.0 + 1e-6)], axis=1)
    gone = scales[:, 0] <= 0.0
    scales[gone] = 1.0
    return scales, gone


def _on_grid(lo, hi, scales, m, level: float) -> np.ndarray:
    """The least of `a @ m` over values a on the grid k * scale (k an integer in [0, level]
    within HALF_STEP of a / scale) with a in [lo, hi] and scale in [scales[:, 0], scales[:, 1]]
    (one row of scales per row of lo, hi, or all against one row)."""
    up, down = np.flatnonzero(np.any(m > 0.0, axis=1)), np.flatnonzero(np.any(m < 0.0, axis=1))
    k_lo = _grid_steps(lo[:, up], None, scales, level)[0]  # (only the values some row weighs
    k_hi = _grid_steps(None, hi[:, down], scales, level)[1]  # up, or down, are needed so)
    pos, neg = np.maximum(m[up], 0.0), np.minimum(m[down], 0.0)
    return (k_lo @ pos) * scales[:, :1] + (k_hi @ neg) * scales[:, 1:]


def _grid_steps(lo, hi, scales, level: float) -> tuple:
    """The least k of `_on_grid`'s grid values at least `lo` may take, and the largest at most
    `hi` may (None where not given)."""
    k_lo = k_hi = None
    if lo is not None:  # in [0, level]: lo is at most level times the scale
        k_lo = lo * (1.0 / scales[:, 1:])
        k_lo -= HALF_STEP
        np.ceil(k_lo, out=k_lo)
    if hi is not None:  # hi >= 0
        k_hi = hi * (1.0 / scales[:, :1])
        k_hi += HALF_STEP
        np.floor(k_hi, out=k_hi)
        np.minimum(k_hi, level, out=k_hi)
    return k_lo, k_hi


def forward_margins(
    spec: SpecChain, rows, s: np.ndarray, levels: tuple, share: float = 1.0
) -> np.ndarray | None:
    """(N, len(rows)) lower bounds of the margins `rows` at points `s` by intervals carried
    forward through the whole spec at each point: the first layer exact (widened by its
    rounding bound, `first_widen`), each ReLU at the point, every run-time quantized input
    (`levels`, 255 levels) taken on its grid at the point as `_pinned_second_input` takes the
    second one, every output requantized to a lattice cut to its points (`bounds.snap`), the
    other roundings charged per value. No relaxation is left, so nearly exact at most points;
    values no generator moving among the points moves are carried once per group of points
    sharing the scales so far (`_Values`). None for chains with other layers than Affine and
    ReLU (or `levels` not of these layers: a spec with a layer put before the chain's), or
    when more than `share` of the first layer's outputs move (each layer's products per point
    then cost more than running the point)."""
    layers = spec.layers
    if len(levels) != len(layers) or not all(isinstance(x, (Affine, Relu)) for x in layers):
        return None
    every = np.arange(len(layers[0].bias))
    v = _first_values(spec, s, every, first_widen(spec), share)
    if v is None:
        return None
    v = v.snap(spec, 0)
    lost = np.zeros(len(s), dtype=bool)
    top = len(layers) - 1
    for k in range(1, top + 1):
        layer = layers[k]
        if isinstance(layer, Relu):
            v = v.relu()
            continue
        level = _pinned_level(spec, levels, k)
        if level is not None:
            v, gone = v.on_grid(level)
            lost |= gone
        elif spec.input_error(k) is not None:
            v = v.widen(spec.input_error(k))
        weight, bias, err = layer.weight, layer.bias, spec.err[k]
        if k == top:
            weight, bias = weight[rows], bias[rows]
            err = None if err is None else err[rows]
        v = v.affine(weight, None if k == top else spec.absw[k], bias, err)
        if k < top:
            v = v.snap(spec, k)
    out = v.lower()
    if spec.cap is not None:
        out = np.minimum(out, spec.cap[rows])
    out[lost] = -np.inf
    return out


@dataclass(frozen=True)
class _Values:
    """Interval bounds of a layer's values at N points: the moving ones (`vary`) per point,
    the others (`still`) per group of points (`group`: each point's)."""

    vary: np.ndarray
    lo: np.ndarray  # (N, len(vary))
    hi: np.ndarray
    still: np.ndarray
    still_lo: np.ndarray  # (groups, len(still))
    still_hi: np.ndarray
    group: np.ndarray  # (N,)

    def with_bounds(self, lo, hi, still_lo, still_hi, group=None) -> _Values:
        group = self.group if group is None else group
        return _Values(self.vary, lo, hi, self.still, still_lo, still_hi, group)

    def relu(self) -> _Values:
        m = np.maximum
        return self.with_bounds(
            m(self.lo, 0.0), m(self.hi, 0.0), m(self.still_lo, 0.0), m(self.still_hi, 0.0)
        )

    def widen(self, step: np.ndarray) -> _Values:
        sv, ss = step[self.vary], step[self.still]
        return self.with_bounds(self.lo - sv, self.hi + sv, self.still_lo - ss, self.still_hi + ss)

    def snap(self, spec: SpecChain, k: int) -> _Values:
        return self.with_bounds(
            *snap(spec, k, self.lo, self.hi), *snap(spec, k, self.still_lo, self.still_hi)
        )

    def scales(self, level: float) -> tuple:
        """Each point's run-time scale bounds (`_scales`: max / level of its values), the
        points whose every value may be 0, and the points regrouped by their group and scales
        (a group's still values share its points' scales): each point's new group, and the
        first point of each."""
        top = [
            np.maximum(v.max(axis=1, initial=0.0), still.max(axis=1, initial=0.0)[self.group])
            for v, still in ((self.lo, self.still_lo), (self.hi, self.still_hi))
        ]
        scales, gone = _scales(*top, level)
        key = self.group
        if not np.all(scales == scales[0]):
            ids = np.unique(scales.view(np.complex128).ravel(), return_inverse=True)[1]
            key = self.group * (int(ids.max()) + 1) + ids.reshape(-1)
        _, firsts, group = np.unique(key, return_index=True, return_inverse=True)
        return scales, gone, group.reshape(-1), firsts

    def on_grid(self, level: float) -> tuple[_Values, np.ndarray]:
        """The values as the runtime quantizes them at each point (`_on_grid`'s grid: scale
        max / level of the point's values), and the points where every value may be 0."""
        scales, gone, group, firsts = self.scales(level)
        old, at = self.group[firsts], scales[firsts]
        k_lo, k_hi = _grid_steps(self.still_lo[old], self.still_hi[old], at, level)
        q_lo, q_hi = _grid_steps(self.lo, self.hi, scales, level)
        return self.with_bounds(
            q_lo * scales[:, :1], q_hi * scales[:, 1:], k_lo * at[:, :1], k_hi * at[:, 1:], group
        ), gone

    def affine(self, weight: np.ndarray, absw, bias: np.ndarray, err) -> _Values:
        """y = W x + b, widened by `err` (`absw`: |W|, or None): a value moves where its row
        weighs a moving one. The still values' share goes through W's sparse forms."""
        moving = np.any(weight[:, self.vary] != 0.0, axis=1)
        ov, os_ = np.flatnonzero(moving), np.flatnonzero(~moving)
        e = np.zeros(len(bias)) if err is None else np.broadcast_to(err, bias.shape)
        absw = np.abs(weight) if absw is None else absw
        mid = np.zeros((len(self.still_lo), weight.shape[1]))
        rad = np.zeros_like(mid)
        mid[:, self.still] = (self.still_lo + self.still_hi) / 2.0
        rad[:, self.still] = (self.still_hi - self.still_lo) / 2.0
        cs = left_times(mid, weight, transpose=True) + bias
        rs = left_times(rad, absw, transpose=True) + e
        w = weight[np.ix_(ov, self.vary)]
        c = (self.lo + self.hi) / 2.0 @ w.T + cs[:, ov][self.group]
        r = (self.hi - self.lo) / 2.0 @ np.abs(w).T + rs[:, ov][self.group]
        cs, rs = cs[:, os_], rs[:, os_]
        return _Values(ov, c - r, c + r, os_, cs - rs, cs + rs, self.group)

    def lower(self) -> np.ndarray:
        """(N, values) lower bounds, in the values' order."""
        out = np.empty((len(self.group), len(self.vary) + len(self.still)))
        out[:, self.vary] = self.lo
        out[:, self.still] = self.still_lo[self.group]
        return out
