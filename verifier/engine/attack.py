"""Cheap refutations: gradient-guided extreme points and beam / local search over generators.

Guidance comes from the float chain (margins and their Jacobian in coefficient space); every
candidate is judged on the runtime, and a misclassified one is re-run through `confirm`
(`region.points`, the runtime's argmax) before it is returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from verifier.engine.bounds import SpecChain
from verifier.engine.enumeration import confirm, margins_and_labels
from verifier.engine.network import forward_lowered, jacobian
from verifier.engine.regions import EPS, Region


@dataclass
class AttackResult:
    """A confirmed counterexample (or None), the best runtime margin seen, and the effort."""

    coeffs: np.ndarray | None
    adv_label: int | None
    best: np.ndarray  # (G,) coefficients with the lowest runtime margin seen
    best_margin: float
    evaluations: int = 0


# --- the chain in coefficient space ------------------------------------------------------------


def spec_forward(spec: SpecChain, s: np.ndarray) -> np.ndarray:
    """Margins (B, K-1) of the float chain at coefficients `s` (B, G)."""
    return forward_lowered(spec.layers, np.asarray(s, dtype=np.float64))


def spec_jacobian(spec: SpecChain, s: np.ndarray) -> np.ndarray:
    """Jacobian (K-1, G) of the chain's margins w.r.t. the coefficients at one point `s`."""
    return jacobian(spec.layers, s)[1]


def greedy_extreme(
    a: np.ndarray, lo: np.ndarray, hi: np.ndarray, cost: np.ndarray, budget: float
) -> np.ndarray:
    """Integer points (m, G) lowering each row's `a . s`: generators by decreasing
    |a_g| / cost_g pushed to the extreme, the one the budget cuts short floored."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    p = np.clip(0, lo, hi)
    cap = max(budget - float(np.abs(p) @ cost), 0.0)
    down = a > 0
    room = np.where(down, p - lo, np.where(a < 0, hi - p, 0))
    weight = room * cost
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cost > 0, np.abs(a) / np.where(cost > 0, cost, 1.0), np.inf)
    order = np.argsort(-ratio, axis=1, kind="stable")
    w_sorted = np.take_along_axis(weight, order, axis=1)
    c_sorted = np.take_along_axis(np.broadcast_to(cost, a.shape), order, axis=1)
    left = cap - (np.cumsum(w_sorted, axis=1) - w_sorted) + EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(c_sorted > 0, np.floor(np.maximum(left, 0.0) / c_sorted), np.inf)
    take_sorted = np.minimum(np.take_along_axis(room, order, axis=1), units)
    take = np.empty_like(room)
    np.put_along_axis(take, order, take_sorted.astype(np.int64), axis=1)
    return p + np.where(down, -take, take)


# --- evaluation on the runtime -----------------------------------------------------------------


class _Judge:
    """Evaluates candidate batches on the runtime, keeps the best, stops at a confirmed error."""

    def __init__(self, runtime, region: Region, label: int):
        self.runtime, self.region, self.label = runtime, region, label
        self.best = np.zeros(region.num_generators, dtype=np.int64)
        self.best_margin = np.inf
        self.evaluations = 0
        self.found: tuple[np.ndarray, int] | None = None

    def __call__(self, cands: np.ndarray) -> np.ndarray:
        """Runtime margins of the candidates inside the region (others get +inf)."""
        cands = np.asarray(cands, dtype=np.int64).reshape(-1, self.region.num_generators)
        margins = np.full(len(cands), np.inf)
        ok = self.region.contains(cands)
        if not ok.any() or self.found is not None:
            return margins
        m, labels = margins_and_labels(self.runtime, self.region, cands[ok], self.label)
        self.evaluations += int(ok.sum())
        margins[ok] = m
        i = int(np.argmin(margins))
        if margins[i] < self.best_margin:
            self.best, self.best_margin = cands[i].copy(), float(margins[i])
        for k in np.flatnonzero(labels != self.label)[:8]:
            s = cands[ok][k]
            adv = confirm(self.runtime, self.region, s, self.label)
            if adv is not None:
                self.found = (s.copy(), adv)
                break
        return margins

    def result(self) -> AttackResult:
        coeffs, adv = self.found if self.found is not None else (None, None)
        return AttackResult(coeffs, adv, self.best, self.best_margin, self.evaluations)


# --- attacks -----------------------------------------------------------------------------------


def quick_attack(
    runtime, spec: SpecChain, region: Region, label: int, *, seed: int = 0, n_random: int = 16
) -> AttackResult:
    """One runtime batch: x itself, the extreme point along each margin's gradient at x, and
    gradient-plus-noise and random extreme points."""
    judge = _Judge(runtime, region, label)
    judge(
        np.concatenate(
            [
                np.zeros((1, region.num_generators), dtype=np.int64),
                _extremes(spec, region, np.zeros(region.num_generators), seed, n_random),
            ]
        )
    )
    return judge.result()


def _extremes(
    spec: SpecChain, region: Region, point: np.ndarray, seed: int, n_random: int
) -> np.ndarray:
    """Extreme points of the region along the margins' gradients at `point`, with noise."""
    rng = np.random.default_rng(seed)
    g = region.num_generators
    jac = spec_jacobian(spec, point)
    scale = np.abs(jac).mean() + 1e-12
    dirs = np.concatenate(
        [
            jac,
            jac.min(axis=0, keepdims=True),
            jac[:1] + rng.normal(size=(n_random, g)) * scale,
            rng.normal(size=(n_random, g)),
        ]
    )
    return greedy_extreme(dirs, region.lo, region.hi, region.cost, region.budget)


