"""The decision procedure against full enumeration on tiny random ReLU networks and regions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.engine.attack import greedy_extreme
from verifier.engine.bab import Leaf, branch_and_bound
from verifier.engine.bounds import interval_bounds, linear_bounds, spec_chain
from verifier.engine.decide import decide
from verifier.engine.enumeration import margins_and_labels, replay
from verifier.engine.network import Affine, MaxPool, Relu, forward_lowered
from verifier.engine.points import count_points
from verifier.engine.regions import Region, feature_region, lattice_region
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN


class ChainRuntime:
    """A runtime whose predict is the lowered chain itself (float32 out, like onnxruntime)."""

    def __init__(self, chain, n: int):
        self.chain, self.input_shape = chain, (n,)

    def predict(self, x):
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        return forward_lowered(self.chain, x).astype(np.float32)


def random_chain(rng, n: int, maxpool: bool = False) -> list:
    """1-2 hidden ReLU layers of 5-16 neurons (optionally a max pool), 3-4 classes."""
    chain, width = [], n
    for _ in range(int(rng.integers(1, 3))):
        h = int(rng.integers(5, 17))
        chain += [
            Affine(rng.normal(size=(h, width)) * 1.5 / np.sqrt(width), rng.normal(size=h) * 0.3),
            Relu(),
        ]
        width = h
    if maxpool:
        k = int(rng.integers(2, 4))
        out = width // k
        windows = np.arange(out * k).reshape(out, k)
        if width > out * k:  # one padded window over the leftovers
            rest = np.full((1, k), -1)
            rest[0, : width - out * k] = np.arange(out * k, width)
            windows = np.concatenate([windows, rest])
        chain.append(MaxPool(windows.astype(np.int64)))
        width = len(windows)
    k = int(rng.integers(3, 5))
    chain.append(Affine(rng.normal(size=(k, width)) / np.sqrt(width), rng.normal(size=k) * 0.3))
    return chain


def random_case(seed: int, maxpool: bool = False):
    """(chain, runtime, region, label): lattice of 2-4 values or 4-8 features, label at x."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 13))
    chain = random_chain(rng, n, maxpool)
    x = rng.uniform(0, 1, n)
    runtime = ChainRuntime(chain, n)
    label = int(runtime.predict(x[None]).argmax())
    if seed % 2 == 0:
        pos = rng.choice(n, int(rng.integers(2, 5)), replace=False)
        region = lattice_region(x, pos, step=0.25, radius=float(rng.uniform(0.5, 2.0)))
    else:
        feats = np.array_split(rng.permutation(n), int(rng.integers(4, min(8, n) + 1)))
        region = feature_region(x, feats, step=0.25, radius=float(rng.uniform(0.5, 3.0)))
    return chain, runtime, region, label


