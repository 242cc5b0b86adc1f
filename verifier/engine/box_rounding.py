"""The first layer's requantization taken as it is on a sub-box, not as half a step.

A quantized runtime rounds each first-layer output to its grid (`SpecChain.lattice`); the spec
charges that as half a step either way at every point (`SpecChain.err[0]`). On a box of 0/1
generators a convolution's output depends on few of them (3-9 on the MNIST CNN's feature
regions), so it takes few values there, and the rounding's actual range over them is known:
the box's spec takes its midpoint into the bias and its half-width as the error. On the MNIST
CNN's int8 copy (features r=10) that range is 68-85% of the half step, narrower as branch and
bound fixes generators: the worst margin's bound rises 0.2-0.4 logits at the root, 0.4-0.8
deeper (`benchmarks/bench_bound_gap.py`).

The rounding's move is no independent noise on those points: it is a function of the few
generators, and much of it is linear in them (with one free generator all of it). So the move
is fitted by least squares on the free generators (`linear_fit`), the slopes go into the
layer's weights, and only what the fit leaves (its range over the points) is charged, where
that is narrower than the move's own range. On MNIST CNN input 0 (int8, features r=10) the
charged error falls another 25-35% and the worst margin's bound rises 0.4-0.6 logits more at
every depth of a descent (-5.63 -> -5.22 at the root, -0.58 -> -0.02 at depth 12).

Sound for any rounding rule (half away from zero or to even): the runtime's value before the
rounding lies within the rest of the spec's error (float32 or fixed-point scaling, the
multiplier's own rounding, the input's rounding, a clamp's move) of the spec's value, and every
grid point a value in that range can round to is counted; any slopes are sound, since what they
leave is taken over every point. The box's spec holds on the box and its sub-boxes only.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from verifier.engine.bounds import SpecChain, _first_err, weights, with_values_at
from verifier.engine.network import Affine
from verifier.engine.regions import EPS

# A neuron depending on more free generators keeps the half step: its 2^k values cost more
# to list than the rounding's range gains. Measured on the MNIST CNN's int8 copy (features
# r=10, input 20's branch and bound boxes): the range is 27% of the half step with 1 free
# generator, 73% with 3, 92% with 5, 96-99% with 6-9, and those with 6-9 were 73% of the values
# listed. At 6: 0.69 ms a box against 0.90 at 9 (and 1.42 before the listing went through one
# buffer), the worst margin's bound 0.0008 logits lower on average (at most 0.003); inputs 20 /
# 14 / 42 certified in as many nodes, 12% sooner.
MAX_FREE = 6
# per k, the 2^k subsets of k generators as columns (fewest first: the empty one is column 0),
# and how many hold at most m of them
_SUBSETS = {
    k: np.array(sorted(itertools.product((0.0, 1.0), repeat=k), key=sum)).T.copy()
    for k in range(MAX_FREE + 1)
}
_UP_TO = {
    k: np.searchsorted(s.sum(axis=0), np.arange(k + 1), side="right") for k, s in _SUBSETS.items()
}
# a fit replaces the move's own range where it narrows it by more than this many grid steps
# (on a tie the search and the audit would choose by float64 noise)
FIT_GAIN = 1e-6
# `linear_fit`'s pseudo-inverses per set of points
_PINVS: dict = {}
# `_dependencies` of the last first-layer weight `on_box` saw, with that weight first
_DEPENDENCIES: list = [None]
# the last boxes `on_box` worked out (`_Box`), for the next ones of the same spec: branch and
# bound splits a box soon after bounding it (its two children, each one generator apart)
RECENT_BOXES = 8
_RECENT: deque = deque(maxlen=RECENT_BOXES)
# float64 noise in the listed values, in grid steps: a value this close to a rounding
# boundary is counted on both sides of it
NOISE_STEPS = 1e-9
# points an output's listing holds at most (all subsets of MAX_FREE generators)
POINTS = 1 << MAX_FREE


def applies(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether `on_box` can narrow this spec's first rounding on [lo, hi]: the first layer's
    outputs lie on a grid, and the box's generators are 0/1 (a feature region's)."""
    return (
        spec.lattice is not None
        and spec.lattice[0] is not None
        and isinstance(spec.layers[0], Affine)
        and spec.err[0] is not None
        and bool(np.all(lo >= 0) and np.all(hi - lo <= 1))
    )


