"""Differential bounds: the quantized runtime's margins as the float chain's plus a bounded
difference, both chains propagated together (the ReluDiff / NeuroDiff line of work).

Per Affine layer the difference of the two chains' outputs is
    dy = W_q da + (W_q - W) a + (b_q - b) + W_q d_in + e_q
with `a` the float chain's input (bounded by its intervals), `da` the difference of the inputs
(0 at the first layer: both read the same x' = x + s @ D), `d_in` the quantized runtime's input
rounding and `e_q` its output rounding (`bounds.rounding_errors`). Through a pair of ReLUs,
dz = relu(y + dy) - relu(y) is bounded linearly in dy from both sides' pre-activation bounds:
float active gives dz >= dy, float inactive dz >= 0, quantized active dz <= dy, quantized
inactive dz <= 0, and otherwise the chords of min(dy, 0) (below) and max(dy, 0) (above); both
inactive makes it 0, both active dy. Back-substitution gives the difference of the margins as
a linear function of s, concretised by the knapsack over the (sub-)box. The float side is the
chain in exact arithmetic: the float bounds it reuses (computed with float32 rounding charged)
hold for it too, so NQ's margin >= the float chain's lower bound + the difference's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from verifier.engine.bounds import (
    Bounds,
    SpecChain,
    _affine_exact,
    _affine_interval,
    _first_err,
    _spec_interval,
    left_times,
)
from verifier.engine.network import Affine, MaxPool, Relu


@dataclass(frozen=True)
class DiffSpec:
    """The float and quantized specs of one region and label, layer by layer alike."""

    float_spec: SpecChain  # the float chain on s (the one the float proof's bounds are on)
    quant_spec: SpecChain  # the runtime's chain on s with its rounding (an error model's)
    dw: list  # per layer: W_q - W for Affine layers, else None
    db: list  # per layer: b_q - b for Affine layers, else None


@dataclass(frozen=True)
class DiffBounds(Bounds):
    """Lower bounds of the quantized margins over a sub-box (for branch and bound), with the
    float chain's and the runtime's bounds they came from (`base`, `direct`: parents when the
    box is split) and the difference's own lower bound (`delta`)."""

    base: Bounds | None = None
    direct: Bounds | None = None  # the runtime's own linear bounds over the box
    delta: np.ndarray | None = None


def diff_spec(float_spec: SpecChain, quant_spec: SpecChain) -> DiffSpec:
    """Pair two specs of one region; raises ValueError when their layers differ in kind or
    shape, or hold a layer the difference is not propagated through (max pool)."""
    fl, ql = float_spec.layers, quant_spec.layers
    if len(fl) != len(ql) or not np.array_equal(float_spec.others, quant_spec.others):
        raise ValueError("the float and quantized specs differ in layers or margins")
    dw, db = [], []
    for a, b in zip(fl, ql, strict=True):
        if isinstance(a, Affine) and isinstance(b, Affine) and a.weight.shape == b.weight.shape:
            dw.append(b.weight - a.weight)
            db.append(b.bias - a.bias)
        elif (isinstance(a, Relu) and isinstance(b, Relu)) or (
            isinstance(a, MaxPool)
            and isinstance(b, MaxPool)
            and np.array_equal(a.windows, b.windows)
        ):
            dw.append(None)
            db.append(None)
        else:
            raise ValueError(f"differential bounds do not cover {type(a).__name__} layers")
    return DiffSpec(float_spec, quant_spec, dw, db)