def random_box(region, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random sub-box of the region's box (between two random points), as branch and bound
    makes them."""
    a = rng.integers(region.lo, region.hi + 1)
    b = rng.integers(region.lo, region.hi + 1)
    return np.minimum(a, b), np.maximum(a, b)


def all_points(region) -> np.ndarray:
    return np.concatenate(list(region.enumerate()))


def truth(runtime, region, label) -> tuple[np.ndarray, np.ndarray]:
    """Every point of the region and whether the runtime misclassifies it."""
    pts = all_points(region)
    _, labels = margins_and_labels(runtime, region, pts, label)
    return pts, labels != label


def check_decision(d, runtime, region, label) -> None:
    """Certified agrees with enumeration; refuted is a confirmed region point."""
    _, bad = truth(runtime, region, label)
    if d.status == CERTIFIED:
        assert not bad.any(), f"certified by {d.route} but enumeration finds an error"
    elif d.status == REFUTED:
        s = d.coeffs
        assert s.dtype == np.int64 and region.contains(s[None])[0]
        got = int(runtime.predict(region.points(s[None]).astype(np.float32)).argmax())
        assert got != label and got == d.adv_label
    if bad.any():
        assert d.status != CERTIFIED


# --- bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("maxpool", [False, True], ids=["relu", "maxpool"])
@pytest.mark.parametrize("seed", range(12))
def test_bounds_never_exclude_a_real_margin(seed, maxpool):
    chain, _, region, label = random_case(seed, maxpool)
    spec = spec_chain(chain, region, label)
    rng = np.random.default_rng(seed + 100)
    boxes = [(region.lo, region.hi)]
    for _ in range(3):  # random sub-boxes, as branch and bound makes them
        boxes.append(random_box(region, rng))
    for lo, hi in boxes:
        parts = list(region.enumerate(lo=lo, hi=hi))
        if not parts:  # no point within budget: the relaxation is empty too
            assert linear_bounds(spec, lo, hi).empty and interval_bounds(spec, lo, hi).empty
            continue
        pts = np.concatenate(parts)
        logits = forward_lowered(chain, region.points(pts))
        real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
        for b in (
            interval_bounds(spec, lo, hi),
            linear_bounds(spec, lo, hi),
            linear_bounds(spec, lo, hi, alpha_steps=15),
        ):
            assert np.all(b.lower <= real + 1e-9), (b.method, b.lower, real)


@pytest.mark.parametrize("seed", range(6))
def test_folded_relu_step_equals_plain_back_substitution(seed):
    """The W / |W| shortcut for a ReLU above an affine layer changes no number."""
    from verifier.engine.bounds import _backsub, _query_both

    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    b = linear_bounds(spec, region.lo, region.hi)
    for i, layer in enumerate(spec.layers):
        if i >= 2 and isinstance(layer, Affine) and isinstance(spec.layers[i - 1], Relu):
            m = len(layer.bias)
            rows = np.arange(m)
            eye = np.concatenate([np.eye(m), -np.eye(m)])
            rng = np.random.default_rng(seed)
            few = np.sort(rng.choice(m, max(1, m // 3), replace=False))
            first = {1: b.cut[1]} if b.cut and 1 in b.cut else None
            for cut in (None, first):  # the triangle lines, and the first ReLU's knapsack cut's
                lam2, c2 = _backsub(spec, b.pre, i + 1, eye, np.zeros(2 * m), cut=cut)
                for sub in (rows, few):  # every row, and a few of them
                    lam, c = _query_both(spec, b.pre, i, sub, cut)
                    pick = np.concatenate([sub, m + sub])
                    assert np.allclose(lam, lam2[pick]) and np.allclose(c, c2[pick])


@pytest.mark.parametrize("seed", range(6))
def test_first_input_rounding_charged_as_plain_back_substitution(seed, monkeypatch):
    """A first layer's input rounding (a quantized runtime's, some values exact): its weight
    kept on the values with a bound only (`bounds._rounded_columns`) changes no bound, and
    the W / |W| shortcut charges it per row as the plain back-substitution does, per neuron
    where cheap and through the weights elsewhere (`first_input_charge`)."""
    from dataclasses import replace

    from verifier.engine import bounds
    from verifier.engine.bounds import _backsub, _query_both, prepare_chain, rounding_errors

    chain, _, region, label = random_case(seed)
    prep = prepare_chain(chain)
    out, ins = rounding_errors(prep, region)
    rng = np.random.default_rng(seed)
    step = rng.uniform(0.0, 0.5, region.x.size) * (rng.random(region.x.size) < 0.6)
    ins = [step, *ins[1:]]
    spec = spec_chain(prep, region, label, errors=(out, ins))
    assert spec.first_input[0].shape[1] == np.count_nonzero(step) < len(step)
    w0 = prep.layers[0].weight
    full = replace(spec, first_input=(w0, step, np.abs(w0) @ step))
    for bound in (linear_bounds, interval_bounds):
        a, b = bound(spec, region.lo, region.hi), bound(full, region.lo, region.hi)
        assert np.allclose(a.lower, b.lower, rtol=1e-12, atol=1e-12)
    b = linear_bounds(spec, region.lo, region.hi)
    assert not bounds._small_first_input(spec, b.pre)
    m = len(spec.layers[2].bias)
    eye = np.concatenate([np.eye(m), -np.eye(m)])
    on_first, _ = spec.layers[1].back_step(eye @ spec.layers[2].weight, 0.0, *b.pre[1])
    # about half the rows charged per neuron, half through the weights
    cheap = float(np.median(np.abs(on_first) @ spec.first_input[2]))
    monkeypatch.setattr(bounds, "CHEAP_CHARGE", cheap)
    for cut in (None, b.cut):
        lam2, c2 = _backsub(spec, b.pre, 3, eye, np.zeros(2 * m), cut=cut)
        lam, c = _query_both(spec, b.pre, 2, np.arange(m), cut)
        assert np.allclose(lam, lam2) and np.allclose(c, c2, rtol=1e-12, atol=1e-12)
        few = np.arange(0, m, 3)
        lam, c = _query_both(spec, b.pre, 2, few, cut)
        pick = np.concatenate([few, m + few])
        assert np.allclose(c, c2[pick], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_child_bounds_reusing_parent_are_sound_and_tighter(seed):
    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi)
    g = int(np.argmax(region.hi - region.lo))
    hi = region.hi.copy()
    hi[g] = region.lo[g]
    plain = linear_bounds(spec, region.lo, hi)
    child = linear_bounds(spec, region.lo, hi, parent=root)
    assert np.all(child.lower >= plain.lower - 1e-9)
    parts = list(region.enumerate(lo=region.lo, hi=hi))
    if parts:
        logits = forward_lowered(chain, region.points(np.concatenate(parts)))
        real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
        assert np.all(child.lower <= real + 1e-9)


@pytest.mark.parametrize("maxpool", [False, True], ids=["relu", "maxpool"])
@pytest.mark.parametrize("seed", range(8))
def test_child_bounds_reusing_parent_rows_are_sound(seed, maxpool):
    """`reuse`: a sub-box holding its parent's point nearest 0 minimises the parent's kept rows
    over itself: below every real margin of the box, never looser than the parent, and its
    intermediate bounds are those rows' minima; other boxes derive their own, as without it."""
    chain, _, region, label = random_case(seed, maxpool)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi, reuse=True)
    p = np.clip(0, region.lo, region.hi)
    rng = np.random.default_rng(seed + 200)
    inherited = 0
    for k in range(6):
        lo, hi = random_box(region, rng)
        if k % 2 == 0:  # a box holding the root's point nearest 0
            lo, hi = np.minimum(lo, p), np.maximum(hi, p)
        plain = linear_bounds(spec, lo, hi, parent=root)
        child = linear_bounds(spec, lo, hi, parent=root, reuse=True)
        parts = list(region.enumerate(lo=lo, hi=hi))
        if not parts:
            assert child.empty
            continue
        if not np.array_equal(np.clip(0, lo, hi), p):  # derives and keeps its own rows
            assert np.array_equal(child.lower, plain.lower) and child.queries is not None
            continue
        inherited += 1
        assert child.queries is root.queries  # passed on to the next box holding the point
        assert np.all(child.lower >= root.lower - 1e-12)
        for i, (rows, lam, c) in root.queries.items():  # the root's rows' minima over the box
            vals, _ = region.minimise(lam, c, lo, hi)
            low, up = child.pre[i + 1][0][rows], child.pre[i + 1][1][rows]
            still = (low < 0) & (up > 0)  # the others may be stable by their intervals
            assert np.all(low[still] >= vals[: len(rows)][still] - 1e-9)
            assert np.all(up[still] <= -vals[len(rows) :][still] + 1e-9)
        logits = forward_lowered(chain, region.points(np.concatenate(parts)))
        real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
        assert np.all(child.lower <= real + 1e-9), (child.lower, real)
    assert inherited > 0


@pytest.mark.parametrize("seed", range(8))
def test_restricted_parent_bounds_hold_on_the_sub_box(seed):
    """`restricted` (a child's provisional bounds): the parent's margin rows re-minimised over
    a sub-box are no looser than the parent's, below every real margin of the sub-box, hold
    pointwise there, and carry no rows of the parent's."""
    from verifier.engine.bounds import restricted

    chain, _, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi, reuse=True)
    rng = np.random.default_rng(seed + 400)
    checked = 0
    for _ in range(4):
        lo, hi = random_box(region, rng)
        r = restricted(spec, root, lo, hi, np.max(root.lower) + 1.0)
        parts = list(region.enumerate(lo=lo, hi=hi))
        if not parts:
            assert r.empty
            continue
        checked += 1
        pts = np.concatenate(parts)
        logits = forward_lowered(chain, region.points(pts))
        margins = logits[:, [label]] - logits[:, spec.others]
        assert np.all(r.lower >= root.lower - 1e-12)
        assert np.all(r.lower <= margins.min(axis=0) + 1e-9)
        assert np.all(pts @ r.coeffs.T + r.offsets <= margins + 1e-9)
        assert r.queries is None and r.floors is None
        assert np.array_equal(r.coeffs, root.coeffs)  # the parent's rows, re-minimised
    assert checked > 0


