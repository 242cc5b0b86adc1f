"""Branch and bound on generator ranges: split, re-bound, enumerate small leaves on the runtime.

Nodes are sub-boxes [lo, hi] of the coefficient box (the budget applies throughout), explored
worst lower bound first. A node closes when its margins' lower bounds all exceed the threshold
(route "bab"), when it holds no point within budget, when the few points its linear bounds
leave open all keep the label on the runtime (route "sieve": the linear lower bound of a margin
holds at every point of the box, so only points where it is not positive need a run), or when
it is small enough to enumerate (`enum_limit` points; a single point always is) and every point
keeps the label on the runtime (route "enumeration"). Each bounded node also queues its rounded
relaxed minimisers, run on the runtime `MINIMISER_BATCH` at a time and when the loop ends.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from verifier.engine.bounds import Bounds
from verifier.engine.enumeration import (
    BATCH,
    EnumResult,
    check_points,
    confirm,
    enumerate_box,
    margins_and_labels,
)
from verifier.engine.network import Affine, Relu
from verifier.engine.points import point_seconds
from verifier.engine.proof import Cover, margin_evidence
from verifier.engine.regions import Region
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN

# Most bytes of back-substituted rows (`Bounds.queries`) the queued leaves keep for their
# children at once; a leaf queued past it drops its rows (its children derive their own).
# About 250 KB a leaf on the MNIST MLP: some 1,000 leaves.
ROWS_BUDGET = 256 << 20
# A leaf whose linear bounds leave at most this many points open runs them on the runtime
# (route "sieve") instead of splitting on (`enum_limit` when smaller); PER_SAMPLE_SIEVE on a
# runtime that runs one point per call (`per_sample`: onnxruntime's dynamic quantization, whose
# scale couples a batch; about 80 us a point on the MNIST MLP against 20-30 batched) unless
# the points are bounded first (`settle_node`'s `pointwise`). Since they are (the first layer
# exact at each point, `pointwise.first_exact_margins`: 0.5% of them are left to run on the float
# model), 4,096 beats 1,024 (measured in one process, alternating, min of two runs, features
# r=20): MNIST MLP float inputs 47 / 53 / 54 / 75 / 123 / 323 / 399 / 453 / 527, 25.3 -> 23.3 s
# (2,616 -> 2,227 nodes; 8,192: 2,001 nodes, 7% slower than 4,096); TFLite int8 inputs 36 /
# 252 / 392 / 474 / 533 / 785 / 847, 10.6 -> 9.9 s (1,319 -> 1,038 nodes); ORT dynamic inputs
# 146 / 194 / 331 / 452 / 620 / 761 / 983, 15.3 -> 14.2 s (1,377 -> 1,229 nodes).
SIEVE_POINTS = 4096
# Where the sieve's points are not bounded first (no `pointwise`, or it stopped paying:
# `PointwiseTally`) a leaf runs up to this many (at most `enum_limit`). MNIST CNN int8, features
# r=10, inputs 116 / 137 / 87 / 119 / 158 to the end (`bench_nodes.py`, one process at a time):
# 3,681 nodes in 29.4 s at 4,096 (27.8 s once bounding stopped), 2,876 in 24.2-24.8 s at
# 8,192; ORT QDQ 5,618 nodes in 70.3 s -> 4,571 in 66.3. Larger limits changed nothing there
# (the quantized `enum_limit` is 8,192). On the MNIST MLP, whose bounding pays, 8,192 took
# 7-10% longer than 4,096 (19% fewer nodes).
RUN_SIEVE_POINTS = 8192
PER_SAMPLE_SIEVE = 256
# A slow runtime's sieve runs at most this long a leaf (`points.point_seconds`: its points
# built and run): SIEVE_POINTS on the slowest batched runtime that limit was measured on (the
# float MNIST MLP on onnxruntime, 15.6 us a point), fewer on slower ones. TFLite's 16x8 kernels
# take 93-108 us a point on the MNIST CNN (int8: 3.7): at 4,096 points a leaf its copy left 5
# of the first 200 images' 126 in `R` open at 2 s (14,000-19,000 points sieved in 11-25 nodes);
# at 590-740 (this limit: about 650) or 256 each of them certified in 0.8-1.8 s. It holds for a
# runtime run a point a call too: onnxruntime's dynamic copy of the MNIST CNN (66 us a point,
# about 1,060 a leaf) decided 90 of 127 in `R` at 2 s against 83 of 126 with 4,096; the MNIST
# MLP's (23 us, about 3,080) 777 of 789 against 778 (features r=10, side by side).
SIEVE_SECONDS = 0.07
# Splits weigh the last ReLU layer's relaxation gap a generator spans this much beside its
# coefficient on the worst margin's bound (`split`), where that layer's input lies on a grid
# of at most GAP_GRID_STEPS steps across an unstable neuron's range (`last_relu_weights`):
# 8-bit activations, whose rounding widens those ranges. MNIST CNN, features r=10, quantized
# decisions at 8 s on the first 200 images: TFLite int8 19% fewer nodes and 12% less time on
# the 99 inputs certified with and without it (6,375 -> 5,185 nodes), one more certified; at
# 2 s int8 86 -> 88 and ORT QDQ 80 -> 82 certified of 126 (86 -> 89 and 83 -> 85 in an
# earlier pair of runs). Weights 1 / 3 / 10 / 30 on inputs 14, 20, 42 (30 s): 1,403 / 1,172 /
# 1,411 / 1,472 nodes against 1,716 without. Where the grid is fine or absent it costs nodes:
# the float CNN 27% more, its 16x8 copy 19% more (one input lost at 2 s). The MNIST MLP's
# static copies are unchanged within run-to-run noise (f10 on 1,000 images: int8 772 -> 770
# certified, ORT QDQ 766 both; per input 3% more nodes; f20 on 300: 87 both). Retuned after
# the first layer's rounding was fitted on each box: 0 / 1 / 3 / 10 took 3,198 / 2,520 / 2,423 /
# 2,644 nodes on nine int8 inputs at 30 s.
GAP_WEIGHT = 3.0
# A grid this coarse (`on_coarse_grid`) also decides where the quantized decision takes each
# box's first-layer rounding as it is there (`diffdecide`, `box_rounding.on_box`).
GAP_GRID_STEPS = 256
# Relaxed minimisers (candidate counterexamples, a few a node, new ones only) queued before one
# runtime call runs them all. Run a node at a time they took 6-7% of the float engine's time
# at features r=20 (MNIST MLP input 7: 641 nodes, 747 runtime calls; queued, 153), and no
# minimiser refuted an input in 2,835 float decisions (the attacks before branch and bound find
# the counterexamples), so an answer a few nodes later costs little.
MINIMISER_BATCH = 256
# Sieved points bounded one by one (`settle_node`'s `pointwise`) before that cost is weighed
# against the runtime time it spares (`PointwiseTally.pays`). On the MNIST MLP's int8 copy
# (features r=10) the bounds prove 80-97% of the sieved points at 1.4-1.8 us a point, where a
# run costs 4-7 us; on the MNIST CNN's int8 copy none of 21,000 (its float model: 55%, at 4.5
# us a point against 4.4 for a run), while bounding took 7% of branch and bound.
POINTWISE_PROBE = 20000


@dataclass
class Leaf:
    """An undecided sub-box with its bounds; `parent`: the enclosing box's bounds when these
    are provisional (`branch_and_bound`'s `provisional`), to derive the box's own from."""

    lo: np.ndarray
    hi: np.ndarray
    bounds: Bounds
    parent: Bounds | None = None


@dataclass(frozen=True)
class ClosedLeaves:
    """How a region was certified on the float chain, for reuse: the spec the bounds are on,
    the root bounds, the leaves that closed it (each with its bounds; one leaf, the root
    box, when the root bounds certified), and the cover that proved it (its split tree and
    its empty boxes are the quantized proof's too; None when none was kept)."""

    spec: object  # verifier.engine.bounds.SpecChain
    root: Bounds
    leaves: list[Leaf]
    cover: Cover | None = None


@dataclass
class PointwiseTally:
    """What bounding sieved points one by one (`settle_node`'s `pointwise`) has cost and spared
    in one branch and bound, beside what the sieve's runtime runs cost a point, to stop
    bounding where it costs more than the runs it spares."""

    points: int = 0  # bounded
    spared: int = 0  # of those, proved without a run
    seconds: float = 0.0  # bounding them
    runs: int = 0  # points the sieve ran on the runtime
    run_seconds: float = 0.0

    def pays(self) -> bool:
        """Whether the runs it spared would have taken longer than bounding took (measured
        on this branch and bound's own points; until `POINTWISE_PROBE` points are bounded and
        some run, it does)."""
        if self.points < POINTWISE_PROBE or not self.runs:
            return True
        return self.spared * self.run_seconds / self.runs > self.seconds


@dataclass
class BabOutcome:
    """What branch and bound decided, how, and what it left open."""

    status: str
    route: str  # the route that found the counterexample, or closed most leaves
    coeffs: np.ndarray | None = None
    adv_label: int | None = None
    closed: dict = field(
        default_factory=lambda: {"bab": 0, "empty": 0, "enumeration": 0, "sieve": 0}
    )
    open_leaves: list[Leaf] = field(default_factory=list)  # worst lower bound first
    nodes: int = 0
    points: int = 0
    closed_leaves: list[Leaf] = field(default_factory=list)  # with `keep_closed`: bab / enum
    tried: set = field(default_factory=set)  # minimisers run or queued (bytes)
    queued: list = field(default_factory=list)  # minimisers not run yet ((k, G) arrays)
    queued_points: int = 0  # how many
    rows_peak: int = 0  # most bytes of rows the queued leaves kept at once (`ROWS_BUDGET`)
    pointwise: PointwiseTally = field(default_factory=PointwiseTally)


def branch_and_bound(
    runtime,
    region: Region,
    label: int,
    roots: list[Leaf],
    bound: Callable[[np.ndarray, np.ndarray, Bounds], Bounds],
    threshold: np.ndarray,
    *,
    deadline: float,
    max_nodes: int,
    enum_limit: int,
    cover: Cover | None = None,
    keep_closed: bool = False,
    sieve: bool = True,
    provisional: Callable[[np.ndarray, np.ndarray, Bounds], Bounds | None] | None = None,
    pointwise: Callable[..., np.ndarray | None] | None = None,
    margin_weights: np.ndarray | None = None,
) -> BabOutcome:
    """Refine the `roots` (sub-boxes with their bounds) until every leaf is closed, a
    counterexample is confirmed, or the budget (`max_nodes` processed nodes, `deadline` on
    `time.perf_counter()`) runs out.

    `bound(lo, hi, parent_bounds)` bounds a child box (the parent's bounds stay valid in it).
    `cover` (a `verifier.engine.proof.Cover`) records every split and closed leaf with its evidence.
    `keep_closed` also keeps the leaves closed by bounds or enumeration in `closed_leaves` (for
    the quantized decision to reuse). Queued leaves keep their bounds' rows while they total
    at most `ROWS_BUDGET` bytes. `sieve=False`: `settle_node` without its sieve.
    `provisional(lo, hi, parent_bounds)`: cheaper bounds for a child (None: none), queued in
    place of its own; the child is bounded by `bound` only when it is popped and its
    provisional bounds leave it to be split (most children that hold their parent's point
    nearest 0 close by the sieve on their parent's rows, or stay queued).
    `margin_weights`: the margins' weights on the last ReLU layer's outputs, for `split`
    (`last_relu_weights`; None: splits read the worst margin's bound alone).
    """
    out = BabOutcome(UNKNOWN, "budget")
    tie = itertools.count()
    heap: list = []
    stuck: list[Leaf] = []  # enumerated without a verdict
    kept = 0  # bytes of rows held by the queued leaves (a child reusing its parent's rows
    # holds the same arrays, but the parent has left the queue by then)

    def closed_by_bounds(leaf: Leaf) -> bool:
        """Whether the leaf's bounds settle it (recorded as closed when they do)."""
        if not (leaf.bounds.empty or np.all(leaf.bounds.lower > threshold)):
            return False
        out.closed["empty" if leaf.bounds.empty else "bab"] += 1
        if cover is not None:
            close_by_bounds(cover, leaf, region, threshold)
        if keep_closed and not leaf.bounds.empty:
            out.closed_leaves.append(_closed(leaf))
        return True

    def child(lo: np.ndarray, hi: np.ndarray, parent: Bounds) -> Leaf:
        """A child box with its provisional bounds where there are some, else its own."""
        b = provisional(lo, hi, parent) if provisional is not None else None
        return Leaf(lo, hi, bound(lo, hi, parent)) if b is None else Leaf(lo, hi, b, parent)

    def push(leaf: Leaf) -> None:
        """Close the leaf at once when its bounds settle it, else queue it (without its rows
        when they would take the queued leaves past `ROWS_BUDGET`)."""
        nonlocal kept
        if closed_by_bounds(leaf):
            return
        size = rows_nbytes(leaf.bounds) + rows_nbytes(leaf.parent)
        if size and kept + size > ROWS_BUDGET:
            leaf, size = _without_rows(leaf), 0
        kept += size
        out.rows_peak = max(out.rows_peak, kept)
        heapq.heappush(heap, (_key(leaf.bounds, threshold), next(tie), leaf))

    for root in roots:
        push(root)
    while heap:
        if out.nodes >= max_nodes or time.perf_counter() > deadline:
            break
        _, _, leaf = heapq.heappop(heap)
        kept -= rows_nbytes(leaf.bounds) + rows_nbytes(leaf.parent)
        out.nodes += 1
        res = settle_node(
            runtime,
            region,
            label,
            leaf,
            threshold,
            enum_limit,
            deadline,
            out,
            sieve=sieve,
            pointwise=pointwise,
        )
        if out.status == REFUTED:
            return out
        if res is None and leaf.parent is not None:  # to be split: on its own bounds
            leaf = Leaf(leaf.lo, leaf.hi, bound(leaf.lo, leaf.hi, leaf.parent))
            if closed_by_bounds(leaf):
                continue
        if res is not None:
            if res.clean:
                out.closed[res.route] += 1
                if cover is not None:
                    cover.close(leaf.lo, leaf.hi, res.route, res.points)
                if keep_closed:
                    out.closed_leaves.append(_closed(leaf))
                continue
            stuck.append(_closed(leaf))  # out of time, or the answer depends on the batch
            if not res.complete:
                break
        children = split(leaf, threshold, margin_weights)
        if cover is not None:
            g = int(np.flatnonzero(children[0][1] != leaf.hi)[0])
            cover.split(leaf.lo, leaf.hi, g, int(children[0][1][g]))
        for lo, hi in children:
            push(child(lo, hi, leaf.bounds))
    if run_minimisers(runtime, region, label, out):
        return out
    out.open_leaves = stuck + [entry[2] for entry in sorted(heap, key=lambda e: (e[0], e[1]))]
    if not out.open_leaves:
        out.status = CERTIFIED
        counts = {
            "bab": out.closed["bab"] + out.closed["empty"],
            "enumeration": out.closed["enumeration"] + out.closed["sieve"],
        }
        out.route = max(counts, key=lambda k: counts[k])
    return out


def settle_node(
    runtime,
    region: Region,
    label: int,
    leaf: Leaf,
    threshold: np.ndarray,
    enum_limit: int,
    deadline: float,
    out: BabOutcome,
    *,
    sieve: bool = True,
    pointwise=None,
) -> EnumResult | None:
    """What every branch-and-bound loop does with a popped node before splitting it: queue its
    rounded relaxed minimisers (those not queued before; all queued ones run once there are
    `MINIMISER_BATCH`, and the loop runs the rest when it ends: `run_minimisers`), then run the
    points its linear bounds leave at or below the threshold (`sieve`: route "sieve", see
    `sieved_points`) when the box holds at most `enum_limit` points, or when they are at most
    `SIEVE_POINTS` (fewer on a slow runtime: `SIEVE_SECONDS`); else every point when the box
    holds at most `enum_limit` (a single point is always run, never split). A counterexample
    goes into `out` (status REFUTED); returns the run's result (`route` "sieve" or
    "enumeration"), or None when no point was run. `sieve=False` where the bounds do not hold at
    every point of the box (ReLU phase splits). `pointwise(leaf, rows, points, target)`, while
    it pays (`out.pointwise`, `PointwiseTally`: else the sieve runs up to `RUN_SIEVE_POINTS`,
    `PER_SAMPLE_SIEVE` on a runtime run a point a call): tighter
    lower bounds of margins `rows` at points of the leaf's box ((N, len(rows)), or None;
    `pointwise.first_exact_margins`, tightest where at or below `target`, the rows' thresholds),
    that spare the runtime the points they prove: the sieve runs only the others (on a runtime
    that runs one point per call, as many as on any other)."""
    found = minimisers(region, leaf.bounds, threshold, out.tried)
    if len(found):
        out.queued.append(found)
        out.queued_points += len(found)
    if out.queued_points >= MINIMISER_BATCH and run_minimisers(runtime, region, label, out):
        return None
    limit = max(enum_limit, 1)
    small = region.count(limit, leaf.lo, leaf.hi) <= limit
    # a box small enough to enumerate runs only its open points; a larger one when few
    per_sample = getattr(runtime, "per_sample", False)
    seconds = point_seconds(runtime, region)
    bounded = pointwise is not None and out.pointwise.pays()
    few = SIEVE_POINTS if bounded else PER_SAMPLE_SIEVE if per_sample else RUN_SIEVE_POINTS
    if seconds > 0:  # a slow runtime: fewer points a leaf (the others split on)
        few = min(few, max(int(SIEVE_SECONDS / seconds), 1))
    cap = limit if small else min(limit, few)
    pts = sieved_points(region, leaf, threshold, cap) if sieve else None
    if pts is not None and len(pts) and bounded:
        rows = np.flatnonzero(leaf.bounds.lower <= threshold)
        start, sieved = time.perf_counter(), len(pts)
        low = pointwise(leaf, rows, pts, threshold[rows])
        if low is not None:
            pts = pts[np.any(low <= threshold[rows], axis=1)]
        out.pointwise.points += sieved
        out.pointwise.spared += sieved - len(pts)
        out.pointwise.seconds += time.perf_counter() - start
    if pts is not None:
        start = time.perf_counter()
        batches = (pts[i : i + BATCH] for i in range(0, len(pts), BATCH))
        res = replace(check_points(runtime, region, label, batches, deadline), route="sieve")
        out.pointwise.runs += res.points
        out.pointwise.run_seconds += time.perf_counter() - start
    elif not small:
        return None
    else:
        res = enumerate_box(runtime, region, label, leaf.lo, leaf.hi, deadline=deadline)
    out.points += res.points
    if res.coeffs is not None:
        out.status, out.route = REFUTED, "enumeration"
        out.coeffs, out.adv_label = res.coeffs, res.adv_label
    return res


def sieved_points(region: Region, leaf: Leaf, threshold: np.ndarray, cap: int):
    """The points of the leaf's box within budget where some margin's pointwise linear lower
    bound (`Bounds.offsets`) is at or below its threshold: every other point keeps the label by
    that bound. None when there are more than `cap`, or the bounds keep no pointwise bound for
    some open margin (or its logit cap leaves it open everywhere)."""
    b = leaf.bounds
    if b.offsets is None or b.empty:
        return None
    open_ = b.lower <= threshold
    if b.ceiling is not None and np.any(open_ & (b.ceiling <= threshold)):
        return None
    offsets = b.offsets[open_]
    if not np.all(np.isfinite(offsets)):
        return None
    return region.points_below(
        b.coeffs[open_], offsets - threshold[open_], leaf.lo, leaf.hi, cap=cap
    )


def _closed(leaf: Leaf) -> Leaf:
    """The leaf as kept once settled (closed, or open for good): without rows or parent."""
    return Leaf(leaf.lo, leaf.hi, _without_rows(leaf).bounds)


def _without_rows(leaf: Leaf) -> Leaf:
    """The leaf without what its bounds (and its parent's) keep for children: rows and greedy
    floors (closed leaves have none)."""
    parent = leaf.parent
    if parent is not None and (parent.queries is not None or parent.floors is not None):
        parent = replace(parent, queries=None, floors=None)
    if leaf.bounds.queries is None and leaf.bounds.floors is None and parent is leaf.parent:
        return leaf
    return Leaf(leaf.lo, leaf.hi, replace(leaf.bounds, queries=None, floors=None), parent)


def rows_nbytes(b: Bounds | None) -> int:
    """Bytes of what `b` keeps for its children: the back-substituted rows and their greedy
    floors (about 13 KB a leaf on the MNIST MLP); 0 when none (or no `b`)."""
    if b is None:
        return 0
    n = 0 if b.queries is None else sum(a.nbytes for rows in b.queries.values() for a in rows)
    if b.floors is not None:
        lo, hi, per_layer = b.floors
        n += lo.nbytes + hi.nbytes + sum(f.nbytes for f in per_layer.values())
    return n


def _key(b: Bounds, threshold: np.ndarray) -> float:
    """Heap order: the most violated margin first (empty boxes last)."""
    return float(np.min(b.lower - threshold)) if not b.empty else np.inf


def split(
    leaf: Leaf, threshold: np.ndarray, margin_weights: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Halve the range of the generator with the largest score: |coefficient| x range on the
    worst margin's linear bound (the widest range when no margin is violated), plus
    `GAP_WEIGHT` x the relaxation gap of the last ReLU layer that its range spans
    (`relaxation_score`, with the margins' weights on that layer's outputs, `margin_weights`:
    see `last_relu_weights`). The worst margin alone, not the sum over the violated ones: each
    split serves the bound that keeps the node open. On the MNIST MLP's feature regions, 16%
    fewer nodes in all on eight inputs at r=20, and 0-39% fewer per input on fifteen at r=20 and
    r=10 (those decided in 2-17 s)."""
    lo, hi = leaf.lo, leaf.hi
    width = (hi - lo).astype(np.float64)
    assert np.any(width > 0), "a single-point box is enumerated, not split"
    gap = leaf.bounds.lower - threshold
    worst = int(np.argmin(gap))
    coeffs = leaf.bounds.coeffs[worst] if gap[worst] <= 0 else 0.0
    score = (np.abs(coeffs) + 1e-12) * width
    if margin_weights is not None and gap[worst] <= 0:
        score += GAP_WEIGHT * relaxation_score(leaf.bounds, margin_weights[worst], width)
    g = int(np.argmax(score))
    mid = (int(lo[g]) + int(hi[g])) // 2
    left_hi, right_lo = hi.copy(), lo.copy()
    left_hi[g], right_lo[g] = mid, mid + 1
    return [(lo.copy(), left_hi), (right_lo, hi.copy())]


def last_relu_weights(spec, root: Bounds) -> np.ndarray | None:
    """The margins' weights on the last ReLU layer's outputs (the spec's last Affine), for
    `split`: where that ReLU follows a deeper Affine layer than the first (whose rows the bounds
    keep), feeds the last one, and its input lies on a coarse grid (`on_coarse_grid`: 8-bit
    activations). Else None: splits read the worst margin's bound alone."""
    layers = spec.layers[-3:]
    kinds = (Affine, Relu, Affine)
    if len(spec.layers) < 4 or not all(map(isinstance, layers, kinds)):
        return None
    if not on_coarse_grid(spec, root, len(spec.layers) - 3):
        return None
    return spec.layers[-1].weight


def on_coarse_grid(spec, root: Bounds, key: int) -> bool:
    """Whether Affine layer `key`'s outputs, where a ReLU takes them, lie on a coarse grid
    (`spec.lattice`): the median unstable neuron's range in the `root` bounds spans at most
    `GAP_GRID_STEPS` steps of it (8-bit activations, not 16-bit ones)."""
    grid = None if spec.lattice is None else spec.lattice[key]
    if grid is None or root.empty or key + 1 >= len(root.pre) or root.pre[key + 1] is None:
        return False
    low, up = root.pre[key + 1]
    unstable = (low < 0) & (up > 0)
    steps = (up - low)[unstable] / np.broadcast_to(grid[0], low.shape)[unstable]
    return bool(len(steps)) and float(np.median(steps)) <= GAP_GRID_STEPS


def relaxation_score(b: Bounds, weights: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Per generator, how much of the last ReLU layer's relaxation gap on one margin its range
    spans: each unstable neuron's largest gap (the upper chord's where the margin weighs it
    negatively, the adaptive lower line's where positively) times its weight, shared out over
    the generators by the share of the neuron's input range each one's range moves (from its
    back-substituted rows, `Bounds.queries`). Zeros without those rows."""
    key = len(b.pre) - 3  # the Affine layer feeding the last ReLU
    if b.queries is None or key not in b.queries:
        return np.zeros(len(width))
    rows, lam, _ = b.queries[key]
    m = len(rows)
    low, up = b.pre[key + 1][0][rows], b.pre[key + 1][1][rows]
    w = weights[rows]
    # the relaxation the bounds use: the upper chord's largest gap is its intercept, the lower
    # line's (slope 0 or 1) is its input's bound on the side it leaves
    _, chord, slope, unstable = Relu().relax(low, up)
    gap = np.where(w < 0, -w * chord, w * np.where(slope > 0, -low, up))
    gap = np.where(unstable, gap, 0.0)
    moves = (np.abs(lam[:m]) + np.abs(lam[m:])) * (0.5 * width)
    return gap @ np.minimum(moves / np.maximum(up - low, 1e-12)[:, None], 1.0)


def round_into(s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer points of the sub-box no costlier than `s`: truncated toward the box point
    nearest 0 (each coordinate moves toward it, so |s_g| and the cost only shrink)."""
    p = np.clip(0, lo, hi)
    return np.clip(p + np.trunc(s - p + 1e-9 * np.sign(s - p)), lo, hi).astype(np.int64)


def unique_rows(a: np.ndarray) -> np.ndarray:
    """`np.unique(a, axis=0)` (the distinct rows in lexicographic order) for the few rows of
    one node's minimisers, without its structured-array detour (several times faster)."""
    if len(a) < 2:
        return a.copy()
    rows = a[np.lexsort(a.T[::-1])]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = np.any(rows[1:] != rows[:-1], axis=1)
    return rows[new]


def minimisers(region: Region, b: Bounds, threshold: np.ndarray, tried: set) -> np.ndarray:
    """The rounded relaxed minimisers of the violated margins, but those in `tried` (their
    answers are known or coming: 30-40% of a node's are its ancestors'), added to it."""
    bad = np.flatnonzero(b.lower <= threshold)
    if not len(bad):
        return np.zeros((0, region.num_generators), dtype=np.int64)
    cands = unique_rows(round_into(b.argmin[bad], region.lo, region.hi))
    cands = cands[region.contains(cands)]
    cands = cands[[c.tobytes() not in tried for c in cands]]
    tried.update(c.tobytes() for c in cands)
    return cands


def run_minimisers(runtime, region: Region, label: int, out: BabOutcome) -> bool:
    """Run the queued minimisers (`out.queued`) on the runtime in one call; a confirmed
    counterexample goes into `out` (status REFUTED, route "bab"): returns whether one did."""
    cands = np.concatenate(out.queued) if out.queued else np.zeros((0, 0), dtype=np.int64)
    out.queued, out.queued_points = [], 0
    if not len(cands):
        return False
    _, labels = margins_and_labels(runtime, region, cands, label)
    wrong = np.flatnonzero(labels != label)
    for c in cands[wrong[4:]]:  # misclassified but not confirmed here: queued again later
        out.tried.discard(c.tobytes())
    for i in wrong[:4]:
        adv = confirm(runtime, region, cands[i], label)
        if adv is not None:
            out.status, out.route = REFUTED, "bab"
            out.coeffs, out.adv_label = cands[i].astype(np.int64), adv
            return True
    return False


def close_by_bounds(cover: Cover, leaf: Leaf, region: Region, threshold: np.ndarray) -> None:
    """Record a leaf its bounds close: empty (with its least cost) or by its worst margin."""
    if leaf.bounds.empty:
        cover.close(leaf.lo, leaf.hi, "empty", region.least_cost(leaf.lo, leaf.hi))
    else:
        margin = margin_evidence(float(np.min(leaf.bounds.lower - threshold)))
        cover.close(leaf.lo, leaf.hi, "bounds", margin)
