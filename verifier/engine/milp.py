"""A mixed-integer program (HiGHS) for "some point of a sub-box has a margin <= 0".

The spec chain (coefficients `s` to margins, `bounds.SpecChain`) is encoded over a sub-box
[lo, hi] with the sub-box's per-neuron pre-activation bounds (`Bounds.pre`) as big-M: integer
generators with the L1-cost budget, for each ReLU its pre-activation `p = W a + b + e` with the
spec's rounding `|e| <= err` as a free term (float32, or a quantized runtime's error model: so
the program contains every point the runtime computes, as the bounds do), the output `y = p`
(active), `0` (inactive) or the big-M encoding (unstable). Each violated margin is minimised in
turn. A quantized spec's first-layer input rounding is charged per neuron of that layer
(`bounds._first_err`, as the bounds do when it is small), its logit clamp by the spec's caps:
a margin whose cap is at or below its threshold is never declared positive. Its lattices (the
requantized values are integers) are not encoded: as integer columns they slowed HiGHS past
its time limit on every MNIST CNN node tried, with no bound gained.

Soundness: HiGHS works in floating point, so a margin is declared positive only when the
solver proves no point below `SAFETY` (its cutoff), which is orders of magnitude above its
feasibility tolerances times the weights; a minimiser is a candidate only, confirmed on the
runtime by the caller.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass

import highspy
import numpy as np

from verifier.engine.bounds import Bounds, SpecChain, _first_err
from verifier.engine.network import Affine, Relu
from verifier.engine.regions import EPS

# A margin counts as positive only when the solver proves it above this (logits): HiGHS's
# feasibility tolerances (1e-7 primal and dual) act on values of order 1-100 in these programs.
# Its integrality tolerance (1e-6) only loosens the candidates it finds, which are confirmed.
SAFETY = 1e-3


@dataclass
class MilpResult:
    """ "unsat" (every margin above SAFETY), "sat" (with a candidate `coeffs`) or "unknown"."""

    status: str
    coeffs: np.ndarray | None
    seconds: float
    best: float | None = None  # the smallest margin bound proven (unsat) or value found (sat)


def supported(spec: SpecChain) -> bool:
    """Whether the encoding covers this spec: Affine and Relu layers, with no rounding of a
    later layer's inputs (a run-time quantized input, dynamic range: not encoded)."""
    return all(isinstance(layer, (Affine, Relu)) for layer in spec.layers) and (
        spec.in_err is None or all(e is None for e in spec.in_err)
    )


class _Rows:
    """Sparse rows `lower <= A x <= upper` collected as CSR pieces."""

    def __init__(self):
        self.starts, self.index, self.value, self.lower, self.upper = [0], [], [], [], []

    def add(self, cols: np.ndarray, vals: np.ndarray, lower, upper) -> None:
        """Add rows: `cols` (m, k) column indices and `vals` (m, k) their coefficients."""
        cols, vals = np.atleast_2d(cols), np.atleast_2d(vals)
        keep = vals != 0
        counts = keep.sum(axis=1)
        self.index.append(cols[keep])
        self.value.append(vals[keep])
        self.starts.extend((self.starts[-1] + np.cumsum(counts)).tolist())
        m = len(counts)
        self.lower.append(np.broadcast_to(np.asarray(lower, dtype=np.float64), (m,)))
        self.upper.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), (m,)))


class _Model:
    """Columns (bounds, integrality) and rows of the program being built."""

    def __init__(self):
        self.lower, self.upper, self.integer = [], [], []
        self.n = 0
        self.rows = _Rows()

    def cols(self, lower, upper, integer: bool = False) -> np.ndarray:
        lower, upper = np.atleast_1d(lower), np.atleast_1d(upper)
        idx = np.arange(self.n, self.n + len(lower))
        self.lower.append(np.asarray(lower, dtype=np.float64))
        self.upper.append(np.asarray(upper, dtype=np.float64))
        self.integer.append(np.full(len(lower), integer))
        self.n += len(lower)
        return idx

    def lp(self, objective: np.ndarray, offset: float) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_ = self.n
        lp.num_row_ = len(self.rows.starts) - 1
        lp.col_cost_ = objective
        lp.offset_ = offset
        lp.col_lower_ = np.concatenate(self.lower)
        lp.col_upper_ = np.concatenate(self.upper)
        lp.row_lower_ = np.concatenate(self.rows.lower)
        lp.row_upper_ = np.concatenate(self.rows.upper)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.asarray(self.rows.starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.concatenate(self.rows.index).astype(np.int32)
        lp.a_matrix_.value_ = np.concatenate(self.rows.value).astype(np.float64)
        ints = np.concatenate(self.integer)
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in ints
        ]
        return lp


