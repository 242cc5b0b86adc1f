"""Sound lower bounds on the label's logit margins over a region (IBP, then CROWN-style).

The network is rewritten as a function of the generator coefficients `s` (the first affine
layer absorbs `x + s @ D`, the last one the difference matrix `logit[label] - logit[j]`), and
every linear bound is concretised exactly over the relaxed region {s in [lo, hi],
sum |s_g| cost_g <= budget} by a fractional knapsack. The relaxation contains every integer point
of the region, so a positive lower bound certifies all of them.

Float32: by default the bounds hold for the runtime's float32 evaluation, not only for the chain
in exact arithmetic. Each affine layer's own rounding is bounded per neuron
(|fl(W a + b) - (W a + b)| <= gamma_n (|W| |a| + |b|), any summation order, FMA or not; the input
cast to float32 too) and treated as a bounded extra input of that layer: intervals are widened by
it and back-substitution charges |lambda| . err at every affine layer, so ReLU relaxations stay
valid for the perturbed values and the errors are not amplified through |W| products.

Quantized runtimes: the same slot holds their rounding. Given the runtime's own chain (weights
from its file) and per layer what it rounds (`quantize.error_model.Rounding`: an int8 input
quantized per row at run time, a fixed input grid, an output requantized to a grid),
`rounding_errors` adds |W| . (input rounding) and the output rounding to each layer's bound,
from interval bounds over the whole region.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import numpy as np
from scipy.sparse import csr_array, issparse

from verifier.engine.knapsack_cut import KnapsackCut, knapsack_cut
from verifier.engine.network import Affine, LoweredLayer, Relu, forward_lowered
from verifier.engine.points import varying_columns
from verifier.engine.regions import Region, binary_floor_holds, binary_floor_unchanged

U32 = 2.0**-24  # unit roundoff of float32
# float32 roundings of an exact integer accumulator's requantization (to float, times the
# scales, plus a float bias: XNNPACK's fp32 requantization), counted as a dot product's terms
INTEGER_STEPS = 4
# queries charge the first layer's input rounding per neuron when its total is at most this
# share of that layer's output ranges (`_small_first_input`): 2e-4 of them for the MNIST MLP's
# folded int8 / ONNX Runtime grids, 8% for an unfolded dynamic-range input (there the per
# neuron charge cost 2.4-3.8 logits of root margin)
SPREAD = 0.01
# margin rows charge the first layer's input rounding per neuron where that costs at most this
# (logits), exactly through its weights elsewhere (`first_input_charge`)
CHEAP_CHARGE = 0.01


@dataclass(frozen=True)
class PreparedChain:
    """The lowered chain with C-contiguous float64 weights and their |W| (BLAS is several times
    slower on the transposed views `lower()` returns): prepare once per model."""

    layers: list[LoweredLayer]
    absw: list  # per layer: |W| for Affine layers, else None


@dataclass(frozen=True)
class SpecChain:
    """The chain as a map from coefficients `s` to the margins `logit[label] - logit[others]`."""

    layers: list[LoweredLayer]  # starts with an Affine on s, ends with the margin Affine
    absw: list  # per layer, as in PreparedChain
    label: int
    others: np.ndarray  # (K-1,) the class of each margin row
    region: Region  # the coefficients' box and budget: bounds minimise over it
    err: list  # per layer: float32 rounding bound of each Affine output (None: exact / other)
    in_err: list | None = None  # per layer: rounding bound of each Affine input (quantized)
    # the first layer's input rounding, on x' (the composed layer's input is s): its weight on
    # the values of x' whose bound is not 0, their bound, and |weight| . bound over all of x'
    # (what intervals are widened by)
    first_input: tuple | None = None
    # per margin, a lower bound of the margin that holds on the whole region, or None: margin
    # lower bounds are capped by it (`verifier.engine.output_clamp`: the runtime's clamp of its
    # logits to their grid, bounded apart from the chain)
    cap: np.ndarray | None = None
    # every ReLU's upper lines over the budget (`verifier.engine.knapsack_cut`); False: the
    # triangle lines only (what bounds were before it, kept for side-by-side benchmarks)
    knapsack_cut: bool = True
    # deeper ReLUs' cuts too (`deeper_cut`); off as `spec_chain` builds an error model's spec,
    # on once `quantized_spec.with_deeper_cuts` has bounded its root both ways
    deeper_cuts: bool = True
    # per layer: (step, origin) of the lattice a quantized runtime's Affine output lies on (its
    # requantization grid, `quantize.rounding.Rounding.output_grid`), or None: bounds on such a
    # value are cut to lattice points (`snap`), so a neuron with one point left is a constant
    lattice: list | None = None
    # what the first layer's rounding costs a back-substituted row, where it is known on a box
    # as a function of the box's points (`box_rounding.GroupedRounding`: its `charge(lam)`, at
    # most |lam| . err[0]); None: |lam| . err[0]
    first_charge: object | None = None

    def input_error(self, k: int):
        """The rounding bound of Affine layer `k`'s input values, or None."""
        return None if self.in_err is None else self.in_err[k]


@dataclass(frozen=True)
class Bounds:
    """Lower bounds of the margins over a sub-box, with what produced them."""

    lower: np.ndarray  # (K-1,); +inf when the sub-box holds no point within budget
    coeffs: np.ndarray  # (K-1, G) the linear lower bound's coefficients on s (zeros for IBP)
    argmin: np.ndarray  # (K-1, G) relaxed minimiser of each linear bound
    pre: list  # per layer: (lower, upper) of its input for Relu / MaxPool layers, else None
    method: str  # "ibp", "crown", "alpha-crown", "beta-crown" (relu_split) or "empty"
    first: tuple | None = None  # (lower, upper) of the first layer's outputs (exact, reusable)
    # per ReLU layer, the knapsack cut's upper lines on s over this box (`knapsack_cut`)
    cut: dict[int, KnapsackCut] | None = None
    # with `linear_bounds(reuse=True)`: the box's point nearest 0, and per affine layer its
    # back-substituted rows (rows, lam, c) as `_query_both` gave them (for children to reuse)
    point: np.ndarray | None = None
    queries: dict | None = None
    # with `reuse` on a 0/1 box: (lo, hi, per layer the knapsack's greedy floors of the rows it
    # minimised: key 0 the first layer's (2, n), an affine layer's aligned with `queries`)
    floors: tuple | None = None
    # with `coeffs`, each margin's linear lower bound at every point of the box within budget:
    # margin(s) >= min(coeffs . s + offsets, ceiling) (-inf: `lower` alone holds pointwise;
    # ceiling: the spec's logit cap, None for none). None: no such bound was kept
    offsets: np.ndarray | None = None
    ceiling: np.ndarray | None = None
    # lower slopes per ReLU layer and margin ((K-1, n) each) its sub-boxes try (`refined`)
    slopes: dict | None = None

    @property
    def empty(self) -> bool:
        return self.method == "empty"


def pointwise_lower(b: Bounds, s: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, K-1) lower bounds of the margins at the points `s` (N, G) of `b`'s box within
    budget: the linear bounds where `b` kept them (`Bounds.offsets`), never below `lower`.
    `rows`: those margins' only ((N, len(rows)))."""
    pick = slice(None) if rows is None else rows
    lower = b.lower[pick]
    low = np.broadcast_to(lower, (len(s), len(lower)))
    if b.offsets is None:
        return low
    at = _products(s, b.coeffs[pick], b.offsets[pick])
    if b.ceiling is not None:
        at = np.minimum(at, b.ceiling[pick])
    return np.maximum(at, low)


def _products(s: np.ndarray, a: np.ndarray, const, var: np.ndarray | None = None) -> np.ndarray:
    """`s @ a.T + const` for points `s` (N, G), over the columns that vary among them only
    (`var`, found when not given): a branch-and-bound node's points share most generators'
    values (28 of 79 vary on the MNIST MLP's feature-region sieves), so the others' share is
    one product with the first point."""
    if var is None:
        var = varying_columns(s)
    if len(s) < 2 or len(var) == s.shape[1]:
        out = s @ a.T
        out += const
        return out
    fixed = s[0].astype(np.float64)
    fixed[var] = 0.0
    out = s[:, var] @ a[:, var].T
    out += a @ fixed + const  # in place: a large temporary costs more than the product
    return out


# a weight array of at least SPARSE_SIZE entries, at most SPARSE_DENSITY of them not 0, is also
# kept as CSR for the hot products (`weights`, `left_times`): a lowered convolution's matrix
# (examples/mnist_cnn.onnx's second: 5.3%). Single-threaded, (576 x 1352) @ (1352 x 81) takes
# 4.0 ms dense, 1.1 ms so; the break-even is near 10% for W @ X, W[rows] @ X and lam @ W alike
SPARSE_DENSITY = 0.1
SPARSE_SIZE = 16384


@dataclass(frozen=True)
class SparseWeight:
    """A sparse weight array as CSR, and its transpose as CSR (lam @ W is (W.T @ lam.T).T:
    faster so than through W's CSR for the many rows back-substitution carries)."""

    csr: csr_array
    transposed: csr_array


def sparse_weight(w: np.ndarray) -> SparseWeight | None:
    """`w`'s CSR forms when it is large and sparse (`SPARSE_DENSITY`), else None; worked out
    once per weight array (`per_weight`), so chains and specs sharing a layer share them."""
    if w.ndim != 2 or w.size < SPARSE_SIZE:
        return None
    return per_weight(w, ("sparse", SPARSE_DENSITY), lambda: _sparse_forms(w))


