"""The quantized decision on a region the float model certified, starting from its proof.

Order: the runtime's own bounds (its error model) over the region (computed with its spec:
`quantized_spec`, whose deeper knapsack cuts every node of a feature region takes, and a lattice
region's where they raise the root's bound: the root keeps the better bound with or without
them), then with a dynamic-range
first layer's input quantization folded into sub-regions of fixed scale (`dynamic_input`; on
features r=20 the whole region's bound sat about 4 logits below the largest sub-region's);
the root's bounds with the lower slopes of the margins they leave open optimised
(`bounds.optimised_slopes`: on the MNIST CNN's int8 copy, features r=10, 12 of 126 inputs
certified there that took branch and bound before); the differential bound (`diffbounds`) on the
float proof's root bounds, whose bound on the difference closes every float leaf whose float
margin absorbs it; the runtime's own bounds on each leaf left; a quick and a search attack on
the quantized runtime (any counterexample is an input of R^FP, confirmed on that runtime);
then branch and bound on the leaves left, the small ones
enumerated on the quantized runtime (a child holding its parent's point nearest 0 queued on
its parent's rows, `bounds.restricted`, and bounded only when it must be split, as the float
decision's are). Leaves and nodes are bounded by the runtime's own linear
bounds: on the MNIST MLP's error models the differential bounds never beat them at a leaf
(their rounding dominates the difference, and its ReLU-pair relaxation widens with it). Each
node tries lower slopes optimised over the whole region, refined over a node's box every
other level of splits and handed down (`bounds.refined`): a few gradient steps on the margins
a node leaves open, from the slopes it was given.
Without a proof, an error model the runtime's output at x contradicts, or layers the
difference is not propagated through, the decision is `decide.decide`'s own.

Routes: "bounds" (the runtime's own bounds, "input_fold" in `detail` when folded,
"root_margin_optimised" when optimised slopes closed the root),
"diff-root" (the root bound), "diff-leaves" (every float leaf reused), "diff-bab" (new
splits), "enumeration", "attack" (found on the quantized runtime), "budget"; `detail` counts
the leaves reused and split ("float_leaves", "float_leaves_reused", "new_nodes").
A certificate keeps a proof on the error model's spec ("proof", `verifier.engine.proof`): the
root's bounds leaf; the folded sub-regions' cuts, each sub-region a `fold` node closed on its
own spec; or the float proof's tree with each float leaf closed by the runtime's own bounds or
by the branch and bound below it. "no_proof" says why none was kept (a leaf only the
differential bound closes: the audit cannot re-derive that bound).
"""

from __future__ import annotations

import time

import numpy as np

from verifier.engine.attack import quick_attack, search_attack
from verifier.engine.bab import (
    ClosedLeaves,
    Leaf,
    branch_and_bound,
    close_by_bounds,
    last_relu_weights,
    on_coarse_grid,
)
from verifier.engine.bounds import (
    PreparedChain,
    SpecChain,
    holds_point_of,
    linear_bounds,
    optimised_slopes,
    prepare_chain,
    refined,
    restricted,
)
from verifier.engine.box_rounding import on_box
from verifier.engine.decide import (
    SEARCH_SHARE,
    _check,
    _model_spec,
    _Run,
    decide,
)
from verifier.engine.diffbounds import diff_spec, quantized_bounds, reused_parent, wrap_direct
from verifier.engine.network import LoweredLayer
from verifier.engine.points import runtime_inputs
from verifier.engine.pointwise import first_exact_margins
from verifier.engine.proof import Cover
from verifier.engine.quantized_spec import (
    QuantizedSpec,
    decision_thresholds,
    fold_part_of,
    fold_parts,
    input_levels,
    narrow_inputs,
    root_bounds,
)
from verifier.engine.regions import Region
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN, Decision