def quantized_bounds(
    ds: DiffSpec,
    lo: np.ndarray,
    hi: np.ndarray,
    base: Bounds,
    direct: Bounds,
    *,
    refine: bool = True,
) -> DiffBounds:
    """Lower bounds of the quantized runtime's margins over the sub-box [lo, hi], per margin
    the best of: `direct` (linear bounds on the runtime's own chain over the box), the joint
    bound (float margin plus difference, back-substituted together), and the float lower
    bound `base.lower` plus the difference's own lower bound. `base` and `direct` are the
    float chain's and the runtime's bounds over this box (their pre-activation intervals are
    what the ReLU pairs are relaxed with). `refine=False` bounds the intermediate differences
    by intervals only (one back-substitution in all: cheap enough for every B&B node)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    m = len(ds.float_spec.others)
    if base.empty or direct.empty:
        empty = base if base.empty else direct
        return DiffBounds(**_fields(empty), base=base, direct=direct, delta=np.full(m, np.inf))
    fs = ds.float_spec
    relax = _relaxations(ds, lo, hi, base, direct, refine)
    top = len(fs.layers)
    eye, zero = np.eye(m), np.zeros((m, m))
    lam_j, c_j = _joint_backsub(ds, relax, top, eye, eye, np.zeros(m))
    lam_d, c_d = _joint_backsub(ds, relax, top, zero, eye, np.zeros(m))
    delta, _ = fs.region.minimise(lam_d, c_d, lo, hi)
    vals, argmin = fs.region.minimise(lam_j, c_j, lo, hi, argmin=True)
    joint = np.maximum(vals, base.lower + delta)
    if ds.quant_spec.cap is not None:  # the quantized margins' own bound (output clamp)
        joint = np.minimum(joint, ds.quant_spec.cap)
    own = direct.lower >= joint  # per margin, the direct bound's linear function and minimiser
    return DiffBounds(
        np.maximum(direct.lower, joint),
        np.where(own[:, None], direct.coeffs, lam_j),
        np.where(own[:, None], direct.argmin, argmin),
        direct.pre,
        "diff",
        direct.first,
        base=base,
        direct=direct,
        delta=delta,
    )


def wrap_direct(base: Bounds, direct: Bounds) -> DiffBounds:
    """The runtime's own bounds as a `DiffBounds` (no difference computed). Rows `direct` kept
    for its children (`linear_bounds(reuse=True)`) move to the wrapper, where branch and bound
    counts and drops them (`bab.ROWS_BUDGET`); `reused_parent` hands them back."""
    pointwise = {"offsets": direct.offsets, "ceiling": direct.ceiling}
    if direct.queries is None:
        return DiffBounds(**_fields(direct), **pointwise, base=base, direct=direct, delta=None)
    bare = replace(direct, point=None, queries=None)
    return DiffBounds(
        **_fields(direct),
        **pointwise,
        point=direct.point,
        queries=direct.queries,
        base=base,
        direct=bare,
        delta=None,
    )


def reused_parent(b: DiffBounds) -> Bounds:
    """The runtime's own bounds of a branch-and-bound parent, with the rows its wrapper still
    keeps (`wrap_direct`): what `linear_bounds(parent=..., reuse=True)` takes."""
    if b.queries is None:
        return b.direct
    return replace(b.direct, point=b.point, queries=b.queries)


def _fields(b: Bounds) -> dict:
    return {
        "lower": b.lower,
        "coeffs": b.coeffs,
        "argmin": b.argmin,
        "pre": b.pre,
        "method": b.method,
        "first": b.first,
        "cut": b.cut,
        "slopes": b.slopes,
    }


@dataclass(frozen=True)
class _PairRelax:
    """A Relu layer of both chains: the float ReLU's lines (CROWN), the quantized ReLU's, the
    difference's (`relu_diff_lines`), and each one's largest gap (to choose per neuron)."""

    flt: tuple  # (upper slope, upper intercept, lower slope) of relu(y)
    qnt: tuple  # the same for relu(y')
    diff: tuple  # (lower slope, lower intercept, upper slope, upper intercept) of dz in dy
    gaps: tuple  # (float, quantized, difference) largest gap of each relaxation


def _gap(l: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Largest gap between a function with a kink at 0 and its chord over [l, u]."""
    unstable = (l < 0) & (u > 0)
    return np.where(unstable, -l * u / np.where(unstable, u - l, 1.0), 0.0)


def _pair(l, u, ql, qu, d_lo, d_hi) -> _PairRelax:
    settled = ((l >= 0) & (ql >= 0)) | ((u <= 0) & (qu <= 0))
    su, iu, alpha, _ = Relu().relax(l, u)
    qsu, qiu, qalpha, _ = Relu().relax(ql, qu)
    gaps = (_gap(l, u), _gap(ql, qu), np.where(settled, 0.0, _gap(d_lo, d_hi)))
    return _PairRelax(
        (su, iu, alpha), (qsu, qiu, qalpha), relu_diff_lines(l, u, d_lo, d_hi, ql, qu), gaps
    )