def test_provisional_children_decide_as_their_own_bounds_do(monkeypatch):
    """Branch and bound with children queued on their parent's bounds (`inherit`, the default)
    reaches the verdicts of every child bounded at once, both agreeing with enumeration, and
    its proofs check; the cases do queue such children."""
    from test_proof import problem

    import verifier.engine.decide as dec
    from verifier.engine.proof import from_text
    from verifier.run.proofcheck import CHECKED, check_proof

    queued = []
    real = dec.restricted
    monkeypatch.setattr(dec, "restricted", lambda *a: queued.append(1) or real(*a))
    opts = dict(timeout=30, enum_limit=0, use_smt=False, alpha_steps=0)
    cases = [_hard_robust_case()[:4]] + [random_case(seed) for seed in range(24)]
    for chain, runtime, region, label in cases:
        lazy = decide(runtime, chain, region, label, **opts)
        eager = decide(runtime, chain, region, label, inherit=False, **opts)
        check_decision(lazy, runtime, region, label)
        check_decision(eager, runtime, region, label)
        if UNKNOWN not in (lazy.status, eager.status):
            assert lazy.status == eager.status
        if lazy.status == CERTIFIED:
            proof = from_text(lazy.detail["proof"])
            verdict = check_proof(proof, problem(chain, runtime, region, label))
            assert verdict.status == CHECKED, verdict
    assert queued


@pytest.mark.parametrize("maxpool", [False, True], ids=["relu", "maxpool"])
@pytest.mark.parametrize("seed", range(8))
def test_child_bounds_of_open_margins_only_are_sound(seed, maxpool):
    """`open_only`: the margins the parent leaves at or below the target get the full bound's
    values, coefficients and minimisers; the others keep the parent's bound (above the target),
    never tighter than the full bound; all stay below every real margin of the box."""
    chain, _, region, label = random_case(seed, maxpool)
    spec = spec_chain(chain, region, label)
    root = linear_bounds(spec, region.lo, region.hi)
    rng = np.random.default_rng(seed + 300)
    checked = skipped = 0
    for target in (np.median(root.lower), np.max(root.lower), np.min(root.lower) - 1.0):
        for _ in range(3):
            lo, hi = random_box(region, rng)
            full = linear_bounds(spec, lo, hi, parent=root, target=target)
            part = linear_bounds(spec, lo, hi, parent=root, target=target, open_only=True)
            parts = list(region.enumerate(lo=lo, hi=hi))
            if not parts:
                assert part.empty
                continue
            checked += 1
            op = root.lower <= target
            skipped += int(np.count_nonzero(~op))
            np.testing.assert_allclose(part.lower[op], full.lower[op], rtol=0, atol=1e-12)
            np.testing.assert_allclose(part.coeffs[op], full.coeffs[op], rtol=0, atol=1e-12)
            np.testing.assert_allclose(part.argmin[op], full.argmin[op], rtol=0, atol=1e-12)
            assert np.all(part.lower[~op] >= root.lower[~op])
            assert np.all(part.lower[~op] > target)
            assert np.all(part.lower <= full.lower + 1e-12)
            assert not np.any(part.coeffs[~op])
            logits = forward_lowered(chain, region.points(np.concatenate(parts)))
            real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
            assert np.all(part.lower <= real + 1e-9), (part.lower, real)
    assert checked > 0 and skipped > 0


@pytest.mark.parametrize("seed", range(6))
def test_child_bounds_reusing_parent_greedy_floors_equal_their_own(seed):
    """`reuse` on 0/1 boxes of equal costs: a child that fixes one generator at 0 keeps the
    parent's minima for the rows whose greedy does not take it (first layer and kept rows).
    Its bounds equal those computed without the parent's floors, two levels down, and stay
    below every real margin."""
    from dataclasses import replace

    from verifier.engine.bounds import _dropped_generator

    rng = np.random.default_rng(seed + 500)
    n, h1, h2 = 16, int(rng.integers(8, 17)), int(rng.integers(8, 17))
    chain = [
        Affine(rng.normal(size=(h1, n)) * 1.5 / np.sqrt(n), rng.normal(size=h1) * 0.3),
        Relu(),
        Affine(rng.normal(size=(h2, h1)) * 1.5 / np.sqrt(h1), rng.normal(size=h2) * 0.3),
        Relu(),
        Affine(rng.normal(size=(3, h2)) / np.sqrt(h2), rng.normal(size=3) * 0.3),
    ]
    x = rng.integers(3, 6, n) / 8.0  # every value moves a whole step: all features cost 0.5
    label = int(forward_lowered(chain, x[None]).argmax())
    region = feature_region(
        x, list(np.arange(n).reshape(8, 2)), 0.25, float(rng.choice([1.0, 1.5]))
    )
    spec = spec_chain(chain, region, label)
    dropped = 0
    for _ in range(4):
        box = linear_bounds(spec, region.lo, region.hi, reuse=True)
        lo, hi = region.lo.copy(), region.hi.copy()
        for _depth in range(2):
            g = int(rng.choice(np.flatnonzero(lo < hi)))
            hi = hi.copy()
            hi[g] = 0
            dropped += _dropped_generator(box, lo, hi, region) is not None
            child = linear_bounds(spec, lo, hi, parent=box, reuse=True)
            own = linear_bounds(spec, lo, hi, parent=replace(box, floors=None), reuse=True)
            np.testing.assert_array_equal(child.lower, own.lower)
            for a, b in zip(child.pre, own.pre, strict=True):
                if a is not None:
                    np.testing.assert_array_equal(a[0], b[0])
                    np.testing.assert_array_equal(a[1], b[1])
            pts = np.concatenate(list(region.enumerate(lo=lo, hi=hi)))
            logits = forward_lowered(chain, region.points(pts))
            real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
            assert np.all(child.lower <= real + 1e-9)
            box = child
    assert dropped > 0


@pytest.mark.parametrize("maxpool", [False, True], ids=["relu", "maxpool"])
def test_chain_in_coefficient_space_matches_the_network(maxpool):
    from verifier.engine.attack import spec_forward, spec_jacobian

    for seed in range(6):
        chain, _, region, label = random_case(seed, maxpool)
        spec = spec_chain(chain, region, label)
        pts = all_points(region)
        logits = forward_lowered(chain, region.points(pts))
        want = logits[:, [label]] - logits[:, spec.others]
        assert np.allclose(spec_forward(spec, pts), want)
        s = np.random.default_rng(seed).uniform(region.lo, region.hi)
        step = 1e-7 * np.random.default_rng(seed + 1).normal(size=s.size)
        diff = spec_forward(spec, (s + step)[None]) - spec_forward(spec, s[None])
        assert np.allclose(spec_jacobian(spec, s) @ step, diff[0], atol=1e-9)


def test_linear_bounds_tighter_than_interval():
    wins = 0
    for seed in range(10):
        chain, _, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        ibp = interval_bounds(spec, region.lo, region.hi)
        lin = linear_bounds(spec, region.lo, region.hi, ibp=ibp)
        opt = linear_bounds(spec, region.lo, region.hi, ibp=ibp, alpha_steps=20)
        assert np.all(lin.lower >= ibp.lower - 1e-12)
        assert np.all(opt.lower >= lin.lower - 1e-12)
        wins += bool(np.any(lin.lower > ibp.lower + 1e-9))
    assert wins > 0


