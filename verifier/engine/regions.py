"""Regions of pixel manipulations as integer generators (SPEC section 3).

A region around `x` is `x' = x + s @ D` with integer `s_g` in `[lo_g, hi_g]` and cost
`sum_g |s_g| * c_g <= budget`. Clipping to [0,1] is folded into the ranges and vectors up front,
so the map from `s` to `x'` is affine. Both of DLV's families are built here: `lattice` (K values
moved by multiples of `delta`) and `features` (subsets of features, each moved once).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from verifier.errors import InputError

if TYPE_CHECKING:
    from verifier.engine.points import MovedColumns

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

    @cached_property
    def moved(self) -> MovedColumns:
        """`points.moved_columns` of the region, computed once: every evaluation of its points
        needs it."""
        from verifier.engine.points import moved_columns

        return moved_columns(self.x, self.directions)

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
        from verifier.engine.points import count_points

        return min(limit, count_points(self.lo, self.hi, self.cost, self.budget, limit, True))

    def count(self, limit: int, lo=None, hi=None) -> int:
        """Points of the (sub)box `[lo, hi]` within budget, capped just above `limit` (the fast
        counter: exact for equal costs, never an under-count)."""
        from verifier.engine.points import count_points

        return count_points(*self.box(lo, hi), self.cost, self.budget, limit)

    def least_cost(self, lo=None, hi=None) -> float:
        """The cost of the (sub)box's point nearest 0."""
        lo, hi = self.box(lo, hi)
        return float(np.abs(np.clip(0, lo, hi)) @ self.cost)

    def empty(self, lo=None, hi=None) -> bool:
        """Whether the (sub)box holds no point within budget (even its least cost is over)."""
        return self.least_cost(lo, hi) > self.budget + EPS

    def minimise(
        self,
        a: np.ndarray,
        const=0.0,
        lo=None,
        hi=None,
        *,
        argmin: bool = False,
        floors: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Exact min of `a_i . s + const_i` per row over the real points of the (sub)box
        `[lo, hi]` within budget (a fractional knapsack): (values (m,), minimisers (m, G) or
        None); +inf where the box holds no point within budget. `floors` (values only): the
        second item is each row's greedy floor on a 0/1 box (`_binary_knapsack`; None on others)."""
        lo, hi = self.box(lo, hi)
        return _knapsack_min(a, const, lo, hi, self.cost, self.budget, argmin=argmin, floors=floors)

    def enumerate(self, batch: int = 65536, lo=None, hi=None) -> Iterator[np.ndarray]:
        """All coefficient vectors of the (sub)box `[lo, hi]` within budget, in batches."""
        yield from enumerate_box(*self.box(lo, hi), self.cost, self.budget, batch)

    def points_below(self, a: np.ndarray, const, lo=None, hi=None, *, cap: int):
        """The points of the (sub)box `[lo, hi]` within budget where some row's `a_i . s +
        const_i` is <= 0 ((N, G) int64, distinct), or None when there are more than `cap`.
        On a 0/1 box whose free generators cost alike (a feature region's nodes) only those
        points are visited (subsets in order of each row's coefficients, a branch cut as soon
        as no completion can reach 0), so a box of millions of points with a few hundred such
        points costs those; other boxes build points one generator at a time, cut the same
        way (`_below_by_prefixes`)."""
        lo, hi = self.box(lo, hi)
        a = np.atleast_2d(np.asarray(a, dtype=np.float64))
        const = np.broadcast_to(np.asarray(const, dtype=np.float64), (len(a),))
        facts = box_facts(lo, hi, self.cost, self.budget)
        p, room, shape = facts.p.astype(lo.dtype), facts.cap, facts.shape
        if room < 0 or not len(a):
            return np.zeros((0, len(lo)), dtype=np.int64)
        if shape is not None and shape.odd is not None:  # both values of the odd one: alike
            parts = []
            for v in (0, 1):
                plo, phi = lo.copy(), hi.copy()
                plo[shape.odd] = phi[shape.odd] = v
                got = self.points_below(a, const, plo, phi, cap=cap)
                if got is None:
                    return None
                parts.append(got)
            pts = np.concatenate(parts)
            return None if len(pts) > cap else pts
        if shape is None:
            return self._below_by_prefixes(a, const, lo, hi, cap)
        free = np.flatnonzero(shape.uniform)
        most = min(int(np.floor(room / shape.c0)), len(free))
        base = a @ p + const
        blocks, n = [], 0
        for r in range(len(a)):
            got = _subsets_below(a[r, free], -base[r], most, cap)
            if got is None:
                return None
            blocks += got  # (k, size) subsets of one size, as indices into `free`
            n += sum(len(members) for members in got)
            if n > cap * len(a):
                return None
        pts = np.empty((n, len(lo)), dtype=np.int64)  # filled once: no per-block copies
        pts[:] = p
        at = 0
        for members in blocks:
            pts[at + np.arange(len(members))[:, None], free[members]] = 1
            at += len(members)
        if len(a) > 1:  # a point below several rows once
            packed = np.packbits(pts != p, axis=1)
            keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
            pts = pts[np.sort(np.unique(keys, return_index=True)[1])]
        return None if len(pts) > cap else pts

    def _below_by_prefixes(self, a, const, lo, hi, cap: int):
        """`points_below` on any box: points built one generator at a time (those that move
        the rows most first), a prefix kept only while some completion fits the budget and
        some row can still reach 0 (its least over the remaining ranges, the budget aside: a
        bound below every completion's); None past `cap` points or `2 cap` prefixes."""
        order = np.argsort(-(np.abs(a).max(axis=0) * (hi - lo)), kind="stable")
        lo_o, hi_o, a_o = lo[order], hi[order], a[:, order]
        cost = self.cost[order]
        least = np.minimum(a_o * lo_o, a_o * hi_o)  # (rows, G) each generator's least term
        tail = np.concatenate(
            [np.cumsum(least[:, ::-1], axis=1)[:, ::-1], np.zeros((len(a), 1))], axis=1
        )
        near = np.abs(np.clip(0, lo_o, hi_o)) * cost
        tail_cost = np.concatenate([np.cumsum(near[::-1])[::-1], [0.0]])
        limit = self.budget + EPS
        slack = 1e-9 * (
            1.0
            + np.abs(const)
            + np.abs(a).sum(axis=1) * np.abs(np.concatenate([lo, hi])).max(initial=0)
        )
        vals, spent = const[None, :].astype(np.float64), np.zeros(1)
        coords = np.zeros((1, 0), dtype=np.int64)
        for d in range(len(order)):
            choice = np.arange(lo_o[d], hi_o[d] + 1)
            v = vals[:, None, :] + choice[None, :, None] * a_o[None, None, :, d]
            c = spent[:, None] + np.abs(choice)[None, :] * cost[d]
            keep = (c + tail_cost[d + 1] <= limit) & np.any(
                v + tail[None, None, :, d + 1] <= slack, axis=2
            )
            p, k = np.nonzero(keep)
            if len(p) > 2 * cap:
                return None
            vals, spent = v[p, k], c[p, k]
            coords = np.concatenate([coords[p], choice[k][:, None]], axis=1)
        coords = coords[np.any(vals <= slack, axis=1)]
        if len(coords) > cap:
            return None
        pts = np.empty_like(coords)
        pts[:, order] = coords
        return pts

    def box(self, lo=None, hi=None) -> tuple[np.ndarray, np.ndarray]:
        """The sub-box `[lo, hi]` as arrays, the region's own ranges where not given."""
        return (
            self.lo if lo is None else np.asarray(lo),
            self.hi if hi is None else np.asarray(hi),
        )


def _knapsack_min(
    a: np.ndarray,
    const: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    cost: np.ndarray,
    budget: float,
    *,
    argmin: bool = True,
    floors: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact min of `a_i . s + const_i` over s in [lo, hi] with sum |s_g| cost_g <= budget.

    Rows are independent; returns (values (m,), minimisers (m, G) or None). From the box point
    nearest 0 every move increases |s_g|, so the problem is a fractional knapsack solved
    greedily by |a_g| / cost_g. An empty set (the nearest point over budget) gives +inf.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    m, g = a.shape
    facts = box_facts(lo, hi, cost, budget)
    lo, hi, p, cap = facts.lo, facts.hi, facts.p, facts.cap  # cap: the budget left at p
    const = np.asarray(const, dtype=np.float64)
    if cap < 0:
        return np.full(m, np.inf), (np.tile(p, (m, 1)) if argmin else None)
    if not floors and not facts.binds:
        return _box_min(a, const, lo, hi, p, argmin)
    if not argmin and facts.shape is not None:
        fast = _binary_knapsack(a, const, p, facts.shape, cost, cap)
        return fast if floors else (fast[0], None)
    down = a > 0  # the objective decreases by moving s_g down
    room = np.where(down, p - lo, hi - p)  # whole units available in the improving direction
    order = _ratio_order(a, room, cost, cap)
    w_sorted = np.take_along_axis(room, order, axis=1) * cost[order]
    before = np.cumsum(w_sorted, axis=1) - w_sorted
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_sorted = np.clip(np.where(w_sorted > 0, (cap - before) / w_sorted, 1.0), 0.0, 1.0)
    gain_sorted = np.abs(np.take_along_axis(a, order, axis=1)) * np.take_along_axis(
        room, order, axis=1
    )
    value = a @ p + const - (frac_sorted * gain_sorted).sum(axis=1)
    if not argmin:
        return value, None
    frac = np.zeros((m, g))
    np.put_along_axis(frac, order, frac_sorted, axis=1)
    return value, p + np.where(down, -1.0, 1.0) * frac * room


def _box_min(a: np.ndarray, const, lo, hi, p, argmin: bool):
    """`_knapsack_min` where the budget left at the box point nearest 0 covers every move
    (lattices whose radius exceeds their box): each row's minimum over the box alone, every
    generator at its improving end, as the greedy would take them all."""
    down = a > 0
    room = np.where(down, p - lo, hi - p)
    value = a @ p + const - (np.abs(a) * room).sum(axis=1)
    return value, (p + np.where(down, -room, room) if argmin else None)


@dataclass(frozen=True)
class BinaryShape:
    """A 0/1 box whose free generators all cost `c0` but at most one (`odd`): the greedy
    takes whole uniform items by gain, at most `top` of them (k whole and one part)."""

    c0: float
    uniform: np.ndarray  # (G,) bool: the free generators of cost c0
    n: int  # how many
    odd: int | None
    top: int


def _subsets_below(v: np.ndarray, top: float, most: int, cap: int) -> list | None:
    """Every subset of at most `most` items whose values `v` sum to at most `top` (a slack of
    1e-9 relative keeps ties: an extra subset costs a runtime run, a missed one the proof), as
    (k, size) index arrays per size, or None when more than `cap` (or more than `cap` partial
    subsets to extend at some size: a failure costs little). Items go in increasing
    value, and a partial subset is extended only while its sum plus the least its remaining
    slots can add (the next negative values) stays within `top`. That least is
    non-decreasing in the next item's place, so each partial subset's extensions are a run of
    items found by one binary search: the work is the subsets', not partial subsets x items
    (2.5 times less time on the sieve's calls at features r=10)."""
    order = np.argsort(v, kind="stable")
    w = v[order]
    n = len(w)
    top = top + 1e-9 * (1.0 + abs(top) + float(np.abs(w).sum()))
    neg = np.concatenate([[0.0], np.cumsum(np.minimum(w, 0.0))])
    idx = np.arange(n)
    out = [np.zeros((1, 0), dtype=np.int64)] if top >= 0 else []
    found = len(out)
    sums, last, members = np.zeros(1), np.full(1, -1), np.zeros((1, 0), dtype=np.int64)
    for level in range(most):
        t = most - level - 1  # slots left after the next item
        # the least sum item j and t more can add: monotone in j but for rounding, which
        # the running maximum removes (a raise within the slack above)
        least = np.maximum.accumulate(w + neg[np.minimum(idx + 1 + t, n)] - neg[idx + 1])
        end = np.searchsorted(least, top - sums, side="right")  # items j < end fit
        counts = np.maximum(end - last - 1, 0)
        total = int(counts.sum())
        if not total:
            break
        if total > cap:
            return None
        k = np.repeat(np.arange(len(sums)), counts)
        j = last[k] + 1 + np.arange(total) - (np.cumsum(counts) - counts)[k]
        sums, last = sums[k] + w[j], j
        members = np.concatenate([members[k], j[:, None]], axis=1)
        hit = sums <= top
        if hit.any():
            out.append(order[members[hit]])
            found += int(hit.sum())
        if found > cap:
            return None
    return out


def binary_shape(lo, hi, cost, cap: float) -> BinaryShape | None:
    """The box's `BinaryShape` with `cap` budget left at its point nearest 0, or None when
    its free generators are not all 0/1 or more than one costs other than the rest."""
    free = lo < hi
    if not free.any() or np.any(lo[free] != 0) or np.any(hi[free] != 1):
        return None
    fc = cost[free]
    if np.any(fc <= 0):
        return None
    c0 = float(fc[0] if np.count_nonzero(fc == fc[0]) >= len(fc) - 1 else fc[1])
    odd = np.flatnonzero(free)[fc != c0]
    if len(odd) > 1:
        return None
    uni = free & (cost == c0)
    n = int(np.count_nonzero(uni))
    k = min(int(np.floor(cap / c0)), n)  # whole uniform items the capacity holds
    return BinaryShape(c0, uni, n, int(odd[0]) if len(odd) else None, min(k + 1, n))


@dataclass(frozen=True)
class BoxFacts:
    """What every minimisation over a (sub)box of a region needs first: the box (float64), its
    point nearest 0, the budget left there (`cap`, < 0: no point), whether some move exceeds
    it (`binds`), and its `BinaryShape` (None where it has none or `cap` < 0)."""

    lo: np.ndarray
    hi: np.ndarray
    p: np.ndarray
    cap: float
    binds: bool
    shape: BinaryShape | None


# the last boxes `box_facts` worked out: a branch-and-bound node minimises rows over its box
# several times (each layer's intermediate bounds, the cuts, the margins, the sieve), and the
# facts took a third of that time on the MNIST MLP's feature regions (~0.15 ms a call)
RECENT_BOXES = 8
_FACTS: OrderedDict = OrderedDict()


def box_facts(lo, hi, cost: np.ndarray, budget: float) -> BoxFacts:
    """The `BoxFacts` of the box `[lo, hi]` under `cost` and `budget` (the arrays read-only:
    the recent boxes' are shared)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    key = (lo.dtype.str, lo.tobytes(), hi.dtype.str, hi.tobytes(), cost.tobytes(), budget)
    facts = _FACTS.get(key)
    if facts is not None:
        return facts
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    p = np.clip(0.0, lo, hi)
    cap = budget + EPS - float(np.abs(p) @ cost)
    binds = float(np.maximum(p - lo, hi - p) @ cost) > cap
    shape = None if cap < 0 else binary_shape(lo, hi, cost, cap)
    for v in (lo, hi, p) if shape is None else (lo, hi, p, shape.uniform):
        v.flags.writeable = False
    facts = _FACTS[key] = BoxFacts(lo, hi, p, cap, binds, shape)
    if len(_FACTS) > RECENT_BOXES:
        _FACTS.popitem(last=False)
    return facts


def _binary_knapsack(a, const, p, shape: BinaryShape, cost, cap: float):
    """`_knapsack_min`'s values on a box of `shape` (a feature region's nodes; p its point
    nearest 0, cap the budget left there), and each row's floor, the least uniform gain the
    greedy may take (its `top`-th best): a partition of the gains replaces the sort (several
    times faster on the many rows of intermediate bounds)."""
    c0, top = shape.c0, shape.top
    base = a @ p + const
    # moving g from 0 to 1 lowers the row by -a_g if > 0 (kept negated: min(a_g, 0)); the
    # other generators' are zeroed, not cut out (a column gather costs more than it saves)
    loss = np.minimum(a, 0.0)
    loss[:, ~shape.uniform] = 0.0
    loss.partition(top - 1, axis=1)  # in place: `loss` is this call's own array
    best = -np.sort(loss[:, :top], axis=1)
    prefix = np.concatenate([np.zeros((len(a), 1)), np.cumsum(best, axis=1)], axis=1)
    if shape.odd is None:
        return base - _uniform_gain(best, prefix, np.array([cap / c0]))[:, 0], best[:, -1]
    # the odd item's share x: concave in x, best at an end or a breakpoint (all in one pass)
    q = shape.odd
    x_max = min(1.0, cap / cost[q])
    xs = (cap - np.arange(int(np.floor(cap / c0)) + 1) * c0) / cost[q]
    xs = np.concatenate([[0.0, x_max], xs[(xs > 0.0) & (xs < x_max)]])
    rooms = np.maximum(cap - xs * cost[q], 0.0)
    gain = np.outer(np.maximum(-a[:, q], 0.0), xs) + _uniform_gain(best, prefix, rooms / c0)
    return base - gain.max(axis=1), best[:, -1]


def binary_floor_holds(region, lo, hi, g: int) -> bool:
    """Whether the 0/1 box `[lo, hi]` (a `BinaryShape`) keeps every row's greedy solution that
    does not take generator `g` when g is fixed at 0: g is free and uniform, and uniform items
    beyond the `top` remain (the box's point nearest 0 and budget are unchanged)."""
    shape = box_facts(lo, hi, region.cost, region.budget).shape
    return (
        shape is not None and bool(shape.uniform[g]) and shape.n >= 3 and shape.n >= shape.top + 1
    )


def binary_floor_unchanged(gain: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Rows whose greedy value over a 0/1 box stays the same when a uniform generator with
    gain `gain` (per row, -a_g where positive, else 0) is fixed at 0 (`binary_floor_holds`):
    it gains nothing, or less than the least the greedy takes (`floor`, the `top`-th best
    uniform gain: then the `top` best are the same without it). NaN floors: not known."""
    known = ~np.isnan(floor)
    return known & ((gain < floor) | (gain == 0.0))


def _uniform_gain(best: np.ndarray, prefix: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The fractional knapsack's gain over the uniform items (their gains `best` per row in
    decreasing order, `prefix` their running sums) with `units` items' capacity left, one
    column per entry of `units`."""
    j = np.minimum(np.floor(units + 1e-12).astype(np.int64), best.shape[1])
    pad = np.concatenate([best, np.zeros((len(best), 1))], axis=1)  # j = all: no part
    return prefix[:, j] + (units - j) * pad[:, j]


def _ratio_order(a: np.ndarray, room: np.ndarray, cost: np.ndarray, cap: float) -> np.ndarray:
    """Per row, the generators the greedy can touch, by decreasing |a_g| / cost_g.

    Every movable generator with a positive cost uses at least the smallest cost, so at most
    (free ones) + ceil(cap / smallest cost) + 1 of them are reached: only those are sorted
    (after a partition) when that is fewer than all.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cost > 0, np.abs(a) / np.where(cost > 0, cost, 1.0), np.inf)
    ratio = np.where(room > 0, ratio, -1.0)  # immovable: last
    g = a.shape[1]
    positive = cost[cost > 0]
    reach = g
    if len(positive):
        reach = int((cost <= 0).sum()) + int(np.ceil(cap / positive.min() + 1e-9)) + 1
    if reach >= g:
        return np.argsort(-ratio, axis=1, kind="stable")
    part = np.argpartition(-ratio, reach - 1, axis=1)[:, :reach]
    sub = np.argsort(-np.take_along_axis(ratio, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, sub, axis=1)


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
    # block rows no prefix can afford are dropped before any join (a leaf with a little budget
    # left over many free 0/1 generators keeps about 1% of its block); order is kept
    fits = block_cost + (tail[0] - tail[outer]) <= limit + 1e-6
    block, block_cost = block[fits], block_cost[fits]
    if not len(block):
        return
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


# --- the region families: what `--region` names ------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A region family: its help text, its builder from an input and its ranked positions, and
    whether every coefficient is 0 or 1 (a point is a subset of generators: MCTS applies)."""

    name: str
    help: str
    build: Callable[..., Region]  # (x, ranked positions, step, radius, dims, feature_dims)
    subsets: bool


def _features(x, order, step: float, radius: float, dims: int, feature_dims: int) -> Region:
    from verifier.engine.features import chunk

    return feature_region(x, chunk(order, feature_dims), step, radius)


def _lattice(x, order, step: float, radius: float, dims: int, feature_dims: int) -> Region:
    return lattice_region(x, order[:dims], step, radius)


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "features",
            "subsets of features (--feature-dims values each), each moved once by the step away "
            "from 0.5 (the paper's)",
            _features,
            subsets=True,
        ),
        Family("lattice", "--dims values moved by multiples of the step", _lattice, False),
    )
}
