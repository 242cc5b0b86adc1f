"""Differential bounds and the quantized decision from the float proof: every runtime margin
of small regions above the bounds, decisions that agree with enumeration on the quantized
runtime, the guard against a wrong error model, the proof the float decision hands back and the
quantized proof kept on its tree."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx_builders import mlp
from test_engine import all_points, check_decision, random_case, truth

from quantize.error_model import ErrorModel, error_model
from quantize.modes import float_runner, quantize_model
from verifier.engine.bounds import (
    linear_bounds,
    optimised_slopes,
    prepare_chain,
    restricted,
    rounding_errors,
    spec_chain,
)
from verifier.engine.decide import decide
from verifier.engine.diffbounds import diff_spec, quantized_bounds
from verifier.engine.diffdecide import _reuse, decide_from_float
from verifier.engine.model import load_model
from verifier.engine.network import Affine, forward_lowered
from verifier.engine.points import runtime_inputs
from verifier.engine.proof import FOLD, SPLIT, Node, decode, from_text
from verifier.engine.quantized_spec import (
    decision_thresholds,
    fold_part_of,
    fold_parts,
    input_levels,
    narrow_inputs,
    quantized_spec,
)
from verifier.engine.regions import lattice_region
from verifier.engine.result import CERTIFIED, REFUTED
from verifier.run.proofcheck import CHECKED, FAILED, Problem, check_tree

MODES = ["dynamic", "dynamic-per-tensor", "int8", "float16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-80-40-4 MLP, its quantized runners per mode, and a few inputs."""
    d = tmp_path_factory.mktemp("diff")
    model = load_model(mlp(d / "mlp.onnx", sizes=(16, 80, 40, 4), seed=3))
    rng = np.random.default_rng(0)
    calib = rng.random((128, 16), dtype=np.float32)
    runners = {m: quantize_model(model, m, d, calib) for m in MODES}
    return model, runners, rng.random((6, 16), dtype=np.float32)


def _region(x: np.ndarray, seed: int, step: float, radius: float):
    pos = np.random.default_rng(seed).choice(x.size, 3, replace=False)
    return lattice_region(x, pos, step, radius)


def _steps(mode: str) -> tuple[float, float]:
    """int8 grids are tight on this net: small moves keep them unsaturated."""
    return (0.004, 0.02) if mode == "int8" else (0.125, 0.75)


def _specs(model, runner, region, label):
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    errors = rounding_errors(em.chain, region, rounding=em.rounding)
    fs = spec_chain(chain, region, label)
    qs = spec_chain(em.chain, region, label, errors=errors)
    return chain, fs, qs


@pytest.mark.parametrize("mode", MODES)
def test_margins_above_differential_bounds(tiny, mode):
    """On every point of small regions and random sub-boxes: the runtime's margin is at least
    the combined lower bound and at least the float lower bound + the difference's lower
    bound, and the runtime's margin minus the float chain's is at least that difference bound
    (with the runtime's own bounds switched off, so only the differential ones speak)."""
    model, runners, xs = tiny
    runner = runners[mode]
    rng = np.random.default_rng(1)
    checked = 0
    for i, x in enumerate(xs):
        region = _region(x, i, *_steps(mode))
        label = int(runner.predict(x[None]).argmax())
        try:
            chain, fs, qs = _specs(model, runner, region, label)
        except ValueError:  # a static grid may saturate over this region: no bound at all
            continue
        ds = diff_spec(fs, qs)
        for _ in range(3):
            lo = rng.integers(region.lo, region.hi + 1)
            hi = np.maximum(lo, rng.integers(region.lo, region.hi + 1))
            base = linear_bounds(fs, lo, hi)
            direct = linear_bounds(qs, lo, hi)
            if base.empty:
                continue
            off = replace(direct, lower=np.full_like(direct.lower, -np.inf))
            pts = all_points(region)
            pts = pts[np.all((pts >= lo) & (pts <= hi), axis=1)]
            q = np.asarray(runner.predict(runtime_inputs(runner, region, pts)), np.float64)
            q_margin = q[:, [label]] - q[:, fs.others]
            logits = forward_lowered(chain.layers, region.points(pts).astype(np.float64))
            f_margin = logits[:, [label]] - logits[:, fs.others]
            for refine in (True, False):
                b = quantized_bounds(ds, lo, hi, base, off, refine=refine)
                assert np.all(q_margin >= b.lower - 1e-9), (refine, (q_margin - b.lower).min())
                assert np.all(q_margin >= base.lower + b.delta - 1e-9)
                assert np.all(q_margin - f_margin >= b.delta - 1e-9)
                full = quantized_bounds(ds, lo, hi, base, direct, refine=refine)
                assert np.all(full.lower >= direct.lower) and np.all(q_margin >= full.lower)
            checked += len(pts)
    assert checked > 100


