"""The sieve: a leaf's linear bounds hold at every point of its box, so only the points where
they are not positive are run on the runtime (`Region.points_below`, `bab.settle_node`)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from test_engine import ChainRuntime, check_decision, random_case, truth
from test_proof import problem

from verifier.engine import bab
from verifier.engine import points as points_module
from verifier.engine.bab import SIEVE_POINTS, BabOutcome, Leaf, settle_node, sieved_points
from verifier.engine.bounds import linear_bounds, pointwise_lower, spec_chain
from verifier.engine.decide import decide
from verifier.engine.points import point_seconds
from verifier.engine.proof import decode, from_text
from verifier.engine.regions import Region
from verifier.engine.result import CERTIFIED, UNKNOWN
from verifier.run.proofcheck import CHECKED, check_proof


def _region(lo, hi, cost, budget) -> Region:
    g = len(lo)
    return Region(
        x=np.zeros(3),
        directions=np.zeros((g, 3)),
        lo=np.asarray(lo, dtype=np.int64),
        hi=np.asarray(hi, dtype=np.int64),
        cost=np.asarray(cost, dtype=np.float64),
        budget=float(budget),
        family="features",
        step=0.25,
    )


@pytest.mark.parametrize("seed", range(200))
def test_points_below_are_exactly_the_points_some_row_leaves_open(seed):
    """Against every point of the box: none where a row is <= 0 is missed, none outside the
    box within budget is returned, no point twice; 0/1 boxes with alike or one odd cost, some
    generators fixed (at 0 or 1), boxes of wider ranges (enumerated), and integer rows (ties)."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 11))
    lo, hi = np.zeros(g, np.int64), np.ones(g, np.int64)
    if seed % 5 == 4:  # a lattice box: enumerated and tested
        lo, hi = -rng.integers(0, 3, g), rng.integers(0, 3, g)
    fixed = rng.random(g) < 0.3
    at = np.clip(rng.integers(-1, 2, g), lo, hi)
    lo[fixed] = hi[fixed] = at[fixed]
    cost = np.full(g, 1.25)
    if seed % 3 == 1:
        cost[rng.integers(g)] = 2.0  # one odd cost
    region = _region(np.minimum(lo, 0), np.maximum(hi, 0), cost, 1.25 * rng.integers(0, g + 1))
    a = rng.normal(size=(int(rng.integers(1, 4)), g))
    c = rng.normal(size=len(a)) + rng.normal()
    if seed % 7 == 6:  # small integers: many subsets tie, some exactly at 0
        a, c = np.round(2 * a), np.round(2 * c)
    every = np.concatenate([*region.enumerate(lo=lo, hi=hi), np.zeros((0, g), np.int64)])
    want = {tuple(p) for p in every[np.any(every @ a.T + c <= 0, axis=1)]}
    got = region.points_below(a, c, lo, hi, cap=10**6)
    assert got is not None
    assert len({tuple(p) for p in got}) == len(got), "a point twice"
    assert want <= {tuple(p) for p in got}, "a point some row leaves open is missed"
    assert {tuple(p) for p in got} <= {tuple(p) for p in every}, "a point outside the box"
    if len(want) > 1:
        assert region.points_below(a, c, lo, hi, cap=len(want) - 1) is None


def test_points_below_visits_a_large_box_by_its_few_open_points():
    """A 0/1 box of 40 generators and room for 8 (about 10^8 points) with one row within 0.3
    of its least value: only the points at or below 0, found without enumerating the box; every
    random point of the box at or below 0 is among them."""
    rng = np.random.default_rng(0)
    g = 40
    region = _region(np.zeros(g), np.ones(g), np.full(g, 1.0), 8.0)
    a = rng.normal(size=(1, g))
    least = np.sort(np.minimum(a[0], 0.0))[:8].sum()
    c = np.array([-least - 0.3])
    got = region.points_below(a, c, cap=5000)
    assert got is not None and 0 < len(got) < 5000
    assert np.all(got @ a[0] + c[0] <= 1e-9) and np.all(got.sum(axis=1) <= 8)
    near = np.argsort(a[0])[:12]  # sample sets among the lowest values, where the few are
    picks = np.zeros((20000, g), np.int64)
    for row in picks:
        row[rng.choice(near, int(rng.integers(5, 9)), replace=False)] = 1
    below = picks[picks @ a[0] + c[0] <= 0]
    assert len(below) and {tuple(p) for p in below} <= {tuple(p) for p in got}


