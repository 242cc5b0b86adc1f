"""The dynamic-range input quantization folded per region: sub-regions that cover the region,
the real runtime's logits within the folded model's bounds at every point, decisions that
agree with enumeration on the runtime, and their kept proofs re-checked on the fold's specs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx_builders import cnn_pool_nhwc, mlp
from test_diffbounds import float_then_quantized
from test_engine import all_points, check_decision

from quantize.error_model import error_model
from quantize.modes import float_runner, quantize_model
from verifier.engine.bounds import linear_bounds, point_interval, prepare_chain, rounding_errors
from verifier.engine.decide import decide
from verifier.engine.diffdecide import _folded_bounds, decide_from_float
from verifier.engine.dynamic_input import fold_first_input, split_for_fold
from verifier.engine.model import load_model
from verifier.engine.network import Affine
from verifier.engine.points import runtime_inputs
from verifier.engine.quantized_spec import fold_part_of, root_bounds
from verifier.engine.regions import feature_region, lattice_region
from verifier.engine.result import CERTIFIED

MODES = ["dynamic", "dynamic-per-tensor", "ort-dynamic"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-80-40-4 MLP, its dynamic-range runners, and inputs on the 1/255 grid (as images
    are) with a value at 1."""
    d = tmp_path_factory.mktemp("dyn")
    model = load_model(mlp(d / "mlp.onnx", sizes=(16, 80, 40, 4), seed=5))
    runners = {m: quantize_model(model, m, d, None) for m in MODES}
    rng = np.random.default_rng(2)
    xs = rng.integers(0, 256, (5, 16)) / 255.0
    xs[:, :2] = 1.0
    return model, runners, xs


def check_spec_holds(runner, qs, region, label: int):
    """The real runtime's logits lie within the quantized spec's interval at every point of the
    region, and its margins above the spec's linear bounds; returns those bounds."""
    pts = all_points(region)
    got = np.asarray(runner.predict(runtime_inputs(runner, region, pts)), np.float64)
    for s, g in zip(pts, got, strict=True):
        lo, hi = qs.interval(s)
        assert np.all(lo <= g) and np.all(g <= hi)
    m = (got[:, [label]] - got[:, qs.spec.others]).min(axis=0)
    b = linear_bounds(qs.spec, region.lo, region.hi)
    assert np.all(b.lower <= m)
    return b


def _regions(x: np.ndarray, seed: int):
    """Feature regions over every value (the values at 1 move: the scale may change), a
    lattice that leaves the values at 1 alone (several coefficient values per generator) and
    one that moves them (split per value)."""
    perm = np.random.default_rng(seed).permutation(16)
    yield feature_region(x, np.array_split(perm, 8), 0.125, 0.75)
    yield feature_region(x, np.array_split(perm, 8), 0.25, 1.0)
    yield lattice_region(x, np.array([3, 7, 11]), 0.125, 0.5)
    yield lattice_region(x, np.array([0, 1, 7]), 0.125, 0.25)


def test_sub_regions_cover_the_region(tiny):
    _, _, xs = tiny
    split = lattice = 0
    for i, x in enumerate(xs):
        for region in _regions(x, i):
            parts = split_for_fold(region)
            assert parts is not None
            got = np.concatenate([all_points(p) for p in parts])
            want = all_points(region)
            assert len(got) == len(want) == len(np.unique(got, axis=0))
            assert {tuple(s) for s in got} == {tuple(s) for s in want}
            split += len(parts) > 1
            lattice += region.family == "lattice" and len(parts) > 1  # split per value
    assert split and lattice


def _check_fold_holds(runner, em, part, folded) -> int:
    """The runtime's logits at every point of `part` within the model with its first layer's
    input rounding folded (`folded` = `fold_first_input(em, part)`); returns the number of
    points."""
    region_q, residual = folded
    out, inputs = rounding_errors(em.chain, part, rounding=em.rounding)
    inputs = [residual, *inputs[1:]]
    pts = all_points(part)
    got = np.asarray(runner.predict(runtime_inputs(runner, part, pts)), np.float64)
    for s, g in zip(pts, got, strict=True):
        lo, hi = point_interval(em.chain, (out, inputs), region_q.points(s[None])[0])
        assert np.all((g >= lo) & (g <= hi)), (s, g - lo, hi - g)
    return len(pts)


@pytest.mark.parametrize("mode", MODES)
def test_runtime_logits_within_the_folded_model(tiny, mode):
    """At every point of every sub-region the runtime's logits lie within the folded model's
    interval, which is narrower than the unfolded one on the first layer."""
    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, prepare_chain(model.network.lower()))
    checked = 0
    for i, x in enumerate(xs):
        for region in _regions(x, i):
            for part in split_for_fold(region):
                folded = fold_first_input(em, part)
                assert folded is not None
                step = rounding_errors(em.chain, part, rounding=em.rounding)[1][0]
                assert np.all(folded[1] <= step + 1e-12)  # within half a step
                checked += _check_fold_holds(runner, em, part, folded)
    assert checked > 200


def test_scale_that_may_change_is_not_folded(tiny):
    """Every value at the top movable within budget and no split: no fold."""
    model, runners, xs = tiny
    em = error_model(runners["dynamic"], prepare_chain(model.network.lower()))
    x = xs[0].copy()
    region = feature_region(x, [np.arange(16)], 0.125, 3.0)
    assert fold_first_input(em, region) is None
    assert len(split_for_fold(region)) == 2


def _float_decision(model, chain, region, x: np.ndarray):
    """The float model's label at `x` and its decision on `region` with the leaves kept, the
    sieve off so that it needs branch and bound (the fold's path)."""
    runner = float_runner(model)
    label = int(runner.predict(x[None].astype(np.float32)).argmax())
    fd = decide(
        runner, chain, region, label, timeout=30.0, enum_limit=4, keep_leaves=True, sieve=False
    )
    return label, fd


