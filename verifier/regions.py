"""Regions of pixel manipulations as integer generators (SPEC section 3).

A region around `x` is `x' = x + s @ D` with integer `s_g` in `[lo_g, hi_g]` and cost
`sum_g |s_g| * c_g <= budget`. Clipping to [0,1] is folded into the ranges and vectors up front,
so the map from `s` to `x'` is affine. Both of DLV's families are built here: `lattice` (K values
moved by multiples of `delta`) and `features` (subsets of features, each moved once).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from verifier.errors import InputError

# Generators the inner block of `enumerate_box` spans at most (numpy's meshgrid takes 32 arrays).
MESH_DIMS = 32
# Rounding slack for budgets and ranges: 1/64 steps and radii are exact in binary, but sums of
# clipped moves are not.
EPS = 1e-9


@dataclass(frozen=True)
class Region:
    """Integer generators around a flat input `x` (see the module docstring)."""

    x: np.ndarray  # (n,) float64, the model's layout flattened
    directions: np.ndarray  # (G, n) float64, D_g
    lo: np.ndarray  # (G,) int64
    hi: np.ndarray  # (G,) int64
    cost: np.ndarray  # (G,) float64, c_g = L1 size of D_g
    budget: float  # the radius r
    family: str  # "lattice" or "features"
    step: float  # delta
    values: tuple[np.ndarray, ...] = ()  # per generator, the input positions it moves

    @property
    def num_generators(self) -> int:
        return len(self.lo)

    def points(self, s: np.ndarray) -> np.ndarray:
        """Perturbed inputs (B, n) for integer coefficients `s` (B, G)."""
        s = np.asarray(s, dtype=np.float64).reshape(-1, self.num_generators)
        return self.x + s @ self.directions

    def contains(self, s: np.ndarray) -> np.ndarray:
        """Which rows of `s` (B, G) are points of the region (ranges and budget)."""
        s = np.asarray(s).reshape(-1, self.num_generators)
        in_box = np.all((s >= self.lo) & (s <= self.hi), axis=1)
        return in_box & (np.abs(s) @ self.cost <= self.budget + EPS)

    def size(self, limit: int = 10**12) -> int:
        """Number of points (capped at `limit`): an exact knapsack count over the generators."""
        from verifier.points import count_points

        return min(limit, count_points(self.lo, self.hi, self.cost, self.budget, limit, True))

    def enumerate(self, batch: int = 65536, lo=None, hi=None) -> Iterator[np.ndarray]:
        """All coefficient vectors of the (sub)box `[lo, hi]` within budget, in batches."""
        lo = self.lo if lo is None else np.asarray(lo)
        hi = self.hi if hi is None else np.asarray(hi)
        yield from enumerate_box(lo, hi, self.cost, self.budget, batch)


def enumerate_box(lo, hi, cost, budget: float, batch: int = 65536) -> Iterator[np.ndarray]:
    """Yield (B, G) int64 coefficient arrays covering the box within budget, batch by batch.

    Points come in lexicographic order. The generators are split into an outer part, expanded
    one generator at a time keeping only prefixes some completion fits (depth first over chunks
    of at most `batch` prefixes, so memory stays bounded and dead prefixes are never visited: a
    region of many 0/1 generators and a tight budget costs its points, not 2^G), and an inner
    block of at most `batch` points (a numpy meshgrid) joined to each prefix.
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    g = len(lo)
    if g == 0:
        yield np.zeros((1, 0), dtype=np.int64)
        return
    sizes = (hi - lo + 1).astype(np.int64)
    inner = min(g, MESH_DIMS)
    while inner > 0 and int(np.prod(sizes[g - inner :], dtype=np.float64)) > batch:
        inner -= 1
    inner = max(inner, 1) if int(sizes[-1]) <= batch else 0
    if inner == 0:
        raise ValueError("a single generator range exceeds the batch size")
    outer = g - inner
    grids = np.meshgrid(*[np.arange(lo[i], hi[i] + 1) for i in range(outer, g)], indexing="ij")
    block = np.stack([a.reshape(-1) for a in grids], axis=1)
    block_cost = np.abs(block) @ cost[outer:]
    limit = budget + EPS
    # least cost of generators d.. (each at its value nearest 0): a prefix is kept only when some
    # completion fits the budget, so a box whose late generators are forced away from 0 (a
    # branch-and-bound leaf) never expands dead prefixes; the slack only keeps more (the block
    # join below is the exact test)
    least = np.abs(np.clip(0, lo, hi)) * cost
    tail = np.concatenate([np.cumsum(least[::-1])[::-1], [0.0]]) - 1e-6
    # prefixes joined to the block per step: at most about 4M (prefix, block row) pairs
    join = max(1, (1 << 22) // len(block))
    stack = [(np.zeros((1, 0), dtype=np.int64), np.zeros(1))]
    pending: list[np.ndarray] = []
    pending_n = 0
    while stack:
        rows, used = stack.pop()
        depth = rows.shape[1]
        if depth == outer:
            for k in range(0, len(rows), join):
                ok = used[k : k + join, None] + block_cost[None, :] <= limit
                pi, bi = np.nonzero(ok)
                if not len(pi):
                    continue
                pending.append(np.concatenate([rows[k + pi], block[bi]], axis=1))
                pending_n += len(pi)
                if pending_n >= batch:
                    yield np.concatenate(pending)
                    pending, pending_n = [], 0
            continue
        vals = np.arange(lo[depth], hi[depth] + 1, dtype=np.int64)
        new_used = used[:, None] + np.abs(vals)[None, :] * cost[depth]
        ri, vi = np.nonzero(new_used + tail[depth + 1] <= limit)
        if not len(ri):
            continue
        rows = np.concatenate([rows[ri], vals[vi, None]], axis=1)
        used = new_used[ri, vi]
        chunks = range(0, len(rows), batch)
        stack.extend((rows[k : k + batch], used[k : k + batch]) for k in reversed(chunks))
    if pending:
        yield np.concatenate(pending)


def validate_radius_step(radius: float, step: float) -> None:
    """Radius > 0, 0 < step <= 1; anything else is a usage error."""
    if not np.isfinite(radius) or radius <= 0:
        raise InputError(f"--radius must be positive, got {radius:g}")
    if not np.isfinite(step) or step <= 0 or step > 1:
        raise InputError(f"--step must be in (0, 1], got {step:g}")


def lattice_region(x: np.ndarray, positions: np.ndarray, step: float, radius: float) -> Region:
    """DLV's lattice: each selected value moves by any multiple of `step` that stays in [0,1]."""
    validate_radius_step(radius, step)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    positions = np.asarray(positions, dtype=np.int64)
    g = len(positions)
    directions = np.zeros((g, x.size))
    directions[np.arange(g), positions] = step
    xv = x[positions]
    lo = -np.floor(xv / step + EPS).astype(np.int64)
    hi = np.floor((1.0 - xv) / step + EPS).astype(np.int64)
    per_gen = int(np.floor(radius / step + EPS))  # no single coefficient can exceed the budget
    lo, hi = np.maximum(lo, -per_gen), np.minimum(hi, per_gen)
    cost = np.full(g, float(step))
    return Region(
        x,
        directions,
        lo,
        hi,
        cost,
        float(radius),
        "lattice",
        float(step),
        tuple(np.array([p]) for p in positions),
    )


def feature_region(x: np.ndarray, features: list[np.ndarray], step: float, radius: float) -> Region:
    """The paper's feature subsets: feature g moves each of its values by `step` away from 0.5."""
    validate_radius_step(radius, step)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    directions = np.zeros((len(features), x.size))
    for g, idx in enumerate(features):
        v = x[idx]
        target = np.where(v > 0.5, np.maximum(v - step, 0.0), np.minimum(v + step, 1.0))
        directions[g, idx] = target - v
    cost = np.abs(directions).sum(axis=1)
    moves = cost > EPS  # a feature already at the bounds cannot move: its range is {0}
    lo = np.zeros(len(features), dtype=np.int64)
    hi = (moves & (cost <= radius + EPS)).astype(np.int64)
    return Region(
        x,
        directions,
        lo,
        hi,
        cost,
        float(radius),
        "features",
        float(step),
        tuple(np.asarray(f, dtype=np.int64) for f in features),
    )
