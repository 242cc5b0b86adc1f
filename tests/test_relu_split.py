"""Branch and bound over ReLU phases against full enumeration on tiny random ReLU networks."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import check_decision, random_case, truth

from verifier.engine.bab import Leaf
from verifier.engine.bounds import linear_bounds, spec_chain
from verifier.engine.decide import decide
from verifier.engine.milp import milp_decide
from verifier.engine.network import forward_lowered
from verifier.engine.relu_split import contradictory, fix_phase, relu_branch_and_bound, with_beta
from verifier.engine.result import CERTIFIED, REFUTED


@pytest.mark.parametrize("seed", range(12))
def test_phase_fixed_bounds_hold_on_the_points_of_that_phase(seed):
    """A child's bounds hold for every point whose pre-activation has the child's sign."""
    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi)
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts)
    pre = forward_lowered(chain[:1], xs)  # the first Relu's input (spec layer 1 is that Relu)
    logits = forward_lowered(chain, xs)
    margins = logits[:, [label]] - logits[:, spec.others]
    l, u = root.pre[1]
    for j in np.flatnonzero((l < 0) & (u > 0))[:3]:
        for active in (True, False):
            child = linear_bounds(spec, region.lo, region.hi, parent=fix_phase(root, 1, j, active))
            mask = pre[:, j] >= 0 if active else pre[:, j] <= 0
            if not mask.any():
                continue
            assert not contradictory(child)
            assert np.all(child.lower <= margins[mask].min(axis=0) + 1e-9)
            tight = with_beta(spec, child, region.lo, region.hi, np.full(len(spec.others), 9e9), 15)
            assert tight.method == "beta-crown"
            assert np.all(tight.lower <= margins[mask].min(axis=0) + 1e-9)
            cl, cu = child.pre[1]
            assert (cl[j] >= 0) if active else (cu[j] <= 0)


def _hard_seeds(count: int) -> list[int]:
    """Seeds whose root linear bounds do not certify the region (robust or not)."""
    out = []
    for seed in range(300):
        chain, _, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        if not np.all(linear_bounds(spec, region.lo, region.hi).lower > 0):
            out.append(seed)
        if len(out) == count:
            break
    return out


HARD = _hard_seeds(16)


@pytest.mark.parametrize("policy", ["relu", "mixed"])
@pytest.mark.parametrize("seed", HARD)
def test_relu_branch_and_bound_agrees_with_enumeration(seed, policy):
    chain, runtime, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    thr = np.zeros(len(spec.others))

    def bound(lo, hi, parent):
        return linear_bounds(spec, lo, hi, parent=parent)

    root = Leaf(region.lo, region.hi, linear_bounds(spec, region.lo, region.hi))
    out = relu_branch_and_bound(
        runtime,
        region,
        label,
        spec,
        [root],
        bound,
        thr,
        deadline=np.inf,
        max_nodes=20000,
        enum_limit=0,
        policy=policy,
    )
    _, bad = truth(runtime, region, label)
    assert out.status in (CERTIFIED, REFUTED)
    assert (out.status == REFUTED) == bool(bad.any())
    if out.status == CERTIFIED and policy == "relu":
        assert out.closed["relu-split"] + out.closed["empty"] > 0


@pytest.mark.parametrize("seed", HARD)
def test_relu_split_leaves_to_milp_agree_with_enumeration(seed):
    """Split leaves closed by the program (its split constraints from the clamped bounds)."""
    chain, runtime, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    thr = np.zeros(len(spec.others))

    def bound(lo, hi, parent):
        return linear_bounds(spec, lo, hi, parent=parent)

    def exact(leaf, left):
        return milp_decide(spec, leaf.lo, leaf.hi, leaf.bounds, 20.0)

    root = Leaf(region.lo, region.hi, linear_bounds(spec, region.lo, region.hi))
    out = relu_branch_and_bound(
        runtime,
        region,
        label,
        spec,
        [root],
        bound,
        thr,
        deadline=np.inf,
        max_nodes=20000,
        enum_limit=0,
        policy="relu",
        exact=exact,
        exact_max_unstable=3,
    )
    _, bad = truth(runtime, region, label)
    assert out.status in (CERTIFIED, REFUTED)
    assert (out.status == REFUTED) == bool(bad.any())


@pytest.mark.parametrize("seed", HARD[:8])
def test_decide_with_relu_splits_agrees_with_enumeration(seed):
    chain, runtime, region, label = random_case(seed)
    d = decide(runtime, chain, region, label, enum_limit=0, timeout=20, splits="mixed")
    check_decision(d, runtime, region, label)
