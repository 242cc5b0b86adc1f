"""A quantized graph's layers plus where the runtime rounds, lowered to the engine's chain.

Mappers of quantized files (ONNX, TFLite) produce `verifier.engine.network` layers with the
file's own
(dequantized) weights and `Mark`s: "after layer p, the running tensor is rounded" to a fixed
grid or by a run-time (dynamic) quantization. `lower_marked` folds the layers into the chain
`Network.lower` builds and attaches every mark to the Affine layer whose input or output it
rounds, as an `Event` in that Affine's own input or output units: a mark between a weighted
layer and the run's end is carried through the element-wise layers after it (reshapes,
transposes, per-channel scale and shift), one before it through those before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantize.rounding import Event, Grid, PairSums, Rounding
from verifier.engine.network import (
    Affine,
    Conv,
    Dense,
    Elementwise,
    Layer,
    LoweredLayer,
    Network,
    Pool,
    Relu,
    Reshape,
    Transpose,
    lower,
)
from verifier.errors import UnsupportedModelError


@dataclass(frozen=True)
class Mark:
    """The running tensor is rounded after `position` layers: to `grid`, or dynamically (None:
    asymmetric, `levels` steps over [min(v, 0), max(v, 0)] of the whole tensor)."""

    position: int
    grid: Grid | None
    levels: int = 255
    extra: float = 0.0  # further error in steps (a fixed-point multiplier's own rounding)


@dataclass(frozen=True)
class PairMark:
    """Layer `layer` runs as an integer kernel with int16 pair sums: its weight scale per
    output value (flat), its integer input's grid (None: dynamic), unsigned offset, and whether
    the kernel is seen to take that input as uint8."""

    layer: int
    weight_scale: np.ndarray
    grid: Grid | None
    offset: float
    unsigned: bool = False  # the kernel runs on uint8 (`PairSums.unsigned`)


def structural(layer: Layer) -> bool:
    """Layers that move grid values without changing them (a rounded tensor stays rounded)."""
    return isinstance(layer, (Reshape, Transpose, Relu)) or (
        isinstance(layer, Pool) and layer.kind == "max"
    )


def _monomial(layer: Layer) -> bool:
    """Layers after which each value is an affine function of exactly one input value."""
    if isinstance(layer, Elementwise):
        return bool(np.all(np.asarray(layer.scale) != 0))
    return isinstance(layer, (Reshape, Transpose))


def _shapes(input_shape: tuple[int, ...], layers: list[Layer]) -> list[tuple[int, ...]]:
    out, shape = [], input_shape
    for layer in layers:
        shape = tuple(layer.forward(np.zeros((1, *shape))).shape[1:])
        out.append(shape)
    return out


def _gain_shift(layers: list[Layer], shape: tuple[int, ...]):
    """For element-wise layers v = f(t) on t of `shape`: per t element (flat), v's gain and
    shift (v = gain * t + shift) at the position t maps to."""
    n = int(np.prod(shape))
    zero, one = np.zeros((1, *shape)), np.ones((1, *shape))
    idx = np.arange(n, dtype=np.float64).reshape((1, *shape))
    for layer in layers:
        zero, one = layer.forward(zero), layer.forward(one)
        if not isinstance(layer, Elementwise):
            idx = layer.forward(idx)
    perm = idx.reshape(-1).astype(np.int64)  # v element j holds t element perm[j]
    gain, shift = np.empty(n), np.empty(n)
    gain[perm] = (one - zero).reshape(-1)
    shift[perm] = zero.reshape(-1)
    return gain, shift, perm


def lower_marked(
    input_shape: tuple[int, ...],
    layers: list[Layer],
    marks: list[Mark],
    pairs: list[PairMark] = (),
) -> tuple[list[LoweredLayer], list]:
    """The lowered chain and, per chain layer, its `Rounding` (Affine) or None.

    Raises UnsupportedModelError for a rounding between two weighted layers with no activation
    between them, or one after the last weighted layer that no Affine can carry.
    """
    shapes = [input_shape, *_shapes(input_shape, layers)]
    chain = lower(Network(input_shape, layers, shapes=shapes[1:]))
    runs: list[tuple[int, int]] = []  # (first layer, one past the last) of each linear run
    start = None
    for i, layer in enumerate([*layers, None]):
        linear = layer is not None and not (
            isinstance(layer, Relu) or (isinstance(layer, Pool) and layer.kind == "max")
        )
        if linear and start is None:
            start = i
        elif not linear and start is not None:
            runs.append((start, i))
            start = None
    affine_at = [k for k, x in enumerate(chain) if isinstance(x, Affine)]
    assert len(affine_at) == len(runs), "one Affine per linear run"
    ins: list[list[Event]] = [[] for _ in runs]
    outs: list[list[Event]] = [[] for _ in runs]
    for mark in sorted(marks, key=lambda m: m.position):
        p = mark.position
        k = next((j for j, (a, b) in enumerate(runs) if a <= p <= b), None)
        if k is None or (p == runs[k][1] and not _weighted(layers, *runs[k])):
            # between non-linear layers (rounding commutes with ReLU and max): the next run's
            k = next((j for j, (a, _) in enumerate(runs) if a >= p), None)
            if k is None:
                raise UnsupportedModelError("a rounding after the last weighted layer")
            p = runs[k][0]
        a, b = runs[k]
        before, after = layers[a:p], layers[p:b]
        if all(_monomial(x) for x in before):
            gain, shift, _ = _gain_shift(before, shapes[a])
            ins[k].append(Event(gain, shift, mark.grid, mark.levels, mark.extra))
        elif all(_monomial(x) for x in after):
            g, s, perm = _gain_shift(after, shapes[p])  # y = g v + s, indexed by v
            g, s = g[perm], s[perm]  # indexed by y
            if np.any(g == 0):
                raise UnsupportedModelError("a rounding scaled by zero")
            outs[k].append(Event(1.0 / g, -s / g, mark.grid, mark.levels, mark.extra))
        else:
            raise UnsupportedModelError(
                "a rounding between two weighted layers with no activation between them"
            )
    sums: list = [None] * len(runs)
    for pm in pairs:
        k = next(j for j, (a, b) in enumerate(runs) if a <= pm.layer < b)
        a, b = runs[k]
        before, after = layers[a : pm.layer], layers[pm.layer + 1 : b]
        if not all(_monomial(x) for x in [*before, *after]):
            raise UnsupportedModelError("an integer kernel folded with another weighted layer")
        gain, shift, order = _gain_shift(before, shapes[a])
        g, _, perm = _gain_shift(after, shapes[pm.layer + 1])
        unit = (np.abs(g) * np.broadcast_to(pm.weight_scale, g.shape))[perm]
        # the kernel's K order on the Affine's inputs (the Transpose / Reshape layers before it
        # hold input order[j] at j), per output value in the Affine's row order for a window
        kernel = _kernel_order(layers[pm.layer], shapes[pm.layer], shapes[pm.layer + 1])
        if kernel is not None:
            kernel = order[kernel if kernel.ndim == 1 else kernel[perm]]
            if np.array_equal(kernel, np.arange(len(order))):
                kernel = np.arange(0)  # the Affine's own order
        known = None if kernel is None or not kernel.size else kernel
        sums[k] = PairSums(
            unit, gain, shift, pm.grid, pm.offset, kernel is not None, known, unsigned=pm.unsigned
        )
    rounding: list = [None] * len(chain)
    for k, at in enumerate(affine_at):
        rounding[at] = Rounding(inputs=tuple(ins[k]), outputs=tuple(outs[k]), pairs=sums[k])
    return chain, rounding


def _kernel_order(layer: Layer, shape_in: tuple, shape_out: tuple) -> np.ndarray | None:
    """The input (flat index into `shape_in`) an integer kernel reads at each K position: a
    Dense reads its input in order; a convolution (ONNX Runtime's QLinearConv, as measured)
    reads each output value's window as (kh, kw, c), one row per output value (flat in
    `shape_out`). None when not known: a grouped, padded or dilated convolution."""
    if isinstance(layer, Dense):
        return np.arange(int(np.prod(shape_in)))
    if not isinstance(layer, Conv) or layer.group != 1 or any(layer.pads):
        return None
    if tuple(layer.dilations) != (1, 1) or len(shape_in) != 3:
        return None
    c, h, w = shape_in
    _, oh, ow = shape_out
    _, _, kh, kw = layer.weight.shape
    sh, sw = layer.strides
    ky, kx, kc = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(c), indexing="ij")
    window = (kc * h * w + ky * w + kx).reshape(-1)  # (kh, kw, c) order, at output (0, 0)
    y, x = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    at = (y * sh * w + x * sw).reshape(-1)  # each output position's window corner
    rows = at[:, None] + window[None, :]  # (oh * ow, K)
    return np.tile(rows, (layer.weight.shape[0], 1))  # every output channel, (o, y, x) order


def _weighted(layers: list[Layer], a: int, b: int) -> bool:
    return any(not _monomial(x) for x in layers[a:b])
