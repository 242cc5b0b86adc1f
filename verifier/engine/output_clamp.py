"""A quantized runtime's clamp of its logits to their grid, bounded apart from the chain.

Each output grid clamps a logit y to its range, a monotone map with c(v) >= min(v, H) and
c(v) <= max(v, L). With t the last layer's exact output and E its rounding bound (float32 and
every output event's half step, `rounding_errors(clamp_output=True)`), composed over the grids:
y >= min(t, H) - E and y <= max(t, L) + E, H the lowest top and L the highest bottom of the
grids in t's units. So a margin is
    y_l - y_o >= min(t_l - t_o, t_l - L_o, H_l - t_o, H_l - L_o) - E_l - E_o:
the first term is the spec's margin with rounding only (no saturation charged), the others
are bounded once over the whole region from per-logit linear bounds and cap every margin
lower bound (`SpecChain.cap`; `verifier.engine.quantized_spec` builds the spec). When some
cap is not positive (a logit may reach its grid's end), the clamp is charged per logit as before
(`bounds.rounding_errors`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from verifier.engine.bounds import Bounds, SpecChain, last_rows_lower, linear_bounds, spec_chain
from verifier.engine.network import Affine
from verifier.engine.regions import Region


def grid_ends(model) -> tuple[np.ndarray, np.ndarray] | None:
    """Per logit, the lowest top and highest bottom of the last layer's output grids in its
    output's units, or None when the last layer has no output grid."""
    layers = model.chain.layers
    r = model.rounding[-1] if model.rounding else None
    if r is None or not isinstance(layers[-1], Affine):
        return None
    k = layers[-1].weight.shape[0]
    events = [(ev.gain, ev.shift, ev.grid) for ev in r.outputs]
    if r.output_grid is not None:
        events.append((1.0, 0.0, r.output_grid))
    top, bottom = np.full(k, np.inf), np.full(k, -np.inf)
    for gain, shift, grid in events:
        if grid is None:
            continue
        g = np.broadcast_to(np.asarray(gain, dtype=np.float64), (k,))
        s = np.broadcast_to(np.asarray(shift, dtype=np.float64), (k,))
        a, b = (grid.lo - s) / g, (grid.hi - s) / g
        top, bottom = np.minimum(top, np.maximum(a, b)), np.maximum(bottom, np.minimum(a, b))
    if np.all(np.isinf(top)) and np.all(np.isinf(bottom)):
        return None
    return top, bottom


def margin_caps(
    model,
    region: Region,
    label: int,
    errors,
    top,
    bottom,
    e,
    root: Bounds | None = None,
    spec: SpecChain | None = None,
) -> np.ndarray | None:
    """Per margin (label against each other class), a lower bound over the region of
    min(t_l - L_o, H_l - t_o, H_l - L_o) - E_l - E_o; None when the logits are unbounded.
    `root`: the margin spec's linear bounds over the whole region (same chain, errors and
    region): its intermediate bounds hold for every row of the last layer, so only the
    per-logit rows are back-substituted (else they are bounded from scratch); `spec`: that
    margin spec, whose layers below the last the per-logit rows share."""
    k = len(top)
    others = np.array([j for j in range(k) if j != label], dtype=np.int64)
    eye = np.eye(k)
    rows = np.vstack([eye[label], -eye[others]])  # t_l from below, each t_o from above
    last = model.chain.layers[-1]
    if spec is not None and len(spec.layers) == len(model.chain.layers) > 1:
        w = rows @ last.weight  # as `spec_chain` composes the rows into the last layer
        layers, absw = (
            [*spec.layers[:-1], Affine(w, rows @ last.bias)],
            [*spec.absw[:-1], np.abs(w)],
        )
        spec = replace(spec, layers=layers, absw=absw, others=np.arange(len(rows)), cap=None)
    else:
        spec = spec_chain(model.chain, region, label, errors=errors, rows=rows)
    spec = replace(spec, err=[*spec.err[:-1], np.zeros(len(rows))])  # t itself: E comes below
    t = last_rows_lower(spec, region.lo, region.hi, root) if root is not None else None
    if t is None:
        b = linear_bounds(spec, region.lo, region.hi)
        t = None if b.empty else b.lower
    if t is None:
        return None
    least = np.minimum.reduce(
        [
            t[0] - bottom[others],
            top[label] + t[1:],
            top[label] - bottom[others],
        ]
    )
    return least - e[label] - e[others]