def test_difference_bound_is_tight_without_rounding(tiny):
    """float16 rounds little: the difference's bound is small next to the margins' ranges (a
    differential bound that only ever said "anything" would pass the soundness test)."""
    model, runners, xs = tiny
    runner = runners["float16"]
    region = _region(xs[0], 0, 0.125, 0.75)
    label = int(runner.predict(xs[:1]).argmax())
    _, fs, qs = _specs(model, runner, region, label)
    base = linear_bounds(fs, region.lo, region.hi)
    b = quantized_bounds(diff_spec(fs, qs), region.lo, region.hi, base, base)
    assert np.all(b.delta > -0.05), b.delta


def float_then_quantized(model, runner, em, chain, region, label, enum_limit):
    """The float decision (keeping its leaves; without the sieve, which closes these small
    regions whole), then, where it certifies, the quantized one from its proof; both at
    `enum_limit`. (float decision, quantized decision or None)."""
    fd = decide(
        float_runner(model),
        chain,
        region,
        label,
        timeout=30.0,
        enum_limit=enum_limit,
        keep_leaves=True,
        sieve=False,
    )
    if fd.status != CERTIFIED:
        return fd, None
    return fd, decide_from_float(
        runner,
        chain,
        region,
        label,
        fd.detail.get("reuse"),
        em,
        timeout=30.0,
        enum_limit=enum_limit,
    )