# gradient steps on the root's lower slopes, which every branch-and-bound node then tries
# (`bounds.optimised_slopes`): as many as the float decision's root takes
ROOT_SLOPE_STEPS = 20
# gradient steps on a node's open margins' slopes, from those it was given, at every
# REFINE_EVERY-th level of splits (`bounds.refined`); its sub-boxes take the slopes it ends
# with. Time to certify (one process a core, side by side), MNIST CNN int8 features r=10
# inputs 87 / 116 / 119 / 137 / 158: 8.7 / 13.8 / 16.1 / 7.0 / 7.8 s without, 6.0 / 7.3 /
# 10.6 / 7.3 / 6.0 at 2 steps every 2 levels (nodes -18 to -51%), 6.1 / 8.1 / 10.9 / 6.9 / 6.6
# at 3 every level; MNIST MLP int8 inputs 195 / 230 / 251 / 350: 15.6 s in all without, 13.4
# at 2 every 2, 17.2 at 3 every level (there a refinement raises a node's worst margin
# 0.02-0.04 logits on average, on the CNN 0.06-0.10; a split 0.3-0.5)
REFINE_STEPS = 2
REFINE_EVERY = 2


def decide_from_float(
    runtime,
    chain: list[LoweredLayer] | PreparedChain,
    region: Region,
    label: int,
    proof: ClosedLeaves | None,
    error_model,
    *,
    timeout: float,
    max_nodes: int = 20000,
    enum_limit: int = 8192,
    seed: int = 0,
    attack_share: float = SEARCH_SHARE,
) -> Decision:
    """Certified / refuted / unknown for the quantized `runtime` on `region`, which the float
    `chain` is certified on by `proof` (`decide(..., keep_leaves=True)`'s "reuse").
    `attack_share` of the timeout is kept for the search attack after branch and bound (as the
    float decision's: on the MNIST MLP's TFLite int8 copy, features r=10, the two inputs it
    refuted there were refuted at 0.02 as at 0.05, and branch and bound got 1-4% more nodes)."""
    chain = prepare_chain(chain)
    _check(chain.layers, region, label, timeout, max_nodes, enum_limit, True, error_model)

    def fallback(why: str) -> Decision:
        left = max(timeout - (time.perf_counter() - start), 1e-3)
        d = decide(
            runtime,
            chain,
            region,
            label,
            timeout=left,
            max_nodes=max_nodes,
            enum_limit=enum_limit,
            use_smt=False,
            quantized=True,
            error_model=error_model,
            seed=seed,
        )
        d.detail["differential"] = why
        d.seconds = time.perf_counter() - start
        return d

    start = time.perf_counter()
    if proof is None or error_model is None:
        return fallback("no float proof" if proof is None else "no error model")
    if region.count(enum_limit) <= enum_limit:
        return fallback("small region")
    deadline = start + timeout
    detail: dict = {"leaves": {}, "points": 0, "attack_evals": 0, "steps": {}}
    run = _Run(runtime, region, label, start, detail)
    # a proof is kept where every leaf is closed by the runtime's own bounds or runtime runs:
    # the root, the folded sub-regions (each on its own spec), or the float proof's tree with
    # its leaves re-closed (see `_reuse`); a leaf the differential bound alone closes keeps none
    run.cover, run.spec = None, "error-model"
    qspec, trusted, qs = _model_spec(runtime, error_model, region, label, detail)
    if not trusted:
        return fallback(detail.get("untrusted_reason", "error model not trusted"))

    threshold = decision_thresholds(error_model, qspec)  # a tie on the logits' grid may count
    # the rounding bounds over the whole region, when the spec's are those (no fold, no cap)
    whole = (qs.model, qs.errors) if qs.region is region and qs.ends is None else None
    # the spec's own linear bounds over the region, computed with it (plain slopes: optimised
    # ones gained less than the nodes they cost; its logit caps come from them)
    direct = qs.root
    detail["bounds_method"] = direct.method
    detail["root_margin"] = float(np.min(direct.lower - threshold))
    run.step("bounds")
    if np.all(direct.lower > threshold):
        run.cover = Cover()
        close_by_bounds(run.cover, Leaf(region.lo, region.hi, direct), region, threshold)
        return run.done(CERTIFIED, "bounds")
    if time.perf_counter() > deadline:  # the spec and its root bound took it (large CNNs)
        detail["open_leaves"] = "the root's bounds took the time"
        return run.done(UNKNOWN, "budget")
    folded = _folded_bounds(runtime, error_model, region, label, threshold, detail, deadline, whole)
    run.step("bounds")
    parts = None  # the folded sub-regions with their specs, when folded
    if folded is not None:
        parts, leaves, run.cover = folded
        if not leaves:
            return run.done(CERTIFIED, "bounds")
    if time.perf_counter() > deadline:
        detail["open_leaves"] = "the fold's bounds took the time"
        return run.done(UNKNOWN, "budget")
    # the root's lower slopes, optimised once for the margins it leaves open (with every cut)
    # and tried on every node; where they close those margins the root's bounds certify
    rooted = optimised_slopes(qspec, direct, region.lo, region.hi, ROOT_SLOPE_STEPS, threshold)
    slopes = rooted.slopes
    run.step("bounds")
    if parts is None and np.all(rooted.lower > threshold):
        detail["root_margin_optimised"] = float(np.min(rooted.lower - threshold))
        run.cover = Cover()
        close_by_bounds(run.cover, Leaf(region.lo, region.hi, rooted), region, threshold)
        return run.done(CERTIFIED, "bounds")
    levels = input_levels(error_model)  # run-time input roundings narrowed on a box
    # the first layer's rounding as it is on each box (`box_rounding.on_box`) where its grid
    # is coarse: on 16x8 copies (3,000 steps across a range) it gained nothing and cost 11%
    boxed = on_coarse_grid(qspec, direct, 0)
    absorbed: list[Leaf] = []  # float leaves closed by the differential bound alone
    if parts is None:
        try:  # the difference's spec: only where the runtime's own bounds did not certify
            ds = diff_spec(proof.spec, qspec)
        except ValueError as exc:
            return fallback(str(exc))
        run.cover = proof.cover.tree() if proof.cover is not None else None
        # the float leaves are within the root: its ReLU bounds narrow their input rounding
        on_leaves = narrow_inputs(qspec, levels, direct.pre)
        leaves = _reuse(
            ds,
            qspec,
            threshold,
            region,
            proof,
            direct,
            detail,
            deadline,
            run.cover,
            absorbed,
            on_leaves,
            boxed,
        )
        run.step("differential")
        if leaves is None:
            detail["open_leaves"] = "float leaves not all bounded in time"
            return run.done(UNKNOWN, "budget")
        if not leaves:
            _close_absorbed(run, qspec, threshold, absorbed, direct, deadline)
            return run.done(CERTIFIED, "diff-root" if _root_only(proof) else "diff-leaves")

    # the attacks come after the bounds: the float model is certified here, and the bounds
    # decide most quantized models at once (a quick attack first cost 0.06-0.15 s an input);
    # the search's share of the time is kept for the end, where branch and bound left the
    # region open (it refuted no input of R in any MNIST cell measured, and certified ones
    # never need it)
    att = quick_attack(runtime, qspec, region, label, seed=seed)
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)
    start_point = att.best

    # the last parent bounded, with its children's spec and its own bounds with rows: both
    # children of a node are bounded in turn, in the parent's sub-region, on the same spec
    last: list = [None, None, None]

    def bound(lo, hi, parent):  # inside a folded sub-region, on its own spec
        if last[0] is not parent:
            spec = qspec if parts is None else fold_part_of(parts, lo, hi).spec
            # run-time input roundings bounded on the parent's box (ReLUs off there: exact)
            last[:] = [parent, narrow_inputs(spec, levels, parent.pre), reused_parent(parent)]
        # a child holding its parent's point nearest 0 reuses the parent's rows, and only the
        # margins its parent leaves open are back-substituted, as in the float engine
        spec = on_box(last[1], lo, hi) if boxed else last[1]  # the first rounding on this box
        given = slopes if parent.slopes is None else parent.slopes  # the nearest refined ones
        b = linear_bounds(
            spec,
            lo,
            hi,
            target=threshold,
            parent=last[2],
            reuse=True,
            open_only=True,
            slopes=given,
        )
        splits = int(np.count_nonzero(lo != region.lo) + np.count_nonzero(hi != region.hi))
        steps = REFINE_STEPS if splits % REFINE_EVERY == 0 else 0
        return wrap_direct(None, refined(spec, b, lo, hi, steps, threshold, given))

    def provisional(lo, hi, parent):  # a child holding its parent's point nearest 0
        if not holds_point_of(parent, lo, hi):
            return None
        spec = qspec if parts is None else fold_part_of(parts, lo, hi).spec
        return restricted(spec, parent, lo, hi, threshold)

    per_point = getattr(runtime, "per_sample", False)  # one point a call: worth bounding each

    def pointwise(leaf, rows, s, target):  # on the spec of the sub-region holding the leaf
        spec = qspec if parts is None else fold_part_of(parts, leaf.lo, leaf.hi).spec
        return first_exact_margins(spec, leaf.bounds, rows, s, target, levels, per_point)

    out = branch_and_bound(
        runtime,
        region,
        label,
        leaves,
        bound,
        threshold,
        pointwise=pointwise,
        provisional=provisional,
        margin_weights=last_relu_weights(qspec, direct),
        deadline=deadline - attack_share * timeout,
        max_nodes=max_nodes,
        enum_limit=enum_limit,
        cover=run.cover,
    )
    run.nodes += out.nodes
    run.step("bab")
    detail["new_nodes"] = out.nodes
    detail["points"] += out.points
    detail["leaves"] = {k: v for k, v in out.closed.items() if v}
    detail["open_leaves"] = len(out.open_leaves)
    if out.status == REFUTED:
        route = "attack" if out.route == "bab" else out.route
        return run.done(REFUTED, route, out.coeffs, out.adv_label)
    if out.status == CERTIFIED:
        _close_absorbed(run, qspec, threshold, absorbed, direct, deadline)
        by_bounds = out.closed["bab"] + out.closed["empty"]
        return run.done(CERTIFIED, "diff-bab" if by_bounds else "enumeration")
    att = search_attack(
        runtime, qspec, region, label, start=start_point, seed=seed, deadline=deadline
    )
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)
    return run.done(UNKNOWN, "budget")


