"""z3 on the exact encoding agrees with full enumeration on small networks and regions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from verifier.engine.enumeration import confirm
from verifier.engine.network import Affine, MaxPool, Relu, forward_lowered
from verifier.engine.regions import Region, feature_region, lattice_region
from verifier.engine.smt import _dyadic, interval_pre_bounds, smt_decide

# Margins within this distance of 0 are ties: the exact answer there depends on the last bits,
# which float64 enumeration cannot settle, so such cases are skipped (never counted as agreeing).
TIE = 1e-9
SEEDS = range(24)


class ChainRuntime:
    """A runtime that runs the lowered chain in float64 (the exact network up to rounding)."""

    def __init__(self, chain, n: int):
        self.chain, self.input_shape = chain, (n,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return forward_lowered(self.chain, np.asarray(x, np.float64).reshape(len(x), -1))


def f32(a: np.ndarray) -> np.ndarray:
    """Weights as a real model has them: float32 values held in float64."""
    return np.asarray(a, np.float32).astype(np.float64)


def random_chain(rng: np.random.Generator, n: int, classes: int = 3) -> list:
    """Affine/Relu chain with 1-2 hidden layers of 4-12 neurons."""
    chain, prev = [], n
    for _ in range(int(rng.integers(1, 3))):
        h = int(rng.integers(4, 13))
        chain += [
            Affine(f32(rng.normal(0, 1.5 / np.sqrt(prev), (h, prev))), f32(rng.normal(0, 0.2, h))),
            Relu(),
        ]
        prev = h
    chain.append(
        Affine(
            f32(rng.normal(0, 1.5 / np.sqrt(prev), (classes, prev))),
            f32(rng.normal(0, 0.2, classes)),
        )
    )
    return chain


def case(seed: int) -> tuple[list, Region, int]:
    """A random network, a small lattice (even seeds) or features (odd seeds) region, a label."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 11))
    chain = random_chain(rng, n)
    x = f32(rng.random(n))
    label = int(forward_lowered(chain, x[None]).argmax())
    if seed % 2 == 0:
        dims = int(rng.integers(2, 4))
        region = lattice_region(x, rng.choice(n, dims, replace=False), 0.25, 1.0)
    else:
        feats = [rng.choice(n, 2, replace=False) for _ in range(int(rng.integers(4, 7)))]
        region = feature_region(x, feats, 0.5, 2.0)
    return chain, region, label


def enumerated(chain, region: Region, label: int, lo=None, hi=None):
    """All points of the (sub)box and their margins `logit[label] - max other` in float64."""
    s = np.concatenate(list(region.enumerate(lo=lo, hi=hi)))
    logits = forward_lowered(chain, region.points(s))
    return s, logits[:, label] - np.delete(logits, label, axis=1).max(axis=1)


def check_against_enumeration(chain, region, label, lo=None, hi=None, pre_bounds=None):
    s, margins = enumerated(chain, region, label, lo, hi)
    if np.abs(margins).min() < TIE:
        pytest.skip("a point sits on a tie (margin within 1e-9 of 0)")
    res = smt_decide(chain, region, label, 20.0, lo=lo, hi=hi, pre_bounds=pre_bounds)
    expected = "sat" if np.any(margins <= 0) else "unsat"
    assert res.status == expected
    if res.status == "sat":
        assert res.coeffs.dtype == np.int64
        assert region.contains(res.coeffs)[0]
        if lo is not None:
            assert np.all(res.coeffs >= lo) and np.all(res.coeffs <= hi)
        logits = forward_lowered(chain, region.points(res.coeffs))[0]
        assert logits.argmax() != label
    return res


def test_dyadic_is_exact():
    a = np.array([0.1, -3.0, 1e-30, 2.0**60, 0.0, np.float32(0.7), -5e-324])
    ints, exp = _dyadic(a)
    assert exp <= 0
    for v, i in zip(a, ints, strict=True):
        assert Fraction(float(v)) == Fraction(int(i)) * Fraction(2) ** exp


def test_cases_cover_both_answers():
    """The enumeration test below is only meaningful if both answers occur among its cases."""
    answers = set()
    for seed in SEEDS:
        chain, region, label = case(seed)
        answers.add(bool(np.any(enumerated(chain, region, label)[1] <= 0)))
    assert answers == {True, False}


@pytest.mark.parametrize("seed", SEEDS)
def test_agrees_with_enumeration(seed):
    check_against_enumeration(*case(seed))


@pytest.mark.parametrize("seed", range(6))
def test_sub_box_agrees_with_enumeration(seed):
    chain, region, label = case(100 + seed)
    lo, hi = region.lo.copy(), region.hi.copy()
    lo[0] = hi[0] = hi[0]  # pin the first generator to its top value
    hi[1] = max(lo[1], 0)
    check_against_enumeration(chain, region, label, lo, hi)


