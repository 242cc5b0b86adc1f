"""The ReLUs' upper lines over the knapsack: valid at every point, exact where they should be,
used by the bounds (the first ReLU's over its exact input, deeper ones' over their inputs' upper
rows) and re-derived by the proof checker."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import random_case

from verifier.engine.bounds import (
    linear_bounds,
    optimise_alpha,
    optimised_slopes,
    refined,
    spec_chain,
)
from verifier.engine.knapsack_cut import knapsack_cut
from verifier.engine.network import Affine, Relu, forward_lowered
from verifier.engine.regions import Region, lattice_region


def sign_fixed_boxes(region: Region, rng, count: int):
    """Random sub-boxes of the region on which every generator keeps one sign."""
    for _ in range(count):
        side = rng.integers(0, 2, region.num_generators).astype(bool)
        lo = np.where(side, np.maximum(region.lo, 0), region.lo)
        hi = np.where(side, region.hi, np.minimum(region.hi, 0))
        a, b = rng.integers(lo, hi + 1), rng.integers(lo, hi + 1)
        yield (
            np.where(rng.random(len(lo)) < 0.5, lo, np.minimum(a, b)),
            np.where(rng.random(len(lo)) < 0.5, hi, np.maximum(a, b)),
        )


@pytest.mark.parametrize("seed", range(20))
def test_cut_lines_hold_at_every_point_and_are_exact_at_the_box_point_nearest_zero(seed):
    rng = np.random.default_rng(seed)
    g, n = int(rng.integers(3, 7)), int(rng.integers(4, 12))
    x = rng.uniform(0, 1, g)
    region = lattice_region(x, np.arange(g), 0.25, float(rng.uniform(0.5, 1.5)))
    w, b = rng.normal(size=(n, g)), rng.normal(size=n) * 0.3
    err = rng.uniform(0, 0.05, n) if seed % 2 else None
    used = 0
    for lo, hi in sign_fixed_boxes(region, rng, 6):
        pts = np.concatenate(list(region.enumerate(lo=lo, hi=hi)) or [np.zeros((0, g))])
        if not len(pts):
            continue
        z = pts @ w.T + b + (0.0 if err is None else err)  # the worst rounding
        cut = knapsack_cut(w, b, err, region, lo, hi, z.min(axis=0) - 1e-9, z.max(axis=0))
        if cut is None:
            continue
        used += 1
        line = cut.lines(pts)
        assert np.all(line[:, cut.mask] >= np.maximum(z, 0.0)[:, cut.mask] - 1e-9)
        near = np.clip(0, lo, hi)
        at = near @ w.T + b + (0.0 if err is None else err)
        assert np.allclose(cut.lines(near[None])[0, cut.mask], np.maximum(at, 0)[cut.mask])
        assert np.array_equal(cut.rows, np.flatnonzero(cut.mask))
        assert cut.slope.shape == (len(cut.rows), g) and not line[:, ~cut.mask].any()
    assert used, "no box exercised the cut"


def test_no_cut_where_a_generator_can_move_both_ways():
    region = lattice_region(np.full(3, 0.5), np.arange(3), 0.25, 1.0)
    w, b = np.ones((2, 3)), np.zeros(2)
    assert knapsack_cut(w, b, None, region, region.lo, region.hi, -np.ones(2), np.ones(2)) is None
    lo = np.maximum(region.lo, 0)
    assert knapsack_cut(w, b, None, region, lo, region.hi, -np.ones(2), np.ones(2)) is not None


def test_cut_is_exact_on_neurons_one_generator_reaches():
    """A neuron only generator g moves is charged only what g can do (not a share of the
    whole budget): its line passes through both of its values, like the triangle's."""
    rng = np.random.default_rng(3)
    region = Region(
        np.zeros(5), np.eye(5), np.zeros(5, np.int64), np.ones(5, np.int64), np.ones(5), 3.0,
        "features", 1.0, tuple(np.array([j]) for j in range(5)),
    )  # fmt: skip
    w = np.zeros((10, 5))
    w[np.arange(10), np.arange(10) % 5] = np.where(np.arange(10) < 5, 2.0, -2.0)
    b = np.where(np.arange(10) < 5, -1.0, 1.0) * rng.uniform(0.2, 1.5, 10)
    pts = np.concatenate(list(region.enumerate()))
    z = pts @ w.T + b
    cut = knapsack_cut(w, b, None, region, region.lo, region.hi, z.min(axis=0), z.max(axis=0))
    assert cut.mask.all()
    assert np.allclose(cut.lines(pts), np.maximum(z, 0.0))


