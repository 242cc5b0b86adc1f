"""The network as a list of layers with weights, and its lowering to an affine/ReLU chain.

`Network` is what the ONNX importer produces: per-sample shapes, layers in order, a numpy
forward pass (float64, batched) that mirrors the runtime. `Network.lower()` turns it into the
form the verification engine works on: flat vectors, `Affine` maps (convolutions, pools that are
linear, reshapes and transposes all folded into matrices) separated by `Relu` and `MaxPool`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# --- layers as imported (per-sample shapes, no batch axis) ------------------------------------


@dataclass(frozen=True)
class Dense:
    """y = W x + b on the last axis; W is (out, in)."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class Conv:
    """2-D convolution on (C, H, W); weight (O, C/group, kh, kw); pads (top, left, bottom, right)"""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1


@dataclass(frozen=True)
class Elementwise:
    """y = x * scale + shift, both broadcast against the per-sample shape (BatchNorm, Mul, Add)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class Relu:
    """max(x, 0)."""


@dataclass(frozen=True)
class Reshape:
    """Change the per-sample shape (Flatten, Reshape); C-order, like ONNX."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Transpose:
    """Permute the per-sample axes (the batch axis excluded)."""

    perm: tuple[int, ...]


@dataclass(frozen=True)
class Pool:
    """Max or average pooling on (C, H, W); pads (top, left, bottom, right)."""

    kind: str  # "max" or "avg"
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    count_include_pad: bool = False


Layer = Dense | Conv | Elementwise | Relu | Reshape | Transpose | Pool


@dataclass(frozen=True)
class Network:
    """Layers from the model input to the logits; `output_softmax` notes a dropped final Softmax."""

    input_shape: tuple[int, ...]
    layers: list[Layer]
    output_softmax: bool = False
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # per-sample shape after each

    @property
    def num_classes(self) -> int:
        return int(np.prod(self.shapes[-1])) if self.shapes else int(np.prod(self.input_shape))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) in float64 for a batch shaped (N, *input_shape)."""
        a = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            a = apply_layer(layer, a)
        return a.reshape(len(a), -1)

    def lower(self) -> list[LoweredLayer]:
        """The flat affine/ReLU/max-pool chain the engine verifies (see `lower`), computed once
        per network."""
        return self._lowered

    @cached_property
    def _lowered(self) -> list[LoweredLayer]:
        return lower(self)


def apply_layer(layer: Layer, a: np.ndarray) -> np.ndarray:
    """One layer on a batch (N, *shape) in numpy."""
    if isinstance(layer, Dense):
        return a @ layer.weight.T + layer.bias
    if isinstance(layer, Conv):
        return conv2d(a, layer)
    if isinstance(layer, Elementwise):
        return a * layer.scale + layer.shift
    if isinstance(layer, Relu):
        return np.maximum(a, 0.0)
    if isinstance(layer, Reshape):
        return a.reshape((len(a), *layer.shape))
    if isinstance(layer, Transpose):
        return a.transpose((0, *[p + 1 for p in layer.perm]))
    if isinstance(layer, Pool):
        return pool2d(a, layer)
    raise TypeError(f"unknown layer {layer!r}")


def conv2d(a: np.ndarray, layer: Conv) -> np.ndarray:
    """Grouped, strided, dilated, padded 2-D convolution of a (N, C, H, W) batch."""
    w = layer.weight.astype(np.float64)
    t, left, b, r = layer.pads
    a = np.pad(a, ((0, 0), (0, 0), (t, b), (left, r)))
    o, cg, kh, kw = w.shape
    dh, dw = layer.dilations
    sh, sw = layer.strides
    win = np.lib.stride_tricks.sliding_window_view(
        a, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (2, 3)
    )
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, OH, OW, kh, kw)
    g = layer.group
    og = o // g
    outs = [
        np.einsum("nchwij,ocij->nohw", win[:, k * cg : (k + 1) * cg], w[k * og : (k + 1) * og])
        for k in range(g)
    ]
    out = outs[0] if g == 1 else np.concatenate(outs, axis=1)
    return out + layer.bias.reshape(1, -1, 1, 1)


def pool2d(a: np.ndarray, layer: Pool) -> np.ndarray:
    """Max / average pooling of a (N, C, H, W) batch, ONNX semantics (floor output size)."""
    t, left, b, r = layer.pads
    fill = -np.inf if layer.kind == "max" else 0.0
    padded = np.pad(a, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=fill)
    kh, kw = layer.kernel
    sh, sw = layer.strides
    win = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), (2, 3))[:, :, ::sh, ::sw]
    if layer.kind == "max":
        return win.max(axis=(-2, -1))
    total = win.sum(axis=(-2, -1))
    if layer.count_include_pad or not any(layer.pads):
        return total / (kh * kw)
    ones = np.pad(np.ones((1, 1) + a.shape[2:]), ((0, 0), (0, 0), (t, b), (left, r)))
    counts = np.lib.stride_tricks.sliding_window_view(ones, (kh, kw), (2, 3))[:, :, ::sh, ::sw]
    return total / counts.sum(axis=(-2, -1))


# --- the lowered chain ------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """y = W x + b on flat vectors; W is (out, in) float64."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class MaxPool:
    """y_j = max_k x[windows[j, k]]; entries of -1 are padding (ignored)."""

    windows: np.ndarray  # (out, k) int64