@pytest.mark.parametrize("mode", MODES)
def test_decisions_with_the_fold_agree_with_enumeration(tiny, mode):
    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    folds, split, kept, first, statuses = 0, 0, 0, 0, []
    for i, x in enumerate(xs):
        for region in _regions(x, i):
            label, fd = _float_decision(model, chain, region, x)
            if fd.status != CERTIFIED:
                continue
            proof = fd.detail.get("reuse")
            d = decide_from_float(
                runner, chain, region, label, proof, em, timeout=30.0, enum_limit=4
            )
            check_decision(d, runner, region, label)
            folds += "input_fold" in d.detail
            # folded after the whole region's bound (computed with the spec) left it open
            first += "input_fold" in d.detail and d.detail["root_margin"] <= 0
            split += d.detail.get("input_fold_open", 0) > 0  # split inside folded parts
            if d.status == CERTIFIED and "input_fold_open" in d.detail:
                kept += _check_folded_proof(d, em, runner, region, label)
            statuses.append(d.status)
    assert folds and split and kept and first and CERTIFIED in statuses


def test_folded_leaves_keep_their_rows(tiny):
    """The folded sub-regions left to branch and bound keep their back-substituted rows for
    their children, with the bounds their spec gives without keeping them (the better of
    those with and without its deeper cuts, `quantized_spec.root_bounds`)."""
    model, runners, xs = tiny
    em = error_model(runners["dynamic"], prepare_chain(model.network.lower()))
    region = next(iter(_regions(xs[2], 2)))
    label = int(float_runner(model).predict(xs[2:3].astype(np.float32)).argmax())
    folded = _folded_bounds(runners["dynamic"], em, region, label, np.zeros(3), {}, 1e18)
    assert folded is not None and folded[1]
    for leaf in folded[1]:
        plain = root_bounds(fold_part_of(folded[0], leaf.lo, leaf.hi).spec, leaf.lo, leaf.hi)
        assert leaf.bounds.queries and np.array_equal(leaf.bounds.lower, plain.lower)
        assert np.array_equal(leaf.bounds.coeffs, plain.coeffs)


def test_nodes_bounded_on_their_parts_narrowed_spec(tiny, monkeypatch):
    """Each branch-and-bound node inside a folded sub-region is bounded on that sub-region's
    spec narrowed on its parent's ReLU bounds, with its parent's rows (the spec is built once
    per parent, for both of its children)."""
    import verifier.engine.diffdecide as dd
    from verifier.engine.diffbounds import reused_parent
    from verifier.engine.quantized_spec import fold_parts, input_levels, narrow_inputs

    model, runners, xs = tiny
    runner = runners["ort-dynamic"]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    levels = input_levels(em)
    node, seen, parts = [], [], []  # the parent of the node being bounded; specs checked
    babs = dd.branch_and_bound

    def with_parents(*args, **kw):
        def bound(lo, hi, parent):
            node[:] = [parent]
            return args[4](lo, hi, parent)

        return babs(*args[:4], bound, *args[5:], **kw)

    def checked(spec, lo, hi, *, parent=None, **kw):
        if node:  # a node of branch and bound: its true parent's narrowed spec and rows
            want = narrow_inputs(fold_part_of(parts[0], lo, hi).spec, levels, node[0].pre)
            for a, b in zip(spec.in_err, want.in_err, strict=True):
                assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))
            layers = zip(spec.layers, want.layers, strict=True)
            assert all(np.array_equal(a.bias, b.bias) for a, b in layers if hasattr(a, "bias"))
            mine = reused_parent(node[0])
            assert parent.pre is mine.pre and parent.queries is mine.queries
            seen.append(1)
        return linear_bounds(spec, lo, hi, parent=parent, **kw)

    monkeypatch.setattr(dd, "branch_and_bound", with_parents)
    monkeypatch.setattr(dd, "linear_bounds", checked)
    folded = 0  # nodes bounded inside folded sub-regions
    for i, x in enumerate(xs):  # two regions each; which need nodes depends on the runtime
        perm = np.random.default_rng(i).permutation(16)
        for region in (
            next(iter(_regions(x, i))),
            feature_region(x, np.array_split(perm, 8), 0.25, 2.0),
        ):
            label, fd = _float_decision(model, chain, region, x)
            parts[:] = [fold_parts(em, region, label)]
            node.clear()
            if fd.status != CERTIFIED:
                continue
            before = len(seen)
            d = decide_from_float(
                runner, chain, region, label, fd.detail.get("reuse"), em, timeout=30.0, enum_limit=4
            )
            check_decision(d, runner, region, label)
            if d.detail.get("input_fold"):
                folded += len(seen) - before
    assert folded >= 10, "too few nodes bounded inside folded sub-regions"


@pytest.mark.parametrize("mode", MODES)
def test_lattice_moving_every_top_value(tiny, mode):
    """Three values at 1 each moved over five lattice values, the next largest value fixed:
    one sub-region per generator at the top and one with all of them below it (not one per
    value: 4 where a split per value needs 85). They cover the region, each fixes the scale,
    the runtime's logits lie within each folded model at every point, and the decision agrees
    with enumeration (its proof re-checks when certified through the fold)."""
    from verifier.engine.proof import Cover

    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    x = np.minimum(xs[1], 0.8)
    x[:3], x[3] = 1.0, 0.9
    region = lattice_region(x, np.array([0, 1, 2]), 0.25, 3.0)
    parts = split_for_fold(region, 16, Cover())
    assert parts is not None and len(parts) == 4
    got_pts = np.concatenate([all_points(p) for p in parts])
    assert len(got_pts) == len(all_points(region)) == len(np.unique(got_pts, axis=0)) == 125
    for part in parts:
        folded = fold_first_input(em, part)
        assert folded is not None
        out, inputs = rounding_errors(em.chain, part, rounding=em.rounding)
        pts = all_points(part)
        got = np.asarray(runner.predict(runtime_inputs(runner, part, pts)), np.float64)
        for s, g in zip(pts, got, strict=True):
            x_q = folded[0].points(s[None])[0]
            lo, hi = point_interval(em.chain, (out, [folded[1], *inputs[1:]]), x_q)
            assert np.all((g >= lo) & (g <= hi))
    label = int(float_runner(model).predict(x[None].astype(np.float32)).argmax())
    fd, d = float_then_quantized(model, runner, em, chain, region, label, 4)
    assert fd.status == CERTIFIED
    check_decision(d, runner, region, label)
    assert d.detail["input_fold"] == "4 sub-regions" and d.status == CERTIFIED
    _check_folded_proof(d, em, runner, region, label)


