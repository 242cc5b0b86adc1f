"""A tie on a quantized runtime's logit grid (`quantized_spec.decision_thresholds`): the real
int8 and QDQ runtimes' logits lie on one grid and keep the label exactly where each margin
exceeds its threshold; decisions that credit ties agree with enumeration, a rule crediting the
wrong ties is caught, and the audit re-checks proofs that need the credit."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import all_points, check_decision, random_case
from test_output_clamp import STEP, ClampRuntime, real_copies

from quantize.error_model import ErrorModel, Grid, Rounding, error_model
from quantize.rounding import TIES_HOW
from verifier.engine.bounds import linear_bounds, prepare_chain
from verifier.engine.decide import decide
from verifier.engine.network import Affine
from verifier.engine.proof import decode, from_text
from verifier.engine.quantized_spec import (
    TIE_RTOL,
    decision_thresholds,
    output_lattice,
    quantized_spec,
)
from verifier.engine.regions import feature_region
from verifier.engine.result import CERTIFIED
from verifier.run.proofcheck import CHECKED, Problem, check_tree

DELTA = 0.5  # the winner's lead over the class it ties with, in grid steps


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The MLP of `test_output_clamp`, its int8 TFLite, ONNX Runtime QDQ and dynamic-range files."""
    return real_copies(tmp_path_factory.mktemp("ties"), dynamic=True)


def _feature_region(x: np.ndarray, seed: int):
    feats = np.array_split(np.random.default_rng(seed).permutation(x.size)[:12], 6)
    return feature_region(x, feats, step=0.25, radius=3.0)


@pytest.mark.parametrize("name", ["int8", "ort-qdq", "ort-qdq-pc"])
def test_real_logits_keep_the_label_exactly_above_the_thresholds(real, name):
    """At every point of small regions the runtime's logits lie on the error model's last grid,
    and the runtime keeps the label against a class exactly where that margin exceeds its
    threshold: minus (almost) a step for the classes after the label, 0 before it; the
    report's line on the error model says so."""
    model, runners, xs = real
    runner = runners[name]
    em = error_model(runner, prepare_chain(model.network.lower()))
    assert TIES_HOW in em.describe()["how"]
    step, origin = output_lattice(em)[-1]
    for i, x in enumerate(xs):
        region = _feature_region(x, i)
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        bar = decision_thresholds(em, spec)
        after = spec.others > label
        assert np.array_equal(bar, np.where(after, -step * (1 - TIE_RTOL), 0.0))
        y = runner.predict(region.points(all_points(region)).astype(np.float32))
        y = np.asarray(y, np.float64)
        units = (y - origin) / step
        assert np.allclose(units, np.round(units), rtol=0, atol=1e-4)
        m = y[:, [label]] - y[:, spec.others]
        keeps = (m > 0) | ((m == 0) & after)  # ties go to the lower class
        assert np.array_equal(m > bar, keeps)


def test_no_credit_without_a_logit_grid(real):
    """A dynamic-range copy's logits are float32: every threshold is 0."""
    model, runners, xs = real
    em = error_model(runners["dynamic"], prepare_chain(model.network.lower()))
    assert TIES_HOW not in em.describe()["how"]
    region = _feature_region(xs[0], 0)
    label = int(runners["dynamic"].predict(xs[:1]).argmax())
    spec = quantized_spec(em, region, label).spec
    assert output_lattice(em) is None or output_lattice(em)[-1] is None
    assert np.array_equal(decision_thresholds(em, spec), np.zeros(len(spec.others)))