def _folded_bounds(
    runtime, model, region: Region, label: int, threshold, detail, deadline: float, whole=None
) -> tuple[list[tuple[Region, QuantizedSpec]], list[Leaf], Cover] | None:
    """The sub-regions of `region` once the first layer's run-time input quantization is folded
    into each (`quantized_spec.fold_parts`: each with its folded spec), guarded by the runtime's
    logits at its point nearest 0; those the runtime's own bounds do not certify, as leaves with
    their bounds; and the cover of the parts (cuts, folds, and the parts the bounds closed);
    None when there is no such fold or time ran out. `whole`: the model and its rounding bounds
    over the whole region, when already computed (`quantized_spec.whole_region_errors`)."""
    cover = Cover()
    parts = fold_parts(model, region, label, whole, cover)
    if parts is None:
        return None
    detail["input_fold"] = f"{len(parts)} sub-regions"
    nearest = np.stack([np.clip(0, part.lo, part.hi) for part, _ in parts])
    got = np.asarray(runtime.predict(runtime_inputs(runtime, region, nearest)), np.float64)
    left = []
    for (part, qs), p, g in zip(parts, nearest, got, strict=True):
        if time.perf_counter() > deadline:
            return None
        lo, hi = qs.interval(p)
        if not (g.shape == lo.shape and np.all((g >= lo) & (g <= hi))):
            detail["input_fold"] = "the runtime's logits lie outside the folded model's interval"
            return None
        # rows kept for its children in branch and bound (`_reuse`'s leaves keep theirs too);
        # with or without the deeper cuts, as the whole region's root (`root_bounds`)
        b = root_bounds(qs.spec, part.lo, part.hi, reuse=True)
        leaf = Leaf(part.lo, part.hi, wrap_direct(None, b))
        if leaf.bounds.empty or np.all(leaf.bounds.lower > threshold):
            close_by_bounds(cover, leaf, region, threshold)
        else:
            left.append(leaf)
    detail["input_fold_open"] = len(left)
    return parts, left, cover


