"""Branch and bound over ReLU phases mixed with generator splits.

A node is a sub-box of generators with its bounds (`bab.Leaf`); a ReLU split fixes one unstable
neuron's phase: the "active" child holds the points whose pre-activation is >= 0, the
"inactive" child those where it is <= 0 (together: every point of the node). The phase lives in
the child's pre-activation bounds (lower clamped to 0, or upper to 0): `linear_bounds` keeps
the bounds it is given as a parent, so the neuron stays exact (identity or 0) in the child and
every descendant, and every bound after it is recomputed from the tighter relaxation. The
bounds stay sound for the child's points because those points satisfy the split. A child whose
bounds become contradictory (a lower bound above an upper one) holds no point.

Which split: the unstable neuron whose relaxation costs the worst margin most (BaBSR-style
score |lambda_j| * (-l u / (u - l)), lambda from back-substituting that margin), against the
generator `bab.split` picks; with `policy="mixed"` both are bounded and the one whose worse
child is better is kept (strong branching on two candidates).
Leaves with few unstable neurons go to the mixed-integer program, which enforces the split
constraints through the clamped bounds (route "milp"); nodes closed by bounds after a ReLU split
count as route "relu-split".
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from verifier.engine.bab import BabOutcome, Leaf, run_minimisers, settle_node, split
from verifier.engine.bounds import Bounds, SpecChain, _backsub, optimise_alpha
from verifier.engine.enumeration import confirm
from verifier.engine.network import Relu
from verifier.engine.regions import Region
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN

POLICIES = ("relu", "generator", "mixed")


def relu_scores(spec: SpecChain, b: Bounds, threshold) -> list[tuple[int, np.ndarray]]:
    """Per Relu layer k, the split score of each neuron (0 for stable ones), for the worst
    margin's linear bound: |lambda_j| times the upper relaxation's intercept -l u / (u - l)."""
    row = int(np.argmin(b.lower - threshold))
    top = len(spec.layers)
    lam0 = np.zeros((1, spec.layers[-1].weight.shape[0]))
    lam0[0, row] = 1.0
    tape: list = []
    _backsub(spec, b.pre, top, lam0, np.zeros(1), tape=tape)
    out = []
    for k, lam in tape:
        if isinstance(spec.layers[k], Relu):
            l, u = b.pre[k]
            unstable = (l < 0) & (u > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = np.where(unstable, -l * u / np.where(unstable, u - l, 1.0), 0.0)
            out.append((k, np.abs(lam[0]) * gap))
    return out


def fix_phase(b: Bounds, k: int, j: int, active: bool) -> Bounds:
    """The node's bounds with neuron j of Relu layer k fixed active (lower 0) or inactive
    (upper 0): the parent bounds a ReLU-split child is bounded from."""
    pre = list(b.pre)
    l, u = pre[k][0].copy(), pre[k][1].copy()
    if active:
        l[j] = max(l[j], 0.0)
    else:
        u[j] = min(u[j], 0.0)
    pre[k] = (l, u)
    return replace(b, pre=pre)


def contradictory(b: Bounds) -> bool:
    """Some bound interval is empty: the node holds no point (after its splits)."""
    return any(p is not None and bool(np.any(p[0] > p[1])) for p in b.pre)


def split_signs(spec: SpecChain, b: Bounds) -> dict:
    """Per Relu layer, +1 where the input's lower bound is exactly 0 (fixed active), -1 where
    its upper bound is (fixed inactive), else 0: the split constraints of the node."""
    out = {}
    for k, layer in enumerate(spec.layers):
        if isinstance(layer, Relu) and b.pre[k] is not None:
            l, u = b.pre[k]
            out[k] = np.where(l == 0.0, 1.0, np.where(u == 0.0, -1.0, 0.0))
    return out


def with_beta(spec: SpecChain, b: Bounds, lo, hi, threshold, steps: int) -> Bounds:
    """The margins' bounds tightened by optimised multipliers of the node's split constraints
    (and slopes), when they are not yet above `threshold`."""
    if steps <= 0 or b.empty or contradictory(b) or np.all(b.lower > threshold):
        return b
    signs = split_signs(spec, b)
    if not any(np.any(v) for v in signs.values()):
        return b
    lam, _, vals, argmin, _ = optimise_alpha(
        spec, b.pre, lo, hi, steps, threshold, split_signs=signs, cut=b.cut
    )
    better = vals > b.lower
    lower = np.maximum(b.lower, vals)
    return replace(
        b,
        lower=lower if spec.cap is None else np.minimum(lower, spec.cap),
        coeffs=np.where(better[:, None], lam, b.coeffs),
        argmin=np.where(better[:, None], argmin, b.argmin),
        method="beta-crown",
    )


def unstable_count(b: Bounds) -> int:
    """Pre-activations straddling 0 over all Relu layers."""
    return sum(int(np.sum((p[0] < 0) & (p[1] > 0))) for p in b.pre if p is not None)


def relu_branch_and_bound(
    runtime,
    region: Region,
    label: int,
    spec: SpecChain,
    roots: list[Leaf],
    bound: Callable[[np.ndarray, np.ndarray, Bounds], Bounds],
    threshold: np.ndarray,
    *,
    deadline: float,
    max_nodes: int,
    enum_limit: int,
    policy: str = "mixed",
    exact: Callable | None = None,
    exact_max_unstable: int = 64,
    beta_steps: int = 20,
) -> BabOutcome:
    """Refine `roots` by ReLU and generator splits until all close, a counterexample is
    confirmed on the runtime, or the budget runs out. `exact(leaf, seconds)` (a
    `milp.MilpResult`-like answer) takes leaves with at most `exact_max_unstable` unstable
    neurons. Routes in `closed`: "bab" (bounds, no ReLU split above), "relu-split", "empty",
    "enumeration", "milp" (a sat answer is confirmed on the runtime, else the leaf stays open)."""
    assert policy in POLICIES, policy
    out = BabOutcome(UNKNOWN, "budget")
    out.closed.update({"relu-split": 0, "milp": 0})
    tie = itertools.count()
    heap: list = []
    stuck: list[Leaf] = []

    def push(leaf: Leaf, splits: int) -> None:
        b = leaf.bounds
        if b.empty or contradictory(b):
            out.closed["empty"] += 1
        elif np.all(b.lower > threshold):
            out.closed["relu-split" if splits else "bab"] += 1
        else:
            key = float(np.min(b.lower - threshold))
            heapq.heappush(heap, (key, next(tie), leaf, splits))

    for root in roots:
        push(root, 0)
    while heap:
        if out.nodes >= max_nodes or time.perf_counter() > deadline:
            break
        _, _, leaf, splits = heapq.heappop(heap)
        out.nodes += 1
        # a phase-split node's bounds hold only at the points in its phases: no sieve
        res = settle_node(
            runtime, region, label, leaf, threshold, enum_limit, deadline, out, sieve=False
        )
        if out.status == REFUTED:
            return out
        if res is not None:
            if res.clean:
                out.closed["enumeration"] += 1
                continue
            stuck.append(leaf)
            if not res.complete:
                break
        if exact is not None and unstable_count(leaf.bounds) <= exact_max_unstable:
            res = exact(leaf, deadline - time.perf_counter())
            if res.status == "unsat":
                out.closed["milp"] += 1
                continue
            if res.status == "sat" and res.coeffs is not None:
                adv = confirm(runtime, region, res.coeffs, label)
                if adv is not None:
                    out.status, out.route, out.coeffs, out.adv_label = (
                        REFUTED,
                        "milp",
                        res.coeffs,
                        adv,
                    )
                    return out
            stuck.append(leaf)
            continue
        kids = _children(spec, leaf, bound, threshold, policy, beta_steps, deadline)
        for child, relu in kids:
            push(child, splits + int(relu))
    if run_minimisers(runtime, region, label, out):
        return out
    out.open_leaves = stuck + [e[2] for e in sorted(heap, key=lambda e: (e[0], e[1]))]
    if not out.open_leaves:
        out.status = CERTIFIED
        out.route = max(out.closed, key=lambda k: out.closed[k])
        if out.route == "empty":
            out.route = "relu-split"
    return out


def _children(
    spec: SpecChain, leaf: Leaf, bound, threshold, policy: str, beta_steps: int, deadline: float
):
    """The children of the chosen split, each with whether it was a ReLU split. Past the
    deadline no second candidate is bounded and multipliers are not optimised."""

    def tight(children: list[Leaf]) -> list[Leaf]:
        steps = beta_steps if time.perf_counter() < deadline else 0
        return [
            Leaf(c.lo, c.hi, with_beta(spec, c.bounds, c.lo, c.hi, threshold, steps))
            for c in children
        ]

    relu = None if policy == "generator" else _relu_children(spec, leaf, bound, threshold)
    gen = None
    late = relu is not None and time.perf_counter() > deadline
    if (policy != "relu" or relu is None) and not late and np.any(leaf.hi > leaf.lo):
        gen = [Leaf(lo, hi, bound(lo, hi, leaf.bounds)) for lo, hi in split(leaf, threshold)]
    if policy != "generator":
        relu = None if relu is None else tight(relu)
        gen = None if gen is None else tight(gen)
    if relu is None:
        return [(c, False) for c in gen or []]
    if gen is None:
        return [(c, True) for c in relu]
    if _worse_child(relu, threshold) > _worse_child(gen, threshold):
        return [(c, True) for c in relu]
    return [(c, False) for c in gen]


def _worse_child(children: list[Leaf], threshold) -> float:
    vals = [
        np.inf
        if (c.bounds.empty or contradictory(c.bounds))
        else np.min(c.bounds.lower - threshold)
        for c in children
    ]
    return float(min(vals))


def _relu_children(spec: SpecChain, leaf: Leaf, bound, threshold) -> list[Leaf] | None:
    """The two phases of the best-scored unstable neuron, bounded; None when none is left."""
    best = None
    for k, score in relu_scores(spec, leaf.bounds, threshold):
        j = int(np.argmax(score))
        if score[j] > 0 and (best is None or score[j] > best[0]):
            best = (float(score[j]), k, j)
    if best is None:
        return None
    _, k, j = best
    return [
        Leaf(leaf.lo, leaf.hi, bound(leaf.lo, leaf.hi, fix_phase(leaf.bounds, k, j, active)))
        for active in (True, False)
    ]
