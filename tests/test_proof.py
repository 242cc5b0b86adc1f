"""Kept proofs: every certification carries the cover that proved it; the cover partitions the
region, agrees with exhaustive enumeration, and re-checks; every kind of tampering fails."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_engine import _hard_robust_case, random_case, truth

from verifier.engine.bounds import prepare_chain, rounding_errors, spec_chain
from verifier.engine.decide import decide
from verifier.engine.points import count_points
from verifier.engine.proof import (
    SPLIT,
    Cover,
    Node,
    Proof,
    ProofFormatError,
    decode,
    encode,
    from_text,
    single,
    to_text,
)
from verifier.engine.result import CERTIFIED, REFUTED
from verifier.run.proofcheck import CHECKED, FAILED, NOT_CHECKABLE, Problem, check_proof, check_tree


def leaf_boxes(proof: Proof, lo: np.ndarray, hi: np.ndarray) -> list[tuple]:
    """(kind, lo, hi) of every leaf, by a walk of the preorder written for this test."""
    out, pos = [], 0

    def walk(a, b):
        nonlocal pos
        node = proof.nodes[pos]
        pos += 1
        if node.kind != SPLIT:
            out.append((node.kind, a, b))
            return
        g, mid = node.values
        left_hi, right_lo = b.copy(), a.copy()
        left_hi[g], right_lo[g] = mid, mid + 1
        walk(a, left_hi)
        walk(right_lo, b)

    walk(lo.copy(), hi.copy())
    assert pos == len(proof.nodes)
    return out


def problem(chain, runtime, region, label, **kw) -> Problem:
    spec = spec_chain(prepare_chain(chain), region, label, float32=True)
    return Problem(region, label, runtime, spec, chain, **kw)


def proof_of(d) -> Proof:
    return decode(from_text(d.detail["proof"]))


@pytest.fixture(scope="module")
def bab_case():
    """A robust region only branch and bound certifies, with its certification."""
    chain, runtime, region, label, _, _ = _hard_robust_case()
    d = decide(runtime, chain, region, label, enum_limit=0, use_smt=False, timeout=30)
    assert d.status == CERTIFIED and d.route == "bab"
    return chain, runtime, region, label, d


def test_round_trip():
    cover = Cover()
    lo, hi = np.array([0, -2]), np.array([1, 3])
    cover.split(lo, hi, 1, 0)
    cover.close(lo, np.array([1, 0]), "bounds", 0.5)
    cover.split(np.array([0, 1]), hi, 0, 0)
    cover.close(np.array([0, 1]), np.array([0, 3]), "enumeration", 3)
    cover.close(np.array([1, 1]), hi, "z3")
    proof = cover.proof(lo, hi, "float32")
    assert [n.kind for n in proof.nodes] == [SPLIT, "bounds", SPLIT, "enumeration", "z3"]
    assert decode(encode(proof)) == proof == decode(from_text(to_text(proof)))
    assert proof.leaves() == {"bounds": 1, "enumeration": 1, "z3": 1}
    with pytest.raises(ValueError, match="open"):
        Cover().proof(lo, hi, "none")
    with pytest.raises(ProofFormatError):
        decode(encode(proof)[:-3])


@pytest.mark.parametrize("seed", range(24))
def test_proofs_partition_the_region_and_agree_with_enumeration(seed):
    """Every certification keeps a proof whose leaves partition the region's points; none
    holds a misclassified point; the checker re-checks it."""
    chain, runtime, region, label = random_case(seed, maxpool=seed % 3 == 0)
    _, bad = truth(runtime, region, label)
    pts = np.concatenate(list(region.enumerate()))
    for kwargs in ({"enum_limit": 0}, {"enum_limit": 16}, {"use_smt": True, "max_nodes": 2}):
        d = decide(runtime, chain, region, label, timeout=20, **{"use_smt": False, **kwargs})
        if d.status != CERTIFIED:
            assert "proof" not in d.detail
            continue
        assert not bad.any()
        proof = proof_of(d)
        assert proof.generators == region.num_generators
        assert proof.spec == "float32" or set(proof.leaves()) == {"enumeration"}
        hits = np.zeros(len(pts), dtype=int)
        for kind, lo, hi in leaf_boxes(proof, region.lo, region.hi):
            inside = np.all((pts >= lo) & (pts <= hi), axis=1)
            hits += inside
            if kind == "empty":
                assert not inside.any()
        assert np.all(hits == 1)
        verdict = check_proof(from_text(d.detail["proof"]), problem(chain, runtime, region, label))
        assert verdict.status == CHECKED, verdict


def test_bab_proof_is_a_tree_of_many_leaves_and_checks(bab_case):
    chain, runtime, region, label, d = bab_case
    proof = proof_of(d)
    leaves = proof.leaves()
    assert sum(leaves.values()) > 1 and leaves.get("bounds", 0) >= 1
    assert sum(n.kind == SPLIT for n in proof.nodes) == sum(leaves.values()) - 1
    verdict = check_tree(proof, problem(chain, runtime, region, label))
    assert verdict.status == CHECKED and verdict.nodes == len(proof.nodes)


def test_whole_region_enumeration_z3_and_milp_leaves_check():
    chain, runtime, region, label, _, _ = _hard_robust_case()
    d = decide(runtime, chain, region, label, timeout=20)  # small: enumerated outright
    assert d.route == "enumeration" and proof_of(d).leaves() == {"enumeration": 1}
    assert check_proof(from_text(d.detail["proof"]), problem(chain, runtime, region, label)).status
    prob = problem(chain, runtime, region, label)
    for route in ("z3", "milp"):  # either exact back end closes leaves the proof keeps
        z = decide(
            runtime, chain, region, label, max_nodes=1, enum_limit=0, timeout=30, exact=route
        )
        assert z.status == CERTIFIED and proof_of(z).leaves().get(route, 0) >= 1
        assert check_tree(proof_of(z), prob).status == CHECKED
        # too large to enumerate here: z3 re-solves the leaf
        solved = check_tree(proof_of(z), replace(prob, max_points=0))
        assert solved.status == CHECKED and solved.points == 0 and solved.leaves[route] >= 1


def test_optimised_slopes_are_re_derived_by_the_checker(monkeypatch):
    """Root bounds only optimised slopes certify: the checker's plain bounds equal the search's
    plain ones and do not close the leaf; its own slope optimisation does."""
    import verifier.run.proofcheck as pc
    from verifier.engine.bounds import linear_bounds

    seen = 0
    for seed in range(300):
        chain, runtime, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        plain = linear_bounds(spec, region.lo, region.hi)
        alpha = linear_bounds(spec, region.lo, region.hi, alpha_steps=20)
        if not np.all(alpha.lower > 0) or np.all(plain.lower > 0):
            continue
        margin = float(np.min(alpha.lower))
        whole = single("float32", region.num_generators, "bounds", margin)
        prob = problem(chain, runtime, region, label, max_points=0)
        b = pc._node_bounds(prob.spec, region.lo, region.hi, None)
        np.testing.assert_allclose(b.lower, plain.lower, rtol=1e-9, atol=1e-9)
        first = pc._margin_bounds(prob.spec, region.lo, region.hi, b.pre, pc._first_only(b.cut))
        if np.all(first > 0):  # the first ReLU's cut alone closes it: no slopes needed
            continue
        assert check_tree(whole, prob).status == CHECKED
        with monkeypatch.context() as m:
            m.setattr(pc, "SLOPE_STEPS", 0)
            assert check_tree(whole, prob).status == NOT_CHECKABLE
        seen += 1
        if seen == 3:
            break
    assert seen == 3


def test_untrusted_error_model_gives_no_bounds_proof():
    """An error model the runtime contradicts at x: bounds are off, the region is enumerated,
    and its proof claims no spec (so no bounds can be checked against the wrong one)."""
    from quantize.error_model import ErrorModel
    from verifier.engine.network import Affine

    chain, runtime, region, label, _, _ = _hard_robust_case()
    last = chain[-1]
    shifted = [*chain[:-1], Affine(last.weight, last.bias + 5.0)]
    wrong = ErrorModel(prepare_chain(shifted), [None] * len(chain), "shifted logits")
    d = decide(
        runtime, chain, region, label, timeout=30.0, enum_limit=0, quantized=True, error_model=wrong
    )
    assert not d.detail["trusted_bounds"] and d.status == CERTIFIED
    assert proof_of(d).spec == "none" and proof_of(d).leaves() == {"enumeration": 1}


# --- tampering: each must fail -------------------------------------------------------------------


def _first(proof: Proof, kind: str) -> int:
    return next(i for i, n in enumerate(proof.nodes) if n.kind == kind)


def _with(proof: Proof, i: int, node: Node | None) -> Proof:
    nodes = list(proof.nodes)
    if node is None:
        del nodes[i]
    else:
        nodes[i] = node
    return replace(proof, nodes=tuple(nodes))


def leaf_removed(p: Proof, lo, hi) -> Proof:
    return _with(p, _first(p, "bounds"), None)


def last_leaf_removed(p: Proof, lo, hi) -> Proof:
    return replace(p, nodes=p.nodes[:-1])


def leaf_added(p: Proof, lo, hi) -> Proof:
    return replace(p, nodes=(*p.nodes, p.nodes[-1]))


def split_past_the_box(p: Proof, lo, hi) -> Proof:
    g, _ = p.nodes[0].values
    return _with(p, 0, Node(SPLIT, (g, int(hi[g]))))  # the right child would be empty


def split_before_the_box(p: Proof, lo, hi) -> Proof:
    g, _ = p.nodes[0].values
    return _with(p, 0, Node(SPLIT, (g, int(lo[g]) - 1)))  # the left child would be empty


def split_of_a_missing_generator(p: Proof, lo, hi) -> Proof:
    return _with(p, 0, Node(SPLIT, (len(lo), 0)))


def margin_not_closing(p: Proof, lo, hi) -> Proof:
    return _with(p, _first(p, "bounds"), Node("bounds", (-0.5,)))


def margin_inflated(p: Proof, lo, hi) -> Proof:
    return _with(p, _first(p, "bounds"), Node("bounds", (1e6,)))


def bounds_leaf_called_empty(p: Proof, lo, hi) -> Proof:
    return _with(p, _first(p, "bounds"), Node("empty", (99.0,)))


def wrong_generator_count(p: Proof, lo, hi) -> Proof:
    return replace(p, generators=p.generators + 1)


TAMPERS = [
    leaf_removed,
    last_leaf_removed,
    leaf_added,
    split_past_the_box,
    split_before_the_box,
    split_of_a_missing_generator,
    margin_not_closing,
    margin_inflated,
    bounds_leaf_called_empty,
    wrong_generator_count,
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda f: f.__name__)
def test_tampered_proof_fails(bab_case, tamper):
    chain, runtime, region, label, d = bab_case
    bad = tamper(proof_of(d), region.lo, region.hi)
    verdict = check_proof(encode(bad), problem(chain, runtime, region, label))
    assert verdict.status == FAILED, verdict
    assert verdict.message


def test_bounds_leaf_altered_to_a_claim_the_bounds_cannot_make(bab_case):
    """A bounds leaf moved onto a box its bounds do not close (the margin kept): with no room
    to enumerate it, it fails or is at best not checkable, never checked."""
    chain, runtime, region, label, _ = bab_case
    whole = single("float32", region.num_generators, "bounds", 0.25)
    prob = problem(chain, runtime, region, label, max_points=0)
    assert check_tree(whole, prob).status != CHECKED
    # with room to enumerate, the robust region is re-closed on the runtime
    assert check_tree(whole, replace(prob, max_points=10**6)).status == CHECKED


def test_enumeration_leaf_over_a_misclassified_point_fails():
    for seed in range(40):
        chain, runtime, region, label = random_case(seed)
        _, bad = truth(runtime, region, label)
        if bad.any():
            break
    n = count_points(region.lo, region.hi, region.cost, region.budget, exact=True)
    forged = single("none", region.num_generators, "enumeration", n)
    prob = problem(chain, runtime, region, label)
    verdict = check_tree(forged, prob)
    assert verdict.status == FAILED and "misclassifies the point" in verdict.message
    miscounted = single("none", region.num_generators, "enumeration", n + 1)
    assert "points, the proof says" in check_tree(miscounted, prob).message
    d = decide(runtime, chain, region, label, timeout=20)
    assert d.status == REFUTED and "proof" not in d.detail


def test_large_enumeration_leaf_is_not_checkable_and_unknown_kinds_too(bab_case):
    chain, runtime, region, label, _ = bab_case
    n = count_points(region.lo, region.hi, region.cost, region.budget, exact=True)
    whole = single("none", region.num_generators, "enumeration", n)
    prob = problem(chain, runtime, region, label, max_points=n - 1)
    assert check_tree(whole, prob).status == NOT_CHECKABLE
    future = bytearray(__import__("zlib").decompress(encode(whole)))
    future[9] = 200  # a leaf tag this version does not know
    assert check_proof(__import__("zlib").compress(bytes(future)), prob).status == NOT_CHECKABLE


def test_quantized_proofs_on_the_error_model_check(tmp_path):
    """Dynamic-range int8 with its error model: certifications keep error-model proofs that
    re-check with the model's spec (not without one), and agree with enumerating the runtime."""
    from onnx_builders import mlp

    from quantize.error_model import error_model
    from quantize.modes import quantize_model
    from verifier.engine.model import load_model
    from verifier.engine.regions import lattice_region

    model = load_model(mlp(tmp_path / "mlp.onnx", sizes=(16, 80, 40, 4), seed=3))
    rng = np.random.default_rng(0)
    runner = quantize_model(model, "dynamic", tmp_path, rng.random((128, 16), dtype=np.float32))
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    kept = 0
    for i, x in enumerate(rng.random((6, 16), dtype=np.float32)):
        pos = np.random.default_rng(10 + i).choice(16, 3, replace=False)
        region = lattice_region(x, pos, 0.125, 0.75)
        label = int(runner.predict(x[None]).argmax())
        dec = decide(
            runner, chain, region, label, timeout=30.0, enum_limit=0, quantized=True, error_model=em
        )
        if dec.status != CERTIFIED:
            continue
        _, bad = truth(runner, region, label)
        assert not bad.any()
        proof = proof_of(dec)
        assert proof.spec == "error-model" and proof.leaves().get("bounds")
        errors = rounding_errors(em.chain, region, rounding=em.rounding)
        spec = spec_chain(em.chain, region, label, errors=errors)
        verdict = check_tree(proof, Problem(region, label, runner, spec, None))
        assert verdict.status == CHECKED, verdict
        assert check_tree(proof, Problem(region, label, runner, None, None)).status == FAILED
        kept += 1
    assert kept >= 2
