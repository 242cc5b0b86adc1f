"""Adversarial points on feature regions for the analyses: the engine's attack on one runtime.

`attack` runs `verifier.engine.attack.quick_attack`, then `search_attack` until the timeout, on the
given runtime (guided by the margins of the given lowered chain: the float chain, or a
fake-quantized one for a quantized source). It returns the confirmed counterexample when one
is found, else the lowest-margin point seen, so every attempted input has a point to replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from verifier.engine.attack import quick_attack, search_attack
from verifier.engine.bounds import spec_chain
from verifier.engine.regions import Region
from verifier.run.check import Settings, build_region


@dataclass(frozen=True)
class AttackPoint:
    """The point an attack returns: coefficients, whether the runtime was fooled, its label."""

    coeffs: np.ndarray  # (G,) int64
    success: bool  # confirmed misclassified on the attacked runtime
    adv_label: int | None
    evaluations: int


def attack(
    runtime, chain, region: Region, label: int, *, timeout: float, seed: int = 0
) -> AttackPoint:
    """The engine's attack on `runtime` over `region` (see the module docstring)."""
    spec = spec_chain(chain, region, label, float32=True)
    first = quick_attack(runtime, spec, region, label, seed=seed)
    if first.coeffs is not None:
        return AttackPoint(first.coeffs, True, first.adv_label, first.evaluations)
    deadline = time.perf_counter() + timeout
    res = search_attack(
        runtime, spec, region, label, start=first.best, seed=seed, deadline=deadline
    )
    evals = first.evaluations + res.evaluations
    if res.coeffs is not None:
        return AttackPoint(res.coeffs, True, res.adv_label, evals)
    best = res.best if res.best_margin <= first.best_margin else first.best
    return AttackPoint(np.asarray(best, dtype=np.int64), False, None, evals)


def regions(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray, chain, radius: float, step: float
) -> list[Region]:
    """The paper's feature regions (10 values per feature, activation heuristic) per input."""
    st = Settings(radius=radius, step=step)
    return [build_region(st, x[i], chain, int(y[i]), int(indices[i])) for i in range(len(y))]


def points(region_list: list[Region], coeffs: list[np.ndarray]) -> np.ndarray:
    """The perturbed inputs (N, n) float32 of one coefficient vector per region."""
    return np.stack(
        [r.points(c[None])[0] for r, c in zip(region_list, coeffs, strict=True)]
    ).astype(np.float32)