def ring_case():
    """Four features, any one of them; neuron j sees feature j up and feature j+1 down, so
    the margin 1 - sum_j relu(-0.5 + s_j - s_j+1) is 0.5 at worst. The triangle lines charge
    each neuron 0.25 at every point and leave the bound at 0; the cut's lines are exact."""
    region = Region(
        np.zeros(4), np.eye(4), np.zeros(4, np.int64), np.ones(4, np.int64), np.ones(4), 1.0,
        "features", 1.0, tuple(np.array([j]) for j in range(4)),
    )  # fmt: skip
    w = np.eye(4) - np.roll(np.eye(4), 1, axis=1)
    chain = [
        Affine(w, np.full(4, -0.5)),
        Relu(),
        Affine(np.array([[-1.0] * 4, [0.0] * 4]), np.array([1.0, 0.0])),
    ]
    return chain, region


def test_cut_makes_the_ring_bound_exact():
    chain, region = ring_case()
    pts = np.concatenate(list(region.enumerate()))
    logits = forward_lowered(chain, region.points(pts))
    assert np.isclose((logits[:, 0] - logits[:, 1]).min(), 0.5)
    b = linear_bounds(spec_chain(chain, region, 0, float32=False), region.lo, region.hi)
    assert b.cut is not None and np.isclose(b.lower[0], 0.5)


def test_proof_checker_re_derives_the_cut():
    """The checker's own bounds close the ring's root (its triangle lines alone would not)."""
    import verifier.run.proofcheck as pc

    chain, region = ring_case()
    spec = spec_chain(chain, region, 0)
    own = pc._node_bounds(spec, region.lo, region.hi, None)
    assert own.cut is not None and own.lower[0] > 0.49
    assert np.allclose(own.lower, linear_bounds(spec, region.lo, region.hi).lower)


def lifted_ring_case():
    """The ring one ReLU deeper: the first layer passes the 0/1 features through (its ReLUs
    stable), so the second ReLU's input is the ring's, exactly affine in s."""
    chain, region = ring_case()
    return [Affine(np.eye(4), np.zeros(4)), Relu(), *chain], region


def test_deeper_cut_makes_the_lifted_ring_bound_exact():
    """The second ReLU's cut over its input's upper rows (here exact) closes the lifted ring
    at its true worst margin, as the first ReLU's does for the ring; the proof checker's own
    bounds re-derive it."""
    import verifier.run.proofcheck as pc

    chain, region = lifted_ring_case()
    pts = np.concatenate(list(region.enumerate()))
    logits = forward_lowered(chain, region.points(pts))
    assert np.isclose((logits[:, 0] - logits[:, 1]).min(), 0.5)
    spec = spec_chain(chain, region, 0, float32=False)
    b = linear_bounds(spec, region.lo, region.hi)
    assert set(b.cut) == {3} and np.isclose(b.lower[0], 0.5)
    own = pc._node_bounds(spec, region.lo, region.hi, None)
    assert set(own.cut) == {3} and np.allclose(own.lower, b.lower)


@pytest.mark.parametrize("seed", range(16))
def test_bounds_with_the_cut_hold_on_sign_fixed_sub_boxes(seed):
    """Bounds with every ReLU's cut (some cases have a second ReLU layer) stay below every
    real margin of the box, and at every point its pointwise linear bounds do."""
    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    rng = np.random.default_rng(seed + 7)
    for lo, hi in sign_fixed_boxes(region, rng, 4):
        parts = list(region.enumerate(lo=lo, hi=hi))
        if not parts:
            continue
        pts = np.concatenate(parts)
        logits = forward_lowered(chain, region.points(pts))
        margins = logits[:, [label]] - logits[:, spec.others]
        real = margins.min(axis=0)
        for steps in (0, 15):
            b = linear_bounds(spec, lo, hi, alpha_steps=steps)
            assert np.all(b.lower <= real + 1e-9), (b.lower, real)
            at = pts @ b.coeffs.T + b.offsets
            assert np.all(at <= margins + 1e-9)