def test_reused_float_leaves_keep_their_rows(tiny):
    """The float leaves left to branch and bound keep their back-substituted rows for their
    children, with bounds equal to those computed without keeping them (the root keeps none)."""
    model, runners, xs = tiny
    runner = runners["dynamic"]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    region = _region(xs[0], 10, 0.0625, 1.0)
    label = int(runner.predict(xs[:1]).argmax())
    fd = decide(
        float_runner(model),
        chain,
        region,
        label,
        timeout=30.0,
        keep_leaves=True,
        sieve=False,
        enum_limit=1024,  # the region holds fewer points than the default: bounded, not run
    )
    proof = fd.detail["reuse"]
    assert len(proof.leaves) > 2
    qs = quantized_spec(em, region, label)
    direct = linear_bounds(qs.spec, region.lo, region.hi)
    on = narrow_inputs(qs.spec, input_levels(em), direct.pre)
    ds = diff_spec(proof.spec, qs.spec)
    left = _reuse(
        ds,
        qs.spec,
        decision_thresholds(em, qs.spec),
        region,
        proof,
        direct,
        {},
        1e18,
        None,
        [],
        on,
        False,  # no grid on a dynamic-range copy: no box specs
    )
    assert left
    for leaf in left:
        plain = linear_bounds(on, leaf.lo, leaf.hi, parent=direct, open_only=True)
        assert leaf.bounds.queries and np.array_equal(leaf.bounds.lower, plain.lower)
        assert np.array_equal(leaf.bounds.coeffs, plain.coeffs)
        for kept, own in zip(leaf.bounds.pre, plain.pre, strict=True):
            assert (kept is None) == (own is None)
            assert kept is None or all(np.array_equal(a, b) for a, b in zip(kept, own, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_decisions_agree_with_enumeration(tiny, mode):
    """Regions above the enumeration limit, forced through the bounds route: certified only
    where the quantized runtime misclassifies no point, refutations confirmed on it, and the
    float proof used for some."""
    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    statuses, routes = [], []
    for i, x in enumerate(xs):
        for step, radius in (_steps(mode), (0.03125, 0.25)):
            region = _region(x, 10 + i, step, radius)
            label = int(runner.predict(x[None]).argmax())
            assert region.count(10**6) > 64
            fd, d = float_then_quantized(model, runner, em, chain, region, label, 64)
            if d is None:
                continue
            check_decision(d, runner, region, label)
            statuses.append(d.status)
            routes.append(d.route)
    assert CERTIFIED in statuses, routes
    if mode != "int8":
        assert {"bounds", "diff-root", "diff-leaves", "diff-bab"} & set(routes), routes


def test_quantized_counterexample_where_the_float_model_is_certified(tiny):
    """The float model is certified on the region, the quantized runtime misclassifies a few
    of its points that the quick attack misses: with branch and bound given no nodes, the
    search attack (kept for when branch and bound leaves the region open) finds one,
    confirmed on the runtime."""
    model, runners, _ = tiny
    runner = runners["dynamic"]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    x = np.random.default_rng(5).random((300, 16), dtype=np.float32)[288]
    region = lattice_region(
        x, np.random.default_rng(388).choice(16, 3, replace=False), 1 / 32, 0.25
    )
    label = int(runner.predict(x[None]).argmax())
    assert 0 < truth(runner, region, label)[1].sum() < 10
    fd = decide(
        float_runner(model), chain, region, label, timeout=30.0, enum_limit=64, keep_leaves=True
    )
    assert fd.status == CERTIFIED
    d = decide_from_float(
        runner, chain, region, label, fd.detail["reuse"], em, timeout=30.0, enum_limit=0,
        max_nodes=0,
    )  # fmt: skip
    check_decision(d, runner, region, label)
    assert (d.status, d.route, d.nodes) == (REFUTED, "attack", 0)


def test_quantized_decision_stops_at_its_deadline(tiny):
    """A quantized decision whose spec and root bounds already took its time does not go on
    to the fold, the float leaves or branch and bound: unknown (budget), unless the root
    bounds certified (a finished bound is kept)."""
    model, runners, xs = tiny
    runner = runners["dynamic"]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    seen = set()
    for i, x in enumerate(xs):
        for step, radius in ((0.125, 0.75), (0.03125, 0.25)):
            region = _region(x, 10 + i, step, radius)
            label = int(runner.predict(x[None]).argmax())
            fd, _ = float_then_quantized(model, runner, em, chain, region, label, 64)
            if fd.status != CERTIFIED:
                continue
            d = decide_from_float(
                runner, chain, region, label, fd.detail.get("reuse"), em, timeout=1e-9,
                enum_limit=64,
            )  # fmt: skip
            seen.add(d.status)
            if d.status == CERTIFIED:
                assert d.route == "bounds"
            else:
                assert (d.status, d.route, d.nodes) == ("unknown", "budget", 0)
                assert d.detail["open_leaves"] == "the root's bounds took the time"
                assert set(d.detail["steps"]) == {"bounds"}
    assert "unknown" in seen


def test_proof_is_handed_back(tiny):
    """decide(keep_leaves=True): a certificate from bounds carries its root bounds and closed
    leaves, each certifying its box (bounds) or enumerated; none without the flag."""
    model, _, xs = tiny
    chain = prepare_chain(model.network.lower())
    runtime = float_runner(model)
    found = 0
    for i, x in enumerate(xs):
        region = _region(x, 20 + i, 0.125, 0.75)
        label = int(runtime.predict(x[None]).argmax())
        d = decide(
            runtime,
            chain,
            region,
            label,
            timeout=30.0,
            enum_limit=16,
            keep_leaves=True,
            sieve=False,
        )
        assert (
            "reuse" not in decide(runtime, chain, region, label, timeout=30.0, enum_limit=16).detail
        )
        if d.status != CERTIFIED or d.route not in ("bounds", "bab"):
            continue
        proof = d.detail["reuse"]
        assert proof.leaves and proof.root is not None
        for leaf in proof.leaves:
            size = region.count(17, leaf.lo, leaf.hi)
            assert np.all(leaf.bounds.lower > 0) or size <= 16
        found += 1
    assert found


def test_wrong_error_model_is_caught(tiny):
    """Float weights with no rounding, or weights at a wrong scale: the runtime's output at x
    leaves the model's interval at some input, and the decision falls back without bounds."""
    model, runners, xs = tiny
    runner = runners["dynamic"]
    chain = prepare_chain(model.network.lower())
    right = error_model(runner, chain)
    scaled = [
        Affine(layer.weight * 2.0, layer.bias) if isinstance(layer, Affine) else layer
        for layer in right.chain.layers
    ]
    wrongs = [
        ErrorModel(chain, [None] * len(chain.layers), "float weights, no rounding"),
        ErrorModel(prepare_chain(scaled), right.rounding, "weights at twice their scale"),
    ]
    for wrong in wrongs:
        refused = 0
        for i, x in enumerate(xs):
            region = _region(x, i, 0.125, 0.75)
            label = int(runner.predict(x[None]).argmax())
            fd, d = float_then_quantized(model, runner, wrong, chain, region, label, 0)
            if d is None:
                continue
            refused += "outside" in d.detail.get("differential", "")
            check_decision(d, runner, region, label)
        assert refused > 0, wrong.source


@pytest.mark.parametrize("maxpool", [False, True], ids=["relu", "maxpool"])
@pytest.mark.parametrize("seed", range(24))
def test_difference_bounds_on_perturbed_chains(seed, maxpool):
    """A random chain and a copy with perturbed weights, both exact: on every point of random
    sub-boxes, the copy's margin minus the original's is at least the difference's bound, and
    the copy's margin at least the joint bound (the runtime's own bounds switched off)."""
    chain, _, region, label = random_case(seed, maxpool)
    rng = np.random.default_rng(seed + 500)
    pert = [
        Affine(
            layer.weight + rng.normal(size=layer.weight.shape) * 0.3 * np.abs(layer.weight),
            layer.bias + rng.normal(size=layer.bias.shape) * 0.05,
        )
        if isinstance(layer, Affine)
        else layer
        for layer in chain
    ]
    fs = spec_chain(chain, region, label, float32=False)
    qs = spec_chain(pert, region, label, float32=False)
    ds = diff_spec(fs, qs)
    pts_all = all_points(region)
    xs = region.points(pts_all).astype(np.float64)
    f_logits, q_logits = forward_lowered(chain, xs), forward_lowered(pert, xs)
    f_margin = f_logits[:, [label]] - f_logits[:, fs.others]
    q_margin = q_logits[:, [label]] - q_logits[:, fs.others]
    for _ in range(4):
        lo = rng.integers(region.lo, region.hi + 1)
        hi = np.maximum(lo, rng.integers(region.lo, region.hi + 1))
        inside = np.all((pts_all >= lo) & (pts_all <= hi), axis=1)
        base, direct = linear_bounds(fs, lo, hi), linear_bounds(qs, lo, hi)
        if base.empty or not inside.any():
            continue
        off = replace(direct, lower=np.full_like(direct.lower, -np.inf))
        for refine in (True, False):
            b = quantized_bounds(ds, lo, hi, base, off, refine=refine)
            gap = (q_margin - f_margin)[inside] - b.delta
            assert gap.min() >= -1e-9, (refine, gap.min())
            assert (q_margin[inside] - b.lower).min() >= -1e-9


@pytest.mark.parametrize("mode", ["float16", "16x8"])
def test_absorbed_float_leaves_agree_with_enumeration(tiny, tmp_path, mode):
    """Float proofs with several leaves: leaves whose float bound absorbs the root's
    difference bound are closed at no cost (some are), and the decisions agree with
    enumerating the quantized runtime."""
    model, runners, xs = tiny
    calib = np.random.default_rng(0).random((128, 16), dtype=np.float32)
    runner = runners.get(mode) or quantize_model(model, mode, tmp_path, calib)
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    absorbed = 0
    for i, x in enumerate(xs):
        region = _region(x, 10 + i, 0.125, 1.5)
        label = int(runner.predict(x[None]).argmax())
        _, d = float_then_quantized(model, runner, em, chain, region, label, 64)
        if d is None:
            continue
        check_decision(d, runner, region, label)
        absorbed += d.detail.get("float_leaves_absorbed", 0)
        if d.status == CERTIFIED and "proof" in d.detail:  # absorbed leaves re-closed
            assert _recheck(d, em, runner, region, label).status == CHECKED
    assert absorbed > 0


def _recheck(d, em, runner, region, label, tamper: str | None = None):
    """The audit's re-check of a quantized decision's proof, on the spec it rebuilds;
    `tamper`: a bounds leaf's margin raised ("bounds") or a split removed (SPLIT) first."""
    proof = decode(from_text(d.detail["proof"]))
    assert proof.spec == "error-model"
    if tamper is not None:
        nodes = list(proof.nodes)
        i = next(i for i, n in enumerate(nodes) if n.kind == tamper)
        if tamper == SPLIT:
            del nodes[i]
        else:
            nodes[i] = Node("bounds", (nodes[i].values[0] + 1000.0,))
        proof = replace(proof, nodes=tuple(nodes))
    spec = quantized_spec(em, region, label).spec
    problem = Problem(region, label, runner, spec, levels=input_levels(em))  # as the audit
    if any(n.kind == FOLD for n in proof.nodes):  # through the input fold: its parts' specs
        parts = fold_parts(em, region, label)
        problem = replace(
            problem, fold=lambda lo, hi: getattr(fold_part_of(parts, lo, hi), "spec", None)
        )
    return check_tree(proof, problem)


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_diff_bab_keeps_a_proof_the_audit_rechecks(tiny, mode):
    """A diff-bab certification keeps a proof: the float proof's tree (when it has one) with
    each leaf closed by the runtime's own bounds or split further and enumerated or sieved on
    it. It
    re-checks on the spec the audit rebuilds, the decision agrees with enumeration, and the
    proof fails once a bounds leaf's margin is raised or a split removed."""
    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    kept, on_tree = 0, 0
    for i, x in enumerate(xs):
        region = _region(x, 10 + i, 0.125, 1.5)
        label = int(runner.predict(x[None]).argmax())
        fd, d = float_then_quantized(model, runner, em, chain, region, label, 64)
        # new splits closed by bounds ("diff-bab") or mostly by the sieve ("enumeration")
        if d is None or d.route not in ("diff-bab", "enumeration") or "new_nodes" not in d.detail:
            continue
        check_decision(d, runner, region, label)
        assert _recheck(d, em, runner, region, label).status == CHECKED
        kinds = {n.kind for n in decode(from_text(d.detail["proof"])).nodes}
        for kind in ("bounds", SPLIT):
            if kind in kinds:
                assert _recheck(d, em, runner, region, label, kind).status == FAILED
        if "input_fold" in d.detail:  # the fold's cuts, not the float proof's tree
            continue
        float_splits = sum(n.kind == SPLIT for n in decode(from_text(fd.detail["proof"])).nodes)
        quantized = decode(from_text(d.detail["proof"]))
        # every node the quantized branch and bound processed was split, enumerated or sieved
        leaves = d.detail["leaves"]
        new_splits = d.detail["new_nodes"] - leaves.get("enumeration", 0) - leaves.get("sieve", 0)
        assert sum(n.kind == SPLIT for n in quantized.nodes) == float_splits + new_splits
        kept += 1
        on_tree += float_splits > 0
    assert kept and on_tree, (kept, on_tree)


def test_root_slopes_optimise_the_open_margins_only(tiny):
    """`optimised_slopes` raises only the margins the root's bounds leave open (the others keep
    their bound and the usual slopes), never lowers one, and stays below the runtime's
    margins at every point; some open margin rises."""
    model, runners, xs = tiny
    runner = runners["int8"]
    raised = 0
    for i, x in enumerate(xs):
        region = _region(x, 20 + i, 0.0625, 1.0)
        label = int(runner.predict(x[None]).argmax())
        _, _, qs = _specs(model, runner, region, label)
        root = linear_bounds(qs, region.lo, region.hi)
        threshold = np.full(len(root.lower), np.median(root.lower))
        rooted = optimised_slopes(qs, root, region.lo, region.hi, 20, threshold)
        closed = root.lower > threshold
        assert np.array_equal(rooted.lower[closed], root.lower[closed])
        assert np.all(rooted.lower >= root.lower)
        for k, rows in rooted.slopes.items():
            usual = qs.layers[k].relax(*root.pre[k])[2]
            assert np.array_equal(rows[closed], np.broadcast_to(usual, rows[closed].shape))
        pts = all_points(region)
        logits = runner.predict(runtime_inputs(runner, region, pts))
        margins = logits[:, [label]] - logits[:, qs.others]
        assert np.all(rooted.lower <= margins.min(axis=0) + 1e-9)
        raised += int(np.any(rooted.lower > root.lower + 1e-9))
    assert raised, "no open margin rose"


def test_optimised_root_certifies_with_a_proof_the_audit_rechecks(tiny):
    """Where the root's plain bounds leave a margin open and its optimised slopes close every
    one, the quantized decision certifies there (route "bounds"), agrees with enumeration,
    and keeps a root proof the audit re-checks (and rejects with the margin raised)."""
    model, runners, xs = tiny
    runner = runners["int8"]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    seen = 0
    for i, x in enumerate(xs[:2]):
        for seed in range(6):
            pos = np.random.default_rng(seed + 10 * i).choice(x.size, 3, replace=False)
            region = lattice_region(x, pos, 0.0625, 1.0)
            label = int(runner.predict(x[None]).argmax())
            _, d = float_then_quantized(model, runner, em, chain, region, label, 64)
            if d is None or "root_margin_optimised" not in d.detail:
                continue
            assert d.route == "bounds" and d.nodes == 0
            assert d.detail["root_margin"] <= 0.0 < d.detail["root_margin_optimised"]
            check_decision(d, runner, region, label)
            assert _recheck(d, em, runner, region, label).status == CHECKED
            assert _recheck(d, em, runner, region, label, "bounds").status == FAILED
            seen += 1
    assert seen, "no root certified by its optimised slopes alone"


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_children_queued_on_parent_bounds_agree_with_enumeration(tiny, mode, monkeypatch):
    """The quantized branch and bound queues a child holding its parent's point nearest 0 on
    its parent's rows (`bounds.restricted`), bounding it only when it must be split: the
    decisions still agree with enumeration and keep proofs the audit re-checks."""
    import verifier.engine.diffdecide as dd

    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    queued = []

    def counted(*args):
        queued.append(1)
        return restricted(*args)

    monkeypatch.setattr(dd, "restricted", counted)
    for i, x in enumerate(xs):
        for step, radius in ((0.125, 1.5), (0.0625, 1.0)):
            region = _region(x, 10 + i, step, radius)
            label = int(runner.predict(x[None]).argmax())
            _, d = float_then_quantized(model, runner, em, chain, region, label, 16)
            if d is None:
                continue
            check_decision(d, runner, region, label)
            if d.status == CERTIFIED and "proof" in d.detail:
                assert _recheck(d, em, runner, region, label).status == CHECKED
    assert queued, "no child was queued on its parent's bounds"