def _check_folded_proof(d, em, runner, region, label: int) -> int:
    """A certificate through the fold keeps a proof with a `fold` node per sub-region: it
    re-checks on the sub-regions' specs (as the audit rebuilds them), not on the region's
    spec alone, and fails with a leaf's evidence raised (margin or point count) or a split
    removed."""
    from verifier.engine.proof import FOLD, SPLIT, Node, decode, from_text
    from verifier.engine.quantized_spec import (
        fold_part_of,
        fold_parts,
        input_levels,
        quantized_spec,
    )
    from verifier.run.proofcheck import CHECKED, FAILED, Problem, check_tree

    proof = decode(from_text(d.detail["proof"]))
    assert proof.spec == "error-model" and any(n.kind == FOLD for n in proof.nodes)
    parts = fold_parts(em, region, label)
    spec = quantized_spec(em, region, label).spec
    problem = Problem(region, label, runner, spec, levels=input_levels(em))  # as the audit
    folded = replace(
        problem, fold=lambda lo, hi: getattr(fold_part_of(parts, lo, hi), "spec", None)
    )
    assert check_tree(proof, folded).status == CHECKED
    assert check_tree(proof, problem).status == FAILED  # no fold specs: fold nodes fail
    nodes = list(proof.nodes)
    i = next((i for i, n in enumerate(nodes) if n.kind in ("bounds", "enumeration")), None)
    if i is not None:  # else sieve leaves only: their count of points run is not evidence
        raised = Node(nodes[i].kind, (nodes[i].values[0] + 1000,))  # a margin or a point count
        bad = (*nodes[:i], raised, *nodes[i + 1 :])
        assert check_tree(replace(proof, nodes=bad), folded).status == FAILED
    i = next(i for i, n in enumerate(nodes) if n.kind == SPLIT)
    cut = (*nodes[:i], *nodes[i + 1 :])
    assert check_tree(replace(proof, nodes=cut), folded).status == FAILED
    return 1