LoweredLayer = Affine | Relu | MaxPool


def _is_linear(layer: Layer) -> bool:
    return not isinstance(layer, Relu) and not (isinstance(layer, Pool) and layer.kind == "max")


def _linear_map(layers: list[Layer], in_shape: tuple[int, ...]) -> Affine:
    """The affine map of a run of linear layers, found by pushing a basis through them."""
    n = int(np.prod(in_shape))
    zero = np.zeros((1, *in_shape))
    basis = np.eye(n).reshape((n, *in_shape))
    b = zero
    for layer in layers:
        b = apply_layer(layer, b)
    bias = b.reshape(-1)
    # columns are images of basis vectors minus the bias; do it in chunks to bound memory
    cols = []
    for start in range(0, n, 1024):
        a = basis[start : start + 1024]
        for layer in layers:
            a = apply_layer(layer, a)
        cols.append(a.reshape(len(a), -1) - bias)
    return Affine(np.concatenate(cols).T.copy(), bias.copy())


def _maxpool_windows(layer: Pool, in_shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = in_shape
    idx = np.arange(c * h * w, dtype=np.float64).reshape(1, c, h, w)
    t, left, b, r = layer.pads
    padded = np.pad(idx, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=-1)
    kh, kw = layer.kernel
    sh, sw = layer.strides
    win = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), (2, 3))[:, :, ::sh, ::sw]
    return win.reshape(-1, kh * kw).astype(np.int64)


def lower(net: Network) -> list[LoweredLayer]:
    """Fold every run of linear layers into one `Affine`; keep `Relu` and max pools."""
    out: list[LoweredLayer] = []
    run: list[Layer] = []
    shapes = [net.input_shape, *net.shapes]
    run_start = net.input_shape
    for i, layer in enumerate(net.layers):
        if _is_linear(layer):
            if not run:
                run_start = shapes[i]
            run.append(layer)
            continue
        if run:
            out.append(_fold(run, run_start))
            run = []
        out.append(
            Relu() if isinstance(layer, Relu) else MaxPool(_maxpool_windows(layer, shapes[i]))
        )
    if run:
        out.append(_fold(run, run_start))
    # C-contiguous weights: BLAS is several times slower on the transposed views ONNX gives
    return [
        Affine(np.ascontiguousarray(x.weight), np.ascontiguousarray(x.bias))
        if isinstance(x, Affine)
        else x
        for x in out
    ]


def _fold(run: list[Layer], in_shape: tuple[int, ...]) -> Affine:
    if len(run) == 1 and isinstance(run[0], Dense) and len(in_shape) == 1:
        return Affine(run[0].weight.astype(np.float64), run[0].bias.astype(np.float64))
    if all(isinstance(x, Dense) for x in run) and len(in_shape) == 1:
        w, b = run[0].weight.astype(np.float64), run[0].bias.astype(np.float64)
        for d in run[1:]:
            w, b = d.weight @ w, d.weight @ b + d.bias
        return Affine(w, b)
    return _linear_map(run, in_shape)


def forward_lowered(chain: list[LoweredLayer], x: np.ndarray) -> np.ndarray:
    """Evaluate the lowered chain on flat inputs (N, n) in float64."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for layer in chain:
        if isinstance(layer, Affine):
            a = a @ layer.weight.T + layer.bias
        elif isinstance(layer, Relu):
            a = np.maximum(a, 0.0)
        else:
            padded = np.concatenate([a, np.full((len(a), 1), -np.inf)], axis=1)
            a = padded[:, layer.windows].max(axis=2)
    return a