def _tied_case(seed: int, first: bool):
    """(runtime, error model, chain, region, label): logits 0 and 1 the same function but for a
    lead of DELTA steps (class 0's when `first`, else class 1's), the others far below, rounded
    to a grid of step STEP: the two tie wherever the lead does not cross a rounding boundary."""
    chain, _, region, _ = random_case(seed)
    last = chain[-1]
    row, bias = last.weight[:1], last.bias[:1]
    lead = np.array([DELTA * STEP, 0.0, -1.0]) if first else np.array([0.0, DELTA * STEP, -1.0])
    chain = [*chain[:-1], Affine(np.repeat(row, 3, axis=0), np.repeat(bias, 3) + lead)]
    runtime = ClampRuntime(chain, region.x.size, -1e3, 1e3)
    rounding = [Rounding() if isinstance(x, Affine) else None for x in chain]
    rounding[-1] = Rounding(output_grid=Grid(STEP, -1e3, 1e3))
    em = ErrorModel(prepare_chain(chain), rounding, "rounded logits")
    label = int(runtime.predict(region.x[None]).argmax())
    return runtime, em, chain, region, label


def _ties(runtime, region) -> bool:
    y = runtime.predict(region.points(all_points(region)))
    return bool(np.any(y[:, 0] == y[:, 1]))


@pytest.mark.parametrize("first", [True, False], ids=["label-first", "label-second"])
def test_tie_decisions_agree_with_enumeration(first):
    """Through the bounds route (small enumeration limit): certified only where enumerating the
    runtime finds no misclassified point. Where the label comes first its ties with class 1
    are its own, and regions holding ties are certified by their bounds alone (0 would have
    needed every point run); where it comes second, a region holding a tie is never
    certified."""
    by_bounds_with_ties = 0
    for seed in range(12):
        runtime, em, chain, region, label = _tied_case(seed, first)
        d = decide(
            runtime, chain, region, label, timeout=20, enum_limit=4, quantized=True, error_model=em
        )
        check_decision(d, runtime, region, label)
        ties = _ties(runtime, region)
        if first:
            assert label == 0 and d.status == CERTIFIED
            by_bounds_with_ties += ties and d.route == "bounds"
        elif label == 1 and ties:
            assert d.status != CERTIFIED
    if first:
        assert by_bounds_with_ties >= 3


def _bars_broken(rule, runtime, em, region, label) -> bool:
    """Whether some margin's linear lower bound over the region exceeds the threshold `rule`
    gives it while the runtime leaves the label for that class at some point."""
    spec = quantized_spec(em, region, label).spec
    lower = linear_bounds(spec, region.lo, region.hi).lower
    y = runtime.predict(region.points(all_points(region))).astype(np.float64)
    m = y[:, [label]] - y[:, spec.others]
    loses = (m < 0) | ((m == 0) & (spec.others < label))
    return bool(np.any((lower > rule(em, spec)) & loses.any(axis=0)))


def test_crediting_the_wrong_ties_is_caught():
    """No margin bound exceeds its threshold where the runtime loses the label against that
    class; a rule that credits every margin (ties against earlier classes too) does."""

    def every_margin(model, spec):
        return np.full(len(spec.others), -output_lattice(model)[-1][0] * (1 - TIE_RTOL))

    wrong = 0
    for seed in range(12):
        for first in (True, False):
            case = _tied_case(seed, first)
            assert not _bars_broken(decision_thresholds, *case[:2], *case[3:])
            wrong += _bars_broken(every_margin, *case[:2], *case[3:])
    assert wrong > 0


def test_the_audit_rechecks_proofs_that_need_the_credit():
    """Proofs whose bounds leaves close only above the ties' thresholds re-check with the
    thresholds the audit derives from the error model, and are not checked without them."""
    checked = 0
    for seed in range(12):
        runtime, em, chain, region, label = _tied_case(seed, first=True)
        d = decide(
            runtime, chain, region, label, timeout=20, enum_limit=4, quantized=True, error_model=em
        )
        if d.route != "bounds" or "proof" not in d.detail:
            continue
        proof = decode(from_text(d.detail["proof"]))
        spec = quantized_spec(em, region, label).spec
        bar = decision_thresholds(em, spec)
        with_bar = Problem(region, label, runtime, spec, max_points=0, threshold=bar)
        assert check_tree(proof, with_bar).status == CHECKED
        assert check_tree(proof, Problem(region, label, runtime, spec, max_points=0)).status != (
            CHECKED
        )
        checked += 1
    assert checked >= 3
