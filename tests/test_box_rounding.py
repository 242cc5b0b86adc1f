"""The first layer's requantization on a sub-box (`verifier.engine.box_rounding`): every value
the runtime can round to lies in the box's spec, the runtime's margins lie above its bounds,
and quantized decisions that use it agree with enumerating the runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx_builders import cnn_hidden_hybrid_nhwc
from test_diffbounds import float_then_quantized
from test_engine import check_decision

from quantize.error_model import error_model
from quantize.modes import quantize_model
from verifier.engine import box_rounding
from verifier.engine.bab import Leaf, split
from verifier.engine.bounds import (
    _backsub,
    _first_err,
    _query_both,
    linear_bounds,
    prepare_chain,
)
from verifier.engine.box_rounding import MAX_FREE, applies, on_box
from verifier.engine.model import load_model
from verifier.engine.network import Affine
from verifier.engine.quantized_spec import quantized_spec
from verifier.engine.regions import feature_region, lattice_region
from verifier.engine.result import CERTIFIED


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The MNIST-shaped 8x8 CNN, its int8 and 16x8 copies and a few inputs."""
    d = tmp_path_factory.mktemp("boxr")
    model = load_model(cnn_hidden_hybrid_nhwc(d / "cnn.onnx"))
    rng = np.random.default_rng(2)
    calib = rng.random((64, *model.input_shape), dtype=np.float32)
    runners = {m: quantize_model(model, m, d, calib) for m in ("int8", "16x8")}
    return model, runners, rng.random((4, *model.input_shape), dtype=np.float32)


def _region(x: np.ndarray, seed: int, radius: float = 1.5, features: int = 12):
    """24 pixels in features of 2 (of 2 and 3 with 10 features: unlike costs), moved by 1/4:
    a few thousand points at most."""
    order = np.random.default_rng(seed).permutation(x.size)[:24]
    return feature_region(x.reshape(-1), np.array_split(order, features), 0.25, radius)


def _boxes(region, seed: int):
    """The region's box and sub-boxes with some generators fixed to 0 or 1."""
    rng = np.random.default_rng(seed)
    out = [(region.lo, region.hi)]
    for _ in range(4):
        lo, hi = region.lo.copy(), region.hi.copy()
        fix = rng.random(len(lo)) < 0.3
        ones = fix & (rng.random(len(lo)) < 0.5)
        # the ones leave room for two more generators: the box holds points beyond its corner
        ones &= np.cumsum(region.cost * ones) <= region.budget - 2 * region.cost.max()
        hi[fix & ~ones] = 0
        lo[fix] = hi[fix]
        out.append((lo, hi))
    return out