@pytest.mark.parametrize("seed", range(3))
def test_points_below_on_a_lattice_box_halves_it(seed):
    """A lattice box of 6 generators in [-4, 4] and a budget that binds (about 10^5 points):
    the halving route returns exactly the points some row leaves at or below 0."""
    rng = np.random.default_rng(seed)
    g = 6
    region = _region(np.full(g, -4), np.full(g, 4), np.full(g, 0.25), 4.0)
    a = rng.normal(size=(2, g))
    every = np.concatenate(list(region.enumerate()))
    at = every @ a.T
    c = np.full(2, -np.quantile(at.min(axis=1), 0.002))  # about 0.2% of the points below
    want = {tuple(p) for p in every[np.any(at + c <= 0, axis=1)]}
    got = region.points_below(a, c, cap=5000)
    assert got is not None and len(every) > 10**5 and 0 < len(want) < 5000
    assert {tuple(p) for p in got} == want


@pytest.mark.parametrize("seed", [s for s in range(40) if s % 2 == 1])
def test_sieve_decisions_agree_with_enumeration_and_their_proofs_check(seed):
    """Feature regions with a tiny enumeration limit, so leaves close by bounds or the sieve:
    certified only where enumeration finds no error; sieve leaves re-checked by the audit's
    own bounds and runtime runs."""
    chain, runtime, region, label = random_case(seed)
    _, bad = truth(runtime, region, label)
    d = decide(runtime, chain, region, label, timeout=20, use_smt=False, enum_limit=4)
    check_decision(d, runtime, region, label)
    if d.status == CERTIFIED and "proof" in d.detail:
        verdict = check_proof(from_text(d.detail["proof"]), problem(chain, runtime, region, label))
        assert verdict.status == CHECKED, verdict
        proof = decode(from_text(d.detail["proof"]))
        assert proof.leaves().get("sieve", 0) == d.detail["leaves"].get("sieve", 0)
    assert not bad.any() or d.status != CERTIFIED


def test_some_region_is_closed_by_the_sieve():
    """Among the random feature cases, the sieve closes leaves (the test above is not empty),
    and its audit re-check runs points on the runtime."""
    seen = 0
    for seed in range(1, 80, 2):
        chain, runtime, region, label = random_case(seed)
        d = decide(runtime, chain, region, label, timeout=20, use_smt=False, enum_limit=4)
        if d.status == CERTIFIED and d.detail["leaves"].get("sieve"):
            verdict = check_proof(
                from_text(d.detail["proof"]), problem(chain, runtime, region, label)
            )
            assert verdict.status == CHECKED and verdict.leaves.get("sieve"), verdict
            seen += 1
    assert seen >= 1


