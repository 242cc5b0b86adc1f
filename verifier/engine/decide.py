"""The decision procedure for one (runtime, chain, input, label, region): one entry point.

Order: a region small enough is enumerated on the runtime outright; otherwise a cheap attack,
bounds over the whole region, a search attack, branch and bound on generators (small leaves
enumerated on the runtime), and an exact back end (a mixed-integer program, or z3 where it
cannot encode the chain) on small leaves left. Every step is sound on its own:
counterexamples are re-run on the runtime, certificates come from enumeration on the runtime,
from bounds on the chain the runtime evaluates, or from z3 / the program on that chain (the
program includes the float32 rounding bounds).

Which runtimes bounds speak for (and z3, which reasons about the same float chain):
- `quantized=False`: the runtime evaluates the float chain in float32. Bounds include a sound
  bound on float32 rounding (see `bounds`), so they certify the runtime's own margins. As a
  guard, the runtime's output at `x` must match the chain; if not, bounds are switched off.
  z3 reasons about the chain in exact arithmetic (it does not model float32 rounding).
- `quantized=True` (any runtime that is not the float network: int8, simulated bits, ...):
  bounds on the float chain say nothing about it, so without an `error_model` certification
  comes only from enumerating the region on that runtime. With one
  (`quantize.error_model.ErrorModel`: the runtime's own weights and what it rounds), bounds
  run on the model's chain with its rounding bounded per neuron over the region, so they speak
  for the runtime; as a guard, the runtime's logits at `x` must lie within the model's
  interval there, else bounds are switched off. z3 stays off (it does not model rounding).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from verifier.engine.attack import quick_attack, search_attack
from verifier.engine.bab import ClosedLeaves, Leaf, branch_and_bound, close_by_bounds
from verifier.engine.bounds import (
    PreparedChain,
    SpecChain,
    holds_point_of,
    interval_bounds,
    linear_bounds,
    prepare_chain,
    relu_pre_bounds,
    restricted,
    spec_chain,
)
from verifier.engine.enumeration import confirm, enumerate_box
from verifier.engine.network import LoweredLayer, forward_lowered
from verifier.engine.points import runtime_inputs
from verifier.engine.pointwise import first_exact_margins
from verifier.engine.proof import Cover, to_text
from verifier.engine.quantized_spec import decision_thresholds, quantized_spec
from verifier.engine.regions import Region
from verifier.engine.relu_split import POLICIES, relu_branch_and_bound
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN, Decision

# z3 only gets leaves with at most this many undecided ReLUs: on bigger ones (the MNIST MLP's
# leaves have 150-600) it answers "unknown" after its timeout, and its encoding alone can
# overrun the timeout by seconds. When z3 is in play, branch and bound gets this share of time.
SMT_MAX_UNSTABLE = 64
SMT_BAB_SHARE = 0.6
# The mixed-integer program (verifier.engine.milp) takes leaves with at most this many too: on the
# same regions of small random MLPs (11-46 unstable ReLUs) it answered in 0.1-11 s where z3
# took 1.3-20 s or timed out at 30 s (one of 24 timed out for both).
EXACT_MAX_UNSTABLE = 64

# Slopes are optimised (a few percent tighter, 5-20x the cost of plain linear bounds) only when
# the worst margin bound is within this fraction of the attack's best margin below zero.
ALPHA_NEAR = 0.25

# The search attack's share of the timeout (after root bounds that do not certify). Where it
# refutes, it does so early: on the MNIST MLP's first 1,000 inputs (features r=20 and r=10,
# lattice; 2 s and 10 s) the attack steps of the inputs it refuted took at most 0.02 s but
# one (0.11 s, at 10 s), while on every input that goes on to branch and bound it runs
# 5,400-6,000 evaluations (0.1-0.14 s, mostly its beam search): 15% of the time of a features
# r=20 run at 2 s. At 2 s this share refuted the same inputs as 0.05 (features r=20, r=10).
SEARCH_SHARE = 0.02

# The runtime's output at x may differ from the float64 chain by this much (relative to the
# largest logit) before bounds are distrusted: float32 evaluation stays far below it.
# Points per second a runtime is assumed to evaluate, generously: a region larger than this
# times the timeout is not attempted by enumeration.
ENUM_RATE = 200_000
CHAIN_MATCH_RTOL = 1e-4


def decide(
    runtime,
    chain: list[LoweredLayer] | PreparedChain,
    region: Region,
    label: int,
    *,
    timeout: float,
    max_nodes: int = 20000,
    enum_limit: int = 4096,
    use_smt: bool = True,
    quantized: bool = False,
    error_model=None,
    seed: int = 0,
    alpha_steps: int = 20,
    beam: int = 8,
    attack_share: float = SEARCH_SHARE,
    splits: str = "generator",
    exact: str = "milp",
    keep_leaves: bool = False,
    node_alpha: bool = False,
    knapsack_cut: bool = True,
    inherit: bool = True,
    sieve: bool = True,
) -> Decision:
    """Certified / refuted / unknown for `region` around its input, and the route that decided.

    `timeout` (seconds) and `max_nodes` bound the whole call; regions or B&B leaves with at
    most `enum_limit` points are enumerated on the runtime; `attack_share` of the time may go
    to the search attack. See the module docstring for `quantized` and `error_model`.
    `splits`: "generator" (branch and bound on generator ranges), or "relu" / "mixed" (ReLU
    phase splits too, `verifier.engine.relu_split`; closes leaves by route "relu-split").
    `exact`: the
    back end for small leaves, "milp" (z3 where the program cannot encode the chain) or "z3".
    `alpha_steps` optimise the root's slopes; `node_alpha` also each branch-and-bound node's
    (off: at features r=20 a node then costs about a third less CPU, for 5-25% more nodes).
    `knapsack_cut=False` bounds with the triangle lines only (for side-by-side benchmarks).
    `inherit`: a generator branch-and-bound child holding its parent's point nearest 0 (the one
    that drops a feature) minimises its parent's intermediate linear bounds over its box
    instead of deriving its own (`bounds.linear_bounds(reuse=True)`); it is queued on its
    parent's margin bounds re-minimised over its box (`bounds.restricted`) and bounds itself
    only once popped for a split (most of the others close by the sieve on those bounds).
    `sieve=False`: no leaf closes by running only the points its bounds leave open
    (`bab.settle_node`; for side-by-side benchmarks).
    Pass `bounds.prepare_chain(chain)` when deciding many regions of one model (saves copies).

    `detail` holds: "leaves" (leaves closed per route: bab, empty, enumeration, z3, milp,
    relu-split), "open_leaves", "points" (enumerated on the runtime), "attack_evals", "steps"
    (seconds per step), "trusted_bounds" (and "chain_gap" / "untrusted_reason"),
    "bounds_method" and "root_margin" (worst root lower bound minus the threshold), z3, milp
    and enumeration notes, and on certification "proof": the cover that proved it
    (`verifier.engine.proof`, as ASCII; generator splits only: ReLU phase splits keep no proof yet);
    with `keep_leaves`, a certificate from bounds leaves its `bab.ClosedLeaves` in "reuse"
    (what the quantized decision starts from, `verifier.engine.diffdecide`).
    """
    chain = prepare_chain(chain)
    _check(
        chain.layers,
        region,
        label,
        timeout,
        max_nodes,
        enum_limit,
        quantized,
        error_model,
        splits,
        exact,
    )
    start = time.perf_counter()
    deadline = start + timeout
    detail: dict = {"leaves": {}, "points": 0, "attack_evals": 0, "steps": {}}
    run = _Run(runtime, region, label, start, detail)

    size = region.count(enum_limit)
    if size <= enum_limit:
        return run.enumerate_all(deadline, "small region")

    if quantized and error_model is not None:
        spec, trusted, qs = _model_spec(runtime, error_model, region, label, detail)
        threshold = (
            np.zeros(len(spec.others)) if qs is None else decision_thresholds(error_model, spec)
        )
    else:
        spec = spec_chain(chain, region, label, float32=not quantized)
        trusted, threshold = _trust(runtime, chain, spec, region, quantized, detail)
    if not knapsack_cut:
        spec = replace(spec, knapsack_cut=False)
    if trusted:  # bounds leaves speak of this spec (see verifier.engine.proof.SPECS)
        run.spec = "error-model" if quantized else "float32"

    att = quick_attack(runtime, spec, region, label, seed=seed)
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)

    root = None
    # optimised slopes only where they may close the gap: within ALPHA_NEAR of the attack's
    # best runtime margin (an upper bound on the true minimum) below the threshold
    gap = ALPHA_NEAR * max(att.best_margin, 1e-6)
    if trusted:
        root = _root_bounds(spec, region, threshold, alpha_steps, gap, detail)
        run.step("bounds")
        if np.all(root.lower > threshold):
            close_by_bounds(run.cover, Leaf(region.lo, region.hi, root), region, threshold)
            if keep_leaves:
                whole = [Leaf(region.lo, region.hi, root)]
                detail["reuse"] = ClosedLeaves(spec, root, whole, run.cover)
            return run.done(CERTIFIED, "bounds")

    att = search_attack(
        runtime,
        spec,
        region,
        label,
        start=att.best,
        beam=beam,
        seed=seed,
        deadline=min(deadline, time.perf_counter() + attack_share * timeout),
    )
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)

    if root is None:
        cap = max(enum_limit, int(ENUM_RATE * timeout))
        if region.count(cap + 1) > cap:
            # Bounds do not speak for this runtime and the region cannot be enumerated in the
            # time given: say unknown now instead of spending the whole budget to say it later.
            detail["enumeration"] = f"region has more than {cap} points; no sound error bound"
            return run.done(UNKNOWN, "budget")
        return run.enumerate_all(deadline, "bounds not trusted for this runtime")

    smt = _smt_function(use_smt, quantized)
    return _refine(
        run,
        spec,
        chain,
        root,
        threshold,
        gap,
        smt,
        deadline,
        max_nodes,
        enum_limit,
        alpha_steps,
        splits,
        exact,
        keep_leaves,
        node_alpha,
        inherit,
        sieve,
    )


def _refine(
    run: _Run,
    spec: SpecChain,
    chain: PreparedChain,
    root,
    threshold,
    gap: float,
    smt,
    deadline: float,
    max_nodes: int,
    enum_limit: int,
    alpha_steps: int,
    splits: str = "generator",
    exact_backend: str = "milp",
    keep_leaves: bool = False,
    node_alpha: bool = False,
    inherit: bool = False,
    sieve: bool = True,
) -> Decision:
    """Branch and bound from the root bounds; the exact back end on the open leaves small enough
    for it; branch and bound again on what is left, until the budget runs out (`keep_leaves`: the
    closed leaves go to `detail["reuse"]`)."""
    region = run.region
    leaves = [Leaf(region.lo, region.hi, root)]
    if splits != "generator":
        run.cover = None  # a ReLU phase split shares its parent's box: no cover to keep yet
        keep_leaves = False  # nor leaves to reuse
    exact = _exact_function(smt, spec, threshold, exact_backend)
    if exact is not None and _unstable(leaves[0], spec) > 2 * EXACT_MAX_UNSTABLE:
        exact = None  # leaves of this network will rarely be small enough: all time to B&B
    closed: dict = {}
    reuse: list[Leaf] = []  # leaves that closed the float model's region, with their bounds

    node_steps = alpha_steps if node_alpha else 0
    # a ReLU phase split keeps the box: its children must derive their own intermediate bounds
    inherit = inherit and splits == "generator"

    def bound(lo, hi, parent):
        return linear_bounds(
            spec,
            lo,
            hi,
            alpha_steps=node_steps,
            target=threshold,
            parent=parent,
            alpha_gap=gap,
            reuse=inherit,
            open_only=True,
        )

    def provisional(lo, hi, parent):  # a child holding the parent's point nearest 0
        if not holds_point_of(parent, lo, hi):
            return None
        return restricted(spec, parent, lo, hi, threshold)

    for stage in ("bab", "exact", "bab"):
        if not leaves or time.perf_counter() > deadline:
            break
        if stage == "exact":
            if exact is None:
                continue
            before = leaves
            hit, leaves, n_closed = _exact_leaves(run, exact, spec, chain.layers, leaves, deadline)
            closed[exact[0]] = closed.get(exact[0], 0) + n_closed
            if keep_leaves:
                still = {id(leaf) for leaf in leaves}
                reuse += [leaf for leaf in before if id(leaf) not in still]
            if hit is not None:
                return hit
            continue
        share = SMT_BAB_SHARE if exact is not None and exact[0] not in closed else 1.0
        budget = {
            "deadline": time.perf_counter() + share * (deadline - time.perf_counter()),
            "max_nodes": max_nodes - run.nodes,
            "enum_limit": enum_limit,
        }
        if splits == "generator":
            out = branch_and_bound(
                run.runtime,
                region,
                run.label,
                leaves,
                bound,
                threshold,
                cover=run.cover,
                keep_closed=keep_leaves,
                sieve=sieve,
                provisional=provisional if inherit else None,
                pointwise=lambda leaf, rows, s, t: first_exact_margins(
                    spec, leaf.bounds, rows, s, t
                ),
                **budget,
            )
        else:
            out = relu_branch_and_bound(
                run.runtime,
                region,
                run.label,
                spec,
                leaves,
                bound,
                threshold,
                policy=splits,
                **budget,
            )
        reuse += out.closed_leaves
        run.nodes += out.nodes
        run.detail["points"] += out.points
        for key, count in out.closed.items():
            closed[key] = closed.get(key, 0) + count
        run.step("bab")
        if out.status == REFUTED:
            return run.done(REFUTED, out.route, out.coeffs, out.adv_label)
        leaves = out.open_leaves
    run.detail["leaves"] = {k: v for k, v in closed.items() if v}
    run.detail["open_leaves"] = len(leaves)
    if leaves:
        return run.done(UNKNOWN, "budget")
    if keep_leaves:
        run.detail["reuse"] = ClosedLeaves(spec, root, reuse, run.cover)
    counts = {
        "bab": closed.get("bab", 0) + closed.get("empty", 0),
        "enumeration": closed.get("enumeration", 0) + closed.get("sieve", 0),
        "z3": closed.get("z3", 0),
        "milp": closed.get("milp", 0),
        "relu-split": closed.get("relu-split", 0),
    }
    return run.done(CERTIFIED, max(counts, key=lambda k: counts[k]))


class _Run:
    """Bookkeeping of one call: step times, counts, and the final `Decision`."""

    def __init__(self, runtime, region: Region, label: int, start: float, detail: dict):
        self.runtime, self.region, self.label = runtime, region, label
        self.start = self.mark = start
        self.detail = detail
        self.nodes = 0
        # the proof of a certification, as the steps close boxes (None: a route keeps none)
        self.cover: Cover | None = Cover()
        self.spec = "none"  # what bounds leaves are computed on (verifier.engine.proof.SPECS)

    def step(self, name: str, evals: int = 0) -> None:
        now = time.perf_counter()
        steps = self.detail["steps"]
        steps[name] = steps.get(name, 0.0) + (now - self.mark)
        self.mark = now
        self.detail["attack_evals"] += evals

    def done(self, status: str, route: str, coeffs=None, adv_label=None) -> Decision:
        if coeffs is not None:
            coeffs = np.asarray(coeffs, dtype=np.int64)
            adv_label = None if adv_label is None else int(adv_label)
        if status == CERTIFIED and self.cover is not None:
            proof = self.cover.proof(self.region.lo, self.region.hi, self.spec)
            self.detail["proof"] = to_text(proof)
        return Decision(
            status,
            route,
            coeffs,
            adv_label,
            time.perf_counter() - self.start,
            self.nodes,
            self.detail,
        )

    def enumerate_all(self, deadline: float, why: str) -> Decision:
        """The whole region on the runtime: the ground truth, if time allows."""
        self.detail["enumeration"] = why
        res = enumerate_box(self.runtime, self.region, self.label, deadline=deadline)
        self.detail["points"] += res.points
        self.step("enumeration")
        if res.coeffs is not None:
            return self.done(REFUTED, "enumeration", res.coeffs, res.adv_label)
        if res.clean:
            self.detail["leaves"]["enumeration"] = 1
            self.cover.close(self.region.lo, self.region.hi, "enumeration", res.points)
            return self.done(CERTIFIED, "enumeration")
        if res.ambiguous:
            self.detail["ambiguous"] = "misclassified in a batch but not when re-run alone"
        return self.done(UNKNOWN, "budget")


def _check(
    chain,
    region: Region,
    label,
    timeout,
    max_nodes,
    enum_limit,
    quantized,
    error_model,
    splits: str = "generator",
    exact: str = "milp",
) -> None:
    """Reject inconsistent calls before any work."""
    if not chain:
        raise ValueError("the lowered chain is empty")
    first = chain[0]
    n_in = first.weight.shape[1] if hasattr(first, "weight") else None
    if n_in is not None and n_in != region.x.size:
        raise ValueError(f"region input has {region.x.size} values, the chain takes {n_in}")
    if not isinstance(label, (int, np.integer)) or label < 0:
        raise ValueError(f"label must be a non-negative integer, got {label!r}")
    if not timeout > 0 or max_nodes < 0 or enum_limit < 0:
        raise ValueError("timeout must be positive; max_nodes and enum_limit non-negative")
    if error_model is not None and not quantized:
        raise ValueError("error_model applies to quantized runtimes: pass quantized=True")
    if splits not in POLICIES:
        raise ValueError(f"splits must be one of {', '.join(POLICIES)}, got {splits!r}")
    if exact not in ("milp", "z3"):
        raise ValueError(f"exact must be 'milp' or 'z3', got {exact!r}")


def _trust(
    runtime,
    chain,
    spec: SpecChain,
    region: Region,
    quantized: bool,
    detail: dict,
) -> tuple[bool, np.ndarray]:
    """Whether bounds on the chain speak for this runtime, and the margin they must exceed."""
    if quantized:
        detail["trusted_bounds"] = False
        detail["untrusted_reason"] = "no error model for this runtime"
        return False, np.zeros(len(spec.others))
    ref = forward_lowered(chain.layers, region.x[None])[0]
    got = _output_at_x(runtime, region)
    gap = float(np.abs(got - ref).max()) if got.shape == ref.shape else np.inf
    detail["chain_gap"] = gap
    ok = gap <= CHAIN_MATCH_RTOL * max(1.0, float(np.abs(ref).max()))
    detail["trusted_bounds"] = ok
    if not ok:
        detail["untrusted_reason"] = "runtime output at x differs from the chain's logits"
    return ok, np.zeros(len(spec.others))


def _output_at_x(runtime, region: Region) -> np.ndarray:
    """The runtime's logits at the region's centre x (coefficients all 0)."""
    s = np.zeros((1, len(region.lo)))
    return np.asarray(runtime.predict(runtime_inputs(runtime, region, s)), dtype=np.float64)[0]


def _model_spec(runtime, model, region: Region, label: int, detail: dict):
    """The spec on a quantized runtime's error model, and whether it is trusted: its rounding
    bounds hold over the region and the runtime's logits at x lie within the model's interval
    there (a wrong mapping shows up as a miss); and the `QuantizedSpec` it came from (None when
    the error model has no bound over the region)."""
    try:
        qs = quantized_spec(model, region, label)
    except ValueError as exc:
        detail["trusted_bounds"] = False
        detail["untrusted_reason"] = f"error model: {exc}"
        return spec_chain(model.chain, region, label, float32=False), False, None
    spec = qs.spec
    lo, hi = qs.interval(np.zeros(len(region.lo)))
    got = _output_at_x(runtime, region)
    ok = got.shape == lo.shape and bool(np.all((got >= lo) & (got <= hi)))
    detail["trusted_bounds"] = ok
    detail["logit_error_bound"] = float(np.max(hi - lo) / 2.0)
    detail["output_clamp"] = "bounded apart" if spec.cap is not None else "per logit"
    if qs.region is not region:
        detail["input_grid_fold"] = True
    if not ok:
        detail["untrusted_reason"] = "runtime output at x lies outside the error model's bounds"
    return spec, ok, qs


def _root_bounds(
    spec: SpecChain, region: Region, threshold, alpha_steps: int, gap: float, detail: dict
):
    """IBP, then linear bounds (optimised slopes when within `gap`), whichever certifies."""
    ibp = interval_bounds(spec, region.lo, region.hi)
    detail["bounds_method"] = "ibp"
    if ibp.empty or np.all(ibp.lower > threshold):
        detail["root_margin"] = float(np.min(ibp.lower - threshold))
        return ibp
    b = linear_bounds(
        spec,
        region.lo,
        region.hi,
        ibp=ibp,
        alpha_steps=alpha_steps,
        target=threshold,
        alpha_gap=gap,
    )
    detail["bounds_method"] = b.method
    detail["root_margin"] = float(np.min(b.lower - threshold))
    return b


def _smt_function(use_smt: bool, quantized: bool):
    """`verifier.engine.smt.smt_decide` when z3 may speak for this runtime and the module exists."""
    if not use_smt or quantized:
        return None
    try:
        from verifier.engine.smt import smt_decide
    except ImportError:
        return None
    return smt_decide


def _exact_function(smt, spec: SpecChain, threshold, backend: str = "milp"):
    """(route, function) of the exact back end for small leaves: the mixed-integer program when
    it encodes this spec (faster than z3 on every leaf measured, see verifier.engine.milp), else z3;
    None when neither may speak for the runtime (z3 off means both are)."""
    if smt is None:
        return None
    try:
        from verifier.engine import milp
    except ImportError:  # highspy missing: z3 as before
        return "z3", smt
    if backend == "z3" or not milp.supported(spec):
        return "z3", smt

    def solve(chain, region, label, left, lo, hi, leaf):
        return milp.milp_decide(spec, lo, hi, leaf.bounds, left, threshold)

    return "milp", solve


def _unstable(leaf: Leaf, spec: SpecChain) -> int:
    """ReLUs whose pre-activation bounds straddle 0 in this leaf (what z3 must branch on)."""
    return sum(int(np.sum((lo < 0) & (hi > 0))) for lo, hi in relu_pre_bounds(leaf.bounds, spec))


def _exact_leaves(run: _Run, exact, spec: SpecChain, chain, leaves: list[Leaf], deadline):
    """The exact back end (`exact` = (route, function)) on the leaves small enough for it
    (worst first), each with the remaining time.

    Returns (a refutation confirmed on the runtime or None, the leaves still open, the number
    closed); a sat model the runtime does not confirm leaves its leaf open.
    """
    route, solve = exact
    limit = SMT_MAX_UNSTABLE if route == "z3" else EXACT_MAX_UNSTABLE
    still_open = []
    closed = unconfirmed = 0
    for leaf in leaves:
        left = deadline - time.perf_counter()
        if left <= 0 or _unstable(leaf, spec) > limit:
            still_open.append(leaf)
            continue
        if route == "z3":
            res = solve(
                chain,
                run.region,
                run.label,
                left,
                lo=leaf.lo,
                hi=leaf.hi,
                pre_bounds=relu_pre_bounds(leaf.bounds, spec),
            )
        else:
            res = solve(chain, run.region, run.label, left, leaf.lo, leaf.hi, leaf)
        if res.status == "unsat":
            closed += 1
            if run.cover is not None:
                run.cover.close(leaf.lo, leaf.hi, route)
            continue
        if res.status == "sat" and res.coeffs is not None:
            adv = confirm(run.runtime, run.region, res.coeffs, run.label)
            if adv is not None:
                run.step(route)
                return run.done(REFUTED, route, res.coeffs, adv), [], closed
            unconfirmed += 1
        still_open.append(leaf)
    run.detail[f"{route}_unconfirmed"] = run.detail.get(f"{route}_unconfirmed", 0) + unconfirmed
    run.step(route)
    return None, still_open, closed