def _slopes_tried(seed: int):
    """Per sign-fixed sub-box of random case `seed`: its points and their real margins (None:
    no point), and its bounds without and with the region's optimised slopes (as a node and
    as a box on its own; every margin open)."""
    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi)
    slopes = optimised_slopes(spec, root, region.lo, region.hi, 20, np.inf).slopes
    for lo, hi in sign_fixed_boxes(region, np.random.default_rng(seed + 7), 4):
        parts = list(region.enumerate(lo=lo, hi=hi))
        pts = margins = None
        if parts:
            pts = np.concatenate(parts)
            logits = forward_lowered(chain, region.points(pts))
            margins = logits[:, [label]] - logits[:, spec.others]
        node = dict(parent=root, open_only=True, target=np.inf)
        yield (
            pts,
            margins,
            [linear_bounds(spec, lo, hi, **o) for o in (node, {})],
            [linear_bounds(spec, lo, hi, slopes=slopes, **o) for o in (node, {})],
        )


@pytest.mark.parametrize("seed", range(16))
def test_bounds_with_the_regions_slopes_hold_on_sub_boxes(seed):
    """Slopes optimised over the region with every cut (`optimised_slopes`), tried on its
    sub-boxes, leave every margin's bound below its real minimum over the box, and its linear
    bound below its value at every point, and never below the bound without them."""
    for pts, margins, plain, tried in _slopes_tried(seed):
        for p, t in zip(plain, tried, strict=True):
            assert np.all(t.lower >= p.lower - 1e-12), (t.lower, p.lower)  # float64 sums
            if pts is not None:
                assert np.all(t.lower <= margins.min(axis=0) + 1e-9), (t.lower, margins)
                assert np.all(pts @ t.coeffs.T + t.offsets <= margins + 1e-9)


def test_the_regions_slopes_raise_some_bounds():
    """On the random cases above the region's slopes do raise bounds of sub-boxes."""
    raised = 0
    for seed in range(16):
        for _, _, plain, tried in _slopes_tried(seed):
            raised += sum(
                int(np.any(t.lower > p.lower + 1e-6)) for p, t in zip(plain, tried, strict=True)
            )
    assert raised >= 5, raised


def _refined_cases(seed: int):
    """Per sign-fixed sub-box of random case `seed` holding points: its points, their real
    margins, its bounds as a node with the region's slopes, those refined over the box
    (`bounds.refined`, every margin open), a child box (a free generator fixed at its low
    end) with its points, margins and bounds as a node on the refined slopes, and the
    region's slopes."""
    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi)
    slopes = optimised_slopes(spec, root, region.lo, region.hi, 20, np.inf).slopes
    node = dict(open_only=True, target=np.inf)
    for lo, hi in sign_fixed_boxes(region, np.random.default_rng(seed + 7), 4):
        parts = list(region.enumerate(lo=lo, hi=hi))
        free = np.flatnonzero(lo < hi)
        if not parts or slopes is None or not len(free):
            continue
        pts = np.concatenate(parts)
        logits = forward_lowered(chain, region.points(pts))
        margins = logits[:, [label]] - logits[:, spec.others]
        b = linear_bounds(spec, lo, hi, parent=root, slopes=slopes, **node)
        got = refined(spec, b, lo, hi, 5, np.inf, slopes)
        child_hi = hi.copy()
        child_hi[free[0]] = lo[free[0]]
        inside = np.all(pts <= child_hi, axis=1)
        kid = linear_bounds(spec, lo, child_hi, parent=got, slopes=got.slopes, **node)
        yield pts, margins, b, got, (pts[inside], margins[inside], kid), slopes