@pytest.mark.parametrize("mode", MODES)
def test_one_layer_logits_within_the_folded_model(tiny, tmp_path, mode):
    """One hybrid layer (its input quantization, and for ONNX Runtime its kernel's pair sums,
    are all the runtime rounds): at every point the logits lie within the quantized spec's
    interval on each sub-region (the input scale and the pair sums folded), a few float32
    roundings wide."""
    from verifier.engine.quantized_spec import quantized_spec

    _, _, xs = tiny
    model = load_model(mlp(tmp_path / "one.onnx", sizes=(16, 80), seed=7))
    runner = quantize_model(model, mode, tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    assert em.rounding[0].dynamic_input
    for i, x in enumerate(xs):
        for region in _regions(x, i):
            for part in split_for_fold(region):
                qs = quantized_spec(em, part, 0)
                assert qs.region is not part  # folded
                wide = rounding_errors(em.chain, part, rounding=em.rounding)
                pts = all_points(part)
                got = np.asarray(runner.predict(runtime_inputs(runner, part, pts)), np.float64)
                for s, g in zip(pts, got, strict=True):
                    lo, hi = qs.interval(s)
                    assert np.all((g >= lo) & (g <= hi)), (s, (g - lo).min(), (hi - g).min())
                    w_lo, w_hi = point_interval(em.chain, wide, part.points(s[None])[0])
                    assert np.max(hi - lo) < 0.5 * np.max(w_hi - w_lo)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A 16-80-40-4 MLP quantized with a fixed input grid (TFLite int8, ONNX Runtime QDQ)
    calibrated on inputs in [0.1, 0.9], and inputs on the 1/255 grid with values at 0 and 1:
    past the grid's ends (the input clamp)."""
    d = tmp_path_factory.mktemp("grid")
    model = load_model(mlp(d / "mlp.onnx", sizes=(16, 80, 40, 4), seed=5, gemm=False))
    rng = np.random.default_rng(4)
    calib = 0.1 + 0.8 * rng.random((128, 16), dtype=np.float32)
    runners = {m: quantize_model(model, m, d, calib) for m in ("int8", "ort-qdq")}
    xs = rng.integers(0, 256, (4, 16)) / 255.0
    xs[:, :2] = [0.0, 1.0]
    return model, runners, xs


@pytest.mark.parametrize("mode", ["int8", "ort-qdq"])
def test_fixed_input_grid_fold_is_sound(fixed, mode):
    """The fixed input grid folded into the region (exact for two-valued generators and the
    clamp at the grid's ends; the largest rounding for lattices): the real runtime's logits
    lie within the folded spec's interval at every point, its margin bounds below every
    runtime margin, and the folded input is narrower than half a step per value. Queries
    charge what is left of the input rounding both ways (per neuron where it is small,
    `bounds._small_first_input`, else through back-substitution)."""
    from verifier.engine.bounds import _small_first_input
    from verifier.engine.dynamic_input import fold_input_grid
    from verifier.engine.quantized_spec import quantized_spec

    model, runners, xs = fixed
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    folded = regions = 0
    charged = set()
    for i, x in enumerate(xs):
        for region in [*_regions(x, i), _past_the_ends(x)]:
            regions += 1
            fold = fold_input_grid(em, region)
            assert fold is not None
            step = em.rounding[0].input_grid or em.rounding[0].inputs[0].grid
            exact = region.hi - region.lo <= 1
            if np.all(exact):
                assert np.all(fold[1] < 0.01 * step.scale)
            label = int(runner.predict(x[None].astype(np.float32)).argmax())
            qs = quantized_spec(em, region, label)
            folded += qs.region is not region
            b = check_spec_holds(runner, qs, region, label)
            charged.add(_small_first_input(qs.spec, b.pre))
    assert folded == regions
    assert charged == {True, False}


def test_first_input_charge_bounds_the_exact_one(fixed):
    """The first layer's input rounding charged to margin rows: never less than the exact
    |lam W| . step; per neuron on the rows where that costs at most `CHEAP_CHARGE`, exactly on
    the others (a row scaled up, or a step as wide as the first layer's output ranges)."""
    from verifier.engine.bounds import CHEAP_CHARGE, first_input_charge
    from verifier.engine.quantized_spec import quantized_spec

    model, runners, xs = fixed
    em = error_model(runners["ort-qdq"], model.network.lower())
    region = next(_regions(xs[0], 0))
    spec = quantized_spec(em, region, 0).spec
    assert spec.first_input is not None
    pre = linear_bounds(spec, region.lo, region.hi).pre
    w0, step, per_neuron = spec.first_input
    lam = np.random.default_rng(3).normal(size=(6, w0.shape[0]))
    cheap = np.abs(lam) @ per_neuron
    lam[0] *= 2.0 * CHEAP_CHARGE / cheap[0]  # this row's per-neuron charge is too dear
    cheap, exact = np.abs(lam) @ per_neuron, np.abs(lam @ w0) @ step
    assert cheap[0] > CHEAP_CHARGE and np.all(cheap[1:] <= CHEAP_CHARGE)
    got = first_input_charge(spec, lam)
    assert np.all(got >= exact - 1e-15)
    assert np.isclose(got[0], exact[0], rtol=1e-12, atol=0) and exact[0] < cheap[0]
    assert np.allclose(got[1:], cheap[1:])
    wide = np.full_like(step, 10.0 * float(np.max(pre[1][1] - pre[1][0])))
    coarse = replace(spec, first_input=(w0, wide, np.abs(w0) @ wide))
    assert np.allclose(first_input_charge(coarse, lam), np.abs(lam @ w0) @ wide)


def _past_the_ends(x: np.ndarray, step: float = 0.125, radius: float = 0.5):
    """A lattice moving the values at 0 and 1 (and one more)."""
    return lattice_region(x, np.array([0, 1, 5]), step, radius)


def test_fold_matches_the_grid(fixed):
    """At every point the folded input lies within its residual of the grid's rounding and
    clamp of the input; a fold that ignores the clamp (values past the grid's ends kept as
    they are) does not."""
    from dataclasses import replace as dc_replace

    from quantize.rounding import Grid
    from verifier.engine.dynamic_input import fold_input_grid

    model, runners, xs = fixed
    em = error_model(runners["int8"], model.network.lower())
    r0 = em.rounding[0]
    g = r0.input_grid
    wide = Grid(g.scale, g.lo - 1.0, g.hi + 1.0)
    wrong = dc_replace(em, rounding=[dc_replace(r0, input_grid=wide), *em.rounding[1:]])
    misses = {"right": 0, "wrong": 0}
    for i, x in enumerate(xs):
        for region in [*_regions(x, i), _past_the_ends(x)]:
            pts = all_points(region)
            v = region.points(pts)
            want = np.clip(np.round(v / g.scale), round(g.lo / g.scale), round(g.hi / g.scale))
            for name, m in (("right", em), ("wrong", wrong)):
                region_q, residual = fold_input_grid(m, region)
                off = np.abs(region_q.points(pts) - want * g.scale)
                misses[name] += int(np.sum(off > residual + 1e-9))
    assert misses["right"] == 0 and misses["wrong"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_quantized_spec_folds_a_fixed_scale(tiny, mode):
    """Where the run-time scale is the same at every point, the quantized spec itself is
    folded (so every bound of the decision uses it), and the real runtime's logits and margins
    lie within its bounds at every point; elsewhere it is not folded."""
    from verifier.engine.quantized_spec import quantized_spec

    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    kinds = set()
    for i, x in enumerate(xs):
        for region in _regions(x, i):
            label = int(runner.predict(x[None].astype(np.float32)).argmax())
            qs = quantized_spec(em, region, label)
            folded = qs.region is not region
            assert folded == (fold_first_input(em, region) is not None)
            kinds.add(folded)
            check_spec_holds(runner, qs, region, label)
    assert kinds == {True, False}


@pytest.mark.parametrize("mode", MODES)
def test_inputs_narrowed_on_a_box_hold_at_every_point(tiny, mode):
    """A branch-and-bound grandchild's bounds with the hidden layers' run-time input rounding
    bounded on its parent's box (`quantized_spec.narrow_inputs`: exact where the ReLU is off,
    the scale's bound on the box) lie below the runtime's margins at every point of it, and
    are tighter than the region's somewhere; the runtime's logits lie within the interval
    those roundings give at each point."""
    from verifier.engine.bab import Leaf, split
    from verifier.engine.quantized_spec import (
        input_levels,
        input_moves,
        narrow_inputs,
        quantized_spec,
    )

    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, prepare_chain(model.network.lower()))
    levels = input_levels(em)
    assert levels is not None and levels[0] is None and levels[2] is not None
    tighter = checked = 0
    for i, x in enumerate(xs[:3]):
        label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
        region = list(_regions(x, i))[2]  # the top value stays: the first layer is folded
        qs = quantized_spec(em, region, label)
        spec, zero = qs.spec, np.zeros(len(qs.spec.others))
        root = linear_bounds(spec, region.lo, region.hi)
        for lo, hi in split(Leaf(region.lo, region.hi, root), zero):
            up = linear_bounds(spec, lo, hi, parent=root)
            for glo, ghi in split(Leaf(lo, hi, up), zero):
                pts = np.concatenate(list(region.enumerate(lo=glo, hi=ghi)))
                got = np.asarray(runner.predict(runtime_inputs(runner, region, pts)), np.float64)
                m = (got[:, [label]] - got[:, spec.others]).min(axis=0)
                plain = linear_bounds(spec, glo, ghi, parent=up)
                b = linear_bounds(narrow_inputs(spec, levels, up.pre), glo, ghi, parent=up)
                assert np.all(b.lower <= m + 1e-9), (b.lower, m)
                tighter += bool(np.any(b.lower > plain.lower + 1e-9))
                steps = [qs.errors[1][0], *narrow_inputs(spec, levels, up.pre).in_err[1:]]
                shifts = [m and m[0] for m in input_moves(spec, levels, up.pre)]
                assert _outside(runner, qs, region, pts, steps, shifts) == 0
                checked += 1
    assert checked and tighter


def _outside(runner, qs, region, pts: np.ndarray, steps: list, shifts=None) -> int:
    """How many points' runtime logits leave the interval of `qs`'s chain and output bounds
    with input roundings `steps` about the moves `shifts` (per layer, None: 0)."""
    got = np.asarray(runner.predict(runtime_inputs(runner, region, pts)), np.float64)
    chain = qs.chain
    if shifts is not None:  # each input value moved by its shift: the layer's bias by W shift
        layers = [
            x if m is None else Affine(x.weight, x.bias + x.weight @ m)
            for x, m in zip(chain.layers, shifts, strict=True)
        ]
        chain = replace(chain, layers=layers)
    bad = 0
    for s, g in zip(pts, got, strict=True):
        lo, hi = point_interval(chain, (qs.errors[0], steps), qs.region.points(s[None])[0])
        bad += int(not np.all((g >= lo) & (g <= hi)))
    return bad


def test_narrowed_rounding_keeps_a_coherent_loss(tmp_path):
    """ORT dynamic on `coherent_mlp`, whose hidden values all round down at run time (logit 0
    loses 0.0123): its hidden input rounding narrowed on the region's own bounds holds the
    runtime's logits at every point, and its margin above the narrowed spec's bound. The
    hidden values and their scale are fixed on the region, so each value's move is known
    (`quantized_spec.grid_moves`): that bound is within 3e-4 of the margin (half a step
    either way left it 0.0034 below), and with the moves' sign turned it lies above the
    margin. Narrowed as if every ReLU were off (no hidden rounding), logit 0 leaves the
    interval everywhere."""
    from onnx_builders import coherent_mlp

    from verifier.engine.quantized_spec import (
        input_levels,
        input_moves,
        narrow_inputs,
        quantized_spec,
    )

    model = load_model(coherent_mlp(tmp_path / "c.onnx"))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    region = lattice_region(np.array([1.0, 0.5, 0.5, 0.5]), np.array([1, 2, 3]), 1 / 255, 2 / 255)
    qs = quantized_spec(em, region, 0)
    levels = input_levels(em)
    assert levels is not None and levels[2] == 255.0
    b = linear_bounds(qs.spec, region.lo, region.hi)
    off = [None if p is None else (p[0], np.full_like(p[1], -1.0)) for p in b.pre]
    pts = all_points(region)
    narrowed = narrow_inputs(qs.spec, levels, b.pre)
    moves = input_moves(qs.spec, levels, b.pre)
    steps, shifts = [qs.errors[1][0], *narrowed.in_err[1:]], [m and m[0] for m in moves]
    assert _outside(runner, qs, region, pts, steps, shifts) == 0
    got = np.asarray(runner.predict(runtime_inputs(runner, region, pts)), np.float64)
    margins = got[:, 0] - got[:, 1]
    low = linear_bounds(narrowed, region.lo, region.hi).lower[0]
    assert low <= margins.min() < low + 3e-4
    shift = moves[2][0]
    layer = qs.spec.layers[2]  # the moves' sign turned
    layers = [*qs.spec.layers[:2], Affine(layer.weight, layer.bias - layer.weight @ shift)]
    turned = replace(qs.spec, layers=[*layers, *qs.spec.layers[3:]], in_err=narrowed.in_err)
    assert linear_bounds(turned, region.lo, region.hi).lower[0] > margins.max()
    none = [qs.errors[1][0], *narrow_inputs(qs.spec, levels, off).in_err[1:]]
    assert _outside(runner, qs, region, pts, none) == len(pts)


def test_first_layer_hybrid_conv_fold_is_sound(tmp_path):
    """A first-layer hybrid CONV_2D with per-channel weights quantizes its input per image,
    asymmetrically, so its input rounding is folded as a hybrid FULLY_CONNECTED's is: in each
    sub-region of fixed scale the real runtime's logits lie within the folded model's interval
    at every point, and the quantized spec folds the regions whose scale cannot change."""
    from verifier.engine.quantized_spec import quantized_spec

    model = load_model(cnn_pool_nhwc(tmp_path / "cnn.onnx"))
    runner = quantize_model(model, "dynamic", tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    assert em.rounding[0].dynamic_input and not em.rounding[0].symmetric_input
    rng = np.random.default_rng(3)
    xs = rng.integers(0, 256, (3, 48)) / 255.0
    xs[:, :2] = 1.0
    checked, folded = 0, set()
    for i, x in enumerate(xs):
        perm = np.random.default_rng(i).permutation(48)
        regions = [
            feature_region(x, np.array_split(perm, 8), 0.125, 0.5),
            lattice_region(x, np.array([5, 17, 30]), 0.125, 0.5),
            lattice_region(x, np.array([0, 9, 40]), 0.125, 0.25),
        ]
        for region in regions:
            label = int(runner.predict(x[None].astype(np.float32).reshape(1, 4, 4, 3)).argmax())
            folded.add(quantized_spec(em, region, label).region is not region)
            for part in split_for_fold(region):
                checked += _check_fold_holds(runner, em, part, fold_first_input(em, part))
    assert checked > 200 and True in folded


def test_fold_residual_is_the_largest_rounding_per_value():
    """`dynamic_input._fold` on a lattice of several coefficient values per generator: each
    moved value keeps the largest rounding over its own generator's coefficients (plus the
    float32 slack), half a step where one of them sits at a tie."""
    from verifier.engine.dynamic_input import SLACK, _fold, _rounding

    rng = np.random.default_rng(5)
    x = rng.integers(0, 60, 16) / 255.0
    region = lattice_region(x, np.array([1, 4, 6, 9, 12]), 0.125, 0.25)
    scale, half = 1.0, 0.5  # coarse: the rounding grows with the coefficient
    assert np.any(region.hi - region.lo > 1)
    folded, residual = _fold(region, lambda v: _rounding(v, scale), half, scale)
    for g in np.flatnonzero(region.hi - region.lo > 1):
        for i in np.flatnonzero(region.directions[g]):
            c = np.arange(region.lo[g], region.hi[g] + 1)
            e, fine = _rounding(x[i] + c * region.directions[g, i], scale)
            want = np.abs(e).max() + SLACK * scale if fine.all() else half
            assert residual[i] == want


def _pinned_checks(
    em, runner, region, label: int, level_of=None, per_point=True
) -> tuple[int, int, int]:
    """On each folded sub-region (or the region), the sieve's pointwise bounds at every point
    with the second layer's run-time input rounding taken at the point (`levels`, `per_point`
    as for a runtime that runs one point per call) and without: (points where the pinned bound
    exceeds the runtime's margin, points where it is tighter than without, points).
    `level_of`: a wrong level in place of the model's (the check must catch it)."""
    from verifier.engine import pointwise
    from verifier.engine.pointwise import first_exact_margins
    from verifier.engine.quantized_spec import fold_parts, input_levels, quantized_spec

    levels = input_levels(em)
    parts = fold_parts(em, region, label) or [(region, quantized_spec(em, region, label))]
    over = tighter = total = 0
    with pytest.MonkeyPatch.context() as m:
        if level_of is not None:
            real = pointwise._pinned_level  # the second layer's level only (forward keeps its)
            m.setattr(
                pointwise,
                "_pinned_level",
                lambda spec, levels, k=2: level_of if k == 2 else real(spec, levels, k),
            )
        for part, qs in parts:
            spec = qs.spec
            pts = all_points(part)
            got = np.asarray(runner.predict(runtime_inputs(runner, part, pts)), np.float64)
            margins = got[:, [label]] - got[:, spec.others]
            b = linear_bounds(spec, part.lo, part.hi)
            rows = np.arange(len(spec.others))
            plain = first_exact_margins(spec, b, rows, pts, np.inf)
            pinned = first_exact_margins(spec, b, rows, pts, np.inf, levels, per_point)
            over += int(np.sum(np.any(pinned > margins, axis=1)))
            tighter += int(np.sum(np.any(pinned > plain + 1e-9, axis=1)))
            total += len(pts)
    return over, tighter, total


@pytest.mark.parametrize("mode", MODES)
def test_second_input_rounding_taken_at_each_point(tiny, tmp_path, mode):
    """Where the second layer's input is quantized at run time on a scale the file fixes as
    asymmetric (ONNX Runtime's dynamic uint8 always), the sieve's pointwise bounds take that
    rounding at each point: below the runtime's margins at every point of every region, and
    tighter than the per-value charge at most; on a runtime that runs points in batches, not
    where every value moves among the points (feature regions). With one hidden layer (that
    rounding nearly all the bound leaves out) a grid four times too fine is caught."""
    from verifier.engine.quantized_spec import input_levels

    model, runners, xs = tiny
    one = load_model(mlp(tmp_path / "one.onnx", sizes=(16, 80, 4), seed=7))
    for net, runner in ((model, runners[mode]), (one, quantize_model(one, mode, tmp_path, None))):
        em = error_model(runner, prepare_chain(net.network.lower()))
        levels = input_levels(em)
        pinned = levels is not None and levels[2] == 255.0
        assert pinned or mode != "ort-dynamic"
        over = tighter = total = wrong = 0
        for i, x in enumerate(xs):
            for region in _regions(x, i):
                label = int(runner.predict(x[None].astype(np.float32)).argmax())
                o, t, n = _pinned_checks(em, runner, region, label)
                over, tighter, total = over + o, tighter + t, total + n
                if pinned and net is one:
                    wrong += _pinned_checks(em, runner, region, label, 4 * 255.0)[0]
                if region.family == "features" and pinned:  # all move but in 1-point parts
                    few = _pinned_checks(em, runner, region, label, per_point=False)[1]
                    assert few <= t // 4
        assert over == 0 and total > 1000
        assert tighter > total // 2 if pinned else tighter == 0
        assert wrong > 0 or not (pinned and net is one)


def test_second_input_rounding_at_each_point_on_a_cnn(tmp_path, monkeypatch):
    """The CNN's second convolution (ONNX Runtime dynamic): lattice regions move a few pixels,
    so most first-convolution outputs are the same at every point and are taken once per
    distinct scale (one scale for all points, or several when a moving value may hold the
    largest); the bounds stay below the runtime's margins at every point."""
    from onnx_builders import cnn_hidden_hybrid_nhwc

    from verifier.engine import pointwise

    model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "cnn.onnx", seed=2))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    scales = []  # groups of points the values no moving generator moves were taken for
    point_scales = pointwise._Values.scales

    def seen(values, level):
        out = point_scales(values, level)
        scales.append(len(out[3]))
        return out

    monkeypatch.setattr(pointwise._Values, "scales", seen)
    rng = np.random.default_rng(4)
    over = tighter = total = 0
    for x in rng.integers(0, 128, (4, 64)) / 255.0:
        x[36:40] = x[44:48] = 1.0  # a bright patch: its outputs hold the largest value
        label = int(runner.predict(x.reshape(1, 8, 8, 1).astype(np.float32)).argmax())
        for pos in ([0, 1, 8], [36, 45, 46]):  # the second moves the patch
            region = lattice_region(x, np.array(pos), 0.125, 0.75)
            o, t, n = _pinned_checks(em, runner, region, label)
            over, tighter, total = over + o, tighter + t, total + n
    assert over == 0 and total > 1000 and tighter > total // 2
    assert min(scales) == 1 and max(scales) > 1


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_forward_margins_hold_at_every_point(tiny, tmp_path, monkeypatch, net):
    """Intervals carried forward through the whole spec at each point, every run-time quantized
    input on its grid at the point (ONNX Runtime dynamic: the second and third layers' inputs):
    below the runtime's margins at every point, at least the sieve's first-layer bounds at most
    points (no relaxation left), and a grid eight times too coarse is caught."""
    from onnx_builders import cnn_hidden_hybrid_nhwc

    from verifier.engine import pointwise
    from verifier.engine.pointwise import first_exact_margins, forward_margins
    from verifier.engine.quantized_spec import fold_parts, input_levels, quantized_spec

    if net == "mlp":
        model, xs = tiny[0], tiny[2]
    else:
        model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "cnn.onnx", seed=2))
        xs = np.random.default_rng(4).integers(0, 256, (4, 64)) / 255.0
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    levels = input_levels(em)
    assert sum(v == 255.0 for v in levels) == 2
    on_grid = pointwise._Values.on_grid

    def too_coarse(values, level):
        return on_grid(values, level / 8)

    over = tighter = total = wrong = 0
    for i, x in enumerate(xs):
        label = int(runner.predict(x.reshape(1, *runner.input_shape).astype(np.float32)).argmax())
        regions = _regions(x, i) if net == "mlp" else [lattice_region(x, [5, 20, 42], 0.125, 0.75)]
        for region in regions:
            parts = fold_parts(em, region, label) or [(region, quantized_spec(em, region, label))]
            for part, qs in parts:
                spec, rows = qs.spec, np.arange(len(qs.spec.others))
                pts = all_points(part)
                got = np.asarray(runner.predict(runtime_inputs(runner, part, pts)), np.float64)
                margins = got[:, [label]] - got[:, spec.others]
                ahead = forward_margins(spec, rows, pts, levels)
                plain = first_exact_margins(spec, linear_bounds(spec, part.lo, part.hi), rows, pts)
                over += int(np.sum(np.any(ahead > margins, axis=1)))
                tighter += int(np.sum(np.all(ahead >= plain, axis=1)))
                total += len(pts)
                with monkeypatch.context() as m:
                    m.setattr(pointwise._Values, "on_grid", too_coarse)
                    bad = forward_margins(spec, rows, pts, levels)
                wrong += int(np.sum(np.any(bad > margins, axis=1)))
    assert over == 0 and total > 300
    assert tighter > total // 2 and wrong > 0