def _sub_boxes(region, rng, k=4):
    """The region's box and `k` random sub-boxes of it (each generator's range cut at random)."""
    out = [(region.lo.copy(), region.hi.copy())]
    for _ in range(k):
        lo, hi = region.lo.copy(), region.hi.copy()
        for g in rng.choice(len(lo), max(1, len(lo) // 3), replace=False):
            v = int(rng.integers(lo[g], hi[g] + 1))
            lo[g], hi[g] = (lo[g], v) if rng.random() < 0.5 else (v, hi[g])
        out.append((lo, hi))
    return out


def _boxes_with_margins():
    """(spec, root bounds, lo, hi, points, float32 runtime margins) of random sub-boxes of
    random cases (float32 specs; boxes with no point left out)."""
    for seed in range(24):
        chain, runtime, region, label = random_case(seed)
        spec = spec_chain(chain, region, label, float32=True)
        root = linear_bounds(spec, region.lo, region.hi, reuse=True)
        for lo, hi in _sub_boxes(region, np.random.default_rng(seed)):
            pts = np.concatenate([*region.enumerate(lo=lo, hi=hi), np.zeros((0, len(lo)), int)])
            if not len(pts):
                continue
            logits = runtime.predict(region.points(pts).astype(np.float32)).astype(np.float64)
            yield spec, root, lo, hi, pts, logits[:, [label]] - logits[:, spec.others]


def test_first_exact_margins_hold_at_every_point_and_beat_the_linear_bounds(monkeypatch):
    """`first_exact_margins` (the margins' rows back-substituted to the first ReLU, that ReLU
    at the first layer's exact output widened by its float32 rounding bound) is below the
    float32 runtime's margin at every point of the box, and no lower than the box's pointwise
    linear bounds: for a box's own bounds, a child's bounded with its parent and a child's
    provisional ones (`restricted`). Some cases' linear bounds leave points it proves. In both
    of its forms: `LIPSCHITZ_CHARGE` inf keeps the one-pass form (one ReLU less the rounding
    charge), 0 takes two ReLUs where that leaves a point at or below 0, and is no lower."""
    from verifier.engine import pointwise
    from verifier.engine.bounds import restricted
    from verifier.engine.pointwise import first_exact_margins

    checked = proved = tighter = 0
    for spec, root, lo, hi, pts, margins in _boxes_with_margins():
        rows = np.arange(len(spec.others))
        for b in (
            linear_bounds(spec, lo, hi),
            linear_bounds(spec, lo, hi, parent=root, reuse=True, open_only=True),
            restricted(spec, root, lo, hi, np.inf),
        ):
            forms = []
            for charge in (np.inf, 0.0):
                monkeypatch.setattr(pointwise, "LIPSCHITZ_CHARGE", charge)
                forms.append(first_exact_margins(spec, b, rows, pts))
            one, two = forms
            if one is None:  # a single affine layer: nothing to evaluate exactly
                assert two is None and len(spec.layers) < 3
                continue
            linear = pts @ b.coeffs.T + b.offsets
            finite = np.isfinite(b.offsets)
            for low in (one, two):
                assert np.all(low <= margins + 1e-9)
                assert np.all(low[:, finite] >= linear[:, finite] - 1e-9)
            assert np.all(two >= one - 1e-9)
            checked += 1
            proved += int(np.sum((one > 0) & (linear <= 0)))
            tighter += int(np.sum(two > one + 1e-12))
    assert checked > 0 and proved > 0 and tighter > 0


def test_pointwise_bounds_hold_at_every_point_of_the_box():
    """`pointwise_lower` is below the runtime's margin at every point of the box, for the
    root's bounds and for a child's bounded with its parent (`open_only`, reused rows); so the
    sieve keeps every misclassified point of a box (this fails when it claims more), and some
    cases have such points."""
    checked = 0
    for spec, root, lo, hi, pts, margins in _boxes_with_margins():
        region, threshold = spec.region, np.zeros(len(spec.others))
        bad = {tuple(p) for p in pts[np.any(margins <= 0, axis=1)]}
        for b in (
            linear_bounds(spec, lo, hi),
            linear_bounds(spec, lo, hi, parent=root, reuse=True, open_only=True),
        ):
            assert np.all(pointwise_lower(b, pts) <= margins + 1e-9)
            kept = sieved_points(region, Leaf(lo, hi, b), threshold, cap=10**6)
            if kept is not None:
                assert bad <= {tuple(p) for p in kept}
                checked += len(bad)
    assert checked > 0


def test_products_over_varying_columns_match_the_full_product():
    """The sieve's point products (`bounds._products`: the columns shared by every point taken
    once) equal `s @ a.T + const`, whether no, some or every column varies, for one point and
    none; `pointwise_lower` on some rows is its full answer's columns."""
    from verifier.engine.bounds import _products
    from verifier.engine.points import varying_columns

    rng = np.random.default_rng(3)
    a, const = rng.normal(size=(5, 9)), rng.normal(size=5)
    s = rng.integers(-2, 3, size=(40, 9))
    for fixed in ([], [0, 4, 8], list(range(9))):
        t = s.copy()
        t[:, fixed] = rng.integers(-2, 3, size=len(fixed))
        for pts in (t, t[:1], t[:0]):
            var = varying_columns(pts)
            assert set(var) <= set(range(9)) - (set(fixed) if len(pts) else set())
            assert np.allclose(_products(pts, a, const), pts @ a.T + const, atol=1e-12)
    spec, root, lo, hi, pts, _ = next(iter(_boxes_with_margins()))
    rows = np.array([0, len(spec.others) - 1])
    assert np.array_equal(pointwise_lower(root, pts, rows), pointwise_lower(root, pts)[:, rows])


class SlowRuntime(ChainRuntime):
    """The chain run 100 times a call (CPU-bound, as TFLite's 16x8 kernels on the MNIST CNN,
    25 times slower than its int8 ones), calls counted."""

    calls = 0

    def predict(self, x):
        self.calls += 1
        for _ in range(99):
            super().predict(x)
        return super().predict(x)


def test_point_seconds_is_measured_once_a_runtime():
    """A runtime's seconds a point: measured on its first use (slower for a slower runtime),
    then kept without running it again, and forgotten with the runtime."""
    chain, fast, region, _ = random_case(1)
    slow = SlowRuntime(chain, region.x.size)
    took = point_seconds(slow, region)
    calls = slow.calls
    assert took > 20 * point_seconds(fast, region)
    assert point_seconds(slow, region) == took and slow.calls == calls
    key = id(slow)
    del slow
    gc.collect()
    assert key not in points_module._SECONDS


def _few_open_points():
    """Random cases whose root bounds leave at least 2 points open, at most `SIEVE_POINTS`,
    in a region of more points (a box of at most `enum_limit` points runs up to that many):
    chain, runtime, region, label, the root leaf, the thresholds and those points."""
    for seed in range(1, 40, 2):
        chain, runtime, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        b = linear_bounds(spec, region.lo, region.hi)
        threshold = np.zeros(len(spec.others))
        leaf = Leaf(region.lo, region.hi, b)
        pts = sieved_points(region, leaf, threshold, SIEVE_POINTS)
        if pts is not None and len(pts) >= 2 and region.count(len(pts)) > len(pts):
            yield chain, runtime, region, label, leaf, threshold, pts


def test_a_slow_runtime_sieves_fewer_points_a_leaf(monkeypatch):
    """A box whose bounds leave a few points open is sieved on a fast runtime; on a slow one
    whose `SIEVE_SECONDS` pays for fewer points, it is split instead (nothing run)."""
    sieved = 0
    for chain, fast, region, label, leaf, threshold, pts in _few_open_points():
        limit = len(pts)
        slow = SlowRuntime(chain, region.x.size)
        # the slow runtime's sieve pays for about half of these points, the fast one's for all
        monkeypatch.setattr(bab, "SIEVE_SECONDS", point_seconds(slow, region) * len(pts) / 2)
        assert bab.SIEVE_SECONDS / point_seconds(fast, region) > len(pts)
        calls = slow.calls
        out = BabOutcome(UNKNOWN, "bab")
        assert settle_node(slow, region, label, leaf, threshold, limit, np.inf, out) is None
        assert slow.calls == calls and out.points == 0
        res = settle_node(fast, region, label, leaf, threshold, limit, np.inf, out)
        assert res is not None and res.route == "sieve" and res.points == len(pts)
        sieved += 1
    assert sieved >= 3


def test_pointwise_bounding_stops_where_it_spares_less_than_it_costs(monkeypatch):
    """Sieved points are bounded pointwise while the runs it spares cost more than the bounding
    (`PointwiseTally.pays`, from the first `POINTWISE_PROBE` points on); once it does not pay,
    `settle_node` no longer calls it and runs up to `RUN_SIEVE_POINTS` a leaf, where a bounded
    sieve would split at `SIEVE_POINTS`."""
    tally = bab.PointwiseTally(points=bab.POINTWISE_PROBE - 1, spared=0, seconds=1.0, runs=10)
    tally.run_seconds = 1e-3
    assert tally.pays()  # still probing
    tally.points += 1
    assert not tally.pays()  # spared nothing, at a cost
    tally.spared = bab.POINTWISE_PROBE  # each spared point's run: 1e-4 s, 2 s in all
    assert tally.pays()
    assert bab.PointwiseTally().pays()

    calls = []

    def useless(leaf, rows, pts, target):  # proves no point
        calls.append(len(pts))
        return None

    sieved = 0
    for _, runtime, region, label, leaf, threshold, pts in _few_open_points():
        limit = len(pts)
        monkeypatch.setattr(bab, "SIEVE_POINTS", len(pts) - 1)
        monkeypatch.setattr(bab, "RUN_SIEVE_POINTS", len(pts))
        monkeypatch.setattr(bab, "SIEVE_SECONDS", 1e6)
        out = BabOutcome(UNKNOWN, "bab")  # bounding pays so far: split at SIEVE_POINTS
        assert (
            settle_node(
                runtime, region, label, leaf, threshold, limit, np.inf, out, pointwise=useless
            )
            is None
        )
        assert not calls and out.points == 0
        out.pointwise = bab.PointwiseTally(bab.POINTWISE_PROBE, 0, 1.0, 10, 1e-3)
        res = settle_node(
            runtime, region, label, leaf, threshold, limit, np.inf, out, pointwise=useless
        )
        assert not calls and res is not None and res.route == "sieve" and res.points == len(pts)
        assert out.pointwise.runs == 10 + len(pts)
        monkeypatch.setattr(bab, "SIEVE_POINTS", len(pts))
        out = BabOutcome(UNKNOWN, "bab")
        res = settle_node(
            runtime, region, label, leaf, threshold, limit, np.inf, out, pointwise=useless
        )
        assert calls == [len(pts)] and res.points == len(pts)  # bounded, then all run
        assert out.pointwise.points == len(pts) and out.pointwise.spared == 0
        calls.clear()
        sieved += 1
    assert sieved >= 3


def _open_audit_cases(n: int):
    """Of the first `n` random cases, those the proof checker's own bounds over the whole box
    leave open: the problem, whether the region holds a misclassified point, the box's spec
    and those bounds."""
    from verifier.run.proofcheck import _node_bounds, _on_box

    for seed in range(n):
        chain, runtime, region, label = random_case(seed)
        _, bad = truth(runtime, region, label)
        p = problem(chain, runtime, region, label)
        spec = _on_box(p, None, region.lo, region.hi)
        b = _node_bounds(spec, region.lo, region.hi, None)
        if not np.all(b.lower > 0):
            yield p, bool(bad.any()), spec, b


def test_audit_sieve_leaf_takes_optimised_slopes_where_plain_ones_leave_too_many():
    """The proof checker's sieve leaf: where its plain bounds leave more points than it runs
    (`max_points`), its bounds with slopes optimised there leave fewer, and the leaf re-checks
    on those (robust regions); on a region holding a misclassified point the leaf never
    re-checks (the optimised bounds leave that point to the runtime, or the box is not
    checkable)."""
    from dataclasses import replace

    from verifier.run.proofcheck import Verdict, _back, _check_sieve

    rechecked = caught = 0
    for p, bad, spec, b in _open_audit_cases(60):
        region = p.region
        rows = np.eye(len(spec.others))[~(b.lower > 0)]
        a, c = _back(spec, b.pre, len(spec.layers), rows, np.zeros(len(rows)), cut=b.cut)
        plain = region.points_below(a, c, region.lo, region.hi, cap=region.count(10**7))
        if len(plain) < 2 or region.count(10**7) < len(plain):
            continue
        out = Verdict()
        failure = _check_sieve(
            region.lo, region.hi, None, replace(p, max_points=len(plain) - 1), out
        )
        if bad:
            assert failure is not None or out.unchecked
            caught += failure is not None
        elif out.leaves.get("sieve"):
            assert failure is None and out.points < len(plain)
            rechecked += 1
    assert rechecked >= 2 and caught >= 1


def test_audit_bounds_leaf_runs_the_points_its_bounds_leave_open():
    """The proof checker's bounds leaf its own bounds do not close, on a box with more points
    than it enumerates: the points its optimised bounds leave open run on the runtime, so the
    leaf re-checks on robust regions and never on a region holding a misclassified point."""
    from dataclasses import replace

    from verifier.run.proofcheck import Verdict, _check_bounds, _margins_at

    rechecked = caught = 0
    for p, bad, _, _ in _open_audit_cases(80):
        region = p.region
        at = float(np.min(_margins_at(p.spec, np.clip(0, region.lo, region.hi).astype(float))))
        count = region.count(10**7)
        if at <= 0 or count < 2:
            continue
        out = Verdict()
        failure = _check_bounds(
            at / 2, region.lo, region.hi, None, replace(p, max_points=count - 1), out
        )
        if bad:
            assert failure is not None or out.unchecked
            caught += failure is not None
        elif out.leaves.get("bounds"):
            assert failure is None and out.points < count
            rechecked += out.points > 0  # (0: its optimised bounds closed it)
    assert rechecked >= 2 and caught >= 1