def search_attack(
    runtime,
    spec: SpecChain,
    region: Region,
    label: int,
    *,
    deadline: float,
    start: np.ndarray | None = None,
    beam: int = 8,
    seed: int = 0,
    iters: int = 3,
) -> AttackResult:
    """Until `deadline`: gradient extremes re-linearised at the best point (`iters` rounds),
    local search from the best point, beam search from 0, local search again. Moves change
    one coefficient (or swap two 0/1 generators); the runtime margin judges."""
    judge = _Judge(runtime, region, label)
    point = np.zeros(region.num_generators, dtype=np.int64) if start is None else start
    judge(point[None])
    for i in range(iters):
        if judge.found is not None or time.perf_counter() > deadline:
            break
        judge(_extremes(spec, region, point.astype(np.float64), seed + i + 1, 8))
        if np.array_equal(judge.best, point):
            break
        point = judge.best.copy()
    if judge.found is None:
        _local_search(judge, region, judge.best.copy(), deadline)
    if judge.found is None:
        _beam_search(judge, region, beam, deadline)
    if judge.found is None and time.perf_counter() < deadline:
        _local_search(judge, region, judge.best.copy(), deadline)
    return judge.result()


def _moves(region: Region, s: np.ndarray, swaps: bool) -> np.ndarray:
    """Neighbours of `s`: one coefficient set to another value of its range; swaps of two
    0/1 generators (one off, one on); all within the budget."""
    out = []
    for j in range(region.num_generators):
        vals = np.arange(region.lo[j], region.hi[j] + 1)
        vals = vals[vals != s[j]]
        if len(vals):
            block = np.tile(s, (len(vals), 1))
            block[:, j] = vals
            out.append(block)
    if swaps:
        on = np.flatnonzero(s == 1)
        off = np.flatnonzero((s == 0) & (region.hi >= 1))
        if len(on) and len(off):
            i, j = np.meshgrid(on, off, indexing="ij")
            block = np.tile(s, (i.size, 1))
            rows = np.arange(i.size)
            block[rows, i.ravel()] = 0
            block[rows, j.ravel()] = 1
            out.append(block)
    if not out:
        return np.zeros((0, region.num_generators), dtype=np.int64)
    cands = np.concatenate(out)
    return cands[region.contains(cands)]


def _binary(region: Region) -> bool:
    return bool(np.all((region.lo >= 0) & (region.hi <= 1)))


def _local_search(judge: _Judge, region: Region, s: np.ndarray, deadline: float) -> None:
    """Steepest descent on the runtime margin over `_moves` until no move improves."""
    swaps = _binary(region)
    current = float(judge(s[None])[0])
    while judge.found is None and time.perf_counter() < deadline:
        cands = _moves(region, s, swaps)
        if not len(cands):
            return
        margins = judge(cands)
        i = int(np.argmin(margins))
        if margins[i] >= current:
            return
        s, current = cands[i], float(margins[i])


def _beam_search(judge: _Judge, region: Region, beam: int, deadline: float) -> None:
    """Grow coefficient vectors one move at a time from 0, keeping the `beam` lowest margins."""
    g = region.num_generators
    states = np.zeros((1, g), dtype=np.int64)
    seen: set[bytes] = {states[0].tobytes()}
    while judge.found is None and time.perf_counter() < deadline:
        cands = [c for st in states for c in _grow(region, st)]
        fresh = [c for c in cands if c.tobytes() not in seen]
        if not fresh:
            return
        block = np.unique(np.stack(fresh), axis=0)
        seen.update(r.tobytes() for r in block)
        margins = judge(block)
        keep = np.argsort(margins, kind="stable")[:beam]
        keep = keep[np.isfinite(margins[keep])]
        if not len(keep):
            return
        states = block[keep]


def _grow(region: Region, s: np.ndarray) -> list[np.ndarray]:
    """Moves of `s` that push one coefficient further from 0 (to its extreme or one step)."""
    out = []
    for j in range(region.num_generators):
        for v in {region.lo[j], region.hi[j], s[j] - 1, s[j] + 1}:
            if region.lo[j] <= v <= region.hi[j] and abs(v) > abs(s[j]):
                c = s.copy()
                c[j] = v
                out.append(c)
    return (
        [c for c, ok in zip(out, region.contains(np.array(out)), strict=True) if ok] if out else []
    )