def test_cnn_decisions_through_points_taken_at_each_point(tmp_path, monkeypatch):
    """ONNX Runtime dynamic on the CNN, lattice regions, a small enum limit: the quantized
    decisions agree with enumeration on the runtime, and the sieve's points went through the
    run-time rounding taken at each point and the forward intervals."""
    from onnx_builders import cnn_hidden_hybrid_nhwc

    from verifier.engine import pointwise

    model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "cnn.onnx", seed=2))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    calls = {"pinned": 0, "forward": 0}
    pinned, forward = pointwise._pinned_second_input, pointwise.forward_margins

    def counted(name, f):
        def run(*args, **kw):
            out = f(*args, **kw)
            calls[name] += out is not None
            return out

        return run

    monkeypatch.setattr(pointwise, "_pinned_second_input", counted("pinned", pinned))
    monkeypatch.setattr(pointwise, "forward_margins", counted("forward", forward))
    rng = np.random.default_rng(7)
    certified = 0
    for x in rng.integers(0, 128, (12, 64)) / 255.0:
        x[36:40] = x[44:48] = 1.0
        region = lattice_region(x, np.array([0, 1, 8, 9]), 0.125, 0.5)
        label = int(float_runner(model).predict(x.reshape(1, 8, 8, 1).astype(np.float32)).argmax())
        fd, d = float_then_quantized(model, runner, em, chain, region, label, 8)
        if d is None:
            continue
        check_decision(d, runner, region, label)
        certified += d.status == CERTIFIED
    assert certified >= 5 and calls["pinned"] > 0 and calls["forward"] > 0