def _encode(spec: SpecChain, lo, hi, bounds: Bounds, exact: Collection[int] | None = None):
    """The program without its objective: (model, generator columns, the last layer's input
    columns and weights' column selection). `exact`: the ReLU layers (indices in `spec.layers`)
    whose phase indicators are integer, None for all; the others' are relaxed to [0, 1], which
    leaves their triangle relaxation."""
    mod = _Model()
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    s = mod.cols(lo, hi, integer=True)
    # |s_g|: the sign is fixed unless the range straddles 0 (then s = sp - sn, one of them 0)
    up, down = lo >= 0, (hi <= 0) & (lo < 0)
    cost_cols, cost_vals = [s[up], s[down]], [spec.region.cost[up], -spec.region.cost[down]]
    mixed = np.flatnonzero((lo < 0) & (hi > 0))
    if len(mixed):
        k = len(mixed)
        sp = mod.cols(np.zeros(k), hi[mixed], integer=True)
        sn = mod.cols(np.zeros(k), -lo[mixed], integer=True)
        b = mod.cols(np.zeros(k), np.ones(k), integer=True)
        ones = np.ones((k, 1))
        mod.rows.add(
            np.column_stack([s[mixed], sp, sn]), np.column_stack([ones, -ones, ones]), 0.0, 0.0
        )
        mod.rows.add(
            np.column_stack([sp, b]), np.column_stack([ones, -hi[mixed, None]]), -np.inf, 0.0
        )
        mod.rows.add(
            np.column_stack([sn, b]), np.column_stack([ones, -lo[mixed, None]]), -np.inf, -lo[mixed]
        )
        cost_cols += [sp, sn]
        cost_vals += [spec.region.cost[mixed], spec.region.cost[mixed]]
    mod.rows.add(
        np.concatenate(cost_cols)[None],
        np.concatenate(cost_vals)[None],
        -np.inf,
        spec.region.budget + EPS,
    )
    cur = s  # columns of the current layer's input; `keep` selects the weights' columns
    keep = np.arange(len(s))
    layers = spec.layers
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, Relu):
            continue
        w, bias = layer.weight[:, keep], layer.bias
        err = _first_err(spec) if i == 0 else spec.err[i]
        err = err if err is not None else np.zeros(len(bias))
        if not isinstance(layers[i + 1], Relu):  # an affine output feeding an affine layer
            p = mod.cols(np.full(len(bias), -np.inf), np.full(len(bias), np.inf))
            _tie(mod, p, cur, w, bias, err)
            cur, keep = p, np.arange(len(bias))
            continue
        l, u = bounds.pre[i + 1]
        # inactive neurons drop out; those with upper bound exactly 0 (a ReLU split fixed them,
        # see verifier.engine.relu_split) keep their constraint pre-activation <= 0
        fixed = np.flatnonzero((u == 0) & (l < 0))
        if len(fixed):
            _tie(mod, mod.cols(l[fixed], u[fixed]), cur, w[fixed], bias[fixed], err[fixed])
        on = np.flatnonzero(u > 0)
        p = mod.cols(l[on], u[on])
        _tie(mod, p, cur, w[on], bias[on], err[on])
        lon, uon = l[on], u[on]
        unstable = lon < 0
        y = p.copy()  # active neurons: the output is the pre-activation
        if np.any(unstable):
            k = int(unstable.sum())
            pu, lu, uu = p[unstable], lon[unstable], uon[unstable]
            yu = mod.cols(np.zeros(k), uu)
            d = mod.cols(np.zeros(k), np.ones(k), integer=exact is None or i + 1 in exact)
            ones = np.ones((k, 1))
            mod.rows.add(np.column_stack([yu, pu]), np.column_stack([ones, -ones]), 0.0, np.inf)
            mod.rows.add(
                np.column_stack([yu, d]), np.column_stack([ones, -uu[:, None]]), -np.inf, 0.0
            )
            mod.rows.add(
                np.column_stack([yu, pu, d]),
                np.column_stack([ones, -ones, -lu[:, None]]),
                -np.inf,
                -lu,
            )
            y[unstable] = yu
        cur, keep = y, on
    return mod, s, cur, keep


