"""The mixed-integer back end against full enumeration on tiny random ReLU networks."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import ChainRuntime, check_decision, random_box, random_case, truth

from verifier.engine.bounds import linear_bounds, spec_chain
from verifier.engine.decide import decide
from verifier.engine.milp import SAFETY, milp_decide
from verifier.engine.network import Affine, Relu, forward_lowered
from verifier.engine.result import CERTIFIED


def _boxes(region, seed: int):
    """The region's box and two random sub-boxes."""
    rng = np.random.default_rng(seed + 7)
    out = [(region.lo, region.hi)]
    for _ in range(2):
        out.append(random_box(region, rng))
    return out


@pytest.mark.parametrize("seed", range(24))
def test_milp_agrees_with_enumeration(seed):
    """unsat only when every point's margin is positive on the runtime; sat on clear errors
    with a candidate in the sub-box; the minimum found is the enumerated one."""
    chain, runtime, region, label = random_case(seed)
    spec = spec_chain(chain, region, label)
    for lo, hi in _boxes(region, seed):
        parts = list(region.enumerate(lo=lo, hi=hi))
        if not parts:
            continue
        pts = np.concatenate(parts)
        logits = runtime.predict(region.points(pts)).astype(np.float64)
        runtime_min = (logits[:, [label]] - logits[:, spec.others]).min()
        exact = forward_lowered(chain, region.points(pts))
        exact_min = (exact[:, [label]] - exact[:, spec.others]).min()
        b = linear_bounds(spec, lo, hi)
        res = milp_decide(spec, lo, hi, b, timeout_s=20.0)
        if res.status == "unsat":
            assert runtime_min > 0 and exact_min > 0, (res, runtime_min)
        else:
            assert res.status == "sat", res
            assert np.all((res.coeffs >= lo) & (res.coeffs <= hi))
            assert region.contains(res.coeffs[None])[0]
        if exact_min < -0.01:
            assert res.status == "sat"
        if exact_min > 2 * SAFETY + 1e-3:
            assert res.status == "unsat"


def test_milp_with_relus_relaxed_is_sound_and_looser():
    """With some ReLU layers' phases relaxed (`exact`) the program is a relaxation: never
    "unsat" at a threshold above the exact minimum; and with every phase relaxed it fails to
    prove some threshold just below the exact minimum that the exact program proves (ignoring
    `exact` would prove it)."""
    looser = 0
    for seed in range(16):
        chain, runtime, region, label = random_case(seed)
        spec = spec_chain(chain, region, label)
        pts = np.concatenate(list(region.enumerate()))
        exact = forward_lowered(chain, region.points(pts))
        cut = float((exact[:, [label]] - exact[:, spec.others]).min()) - 0.05
        b = linear_bounds(spec, region.lo, region.hi)
        full = milp_decide(spec, region.lo, region.hi, b, 20.0, cut)
        assert full.status == "unsat", (seed, full)
        relus = [i for i, layer in enumerate(spec.layers) if isinstance(layer, Relu)]
        for keep in ([], relus[:1], relus[-1:]):
            res = milp_decide(spec, region.lo, region.hi, b, 20.0, cut, exact=keep)
            above = milp_decide(spec, region.lo, region.hi, b, 20.0, cut + 0.1, exact=keep)
            assert above.status != "unsat", (seed, keep)
            if not keep:
                looser += res.status != "unsat"
    assert looser >= 1


def _hard_case(maxpool: bool):
    """A robust region whose root bounds do not certify it."""
    for seed in range(400):
        chain, runtime, region, label = random_case(seed, maxpool)
        _, bad = truth(runtime, region, label)
        if bad.any():
            continue
        spec = spec_chain(chain, region, label)
        if not np.all(linear_bounds(spec, region.lo, region.hi).lower > 0):
            return chain, runtime, region, label
    pytest.skip("no robust region with failing root bounds among the seeds")


@pytest.mark.parametrize(
    "maxpool, exact, route",
    [(False, "milp", "milp"), (True, "milp", "z3"), (False, "z3", "z3")],
    ids=["milp", "maxpool-z3", "asked-z3"],
)
def test_decide_routes_leaves_to_the_exact_back_end(maxpool, exact, route):
    """The program takes the leaves of chains it encodes; z3 those with a max pool, or all
    when asked."""
    chain, runtime, region, label = _hard_case(maxpool)
    d = decide(runtime, chain, region, label, max_nodes=0, enum_limit=0, timeout=30, exact=exact)
    check_decision(d, runtime, region, label)
    assert d.status == CERTIFIED and d.detail["leaves"].get(route, 0) >= 1


def test_decide_rejects_unknown_back_ends():
    chain, runtime, region, label = random_case(2)
    with pytest.raises(ValueError):
        decide(runtime, chain, region, label, timeout=5.0, exact="lp")
    with pytest.raises(ValueError):
        decide(runtime, chain, region, label, timeout=5.0, splits="random")


@pytest.mark.parametrize("seed", range(24))
def test_decide_with_milp_agrees_with_enumeration(seed):
    chain, runtime, region, label = random_case(seed)
    d = decide(runtime, chain, region, label, max_nodes=2, enum_limit=0, timeout=20, seed=seed)
    check_decision(d, runtime, region, label)


@pytest.mark.parametrize("seed", range(6))
def test_milp_with_consecutive_affine_layers(seed):
    """An affine output feeding another affine layer is a free variable of the program."""
    chain, runtime, region, label = random_case(seed)
    rng = np.random.default_rng(seed)
    n = region.x.size
    chain = [Affine(np.eye(n) + 0.1 * rng.normal(size=(n, n)), 0.1 * rng.normal(size=n)), *chain]
    runtime = ChainRuntime(chain, n)
    label = int(runtime.predict(region.x[None]).argmax())
    spec = spec_chain(chain, region, label)
    pts = np.concatenate(list(region.enumerate()))
    exact = forward_lowered(chain, region.points(pts))
    exact_min = (exact[:, [label]] - exact[:, spec.others]).min()
    res = milp_decide(spec, region.lo, region.hi, linear_bounds(spec, region.lo, region.hi), 20.0)
    if res.status == "unsat":
        assert exact_min > 0
    if exact_min < -0.01:
        assert res.status == "sat"
    if exact_min > 2 * SAFETY + 1e-3:
        assert res.status == "unsat"