def _cnn_lattice_leaf(tmp_path):
    """The CNN's ORT dynamic copy on a small lattice region: (spec, its bounds over the region,
    every point, the margin rows, the copy's run-time input levels)."""
    from onnx_builders import cnn_hidden_hybrid_nhwc

    from verifier.engine.quantized_spec import input_levels, quantized_spec

    model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "cnn.onnx", seed=2))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, prepare_chain(model.network.lower()))
    x = np.random.default_rng(5).integers(0, 128, 64) / 255.0
    label = int(runner.predict(x.reshape(1, 8, 8, 1).astype(np.float32)).argmax())
    region = lattice_region(x, np.array([0, 1, 8]), 0.125, 0.5)
    spec = quantized_spec(em, region, label).spec
    b = linear_bounds(spec, region.lo, region.hi)
    return spec, b, all_points(region), np.arange(len(spec.others)), input_levels(em)


def test_points_bounded_in_chunks_as_at_once(tmp_path, monkeypatch):
    """`first_exact_margins` holds at most POINT_VALUES first-layer values at once: the points in
    chunks of 7 get the bounds they get all at once (every pass, the run-time rounding ones
    included), but for the order of float64 sums."""
    from verifier.engine import pointwise

    spec, b, pts, rows, levels = _cnn_lattice_leaf(tmp_path)
    whole = pointwise.first_exact_margins(spec, b, rows, pts, np.inf, levels, True)
    monkeypatch.setattr(pointwise, "POINT_VALUES", 7 * np.count_nonzero(b.pre[1][1] > 0.0))
    chunked = pointwise.first_exact_margins(spec, b, rows, pts, np.inf, levels, True)
    assert len(pts) > 20 and np.allclose(whole, chunked, rtol=0.0, atol=1e-9)


