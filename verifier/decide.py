"""The decision procedure for one (runtime, chain, input, label, region): one entry point.

Order: a region small enough is enumerated on the runtime outright; otherwise a cheap attack,
bounds over the whole region, a search attack, branch and bound on generators (small leaves
enumerated on the runtime), and z3 on what is left. Every step is sound on its own:
counterexamples are re-run on the runtime, certificates come from enumeration on the runtime,
from bounds on the chain the runtime evaluates, or from z3 on that chain.

Which runtimes bounds speak for (and z3, which reasons about the same float chain):
- `quantized=False`: the runtime evaluates the float chain in float32. Bounds include a sound
  bound on float32 rounding (see `bounds`), so they certify the runtime's own margins. As a
  guard, the runtime's output at `x` must match the chain; if not, bounds are switched off.
  z3 reasons about the chain in exact arithmetic (it does not model float32 rounding).
- `quantized=True` (any runtime that is not the float network: int8, simulated bits, ...):
  bounds on the float chain say nothing about it, so by default certification comes only from
  enumerating the region on that runtime. A caller who has a *sound* bound `quant_error` = eps
  with |runtime logit - chain logit| <= eps at every point of the region may pass it: bounds
  then certify margins above 2 * eps.
"""

from __future__ import annotations

import inspect
import time

import numpy as np

from verifier.attack import quick_attack, search_attack
from verifier.bab import Leaf, branch_and_bound
from verifier.bounds import (
    PreparedChain,
    SpecChain,
    interval_bounds,
    linear_bounds,
    prepare_chain,
    relu_pre_bounds,
    spec_chain,
)
from verifier.enumeration import box_size, confirm, enumerate_box, runtime_inputs
from verifier.network import LoweredLayer, forward_lowered
from verifier.regions import Region
from verifier.result import CERTIFIED, REFUTED, UNKNOWN, Decision

# The runtime's output at x may differ from the float64 chain by this much (relative to the
# largest logit) before bounds are distrusted: float32 evaluation stays far below it.
CHAIN_MATCH_RTOL = 1e-4


def decide(runtime, chain: list[LoweredLayer] | PreparedChain, region: Region, label: int, *,
           timeout: float = 30.0, max_nodes: int = 20000, enum_limit: int = 8192,
           use_smt: bool = True, quantized: bool = False, quant_error: float | None = None,
           seed: int = 0, alpha_steps: int = 20, beam: int = 8,
           attack_share: float = 0.25) -> Decision:
    """Certified / refuted / unknown for `region` around its input, and the route that decided.

    `timeout` (seconds) and `max_nodes` bound the whole call; regions or B&B leaves with at
    most `enum_limit` points are enumerated on the runtime; `attack_share` of the time may go
    to the search attack. See the module docstring for `quantized` and `quant_error`.
    Pass `bounds.prepare_chain(chain)` when deciding many regions of one model (saves copies).
    """
    chain = prepare_chain(chain)
    _check(chain.layers, region, label, timeout, max_nodes, enum_limit, quantized, quant_error)
    start = time.perf_counter()
    deadline = start + timeout
    detail: dict = {"leaves": {}, "points": 0, "attack_evals": 0, "steps": {}}
    run = _Run(runtime, region, label, start, detail)

    size = box_size(region.lo, region.hi, region.cost, region.budget, enum_limit)
    if size <= enum_limit:
        return run.enumerate_all(deadline, "small region")

    spec = spec_chain(chain, region, label, float32=not quantized)
    trusted, threshold = _trust(runtime, chain, spec, region, quantized, quant_error, detail)

    att = quick_attack(runtime, spec, region, label, seed=seed)
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)

    root = None
    if trusted:
        root = _root_bounds(spec, region, threshold, alpha_steps, detail)
        run.step("bounds")
        if np.all(root.lower > threshold):
            return run.done(CERTIFIED, "bounds")

    att = search_attack(runtime, spec, region, label, start=att.best, beam=beam, seed=seed,
                        deadline=min(deadline, time.perf_counter() + attack_share * timeout))
    run.step("attack", evals=att.evaluations)
    if att.coeffs is not None:
        return run.done(REFUTED, "attack", att.coeffs, att.adv_label)

    if root is None:
        return run.enumerate_all(deadline, "bounds not trusted for this runtime")

    smt = _smt_function(use_smt, quantized)
    bab_deadline = deadline if smt is None else time.perf_counter() + 0.6 * (
        deadline - time.perf_counter())

    def bound(lo, hi, parent):
        return linear_bounds(spec, lo, hi, alpha_steps=alpha_steps, target=threshold,
                             parent=parent)

    out = branch_and_bound(runtime, region, label, Leaf(region.lo, region.hi, root), bound,
                           threshold, deadline=bab_deadline, max_nodes=max_nodes,
                           enum_limit=enum_limit)
    detail["points"] += out.points
    detail["leaves"] = {k: v for k, v in out.closed.items() if v}
    detail["open_leaves"] = len(out.open_leaves)
    run.nodes = out.nodes
    run.step("bab")
    if out.status != UNKNOWN:
        return run.done(out.status, out.route, out.coeffs, out.adv_label)
    if smt is None or not out.open_leaves:
        return run.done(UNKNOWN, "budget")
    return _smt_leaves(run, smt, spec, chain.layers, out, threshold, deadline)


