"""The spec a quantized runtime's error model gives on a region: its rounding bounds, the first
layer's input rounding folded into the region (`dynamic_input`: a fixed grid, or the run-time
quantization where its scale is the same at every point) and the logits' clamp bounded apart
(`output_clamp`) where they apply."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from verifier.engine.bounds import (
    Bounds,
    PreparedChain,
    SpecChain,
    linear_bounds,
    point_interval,
    rounding_errors,
    spec_chain,
)
from verifier.engine.dynamic_input import fold_first_input, fold_input_grid, fold_pair_sums
from verifier.engine.output_clamp import grid_ends, margin_caps
from verifier.engine.regions import Region


@dataclass(frozen=True)
class QuantizedSpec:
    """The spec, the rounding bounds it was built from (`rounding_errors`' pair), the region
    it is on (x and directions of the runtime's rounded input when folded; same coefficient
    box), the chain they are on (the error model's, its first bias shifted when a saturation
    is folded: `dynamic_input.fold_pair_sums`) and, when the logits' clamp is bounded apart,
    (lowest top, highest bottom, rounding) per logit; with it, the spec's linear bounds over
    the whole region (`root`, capped: the caps were read off them)."""

    spec: SpecChain
    errors: tuple
    region: Region
    chain: PreparedChain
    ends: tuple | None = None
    root: Bounds | None = None

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
        if folded is not None:
            model = fold_pair_sums(model, region, folded)
    on = region if folded is None else folded[0]

    def errors(clamp: bool) -> tuple:
        left = None if folded is None else folded[1]
        return rounding_errors(
            model.chain, on, rounding=model.rounding, clamp_output=clamp, first_step=left
        )

    ends = grid_ends(model)
    if ends is not None:
        errs = errors(True)
        e = errs[0][-1]
        spec = spec_chain(model.chain, on, label, errors=errs)
        root = linear_bounds(spec, on.lo, on.hi)
        cap = margin_caps(model, on, label, errs, *ends, e, root)
        if cap is not None and np.all(cap > 0):
            root = replace(root, lower=np.minimum(root.lower, cap))
            return QuantizedSpec(replace(spec, cap=cap), errs, on, model.chain, (*ends, e), root)
    errs = errors(False)
    return QuantizedSpec(spec_chain(model.chain, on, label, errors=errs), errs, on, model.chain)