def test_a_lost_bound_at_a_point_proves_nothing(tmp_path, monkeypatch):
    """A per-point pass whose bound is lost (NaN: an overflow) leaves the point with the
    bounds it had, never as proven."""
    from verifier.engine import pointwise

    spec, b, pts, rows, levels = _cnn_lattice_leaf(tmp_path)
    plain = pointwise.first_exact_margins(spec, b, rows, pts, np.inf)

    def lost(s):
        return np.full((len(s), len(rows)), np.nan)

    monkeypatch.setattr(pointwise, "_pinned_second_input", lambda spec, b, w, s, *a: lost(s))
    monkeypatch.setattr(pointwise, "forward_margins", lambda spec, rows, s, *a: lost(s))
    got = pointwise.first_exact_margins(spec, b, rows, pts, np.inf, levels, True)
    assert not np.isnan(got).any() and np.all(got <= plain + 1e-12)


@pytest.mark.parametrize("rule", ["half to even", "half away from zero"])
def test_grid_moves_hold_the_runtime_rounding(rule):
    """`quantized_spec.grid_moves` and the proof check's own `_grid_moves` on values anywhere
    within their bounds (a ReLU's outputs, some off, some nearly fixed), put on their grid as
    a dynamic-range kernel does (float32 scale max / 255, zero point 0, either rounding rule):
    each value's move lies within the search's midpoint +- half and the check's least and
    most; both are narrower than half a step where a value is nearly fixed."""
    from verifier.engine.quantized_spec import grid_moves
    from verifier.run.proofcheck import _grid_moves

    rng = np.random.default_rng(0)
    narrow = 0
    for _ in range(300):
        n = int(rng.integers(1, 12))
        lo = rng.normal(0.0, 1.0, n)
        hi = lo + rng.random(n) * rng.choice([0.0, 1e-7, 1e-3, 0.1, 2.0], n)
        a = np.maximum(lo + rng.random(n) * (hi - lo), 0.0).astype(np.float32)
        lo, hi = np.minimum(lo, a), np.maximum(hi, a)  # float32's value within the bounds
        scale = np.float32(a.max()) / np.float32(255.0)
        if scale == 0.0:
            continue
        ratio = a / scale
        k = np.round(ratio) if rule == "half to even" else np.floor(ratio + np.float32(0.5))
        move = np.clip(k, 0, 255) * np.float64(scale) - a.astype(np.float64)
        got = grid_moves(lo, hi, 255.0)
        checked = _grid_moves(np.maximum(lo, 0.0), np.maximum(hi, 0.0), 255.0)
        if got is None:  # only where the scale may be 0: every value may be off
            assert checked is None and lo.max() <= 0.0
            continue
        shift, half = got
        assert np.all(np.abs(move - shift) <= half)
        least, most = checked
        assert np.all((least <= move) & (move <= most))
        narrow += int(np.any((hi - lo < 1e-6) & (hi > 0) & (half < 0.5 * scale)))
    assert narrow > 50