def _linprog_min(a, lo, hi, cost, budget):
    """min a.s over box and weighted L1 ball, by scipy's HiGHS on (s, t) with t >= |s|."""
    from scipy.optimize import linprog

    g = len(a)
    c = np.concatenate([a, np.zeros(g)])
    eye = np.eye(g)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, g)), cost[None]]])
    b_ub = np.concatenate([np.zeros(2 * g), [budget]])
    bounds = [(float(l), float(h)) for l, h in zip(lo, hi, strict=True)] + [(0, None)] * g
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return res.fun if res.status == 0 else np.inf


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_knapsack_equals_linprog(seed):
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 9))
    lo = rng.integers(-4, 3, g)
    hi = lo + rng.integers(0, 5, g)
    cost = rng.choice([0.0, 0.25, 0.5, 1.0, 1.7], g)
    budget = float(rng.uniform(0, 6))
    a = rng.normal(size=(3, g))
    const = rng.normal(size=3)
    box = Region(np.zeros(1), np.zeros((g, 1)), lo, hi, cost, budget, "lattice", 1.0)
    vals, argmin = box.minimise(a, const, argmin=True)
    for i in range(3):
        ref = _linprog_min(a[i], lo, hi, cost, budget)
        if np.isinf(ref):
            assert np.isinf(vals[i])
            continue
        assert vals[i] == pytest.approx(ref + const[i], abs=1e-7)
        s = argmin[i]
        assert np.all(s >= lo - 1e-9) and np.all(s <= hi + 1e-9)
        assert np.abs(s) @ cost <= budget + 1e-8  # the region's own EPS slack
        assert a[i] @ s + const[i] == pytest.approx(vals[i], abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_knapsack_values_on_binary_boxes_equal_linprog(seed):
    """The values-only path on 0/1 boxes (uniform costs and at most one odd item, as feature
    regions' nodes) equals the LP optimum and the greedy with minimisers."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 12))
    lo, hi = np.zeros(g, dtype=np.int64), np.ones(g, dtype=np.int64)
    fixed = rng.random(g)
    hi[fixed < 0.15], lo[fixed > 0.85] = 0, 1
    cost = np.full(g, float(rng.choice([0.25, 1.0, 2.5])))
    if rng.random() < 0.6:
        cost[rng.integers(g)] = float(rng.choice([0.3, 1.0, 4.0, 7.0]))
    budget = float(lo @ cost + rng.choice([rng.uniform(0, 8), cost[0] * rng.integers(0, 5)]))
    a = rng.normal(size=(4, g)) * (rng.random((4, g)) < 0.8)
    const = rng.normal(size=4)
    box = Region(np.zeros(1), np.zeros((g, 1)), lo, hi, cost, budget, "features", 1.0)
    fast, none = box.minimise(a, const)
    full, _ = box.minimise(a, const, argmin=True)
    assert none is None
    np.testing.assert_allclose(fast, full, atol=1e-9)
    for i in range(4):
        ref = _linprog_min(a[i], lo, hi, cost, budget) + const[i]
        assert fast[i] == pytest.approx(ref, abs=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_symbolic_affine_equals_the_split_weights(seed):
    """`bounds._symbolic_affine`'s two products with W and |W| give the linear bounds the
    positive and negative parts of W give (W+ u + W- l, W+ l + W- u)."""
    from verifier.engine.bounds import _symbolic_affine

    chain, _, region, label = random_case(seed)
    rng = np.random.default_rng(seed)
    layer = next(x for x in chain if isinstance(x, Affine))
    n, g = layer.weight.shape[1], len(region.lo)
    al, cl = rng.normal(size=(n, g)), rng.normal(size=n)
    au, cu = al + rng.uniform(0, 1, (n, g)), cl + rng.uniform(0, 1, n)
    step, e = rng.uniform(0, 0.1, n), rng.uniform(0, 0.1, layer.weight.shape[0])
    big = np.full(layer.weight.shape[0], 1e9)
    (al2, cl2, au2, cu2), _, _ = _symbolic_affine(
        layer, np.abs(layer.weight), (al, cl, au, cu), step, e, -big, big, region
    )
    wp, wn = np.maximum(layer.weight, 0.0), np.minimum(layer.weight, 0.0)
    np.testing.assert_allclose(au2, wp @ au + wn @ al, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(al2, wp @ al + wn @ au, rtol=1e-12, atol=1e-12)
    up = wp @ (cu + step) + wn @ (cl - step) + layer.bias + e
    down = wp @ (cl - step) + wn @ (cu + step) + layer.bias - e
    np.testing.assert_allclose(cu2, up, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cl2, down, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_knapsack_with_budget_past_every_move_equals_linprog(seed):
    """A box whose every move fits the budget left (a lattice wider in radius than its box):
    the box's own minimum (`regions._box_min`), values and minimisers, equals the LP optimum
    and the greedy's."""
    from verifier.engine.regions import _knapsack_min

    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 9))
    lo = rng.integers(-4, 3, g)
    hi = lo + rng.integers(0, 5, g)
    cost = rng.choice([0.0, 0.25, 0.5, 1.0, 1.7], g)
    p = np.clip(0, lo, hi)
    budget = float((np.abs(p) + np.maximum(p - lo, hi - p)) @ cost + rng.uniform(0, 2))
    a = rng.normal(size=(3, g)) * (rng.random((3, g)) < 0.8)
    const = rng.normal(size=3)
    vals, argmin = _knapsack_min(a, const, lo, hi, cost, budget)
    greedy, by_greedy = _knapsack_min(a, const, lo, hi, cost, budget, floors=True)
    np.testing.assert_allclose(vals, greedy, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(argmin, by_greedy)
    for i in range(3):
        assert vals[i] == pytest.approx(_linprog_min(a[i], lo, hi, cost, budget) + const[i])
        assert a[i] @ argmin[i] + const[i] == pytest.approx(vals[i], abs=1e-9)


def test_knapsack_values_path_is_taken_on_feature_boxes():
    """The 0/1 path answers for a feature box with one odd cost, and declines a lattice box."""
    from verifier.engine.regions import _binary_knapsack, binary_shape

    lo, hi = np.zeros(5), np.ones(5)
    cost = np.array([2.5, 2.5, 2.5, 1.0, 2.5])
    a = np.array([[-1.0, -2.0, 3.0, -4.0, -0.5]])
    shape = binary_shape(lo, hi, cost, 6.0)
    got, _ = _binary_knapsack(a, np.zeros(1), np.zeros(5), shape, cost, 6.0)
    # greedy by gain per cost: item 3 (4 per 1.0), item 1 (2 per 2.5), item 0 (1 per 2.5)
    assert got == pytest.approx([-(4.0 + 2.0 + 1.0)])
    assert binary_shape(lo - 1, hi, cost, 6.0) is None


def test_greedy_extreme_stays_in_region():
    rng = np.random.default_rng(3)
    for _ in range(50):
        g = int(rng.integers(1, 8))
        lo = rng.integers(-4, 1, g)
        hi = rng.integers(0, 5, g)
        cost = rng.choice([0.25, 0.5, 1.0], g)
        budget = float(rng.uniform(0, 4))
        s = greedy_extreme(rng.normal(size=(4, g)), lo, hi, cost, budget)
        assert np.all((s >= lo) & (s <= hi)) and np.all(np.abs(s) @ cost <= budget + 1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_box_size_counts_or_overcounts(seed):
    _, _, region, _ = random_case(seed)
    n = len(all_points(region))
    assert region.count(10**6) == n
    assert region.count(n - 1) >= n


def test_box_size_with_many_binary_generators():

    rng = np.random.default_rng(5)
    for _ in range(10):
        g = int(rng.integers(10, 30))
        lo, hi = np.zeros(g, dtype=np.int64), np.ones(g, dtype=np.int64)
        hi[rng.random(g) < 0.2] = 0
        cost = rng.choice([1.0, 2.5], g)
        budget = float(rng.uniform(2, 12))
        exact = count_points(lo, hi, cost, budget, exact=True)
        for limit in (10, 1000, 10**6):
            got = count_points(lo, hi, cost, budget, limit)
            assert got == min(exact, limit + 1)


def test_enumeration_of_many_binary_generators_under_a_tight_budget():
    """A feature region at a large step: 79 features, a budget for one or two of them. Its few
    hundred points are listed without visiting the 2^79 over-budget combinations, in order."""
    from verifier.engine.regions import enumerate_box

    rng = np.random.default_rng(2)
    g = 79
    lo, hi = np.zeros(g, dtype=np.int64), np.ones(g, dtype=np.int64)
    cost = rng.uniform(3.0, 10.0, g)
    pts = np.concatenate(list(enumerate_box(lo, hi, cost, 10.0, batch=64)))
    assert len(pts) == count_points(lo, hi, cost, 10.0, exact=True) == len(np.unique(pts, axis=0))
    assert np.all(np.abs(pts) @ cost <= 10.0 + 1e-9)
    keys = [tuple(p) for p in pts]
    assert keys == sorted(keys)


def test_enumeration_of_a_box_with_many_fixed_generators():
    """A feature-region leaf: 79 generators, all but a few fixed (more than numpy's 32
    meshgrid dimensions), enumerated exactly."""
    from verifier.engine.regions import enumerate_box

    g = 79
    lo, hi = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
    free = np.array([3, 40, 41, 77, 78])
    hi[free] = 1
    lo[60] = hi[60] = 1
    cost = np.full(g, 2.5)
    got = np.concatenate(list(enumerate_box(lo, hi, cost, 7.5, batch=64)))
    assert len(got) == 1 + 5 + 10  # feature 60 in, and at most two of the five free
    assert np.all(got[:, 60] == 1) and np.all(got.sum(axis=1) <= 3)
    assert len({tuple(r) for r in got}) == len(got)


@pytest.mark.parametrize("seed", range(6))
def test_enumeration_of_boxes_with_late_generators_forced_away_from_zero(seed):
    """A branch-and-bound leaf: late generators fixed at +-1 or +-2 use most of the budget, so
    most prefixes of the early ones have no completion. Exactly the brute-force points, in
    order (the least-cost pruning of prefixes drops only dead ones)."""
    import itertools

    from verifier.engine.regions import enumerate_box

    rng = np.random.default_rng(seed)
    g = 12
    lo = rng.integers(-1, 1, g)
    hi = lo + rng.integers(0, 3, g)
    forced = rng.choice(g, 3, replace=False)
    lo[forced] = hi[forced] = rng.choice([-2, -1, 1, 2], 3)
    cost = rng.choice([0.25, 0.5, 1.0], g)
    budget = float(np.abs(np.clip(0, lo, hi)) @ cost + rng.uniform(0.5, 2.0))
    grid = itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi, strict=True)])
    want = [p for p in grid if np.abs(np.array(p)) @ cost <= budget + 1e-9]
    got = [tuple(p) for b in enumerate_box(lo, hi, cost, budget, batch=32) for p in b]
    assert got == want and len(want) > 1