def with_values_at(like: np.ndarray, flat: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of `like` holding `values` at its non-zeros (`flat`: their flat positions, in
    the order `np.flatnonzero(like)` lists them), its sparse forms (`sparse_weight`) made from
    `like`'s without a scan of either array: for a weight that changes with the box
    (`box_rounding.on_box`)."""
    w = like.copy()
    w.reshape(-1)[flat] = values
    sw = sparse_weight(like)
    if sw is not None:
        order = per_weight(like, ("transposed order",), lambda: _transposed_order(sw.csr))
        per_weight(
            w,
            ("sparse", SPARSE_DENSITY),
            lambda: SparseWeight(
                csr_array((values, sw.csr.indices, sw.csr.indptr), shape=sw.csr.shape),
                csr_array(
                    (values[order], sw.transposed.indices, sw.transposed.indptr),
                    shape=sw.transposed.shape,
                ),
            ),
        )
    return w


def _transposed_order(csr: csr_array) -> np.ndarray:
    """Where each entry of `csr`'s transpose (`_forms`) comes from in `csr`'s entries."""
    places = csr_array((np.arange(csr.nnz, dtype=np.float64), csr.indices, csr.indptr), csr.shape)
    return places.T.tocsr().data.astype(np.int64)


def _sparse_forms(w: np.ndarray) -> SparseWeight | None:
    if not _sparse_enough(np.count_nonzero(w), w.size):
        return None
    return _forms(csr_array(w))


def _sparse_enough(nnz: int, size: int) -> bool:
    """Whether an array of `size` values, `nnz` of them non-zero, is worth its CSR forms."""
    return nnz <= SPARSE_DENSITY * size


def _forms(csr: csr_array) -> SparseWeight:
    """`csr` and its transpose's CSR, made from it (a second scan of a dense copy cost more)."""
    return SparseWeight(csr, csr.T.tocsr())


def weights(w: np.ndarray, rows: np.ndarray | None = None):
    """`w` (its rows `rows`) as the hot products take it, `weights(w) @ x`: CSR where `w` is
    sparse (`sparse_weight`), else the array; either slices as `[:, cols]`."""
    sw = sparse_weight(w)
    if sw is None:
        return w if rows is None else w[rows]
    return sw.csr if rows is None else sw.csr[rows]


def left_times(lam: np.ndarray, w: np.ndarray, transpose: bool = False) -> np.ndarray:
    """`lam @ w` (`lam @ w.T` with `transpose`), through `w`'s sparse forms where it has them
    (`sparse_weight`)."""
    sw = sparse_weight(w)
    if sw is None:
        return lam @ (w.T if transpose else w)
    return ((sw.csr if transpose else sw.transposed) @ lam.T).T


# --- the chain on s ----------------------------------------------------------------------------


def prepare_chain(chain: list[LoweredLayer] | PreparedChain) -> PreparedChain:
    """Contiguous float64 copies of the weights and their |W| (a PreparedChain is kept as is)."""
    if isinstance(chain, PreparedChain):
        return chain
    layers = [
        Affine(
            np.ascontiguousarray(layer.weight, dtype=np.float64),
            np.ascontiguousarray(layer.bias, dtype=np.float64),
        )
        if isinstance(layer, Affine)
        else layer
        for layer in chain
    ]
    return PreparedChain(layers, _abs_weights(layers))


def _abs_weights(layers: list[LoweredLayer]) -> list:
    return [np.abs(layer.weight) if isinstance(layer, Affine) else None for layer in layers]


def spec_chain(
    chain: list[LoweredLayer] | PreparedChain,
    region: Region,
    label: int,
    *,
    float32: bool = True,
    errors: list | None = None,
    rows: np.ndarray | None = None,
    lattice: list | None = None,
) -> SpecChain:
    """Compose `x + s @ D` into the first layer and the margin matrix into the last one.

    `float32=True` bounds the runtime's float32 evaluation (see the module docstring);
    `False` bounds the chain in exact arithmetic. `errors` (output and input bounds per layer
    of `chain`, from `rounding_errors` with a quantized runtime's rounding) replaces the float32
    bounds. `rows` (m, K) replaces the margin matrix (its rows are then the spec's outputs).
    `lattice` (per layer of `chain`, as `SpecChain.lattice`: a quantized runtime's output
    grids) is kept for every layer but the last (the margins are no lattice values).
    """
    prep = prepare_chain(chain)
    layers = list(prep.layers)
    absw = list(prep.absw)
    n = region.x.size
    inserted = not isinstance(layers[0], Affine)
    if not inserted:
        w = layers[0].weight
        assert w.shape[1] == n, f"chain input {w.shape[1]} != region input {n}"
        layers[0] = _on_coefficients(layers[0], region)
    else:
        layers.insert(0, Affine(np.ascontiguousarray(region.directions.T), region.x.copy()))
        absw.insert(0, None)
    k = _output_size(prep.layers, n)
    others = np.array([j for j in range(k) if j != label], dtype=np.int64)
    diff = np.zeros((k - 1, k))
    diff[:, label] = 1.0
    diff[np.arange(k - 1), others] = -1.0
    if rows is not None:
        diff = np.asarray(rows, dtype=np.float64)
        others = np.arange(len(diff))
    if isinstance(layers[-1], Affine) and len(layers) > 1:
        w, b = layers[-1].weight, layers[-1].bias
        layers[-1] = Affine(diff @ w, diff @ b)
    else:
        layers.append(Affine(diff, np.zeros(len(diff))))
        absw.append(None)
    for i in (0, len(layers) - 1):  # the two composed layers get their own |W|
        absw[i] = np.abs(layers[i].weight)
    err: list = [None] * len(layers)
    in_err: list = [None] * len(layers)
    first_input = None
    if errors is not None:
        assert len(errors[1]) == len(prep.layers), "one input error entry per layer"
        in_err[int(inserted) : int(inserted) + len(errors[1])] = errors[1]
        if not inserted and errors[1][0] is not None:
            step = errors[1][0]
            first_input = (
                *_rounded_columns(prep.layers[0].weight, step),
                weights(prep.absw[0]) @ step,
            )
            in_err[0] = None
    if float32 or errors is not None:
        own = errors[0] if errors is not None else rounding_errors(prep, region, not inserted)[0]
        assert len(own) == len(prep.layers), "one error entry per layer of the chain"
        err[int(inserted) : int(inserted) + len(own)] = own
        if inserted:  # the map s -> x' itself: only the cast of x' to float32
            err[0] = U32 * _input_magnitude(region)
        last = err[len(layers) - 1]
        if last is not None and len(last) == k:
            err[len(layers) - 1] = np.abs(diff) @ last
        elif last is None and not isinstance(prep.layers[-1], Affine):
            err[len(layers) - 1] = np.zeros(len(diff))
    on_spec = None
    if lattice is not None and any(v is not None for v in lattice[:-1]):
        on_spec = [None] * len(layers)
        on_spec[int(inserted) : int(inserted) + len(lattice) - 1] = lattice[:-1]
    return SpecChain(
        layers,
        absw,
        label,
        others,
        region,
        err,
        in_err,
        first_input,
        lattice=on_spec,
        deeper_cuts=errors is None,
    )


def _rounded_columns(w: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`w`'s columns, `step`) of the input values whose rounding bound is not 0: the exact
    charge |lam W| . step costs the others nothing (an MNIST region's unmoved zeros, exact on
    any grid: 3 of 4 values), and its product with W is most of a dynamic-range root bound."""
    cols = np.flatnonzero(step)
    if len(cols) == len(step):
        return w, step
    w_x = np.ascontiguousarray(w[:, cols])
    sw = sparse_weight(w)
    if sw is not None:  # its sparse forms sliced from w's (kept), not found anew in the copy
        sub = sw.csr[:, cols]
        forms = _forms(sub) if _sparse_enough(sub.nnz, w_x.size) else None
        per_weight(w_x, ("sparse", SPARSE_DENSITY), lambda: forms)
    return w_x, np.ascontiguousarray(step[cols])


def _output_size(chain: list[LoweredLayer], n: int) -> int:
    """How many outputs the chain has: its last Affine layer's, else by running it once."""
    if isinstance(chain[-1], Affine):
        return len(chain[-1].bias)
    return forward_lowered(chain, np.zeros((1, n))).shape[1]


# a bound within this many steps of a lattice point keeps that point (float64 noise)
LATTICE_TOL = 1e-6


def snap(spec: SpecChain, i: int, lo: np.ndarray, hi: np.ndarray) -> tuple:
    """Bounds [lo, hi] of layer `i`'s outputs cut to the lattice points they hold
    (`SpecChain.lattice`: the runtime's value is one); unchanged where none is held (a bound
    that cannot be sound then is not made tighter) or the layer has no lattice. A neuron left
    with one point gets lo == hi: the ReLU after it takes it as that constant."""
    if spec.lattice is None or spec.lattice[i] is None:
        return lo, hi
    step, origin = spec.lattice[i]
    with np.errstate(invalid="ignore"):
        k_lo = np.ceil((lo - origin) / step - LATTICE_TOL)
        k_hi = np.floor((hi - origin) / step + LATTICE_TOL)
        held = k_lo <= k_hi
    return np.where(held, origin + k_lo * step, lo), np.where(held, origin + k_hi * step, hi)


def _input_box(region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Interval of each input value over the region's box."""
    s_lo, s_hi = region.lo.astype(np.float64), region.hi.astype(np.float64)
    d = region.directions
    lo = region.x + np.minimum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    hi = region.x + np.maximum(d * s_lo[:, None], d * s_hi[:, None]).sum(axis=0)
    return lo, hi


def _input_magnitude(region: Region) -> np.ndarray:
    """Largest |x'_i| over the region's box."""
    lo, hi = _input_box(region)
    return np.maximum(np.abs(lo), np.abs(hi))


def rounding_errors(
    chain: PreparedChain,
    region: Region,
    input_cast: bool = True,
    rounding: list | None = None,
    *,
    clamp_output: bool = False,
    first_step: np.ndarray | None = None,
    by_sign: list | None = None,
) -> tuple[list, list]:
    """Per layer of `chain`, bounds on |runtime output - exact output| of each Affine layer,
    and on |rounded input - input| of each input value (quantized runtimes; None otherwise).

    Float32: gamma_n (|W| |a| + |b|) with n = fan-in + 1 (`INTEGER_STEPS` where the layer
    accumulates in integers, `Rounding.integer`) and |a| from float interval bounds over
    the whole region (so it holds in every sub-box), plus |W| u |x'| for the input cast in the
    first layer (`input_cast`); doubled as a margin for runtimes that run a folded layer as
    several float32 steps. `rounding` (per layer, `quantize.error_model.Rounding` or None) adds
    a quantized runtime's rounding (`_input_rounding`, `_output_rounding`), with the first
    layer's outputs bounded over the region's budget, not only its box, and later layers' by
    linear bounds in s (chords through ReLUs) intersected with intervals. Saturation of a fixed
    grid is the clamp's own bounded error (how far the interval leaves the grid), so wide
    intervals loosen the bound but never void it. Input rounding stays on the inputs, where
    back-substitution charges |lambda W| . rounding, far below |lambda| |W| . rounding.
    `clamp_output`: the last layer's output grids charge their rounding only, not their clamp
    (the caller bounds that clamp itself: `verifier.engine.output_clamp`). `first_step`: the bound
    of the first layer's input rounding in place of its Rounding's (what is left of it on a
    region with that rounding folded in: `verifier.engine.dynamic_input.fold_input_grid`).
    `by_sign` (a list) receives the last layer's bound twice more, over the same interval: with
    only the pair sums of its positive integer weights charged, then only its negative ones'
    (`PairSums.sign`; what `verifier.engine.quantized_spec.centre_pair_sums` centres).
    """
    lo, hi = _input_box(region)
    in_err = U32 * np.maximum(np.abs(lo), np.abs(hi)) if input_cast else None
    out: list = []
    inputs: list = []
    sym = None  # quantized runtimes: linear lower / upper bounds of the values in s
    for i, (layer, aw) in enumerate(zip(chain.layers, chain.absw, strict=True)):
        if isinstance(layer, Affine):
            r = rounding[i] if rounding is not None else None
            # an integer accumulation is exact: a few float32 steps requantize it
            n = INTEGER_STEPS if r is not None and r.integer else layer.weight.shape[1] + 1
            gamma = 2.0 * n * U32 / (1.0 - n * U32)
            amag = np.maximum(np.abs(lo), np.abs(hi))
            step = None
            if r is not None:
                step = _input_rounding(r, lo, hi, amag, i)
                if i == 0 and first_step is not None:
                    step = first_step
                step = None if not np.any(step) else np.broadcast_to(step, amag.shape)
            e = gamma * (weights(aw) @ (amag if step is None else amag + step) + np.abs(layer.bias))
            if r is not None and r.pairs is not None:
                wide = 0.0 if step is None else step
                args = (layer.weight, aw, lo - wide, hi + wide)
                if by_sign is not None and i + 1 == len(chain.layers):
                    one = [_pair_saturation(replace(r.pairs, sign=v), *args) for v in (1, -1)]
                    by_sign[:] = [e + one[0], e + one[1]]
                e = e + _pair_saturation(r.pairs, *args)
            if in_err is not None:
                e = e + weights(aw) @ in_err
                in_err = None
            if i == 0 and rounding is not None:  # the budget matters: knapsack, not the box
                wide = e if step is None else e + weights(aw) @ step
                first = _on_coefficients(layer, region)
                lo, hi = _affine_exact(first, wide, region.lo, region.hi, region)
                sym = (first.weight, first.bias - wide, first.weight, first.bias + wide)
            elif step is None:
                lo, hi = _affine_interval(layer, aw, lo, hi, e)
            else:
                lo, hi = _affine_interval(layer, aw, lo - step, hi + step, e)
            if sym is not None and i > 0:
                sym, lo, hi = _symbolic_affine(layer, aw, sym, step, e, lo, hi, region)
            if r is not None:
                relu_next = i + 1 < len(chain.layers) and isinstance(chain.layers[i + 1], Relu)
                if clamp_output and i + 1 == len(chain.layers):
                    r = unclamped(r)
                before = e
                e, lo, hi = _output_rounding(r, e, lo, hi, relu_next, i)
                if sym is not None:
                    acc = e - before
                    sym = (sym[0], sym[1] - acc, sym[2], sym[3] + acc)
            out.append(e)
            inputs.append(step)
        else:
            if sym is not None and isinstance(layer, Relu):
                sym = _symbolic_relu(sym, lo, hi)
            lo, hi = layer.interval(lo, hi)
            in_err = None if in_err is None else layer.interval(in_err, in_err)[1]
            if sym is not None and not isinstance(layer, Relu):  # others keep their intervals
                zero = np.zeros((len(lo), sym[0].shape[1]))
                sym = (zero, lo.copy(), zero, hi.copy())
            out.append(None)
            inputs.append(None)
    return out, inputs


def unclamped(r):
    """`r` with its output grids' ranges unbounded: their rounding, not their clamp."""
    wide = {"lo": -np.inf, "hi": np.inf}

    def free(g):
        return None if g is None else replace(g, **wide)

    return replace(
        r,
        output_grid=free(r.output_grid),
        outputs=tuple(replace(ev, grid=free(ev.grid)) for ev in r.outputs),
    )


def _symbolic_affine(layer: Affine, aw: np.ndarray, sym, step, e, lo, hi, region: Region):
    """Linear bounds in s of an Affine layer's runtime outputs, from its inputs' (perturbed by
    `step`, the output by `e`), and the intervals intersected with their concretisation. With
    W+ = (W + |W|) / 2 and W- = (W - |W|) / 2 (`aw` = |W|), W+ u + W- l and W+ l + W- u come
    from two products, W (u + l) and |W| (u - l), for coefficients and constants at once."""
    al, cl, au, cu = sym
    st = 0.0 if step is None else step
    g = al.shape[1]
    mid = weights(layer.weight) @ np.column_stack([au + al, cu + cl])
    rad = weights(aw) @ np.column_stack([au - al, cu - cl + 2.0 * st])
    up, down = (mid + rad) / 2.0, (mid - rad) / 2.0
    au2, cu2 = up[:, :g], up[:, g] + layer.bias + e
    al2, cl2 = down[:, :g], down[:, g] + layer.bias - e
    low, _ = region.minimise(al2, cl2)
    neg, _ = region.minimise(-au2, -cu2)
    lo, hi = np.maximum(lo, low), np.minimum(hi, -neg)
    return (al2, cl2, au2, cu2), lo, np.maximum(hi, lo)


def _symbolic_relu(sym, lo: np.ndarray, hi: np.ndarray):
    """Linear bounds in s through a ReLU whose inputs lie in [lo, hi]: identity when active,
    zero when dead, else the chord above and 0 or the input below (the tighter)."""
    al, cl, au, cu = sym
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(hi > lo, hi / (hi - lo), 0.0)
    up = np.where(lo >= 0.0, 1.0, np.where(hi <= 0.0, 0.0, slope))
    shift = np.where((lo < 0.0) & (hi > 0.0), -slope * lo, 0.0)
    down = np.where(lo >= 0.0, 1.0, np.where((hi > 0.0) & (hi > -lo), 1.0, 0.0))
    return (al * down[:, None], cl * down, au * up[:, None], cu * up + shift)


def _on_coefficients(layer: Affine, region: Region) -> Affine:
    """`layer` composed with x' = x + s @ D: an affine map of the coefficients s. The last
    one is kept: a quantized spec composes the same layer on the same region twice
    (`rounding_errors`, `spec_chain`: 1.8 ms an MNIST MLP region each)."""
    last = _LAST_ON[0]
    if last is not None and last[0] is layer and last[1] is region:
        return last[2]
    out = _compose_on_coefficients(layer, region)
    _LAST_ON[0] = (layer, region, out)
    return out


_LAST_ON: list = [None]  # (layer, region, `_on_coefficients(layer, region)`), by identity


def _compose_on_coefficients(layer: Affine, region: Region) -> Affine:
    d = region.directions
    cols = np.flatnonzero(np.any(d != 0, axis=0))  # D is sparse: only moved values matter
    w = weights(layer.weight)  # a first convolution: its CSR form
    wd = w @ d.T if len(cols) > region.x.size // 2 else w[:, cols] @ d[:, cols].T
    return Affine(np.ascontiguousarray(wd), w @ region.x + layer.bias)


# Rounding to nearest is off by half a step; the extra covers float32 slop in computing
# x / scale and the scale itself (relative ~1e-7 of values up to 255 steps).
HALF_STEP = 0.5 + 1e-3


def _input_rounding(r, lo: np.ndarray, hi: np.ndarray, amag: np.ndarray, i: int):
    """Bound on |dequantized input - input| per input value of Affine layer `i`.

    Dynamic (per-row int8 at run time): the scale is (max(a,0) - min(a,0)) / 255 (asymmetric:
    TFLite's kernel when the file asks for it, and XNNPACK's always) or max|a| / 127 (TFLite's
    symmetric kernel: the larger one is taken when the file asks for it), bounded over the
    region by the interval bounds of the row. Asymmetric: the zero point
    z* = -128 - min(a,0) / scale maps the row into [-128, 127]; nudged to an integer it moves
    by <= 1/2, so a / scale + zp lies in [-128.5, 127.5] and rounding then clamping to
    [-128, 127] moves it by <= 1/2 too. A row of zeros is exact (scale 0 or 1, all values 0),
    and so is every value that is 0 throughout the region (0 is on both grids: an integer zero
    point). Fixed grid: half its step, plus how far the input may leave the grid's range (the
    clamp moves it back by at most that). Further events (`Rounding.inputs`) in order, each on
    the input as perturbed by the ones before it.
    """
    step = np.zeros_like(lo)
    if r.dynamic_input:
        scale = (max(float(hi.max(initial=0.0)), 0.0) - min(float(lo.min(initial=0.0)), 0.0)) / 255
        if r.symmetric_input:
            scale = max(scale, float(amag.max(initial=0.0)) / 127.0)
        step = np.where((lo == 0.0) & (hi == 0.0), 0.0, scale * (1.0 + 1e-6) * HALF_STEP)
    events = [(1.0, 0.0, r.input_grid, 255, 0.0)] if r.input_grid is not None else []
    events += [(ev.gain, ev.shift, ev.grid, ev.levels, ev.extra) for ev in r.inputs]
    for ev in events:
        step = step + _event_error(*ev, lo - step, hi + step, False)
    return step


def _event_error(gain, shift, grid, levels, extra, lo, hi, relu_next: bool) -> np.ndarray:
    """Per element t in [lo, hi], a bound on |t' - t| when v = gain t + shift is rounded to
    `grid` (or dynamically over `levels` steps when it is None) and moved back to t."""
    vlo = np.minimum(gain * lo, gain * hi) + shift
    vhi = np.maximum(gain * lo, gain * hi) + shift
    if grid is None:  # dynamic: the scale spans the tensor's range and 0
        scale = max(float(vhi.max(initial=0.0)), 0.0) - min(float(vlo.min(initial=0.0)), 0.0)
        half = scale / levels * (1.0 + 1e-6) * HALF_STEP
        err = np.where((vlo == 0.0) & (vhi == 0.0), 0.0, half)
    else:
        over = np.maximum(vhi - grid.hi, 0.0)
        if not relu_next:  # a clamp at or below 0 before a ReLU is the ReLU's own
            over = np.maximum(over, grid.lo - vlo)
        err = grid.scale * (HALF_STEP + extra) + over
    return err / np.abs(np.asarray(gain, dtype=np.float64))


# Largest |u8 x s8| product whose pair sums cannot saturate int16 (two of them: 32767).
PAIR_HALF = 16383.5


def _pair_saturation(
    p, w: np.ndarray, aw: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Bound on what int16 saturation of pairwise product sums removes from each output.

    A pair sum p1 + p2 saturates only when |p1| + |p2| > 32767, and then loses at most
    (|p1| - 16383.5)+ + (|p2| - 16383.5)+, whatever the kernel's pairing: so per output row the
    loss is at most the sum over inputs of (A_i |q_ji| - 16383.5)+, A_i the largest unsigned
    input value over the region, q the integer weights; in output units times s_in s_w. With
    the pairing known (`p.adjacent`: inputs 2m, 2m+1), a pair of opposite-signed weights
    cannot saturate (|u8 x s8| <= 32640) and one of like signs loses at most
    (A_2m |q_2m| + A_2m+1 |q_2m+1| - 32767)+, 2m and 2m+1 in the kernel's K order (`p.order`).
    With the loss folded (`p.known`), that bound; with `p.sign`, that sign's pairs only. The
    integer weights in K order are the model's (`_pair_weights`, once per model)."""
    if p.known is not None:
        return p.known
    vlo = np.minimum(p.gain * lo, p.gain * hi) + p.shift
    vhi = np.maximum(p.gain * lo, p.gain * hi) + p.shift
    if p.grid is not None:
        scale = p.grid.scale
        big = np.clip(np.ceil(vhi / scale + p.offset + 0.5), 0.0, 255.0)
    else:  # dynamic uint8: zero point 0 when nothing is negative, scale at least max(lo) / 255
        scale = (
            max(float(vhi.max(initial=0.0)), 0.0) - min(float(vlo.min(initial=0.0)), 0.0)
        ) / 255
        least = max(float(vlo.max(initial=0.0)), 0.0) / 255
        big = np.full_like(vhi, 255.0)
        if vlo.min(initial=0.0) >= 0.0 and least > 0.0:
            big = np.minimum(255.0, np.ceil(np.maximum(vhi, 0.0) / least + 0.5))
    chosen = None if not np.any(p.sign) else np.reshape(p.sign, (-1, 1))
    if not p.adjacent:
        q, sign = _pair_weights(p, w, aw, lo.shape)
        prod = q * big[None, :]
        if chosen is not None:  # one sign's pairs only (`PairSums.sign`)
            prod = np.where(sign == chosen, prod, 0)
        loss = np.maximum(prod - PAIR_HALF, 0.0).sum(axis=1)
        return p.unit * scale * loss
    rows, ka, kb, qa, qb, sa = _saturable_pairs(p, w, aw, lo.shape)
    big = kernel_columns(p.order, big)
    ba, bb = (big[ka], big[kb]) if big.ndim == 1 else (big[rows, ka], big[rows, kb])
    pair = np.maximum(qa * ba + qb * bb - 2 * PAIR_HALF, 0.0)
    if chosen is not None:  # a pair of the other sign is charged nothing
        pair = np.where(sa == np.broadcast_to(chosen[:, 0], w.shape[:1])[rows], pair, 0.0)
    return p.unit * scale * np.bincount(rows, weights=pair, minlength=w.shape[0])


def _pair_weights(p, w: np.ndarray, aw: np.ndarray, shape: tuple) -> tuple:
    """(|integer weights| (1 + 1e-6), their signs) of a pair-sum kernel (`_pair_saturation`):
    what no region changes, kept per model (`per_weight`)."""
    gain = np.broadcast_to(np.asarray(p.gain, dtype=np.float64), shape)
    return per_weight(w, ("pairs", p.unit, gain), lambda: _integer_weights(p, w, aw, gain))


def _integer_weights(p, w: np.ndarray, aw: np.ndarray, gain: np.ndarray) -> tuple:
    """(|integer weights| (1 + 1e-6), their int8 signs) of a pair-sum kernel, in layer order."""
    q = aw / (p.unit[:, None] * np.abs(gain)[None, :]) * (1.0 + 1e-6)
    return q, (np.sign(w) * np.sign(gain)[None, :]).astype(np.int8)


def _saturable_pairs(p, w: np.ndarray, aw: np.ndarray, shape: tuple) -> tuple:
    """The pairs (2m, 2m+1 in the kernel's K order: `in_kernel_order`) of like-signed integer
    weights that saturate with both inputs at 255 (the largest), as (row, K position of each,
    |integer weight| (1 + 1e-6) of each, their sign): the others lose nothing on any region
    (the computed pair sum is monotone in each input, rounding included), so
    `_pair_saturation` adds only these; on the MNIST MLP 1 in 200 of the first layer's pairs,
    1 in 5000 of the second's. Kept per model (`per_weight`)."""
    gain = np.broadcast_to(np.asarray(p.gain, dtype=np.float64), shape)

    def make() -> tuple:  # (the dense weights are not kept: only these pairs)
        q, sign = in_kernel_order(p.order, *_integer_weights(p, w, aw, gain))
        qa, qb, sa = q[:, 0::2], q[:, 1::2], sign[:, 0::2]
        top = qa * 255.0 + qb * 255.0 - 2 * PAIR_HALF
        rows, m = np.nonzero((sa * sign[:, 1::2] > 0) & (top > 0.0))
        return rows, 2 * m, 2 * m + 1, qa[rows, m], qb[rows, m], sa[rows, m]

    return per_weight(w, ("saturable", p.unit, gain, p.order), make)


# forms of a model's weights that no region changes, per weight array (`per_weight`)
_PER_WEIGHT: dict = {}


def per_weight(w: np.ndarray, key: tuple, make):
    """`make()` once per weight array `w` (by identity, while it lives) and `key` (the values,
    arrays among them, it depends on besides `w`): what a quantized spec recomputed per region
    from a model's weights alone. The value must not hold `w` itself (it would keep it alive)."""
    k = (id(w), *(_hashable(v) for v in key))
    if k not in _PER_WEIGHT:
        _PER_WEIGHT[k] = make()
        weakref.finalize(w, _PER_WEIGHT.pop, k, None)
    return _PER_WEIGHT[k]


def _hashable(v):
    """`v`, an array as a copy of its values (shape, dtype, bytes)."""
    if isinstance(v, np.ndarray):
        return (v.shape, str(v.dtype), np.ascontiguousarray(v).tobytes())
    return v


def kernel_columns(order, v: np.ndarray) -> np.ndarray:
    """A value per input, `v`, at each of an integer kernel's K positions (`PairSums.order`:
    (K,), or per row (rows, K)), padded with a zero to an even count, as `in_kernel_order`
    lays out a (rows, K) array's columns."""
    v = v if order is None else v[np.asarray(order)]
    return np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, v.shape[-1] % 2)])


def in_kernel_order(order, *arrays: np.ndarray) -> list[np.ndarray]:
    """Each (rows, K) array's columns in an integer kernel's K order (`PairSums.order`: one
    order for every row or one per row; None: as they are), padded with zeros to an even
    count: its pairs are then columns 2m, 2m+1."""
    out = []
    for a in arrays:
        if order is not None:
            idx = np.atleast_2d(order)
            a = np.take_along_axis(a, np.broadcast_to(idx, (a.shape[0], idx.shape[1])), axis=1)
        out.append(np.pad(a, ((0, 0), (0, a.shape[1] % 2))))
    return out


def _output_rounding(r, e: np.ndarray, lo: np.ndarray, hi: np.ndarray, relu_next: bool, i: int):
    """Add requantization of the output (`Rounding.outputs` in order, then the output grid):
    half a step each, plus the fixed-point multiplier's intermediate rounding (<= the
    multiplier, in output steps), plus how far the interval may leave each grid's range (the
    clamp's move; the last grid's clamp at or below 0 before a ReLU is the ReLU's own). The
    returned interval is cut to the last grid's range (its top only before a ReLU, where the
    value below the grid is the unclamped one the ReLU zeroes)."""
    events = [(ev.gain, ev.shift, ev.grid, ev.levels, ev.extra) for ev in r.outputs]
    if r.output_grid is not None:
        events.append((1.0, 0.0, r.output_grid, 255, min(0.5, r.multiplier)))
    acc = np.zeros_like(e)
    for k, (gain, shift, grid, levels, extra) in enumerate(events):
        plain = grid is not None and np.all(gain == 1.0) and np.all(shift == 0.0)
        last = k == len(events) - 1 and relu_next and plain and np.all(grid.lo <= 0.0)
        acc = acc + _event_error(gain, shift, grid, levels, extra, lo - acc, hi + acc, last)
    lo, hi = lo - acc, hi + acc
    if events and plain:  # the requantized output lies on its grid (below: the ReLU's clamp)
        hi = np.minimum(hi, grid.hi)
        lo = np.maximum(lo, grid.lo) if not last else lo
    return e + acc, lo, np.maximum(hi, lo)


def point_interval(chain: PreparedChain, errors: tuple, x: np.ndarray):
    """Interval of the runtime's outputs at one input `x`, from the chain and its error bounds
    (each must hold at `x`, e.g. from `rounding_errors` over a region holding it)."""
    lo = hi = np.asarray(x, dtype=np.float64).reshape(-1)
    for layer, aw, e, step in zip(chain.layers, chain.absw, *errors, strict=True):
        if isinstance(layer, Affine):
            if step is not None:
                lo, hi = lo - step, hi + step
            lo, hi = _affine_interval(layer, aw, lo, hi, e)
        else:
            lo, hi = layer.interval(lo, hi)
    return lo, hi


def _affine_exact(layer: Affine, err, lo, hi, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Exact (relaxed) bounds of an affine function of s over the relaxed region, widened by
    its rounding bound `err` (None: exact)."""
    w, b = layer.weight, layer.bias
    vals, _ = region.minimise(np.concatenate([w, -w]), np.concatenate([b, -b]), lo, hi)
    e = 0.0 if err is None else err
    return vals[: len(b)] - e, -vals[len(b) :] + e


def _affine_interval(layer: Affine, absw: np.ndarray, lo: np.ndarray, hi: np.ndarray, err=None):
    """Interval image of [lo, hi] under an affine map (`absw` = |W|), widened by `err`."""
    mid, rad = (lo + hi) / 2.0, (hi - lo) / 2.0
    c = weights(layer.weight) @ mid + layer.bias
    r = weights(absw) @ rad if err is None else weights(absw) @ rad + err
    return c - r, c + r


def _spec_interval(spec: SpecChain, i: int, lo: np.ndarray, hi: np.ndarray):
    """Interval image under the spec's Affine layer `i`, input and output rounding included."""
    step = spec.input_error(i)
    if step is not None:
        lo, hi = lo - step, hi + step
    return _affine_interval(spec.layers[i], spec.absw[i], lo, hi, spec.err[i])


# --- interval bounds ---------------------------------------------------------------------------


def interval_bounds(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """IBP: exact bounds of the first layer over the relaxed region, intervals after it."""
    g = len(lo)
    k = len(spec.others)
    if _infeasible(spec, lo, hi):
        return _empty(spec, lo, hi)
    pre: list = [None] * len(spec.layers)
    cur_lo = cur_hi = None
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, Affine):
            if i == 0:
                cur_lo, cur_hi = _affine_exact(layer, _first_err(spec), lo, hi, spec.region)
                first = (cur_lo.copy(), cur_hi.copy())
            else:
                cur_lo, cur_hi = _spec_interval(spec, i, cur_lo, cur_hi)
        else:
            pre[i] = (cur_lo, cur_hi)
            cur_lo, cur_hi = layer.interval(cur_lo, cur_hi)
    p = np.clip(0.0, lo, hi).astype(np.float64)
    lower = cur_lo if spec.cap is None else np.minimum(cur_lo, spec.cap)
    return Bounds(lower, np.zeros((k, g)), np.tile(p, (k, 1)), pre, "ibp", first)


def _infeasible(spec: SpecChain, lo, hi) -> bool:
    return spec.region.empty(lo, hi) or bool(np.any(lo > hi))


def _empty(spec: SpecChain, lo, hi) -> Bounds:
    k, g = len(spec.others), len(lo)
    p = np.clip(0.0, lo, hi).astype(np.float64)
    return Bounds(
        np.full(k, np.inf), np.zeros((k, g)), np.tile(p, (k, 1)), [None] * len(spec.layers), "empty"
    )


# --- linear bounds (back-substitution) ---------------------------------------------------------


def linear_bounds(
    spec: SpecChain,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    alpha_steps: int = 0,
    target: np.ndarray | float = 0.0,
    ibp: Bounds | None = None,
    parent: Bounds | None = None,
    alpha_gap: float = np.inf,
    reuse: bool = False,
    open_only: bool = False,
    slopes: dict | None = None,
) -> Bounds:
    """CROWN / DeepPoly: back-substitute every unstable neuron and the margins down to s.

    Intermediate bounds are the tighter of back-substitution and `parent`'s (bounds of an
    enclosing box, as branch and bound passes them: only neurons still unstable are redone),
    or of back-substitution and IBP without a parent (the enclosing box's back-substituted
    bounds beat a wide layer's interval image: taking both changed no node of the MNIST MLP's
    hard feature-region inputs, and the interval was 5% of their time).
    `reuse`: the bounds keep their back-substituted rows, and a box holding `parent`'s point
    nearest 0 minimises `parent`'s kept rows over itself instead of deriving its own (they hold
    on a sub-box; a box that only loses range far from that point changes them little, within
    0.01 logit on average on the MNIST models' feature regions), and keeps them in turn.
    ReLU lower slopes are adaptive (0 or 1), then optimised for the margins still at or below
    `target` (`alpha_steps` > 0 gradient steps), when the worst is at most `alpha_gap` below it
    (optimising gains a few percent: no use far from the target).
    `open_only` (without slope optimisation): only the margins `parent` leaves at or below
    `target` are back-substituted; the others keep the parent's bound, which holds on the
    sub-box (zero coefficients, the box's point nearest 0 as minimiser). On the MNIST MLP's
    feature regions a node has 1.5 such margins of 9 on average.
    Every ReLU's unstable neurons take the knapsack cut's upper lines (`knapsack_cut`): the
    first's over its exact input, a deeper one's over its input's back-substituted upper
    rows. Over a whole region the deeper cuts can be the looser lines (the MNIST MLP's root
    margin bounds on features r=20 fell by 1-4 logits), so optimised bounds (`alpha_steps` >
    0: the root's) keep, per margin, the better of those with and without them.
    `slopes` (lower slopes per ReLU layer and margin, optimised over an enclosing box with
    every cut: `optimised_slopes`; any slope in [0, 1] is sound): without optimisation here,
    the margins still open are bounded with them too (on this box's unstable neurons), the
    better kept per margin (at a node, `open_only` with a parent, in the same pass).
    """
    lo = np.asarray(lo)
    hi = np.asarray(hi)
    if _infeasible(spec, lo, hi):
        return _empty(spec, lo, hi)
    layers = spec.layers
    pre: list = [None] * len(layers)
    if parent is not None and parent.empty:
        parent = None
    first = None
    cuts: dict = {}  # ReLU layer -> its knapsack cut over this box
    uppers: dict = {}  # deeper ReLU layer -> (rows, upper rows on s) of its input
    point = np.clip(0, lo, hi)
    inherit = None  # the parent's kept rows, for a box holding its point nearest 0
    if (
        reuse
        and parent is not None
        and parent.queries is not None
        and holds_point_of(parent, lo, hi)
    ):
        inherit = parent.queries
    kept: dict | None = ({} if inherit is None else inherit) if reuse else None
    floors: dict | None = {} if reuse else None
    drop = _dropped_generator(parent, lo, hi, spec.region) if reuse else None
    cur_lo = cur_hi = None
    for i, layer in enumerate(layers):
        if isinstance(layer, Affine):
            known = None
            if parent is not None and i + 1 < len(layers) and parent.pre[i + 1] is not None:
                known = parent.pre[i + 1]
            relu_next = i + 1 < len(layers) and isinstance(layers[i + 1], Relu)
            if i == 0:
                cur_lo, cur_hi, fl = _first_layer(
                    spec, lo, hi, ibp, known if relu_next else None, drop
                )
                if floors is not None and fl is not None:
                    floors[0] = fl
                cur_lo, cur_hi = snap(spec, 0, cur_lo, cur_hi)
                first = (cur_lo.copy(), cur_hi.copy())
                continue
            if known is not None:  # the enclosing box's: its interval image is looser
                cur_lo, cur_hi = known[0].copy(), known[1].copy()
            else:
                cur_lo, cur_hi = _spec_interval(spec, i, cur_lo, cur_hi)
            if i + 1 == len(layers):
                continue
            cur_lo, cur_hi = snap(spec, i, cur_lo, cur_hi)
            rows = np.arange(len(cur_lo))
            if relu_next:
                rows = np.flatnonzero((cur_lo < 0) & (cur_hi > 0))
            if len(rows):
                lam, c, pick = _kept_rows(inherit, i, rows)
                passed = pick is not None  # the rows this box passes on: `kept[i]`
                if lam is None:
                    lam, c = _query_both(spec, pre, i, rows, cuts)
                    passed = kept is not None and inherit is None
                    if passed:
                        kept[i] = (rows, lam, c)
                old = None
                if pick is not None and drop is not None and i in drop[1]:
                    old = (drop[0], drop[1][i][pick])
                vals, fl = _minimise_rows(spec.region, lam, c, lo, hi, old)
                m = len(rows)
                if relu_next:
                    uppers[i + 1] = (rows, -lam[m:], -c[m:])
                cur_lo[rows] = np.maximum(cur_lo[rows], vals[:m])
                cur_hi[rows] = np.minimum(cur_hi[rows], -vals[m:])
                cur_lo, cur_hi = snap(spec, i, cur_lo, cur_hi)
                if floors is not None and passed:
                    if pick is not None:  # aligned with all of the kept rows
                        fl, part = np.full(2 * len(kept[i][0]), np.nan), fl
                        fl[pick] = part
                    floors[i] = fl
        else:
            pre[i] = (cur_lo, cur_hi)
            k_cut = first_cut(spec, lo, hi, pre) if i == 1 else None
            if i in uppers and spec.knapsack_cut and spec.deeper_cuts:
                k_cut = deeper_cut(spec, lo, hi, pre[i], *uppers.pop(i))
            if k_cut is not None:
                cuts[i] = k_cut
            cur_lo, cur_hi = layer.interval(cur_lo, cur_hi)
    top = len(layers) - 1
    last = layers[top]
    m = last.weight.shape[0]
    cut = cuts or None
    first_only = {1: cuts[1]} if 1 in cuts else None
    node = open_only and parent is not None and alpha_steps == 0
    if node:  # with the given slopes in the same pass (one back-substitution of both)
        given = slopes if top > 0 else None
        lam, c, vals, argmin = _open_margins(spec, pre, lo, hi, cut, parent.lower <= target, given)
    else:
        lam, c = _backsub(spec, pre, top + 1, np.eye(m), np.zeros(m), cut=cut)
        vals, argmin = spec.region.minimise(lam, c, lo, hi, argmin=True)
        if alpha_steps > 0 and len(cuts) > len(first_only or {}):
            lam2, c2 = _backsub(spec, pre, top + 1, np.eye(m), np.zeros(m), cut=first_only)
            vals2, argmin2 = spec.region.minimise(lam2, c2, lo, hi, argmin=True)
            _keep_better(vals2, (lam, c, vals, argmin), (lam2, c2, vals2, argmin2))
    method = "crown"
    worst = float(np.min(vals - target))
    if alpha_steps > 0 and top > 0 and -alpha_gap < worst <= 0:
        found = optimise_alpha(spec, pre, lo, hi, alpha_steps, target, cut=first_only)[:4]
        _keep_better(found[2], (lam, c, vals, argmin), found)
        method = "alpha-crown"
    elif slopes is not None and top > 0 and not node:
        rows = vals <= target
        if rows.any():
            alphas = given_slopes(spec, pre, slopes, rows)
            got = _open_margins(spec, pre, lo, hi, cut, rows, alphas=alphas)
            _keep_better(got[2], (lam, c, vals, argmin), got)
    interval = cur_lo  # IBP of the margins from the refined intermediate bounds
    for other in (ibp, parent):  # bounds over this box or an enclosing one hold here too
        if other is not None and not other.empty:
            interval = np.maximum(interval, other.lower)
    lower = np.maximum(vals, interval)
    if spec.cap is not None:
        lower = np.minimum(lower, spec.cap)
    box_floors = None if floors is None else (lo.copy(), hi.copy(), floors)
    return Bounds(
        lower,
        lam,
        argmin,
        pre,
        method,
        first,
        cut,
        point if reuse else None,
        kept,
        box_floors,
        offsets=c,
        ceiling=spec.cap,
    )


def optimised_slopes(spec: SpecChain, b: Bounds, lo, hi, steps: int, target) -> Bounds:
    """`b` (bounds over the box [lo, hi]) with the lower slopes of the margins it leaves at or
    below `target` optimised over the box from the usual ones (`refined`: with `b`'s
    intermediate bounds and every cut it has), their better rows kept; its `slopes` hold every
    margin's (the usual ones on the others, which no sub-box back-substitutes again) for the
    sub-boxes to try (`linear_bounds`' `slopes`). Only the open margins: on the MNIST models one
    to three of nine, a third of the time of all nine. On the MNIST CNN's int8 copy (features
    r=10) the second ReLU's cut is worth 3-4 logits there, and slopes optimised without it gain
    nothing; with it, a descent's bounds rise 0.1-1.5 logits at every depth (input 20 closes
    at depth 6, not 11). `slopes` None for an empty box or no ReLU."""
    if b.empty:
        return replace(b, slopes=None)
    m = len(b.lower)
    usual = {
        k: np.tile(layer.relax(*b.pre[k])[2], (m, 1))
        for k, layer in enumerate(spec.layers)
        if isinstance(layer, Relu)
    }
    return refined(spec, b, lo, hi, steps, target, usual) if usual else replace(b, slopes=None)


def refined(spec: SpecChain, b: Bounds, lo, hi, steps: int, target, slopes: dict | None) -> Bounds:
    """`b` (a node's bounds over [lo, hi], from `linear_bounds` with `slopes`) with the lower
    slopes of the margins it leaves at or below `target` optimised over this box from
    `slopes` (`steps` gradient steps: `optimise_alpha`, with `b`'s intermediate bounds and
    cuts), each such margin's row kept where its bound is better; `slopes` with those
    margins' rows replaced (float32: any slope in [0, 1] is sound) go into the result's
    `slopes`, for its sub-boxes to try. Slopes optimised over an enclosing box fit a sub-box
    less well the deeper it lies: on the MNIST CNN's int8 copy (features r=10) 5 steps over a
    node raised its worst open margin 0.2-0.4 logits (median), its children's with them 0.2-0.36.
    With `steps` 0, no open margin or no slopes, `b` passes `slopes` on as they are."""
    open_ = np.flatnonzero(b.lower <= target) if not b.empty else np.zeros(0, np.int64)
    if not len(open_) or steps <= 0 or not slopes or b.offsets is None:
        return replace(b, slopes=slopes)
    lam, c, vals, argmin, got = optimise_alpha(
        spec, b.pre, lo, hi, steps, target, cut=b.cut, margins=open_, start=slopes
    )
    old, _ = spec.region.minimise(b.coeffs[open_], b.offsets[open_], lo, hi)
    better = vals > old
    rows = open_[better]
    coeffs, offsets, at, lower = b.coeffs.copy(), b.offsets.copy(), b.argmin.copy(), b.lower.copy()
    coeffs[rows], offsets[rows], at[rows] = lam[better], c[better], argmin[better]
    up = vals[better] if b.ceiling is None else np.minimum(vals[better], b.ceiling[rows])
    lower[rows] = np.maximum(lower[rows], up)
    kids = {k: given.astype(np.float32) for k, given in slopes.items()}
    for k, rows_k in kids.items():
        rows_k[open_] = got[k]
    return replace(b, lower=lower, coeffs=coeffs, offsets=offsets, argmin=at, slopes=kids)


def given_slopes(
    spec: SpecChain, pre: list, slopes: dict, rows: np.ndarray, usual: bool = False
) -> dict:
    """The `slopes` (per ReLU layer and margin) of the margins `rows` (a mask) on the neurons
    unstable in `pre`, the usual slope on the others (a stable neuron's line is exact).
    `usual`: each layer's rows of the usual slopes first, then these (`_open_margins`' rows
    for both in one pass)."""
    out = {}
    for k, given in slopes.items():
        _, _, alpha, unstable = spec.layers[k].relax(*pre[k])
        out[k] = np.where(unstable, given[rows], alpha)
        if usual:
            out[k] = np.vstack([np.broadcast_to(alpha, out[k].shape), out[k]])
    return out


def _keep_better(vals: np.ndarray, kept: tuple, other: tuple) -> None:
    """Where `vals` (the other bounds' values) beat the kept ones, take the other's rows:
    `kept` and `other` are (lam, c, values, minimisers), `kept`'s arrays updated in place."""
    better = vals > kept[2]
    for mine, theirs in zip(kept, other, strict=True):
        mine[better] = theirs[better]


def holds_point_of(parent: Bounds, lo, hi) -> bool:
    """Whether the box [lo, hi] holds `parent`'s point nearest 0 (kept with `reuse`): its kept
    rows and `restricted` bounds serve such a child best."""
    return parent.point is not None and np.array_equal(parent.point, np.clip(0, lo, hi))


def restricted(spec: SpecChain, parent: Bounds, lo, hi, target) -> Bounds:
    """`parent`'s bounds on a sub-box [lo, hi]: its margins' linear lower bounds (they hold on
    the sub-box) re-minimised over it where they are kept and at or below `target`, the rest
    as they are (without the parent's rows: its children derive theirs from the parent's).
    A tenth of a child's own bounds' cost; on the MNIST MLP's feature regions the
    child holding the parent's point nearest 0 gets within 0.07 logit (median) of its own."""
    if parent.empty or parent.offsets is None:
        return parent
    if _infeasible(spec, lo, hi):
        return _empty(spec, lo, hi)
    lower, argmin = parent.lower.copy(), parent.argmin.copy()
    rows = np.flatnonzero((lower <= target) & np.isfinite(parent.offsets))
    if len(rows):
        vals, at = spec.region.minimise(
            parent.coeffs[rows], parent.offsets[rows], lo, hi, argmin=True
        )
        lower[rows], argmin[rows] = np.maximum(lower[rows], vals), at
    if spec.cap is not None:
        lower = np.minimum(lower, spec.cap)
    return replace(parent, lower=lower, argmin=argmin, queries=None, floors=None)


def _dropped_generator(parent: Bounds | None, lo, hi, region: Region):
    """(g, `parent`'s floors) when [lo, hi] is `parent`'s box with its 0/1 generator g fixed
    at 0 and the rows whose greedy does not take g keep their minima
    (`regions.binary_floor_holds`), else None."""
    if parent is None or parent.floors is None:
        return None
    plo, phi, fl = parent.floors
    diff = np.flatnonzero((plo != lo) | (phi != hi))
    if len(diff) != 1:
        return None
    g = int(diff[0])
    if not (plo[g] == 0 and phi[g] == 1 and lo[g] == 0 and hi[g] == 0):
        return None
    return (g, fl) if binary_floor_holds(region, plo, phi, g) else None


def _minimise_rows(region: Region, lam, c, lo, hi, old=None):
    """Minima of rows (lam, c) over [lo, hi] with their greedy floors (NaN: not a 0/1 box).
    `old` ((g, the enclosing box's floors of these rows) from `_dropped_generator`): rows whose
    greedy does not take g are not minimised (-inf: their minimum is the enclosing box's, which
    the caller's bounds already hold)."""
    fl = np.full(len(lam), np.nan)
    redo = None
    if old is not None:
        same = binary_floor_unchanged(np.maximum(-lam[:, old[0]], 0.0), old[1])
        fl[same] = old[1][same]
        redo = np.flatnonzero(~same)
    if redo is None:
        vals, got = region.minimise(lam, c, lo, hi, floors=True)
        return vals, fl if got is None else got
    vals = np.full(len(lam), -np.inf)
    if len(redo):
        vals[redo], got = region.minimise(lam[redo], c[redo], lo, hi, floors=True)
        if got is not None:
            fl[redo] = got
    return vals, fl


def _open_margins(
    spec: SpecChain, pre: list, lo, hi, cut, open_: np.ndarray, slopes=None, alphas=None
):
    """The margins' linear lower bounds (lam, c), values and minimisers over [lo, hi] for the
    margins in the mask `open_` only (`alphas`: their lower slopes, `given_slopes`): the others
    get zero coefficients, constant and value -inf. `slopes` (as `linear_bounds` takes them):
    each margin is bounded with its usual slopes and with these in one back-substitution of
    both sets of rows, the better kept (a node has a margin or two open: a pass for each set
    repeated the per-layer work)."""
    m, g = spec.layers[-1].weight.shape[0], len(lo)
    rows = np.flatnonzero(open_)
    lam, c = np.zeros((m, g)), np.full(m, -np.inf)
    vals = np.full(m, -np.inf)
    argmin = np.tile(np.clip(0, lo, hi).astype(np.float64), (m, 1))
    if len(rows):
        unit = np.eye(m)[rows]
        if slopes is not None:
            unit, alphas = np.vstack([unit, unit]), given_slopes(spec, pre, slopes, open_, True)
        lam_o, c_o = _backsub(
            spec, pre, len(spec.layers), unit, np.zeros(len(unit)), alphas, cut=cut
        )
        vals_o, argmin_o = spec.region.minimise(lam_o, c_o, lo, hi, argmin=True)
        if slopes is not None:  # per margin, the better of its two rows
            r = len(rows)
            usual = (lam_o[:r], c_o[:r], vals_o[:r], argmin_o[:r])
            _keep_better(vals_o[r:], usual, (lam_o[r:], c_o[r:], vals_o[r:], argmin_o[r:]))
            lam_o, c_o, vals_o, argmin_o = usual
        lam[rows], c[rows] = lam_o, c_o
        vals[rows], argmin[rows] = vals_o, argmin_o
    return lam, c, vals, argmin


def _kept_rows(kept: dict | None, i: int, rows: np.ndarray):
    """Layer `i`'s kept (lam, c) for `rows` and their negations, and where they are among the
    kept ones; (None, None, None) when `kept` holds no such rows for every one of `rows`."""
    if kept is None or i not in kept or not len(kept[i][0]):
        return None, None, None
    have, lam, c = kept[i]
    at = np.minimum(np.searchsorted(have, rows), len(have) - 1)
    if not np.array_equal(have[at], rows):
        return None, None, None
    pick = np.concatenate([at, len(have) + at])
    return lam[pick], c[pick], pick


def last_rows_lower(spec: SpecChain, lo, hi, known: Bounds) -> np.ndarray | None:
    """Lower bounds of the rows of `spec`'s last layer over [lo, hi] from `known`'s
    intermediate bounds (bounds of a spec with the same layers below the last, over this box or
    an enclosing one), as `linear_bounds` ends: the back-substituted rows, or the last layer's
    interval where tighter. None when `known` has no intermediate bounds to give."""
    top = len(spec.layers) - 1
    if known.empty or top < 1 or len(known.pre) != len(spec.layers) or known.pre[top - 1] is None:
        return None
    m = spec.layers[top].weight.shape[0]
    lam, c = _backsub(spec, known.pre, top + 1, np.eye(m), np.zeros(m), cut=known.cut)
    vals, _ = spec.region.minimise(lam, c, lo, hi)
    below = spec.layers[top - 1].interval(*known.pre[top - 1])
    return np.maximum(vals, _spec_interval(spec, top, *below)[0])


def _cut_at(cut: dict | None, k: int) -> KnapsackCut | None:
    """ReLU layer `k`'s knapsack cut in `cut` (ReLU layer -> cut), or None."""
    return None if cut is None else cut.get(k)


def deeper_cut(spec: SpecChain, lo, hi, pre_k: tuple, rows, w_up, c_up) -> KnapsackCut | None:
    """The knapsack cut of a ReLU deeper than the first, over the box [lo, hi]: its input's
    upper linear bounds `w_up . s + c_up` (rows `rows`, every neuron unstable in `pre_k`) stand
    for the exact affine input of the first ReLU's cut. ReLU is monotone, so a line above
    ReLU of an upper bound is above the ReLU. None where the cut does not apply."""
    lower, upper = pre_k
    unstable = (lower < 0) & (upper > 0)
    have = np.zeros(len(lower), dtype=bool)
    have[rows] = True
    if not unstable.any() or np.any(unstable & ~have):
        return None
    got = knapsack_cut(w_up, c_up, None, spec.region, lo, hi, lower[rows], upper[rows])
    if got is None:
        return None
    return replace(got, mask=unstable, rows=rows[got.rows])


def first_cut(spec: SpecChain, lo, hi, pre: list) -> KnapsackCut | None:
    """The knapsack cut of the ReLU right after the spec's first (affine on s) layer, over the
    box [lo, hi] (`verifier.engine.knapsack_cut`), or None where it does not apply."""
    if not spec.knapsack_cut or len(spec.layers) < 2 or not isinstance(spec.layers[1], Relu):
        return None
    layer = spec.layers[0]
    return knapsack_cut(layer.weight, layer.bias, _first_err(spec), spec.region, lo, hi, *pre[1])


def _first_layer(spec: SpecChain, lo, hi, ibp: Bounds | None, known, drop=None):
    """Bounds of the first layer's outputs: from `ibp` when given, else the knapsack, only for
    the neurons `known` (an enclosing box's bounds) leaves unstable; with the knapsack's greedy
    floors per direction and neuron ((2, n), NaN where not minimised or not a 0/1 box; None
    from `ibp`). `drop` (from `_dropped_generator`): rows whose greedy does not take its
    generator keep `known` (their minimum is the enclosing box's, which `known` holds)."""
    if ibp is not None and ibp.first is not None:
        return ibp.first[0].copy(), ibp.first[1].copy(), None
    layer = spec.layers[0]
    n = len(layer.bias)
    if known is None:
        rows = np.arange(n)
        cur_lo, cur_hi = np.full(n, -np.inf), np.full(n, np.inf)
    else:
        cur_lo, cur_hi = known[0].copy(), known[1].copy()
        rows = np.flatnonzero((cur_lo < 0) & (cur_hi > 0))
    floors = np.full((2, n), np.nan)
    if not len(rows):
        return cur_lo, cur_hi, floors
    # one set of rows minimised both ways: w s + b (the lower bound), -(w s + b) (the upper)
    w, b, err = layer.weight[rows], layer.bias[rows], _first_err(spec)
    old = None
    if drop is not None and known is not None and 0 in drop[1]:
        old = (drop[0], drop[1][0][:, rows].ravel())
    vals, fl = _minimise_rows(
        spec.region, np.concatenate([w, -w]), np.concatenate([b, -b]), lo, hi, old
    )
    m = len(rows)
    e = 0.0 if err is None else err[rows]
    cur_lo[rows] = np.maximum(cur_lo[rows], vals[:m] - e)
    cur_hi[rows] = np.minimum(cur_hi[rows], -vals[m:] + e)
    floors[:, rows] = fl.reshape(2, m)
    return cur_lo, cur_hi, floors


def _first_err(spec: SpecChain):
    """What the first layer's outputs are widened by: own rounding plus input rounding."""
    if spec.first_input is None:
        return spec.err[0]
    return spec.first_input[2] if spec.err[0] is None else spec.err[0] + spec.first_input[2]


def _query_both(spec: SpecChain, pre: list, i: int, rows: np.ndarray, cut: dict | None = None):
    """Lower bounds of rows `rows` of affine layer `i` and of their negations, as linear
    functions of s.

    When a ReLU and an affine layer lie below, the relaxation's lower and upper lines are folded
    into that (narrower) weight matrix: with W+ = (W + |W|) / 2 and W- = (W - |W|) / 2 both
    signs come from two products, W @ M1 and |W| @ M2 (no m x n elementwise work; where both
    weights are sparse, W @ M1's weight part is a product of their CSR forms,
    `_sparse_first_products`). The first
    ReLU's upper lines are its knapsack cut's (in `cut`) where it has them; deeper ReLUs keep
    their triangle lines here (a cut's line is on s, not on the layer below). The first
    layer's input rounding is charged there per neuron (|W| . step, as intervals are widened
    by it) when it is small beside that layer's output ranges (`_small_first_input`), else as
    `first_input_charge` charges it (per neuron where cheap, else |lam W| . step), the lam on
    the first layer's outputs folded in as the weights are (`_first_input_rows`).
    """
    m = len(rows)
    cut = _cut_at(cut, 1)
    first_only = None if cut is None else {1: cut}
    if (
        i < 2
        or not isinstance(spec.layers[i - 1], Relu)
        or not isinstance(spec.layers[i - 2], Affine)
    ):
        eye = np.zeros((2 * m, len(spec.layers[i].bias)))
        eye[np.arange(m), rows] = 1.0
        eye[m + np.arange(m), rows] = -1.0
        return _backsub(spec, pre, i + 1, eye, np.zeros(2 * m), cut=first_only)
    layer, below = spec.layers[i], spec.layers[i - 2]
    su, iu, alpha, unstable = spec.layers[i - 1].relax(*pre[i - 1])
    exact = i == 2 and not _small_first_input(spec, pre)  # charged per row, below
    low = spec.err[0] if exact else _first_err(spec) if i == 2 else spec.err[i - 2]
    low = low if low is not None else np.zeros(len(su))
    # lower line alpha (W s + b), rounding alpha . err; upper line su (W s + b) + iu, su . err;
    # m1 / m2 hold their half sum / half difference (weights, constant, rounding)
    g = below.weight.shape[1]
    h1, h2 = (alpha + su) / 2.0, (alpha - su) / 2.0
    k = cut.mask if cut is not None and i == 2 else None
    if k is not None:  # the cut's lines: alpha / 2 (W s + b) plus or minus half the cut's line
        h1[k] = h2[k] = alpha[k] / 2.0
    # stable neurons' lines coincide: m2 has weights and constant on the unstable ones only
    # (`cols`), its rounding column (h1 . low) on all
    cols = np.flatnonzero(unstable)
    # both weights sparse (convolutions): W m1's weight part is (W h1) W_below, two sparse
    # factors, and m1 keeps its constant columns only
    sparse = sparse_weight(layer.weight) is not None
    both = sparse and sparse_weight(below.weight) is not None
    m1, m2 = np.empty((len(su), 2 if both else g + 2)), np.empty((len(cols), g + 1))
    c1 = m1.shape[1] - 2  # m1's constant column
    if not both:
        np.multiply(h1[:, None], below.weight, out=m1[:, :g])
    np.multiply(h2[cols, None], below.weight[cols], out=m2[:, :g])
    il = spec.layers[i - 1].lower_intercept(*pre[i - 1])  # constants: both lines
    m1[:, c1] = h1 * below.bias + (iu + il) / 2.0
    m2[:, g] = h2[cols] * below.bias[cols] - iu[cols] / 2.0
    m1[:, c1 + 1], m2_low = h2 * low, h1 * low
    if k is not None:  # the cut's constants hold the rounding
        if not both:
            m1[cut.rows, :g] += cut.slope / 2.0
        m1[cut.rows, c1] = h1[cut.rows] * below.bias[cut.rows] + cut.const / 2.0
        on = k[cols]
        at = np.searchsorted(cut.rows, cols[on])
        m2[on, :g] -= cut.slope[at] / 2.0
        m2[on, g] = h2[cols[on]] * below.bias[cols[on]] - cut.const[at] / 2.0
    w_rows = aw = None
    if exact or sparse:
        w_rows, aw = weights(layer.weight, rows), weights(spec.absw[i], rows)
        a = w_rows @ m1 if not both else _sparse_first_products(w_rows, m1, h1, below, cut, k)
        b = np.empty_like(a)
        b[:, : g + 1] = aw[:, cols] @ m2
        b[:, g + 1] = aw @ m2_low
    else:
        a, b = _live_products(layer.weight, rows, m1, m2, m2_low, unstable)
    own = spec.err[i][rows] if spec.err[i] is not None else 0.0
    if spec.input_error(i) is not None:  # unit queries: |lambda W| = |W| on the rows
        own = own + (aw if aw is not None else spec.absw[i][rows]) @ spec.input_error(i)
    bias = layer.bias[rows]
    lam = np.concatenate([a[:, :g] + b[:, :g], b[:, :g] - a[:, :g]])
    c = np.concatenate(
        [
            bias + a[:, g] + b[:, g] - a[:, g + 1] - b[:, g + 1] - own,
            -bias - a[:, g] + b[:, g] + a[:, g + 1] - b[:, g + 1] - own,
        ]
    )
    if spec.input_error(i - 2) is not None:  # lam is on the input of the layer below
        c = c - np.abs(lam) @ spec.input_error(i - 2)
    if exact:
        c = c - _first_input_rows(spec, rows, w_rows, aw, h1, h2, unstable)
    if i == 2 and spec.first_charge is not None:
        c = c + _grouped_saving(spec, layer.weight, rows, w_rows, h1, h2)
    return _backsub(spec, pre, i - 2, lam, c, cut=first_only)


def _sparse_first_products(w_rows, m1, h1, below, cut, k) -> np.ndarray:
    """`_query_both`'s W m1 where W's rows and the layer below are both sparse (CSR): the
    weight part (W scaled by h1) times the layer below's CSR, plus the cut's lines on its
    rows where `k` marks them, then m1's two constant columns. The dense h1 W_below (every
    neuron below by every input) is never built: on the CIFAR CNN it and its product were
    most of the second layer's bounds."""
    g = below.weight.shape[1]
    data = w_rows.data * h1[w_rows.indices]
    scaled = csr_array((data, w_rows.indices, w_rows.indptr), shape=w_rows.shape)
    a = np.empty((w_rows.shape[0], g + 2))
    a[:, :g] = _dense(scaled @ sparse_weight(below.weight).csr)
    if k is not None:
        a[:, :g] += _dense(w_rows[:, cut.rows] @ (cut.slope / 2.0))
    a[:, g:] = w_rows @ m1
    return a


def _grouped_saving(spec: SpecChain, w2, rows, w_rows, h1, h2) -> np.ndarray:
    """What `SpecChain.first_charge` saves `_query_both`'s rows of layer 2 (lower bounds, then
    their negations) against the per-output charge |lam| . err[0] folded into them, lam on the
    first layer's outputs being W2 h1 + |W2| h2 (negated rows: |W2| h2 - W2 h1). On the MNIST
    CNN's int8 copy (features r=10) the second layer's bounds then leave 32-35% fewer nodes.
    `w_rows`: W2's rows `rows` as `_query_both` took them (CSR where sparse), or None."""
    m = len(rows)
    if w_rows is not None and issparse(w_rows):
        r = np.repeat(np.arange(m), np.diff(w_rows.indptr))
        cols, d = w_rows.indices, w_rows.data
    else:
        dense = w2[rows] if w_rows is None else np.asarray(w_rows)
        r, cols = np.nonzero(dense)
        d = dense[r, cols]
    ad = np.abs(d)
    low = d * h1[cols] + ad * h2[cols]
    up = ad * h2[cols] - d * h1[cols]
    r, cols, v = np.concatenate([r, r + m]), np.concatenate([cols, cols]), np.concatenate([low, up])
    live = v != 0.0
    r, cols, v = r[live], cols[live], v[live]
    charge = spec.first_charge.charge_entries(r, cols, v, 2 * m)
    per_output = np.bincount(r, weights=np.abs(v) * spec.err[0][cols], minlength=2 * m)
    return np.maximum(per_output - charge, 0.0)


def _live_products(w, rows, m1, m2, m2_low, unstable):
    """`_query_both`'s products W m1 and |W| (m2 on the unstable neurons, m2_low) on the rows
    `rows` of dense weights, over the neurons whose lines are not all zero only: the first
    ReLU's neurons off over the box add nothing (about 40% of them at the MNIST MLP's
    feature-region nodes). One block of W is gathered (rows, then those columns: a quarter
    less time than one 2-d gather each of W and |W|) and |W|'s is its absolute value."""
    live = np.flatnonzero(unstable | m1.any(axis=1) | (m2_low != 0.0))
    m2_live = np.zeros((len(live), m2.shape[1] + 1))
    m2_live[np.searchsorted(live, np.flatnonzero(unstable)), :-1] = m2
    m2_live[:, -1] = m2_low[live]
    block = w[rows][:, live]
    return block @ m1[live], np.abs(block) @ m2_live


def _first_input_rows(spec: SpecChain, rows, w2, aw2, h1, h2, unstable) -> np.ndarray:
    """`first_input_charge` of `_query_both`'s rows of layer 2 (its lower bounds, then their
    negations), without their lam on the first layer's outputs: that lam is W2 (alpha + su) / 2
    + |W2| (alpha - su) / 2 (negated rows: |W2| (alpha - su) / 2 - W2 (alpha + su) / 2), alpha
    / 2 both on the knapsack cut's neurons (their negative part takes the cut's line, whose
    constant holds the rounding), so its products with the first layer's weights (and with
    the per-neuron bound) come from two products with W2, as `_query_both` folds the slopes.
    `w2`, `aw2`: W2's and |W2|'s rows `rows` as `_query_both` took them (`weights`); `h1`,
    `h2`: its half sum and half difference of the slopes, alpha / 2 on the cut's neurons."""
    w_x, step, per_neuron = spec.first_input
    cols = np.flatnonzero(unstable)  # h2 is 0 on the others
    a, b = w2 @ (h2 * per_neuron), aw2 @ (h1 * per_neuron)
    charge = np.concatenate([a + b, b - a])  # |lam| . per_neuron
    dear = np.flatnonzero(_exact_first_input(charge))
    if len(dear):
        base = dear % len(rows)
        r = np.unique(base)
        live = np.flatnonzero(h1)  # h1 is 0 on the neurons off over the box
        a = _dense(_scaled_columns(w2[np.ix_(r, live)], h1[live]) @ weights(w_x, live))
        b = _dense(_scaled_columns(aw2[np.ix_(r, cols)], h2[cols]) @ weights(w_x, cols))
        at = np.searchsorted(r, base)
        up = dear < len(rows)  # a bound's row (W2 ... + |W2| ...), else its negation's
        charge[dear[up]] = np.abs(a[at[up]] + b[at[up]]) @ step
        charge[dear[~up]] = np.abs(b[at[~up]] - a[at[~up]]) @ step
    return charge


def _scaled_columns(m, v: np.ndarray):
    """`m * v` (v scaling its columns) for a dense or a sparse `m` (kept sparse)."""
    return m.multiply(v[None, :]).tocsr() if issparse(m) else m * v


def _dense(m) -> np.ndarray:
    """`m` as a dense array (a sparse product's rows: a first convolution's are near full)."""
    return m.toarray() if issparse(m) else m


def first_input_charge(spec: SpecChain, lam: np.ndarray) -> np.ndarray:
    """What the first layer's input rounding costs rows `lam` (on that layer's output), per
    row: |lam| . (|W| . step), per neuron, where that is at most CHEAP_CHARGE (a folded input
    grid leaves 1e-6 a value: the exact charge's product with the first layer's weights was
    half a quantized margin bound's time), else exactly |lam W| . step (through W's sparse
    form where it has one: a first convolution's)."""
    w0, step, per_neuron = spec.first_input
    charge = np.abs(lam) @ per_neuron
    exact = _exact_first_input(charge)
    if exact.any():
        charge[exact] = np.abs(left_times(lam[exact], w0)) @ step
    return charge


def _exact_first_input(per_neuron_charge: np.ndarray) -> np.ndarray:
    """The rows `first_input_charge` (and the slopes' gradient with it) charges exactly."""
    return per_neuron_charge > CHEAP_CHARGE


def _small_first_input(spec: SpecChain, pre: list) -> bool:
    """Whether the first layer's input rounding, charged per neuron, is at most SPREAD of the
    first layer's output ranges in total (a folded input grid leaves float32 slack alone):
    queries then charge it per neuron, else through lam on x'."""
    if spec.first_input is None:
        return True
    lo, hi = pre[1]
    return bool(np.sum(spec.first_input[2]) <= SPREAD * np.sum(hi - lo))


def _backsub(
    spec: SpecChain,
    pre: list,
    upto: int,
    lam: np.ndarray,
    c: np.ndarray,
    alphas=None,
    tape=None,
    betas=None,
    cut: dict | None = None,
):
    """Lower bound `lam . v_upto + c` as a linear function of s, through layers upto-1 .. 0.

    `lam` are coefficients on the output of layer `upto - 1`; every affine layer passed charges
    its rounding bound |lam| . err (the first as `SpecChain.first_charge` has it, where set).
    `betas` (Relu layer -> (m, n) signed multipliers of split constraints on its input, see
    `verifier.engine.relu_split`) are added to lam on that input.
    A ReLU's upper lines are `cut`'s (ReLU layer -> `KnapsackCut`, on s directly) where it has
    them.
    """
    lam, c, on_s = _backsub_to(spec, pre, upto, 0, lam, c, alphas, tape, betas, cut)
    return (lam, c) if on_s is None else (lam + on_s, c)


def _backsub_to(
    spec, pre, upto: int, stop: int, lam, c, alphas=None, tape=None, betas=None, cut=None
):
    """`_backsub` through layers upto-1 .. stop only: (lam on the output of layer stop - 1, c,
    the cut lines' coefficients on s, or None), the bound being `lam . v + c + on_s . s`."""
    on_s = None
    for k in range(upto - 1, stop - 1, -1):
        layer = spec.layers[k]
        if tape is not None:
            tape.append((k, lam))
        if isinstance(layer, Affine):
            c = c + lam @ layer.bias
            if k == 0 and spec.first_charge is not None:
                c = c - spec.first_charge.charge(lam)
            elif spec.err[k] is not None:
                c = c - np.abs(lam) @ spec.err[k]
            if k == 0 and spec.first_input is not None:
                c = c - first_input_charge(spec, lam)
            lam = left_times(lam, layer.weight)
            if spec.input_error(k) is not None:
                c = c - np.abs(lam) @ spec.input_error(k)
        else:
            k_cut = _cut_at(cut, k)
            if k_cut is not None:  # negative lam on a cut neuron: the cut's line
                through = np.minimum(lam[:, k_cut.rows], 0.0)
                c, lam = c + through @ k_cut.const, lam.copy()
                lam[:, k_cut.rows] -= through
                here = through @ k_cut.slope
                on_s = here if on_s is None else on_s + here
            slope = alphas.get(k) if alphas is not None else None
            lam, c = layer.back_step(lam, c, *pre[k], slope=slope)
            if betas is not None and k in betas:
                lam = lam + betas[k]
    return lam, c, on_s


# --- optimised lower slopes (alpha-CROWN for the margins) --------------------------------------


# the slopes' Adam step and its decay a step (`optimise_alpha`): on the MNIST CNN's int8 copy
# (features r=10) 20 steps raise the open margins' root bounds as far as 200 steps of the
# momentum ascent normalised per margin that they replace (input 39: -9.2 -> -4.2 logits in
# all, against -4.5 after 200); steps of 0.1-0.5 do alike
ALPHA_LR = 0.3
ALPHA_LR_DECAY = 0.98


def optimise_alpha(
    spec: SpecChain,
    pre: list,
    lo,
    hi,
    steps: int,
    target: np.ndarray | float = 0.0,
    beta_lr: float = 0.2,
    split_signs: dict | None = None,
    cut: dict | None = None,
    margins: np.ndarray | None = None,
    start: dict | None = None,
):
    """Projected gradient ascent on per-margin ReLU lower slopes, intermediate bounds fixed.

    Any slope in [0, 1] gives a sound bound, so the best one seen is kept. The gradient is
    exact for the piecewise-linear back-substitution (the knapsack minimiser is fixed, Danskin).
    The slopes take Adam steps (`ALPHA_LR`, decayed by `ALPHA_LR_DECAY` a step, as
    alpha-CROWN's): each slope moves by its own gradient's scale. `beta_lr` is the betas' step.
    `split_signs` (Relu layer -> +1 / -1 / 0 per neuron: input >= 0 / <= 0 holds on every point
    of the sub-box, see `verifier.engine.relu_split`) adds one multiplier >= 0 per such constraint
    and
    margin (beta-CROWN): the bound minus beta * sign * input is a lower bound there.
    `margins`: the margins optimised (indices; None: all), each from its slopes in `start`
    (per ReLU layer, (K-1, n); None: the usual ones) on the neurons unstable here.
    Returns (lam, c, values, minimisers) of each margin's best bound seen, and the slopes
    that gave it (per ReLU layer, (m, n)), one row per margin optimised.
    """
    top = len(spec.layers)
    every = spec.layers[-1].weight.shape[0]
    rows = np.arange(every) if margins is None else np.asarray(margins)
    m, unit = len(rows), np.eye(every)[rows]
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), (every,))[rows]
    alphas = {}
    for k, layer in enumerate(spec.layers):
        if isinstance(layer, Relu):
            _, _, usual, unstable = layer.relax(*pre[k])
            given = np.broadcast_to(usual, (m, len(usual))) if start is None else start[k][rows]
            alphas[k] = np.where(unstable, given, usual)  # a stable neuron's line is exact
    moment = {k: np.zeros_like(a) for k, a in alphas.items()}  # Adam's first moments
    second = {k: np.zeros_like(a) for k, a in alphas.items()}  # and second
    signs = {k: v for k, v in (split_signs or {}).items() if np.any(v)}
    betas = {k: np.zeros((m, len(v))) for k, v in signs.items()}
    beta_moment = {k: np.zeros_like(b) for k, b in betas.items()}
    best = None
    for t in range(steps + 1):
        tape: list = []
        signed = {k: -signs[k] * b for k, b in betas.items()} if betas else None
        lam, c = _backsub(spec, pre, top, unit, np.zeros(m), alphas, tape, signed, cut)
        vals, argmin = spec.region.minimise(lam, c, lo, hi, argmin=True)
        if best is None:
            best = [lam, c, vals, argmin, {k: a.copy() for k, a in alphas.items()}]
        else:
            up = vals > best[2]
            for j, arr in enumerate((lam, c, vals, argmin)):
                best[j][up] = arr[up]
            for k, a in alphas.items():
                best[4][k][up] = a[up]
        if t == steps or np.all(best[2] > target):  # the last slopes' bound is taken
            break
        values: dict | None = {} if betas else None
        step = ALPHA_LR * ALPHA_LR_DECAY**t
        for k, gk in _alpha_grads(spec, pre, tape, argmin, alphas, values, cut).items():
            moment[k] = 0.9 * moment[k] + 0.1 * gk
            second[k] = 0.999 * second[k] + 0.001 * gk * gk
            rise = moment[k] / (1 - 0.9 ** (t + 1))  # bias-corrected
            scale = np.sqrt(second[k] / (1 - 0.999 ** (t + 1))) + 1e-12
            alphas[k] = np.clip(alphas[k] + step * rise / scale, 0.0, 1.0)
        for k in betas:
            beta_moment[k] = 0.5 * beta_moment[k] - signs[k] * values[k]
            scale = np.abs(beta_moment[k]).max(axis=1, keepdims=True) + 1e-12
            betas[k] = np.maximum(betas[k] + beta_lr * beta_moment[k] / scale, 0.0)
    return best[0], best[1], best[2], best[3], best[4]