def exact_pre_bounds(chain, region: Region):
    """Pre-activation min / max of each Relu over the region's points, widened by 1e-9.

    Sound for the encoding, which only ever reasons about these points.
    """
    s = np.concatenate(list(region.enumerate()))
    a, out = region.points(s), []
    for layer in chain:
        if isinstance(layer, Relu):
            out.append((a.min(axis=0) - 1e-9, a.max(axis=0) + 1e-9))
        a = forward_lowered([layer], a)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_pre_bounds_fixing_neurons_keeps_answers(seed):
    chain, region, label = case(200 + seed)
    tight = exact_pre_bounds(chain, region)
    loose = interval_pre_bounds(chain, region)
    unstable = [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in loose]
    fixed = [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in tight]
    plain = check_against_enumeration(chain, region, label)
    bounded = check_against_enumeration(chain, region, label, pre_bounds=tight)
    assert plain.status == bounded.status
    assert sum(fixed) <= sum(unstable)


def test_pre_bounds_fix_some_neurons_somewhere():
    """The tight bounds really fix neurons the interval bounds leave open in these cases."""
    diffs = []
    for seed in range(8):
        chain, region, _ = case(200 + seed)
        loose = sum(
            int(((lo < 0) & (hi > 0)).sum()) for lo, hi in interval_pre_bounds(chain, region)
        )
        tight = sum(int(((lo < 0) & (hi > 0)).sum()) for lo, hi in exact_pre_bounds(chain, region))
        diffs.append(loose - tight)
    assert max(diffs) > 0


def test_pre_bounds_length_is_checked():
    chain, region, label = case(1)
    with pytest.raises(ValueError, match="pre_bounds"):
        smt_decide(chain, region, label, 5.0, pre_bounds=[])


@pytest.mark.parametrize("seed", range(6))
def test_maxpool_chain(seed):
    rng = np.random.default_rng(300 + seed)
    n = 6
    windows = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [7, -1]], dtype=np.int64)
    chain = [
        Affine(f32(rng.normal(0, 0.8, (8, n))), f32(rng.normal(0, 0.2, 8))),
        Relu(),
        MaxPool(windows),
        Affine(f32(rng.normal(0, 0.8, (3, 5))), f32(rng.normal(0, 0.2, 3))),
    ]
    x = f32(rng.random(n))
    label = int(forward_lowered(chain, x[None]).argmax())
    region = lattice_region(x, rng.choice(n, 3, replace=False), 0.25, 1.0)
    check_against_enumeration(chain, region, label)


def test_margin_asks_for_small_margins():
    chain, region, label = case(3)
    _, margins = enumerated(chain, region, label)
    m = float(margins.min())
    assert smt_decide(chain, region, label, 20.0, margin=m + 1e-6).status == "sat"
    assert smt_decide(chain, region, label, 20.0, margin=m - 1e-6).status == "unsat"


def test_confirm_uses_the_runtime():
    seeds = [s for s in SEEDS if np.any(enumerated(*case(s))[1] < -TIE)]
    chain, region, label = case(seeds[0])
    rt = ChainRuntime(chain, region.x.size)
    res = smt_decide(chain, region, label, 20.0)
    adv = confirm(rt, region, res.coeffs, label)
    assert adv is not None and adv != label
    assert confirm(rt, region, np.zeros(region.num_generators, np.int64), label) is None
    outside = region.hi + 1
    assert confirm(rt, region, outside, label) is None


def test_exact_tie_is_sat_but_not_confirmed():
    """At an exact tie z3 answers sat; the runtime's argmax keeps the label: the caller's check."""
    chain = [Affine(np.array([[1.0], [-1.0]]), np.array([0.0, 1.0]))]  # logits x, 1 - x
    region = lattice_region(np.array([0.75]), np.array([0]), 0.25, 0.25)  # x in {.5, .75, 1}
    res = smt_decide(chain, region, 0, 5.0)
    assert res.status == "sat" and res.coeffs.tolist() == [-1]
    assert confirm(ChainRuntime(chain, 1), region, res.coeffs, 0) is None


def test_timeout_gives_unknown():
    chain, region, label = case(0)
    res = smt_decide(chain, region, label, 1e-6)
    assert res.status == "unknown" and res.coeffs is None


def test_empty_sub_box_is_unsat():
    chain, region, label = case(0)
    lo = region.lo.copy()
    lo[0] = region.hi[0] + 1
    assert smt_decide(chain, region, label, 5.0, lo=lo).status == "unsat"