@pytest.mark.parametrize("seed", range(4))
def test_enumeration_of_a_leaf_with_little_budget_left(seed):
    """A deep feature-region leaf: early generators fixed in spend most of the budget, so few
    rows of the inner block can join any prefix (they are dropped before the join). Exactly
    the brute-force points, in order."""
    import itertools

    from verifier.engine.regions import enumerate_box

    rng = np.random.default_rng(seed)
    g = 16
    lo, hi = np.zeros(g, dtype=np.int64), np.ones(g, dtype=np.int64)
    forced = rng.choice(4, 2, replace=False)  # early: outside the inner block
    lo[forced] = 1
    cost = rng.uniform(1.0, 2.0, g)
    budget = float(cost[forced].sum() + rng.uniform(2.0, 4.0))
    grid = itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi, strict=True)])
    want = [p for p in grid if np.abs(np.array(p)) @ cost <= budget + 1e-9]
    got = [tuple(p) for b in enumerate_box(lo, hi, cost, budget, batch=256) for p in b]
    assert got == want and len(want) > 1


# --- the decision procedure --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_decide_agrees_with_enumeration(seed):
    chain, runtime, region, label = random_case(seed)
    # enum_limit=0 forces bounds and branch and bound (no leaf is enumerated)
    # node_alpha: slopes optimised at every node too
    # inherit=False: every node derives its own intermediate bounds
    options = (
        {"enum_limit": 0},
        {"enum_limit": 0, "node_alpha": True},
        {"enum_limit": 0, "inherit": False},
        {"enum_limit": 16},
        {},
    )
    for kwargs in options:
        d = decide(runtime, chain, region, label, timeout=20, use_smt=False, **kwargs)
        assert d.status != UNKNOWN, (kwargs, d)
        check_decision(d, runtime, region, label)


@pytest.mark.parametrize("seed", range(10))
def test_decide_with_maxpool(seed):
    chain, runtime, region, label = random_case(seed, maxpool=True)
    d = decide(runtime, chain, region, label, timeout=20, enum_limit=0, use_smt=False)
    assert d.status != UNKNOWN
    check_decision(d, runtime, region, label)