def on_box(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> SpecChain:
    """The spec on the box [lo, hi]: each first-layer output with at most `MAX_FREE` free
    generators charged the range its rounding takes over the box's points (see the module
    docstring); the spec itself where that does not apply. The outputs a recent box of the
    same spec left as they are here (their generators' ranges alike and the budget cutting
    neither box's subsets of theirs, or cutting them alike) take that box's values
    (`_RECENT`, the nearest): a child's differ from its parent's in one generator's, on the
    MNIST CNN about 15% of the outputs."""
    if not applies(spec, lo, hi):
        return spec
    layer = spec.layers[0]
    w, b = layer.weight, layer.bias
    dep, count, on_dep, w_dep, flat = _dependencies(w)
    fewest = int(count.min()) if count.size else 0  # generators an output depends on
    if fewest - int(np.count_nonzero(hi == lo)) > MAX_FREE:
        return spec  # every output has more free generators (a dense layer's, until deep)
    step, origin = spec.lattice[0]
    step = np.broadcast_to(np.asarray(step, dtype=np.float64), b.shape)
    origin = np.broadcast_to(np.asarray(origin, dtype=np.float64), b.shape)
    region = spec.region
    fixed = lo.astype(np.float64)
    left = region.budget - float(region.cost @ fixed)
    if left < 0:  # no point in the box: its bounds say so
        return spec
    base = (b + weights(w) @ fixed - origin) / step  # in grid steps from here on
    err = _first_err(spec)
    # the runtime's value before rounding is within this of the spec's, in steps
    slack = np.maximum(err / step - 0.5, 0.0) + NOISE_STEPS
    free = (hi > lo)[dep] & on_dep
    k = free.sum(axis=1)
    # per output, whether the budget cuts some subsets of its free generators
    cut = np.where(free, region.cost[dep], 0.0).sum(axis=1) > left + EPS
    last = _nearest(spec, lo, hi)
    redo = None if last is None else _changed_outputs(last, lo, hi, left, cut, dep, on_dep)
    if redo is None:
        shift, half = np.zeros(len(b)), err.copy()
        # the fitted moves' slopes, in the weights' units, at each output's dependencies (as
        # `dep` lists them: a few a row, not a weight-shaped array a box)
        slopes = np.zeros(dep.shape)
        # per output and listed point, the move left about its shift (lowest, highest, in
        # values), and which points are listed (those within budget); a last row of zeros
        # pads `GroupedRounding`'s groups
        low_at, high_at = np.zeros((len(b) + 1, POINTS)), np.zeros((len(b) + 1, POINTS))
        listed = np.zeros((len(b) + 1, POINTS), dtype=bool)
    else:  # the others as the last box has them
        shift, half, slopes = last.shift.copy(), last.half.copy(), last.slopes.copy()
        shift[redo], half[redo], slopes[redo] = 0.0, err[redo], 0.0
        low_at, high_at, listed = last.low_at.copy(), last.high_at.copy(), last.listed.copy()
        listed[:-1][redo] = False
    # the outputs to list, fewest free generators first, and those generators (with their
    # weights in steps and costs), row by row
    rows = np.flatnonzero((k <= MAX_FREE) & (True if redo is None else redo))
    rows = rows[np.argsort(k[rows], kind="stable")]
    ks = k[rows]
    picked = free[rows]
    cols = dep[rows][picked]
    places = np.nonzero(picked)[1]  # each one's place among its output's dependencies
    col_steps = (w_dep[rows] / step[rows, None])[picked]
    col_cost = region.cost[cols]
    first_row = np.searchsorted(ks, np.arange(MAX_FREE + 2))
    first_col = np.concatenate([[0], np.cumsum(ks)])
    # at most this many generators fit in what is left of the budget
    cheapest = float(region.cost.min(initial=np.inf))
    most = MAX_FREE if cheapest <= 0 else int(np.floor((left + EPS) / cheapest))
    for n in range(MAX_FREE + 1):
        a, z = first_row[n], first_row[n + 1]
        if a == z:
            continue
        r = rows[a:z]
        at = slice(first_col[a], first_col[z])
        subsets = _SUBSETS[n][:, : _UP_TO[n][min(n, most)]]
        t = col_steps[at].reshape(z - a, n) @ subsets
        t += base[r, None]
        inside = None  # the subsets within budget, where the budget cuts some
        if cut[r].any():
            inside = col_cost[at].reshape(z - a, n) @ subsets <= left + EPS
        low, high = _moves(t, slack[r])
        # the move's range, and what its linear fit leaves where that is narrower
        fitted = linear_fit((low + high) / 2, subsets, inside)
        fit = fitted @ subsets
        bottom, top = _extremes(low, high, inside)
        low -= fit
        high -= fit
        left_bottom, left_top = _extremes(low, high, inside)
        better = left_top - left_bottom < top - bottom - FIT_GAIN
        bottom, top = np.where(better, left_bottom, bottom), np.where(better, left_top, top)
        shift[r] = (bottom + top) / 2 * step[r]
        half[r] = (top - bottom) / 2 * step[r]
        slopes[r[:, None], places[at].reshape(z - a, n)] = (
            np.where(better[:, None], fitted, 0.0) * step[r, None]
        )
        # each point's move about the shift, with the fit taken out where the slopes are
        back = np.where(better[:, None], 0.0, fit) - ((bottom + top) / 2)[:, None]
        p = subsets.shape[1]
        low_at[r, :p] = (low + back) * step[r, None]
        high_at[r, :p] = (high + back) * step[r, None]
        listed[r, :p] = True if inside is None else inside
    narrowed = half < err
    # a narrowed output's range holds its input rounding too: the spec's `first_input` (kept
    # for the others, whose charge it makes exact) charges it once more there, a few 1e-6
    slopes[~narrowed] = 0.0
    box = _Box(spec, lo.copy(), hi.copy(), left, cut, shift, half, slopes, low_at, high_at, listed)
    _RECENT.append(box)
    if not np.any(narrowed):
        return spec
    w = with_values_at(w, flat, (w_dep + slopes)[on_dep])  # the slopes lie on its non-zeros
    layers = [Affine(w, b + np.where(narrowed, shift, 0.0)), *spec.layers[1:]]
    first = np.where(narrowed, half, spec.err[0])
    absw = [np.abs(w), *spec.absw[1:]]
    columns = np.array([_UP_TO[n][min(n, most)] for n in range(MAX_FREE + 1)])
    charge = grouped_rounding(box, dep, free, narrowed, first, columns[np.minimum(k, MAX_FREE)])
    return replace(spec, layers=layers, err=[first, *spec.err[1:]], absw=absw, first_charge=charge)


@dataclass(frozen=True)
class _Box:
    """What `on_box` worked out on a box, per first-layer output: for later boxes of the same
    spec, whose outputs left as they are take it."""

    spec: SpecChain
    lo: np.ndarray
    hi: np.ndarray
    left: float  # the budget left at the box's lowest point
    cut: np.ndarray  # per output, whether the budget cuts some subsets of its free generators
    shift: np.ndarray
    half: np.ndarray
    slopes: np.ndarray  # at the outputs' dependencies (`_dependencies`); 0 where not narrowed
    low_at: np.ndarray  # (outputs + 1, POINTS) the move about the shift at each listed point
    high_at: np.ndarray
    listed: np.ndarray  # (outputs + 1, POINTS) which points are listed for the output


@dataclass(frozen=True)
class GroupedRounding:
    """What the first layer's rounding costs a row `lam` on its outputs (`SpecChain.first_charge`)
    on one box: the outputs `on_box` narrowed that share one set of free generators (on a
    convolution, the channels at one place) are charged together, the least over the box's
    points of their rounding's sum weighted by `lam` (their moves at each point listed by
    `on_box`), not the sum of each one's least; the others |lam| . err. Their moves are functions
    of the point, not noise: on the MNIST CNN's int8 copy (features r=10) a group's charge is
    about 55% of its outputs' summed half ranges."""

    err: np.ndarray  # per output, the spec's bound (`SpecChain.err[0]`)
    # per number of points a group lists: (members (groups, M), padded with the index one past
    # the last output; at each point their lowest moves then their highest (groups, points,
    # 2M); 0 at listed points, +inf at the others (groups, points), None when all are listed)
    buckets: tuple
    # per output: its group (numbered bucket by bucket) and its place among the group's members
    # (-1 for the outputs charged one by one); each bucket's first group number, and the total
    group_of: np.ndarray
    slot_of: np.ndarray
    offsets: np.ndarray

    def charge(self, lam: np.ndarray) -> np.ndarray:
        """Per row of `lam` (rows, outputs), a bound of -lam . (the rounding's move) over the
        box's points: at most |lam| . err. For a few dense rows (the margins'); many sparse
        ones take `charge_entries`."""
        alone = self.group_of < 0
        out = np.abs(lam[:, alone]) @ self.err[alone]
        padded = np.concatenate([lam, np.zeros((len(lam), 1))], axis=1)
        for members, moves, unlisted in self.buckets:
            at = padded[:, members].transpose(1, 2, 0)  # (groups, M, rows)
            signed = np.concatenate([np.maximum(at, 0.0), np.minimum(at, 0.0)], axis=1)
            least = np.matmul(moves, signed)  # (groups, points, rows)
            if unlisted is not None:
                least += unlisted[:, :, None]
            out -= least.min(axis=1).sum(axis=0)
        return np.minimum(out, np.abs(lam) @ self.err)

    def charge_entries(self, rows, cols, vals, n: int) -> np.ndarray:
        """`charge` of the `n` rows whose non-zeros are `vals` at (`rows`, `cols`), listed by
        ascending row (each place once; not capped at |lam| . err: a group's least is no lower,
        but for float64 noise): a row is charged only on the groups it touches (a second
        convolution's row, on 9 of the first's places), so the many rows of a layer's bounds
        cost little."""
        gid = self.group_of[cols]
        order = np.argsort(gid, kind="stable")  # a radix sort (int16): rows stay ascending
        gid, r = gid[order], rows[order]
        first = int(np.searchsorted(gid, 0))  # the outputs charged one by one come first
        alone = order[:first]
        weight = np.abs(vals[alone]) * self.err[cols[alone]]
        out = np.bincount(rows[alone], weights=weight, minlength=n).astype(np.float64)
        gid, r, on = gid[first:], r[first:], order[first:]
        # each (group, row) pair once, by group: its place among its group's rows
        new = np.ones(len(gid), dtype=bool)
        new[1:] = (gid[1:] != gid[:-1]) | (r[1:] != r[:-1])
        pair = np.cumsum(new) - 1
        pg, pr = gid[new].astype(np.int64), r[new]
        place = np.arange(len(pg)) - np.searchsorted(pg, pg)
        ends = np.searchsorted(gid, self.offsets)
        pair_ends = np.searchsorted(pg, self.offsets)
        for k, (members, moves, unlisted) in enumerate(self.buckets):
            a, z = ends[k], ends[k + 1]
            if a == z:
                continue
            m, g0 = members.shape[1], self.offsets[k]
            c, v, at = cols[on[a:z]], vals[on[a:z]], place[pair[a:z]]
            pa, pz = pair_ends[k], pair_ends[k + 1]
            # per group, its rows' weights on its members' lowest then highest moves
            signed = np.zeros((len(members), 2 * m, int(place[pa:pz].max()) + 1))
            signed[gid[a:z] - g0, self.slot_of[c] + m * (v < 0), at] = v
            least = np.matmul(moves, signed)  # (groups, points, rows)
            if unlisted is not None:
                least += unlisted[:, :, None]
            least = least.min(axis=1)
            out -= np.bincount(pr[pa:pz], weights=least[pg[pa:pz] - g0, place[pa:pz]], minlength=n)
        return out


def grouped_rounding(
    box: _Box, dep: np.ndarray, free: np.ndarray, narrowed, err, columns: np.ndarray
) -> GroupedRounding | None:
    """The box's `GroupedRounding`: `dep` and `free` give each output's free generators
    (`_dependencies`, and which of them are free), `narrowed` the outputs the box's listing
    narrowed (only those have their moves listed), `err` the spec's bound on the box, `columns`
    how many listing columns each output spans (alike in a group). None when no two narrowed
    outputs share their free generators."""
    rows = np.flatnonzero(narrowed)
    on, gens = free[rows], dep[rows]
    # a narrowed output has at most MAX_FREE free generators: they are the digits of its key
    base = int(dep.max(initial=0)) + 2  # digits 1 .. base - 1
    if base**MAX_FREE < 2**62:
        rank = np.cumsum(on, axis=1) - 1
        keys = (np.where(on, gens + 1, 0) * base ** np.where(on, rank, 0)).sum(axis=1)
    else:  # too many generators for one integer: each row's sorted generators as bytes
        digits = np.sort(np.where(on, gens, -1), axis=1)
        keys = digits.view(np.dtype((np.void, digits.itemsize * digits.shape[1]))).reshape(-1)
    _, group, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    shared = sizes[group] > 1
    if not shared.any():
        return None
    rows, group = rows[shared], group[shared]
    order = np.lexsort((rows, group))
    rows, group = rows[order], group[order]
    start = np.flatnonzero(np.diff(group, prepend=-1))  # each group's first member
    count = np.diff(start, append=len(rows))
    width = columns[rows[start]]
    buckets = []
    # int16: `charge_entries` sorts by it (a radix sort; at most one group an output)
    group_of = np.full(len(err), -1, dtype=np.int16 if len(err) < 2**15 else np.int64)
    slot_of, offsets = np.full(len(err), -1), [0]
    for p in np.unique(width):
        pick = np.flatnonzero(width == p)
        m = int(count[pick].max())
        place = np.arange(m)
        members = np.where(
            place < count[pick, None],
            rows[np.minimum(start[pick, None] + place, len(rows) - 1)],
            len(err),
        )
        moves = np.concatenate([box.low_at[members, :p], box.high_at[members, :p]], axis=1)
        listed = box.listed[members[:, 0], :p]
        unlisted = None if listed.all() else np.where(listed, 0.0, np.inf)
        buckets.append((members, moves.transpose(0, 2, 1).copy(), unlisted))
        real = members < len(err)
        group_of[members[real]] = offsets[-1] + np.nonzero(real)[0]
        slot_of[members[real]] = np.nonzero(real)[1]
        offsets.append(offsets[-1] + len(members))
    return GroupedRounding(
        np.asarray(err, dtype=np.float64), tuple(buckets), group_of, slot_of, np.array(offsets)
    )


def _nearest(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> _Box | None:
    """Of the recent boxes of `spec` (`_RECENT`), the one fewest generators' ranges apart from
    [lo, hi]; None when there is none."""
    boxes = [box for box in list(_RECENT) if box.spec is spec and box.lo.shape == lo.shape]
    if not boxes:
        return None
    apart = [np.count_nonzero((box.lo != lo) | (box.hi != hi)) for box in boxes]
    return boxes[int(np.argmin(apart))]


def _changed_outputs(last: _Box, lo, hi, left: float, cut, dep, on_dep) -> np.ndarray | None:
    """The outputs (a mask) whose listing on [lo, hi] may differ from the `last` box's: those
    depending on a generator whose range differs, and where the budget left differs, those it
    cuts on either box. None (list them all) when more than half of them would be listed
    again."""
    moved = (lo != last.lo) | (hi != last.hi)
    redo = (moved[dep] & on_dep).any(axis=1)
    if left != last.left:
        redo |= cut | last.cut
    return redo if np.count_nonzero(redo) <= len(redo) // 2 else None


def linear_fit(move: np.ndarray, subsets: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
    """Per row of `move` (rows, P: a value at each of the P 0/1 points `subsets`, (k, P)), the
    slopes (rows, k) of its least-squares fit by a linear function of the k generators, over
    the points `inside` only ((rows, P), None: all). The rows are one first layer's outputs on
    one box; `on_box` charges each what its fit leaves over the points, the audit too."""
    k = subsets.shape[0]
    if k == 0:
        return np.zeros((len(move), 0))
    if inside is None:
        return move @ _pinv(subsets)[:k].T
    # the rows sharing a set of points share its pseudo-inverse (few sets: the budget cuts the
    # subsets of the costliest generators)
    packed = np.packbits(inside, axis=1)  # a row's set as bytes, compared as one value
    codes = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    _, first, which = np.unique(codes, return_index=True, return_inverse=True)
    out = np.empty((len(move), k))
    for i, row in enumerate(first):
        rows = np.flatnonzero(which == i)
        keep = inside[row]
        out[rows] = move[rows][:, keep] @ _pinv(subsets[:, keep])[:k].T
    return out


def _pinv(subsets: np.ndarray) -> np.ndarray:
    """The pseudo-inverse of `linear_fit`'s design matrix on the points `subsets` (the slopes,
    then a constant), worked out once per set of points."""
    key = (subsets.shape, subsets.tobytes())
    if key not in _PINVS:
        if len(_PINVS) >= 4096:  # sets cut by budgets seen before: start again
            _PINVS.clear()
        _PINVS[key] = np.linalg.pinv(np.vstack([subsets, np.ones((1, subsets.shape[1]))]).T)
    return _PINVS[key]


def _extremes(low: np.ndarray, high: np.ndarray, inside: np.ndarray | None) -> tuple:
    """Per row, the lowest of `low` and the highest of `high` over the points `inside` (None:
    all)."""
    if inside is None:
        return low.min(axis=1), high.max(axis=1)
    return np.where(inside, low, np.inf).min(axis=1), np.where(inside, high, -np.inf).max(axis=1)


def _dependencies(w: np.ndarray) -> tuple:
    """Per output row of `w`, the generators its weight is not 0 on (in order, padded), how
    many, which of the padded places hold one, the weights there, and where those lie in `w`
    flattened (`np.flatnonzero(w)`): the same for every box of a region, so kept for the last
    `w` seen."""
    kept = _DEPENDENCIES[0]
    if kept is not None and kept[0] is w:
        return kept[1:]
    nz = w != 0
    count = nz.sum(axis=1)
    # a stable sort puts each row's own generators first, in order
    dep = np.argsort(~nz, axis=1, kind="stable")[:, : max(int(count.max(initial=0)), 1)]
    on_dep = np.arange(dep.shape[1]) < count[:, None]
    flat = (np.arange(len(w))[:, None] * w.shape[1] + dep)[on_dep]
    _DEPENDENCIES[0] = (w, dep, count, on_dep, np.take_along_axis(w, dep, axis=1), flat)
    return _DEPENDENCIES[0][1:]


def _moves(t: np.ndarray, slack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value of `t` (rows of values in grid steps), the lowest and highest move rounding
    makes when each value may first move by up to its row's `slack`: to every grid point within
    half a step of where it may be."""
    reach = slack[:, None] + 0.5
    low = np.ceil(t - reach)
    low -= t
    high = np.floor(t + reach)
    high -= t
    return low, high