def _tie(mod: _Model, p: np.ndarray, a: np.ndarray, w: np.ndarray, b, err) -> None:
    """Rows b - err <= p - W a <= b + err."""
    m = len(p)
    cols = np.column_stack([p, np.tile(a, (m, 1))])
    vals = np.column_stack([np.ones(m), -w])
    mod.rows.add(cols, vals, b - err, b + err)


_BANNER_SHOWN = [False]


def _solver() -> highspy.Highs:
    """A silent HiGHS instance. HiGHS prints a banner on stdout at its first construction in a
    process; it is swallowed so a command's output stays its own."""
    if _BANNER_SHOWN[0]:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)
        _BANNER_SHOWN[0] = True
    h.silent()
    return h


def milp_decide(
    spec: SpecChain,
    lo: np.ndarray,
    hi: np.ndarray,
    bounds: Bounds,
    timeout_s: float,
    threshold: np.ndarray | float = 0.0,
    exact: Collection[int] | None = None,
) -> MilpResult:
    """Minimise every margin whose lower bound in `bounds` is at most its `threshold` over the
    sub-box [lo, hi]; "unsat" when all are proven above threshold + SAFETY. `exact`: the ReLU
    layers encoded exactly (None: all; see `_encode`)."""
    start = time.perf_counter()
    deadline = start + timeout_s
    if not supported(spec) or bounds.empty:
        status = "unsat" if bounds.empty else "unknown"
        return MilpResult(status, None, time.perf_counter() - start)
    mod, s, cur, keep = _encode(spec, lo, hi, bounds, exact)
    last = spec.layers[-1]
    err = spec.err[-1] if spec.err[-1] is not None else np.zeros(len(last.bias))
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), bounds.lower.shape)
    rows = np.flatnonzero(bounds.lower <= threshold)
    rows = rows[np.argsort(bounds.lower[rows])]
    if spec.cap is not None and np.any(spec.cap[rows] <= threshold[rows]):
        return MilpResult("unknown", None, time.perf_counter() - start)  # the clamp may decide
    best = np.inf
    for r in rows:
        left = deadline - time.perf_counter()
        if left <= 0:
            return MilpResult("unknown", None, time.perf_counter() - start, best)
        objective = np.zeros(mod.n)
        objective[cur] = last.weight[r, keep]
        h = _solver()
        h.setOptionValue("time_limit", float(left))
        h.setOptionValue("threads", 1)
        cut = float(threshold[r])
        h.setOptionValue("objective_bound", cut + SAFETY)  # prune above it
        h.setOptionValue("objective_target", cut)  # stop at a candidate below it
        if h.passModel(mod.lp(objective, float(last.bias[r] - err[r]))) != highspy.HighsStatus.kOk:
            return MilpResult("unknown", None, time.perf_counter() - start, best)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        found = info.primal_solution_status == highspy.kSolutionStatusFeasible
        if found and info.objective_function_value <= cut:
            coeffs = np.rint(np.asarray(h.getSolution().col_value)[s]).astype(np.int64)
            value = float(info.objective_function_value)
            return MilpResult("sat", coeffs, time.perf_counter() - start, value)
        if status == highspy.HighsModelStatus.kInfeasible:
            best = min(best, cut + SAFETY)  # nothing below the cutoff
            continue
        if status == highspy.HighsModelStatus.kOptimal and info.mip_dual_bound > cut + SAFETY:
            best = min(best, float(info.mip_dual_bound))
            continue
        return MilpResult("unknown", None, time.perf_counter() - start, best)
    return MilpResult("unsat", None, time.perf_counter() - start, best)