def _grid_values(spec, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per point, the lowest and highest grid value the first layer's output can round to,
    from the spec's value and its error: any value within the error beyond half a step."""
    layer = spec.layers[0]
    step, origin = spec.lattice[0]
    v = pts @ layer.weight.T + layer.bias
    t = (v - origin) / step
    slack = np.maximum(_first_err(spec) / step - 0.5, 0.0)
    return origin + np.ceil(t - slack - 0.5) * step, origin + np.floor(t + slack + 0.5) * step


def _block_region(x: np.ndarray):
    """Each pixel of the top left 5x5 block its own generator, at most 4 moved by 1/4: first
    outputs with up to 9 free generators, the budget cutting their subsets."""
    pixels = (np.arange(5)[:, None] * 8 + np.arange(5)[None, :]).reshape(-1)
    return feature_region(x.reshape(-1), [np.array([p]) for p in pixels], 0.25, 1.0)


REGIONS = {
    "like-costs": lambda x, i: _region(x, i),
    "unlike-costs": lambda x, i: _region(x, i, features=10),
    "block": lambda x, i: _block_region(x),
}


@pytest.mark.parametrize("kind", list(REGIONS))
@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_box_spec_holds_every_rounded_value(cnn, mode, kind):
    """At every point of a box, each grid value the first layer's output can round to lies
    within the box's spec (its shifted value +- its narrowed error), the error is narrowed
    for some outputs and never widened, and the runtime's margins lie above the box's linear
    bounds."""
    model, runners, xs = cnn
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    narrowed = fitted = 0
    for i, x in enumerate(xs):
        region = REGIONS[kind](x, i)
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        for lo, hi in _boxes(region, i):
            assert applies(spec, lo, hi)
            box = on_box(spec, lo, hi)
            parts = list(region.enumerate(lo=lo, hi=hi))
            if not parts:  # the generators fixed to 1 cost more than the budget
                continue
            pts = np.concatenate(parts)
            low, high = _grid_values(spec, pts.astype(np.float64))
            layer = box.layers[0]
            v = pts @ layer.weight.T + layer.bias
            assert np.all(low >= v - _first_err(box) - 1e-12)
            assert np.all(high <= v + _first_err(box) + 1e-12)
            assert np.all(box.err[0] <= _first_err(spec) + 1e-15)
            narrowed += int(np.sum(box.err[0] < 0.9 * _first_err(spec)))
            fitted += int(np.sum(np.any(layer.weight != spec.layers[0].weight, axis=1)))
            xs_box = region.points(pts).astype(np.float32).reshape(len(pts), *model.input_shape)
            out = runner.predict(xs_box).astype(np.float64)
            margins = out[:, [label]] - out[:, spec.others]
            assert np.all(linear_bounds(box, lo, hi).lower <= margins.min(axis=0) + 1e-9)
    assert narrowed > 0 and fitted > 0


def _descent(region, seed: int):
    """Boxes as branch and bound takes them: each node's two children (a generator fixed at 0,
    then at 1 where the budget allows), then one of them split in turn."""
    rng = np.random.default_rng(seed)
    lo, hi = region.lo.copy(), region.hi.copy()
    out = [(lo, hi)]
    for _ in range(6):
        g = int(rng.choice(np.flatnonzero(hi > lo)))
        zero, one = (lo.copy(), hi.copy()), (lo.copy(), hi.copy())
        zero[1][g] = 0
        one[0][g] = 1
        out.append(zero)
        if region.cost @ one[0] <= region.budget:
            out.append(one)
        lo, hi = out[-1] if rng.random() < 0.5 else zero
    return out


@pytest.mark.parametrize("kind", list(REGIONS))
def test_a_box_after_others_is_narrowed_as_on_its_own(cnn, kind, monkeypatch):
    """A box worked out after others of the same spec (`_RECENT`) takes the nearest one's
    values for the outputs left as they are and lists the others again: its spec is the one
    it gets with no box before it, and some boxes list only part of the outputs."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    partial = []
    changed = box_rounding._changed_outputs

    def spy(*args):
        redo = changed(*args)
        partial.append(redo is not None and not redo.all())
        return redo

    monkeypatch.setattr(box_rounding, "_changed_outputs", spy)
    recent = box_rounding._RECENT
    for i, x in enumerate(xs):
        region = REGIONS[kind](x, i)
        spec = quantized_spec(em, region, int(runners["int8"].predict(x[None]).argmax())).spec
        for lo, hi in _descent(region, i):
            before = list(recent)
            after = on_box(spec, lo, hi)
            recent.clear()
            alone = on_box(spec, lo, hi)
            for a, b in (
                (after.layers[0].weight, alone.layers[0].weight),
                (after.layers[0].bias, alone.layers[0].bias),
                (after.err[0], alone.err[0]),
            ):  # equal but for float noise (a fit's product over other rows beside it)
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
            assert (after.first_charge is None) == (alone.first_charge is None)
            if alone.first_charge is not None:  # the grouped charge too (`GroupedRounding`)
                lam = np.random.default_rng(i).normal(size=(4, len(alone.err[0])))
                np.testing.assert_allclose(
                    after.first_charge.charge(lam), alone.first_charge.charge(lam), rtol=1e-12
                )
            recent.clear()
            recent.extend(before)
            on_box(spec, lo, hi)  # the boxes before the next one, as in the search
    assert any(partial)


def _check_grouped_charge(cnn, kind: str, on, rows_of, seed: int, also=None) -> None:
    """A grouped first-layer charge (`on(spec, region, lo, hi)`'s box spec's `first_charge`)
    bounds, for any row lam on the outputs `rows_of(spec, box)` selects, lam . (rounded value -
    the box spec's value) from below at every point of the box, over every grid value each
    output can round to there; it is at most |lam| . err and below it for most rows; and that
    sum is negative somewhere (a zero charge would not hold: the check can fail).
    `also(spec, region, lo, hi, lam, charge)` checks more."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    rng = np.random.default_rng(seed)
    tighter = rows = below = 0
    for i, x in enumerate(xs):
        region = REGIONS[kind](x, i)
        spec = quantized_spec(em, region, 0).spec
        for lo, hi in _boxes(region, i):
            box_rounding._RECENT.clear()
            box = on(spec, region, lo, hi)
            parts = list(region.enumerate(lo=lo, hi=hi))
            if box.first_charge is None or not parts:
                continue
            pts = np.concatenate(parts).astype(np.float64)
            low, high = _grid_values(spec, pts)
            v = pts @ box.layers[0].weight.T + box.layers[0].bias
            lam = rng.normal(size=(32, v.shape[1])) * rows_of(spec, box)
            charge = box.first_charge.charge(lam)
            least = np.maximum(lam, 0) @ (low - v).T + np.minimum(lam, 0) @ (high - v).T
            assert np.all(least.min(axis=1) >= -charge - 1e-9)
            per_neuron = np.abs(lam) @ box.err[0]
            assert np.all(charge <= per_neuron + 1e-12)
            # rows on a few outputs each, touching parts of groups (a second layer's rows)
            few = lam * (rng.random(lam.shape) < 0.2)
            least_few = np.maximum(few, 0) @ (low - v).T + np.minimum(few, 0) @ (high - v).T
            assert np.all(least_few.min(axis=1) >= -box.first_charge.charge(few) - 1e-9)
            if also is not None:
                also(spec, region, lo, hi, lam, charge)
            tighter += int(np.sum(charge < 0.95 * per_neuron))
            rows += len(lam)
            below += int(np.sum(least.min(axis=1) < -1e-9))
    assert rows and tighter > rows / 2 and below > rows / 2


@pytest.mark.parametrize("kind", list(REGIONS))
def test_grouped_charge_bounds_the_rounding_at_every_point(cnn, kind):
    """The search's charge (`GroupedRounding`), on rows over the outputs `on_box` narrowed;
    rows given by their non-zeros (`charge_entries`, the second layer's) are charged alike,
    dense or sparse."""

    def entries_alike(spec, region, lo, hi, lam, charge):
        grouped = on_box(spec, lo, hi).first_charge
        for rows in (lam, lam * (np.random.default_rng(0).random(lam.shape) < 0.2)):
            r, c = np.nonzero(rows)
            got = grouped.charge_entries(r, c, rows[r, c], len(rows))
            assert np.allclose(np.minimum(got, np.abs(rows) @ grouped.err), grouped.charge(rows))

    _check_grouped_charge(
        cnn,
        kind,
        lambda spec, region, lo, hi: on_box(spec, lo, hi),
        lambda spec, box: box.err[0] < spec.err[0],
        5,
        entries_alike,
    )


@pytest.mark.parametrize("kind", list(REGIONS))
def test_the_audit_charges_the_rounding_by_groups_with_its_own_code(cnn, kind):
    """The proof checker's charge (`proofcheck._grid_rounding`, its own code), on rows over every
    output, and no looser than the search's on the same box (it also charges a group of one by
    its points)."""
    from verifier.run.proofcheck import _grid_rounding

    def no_looser(spec, region, lo, hi, lam, charge):
        box_rounding._RECENT.clear()
        search = on_box(spec, lo, hi)
        if search.first_charge is not None:
            assert np.all(charge <= search.first_charge.charge(lam) + 1e-9)

    _check_grouped_charge(cnn, kind, _grid_rounding, lambda spec, box: 1.0, 7, no_looser)


@pytest.mark.parametrize("kind", list(REGIONS))
def test_second_layer_bounds_take_the_grouped_charge(cnn, kind):
    """The second layer's rows as its bounds take them (`_query_both`: the first ReLU's lines
    folded into its weights) equal the plain back-substitution's, which charges the first
    layer's rounding by groups (`GroupedRounding`); against the per-output charge they are
    never lower and higher for some rows."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    higher = 0
    for i, x in enumerate(xs):
        region = REGIONS[kind](x, i)
        spec = quantized_spec(em, region, 0).spec
        for lo, hi in _boxes(region, i):
            box_rounding._RECENT.clear()
            box = on_box(spec, lo, hi)
            if box.first_charge is None:
                continue
            b = linear_bounds(box, lo, hi)
            if b.empty:
                continue
            rows = np.arange(len(b.pre[3][0]))
            first_only = {1: b.cut[1]} if b.cut and 1 in b.cut else None
            lam, c = _query_both(box, b.pre, 2, rows, first_only)
            m = len(rows)
            unit = np.zeros((2 * m, m))
            unit[np.arange(m), rows], unit[m + np.arange(m), rows] = 1.0, -1.0
            lam_b, c_b = _backsub(box, b.pre, 3, unit, np.zeros(2 * m), cut=first_only)
            assert np.allclose(lam, lam_b, atol=1e-12) and np.allclose(c, c_b, atol=1e-12)
            _, c_plain = _query_both(replace(box, first_charge=None), b.pre, 2, rows, first_only)
            assert np.all(c >= c_plain - 1e-12)
            higher += int(np.sum(c > c_plain + 1e-9))
    assert higher > 0


def test_one_free_generator_is_charged_only_its_points_rounding(cnn):
    """The rounding's move is fitted on the free generators: with one, the fit runs through
    both of its points, so an output is charged no more than each point's own rounding leaves
    open (the move's range over the two points would charge their difference too)."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    region = _region(xs[0], 0)
    spec = quantized_spec(em, region, 0).spec
    w = spec.layers[0].weight
    lo, hi = region.lo.copy(), region.hi.copy()
    hi[1:] = 0  # only generator 0 free: the outputs on it take two values
    box = on_box(spec, lo, hi)
    rows = np.flatnonzero(w[:, 0] != 0)
    pts = np.zeros((2, len(lo)))
    pts[1, 0] = 1.0
    low, high = _grid_values(spec, pts)
    own = (high - low).max(axis=0)[rows] / 2  # a point's rounding open either way (ties)
    assert len(rows) and np.all(box.err[0][rows] <= own + 1e-9)
    moved = (low + high)[1, rows] / 2 - (low + high)[0, rows] / 2 - w[rows, 0]
    assert np.any(np.abs(moved) > 1e-3 * spec.lattice[0][0])  # the moves differ: a range would
    # charge that difference


def test_boxes_take_their_rounding_where_the_first_grid_is_coarse(cnn):
    """The quantized decision takes each box's first rounding (`on_box`) where the first layer's
    grid is coarse (int8: a few dozen steps across an unstable output's range), not on 16x8's
    fine one (thousands), where it would gain nothing at its cost."""
    from verifier.engine.bab import on_coarse_grid

    model, runners, xs = cnn
    coarse = {}
    for mode, runner in runners.items():
        em = error_model(runner, model.network.lower())
        region = _region(xs[0], 0)
        qs = quantized_spec(em, region, int(runner.predict(xs[:1]).argmax()))
        coarse[mode] = on_coarse_grid(qs.spec, qs.root, 0)
        plain = replace(qs.spec, lattice=None)  # no grid: nothing to take
        assert not on_coarse_grid(plain, qs.root, 0)
    assert coarse == {"int8": True, "16x8": False}


def test_box_spec_needs_a_grid_and_0_1_generators(cnn, monkeypatch):
    """A lattice region's generators span several steps: the spec is left as it is; so is a
    spec whose every first-layer output has more than `MAX_FREE` free generators."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    x = xs[0].reshape(-1)
    lattice = lattice_region(x, np.arange(3), 0.125, 0.75)
    spec = quantized_spec(em, lattice, 0).spec
    assert not applies(spec, lattice.lo, lattice.hi)
    assert on_box(spec, lattice.lo, lattice.hi) is spec
    region = _region(xs[0], 0)
    spec = quantized_spec(em, region, 0).spec
    many = spec.layers[0].weight.copy()
    first = many[:, : MAX_FREE + 1]  # every output on the first MAX_FREE + 1 generators
    first[first == 0] = 1.0
    assert (np.count_nonzero(many[:, region.hi > 0], axis=1) > MAX_FREE).all()
    crowded = replace(spec, layers=[Affine(many, spec.layers[0].bias), *spec.layers[1:]])

    def listed(*args):
        raise AssertionError("went on to list values")

    monkeypatch.setattr(box_rounding, "_first_err", listed)  # returned at once
    assert on_box(crowded, region.lo, region.hi) is crowded


@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_decisions_on_feature_regions_agree_with_enumeration(cnn, mode):
    """Quantized decisions from the float proof on feature regions (branch and bound nodes on
    the box's spec) certify only where the runtime misclassifies no point, and some do."""
    model, runners, xs = cnn
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    statuses = []
    for i, x in enumerate(xs):
        for radius in (1.5, 2.5):
            region = _region(x, 40 + i, radius)
            label = int(runner.predict(x[None]).argmax())
            _, q = float_then_quantized(model, runner, em, chain, region, label, 16)
            if q is None:
                continue
            check_decision(q, runner, region, label)
            statuses.append(q.status)
    assert CERTIFIED in statuses


def test_split_children_stay_0_1(cnn):
    """Branch and bound's children of a feature region's box keep 0/1 generators: the box's
    spec applies all the way down."""
    model, runners, xs = cnn
    em = error_model(runners["int8"], model.network.lower())
    region = _region(xs[1], 1)
    spec = quantized_spec(em, region, 0).spec
    leaf = Leaf(region.lo, region.hi, linear_bounds(spec, region.lo, region.hi))
    for lo, hi in split(leaf, np.zeros(len(spec.others))):
        assert applies(spec, lo, hi)


@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_the_audit_narrows_the_rounding_as_the_search_does(cnn, mode):
    """The proof checker's own code (`proofcheck._grid_rounding`) gives every box the same
    bias and error as `on_box`, and a decision's kept proof on feature regions re-checks."""
    from verifier.engine.proof import decode, from_text
    from verifier.engine.quantized_spec import input_levels
    from verifier.run.proofcheck import CHECKED, Problem, _grid_rounding, check_tree

    model, runners, xs = cnn
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    checked = 0
    for i, x in enumerate(xs):
        region = _region(x, 60 + i, 2.5)
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        for lo, hi in _boxes(region, i):
            mine, theirs = on_box(spec, lo, hi), _grid_rounding(spec, region, lo, hi)
            assert np.allclose(mine.layers[0].weight, theirs.layers[0].weight, rtol=0, atol=1e-12)
            assert np.allclose(mine.layers[0].bias, theirs.layers[0].bias, rtol=0, atol=1e-12)
            assert np.allclose(mine.err[0], theirs.err[0], rtol=1e-9, atol=1e-15)
        _, q = float_then_quantized(model, runner, em, chain, region, label, 16)
        if q is None:
            continue
        if q.status != CERTIFIED or "proof" not in q.detail:
            continue
        proof = decode(from_text(q.detail["proof"]))
        problem = Problem(region, label, runner, spec, levels=input_levels(em))
        assert check_tree(proof, problem).status == CHECKED
        checked += 1
    assert checked >= 1