def _root_only(proof: ClosedLeaves) -> bool:
    return len(proof.leaves) == 1 and proof.leaves[0].bounds is proof.root


def _close_absorbed(
    run: _Run, qspec, threshold, absorbed: list[Leaf], direct, deadline: float
) -> None:
    """Close in the proof the float leaves the differential bound alone closed, by the
    runtime's own bounds (what the audit re-derives); no proof when one stays open."""
    if run.cover is None:
        return
    for leaf in absorbed:
        if time.perf_counter() > deadline:
            run.cover, run.detail["no_proof"] = None, "no time to re-bound absorbed leaves"
            return
        whole = np.array_equal(leaf.lo, run.region.lo) and np.array_equal(leaf.hi, run.region.hi)
        b = direct if whole else linear_bounds(qspec, leaf.lo, leaf.hi, parent=direct)
        if not (b.empty or np.all(b.lower > threshold)):
            run.cover, run.detail["no_proof"] = None, "a leaf closed by the difference alone"
            return
        close_by_bounds(run.cover, Leaf(leaf.lo, leaf.hi, b), run.region, threshold)


def _reuse(
    ds,
    qspec,
    threshold: np.ndarray,
    region: Region,
    proof: ClosedLeaves,
    direct,
    detail: dict,
    deadline: float,
    cover: Cover | None,
    absorbed: list[Leaf],
    on_leaves: SpecChain,
    boxed: bool,
) -> list[Leaf] | None:
    """The float proof's leaves the difference is not absorbed in, with the runtime's own bounds
    (the root alone when the root bounds certified); None when time ran out. Intermediate
    differences by intervals only (`refine=False`): refined, the root bound gained nothing over
    the runtime's own on any MNIST input measured, at 0.5-1.5 s an input. Leaves the runtime's
    own bounds close go into `cover` (None: no proof kept); those the difference alone closes
    into `absorbed`. `on_leaves`: the spec the leaves are bounded on (`qspec` narrowed on the
    root's bounds: `quantized_spec.narrow_inputs`); `boxed`: with its first rounding as it is on
    each leaf (`box_rounding.on_box`)."""
    b = quantized_bounds(ds, region.lo, region.hi, proof.root, direct, refine=False)
    detail["diff_root_margin"] = float(np.min(b.lower))
    detail["diff_root_delta"] = float(np.min(b.delta))
    # how much the differential bound adds to the runtime's own on the worst margin
    detail["diff_root_gain"] = float(np.min(b.lower) - np.min(direct.lower))
    if _root_only(proof):
        if np.all(b.lower > threshold):
            absorbed.append(Leaf(region.lo, region.hi, b))
            return []
        return [Leaf(region.lo, region.hi, b)]
    # the difference's bound over the whole region holds in every leaf: a leaf whose float
    # bound absorbs it is closed at no cost (the quantized margin is at least the float one
    # plus the difference, or the spec's positive cap)
    delta = b.delta if not b.empty else None
    left = []
    for leaf in proof.leaves:
        if (
            delta is not None
            and not leaf.bounds.empty
            and np.all(leaf.bounds.lower + delta > threshold)
        ):
            absorbed.append(leaf)
            continue
        if time.perf_counter() > deadline:
            return None
        # rows kept (`reuse`): its children in branch and bound reuse them as every other
        # node's do (the root's bounds keep none, so the leaf's own are as without)
        spec = on_box(on_leaves, leaf.lo, leaf.hi) if boxed else on_leaves
        b = linear_bounds(spec, leaf.lo, leaf.hi, parent=direct, open_only=True, reuse=True)
        if not (b.empty or np.all(b.lower > threshold)):
            left.append(Leaf(leaf.lo, leaf.hi, wrap_direct(leaf.bounds, b)))
        elif cover is not None:
            close_by_bounds(cover, Leaf(leaf.lo, leaf.hi, b), region, threshold)
    detail["float_leaves"] = len(proof.leaves)
    detail["float_leaves_absorbed"] = len(absorbed)  # closed by the root's difference bound alone
    detail["float_leaves_reused"] = len(proof.leaves) - len(left)
    return left