def _relaxations(ds: DiffSpec, lo, hi, base: Bounds, direct: Bounds, refine: bool) -> dict:
    """Per Relu layer, both chains' and the difference's relaxations.

    Forward: intervals of the difference layer by layer; for the neurons whose ReLU pair the
    intervals leave unsettled (not both active, not both inactive), the difference is bounded
    by joint back-substitution. Pre-activation intervals: the float chain's from `base`, the
    runtime's from `direct`, each intersected with the other's plus the difference."""
    fs = ds.float_spec
    relax: dict = {}
    f_lo = f_hi = d_lo = d_hi = None
    for i, layer in enumerate(fs.layers):
        if isinstance(layer, Affine):
            if i == 0:
                d_lo, d_hi = _affine_exact(
                    Affine(ds.dw[0], ds.db[0]),
                    _first_err(ds.quant_spec),
                    lo,
                    hi,
                    fs.region,
                )
                f_lo, f_hi = (
                    base.first
                    if base.first is not None
                    else _affine_exact(layer, None, lo, hi, fs.region)
                )
            else:
                d_lo, d_hi = _delta_interval(ds, i, f_lo, f_hi, d_lo, d_hi)
                f_lo, f_hi = _spec_interval(fs, i, f_lo, f_hi)
            if i + 1 < len(fs.layers) and base.pre[i + 1] is not None:
                known = base.pre[i + 1]
                f_lo, f_hi = np.maximum(f_lo, known[0]), np.minimum(f_hi, known[1])
            continue
        l, u = f_lo, f_hi  # Relu or MaxPool: diff_spec admits nothing else
        if base.pre[i] is not None:
            l, u = np.maximum(l, base.pre[i][0]), np.minimum(u, base.pre[i][1])
        ql, qu = np.maximum(l + d_lo, direct.pre[i][0]), np.minimum(u + d_hi, direct.pre[i][1])
        d_lo, d_hi = np.maximum(d_lo, ql - u), np.minimum(d_hi, qu - l)
        if isinstance(layer, MaxPool):  # both pools relaxed on their own (no difference lines)
            relax[i] = ((l, u), (ql, qu))
            f_lo, f_hi = layer.interval(l, u)
            d_lo, d_hi = layer.window_max(ql) - f_hi, layer.window_max(qu) - f_lo
            continue
        rows = np.flatnonzero(~(((l >= 0) & (ql >= 0)) | ((u <= 0) & (qu <= 0))))
        if refine and len(rows):
            m, n = len(rows), len(l)
            unit = np.zeros((m, n))
            unit[np.arange(m), rows] = 1.0
            a, c = _joint_backsub(
                ds, relax, i, np.zeros((2 * m, n)), np.concatenate([unit, -unit]), np.zeros(2 * m)
            )
            vals, _ = fs.region.minimise(a, c, lo, hi)
            d_lo, d_hi = d_lo.copy(), d_hi.copy()
            d_lo[rows] = np.maximum(d_lo[rows], vals[:m])
            d_hi[rows] = np.minimum(d_hi[rows], -vals[m:])
            ql, qu = np.maximum(ql, l + d_lo), np.minimum(qu, u + d_hi)
        relax[i] = _pair(l, u, ql, qu, d_lo, d_hi)
        d_lo, d_hi = _relu_diff_interval(l, u, d_lo, d_hi, ql, qu)
        f_lo, f_hi = np.maximum(l, 0.0), np.maximum(u, 0.0)
    return relax


def _delta_interval(ds: DiffSpec, i: int, f_lo, f_hi, d_lo, d_hi):
    """Interval of dy at Affine layer `i` from the float input's and the difference's boxes."""
    qs = ds.quant_spec
    w = qs.layers[i]
    step = qs.input_error(i)
    noise = qs.err[i] if qs.err[i] is not None else np.zeros(len(w.bias))
    if step is not None:
        noise = noise + qs.absw[i] @ step
    lo, hi = _affine_interval(Affine(w.weight, ds.db[i]), qs.absw[i], d_lo, d_hi, noise)
    mid, rad = (f_lo + f_hi) / 2.0, (f_hi - f_lo) / 2.0
    c, r = ds.dw[i] @ mid, np.abs(ds.dw[i]) @ rad
    return lo + c - r, hi + c + r


def relu_diff_lines(l, u, d_lo, d_hi, ql=None, qu=None):
    """Lines bounding dz = relu(y + dy) - relu(y) for y in [l, u], dy in [d_lo, d_hi] (and
    y + dy in [ql, qu], default l + d_lo, u + d_hi): (lower slope, lower intercept, upper
    slope, upper intercept)."""
    ql = l + d_lo if ql is None else ql
    qu = u + d_hi if qu is None else qu
    span = np.where(d_hi > d_lo, d_hi - d_lo, 1.0)
    inner = (d_hi > 0) & (d_lo < 0)
    # min(dy, 0) >= its chord over [d_lo, d_hi] (concave); max(dy, 0) <= its chord (convex)
    cl = np.where(d_hi <= 0, 1.0, np.where(d_lo >= 0, 0.0, -d_lo / span))
    cl_b = np.where(inner, -cl * d_hi, 0.0)
    cu = np.where(d_lo >= 0, 1.0, np.where(d_hi <= 0, 0.0, d_hi / span))
    cu_b = np.where(inner, -cu * d_lo, 0.0)
    ls = np.where(l >= 0, 1.0, np.where(u <= 0, 0.0, cl))
    lb = np.where((l >= 0) | (u <= 0), 0.0, cl_b)
    us = np.where(ql >= 0, 1.0, np.where(qu <= 0, 0.0, cu))
    ub = np.where((ql >= 0) | (qu <= 0), 0.0, cu_b)
    return ls, lb, us, ub