def test_values_fixed_on_a_box_round_as_their_grid_puts_them(tmp_path, monkeypatch):
    """ONNX Runtime's dynamic copy of a CNN whose second convolution's input is quantized at
    run time, on a lattice region (5 values moved by 1/8): most first-layer outputs are fixed
    there, so on each box their rounding is nearly known (`quantized_spec.grid_moves`). The
    decision agrees with enumeration in fewer nodes than with half a step charged per value
    (50 against 144 when written), and its proof re-checks on bounds the check derives with
    its own `_grid_moves`, running fewer points on the runtime than without them."""
    from onnx_builders import cnn_hidden_hybrid_nhwc

    from verifier.engine import quantized_spec
    from verifier.engine.proof import decode, from_text
    from verifier.run import proofcheck

    model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "c.onnx"))
    chain = prepare_chain(model.network.lower())
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, chain)
    rng = np.random.default_rng(1)
    for _ in range(19):  # the 19th draw: a region the rounding's moves decide sooner
        x, moved = rng.integers(0, 256, 64) / 255.0, rng.choice(np.arange(1, 64), 5, False)
    x[0] = 1.0
    region = lattice_region(x, moved, 0.125, 1.0)
    label = int(float_runner(model).predict(x.reshape(1, 8, 8, 1).astype(np.float32)).argmax())
    fd, d = float_then_quantized(model, runner, em, chain, region, label, 2)
    assert fd.status == CERTIFIED and d.status == CERTIFIED
    check_decision(d, runner, region, label)
    spec = quantized_spec.quantized_spec(em, region, label).spec
    problem = proofcheck.Problem(
        region, label, runner, spec, levels=quantized_spec.input_levels(em)
    )
    proof = decode(from_text(d.detail["proof"]))
    checked = proofcheck.check_tree(proof, problem)
    assert checked.status == proofcheck.CHECKED
    monkeypatch.setattr(proofcheck, "_grid_moves", lambda *_: None)
    plain = proofcheck.check_tree(proof, problem)
    assert plain.points > checked.points
    monkeypatch.setattr(quantized_spec, "grid_moves", lambda *_: None)
    _, half_steps = float_then_quantized(model, runner, em, chain, region, label, 2)
    assert half_steps.status == CERTIFIED and half_steps.nodes > 2 * d.nodes