def _hard_robust_case():
    """A robust region whose root bounds do not certify it (so only B&B can)."""
    for seed in range(400):
        chain, runtime, region, label = random_case(seed)
        _, bad = truth(runtime, region, label)
        if bad.any():
            continue
        spec = spec_chain(chain, region, label)
        root = linear_bounds(spec, region.lo, region.hi, alpha_steps=20)
        if not np.all(root.lower > 0):
            return chain, runtime, region, label, spec, root
    pytest.skip("no robust region with failing root bounds among the seeds")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 9), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_unique_rows_equals_numpy_unique(n, g, seed):
    from verifier.engine.bab import unique_rows

    a = np.random.default_rng(seed).integers(-2, 3, size=(n, g))
    a = np.concatenate([a, a[: n // 2]])  # some repeated rows
    assert np.array_equal(unique_rows(a), np.unique(a, axis=0))


class Counting(ChainRuntime):
    """A chain runtime that counts its calls and the points they ran."""

    calls = rows = 0

    def predict(self, x):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        return super().predict(x)


def test_minimisers_queue_once_and_run_in_one_call():
    from verifier.engine.bab import BabOutcome, minimisers, run_minimisers

    chain, runtime, region, label, spec, root = _hard_robust_case()
    counting = Counting(runtime.chain, region.x.size)
    out, zero = BabOutcome(UNKNOWN, "budget"), np.zeros(len(spec.others))
    first = minimisers(region, root, zero, out.tried)
    assert len(first) and len(out.tried) == len(first)  # every candidate is remembered
    assert len(minimisers(region, root, zero, out.tried)) == 0  # and not queued again
    out.queued = [first[:1], first[1:]]
    assert not run_minimisers(counting, region, label, out)
    assert (counting.calls, counting.rows, out.queued) == (1, len(first), [])


def test_queued_minimisers_run_when_the_loop_ends():
    """A minimiser queued at the last node the budget allows still runs: a counterexample
    among them refutes the region, confirmed on the runtime."""
    from verifier.engine.bab import minimisers

    for seed in range(400):
        chain, runtime, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        zero = np.zeros(len(spec.others))
        root = linear_bounds(spec, region.lo, region.hi)
        if np.all(root.lower > 0):
            continue
        cands = minimisers(region, root, zero, set())
        if not len(cands) or np.all(runtime.predict(region.points(cands)).argmax(1) == label):
            continue
        counting = Counting(chain, region.x.size)
        out = branch_and_bound(
            counting,
            region,
            label,
            [Leaf(region.lo, region.hi, root)],
            lambda lo, hi, parent, spec=spec: linear_bounds(spec, lo, hi),
            zero,
            deadline=np.inf,
            max_nodes=1,
            enum_limit=0,
            sieve=False,
        )
        assert out.status == REFUTED and out.nodes == 1
        assert runtime.predict(region.points(out.coeffs)).argmax() == out.adv_label != label
        assert region.contains(out.coeffs[None])[0]
        return
    pytest.skip("no region whose root minimisers misclassify among the seeds")


def test_split_serves_the_worst_margin():
    """A node halves the generator with the largest |coefficient| x range in its worst margin's
    linear bound, whatever the other violated margins' coefficients add up to; the widest
    range when no margin is violated."""
    from verifier.engine.bab import split
    from verifier.engine.bounds import Bounds

    lo, hi = np.zeros(4, dtype=np.int64), np.array([1, 1, 1, 3])
    zero = np.zeros(3)

    def halved(coeffs, lower):
        b = Bounds(np.array(lower), np.array(coeffs), np.zeros((3, 4)), [], "crown")
        (lo0, hi0), (lo1, hi1) = split(Leaf(lo, hi, b), zero)
        g = int(np.flatnonzero(hi0 != hi)[0])
        assert np.array_equal(lo0, lo) and np.array_equal(hi1, hi)
        assert np.flatnonzero((hi0 != hi) | (lo1 != lo)).tolist() == [g]
        assert lo1[g] == hi0[g] + 1 == (lo[g] + hi[g]) // 2 + 1
        return g

    # margin 0 is the worst; margin 1, also violated, weighs far more on generator 0
    rows = [[0.0, -2.0, 0.1, 0.0], [5.0, 0.0, 0.0, 0.2], [9.0, 9.0, 9.0, 9.0]]
    assert halved(rows, [-3.0, -1.0, 2.0]) == 1
    assert halved(rows, [-1.0, -3.0, 2.0]) == 0
    # the range weighs in: 0.9 x 3 beats 2 x 1
    assert halved([[0.0, 2.0, 0.0, 0.9], [0.0] * 4, [0.0] * 4], [-1.0, 1.0, 1.0]) == 3
    assert halved(rows, [1.0, 1.0, 2.0]) == 3  # none violated: the widest range


def test_split_weighs_the_last_relu_layers_gap():
    """With the margins' weights on the last ReLU layer, a split also weighs the relaxation gap
    of its unstable neurons each generator's range moves: generator 2 moves half the range of
    an unstable neuron (gap 0.5 by its upper chord, weight -4: score 1.0) and beats generator
    0's larger coefficient; a stable neuron (generator 3's) adds nothing, nor do rows the
    bounds did not keep."""
    from verifier.engine.bab import GAP_WEIGHT, relaxation_score, split
    from verifier.engine.bounds import Bounds

    lo, hi = np.zeros(4, dtype=np.int64), np.ones(4, dtype=np.int64)
    coeffs = np.array([[0.5, 0.1, 0.1, 0.1]])
    pre = [None, None, None, (np.array([-1.0, 0.5]), np.array([1.0, 2.0])), None]
    lam = np.zeros((4, 4))
    lam[[0, 2], 2] = [1.0, -1.0]  # neuron 0's lower and (negated) upper rows: on generator 2
    lam[[1, 3], 3] = [3.0, -3.0]  # neuron 1 (stable) on generator 3
    queries = {2: (np.array([0, 1]), lam, np.zeros(4))}
    b = Bounds(np.array([-1.0]), coeffs, np.zeros((1, 4)), pre, "crown", queries=queries)
    weights = np.array([[-4.0, -10.0]])
    width = np.ones(4)
    assert np.allclose(relaxation_score(b, weights[0], width), [0.0, 0.0, 1.0, 0.0])
    # a positive weight: the adaptive lower line's gap, min(u, -l) = 1
    assert np.allclose(relaxation_score(b, -weights[0], width), [0.0, 0.0, 2.0, 0.0])
    assert GAP_WEIGHT * 1.0 + 0.1 > 0.5

    def halved(bounds, w):
        (_, hi0), _ = split(Leaf(lo, hi, bounds), np.zeros(1), w)
        return int(np.flatnonzero(hi0 != hi)[0])

    assert halved(b, weights) == 2
    assert halved(b, None) == 0
    assert halved(Bounds(b.lower, coeffs, b.argmin, pre, "crown"), weights) == 0  # no rows


def test_last_relu_weights_only_where_a_coarse_grid_feeds_the_margins():
    """The margins' weights reach `split` where the last ReLU follows a deeper Affine layer
    than the first, feeds the margins, and its input lies on a grid of few steps across its
    unstable neurons' ranges (8-bit activations): not on a fine grid, without one, for a single
    hidden layer (its ReLU's input is the first layer's: no rows), or behind a max pool."""
    from dataclasses import replace

    from verifier.engine.bab import GAP_GRID_STEPS, last_relu_weights

    rng = np.random.default_rng(0)

    def layer(m, k):
        return Affine(rng.normal(size=(m, k)), rng.normal(size=m))

    for seed in range(20):
        _, _, region, label = random_case(seed)
        n = len(region.x)
        deep = spec_chain([layer(8, n), Relu(), layer(8, 8), Relu(), layer(3, 8)], region, label)
        root = linear_bounds(deep, region.lo, region.hi)
        low, up = root.pre[3]
        unstable = (low < 0) & (up > 0)
        if unstable.any():
            break
    span = float(np.median((up - low)[unstable]))

    def on_grid(steps):
        return replace(deep, lattice=[None, None, (span / steps, 0.0), None, None])

    assert last_relu_weights(on_grid(10), root) is deep.layers[-1].weight
    assert last_relu_weights(on_grid(GAP_GRID_STEPS * 4), root) is None
    assert last_relu_weights(deep, root) is None  # no grid (a float chain)
    shallow = spec_chain([layer(5, n), Relu(), layer(3, 5)], region, label)
    shallow = replace(shallow, lattice=[(span / 10, 0.0), None, None])
    assert last_relu_weights(shallow, linear_bounds(shallow, region.lo, region.hi)) is None
    pooled = [layer(6, n), Relu(), layer(4, 6), Relu(), MaxPool(np.array([[0, 1], [2, 3]]))]
    pool = spec_chain([*pooled, layer(3, 2)], region, label)
    pool = replace(pool, lattice=[None, None, (span / 10, 0.0), None, None, None])
    assert last_relu_weights(pool, linear_bounds(pool, region.lo, region.hi)) is None


def test_bab_with_no_nodes_is_unknown():
    chain, runtime, region, label, spec, root = _hard_robust_case()

    def bound(lo, hi, parent):
        return linear_bounds(spec, lo, hi, parent=parent)

    leaf = Leaf(region.lo, region.hi, root)
    out = branch_and_bound(
        runtime,
        region,
        label,
        [leaf],
        bound,
        np.zeros(len(spec.others)),
        deadline=np.inf,
        max_nodes=0,
        enum_limit=0,
    )
    assert out.status == UNKNOWN and len(out.open_leaves) == 1
    d = decide(runtime, chain, region, label, timeout=30, max_nodes=0, enum_limit=0, use_smt=False)
    assert d.status == UNKNOWN and d.route == "budget"
    full = branch_and_bound(
        runtime,
        region,
        label,
        [leaf],
        bound,
        np.zeros(len(spec.others)),
        deadline=np.inf,
        max_nodes=10**5,
        enum_limit=0,
    )
    assert full.status == CERTIFIED and full.nodes > 1


def test_rows_kept_by_queued_leaves_stay_within_the_budget(monkeypatch):
    """`bab.ROWS_BUDGET`: queued leaves keep their rows and greedy floors only while they total
    at most the budget (leaves past it drop both and their children derive their own); the
    certificate stands at any budget."""
    from verifier.engine import bab

    chain, runtime, region, label, spec, _ = _hard_robust_case()
    root = linear_bounds(spec, region.lo, region.hi, alpha_steps=20, reuse=True)
    threshold = np.zeros(len(spec.others))
    one = bab.rows_nbytes(root)
    assert one > 0

    def run(budget: int, max_nodes: int = 10**5):
        monkeypatch.setattr(bab, "ROWS_BUDGET", budget)
        parents: list = []

        def bound(lo, hi, parent):
            parents.append(parent.queries)
            assert (parent.queries is None) == (parent.floors is None)  # kept and dropped together
            return linear_bounds(spec, lo, hi, parent=parent, reuse=True)

        leaf = Leaf(region.lo, region.hi, root)
        out = branch_and_bound(
            runtime, region, label, [leaf], bound, threshold,
            deadline=np.inf, max_nodes=max_nodes, enum_limit=0,
        )  # fmt: skip
        return out, parents

    free, _ = run(10**12)
    assert free.status == CERTIFIED and free.rows_peak > one  # uncapped, rows pile up
    for budget in (0, one):
        out, parents = run(budget)
        assert out.status == CERTIFIED and out.rows_peak <= budget
        with_rows = sum(p is not None for p in parents)
        assert with_rows == 0 if budget == 0 else 0 < with_rows < len(parents)
        out, _ = run(budget, max_nodes=max(1, free.nodes // 2))
        assert out.open_leaves and sum(bab.rows_nbytes(x.bounds) for x in out.open_leaves) <= budget
    for seed in range(6):
        chain, runtime, region, label = random_case(seed)
        for budget in (0, one):
            monkeypatch.setattr(bab, "ROWS_BUDGET", budget)
            d = decide(runtime, chain, region, label, timeout=20, enum_limit=0, use_smt=False)
            assert d.status != UNKNOWN, d
            check_decision(d, runtime, region, label)


def test_decide_with_milp_on_remaining_leaves():
    chain, runtime, region, label, _, _ = _hard_robust_case()
    d = decide(runtime, chain, region, label, max_nodes=1, enum_limit=0, use_smt=True, timeout=30)
    assert d.status == CERTIFIED and d.detail["leaves"].get("milp", 0) >= 1
    check_decision(d, runtime, region, label)


def test_runtime_that_disagrees_with_chain_gets_no_bounds():
    """Bounds of one network must not certify another: the guard at x switches them off."""
    chain, _, region, label = random_case(4)
    other = [
        Affine(layer.weight * 1.01, layer.bias) if isinstance(layer, Affine) else layer
        for layer in chain
    ]
    runtime = ChainRuntime(other, region.x.size)
    label = int(runtime.predict(region.x[None]).argmax())
    d = decide(runtime, chain, region, label, timeout=20, enum_limit=0, use_smt=False)
    assert d.detail["trusted_bounds"] is False
    check_decision(d, runtime, region, label)
    assert d.status == REFUTED or d.route == "enumeration"


@pytest.mark.parametrize("seed", range(12))
def test_quantized_runtime(seed):
    """Rounded weights: certified only by enumeration, or by bounds on an error model."""
    from quantize.error_model import ErrorModel, Rounding
    from verifier.engine.bounds import prepare_chain

    chain, _, region, label = random_case(seed)
    q = [
        Affine(np.round(layer.weight * 8) / 8, np.round(layer.bias * 8) / 8)
        if isinstance(layer, Affine)
        else layer
        for layer in chain
    ]
    runtime = ChainRuntime(q, region.x.size)
    d = decide(runtime, chain, region, label, timeout=20, enum_limit=0, quantized=True)
    check_decision(d, runtime, region, label)
    assert d.status != UNKNOWN
    if d.status == CERTIFIED:
        assert d.route == "enumeration"
    # the runtime evaluates q in float32: its error model is q with float32 rounding only
    rounding = [Rounding() if isinstance(layer, Affine) else None for layer in q]
    model = ErrorModel(prepare_chain(q), rounding, "test")
    d = decide(
        runtime, chain, region, label, timeout=20, enum_limit=0, quantized=True, error_model=model
    )
    check_decision(d, runtime, region, label)
    assert d.status != UNKNOWN and d.detail["trusted_bounds"]


class BatchDependentRuntime(ChainRuntime):
    """Misclassifies one point, but only inside batches (as a GEMM kernel might at a tie)."""

    def __init__(self, chain, n, bad_point, label):
        super().__init__(chain, n)
        self.bad, self.label = bad_point.astype(np.float32), label

    def predict(self, x):
        out = super().predict(x)
        if len(x) > 1:
            hit = np.all(np.asarray(x, np.float32).reshape(len(x), -1) == self.bad, axis=1)
            out[hit] = 0.0
            out[hit, (self.label + 1) % out.shape[1]] = 1.0
        return out


def test_batch_dependent_errors_are_never_certified():
    for seed in range(40):
        chain, runtime, region, label = random_case(seed)
        pts, bad = truth(runtime, region, label)
        if not bad.any() and len(pts) > 2:
            break
    bad_point = region.points(pts[len(pts) // 2][None])[0]
    odd = BatchDependentRuntime(chain, region.x.size, bad_point, label)
    d = decide(odd, chain, region, label, timeout=20, quantized=True)  # enumerated outright
    assert d.status == UNKNOWN and "ambiguous" in d.detail


def test_replay_matches_predictions():
    chain, runtime, region, label = random_case(6)
    pts = all_points(region)
    mis, labels = replay(runtime, region, pts, label, batch=7)
    ref = runtime.predict(region.points(pts).astype(np.float32)).argmax(axis=1)
    assert np.array_equal(labels, ref) and np.array_equal(mis, ref != label)


def test_decide_rejects_bad_options():
    chain, runtime, region, label = random_case(2)
    with pytest.raises(ValueError):
        decide(runtime, chain, region, label, timeout=30, error_model=object())
    with pytest.raises(ValueError):
        decide(runtime, chain, region, label, timeout=0)


def test_onnxruntime_model(tmp_path):
    """A real onnxruntime model built with onnx.helper: same answers as enumeration on it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from verifier.engine.model import load_model

    rng = np.random.default_rng(11)
    n, h, k = 10, 12, 4
    w1 = (rng.normal(size=(n, h)) * 1.5 / np.sqrt(n)).astype(np.float32)
    b1 = (rng.normal(size=h) * 0.3).astype(np.float32)
    w2 = (rng.normal(size=(h, k)) / np.sqrt(h)).astype(np.float32)
    b2 = (rng.normal(size=k) * 0.3).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, name)
        for a, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    runtime = load_model(path)
    chain = runtime.network.lower()
    decided = set()
    for i in range(6):
        x = rng.uniform(0, 1, n)
        label = int(runtime.predict(x[None].astype(np.float32)).argmax())
        if i % 2:
            region = lattice_region(x, rng.choice(n, 3, replace=False), 0.25, 1.5)
        else:
            region = feature_region(x, np.array_split(rng.permutation(n), 5), 0.25, 2.0)
        d = decide(runtime, chain, region, label, timeout=20, enum_limit=0, use_smt=False)
        assert d.status != UNKNOWN and d.detail["trusted_bounds"]
        check_decision(d, runtime, region, label)
        decided.add(d.status)
    assert decided  # at least one answer; both kinds usually


def test_region_families_build_the_same_regions_as_their_builders():
    from verifier.engine.features import chunk
    from verifier.engine.regions import FAMILIES

    x = np.random.default_rng(0).uniform(size=30)
    order = np.argsort(-x)
    got = FAMILIES["features"].build(x, order, 0.25, 2.0, 4, 3)
    want = feature_region(x, chunk(order, 3), 0.25, 2.0)
    assert np.array_equal(got.directions, want.directions) and got.family == "features"
    got = FAMILIES["lattice"].build(x, order, 0.25, 2.0, 4, 3)
    assert np.array_equal(got.directions, lattice_region(x, order[:4], 0.25, 2.0).directions)
    assert FAMILIES["features"].subsets and not FAMILIES["lattice"].subsets
    # the sub-box helpers agree with the region's own point test
    lo, hi = got.lo.copy(), got.hi.copy()
    lo[0] = hi[0] = hi[0]
    pts = np.concatenate(list(got.enumerate(lo=lo, hi=hi)))
    assert np.all(got.contains(pts)) and got.count(10**6, lo, hi) >= len(pts)
    assert got.least_cost(lo, hi) == pytest.approx(abs(hi[0]) * got.cost[0])


def test_quantized_decisions_get_the_quantized_budget(monkeypatch):
    """The float decision gets --timeout, each quantized model's --quantized-timeout."""
    from verifier.engine import decide as decide_mod
    from verifier.engine import diffdecide
    from verifier.run.check import Checker, Settings

    budgets = []
    real_decide, real_from_float = decide_mod.decide, diffdecide.decide_from_float

    def float_decide(*a, **k):
        budgets.append(("float", k["timeout"]))
        return real_decide(*a, **k)

    def quantized_decide(*a, **k):
        budgets.append(("quantized", k["timeout"]))
        return real_from_float(*a, **k)

    monkeypatch.setattr(decide_mod, "decide", float_decide)
    monkeypatch.setattr(diffdecide, "decide_from_float", quantized_decide)
    rng = np.random.default_rng(3)
    chain = random_chain(rng, 6)
    x = rng.uniform(0.3, 0.7, (1, 6)).astype(np.float32)
    runtime = ChainRuntime(chain, 6)
    pred = np.argmax(runtime.predict(x), axis=1)
    st = Settings(0.5, 0.25, "lattice", 2, timeout=3.0, quantized_timeout=7.0, use_smt=False)
    checker = Checker(st, runtime, chain, x, pred, np.arange(1), pred, {"q": runtime}, {"q": pred})
    rec = checker.check(0)
    assert rec.float.status == CERTIFIED, "the test needs a certified float region"
    assert budgets == [("float", 3.0), ("quantized", 7.0)]


def test_checks_run_on_one_blas_thread():
    """A process that checks inputs limits BLAS to one thread, whatever it had before (two
    BLAS threads beside a runtime's pool halved the nodes a second on two cores)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from verifier.run.check import Checker, Settings

    rng = np.random.default_rng(0)
    chain = random_chain(rng, 6)
    with threadpool_limits(limits=2, user_api="blas"):
        before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        x = rng.uniform(0, 1, (2, 6)).astype(np.float32)
        Checker(Settings(), ChainRuntime(chain, 6), chain, x, np.zeros(2), np.arange(2), x[:, 0])
        after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    assert after and all(n == 1 for n in after), (before, after)
