"""The spec a quantized runtime's error model gives on a region: its rounding bounds, the first
layer's input rounding folded into the region (`dynamic_input`: a fixed grid, or the run-time
quantization where its scale is the same at every point) and the logits' clamp bounded apart
(`output_clamp`) where they apply; and where that scale varies, the spec of each sub-region of
fixed scale (`fold_parts`: the decision and the audit's proof re-check build it alike)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from verifier.engine.bounds import (
    HALF_STEP,
    Bounds,
    PreparedChain,
    SpecChain,
    linear_bounds,
    point_interval,
    rounding_errors,
    spec_chain,
    weights,
)
from verifier.engine.dynamic_input import (
    exact_saturated_pairs,
    fold_first_input,
    fold_input_grid,
    fold_pair_sums,
    pair_weights,
    split_for_fold,
)
from verifier.engine.network import Affine, Relu
from verifier.engine.output_clamp import grid_ends, margin_caps
from verifier.engine.regions import Region

# at most this many sub-regions of fixed input scale (`dynamic_input.split_for_fold`): 9 of the
# 43 MNIST MLP regions measured (features r=10 step 1/8) need 9, the others 3-8; lattice r=20
# step 1/4 regions whose top value moves need 4-9
FOLD_PARTS = 16
# how much of the logits' grid step a tie-winning margin's bound may fall below 0
# (`decision_thresholds`): float32 dequantization moves a step by about 1e-5 of it
TIE_RTOL = 1e-3


@dataclass(frozen=True)
class QuantizedSpec:
    """The spec, the rounding bounds it was built from (`rounding_errors`' pair), the region
    it is on (x and directions of the runtime's rounded input when folded; same coefficient
    box), the chain they are on (the error model's, its first bias shifted when a saturation
    is folded: `dynamic_input.fold_pair_sums`, its last bias when `centre_pair_sums` centres
    the last layer's), and, when the logits' clamp is bounded apart,
    (lowest top, highest bottom, rounding) per logit; the spec's linear bounds over the whole
    region (`root`; capped where the caps were read off them)."""

    spec: SpecChain
    errors: tuple
    region: Region
    chain: PreparedChain
    ends: tuple | None = None
    root: Bounds | None = None
    model: object = None  # the error model it is on (`centre_pair_sums` applied)

    def interval(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The runtime's logits at coefficients `s` lie within (lo, hi)."""
        x = self.region.points(np.asarray(s)[None])[0]
        lo, hi = point_interval(self.chain, self.errors, x)
        if self.ends is not None:
            top, bottom, e = self.ends
            lo, hi = np.minimum(lo, top - e), np.maximum(hi, bottom + e)
        return lo, hi


def quantized_spec(model, region: Region, label: int) -> QuantizedSpec:
    """The error model's spec on `region` for `label`; ValueError when its rounding has no
    bound there."""
    folded = fold_input_grid(model, region)
    if folded is None:
        folded = fold_first_input(model, region)
    model, weights = exact_saturated_pairs(model, region, folded)  # saturated everywhere
    model = fold_pair_sums(model, region, folded, weights)  # the scale fixed, or its range
    on = region if folded is None else folded[0]
    left = None if folded is None else folded[1]

    ends = grid_ends(model)
    if ends is not None:  # the logits' clamp bounded apart: their rounding only here
        errs = rounding_errors(
            model.chain, on, rounding=model.rounding, clamp_output=True, first_step=left
        )
        e = errs[0][-1]
        spec = spec_chain(model.chain, on, label, errors=errs, lattice=output_lattice(model))
        spec, root = with_deeper_cuts(spec, on)
        cap = margin_caps(model, on, label, errs, *ends, e, root, spec)
        if cap is not None and np.all(cap > 0):
            root = replace(root, lower=np.minimum(root.lower, cap))
            return QuantizedSpec(
                replace(spec, cap=cap), errs, on, model.chain, (*ends, e), root, model
            )
    model, errs = centre_pair_sums(model, on, left)
    spec = spec_chain(model.chain, on, label, errors=errs, lattice=output_lattice(model))
    spec, root = with_deeper_cuts(spec, on)
    return QuantizedSpec(spec, errs, on, model.chain, root=root, model=model)


def decision_thresholds(model, spec: SpecChain) -> np.ndarray:
    """Per margin of `spec` (its label against each class of `others`), what its lower bound
    must exceed for the runtime to keep the label: 0, or just above minus one step where every
    logit lies on one grid (the last layer's output is requantized to it last,
    `output_lattice`) and the other class comes after the label. There the margin is a
    multiple of the step, so above minus one step it is at least 0, and a tie is the label's
    (the runtime's label is its argmax, the lowest class on ties, as `np.argmax` takes it)."""
    out = np.zeros(len(spec.others))
    grids = output_lattice(model)
    if grids is not None and grids[-1] is not None:
        out[spec.others > spec.label] = -grids[-1][0] * (1.0 - TIE_RTOL)
    return out


def with_deeper_cuts(spec: SpecChain, region: Region) -> tuple[SpecChain, Bounds]:
    """`spec` with the knapsack cuts of the ReLUs below the first (`SpecChain.deeper_cuts`, off on
    an error model's spec as built) where it has such ReLUs, and its linear bounds over the
    whole `region`: with or without the cuts, whichever is the better by worst margin (as
    `root_bounds` takes them). On feature regions every node takes the cuts, whatever the root
    chose: on the MNIST MLP's TFLite int8 copy (features r=20) they lowered the root bound by
    1-4 logits, yet with them branch and bound certified nine inputs of `R` near the 2 s budget
    in 3.07 s on average against 4.15 (40% fewer nodes; TFLite dynamic 3.97 -> 3.58 s, ORT QDQ
    4.46 -> 3.44, ORT dynamic 4.14 -> 3.90). On lattice regions the nodes take them only where
    the root bound did: there the cuts' linear bounds leave the sieve more points (the MNIST
    CNN's ORT dynamic copy, lattice r=20: 5 of the first 200 images' `R` certified in 0.7-1.3 s
    without them stayed open at 2 s with them). The proof check takes the better of both at a
    box (`verifier.run.proofcheck`)."""
    if not takes_deeper_cuts(spec):
        return spec, linear_bounds(spec, region.lo, region.hi)
    cut = replace(spec, deeper_cuts=True)
    root, with_cuts = _better_root(cut, region.lo, region.hi)
    if root.empty or (region.family == "lattice" and not with_cuts):
        return spec, root
    return cut, root


def _takes_cuts(spec: SpecChain, region: Region) -> bool:
    """Whether `with_deeper_cuts` gives `spec` its deeper cuts on `region`, bounding the root
    only where the choice needs it (a lattice region's)."""
    if region.family == "lattice":
        return with_deeper_cuts(spec, region)[0].deeper_cuts
    return takes_deeper_cuts(spec)


def takes_deeper_cuts(spec: SpecChain) -> bool:
    """Whether `spec` has ReLUs below the first, whose knapsack cuts `with_deeper_cuts` adds."""
    return any(isinstance(layer, Relu) for layer in spec.layers[2:])


def root_bounds(spec: SpecChain, lo: np.ndarray, hi: np.ndarray, *, reuse: bool = False) -> Bounds:
    """`linear_bounds` of `spec` over a whole region or a folded sub-region [lo, hi]: where it
    takes the deeper cuts, the better by worst margin of its bounds with and without them
    (over so large a box the cuts can be the looser lines; `_better_root`)."""
    if not (spec.deeper_cuts and takes_deeper_cuts(spec)):
        return linear_bounds(spec, lo, hi, reuse=reuse)
    return _better_root(spec, lo, hi, reuse)[0]


def _better_root(cut: SpecChain, lo, hi, reuse: bool = False) -> tuple[Bounds, bool]:
    """The better by worst margin of `cut`'s bounds over [lo, hi] with its deeper cuts and
    without them (without on a tie, when the box holds no point, or when the bounds without
    prove every margin already: 74 of the first 103 MNIST MLP inputs of `R` on its TFLite
    int8 copy, features r=10, where the second bound cost 6 ms an input), and whether with."""
    off = linear_bounds(replace(cut, deeper_cuts=False), lo, hi, reuse=reuse)
    if off.empty or np.all(off.lower > 0.0):
        return off, False
    on = linear_bounds(cut, lo, hi, reuse=reuse)
    return (on, True) if np.min(on.lower) > np.min(off.lower) else (off, False)


def output_lattice(model) -> list | None:
    """Per layer of the error model's chain: (step, origin) of the grid an Affine layer's
    output is requantized to last (`SpecChain.lattice`: its value is a point of it, clamp and
    a ReLU's zero included), or None; None when no layer has one."""
    out: list = [None] * len(model.chain.layers)
    for k, r in enumerate((model.rounding or [])[: len(out)]):
        if r is None or not isinstance(model.chain.layers[k], Affine):
            continue
        grid = r.output_grid
        if grid is None and r.outputs and r.outputs[-1].plain:
            grid = r.outputs[-1].grid
        if grid is not None and grid.scale > 0:
            out[k] = (float(grid.scale), float(grid.lo))
    return out if any(v is not None for v in out) else None


def whole_region_errors(model, region: Region) -> tuple:
    """(the model, its `rounding_errors` on `region`) as `quantized_spec` builds them on a
    region it does not fold: the first layer's pair sums folded over the scale's range
    (`dynamic_input.fold_pair_sums`), the last layer's centred (`centre_pair_sums`)."""
    model = fold_pair_sums(model, region)
    return centre_pair_sums(model, region)


def centre_pair_sums(model, region: Region, first_step=None) -> tuple:
    """(`model`, its `rounding_errors` on `region`) with the last layer's int16 pair-sum
    saturation (`quantize.rounding.PairSums`, no requantization after it) centred: like-signed
    pairs of positive integer weights only lower an output and negative ones only raise it, so
    its error lies in [-(e0 + P), e0 + N] (e0 the rest of its bound, P and N each sign's pair
    bound, `PairSums.sign`, from the same `rounding_errors` pass: `by_sign`). The middle
    (N - P) / 2 goes into the last bias and e0 + (P + N) / 2 is the bound left, where the
    two-sided e0 + P + N was. Nothing follows the last layer, so no other bound changes.
    `model` and its plain `rounding_errors` when there is nothing to do. `first_step`: as
    `rounding_errors`' (a folded first layer's input)."""
    k = len(model.chain.layers) - 1
    layer = model.chain.layers[k]
    r = model.rounding[k] if model.rounding and len(model.rounding) > k else None
    p = None if r is None else r.pairs
    centred = (
        k > 0
        and isinstance(layer, Affine)
        and p is not None
        and p.known is None
        and not np.any(p.sign)
        and not r.outputs
        and r.output_grid is None
        and p.adjacent
    )
    signs: list | None = [] if centred else None
    errors = rounding_errors(
        model.chain, region, rounding=model.rounding, first_step=first_step, by_sign=signs
    )
    if not centred:
        return model, errors
    full, (plus, minus) = errors[0][k], signs
    up = np.maximum(full - minus, 0.0)  # P: what positive pairs remove
    down = np.maximum(full - plus, 0.0)  # N: what negative pairs add
    rest = np.maximum(full - up - down, 0.0)  # e0
    if not np.any(up + down):
        return model, errors
    mid = (down - up) / 2.0
    half = (up + down) / 2.0 * (1.0 + 1e-9) + 1e-9 * np.abs(mid)
    chain = replace(
        model.chain, layers=[*model.chain.layers[:k], Affine(layer.weight, layer.bias + mid)]
    )
    rounding = [*model.rounding[:k], replace(r, pairs=replace(p, known=half))]
    out = [*errors[0][:k], rest + half]
    return replace(model, chain=chain, rounding=rounding), (out, errors[1])


def fold_parts(
    model, region: Region, label: int, whole: tuple | None = None, cover=None
) -> list[tuple[Region, QuantizedSpec]] | None:
    """The sub-regions of `region` in each of which a dynamic-range first layer's input scale
    is fixed (`dynamic_input.split_for_fold`), each with its spec: the input quantization
    folded, and with it the first layer's pair-sum saturation; None when there is no such fold
    (no run-time input quantization, or one part: `quantized_spec` folds it already where it
    can). `whole`: `whole_region_errors(model, region)` when already computed (a
    `QuantizedSpec`'s model and errors on an unfolded region): later layers' bounds over the
    whole region hold in every part (they bound the runtime's values), and each part folds the
    first layer anew. `cover` records the cuts that make the parts (`split_for_fold`)."""
    r = model.rounding[0] if model.rounding else None
    if r is None or not r.dynamic_input or r.symmetric_input:
        return None
    parts = split_for_fold(region, FOLD_PARTS, cover)
    if parts is None or len(parts) == 1:
        return None
    try:  # bounds over the whole region hold in each part: computed once
        centred, (out, inputs) = whole or whole_region_errors(model, region)
    except ValueError:  # a static grid may saturate: no bound
        return None
    folds = [fold_first_input(model, part) for part in parts]
    if any(f is None for f in folds):
        return None
    # the first layer's bound without its pair sums' saturation (folded per part; an output
    # rounding's bound would depend on the unshifted interval)
    bare, base = None, centred
    if r.pairs is not None and not r.outputs and r.output_grid is None:
        one = replace(model.chain, layers=model.chain.layers[:1], absw=model.chain.absw[:1])
        plain = replace(r, pairs=replace(r.pairs, known=np.zeros(len(out[0]))))
        bare = rounding_errors(one, region, rounding=[plain])[0][0]
        # the model's own first layer (each part folds it anew), the later layers centred
        layers = [model.chain.layers[0], *centred.chain.layers[1:]]
        base = replace(
            centred,
            chain=replace(centred.chain, layers=layers),
            rounding=[r, *centred.rounding[1:]],
        )
    specs, weights = [], None if bare is None else pair_weights(base)  # the same in every part
    for part, (region_q, residual) in zip(parts, folds, strict=True):
        m = base if bare is None else fold_pair_sums(base, part, (region_q, residual), weights)
        if m is base:  # nothing folded in the part: the whole region's first layer and bound
            m, first = centred, out[0]
        else:
            first = bare + m.rounding[0].pairs.known
        errs = ([first, *out[1:]], [residual, *inputs[1:]])
        spec = spec_chain(m.chain, region_q, label, errors=errs, lattice=output_lattice(m))
        if not specs:  # one choice for every part, as `with_deeper_cuts` makes it
            deeper = _takes_cuts(spec, region_q)
        specs.append(
            (part, QuantizedSpec(replace(spec, deeper_cuts=deeper), errs, region_q, m.chain))
        )
    return specs


def input_levels(model) -> tuple | None:
    """Per layer of the error model's chain: the levels of an Affine layer's run-time input
    quantization (255 asymmetric, 127 when the kernel may be symmetric) where its input is a
    ReLU's output and that rounding is its only one, else None; None when no layer has one.
    What `narrow_inputs` may tighten on a box."""
    layers, rounding = model.chain.layers, model.rounding or []
    out = [None] * len(layers)
    for k in range(1, min(len(layers), len(rounding))):
        r = rounding[k]
        if r is None or not r.dynamic_input or r.inputs or r.input_grid is not None:
            continue
        if isinstance(layers[k], Affine) and isinstance(layers[k - 1], Relu):
            out[k] = 127.0 if r.symmetric_input else 255.0
    return tuple(out) if any(v is not None for v in out) else None


def narrow_inputs(spec: SpecChain, levels: tuple | None, pre: list) -> SpecChain:
    """`spec` with each run-time quantized input (`input_levels`) bounded over a box whose
    ReLU inputs lie in `pre` (its bounds, or an enclosing box's): a value whose ReLU is off
    there is 0, exact on the grid (an integer zero point), and the others round by at most
    half of (their largest upper bound) / levels, the scale's bound on the box (as
    `bounds.rounding_errors` bounds it over the whole region: never wider than it). On an
    asymmetric grid (255 levels) each value's move is also bounded from its own range and the
    scale's (`grid_moves`), its midpoint taken into the layer's bias, where that is narrower:
    a value nearly fixed on the box (on a lattice region most of them: the moved pixels reach
    few) under a scale nearly fixed (its largest value among them) moves by nearly one amount.
    On the MNIST CNN's dynamic-range copies (lattice r=20, step 1/4) the inputs TFLite's and
    ONNX Runtime's copies left open at 2 s then certified in 9-115 nodes, against 130-380."""
    moves = input_moves(spec, levels, pre)
    if moves is None:
        return spec
    steps, layers = list(spec.in_err), list(spec.layers)
    for k, move in enumerate(moves):
        if move is None:
            continue
        shift, steps[k] = move
        if shift is not None:
            layer = layers[k]
            layers[k] = Affine(layer.weight, layer.bias + weights(layer.weight) @ shift)
    return replace(spec, layers=layers, in_err=steps)


def input_moves(spec: SpecChain, levels: tuple | None, pre: list) -> list | None:
    """`narrow_inputs`' bounds per layer: (the midpoint of each input value's move, None when
    all 0; the bound about it), None for a layer it leaves as it is; None when it leaves all."""
    if levels is None or spec.in_err is None or len(levels) != len(spec.layers):
        return None  # (a spec with a layer put before the chain's: not these levels)
    out: list = [None] * len(levels)
    for k, n in enumerate(levels):
        if n is None or spec.in_err[k] is None or pre[k - 1] is None:
            continue
        lo, hi = pre[k - 1]
        top = max(float(hi.max(initial=0.0)), 0.0)
        half = np.where(
            hi > 0.0, np.minimum(spec.in_err[k], top / n * (1.0 + 1e-6) * HALF_STEP), 0.0
        )
        out[k] = (None, half)
        pinned = grid_moves(lo, hi, n) if n == 255.0 else None
        better = pinned is not None and pinned[1] < half
        if np.any(better):
            out[k] = (np.where(better, pinned[0], 0.0), np.where(better, pinned[1], half))
    return out


def grid_moves(lo: np.ndarray, hi: np.ndarray, levels: float):
    """Per value of a run-time quantized input after a ReLU whose input lies in [lo, hi]: the
    midpoint and half-width of what the rounding moves it by, where the scale is max / levels
    of the values (asymmetric, zero point 0) and each rounds to an integer multiple of it;
    None when the scale may be 0."""
    a_lo, a_hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    s_lo = float(a_lo.max(initial=0.0)) / levels * (1.0 - 1e-6)
    s_hi = float(a_hi.max(initial=0.0)) / levels * (1.0 + 1e-6)
    if not 0.0 < s_lo <= s_hi:  # (crossed bounds: a box with no point)
        return None
    k_lo = np.clip(np.ceil(a_lo / s_hi - HALF_STEP), 0.0, levels)
    k_hi = np.clip(np.floor(a_hi / s_lo + HALF_STEP), 0.0, levels)
    e_lo, e_hi = k_lo * s_lo - a_hi, k_hi * s_hi - a_lo
    return (e_lo + e_hi) / 2.0, (e_hi - e_lo) / 2.0


def fold_part_of(parts: list[tuple[Region, QuantizedSpec]], lo, hi) -> QuantizedSpec | None:
    """The folded spec of the sub-region holding the box [lo, hi]; None when none holds it."""
    for part, qs in parts:
        if np.all(part.lo <= lo) and np.all(hi <= part.hi):
            return qs
    return None
