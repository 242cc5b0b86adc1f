"""A new nonlinear operator is one class: the engine's bounds, gradients and attack use it
through the `Nonlinear` protocol alone (a leaky ReLU defined here, not in the engine)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from verifier.engine.bounds import interval_bounds, linear_bounds, spec_chain
from verifier.engine.network import Affine, Relu, forward_lowered, jacobian
from verifier.engine.proof import SPECS, encode, single
from verifier.engine.regions import feature_region
from verifier.run.proofcheck import NOT_CHECKABLE, Problem, check_proof


@dataclass(frozen=True)
class LeakyRelu:
    """max(x, a x) with 0 < a < 1: below by the chord's parallel through 0, above by the chord."""

    a: float = 0.1

    def forward(self, v):
        return np.maximum(v, self.a * v)

    def backward(self, g, v):
        return g * np.where(v > 0, 1.0, self.a)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def _lines(self, lo, hi):
        unstable = (lo < 0) & (hi > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            chord = (self.forward(hi) - self.forward(lo)) / np.where(unstable, hi - lo, 1.0)
        su = np.where(unstable, chord, np.where(lo >= 0, 1.0, self.a))
        iu = np.where(unstable, self.forward(lo) - su * lo, 0.0)
        sl = np.where(unstable, np.where(hi > -lo, 1.0, self.a), su)
        return sl, su, iu

    def back_step(self, lam, c, lo, hi, slope=None):
        sl, su, iu = self._lines(lo, hi)
        pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        return pos * sl + neg * su, c + neg @ iu

    def relaxed_value(self, v, lam, lo, hi, slope=None):
        sl, su, iu = self._lines(lo, hi)
        return np.where(lam >= 0, v * sl, v * su + iu)

    def encode(self, enc, forms, lo, hi, tag):
        raise NotImplementedError


def _case(seed: int):
    rng = np.random.default_rng(seed)
    n, h = 8, 12
    chain = [
        Affine(rng.normal(size=(h, n)), rng.normal(size=h) * 0.3),
        LeakyRelu(0.2),
        Affine(rng.normal(size=(h, h)) / np.sqrt(h), rng.normal(size=h) * 0.3),
        Relu(),
        Affine(rng.normal(size=(3, h)) / np.sqrt(h), rng.normal(size=3) * 0.3),
    ]
    x = rng.uniform(0, 1, n)
    label = int(forward_lowered(chain, x[None]).argmax())
    region = feature_region(x, np.array_split(rng.permutation(n), 6), 0.25, 1.5)
    return chain, x, label, region


@pytest.mark.parametrize("seed", range(8))
def test_bounds_through_a_new_operator_hold_at_every_point(seed):
    chain, _, label, region = _case(seed)
    spec = spec_chain(chain, region, label, float32=False)
    pts = np.concatenate(list(region.enumerate()))
    logits = forward_lowered(chain, region.points(pts))
    real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
    ibp = interval_bounds(spec, region.lo, region.hi)
    crown = linear_bounds(spec, region.lo, region.hi)
    assert np.all(ibp.lower <= real + 1e-9) and np.all(crown.lower <= real + 1e-9)
    assert np.all(crown.lower >= ibp.lower - 1e-9)  # back-substitution is at least as tight


def test_gradient_through_a_new_operator_matches_finite_differences():
    chain, x, label, _ = _case(3)
    out, jac = jacobian(chain, x)
    eps = 1e-6
    for i in range(len(x)):
        step = np.zeros_like(x)
        step[i] = eps
        num = (forward_lowered(chain, (x + step)[None]) - forward_lowered(chain, x[None]))[0] / eps
        assert np.allclose(jac[:, i], num, atol=1e-4)
    assert np.allclose(out, forward_lowered(chain, x[None])[0])


def test_proof_check_refuses_an_operator_it_cannot_recheck():
    chain, _, label, region = _case(1)
    spec = spec_chain(chain, region, label)
    data = encode(single(SPECS[0], region.num_generators, "bounds", 0.5))
    verdict = check_proof(data, Problem(region, label, None, spec))
    assert verdict.status == NOT_CHECKABLE and "LeakyRelu" in verdict.message