@pytest.mark.parametrize("seed", range(16))
def test_refined_slopes_bound_every_point_of_the_box_and_its_sub_boxes(seed):
    """Bounds with slopes refined over a box: never below the node's own, each margin's below
    its real minimum and its linear bound below its value at every point; the slopes passed
    down lie in [0, 1] and a child box's bounds with them hold at every point of the child."""
    for pts, margins, b, got, (kid_pts, kid_margins, kid), _ in _refined_cases(seed):
        assert np.all(got.lower >= b.lower)
        assert np.all(got.lower <= margins.min(axis=0) + 1e-9), (got.lower, margins)
        assert np.all(pts @ got.coeffs.T + got.offsets <= margins + 1e-9)
        assert all(v.min() >= 0.0 and v.max() <= 1.0 for v in got.slopes.values())
        if len(kid_pts):
            assert np.all(kid.lower <= kid_margins.min(axis=0) + 1e-9)
            assert np.all(kid_pts @ kid.coeffs.T + kid.offsets <= kid_margins + 1e-9)


def test_refined_slopes_raise_some_bounds():
    """On the random cases above, refining the region's slopes over a box raises some of its
    margins' bounds (and what it passes down differs from what it was given)."""
    raised = changed = 0
    for seed in range(16):
        for _, _, b, got, _, given in _refined_cases(seed):
            raised += int(np.any(got.lower > b.lower + 1e-6))
            changed += int(any(np.abs(got.slopes[k] - v).max() > 1e-6 for k, v in given.items()))
    assert raised >= 5, raised
    assert changed >= 5, changed


def test_slopes_optimised_for_some_margins_from_given_ones():
    """`optimise_alpha(margins=, start=)`: one row per margin named, each never below the
    bound its start slopes give, nor below the same margin's row optimised with all of them
    from the usual slopes by more than float64 sums (its start being that row's slopes)."""
    for seed in range(16):
        chain, _, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        root = linear_bounds(spec, region.lo, region.hi)
        full = optimise_alpha(spec, root.pre, region.lo, region.hi, 5, np.inf, cut=root.cut)
        if not full[4]:
            continue
        rows = np.array([len(root.lower) - 1])
        got = optimise_alpha(
            spec,
            root.pre,
            region.lo,
            region.hi,
            3,
            np.inf,
            cut=root.cut,
            margins=rows,
            start=full[4],
        )
        assert got[0].shape == (1, region.num_generators)
        assert all(v.shape[0] == 1 for v in got[4].values())
        assert got[2][0] >= full[2][rows[0]] - 1e-9


def test_deeper_cuts_are_used_on_random_two_layer_cases():
    """The random cases above do exercise a second ReLU's cut."""
    used = 0
    for seed in range(16):
        chain, _, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        for lo, hi in sign_fixed_boxes(region, np.random.default_rng(seed + 7), 4):
            b = linear_bounds(spec, lo, hi)
            used += int(b.cut is not None and 3 in b.cut)
    assert used >= 5, used


def test_decide_can_bound_without_the_cut_for_comparison():
    """`knapsack_cut=False` (the benchmark's triangle engine) leaves the ring's root open."""
    from test_engine import ChainRuntime

    from verifier.engine.decide import decide

    chain, region = ring_case()
    runtime = ChainRuntime(chain, 4)
    opts = dict(timeout=10, max_nodes=0, enum_limit=0, use_smt=False, alpha_steps=0)
    assert decide(runtime, chain, region, 0, **opts).route == "bounds"
    assert decide(runtime, chain, region, 0, knapsack_cut=False, **opts).status == "unknown"


def test_few_slope_steps_get_near_where_two_hundred_do():
    """`optimise_alpha`'s Adam steps: 5 take the margins' bounds on the random cases 90% of the
    way 200 take them (95% measured; the momentum step normalised per margin it replaced, 84%,
    and on real CNNs 20 of its steps fell 0.5-4.7 logits short of 200)."""
    gained = {5: 0.0, 200: 0.0}
    for seed in range(16):
        chain, _, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        root = linear_bounds(spec, region.lo, region.hi)
        for steps in gained:
            got = optimise_alpha(spec, root.pre, region.lo, region.hi, steps, np.inf, cut=root.cut)
            assert np.all(got[2] >= root.lower - 1e-9)
            gained[steps] += float(np.sum(got[2] - root.lower))
    assert gained[200] > 0 and gained[5] >= 0.9 * gained[200], gained