def _relu_diff_interval(l, u, d_lo, d_hi, ql, qu):
    """Interval of dz: 1-Lipschitz and monotone, intersected with relu(y') - relu(y)."""
    low = np.where(l >= 0, d_lo, np.where(u <= 0, 0.0, np.minimum(d_lo, 0.0)))
    high = np.where(ql >= 0, d_hi, np.where(qu <= 0, 0.0, np.maximum(d_hi, 0.0)))
    low = np.maximum(low, np.maximum(ql, 0.0) - np.maximum(u, 0.0))
    high = np.minimum(high, np.maximum(qu, 0.0) - np.maximum(l, 0.0))
    return low, high


def _joint_backsub(ds: DiffSpec, relax: dict, upto: int, lam_f, lam_d, c):
    """Lower bound `lam_f . v + lam_d . dv + c` (v: the float chain's output of layer
    `upto - 1`, dv: the difference there) as a linear function of s.

    At each ReLU pair, per row and neuron, the cheaper (by largest gap) of two relaxations:
    the float ReLU for v and the difference's lines for dv, or the quantized ReLU for
    lam_d . v' (v' = v + dv) and the float ReLU for (lam_f - lam_d) . v. Rounding is charged on
    the difference (the quantized side); the float side is the chain in exact arithmetic."""
    fs, qs = ds.float_spec, ds.quant_spec
    for k in range(upto - 1, -1, -1):
        layer = fs.layers[k]
        if isinstance(layer, Affine):
            c = c + lam_f @ layer.bias + lam_d @ ds.db[k]
            if qs.err[k] is not None:
                c = c - np.abs(lam_d) @ qs.err[k]
            if k == 0 and qs.first_input is not None:
                c = c - np.abs(left_times(lam_d, qs.first_input[0])) @ qs.first_input[1]
            lam_f = lam_f @ layer.weight + lam_d @ ds.dw[k]
            if k == 0:
                return lam_f, c  # both chains read the same s: no difference below
            lam_d = lam_d @ qs.layers[k].weight
            step = qs.input_error(k)
            if step is not None:
                c = c - np.abs(lam_d) @ step
            continue
        if isinstance(layer, MaxPool):
            (fl, fu), (ql, qu) = relax[k]
            lam_f, lam_d, extra = _pool_pair(layer, fl, fu, ql, qu, lam_f, lam_d)
            c = c + extra
            continue
        r = relax[k]
        (su, iu, alpha), (qsu, qiu, qalpha), (ls, lb, us, ub), (gf, gq, gd) = (
            r.flt,
            r.qnt,
            r.diff,
            r.gaps,
        )
        rest = lam_f - lam_d
        split = np.abs(lam_d) * gq + np.abs(rest) * gf < np.abs(lam_d) * gd + np.abs(lam_f) * gf
        # separate: lam_d on relu(y') (quantized ReLU), rest on relu(y) (float ReLU)
        q = np.where(lam_d >= 0, lam_d * qalpha, lam_d * qsu)
        f_b = q + np.where(rest >= 0, rest * alpha, rest * su)
        c_b = np.minimum(lam_d, 0.0) * qiu + np.minimum(rest, 0.0) * iu
        # difference: lam_f on relu(y) (float ReLU), lam_d on dz (the difference's lines)
        f_a = np.where(lam_f >= 0, lam_f * alpha, lam_f * su)
        d_a = np.where(lam_d >= 0, lam_d * ls, lam_d * us)
        c_a = np.minimum(lam_f, 0.0) * iu + np.where(lam_d >= 0, lam_d * lb, lam_d * ub)
        c = c + np.where(split, c_b, c_a).sum(axis=1)
        lam_f, lam_d = np.where(split, f_b, f_a), np.where(split, q, d_a)
    raise AssertionError("the chain on s starts with an Affine layer")


def _pool_pair(pool: MaxPool, fl, fu, ql, qu, lam_f, lam_d):
    """A pair of max pools in the joint back-substitution: lam_d on the quantized pool,
    lam_f - lam_d on the float pool, each with its own relaxation (as `bounds._backsub`)."""
    zero = np.zeros(len(lam_d))
    q, cq = pool.back_step(lam_d, zero, ql, qu)
    f, cf = pool.back_step(lam_f - lam_d, zero, fl, fu)
    return q + f, q, cq + cf