class _Run:
    """Bookkeeping of one call: step times, counts, and the final `Decision`."""

    def __init__(self, runtime, region: Region, label: int, start: float, detail: dict):
        self.runtime, self.region, self.label = runtime, region, label
        self.start = self.mark = start
        self.detail = detail
        self.nodes = 0

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
        return Decision(status, route, coeffs, adv_label, time.perf_counter() - self.start,
                        self.nodes, self.detail)

    def enumerate_all(self, deadline: float, why: str) -> Decision:
        """The whole region on the runtime: the ground truth, if time allows."""
        self.detail["enumeration"] = why
        res = enumerate_box(self.runtime, self.region, self.label, deadline=deadline)
        self.detail["points"] += res.points
        self.step("enumeration")
        if res.coeffs is not None:
            return self.done(REFUTED, "enumeration", res.coeffs, res.adv_label)
        if res.complete:
            self.detail["leaves"]["enumeration"] = 1
            return self.done(CERTIFIED, "enumeration")
        return self.done(UNKNOWN, "budget")


def _check(chain, region: Region, label, timeout, max_nodes, enum_limit, quantized,
           quant_error) -> None:
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
    if quant_error is not None and not quantized:
        raise ValueError("quant_error applies to quantized runtimes: pass quantized=True")
    if quant_error is not None and not (np.isfinite(quant_error) and quant_error >= 0):
        raise ValueError(f"quant_error must be a finite eps >= 0, got {quant_error!r}")


def _trust(runtime, chain, spec: SpecChain, region: Region, quantized: bool,
           quant_error: float | None, detail: dict) -> tuple[bool, np.ndarray]:
    """Whether bounds on the chain speak for this runtime, and the margin they must exceed."""
    if quantized:
        detail["trusted_bounds"] = quant_error is not None
        eps = 0.0 if quant_error is None else float(quant_error)
        return quant_error is not None, np.full(len(spec.others), 2.0 * eps)
    x = region.x[None]
    ref = forward_lowered(chain.layers, x)[0]
    got = np.asarray(runtime.predict(runtime_inputs(runtime, region, np.zeros((1, len(region.lo))))),
                     dtype=np.float64)[0]
    gap = float(np.abs(got - ref).max()) if got.shape == ref.shape else np.inf
    detail["chain_gap"] = gap
    ok = gap <= CHAIN_MATCH_RTOL * max(1.0, float(np.abs(ref).max()))
    detail["trusted_bounds"] = ok
    if not ok:
        detail["untrusted_reason"] = "runtime output at x differs from the chain's logits"
    return ok, np.zeros(len(spec.others))


def _root_bounds(spec: SpecChain, region: Region, threshold, alpha_steps: int, detail: dict):
    """IBP, then linear bounds, then optimised slopes, stopping at the first that certifies."""
    ibp = interval_bounds(spec, region.lo, region.hi)
    detail["bounds_method"] = "ibp"
    if ibp.empty or np.all(ibp.lower > threshold):
        detail["root_margin"] = float(np.min(ibp.lower - threshold))
        return ibp
    b = linear_bounds(spec, region.lo, region.hi, ibp=ibp)
    if not np.all(b.lower > threshold) and alpha_steps > 0:
        b = linear_bounds(spec, region.lo, region.hi, ibp=ibp, alpha_steps=alpha_steps,
                          target=threshold)
    detail["bounds_method"] = b.method
    detail["root_margin"] = float(np.min(b.lower - threshold))
    return b


def _smt_function(use_smt: bool, quantized: bool):
    """`verifier.smt.smt_decide` when z3 may speak for this runtime and the module exists."""
    if not use_smt or quantized:
        return None
    try:
        from verifier.smt import smt_decide
    except ImportError:
        return None
    return smt_decide


def _smt_leaves(run: _Run, smt, spec: SpecChain, chain, out, threshold, deadline) -> Decision:
    """z3 on each open leaf (worst first) with the remaining time; sat models are confirmed on
    the runtime, unsat closes the leaf; any unknown leaf makes the answer unknown."""
    closed = 0
    unconfirmed = 0
    accepts_margin = "margin" in inspect.signature(smt).parameters
    for leaf in out.open_leaves:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        kwargs = {"margin": threshold} if accepts_margin else {}
        res = smt(chain, run.region, run.label, left, lo=leaf.lo, hi=leaf.hi,
                  pre_bounds=relu_pre_bounds(leaf.bounds, spec), **kwargs)
        if res.status == "unsat":
            closed += 1
        elif res.status == "sat" and res.coeffs is not None:
            adv = confirm(run.runtime, run.region, res.coeffs, run.label)
            if adv is not None:
                run.step("z3")
                return run.done(REFUTED, "z3", res.coeffs, adv)
            unconfirmed += 1
    run.detail["leaves"]["z3"] = closed
    run.detail["z3_unconfirmed"] = unconfirmed
    run.detail["z3_margin_checked"] = accepts_margin
    run.step("z3")
    if closed == len(out.open_leaves):
        counts = {"bab": out.closed["bab"] + out.closed["empty"],
                  "enumeration": out.closed["enumeration"], "z3": closed}
        return run.done(CERTIFIED, max(counts, key=lambda k: counts[k]))
    return run.done(UNKNOWN, "budget")