def _alpha_grads(
    spec: SpecChain, pre: list, tape, argmin: np.ndarray, alphas: dict, values=None, cut=None
) -> dict:
    """Gradient of each row's bound w.r.t. its lower slopes, by reverse mode over the tape.

    `values` (a dict), when given, receives for each Relu layer k the gradient w.r.t. lam on
    its input (the relaxed input values at the minimiser): the gradient of `betas[k]`."""
    grad = argmin  # d bound / d lam at s-level (m, G)
    out = {}
    for k, lam_in in reversed(tape):  # from layer 0 back up to the query
        layer = spec.layers[k]
        if isinstance(layer, Affine):
            step = spec.input_error(k)
            if step is not None:  # the charge -|lam_in W| . step
                grad = grad - np.sign(left_times(lam_in, layer.weight)) * step
            grad = left_times(grad, layer.weight, transpose=True) + layer.bias
            if k == 0 and spec.first_input is not None:  # as `first_input_charge`
                w0, step0, per_neuron = spec.first_input
                exact = _exact_first_input(np.abs(lam_in) @ per_neuron)
                grad = grad - np.where(exact[:, None], 0.0, np.sign(lam_in) * per_neuron)
                if exact.any():
                    grad[exact] -= (np.sign(lam_in[exact] @ w0) * step0) @ w0.T
            if spec.err[k] is not None:
                grad = grad - np.sign(lam_in) * spec.err[k]
            if values is not None and k + 1 < len(spec.layers):
                values[k + 1] = grad
        else:
            if k in alphas:  # d bound / d slope: the input's value where the slope applies
                unstable = layer.relax(*pre[k])[3]
                out[k] = np.where((lam_in >= 0) & unstable, grad * lam_in, 0.0)
            grad = layer.relaxed_value(grad, lam_in, *pre[k], slope=alphas.get(k))
            k_cut = _cut_at(cut, k)
            if k_cut is not None:  # the cut's lines, at the minimisers
                grad = np.where((lam_in < 0) & k_cut.mask, k_cut.lines(argmin), grad)
    return out


def relu_pre_bounds(bounds: Bounds, spec: SpecChain) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds of each Relu in chain order (what the SMT encoding takes)."""
    return [bounds.pre[i] for i, layer in enumerate(spec.layers) if isinstance(layer, Relu)]
