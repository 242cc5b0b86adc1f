"""Re-check a kept proof (`verifier.engine.proof`) leaf by leaf, with code of its own.

The tree is walked from the region's box: each split must cut a generator strictly inside its
range (so the children partition the parent), the stream must end exactly with the tree, and
each leaf is closed again by its own route:

- `bounds`: margin lower bounds re-derived here (exact first layer by a fractional knapsack,
  then interval and plain back-substituted linear bounds, ReLU lower slopes 0/1 by the usual
  rule, the first ReLU's upper lines taken over the knapsack where every generator's sign is
  fixed (`_cut_lines`), intermediate bounds intersected with the enclosing box's, as every
  enclosing box's bounds hold in it); when they do not close the leaf, the ReLU lower slopes
  are optimised here by projected gradient (any slope in [0, 1] is sound); a leaf still open
  runs the points those bounds leave open on the runtime (at most `max_points`), or is
  enumerated when small enough, else it is not checkable. Its stored margin
  must not exceed the margin at the box's point nearest 0, and must be positive.
- `empty`: the box's least cost must exceed the budget.
- `enumeration`: the stored point count must equal the box's; the box is enumerated on the
  runtime (at most `max_points` points, else not checkable) and every point must keep the label.
- `sieve`: margin linear bounds re-derived here (as for `bounds`); every point of the box they
  do not prove (`Region.points_below`) runs on the runtime and must keep the label; when more
  than `max_points` are left, the same with the slopes optimised here, then the box is
  enumerated if small enough, else not checkable.
- `z3` and `milp`: enumerated on the runtime when small enough, else re-solved by z3 on the box.

A `fold` node's box must lie within one sub-region of the dynamic-range input fold; its subtree
is checked on that sub-region's spec (`Problem.fold`), bounds inherited from none above it.

Only the problem statement is shared with the search: the region and the chain composed with
it and its rounding bounds (`bounds.spec_chain`, what "the margin" means); the bound
computation, the knapsack and the tree walk are this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from verifier.engine.bounds import HALF_STEP
from verifier.engine.box_rounding import FIT_GAIN, linear_fit
from verifier.engine.network import Affine, MaxPool, Relu
from verifier.engine.points import count_points
from verifier.engine.proof import FOLD, SPLIT, Proof, ProofFormatError, decode
from verifier.engine.regions import EPS, Region

CHECKED, FAILED, NOT_CHECKABLE = "checked", "failed", "not checkable"
# A stored margin may exceed the true one at a point by float noise only.
MARGIN_RTOL = 1e-4
# gradient steps on the slopes of a bounds leaf plain bounds do not close (until all close):
# the engine's quantized nodes close leaves with slopes refined down the whole path. MNIST CNN
# int8 proofs of inputs 0 / 17 / 116 (features r=10, 20 s): 60 steps left 9 / 0 / 17 bounds
# leaves not checkable, 200 steps none, the audit 443 -> 417 s (fewer boxes enumerated)
SLOPE_STEPS = 200
SLOPE_RATE = 0.2


@dataclass
class Verdict:
    """The re-check of one proof: its status, why, and leaves re-checked per route."""

    status: str = CHECKED
    message: str = ""
    leaves: dict = field(default_factory=dict)  # kind -> leaves re-closed
    unchecked: dict = field(default_factory=dict)  # kind -> leaves not checkable
    nodes: int = 0
    points: int = 0  # enumerated on the runtime

    def fail(self, message: str) -> Verdict:
        self.status, self.message = FAILED, message
        return self


@dataclass(frozen=True)
class Problem:
    """What a proof speaks about: the region, the label, the runtime, and the spec (the chain
    on the region's coefficients with its rounding bounds; None when bounds do not apply)."""

    region: Region
    label: int
    runtime: object
    spec: object = None  # verifier.engine.bounds.SpecChain
    chain: list | None = None  # the lowered float chain (z3 re-solves)
    max_points: int = 200_000
    smt_timeout: float = 10.0
    # the spec of the input fold's sub-region holding a box (lo, hi); None when none holds it
    fold: Callable | None = None
    # per spec layer, the levels of a run-time quantized input after a ReLU
    # (`quantized_spec.input_levels`): its rounding is bounded on each box from the enclosing
    # box's ReLU bounds, as the search bounds its branch-and-bound nodes
    levels: tuple | None = None
    # per margin, what its lower bound must exceed for the runtime to keep the label (a tie on
    # the logits' grid may be the label's: `quantized_spec.decision_thresholds`); None: 0
    threshold: np.ndarray | None = None

    def bar(self, spec) -> np.ndarray:
        """What each margin of `spec` must exceed."""
        return np.zeros(len(spec.others)) if self.threshold is None else self.threshold


def read(data: bytes) -> Proof | Verdict:
    """The proof in `data`, or the verdict on bytes that are not one: failed when unreadable,
    not checkable when they hold a node kind of a newer version."""
    try:
        return decode(data)
    except ProofFormatError as exc:
        if "unknown node tag" in str(exc):
            return Verdict(NOT_CHECKABLE, f"written by a newer version: {exc}")
        return Verdict().fail(f"unreadable proof: {exc}")


RECHECKED = (Affine, Relu, MaxPool)  # the operators this module re-derives bounds through


def check_proof(data: bytes, problem: Problem) -> Verdict:
    """Re-check the encoded proof `data` against `problem` (see the module docstring)."""
    proof = read(data)
    if isinstance(proof, Verdict):
        return proof
    layers = problem.spec.layers if problem.spec is not None else problem.chain or []
    other = [type(x).__name__ for x in layers if not isinstance(x, RECHECKED)]
    if other:
        return Verdict(NOT_CHECKABLE, f"no independent re-check for operator {other[0]}")
    return check_tree(proof, problem)


def check_tree(proof: Proof, problem: Problem) -> Verdict:
    """Re-check a decoded proof (see the module docstring)."""
    region = problem.region
    out = Verdict()
    if proof.generators != region.num_generators:
        got = region.num_generators
        return out.fail(f"proof of {proof.generators} generators, region of {got}")
    nodes = list(proof.nodes)
    if any(n.kind == "bounds" for n in nodes) and problem.spec is None:
        return out.fail(f"bounds leaves on '{proof.spec}' and no spec to re-derive them")
    # depth first, left child first: the same order the proof lists its nodes in
    stack = [(region.lo.astype(np.int64), region.hi.astype(np.int64), None, problem)]
    pos = 0
    while stack:
        lo, hi, parent, here_problem = stack.pop()
        if pos >= len(nodes):
            return out.fail(f"truncated: the box {_box(lo, hi)} is not covered")
        node = nodes[pos]
        pos += 1
        out.nodes += 1
        if node.kind == FOLD:
            spec = problem.fold(lo, hi) if problem.fold is not None else None
            if spec is None:
                return out.fail(f"node {pos - 1}: {_box(lo, hi)} is in no sub-region of the fold")
            stack.append((lo, hi, None, replace(problem, spec=spec)))
            continue
        if node.kind == SPLIT:
            g, mid = node.values
            if not 0 <= g < len(lo) or not lo[g] <= mid < hi[g]:
                return out.fail(
                    f"node {pos - 1}: split of generator {g} after {mid} does not cut "
                    f"{_box(lo, hi)} in two"
                )
            spec = _on_box(here_problem, parent, lo, hi)
            here = _node_bounds(spec, lo, hi, parent) if spec else None
            left_hi, right_lo = hi.copy(), lo.copy()
            left_hi[g], right_lo[g] = mid, mid + 1
            stack.append((right_lo, hi, here, here_problem))
            stack.append((lo, left_hi, here, here_problem))
            continue
        why = _check_leaf(node, lo, hi, parent, here_problem, out)
        if why is not None:
            return out.fail(f"node {pos - 1} ({node.kind} leaf on {_box(lo, hi)}): {why}")
    if pos != len(nodes):
        return out.fail(f"{len(nodes) - pos} nodes after the tree ends")
    if out.unchecked:
        out.status = NOT_CHECKABLE
        out.message = "leaves not checkable: " + ", ".join(
            f"{v} {k}" for k, v in sorted(out.unchecked.items())
        )
    return out


def _box(lo: np.ndarray, hi: np.ndarray) -> str:
    moved = np.flatnonzero(lo != hi)
    return (
        "{"
        + ", ".join(f"s{g} in [{lo[g]}, {hi[g]}]" for g in moved[:6])
        + (", ..." if len(moved) > 6 else "")
        + "}"
    )


def _tally(d: dict, kind: str) -> None:
    d[kind] = d.get(kind, 0) + 1


def _check_leaf(node, lo, hi, parent, problem: Problem, out: Verdict) -> str | None:
    """Close one leaf again; returns why it fails, None when it holds (or is not checkable)."""
    region = problem.region
    kind = node.kind
    if kind == "empty":
        least = float(np.abs(np.clip(0, lo, hi)) @ region.cost)
        if least <= region.budget + EPS:
            return f"the box holds points (least cost {least:g} <= budget {region.budget:g})"
        _tally(out.leaves, kind)
        return None
    if kind == "enumeration":
        count = count_points(lo, hi, region.cost, region.budget, exact=True)
        if count != node.get("points"):
            return f"the box has {count} points, the proof says {node.get('points')}"
        return _by_enumeration(lo, hi, count, problem, out, kind)
    if kind == "bounds":
        return _check_bounds(node.get("margin"), lo, hi, parent, problem, out)
    if kind == "sieve":
        return _check_sieve(lo, hi, parent, problem, out)
    if kind in ("z3", "milp"):  # both re-checked by enumeration or by z3
        return _check_z3(lo, hi, parent, problem, out, kind)
    _tally(out.unchecked, kind)  # a kind this checker does not know
    return None


def _by_enumeration(lo, hi, count: int, problem: Problem, out: Verdict, kind: str) -> str | None:
    """Every point of the box on the runtime (when at most `max_points`)."""
    if count > problem.max_points:
        _tally(out.unchecked, kind)
        return None
    return _run_points(problem.region.enumerate(lo=lo, hi=hi), problem, out, kind)


def _run_points(batches, problem: Problem, out: Verdict, kind: str) -> str | None:
    """Each batch of points ((B, G) coefficients) on the runtime: every one must keep the
    label; the leaf is tallied as re-closed by `kind` when all do."""
    from verifier.engine.points import labels_at

    for s in batches:
        labels = labels_at(problem.runtime, problem.region, s)
        out.points += len(s)
        bad = np.flatnonzero(labels != problem.label)
        if len(bad):
            return f"the runtime misclassifies the point {[int(v) for v in s[bad[0]]]}"
    _tally(out.leaves, kind)
    return None


def _batches(pts: np.ndarray, size: int = 16384):
    """The points `pts` in batches for the runtime (none when there is none)."""
    return (pts[i : i + size] for i in range(0, len(pts), size))


def _check_sieve(lo, hi, parent, problem: Problem, out: Verdict) -> str | None:
    """A sieve leaf: margin linear bounds computed here over the box (plain slopes, then where
    they leave more than `max_points` points, slopes optimised here as for a bounds leaf); the
    points where some is not positive (`Region.points_below`) run on the runtime and keep the
    label. Else the box is enumerated when small enough, or it is not checkable."""
    region = problem.region
    spec = _on_box(problem, parent, lo, hi)
    pts = None
    if spec is not None:
        b, bar = _node_bounds(spec, lo, hi, parent), problem.bar(spec)
        open_ = ~(b.lower > bar)
        cap = getattr(spec, "cap", None)
        if cap is None or not np.any(cap[open_] <= bar[open_]):
            rows = np.eye(len(spec.others))[open_]
            a, c = _back(spec, b.pre, len(spec.layers), rows, np.zeros(len(rows)), cut=b.cut)
            pts = region.points_below(a, c - bar[open_], lo, hi, cap=problem.max_points)
            if pts is None:  # more points left than run: with slopes optimised here
                _, a, c = _optimised_margins(spec, lo, hi, b, bar)
                pts = region.points_below(
                    a[open_], c[open_] - bar[open_], lo, hi, cap=problem.max_points
                )
    if pts is None:
        count = count_points(lo, hi, region.cost, region.budget, problem.max_points + 1)
        return _by_enumeration(lo, hi, count, problem, out, "sieve")
    return _run_points(_batches(pts), problem, out, "sieve")


def _check_bounds(margin: float, lo, hi, parent, problem: Problem, out: Verdict) -> str | None:
    """A bounds leaf: its evidence is consistent, and bounds computed here close it, or leave
    at most `max_points` points open, which run on the runtime and keep the label."""
    region, spec = problem.region, problem.spec
    bar = problem.bar(spec)
    if not margin > 0:
        return f"its margin {margin:g} does not close it"
    p = np.clip(0, lo, hi).astype(np.float64)
    if float(np.abs(p) @ region.cost) > region.budget + EPS:
        return "a bounds leaf on a box with no point (an empty leaf)"
    at = float(np.min(_margins_at(spec, p) - bar))
    if margin > at + MARGIN_RTOL * (1.0 + abs(at)):
        return f"its margin {margin:g} exceeds the margin {at:g} at the point {p.astype(int)}"
    spec = _on_box(problem, parent, lo, hi)
    b = _node_bounds(spec, lo, hi, parent)
    worst = b.lower
    if np.all(worst > bar):
        _tally(out.leaves, "bounds")
        return None
    # every ReLU's cut lines, then the first ReLU's alone (where deeper cuts are the looser
    # lines: optimised root bounds take the better), each with slopes optimised here
    rows = None
    for cut in (b.cut, _first_only(b.cut)) if _first_only(b.cut) != b.cut else (b.cut,):
        if cut is not b.cut:
            worst = np.maximum(worst, _margin_bounds(spec, lo, hi, b.pre, cut))
        best, a, c = _optimised_margins(spec, lo, hi, replace(b, cut=cut), bar)
        if np.all(np.maximum(worst, best) > bar):
            _tally(out.leaves, "bounds")
            return None
        rows = (a, c, best) if rows is None else rows
    count = count_points(lo, hi, region.cost, region.budget, problem.max_points + 1)
    if count > problem.max_points:  # the points its optimised bounds leave open, on the runtime
        a, c, best = rows
        open_ = ~(best > bar)
        pts = region.points_below(a[open_], c[open_] - bar[open_], lo, hi, cap=problem.max_points)
        if pts is not None:
            return _run_points(_batches(pts), problem, out, "bounds")
    return _by_enumeration(lo, hi, count, problem, out, "bounds")


def _on_box(problem: Problem, parent: _BoxBounds | None, lo, hi):
    """The problem's spec on the box [lo, hi] within `parent`'s: the first layer's rounding
    to its grid as it is over the box's points (`_grid_rounding`), and each run-time quantized
    input (`Problem.levels`) bounded: 0 where the ReLU before it is off there (0 is on every
    such grid), else half of (the largest ReLU upper bound) / levels, never more than the
    spec's own."""
    spec, levels = _grid_rounding(problem.spec, problem.region, lo, hi), problem.levels
    if spec is None or levels is None or parent is None or spec.in_err is None:
        return spec
    if len(levels) != len(spec.layers):
        return spec
    steps, layers = list(spec.in_err), list(spec.layers)
    for k, n in enumerate(levels):
        if n is None or steps[k] is None or parent.pre[k - 1] is None:
            continue
        down, up = parent.pre[k - 1]
        half = max(float(np.max(up)), 0.0) / n * (1.0 + 1e-6) * HALF_STEP
        steps[k] = np.where(up > 0.0, np.minimum(steps[k], half), 0.0)
        moves = _grid_moves(np.maximum(down, 0.0), np.maximum(up, 0.0), n) if n == 255 else None
        if moves is None:
            continue
        least, most = moves
        take = (most - least) / 2.0 < steps[k]
        if np.any(take):  # the move's midpoint into the bias, its half range as the bound
            w, b = layers[k].weight, layers[k].bias
            layers[k] = Affine(w, b + w @ np.where(take, (least + most) / 2.0, 0.0))
            steps[k] = np.where(take, (most - least) / 2.0, steps[k])
    return replace(spec, layers=layers, in_err=steps)


def _grid_moves(low: np.ndarray, up: np.ndarray, n: float):
    """The least and most each value in [low, up] (a ReLU's outputs) moves when the runtime
    puts it on k * scale (asymmetric, zero point 0: the scale is the largest value over `n`,
    k an integer in [0, n] within HALF_STEP of value / scale); None where the scale may be 0.
    Where its ReLU input's bounds are nearly one value (a lattice region's values no moved
    pixel reaches) that is nearly one move, not half a step either way."""
    scales = (float(np.max(low)) / n * (1.0 - 1e-6), float(np.max(up)) / n * (1.0 + 1e-6))
    if not 0.0 < scales[0] <= scales[1]:  # (crossed bounds: a box with no point)
        return None
    fewest = np.clip(np.ceil(low / scales[1] - HALF_STEP), 0.0, n)
    most = np.clip(np.floor(up / scales[0] + HALF_STEP), 0.0, n)
    return fewest * scales[0] - up, most * scales[1] - low


# first-layer outputs with more free generators than this keep the spec's rounding bound (as
# many as the search lists: more would only cost time)
GRID_FREE_MAX = 6


def _grid_rounding(spec, region: Region, lo, hi):
    """`spec` with its first layer's requantization bounded over the box's points: on a box of
    0/1 generators each output with at most `GRID_FREE_MAX` free generators takes at most
    2^k values; every grid point a value within the spec's bound beyond half a step of one of
    them rounds to is listed, and the layer's bias and bound are moved to the range they span,
    or its weights, bias and bound to what their linear fit leaves where that is narrower (the
    search does the same with code of its own, `verifier.engine.box_rounding`, whose fit it
    takes). The narrowed outputs moved by the same generators are charged together where
    back-substitution reaches the layer (`_GroupCharge`, as the search's `GroupedRounding`)."""
    if spec is None or spec.lattice is None or spec.lattice[0] is None or spec.err[0] is None:
        return spec
    if not isinstance(spec.layers[0], Affine) or np.any(lo < 0) or np.any(hi - lo > 1):
        return spec
    w, bias = spec.layers[0].weight, spec.layers[0].bias
    grid = [np.broadcast_to(np.asarray(v, dtype=np.float64), bias.shape) for v in spec.lattice[0]]
    step, origin = grid
    bound = _first_widen(spec)
    room = region.budget - float(np.abs(lo) @ region.cost)
    if room < 0:
        return spec
    moves = (w != 0) & (hi > lo)[None, :]
    count = moves.sum(axis=1)
    at_lo = w @ lo.astype(np.float64) + bias
    extra = np.maximum(bound - 0.5 * step, 0.0) + 1e-9 * step
    new_bias, new_bound = bias.copy(), np.array(bound, dtype=np.float64, copy=True)
    new_w = w.copy()
    buckets = []  # per k: the narrowed rows' moves about their new bias at each point
    for k in range(GRID_FREE_MAX + 1):
        rows = np.flatnonzero(count == k)
        if not len(rows):
            continue
        cols = np.argsort(~moves[rows], axis=1, kind="stable")[:, :k]  # the moving ones
        picks = ((np.arange(2**k)[:, None] >> np.arange(k)[None, :]) & 1).astype(np.float64)
        fits = (region.cost[cols] @ picks.T) <= room + EPS
        value = at_lo[rows, None] + np.einsum(
            "rk,pk->rp", np.take_along_axis(w[rows], cols, 1), picks
        )
        st, og, ex = step[rows, None], origin[rows, None], extra[rows, None]
        down = og + np.ceil((value - ex - og) / st - 0.5) * st - value
        up = og + np.floor((value + ex - og) / st + 0.5) * st - value
        # the moves' own range, or what their linear fit on the moving generators leaves where
        # that is narrower (the search's choice of slopes: any slopes hold, what they leave is
        # taken at every point here)
        slopes = linear_fit((down + up) / 2 / st, picks.T, None if fits.all() else fits) * st
        fit = slopes @ picks.T
        lowest = np.where(fits, down, np.inf).min(axis=1)
        highest = np.where(fits, up, -np.inf).max(axis=1)
        fit_low = np.where(fits, down - fit, np.inf).min(axis=1)
        fit_high = np.where(fits, up - fit, -np.inf).max(axis=1)
        by_fit = fit_high - fit_low < highest - lowest - FIT_GAIN * st[:, 0]
        lowest, highest = np.where(by_fit, fit_low, lowest), np.where(by_fit, fit_high, highest)
        half = (highest - lowest) / 2
        better = half < bound[rows]
        moved = rows[better]
        new_bias[moved] += ((highest + lowest) / 2)[better]
        new_bound[moved] = half[better]
        new_w[moved[:, None], cols[better]] += np.where(by_fit[:, None], slopes, 0.0)[better]
        taken = np.where(by_fit[:, None], fit, 0.0) + ((highest + lowest) / 2)[:, None]
        if len(moved):
            low, high = (down - taken)[better], (up - taken)[better]
            buckets.append(_group_moves(moved, cols[better], low, high, fits[better], len(bias)))
    if np.array_equal(new_bound, bound):
        return spec
    # the input rounding stays charged apart (`first_input`), once more on the narrowed ones
    first = np.where(new_bound < bound, new_bound, spec.err[0])
    layers = [Affine(new_w, new_bias), *spec.layers[1:]]
    absw = [np.abs(new_w), *spec.absw[1:]]
    grouped = np.zeros(len(first) + 1, dtype=bool)
    for members, *_ in buckets:
        grouped[members] = True
    charge = _GroupCharge(first, np.flatnonzero(~grouped[:-1]), tuple(buckets))
    return replace(spec, layers=layers, err=[first, *spec.err[1:]], absw=absw, first_charge=charge)


def _group_moves(rows, cols, low, high, fits, n: int):
    """The narrowed `rows` (one k) in groups of those moved by the same generators `cols`: per
    group its rows (padded with `n`), their lowest and highest move at each point (0 at
    padding), and +inf at the points the budget leaves out."""
    _, group = np.unique(cols, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group)
    place = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.full((len(counts), int(counts.max())), n)
    members[group[order], place] = rows[order]
    lows = np.zeros((*members.shape, low.shape[1]))
    highs = np.zeros_like(lows)
    lows[group[order], place], highs[group[order], place] = low[order], high[order]
    first = order[np.searchsorted(group[order], np.arange(len(counts)))]
    return members, lows, highs, np.where(fits[first], 0.0, np.inf)


@dataclass(frozen=True)
class _GroupCharge:
    """The first layer's rounding charge of a row lam on a box (`_grid_rounding`), with this
    module's code: the rows narrowed there that share their moving generators are charged the
    least over the box's points of their moves' sum weighted by lam; the others |lam| . err."""

    err: np.ndarray
    rest: np.ndarray  # the rows in no group, charged |lam| . err
    buckets: tuple  # (members, lowest moves, highest moves, +inf off budget) per k

    def charge(self, lam: np.ndarray) -> np.ndarray:
        padded = np.concatenate([lam, np.zeros((len(lam), 1))], axis=1)
        total = np.abs(lam[:, self.rest]) @ self.err[self.rest]
        for members, lows, highs, off in self.buckets:
            at = padded[:, members]  # (rows, groups, M)
            weighted = np.einsum("rgm,gmp->rgp", np.maximum(at, 0.0), lows) + np.einsum(
                "rgm,gmp->rgp", np.minimum(at, 0.0), highs
            )
            total -= (weighted + off[None]).min(axis=2).sum(axis=1)
        return np.minimum(total, np.abs(lam) @ self.err)


def _check_z3(lo, hi, parent, problem: Problem, out: Verdict, kind: str = "z3") -> str | None:
    """A z3 or MILP leaf: enumerated when small, else z3 (again) with the bounds computed here."""
    region = problem.region
    count = count_points(lo, hi, region.cost, region.budget, problem.max_points + 1)
    if count <= problem.max_points or problem.spec is None or problem.chain is None:
        return _by_enumeration(lo, hi, count, problem, out, kind)
    from verifier.engine.smt import smt_decide

    b = _node_bounds(problem.spec, lo, hi, parent)
    pre = [b.pre[i] for i, layer in enumerate(problem.spec.layers) if isinstance(layer, Relu)]
    res = smt_decide(
        problem.chain, region, problem.label, problem.smt_timeout, lo=lo, hi=hi, pre_bounds=pre
    )
    if res.status == "sat":
        return f"z3 finds a point leaving the label: {[int(v) for v in res.coeffs]}"
    _tally(out.leaves if res.status == "unsat" else out.unchecked, kind)
    return None


# --- bounds of one box, computed here -----------------------------------------------------------


@dataclass(frozen=True)
class _BoxBounds:
    lower: np.ndarray  # margin lower bounds (+inf: no point in the box)
    pre: list  # per spec layer: (lower, upper) of its input for Relu / MaxPool layers
    cut: dict | None = None  # per ReLU layer, its upper lines on s: (const, slope, mask)


def _min_linear(a: np.ndarray, c: np.ndarray, lo, hi, cost, budget: float, where: bool = False):
    """Per row, the minimum of `a . s + c` over the box [lo, hi] within the L1-cost budget
    (s real): from the box point nearest 0, move the generators by best gain per cost first.
    With `where`, also the minimisers (rows, G)."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    p = np.clip(0.0, lo, hi)
    left = budget + EPS - float(np.abs(p) @ cost)
    if left < 0:
        inf = np.full(len(a), np.inf)
        return (inf, np.tile(p, (len(a), 1))) if where else inf
    room = np.where(a > 0, p - lo, hi - p)  # units movable in the improving direction
    safe = np.where(cost > 0, cost, 1.0)
    rate = np.where(cost > 0, np.abs(a) / safe, np.inf)
    order = np.argsort(-rate, axis=1, kind="stable")
    spend = np.take_along_axis(room * cost, order, axis=1)
    gain = np.take_along_axis(np.abs(a) * room, order, axis=1)
    spent_before = np.cumsum(spend, axis=1) - spend
    with np.errstate(divide="ignore", invalid="ignore"):
        part = np.where(spend > 0, np.clip((left - spent_before) / spend, 0.0, 1.0), 1.0)
    value = a @ p + c - (part * gain).sum(axis=1)
    if not where:
        return value
    moved = np.zeros_like(a)
    np.put_along_axis(moved, order, part, axis=1)
    return value, p + np.where(a > 0, -1.0, 1.0) * moved * room


def _relu_lines(l: np.ndarray, u: np.ndarray, slopes=None):
    """Lower slope (`slopes` on the unstable neurons if given, else 0 or 1, whichever is
    closer), upper slope and upper intercept, and lower intercept of ReLU on [l, u]. An input
    known exactly (l == u, one lattice point left) gives the constant max(u, 0): both slopes
    0, both intercepts it."""
    const = l == u
    on, off = (l >= 0) & ~const, (u <= 0) | const
    mixed = ~on & ~off
    width = np.where(mixed, u - l, 1.0)
    up = np.where(mixed, u / width, on.astype(np.float64))
    base = np.where(const, np.maximum(u, 0.0), 0.0)
    icpt = np.where(mixed, -up * l, base)
    low = (u > -l).astype(np.float64) if slopes is None else slopes
    return np.where(mixed, low, on.astype(np.float64)), up, icpt, base


def _on_lattice(spec, i: int, l: np.ndarray, u: np.ndarray):
    """[l, u] cut to the points of layer `i`'s output lattice they hold (`spec.lattice`: the
    quantized runtime's value is such a point); unchanged where none is held."""
    grid = getattr(spec, "lattice", None)
    if grid is None or grid[i] is None:
        return l, u
    step, origin = grid[i]
    with np.errstate(invalid="ignore"):
        first = np.ceil((l - origin) / step - 1e-6)
        last = np.floor((u - origin) / step + 1e-6)
    some = first <= last
    return np.where(some, origin + first * step, l), np.where(some, origin + last * step, u)


def _cut_lines(spec, lo, hi, l: np.ndarray, u: np.ndarray, weight, bias):
    """Upper lines `const + slope . s` of a ReLU's unstable outputs over the box, or None,
    given an upper bound `weight . s + bias` of its input (the first ReLU's: the first layer
    widened by its rounding; a deeper one's: its back-substituted upper rows; ReLU is monotone).
    With every generator's sign fixed, `t = |s - p|` (p the box point nearest 0) spends
    at most `left` (the budget left at p), of it at most `rise` on the generators raising a
    neuron and `fall` on those lowering it. With `c` the input's bound at p and `a = max(c,
    0)`, the line `a + sum_g max(w_g - (a - c) cost_g / rise, -a cost_g / fall) t_g` is >= that
    bound and >= 0 at every such point."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    mask = (l < 0) & (u > 0)
    if not mask.any() or np.any((lo < 0) & (hi > 0)):
        return None
    p = np.where(lo > 0, lo, np.where(hi < 0, hi, 0.0))
    left = spec.region.budget + EPS - float(np.abs(p) @ spec.region.cost)
    if left <= EPS:
        return None
    cost = spec.region.cost
    w = weight[mask]
    c = w @ p + bias[mask]
    a = np.maximum(c, 0.0)
    toward = np.where(hi > 0, w, -w)  # the output's change per unit of t
    spend = cost * (hi - lo)
    rise = np.minimum(left, np.where(toward > 0, spend, 0.0).sum(axis=1))
    fall = np.minimum(left, np.where(toward < 0, spend, 0.0).sum(axis=1))
    d = np.outer(np.divide(a - c, rise, out=np.zeros_like(c), where=rise > 0), cost)
    e = np.outer(np.divide(a, fall, out=np.zeros_like(c), where=fall > 0), cost)
    per_t = np.maximum(toward - d, -e)
    slope = np.where(hi > 0, per_t, -per_t)  # d line / d s
    const = np.zeros(len(mask))
    full = np.zeros((len(mask), len(lo)))
    const[mask], full[mask] = a - slope @ p, slope
    return const, full, mask


def _back(
    spec, pre: list, top: int, lam: np.ndarray, c: np.ndarray, slopes=None, tape=None, cut=None
):
    """`lam . (output of layer top-1) + c` bounded below by a linear function of s.
    `slopes` (Relu layer -> (rows, n) lower slopes) replaces the default ones; `tape`
    collects (layer, lam on its output) for `_slope_gradients`; `cut` (ReLU layer ->
    `_cut_lines`) gives a ReLU's upper lines where it has them."""
    extra = 0.0
    for k in range(top - 1, -1, -1):
        layer = spec.layers[k]
        if tape is not None:
            tape.append((k, lam))
        if isinstance(layer, Affine):
            c = c + lam @ layer.bias
            if k == 0 and isinstance(spec.first_charge, _GroupCharge):  # this module's own
                c = c - spec.first_charge.charge(lam)
            elif spec.err[k] is not None:
                c = c - np.abs(lam) @ spec.err[k]
            if k == 0 and spec.first_input is not None:
                w_x, step, _ = spec.first_input
                c = c - np.abs(lam @ w_x) @ step
            lam = lam @ layer.weight
            step = spec.input_error(k)
            if step is not None:
                c = c - np.abs(lam) @ step
        elif isinstance(layer, Relu):
            low, up, icpt, base = _relu_lines(*pre[k], None if slopes is None else slopes.get(k))
            pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
            if cut is not None and k in cut:
                const, slope, mask = cut[k]
                on_cut = np.where(mask, neg, 0.0)
                c, extra, neg = c + on_cut @ const, extra + on_cut @ slope, np.where(mask, 0.0, neg)
            c = c + neg @ icpt + pos @ base
            lam = pos * low + neg * up
        else:
            lam, c = _back_pool(layer.windows, *pre[k], lam, c)
    return lam + extra, c


def _back_pool(windows: np.ndarray, l: np.ndarray, u: np.ndarray, lam, c):
    """Max pool: below by the input with the largest lower bound; above by it when it
    dominates the window, else by the window's largest upper bound."""
    lp, up = np.append(l, -np.inf), np.append(u, -np.inf)
    best = windows[np.arange(len(windows)), np.argmax(lp[windows], axis=1)]
    rest = np.where(windows == best[:, None], -1, windows)
    exact = lp[best] >= up[rest].max(axis=1)
    pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
    c = c + (neg * ~exact) @ up[windows].max(axis=1)
    out = np.zeros((lam.shape[0], len(l)))
    np.add.at(out.T, best, (pos + neg * exact).T)
    return out, c


def _interval(spec, k: int, lo: np.ndarray, hi: np.ndarray):
    """Interval image under the spec's Affine layer `k`, with its rounding."""
    layer = spec.layers[k]
    step = spec.input_error(k)
    if step is not None:
        lo, hi = lo - step, hi + step
    mid, rad = (lo + hi) / 2.0, (hi - lo) / 2.0
    centre = layer.weight @ mid + layer.bias
    radius = np.abs(layer.weight) @ rad
    if spec.err[k] is not None:
        radius = radius + spec.err[k]
    return centre - radius, centre + radius


def _first_widen(spec):
    """The rounding the first layer's outputs are widened by."""
    e = spec.err[0]
    if spec.first_input is not None:
        extra = spec.first_input[2]
        e = extra if e is None else e + extra
    return 0.0 if e is None else e


def _node_bounds(spec, lo, hi, parent: _BoxBounds | None) -> _BoxBounds:
    """Margin lower bounds and pre-activation bounds over the box [lo, hi], each intersected
    with the enclosing box's (`parent`)."""
    layers = spec.layers
    n = len(layers)
    pre: list = [None] * n
    p = np.clip(0, lo, hi)
    if float(np.abs(p) @ spec.region.cost) > spec.region.budget + EPS:
        return _BoxBounds(np.full(len(spec.others), np.inf), pre)
    cur_lo = cur_hi = None
    cut: dict = {}  # ReLU layer -> its upper lines on s
    uppers: dict = {}  # ReLU layer -> (rows, upper rows on s) of its input
    for i, layer in enumerate(layers):
        if isinstance(layer, Affine):
            if i == 0:
                w, b = layer.weight, layer.bias
                e = _first_widen(spec)
                cur_lo = _min_linear(w, b, lo, hi, spec.region.cost, spec.region.budget) - e
                cur_hi = -_min_linear(-w, -b, lo, hi, spec.region.cost, spec.region.budget) + e
            else:
                cur_lo, cur_hi = _interval(spec, i, cur_lo, cur_hi)
            if i + 1 == n:
                break
            known = parent.pre[i + 1] if parent is not None else None
            if known is not None:
                cur_lo, cur_hi = np.maximum(cur_lo, known[0]), np.minimum(cur_hi, known[1])
            cur_lo, cur_hi = _on_lattice(spec, i, cur_lo, cur_hi)
            if i == 0:
                continue
            rows = np.arange(len(cur_lo))
            if isinstance(layers[i + 1], Relu):
                rows = np.flatnonzero((cur_lo < 0) & (cur_hi > 0))
            if len(rows):
                m = len(rows)
                lam = np.zeros((2 * m, len(cur_lo)))
                lam[np.arange(m), rows] = 1.0
                lam[m + np.arange(m), rows] = -1.0
                a, c = _back(spec, pre, i + 1, lam, np.zeros(2 * m), cut=cut or None)
                v = _min_linear(a, c, lo, hi, spec.region.cost, spec.region.budget)
                if isinstance(layers[i + 1], Relu):
                    uppers[i + 1] = (rows, -a[m:], -c[m:])
                cur_lo[rows] = np.maximum(cur_lo[rows], v[:m])
                cur_hi[rows] = np.minimum(cur_hi[rows], -v[m:])
                cur_lo, cur_hi = _on_lattice(spec, i, cur_lo, cur_hi)
        elif isinstance(layer, Relu):
            pre[i] = (cur_lo, cur_hi)
            lines = _relu_cut(spec, i, lo, hi, cur_lo, cur_hi, uppers.get(i))
            if lines is not None:
                cut[i] = lines
            cur_lo, cur_hi = np.maximum(cur_lo, 0.0), np.maximum(cur_hi, 0.0)
        else:
            pre[i] = (cur_lo, cur_hi)
            lp, hp = np.append(cur_lo, -np.inf), np.append(cur_hi, -np.inf)
            cur_lo, cur_hi = lp[layer.windows].max(axis=1), hp[layer.windows].max(axis=1)
    cut = cut or None
    lower = np.maximum(cur_lo, _margin_bounds(spec, lo, hi, pre, cut))
    if parent is not None:
        lower = np.maximum(lower, parent.lower)
    if getattr(spec, "cap", None) is not None:  # a bound over the whole region (output clamp)
        lower = np.minimum(lower, spec.cap)
    return _BoxBounds(lower, pre, cut)


def _relu_cut(spec, i: int, lo, hi, l: np.ndarray, u: np.ndarray, upper_rows):
    """`_cut_lines` of the ReLU at layer `i`: over the first layer's output (widened by its
    rounding) for the first ReLU, over `upper_rows` ((rows, weights, constants): its input's
    upper rows, every unstable neuron among them) for a deeper one where the spec takes deeper
    cuts; None where neither."""
    if i == 1:
        first = spec.layers[0]
        widen = _first_widen(spec) + np.zeros(len(l))
        return _cut_lines(spec, lo, hi, l, u, first.weight, first.bias + widen)
    if upper_rows is None or not getattr(spec, "deeper_cuts", True):
        return None
    rows, w, b = upper_rows
    have = np.zeros(len(l), dtype=bool)
    have[rows] = True
    if np.any((l < 0) & (u > 0) & ~have):
        return None
    weight, bias = np.zeros((len(l), len(lo))), np.zeros(len(l))
    weight[rows], bias[rows] = w, b
    return _cut_lines(spec, lo, hi, l, u, weight, bias)


def _margin_bounds(spec, lo, hi, pre: list, cut) -> np.ndarray:
    """Linear lower bounds of the margins over the box, default ReLU lower slopes."""
    m = len(spec.others)
    a, c = _back(spec, pre, len(spec.layers), np.eye(m), np.zeros(m), cut=cut)
    return _min_linear(a, c, lo, hi, spec.region.cost, spec.region.budget)


def _first_only(cut: dict | None) -> dict | None:
    """The first ReLU's cut lines of `cut` alone (None when it has none)."""
    return {1: cut[1]} if cut is not None and 1 in cut else None


def _optimised_margins(spec, lo, hi, b: _BoxBounds, bar: np.ndarray) -> tuple:
    """Margin lower bounds with per-margin ReLU lower slopes raised by projected gradient
    ascent (the minimiser held fixed), the best seen per margin (until all exceed `bar`), and
    per margin the linear lower bound on s that gave it (rows a, constants c)."""
    m = len(spec.others)
    pre = b.pre
    slopes = {
        k: np.tile(_relu_lines(*pre[k])[0], (m, 1))
        for k, layer in enumerate(spec.layers)
        if isinstance(layer, Relu)
    }
    best = np.full(m, -np.inf)
    best_a, best_c = np.zeros((m, len(lo))), np.full(m, -np.inf)
    for _ in range(SLOPE_STEPS):
        tape: list = []
        a, c = _back(spec, pre, len(spec.layers), np.eye(m), np.zeros(m), slopes, tape, b.cut)
        value, s = _min_linear(a, c, lo, hi, spec.region.cost, spec.region.budget, where=True)
        up = value > best
        best[up], best_a[up], best_c[up] = value[up], a[up], c[up]
        if np.all(best > bar):
            break
        for k, grad in _slope_gradients(spec, pre, tape, s, slopes, b.cut).items():
            scale = np.abs(grad).max(axis=1, keepdims=True) + 1e-12
            slopes[k] = np.clip(slopes[k] + SLOPE_RATE * grad / scale, 0.0, 1.0)
    return best, best_a, best_c


def _slope_gradients(spec, pre: list, tape: list, s: np.ndarray, slopes: dict, cut) -> dict:
    """d(bound at the minimisers `s`) / d(lower slopes), back through the `tape` of `_back`."""
    g = s  # d bound / d (coefficients on s)
    out = {}
    for k, lam in reversed(tape):  # from layer 0 up: g is d bound / d (lam below layer k)
        layer = spec.layers[k]
        if isinstance(layer, Affine):
            below = lam @ layer.weight
            step = spec.input_error(k)
            if step is not None:
                g = g - np.sign(below) * step
            g = g @ layer.weight.T + layer.bias
            if k == 0 and spec.first_input is not None:
                w_x, step0, _ = spec.first_input
                g = g - (np.sign(lam @ w_x) * step0) @ w_x.T
            if spec.err[k] is not None:
                g = g - np.sign(lam) * spec.err[k]
        elif isinstance(layer, Relu):
            low, up, icpt, base = _relu_lines(*pre[k], slopes[k])
            l, u = pre[k]
            pos = lam >= 0
            out[k] = np.where(pos & (l < 0) & (u > 0), g * lam, 0.0)
            upper = g * up + icpt
            if cut is not None and k in cut:  # the cut's line at the minimisers
                const, slope, mask = cut[k]
                upper = np.where(mask, const + s @ slope.T, upper)
            g = np.where(pos, g * low + base, upper)
        else:
            l, u = pre[k]
            lp, up_ = np.append(l, -np.inf), np.append(u, -np.inf)
            w = layer.windows
            best = w[np.arange(len(w)), np.argmax(lp[w], axis=1)]
            exact = lp[best] >= up_[np.where(w == best[:, None], -1, w)].max(axis=1)
            g = np.where((lam >= 0) | exact, g[:, best], up_[w].max(axis=1))
    return out


def _margins_at(spec, s: np.ndarray) -> np.ndarray:
    """The spec's margins at the coefficients `s`, in exact arithmetic (no rounding)."""
    v = np.asarray(s, np.float64)
    for layer in spec.layers:
        if isinstance(layer, Affine):
            v = layer.weight @ v + layer.bias
        elif isinstance(layer, Relu):
            v = np.maximum(v, 0.0)
        else:
            v = np.append(v, -np.inf)[layer.windows].max(axis=1)
    return v
