"""The network as a list of layers with weights, and its lowering to an affine/ReLU chain.

`Network` is what the ONNX importer produces: per-sample shapes, layers in order, a numpy
forward pass (float64, batched) that mirrors the runtime. `Network.lower()` turns it into the
form the verification engine works on: flat vectors, `Affine` maps (convolutions, pools that are
linear, reshapes and transposes all folded into matrices) separated by `Relu` and `MaxPool`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

# --- layers as imported (per-sample shapes, no batch axis) ------------------------------------


@dataclass(frozen=True)
class Dense:
    """y = W x + b on the last axis; W is (out, in)."""

    weight: np.ndarray
    bias: np.ndarray
    linear = True

    def forward(self, a: np.ndarray) -> np.ndarray:
        return a @ self.weight.T + self.bias


@dataclass(frozen=True)
class Conv:
    """2-D convolution on (C, H, W); weight (O, C/group, kh, kw); pads (top, left, bottom, right)"""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    linear = True

    def forward(self, a: np.ndarray) -> np.ndarray:
        return conv2d(a, self)


@dataclass(frozen=True)
class Elementwise:
    """y = x * scale + shift, both broadcast against the per-sample shape (BatchNorm, Mul, Add)."""

    scale: np.ndarray
    shift: np.ndarray
    linear = True

    def forward(self, a: np.ndarray) -> np.ndarray:
        return a * self.scale + self.shift


@dataclass(frozen=True)
class Relu:
    """max(x, 0): an imported layer and a nonlinear operator of the lowered chain (`Nonlinear`)."""

    linear = False

    def lowered(self, in_shape: tuple[int, ...]) -> Relu:
        return self

    def forward(self, a: np.ndarray) -> np.ndarray:
        return np.maximum(a, 0.0)

    def backward(self, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        return g * (a > 0)

    def interval(self, lo: np.ndarray, hi: np.ndarray):
        return np.maximum(lo, 0.0), np.maximum(hi, 0.0)

    def relax(self, lo: np.ndarray, hi: np.ndarray):
        """Upper line (slope, intercept), default lower slope (0 or 1, whichever is closer)
        and the unstable mask of ReLU over [lo, hi]. An input known exactly (lo == hi: a
        quantized value with one lattice point left, `bounds.snap`) is a constant: slopes 0,
        its output the intercept of both lines (`lower_intercept`)."""
        fixed = lo == hi
        active = (lo >= 0) & ~fixed
        unstable = (lo < 0) & (hi > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            su = np.where(unstable, hi / np.where(unstable, hi - lo, 1.0), active.astype(float))
        iu = np.where(unstable, -su * lo, self.lower_intercept(lo, hi))
        alpha = np.where(unstable, (hi > -lo).astype(np.float64), active.astype(np.float64))
        return su, iu, alpha, unstable

    def lower_intercept(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The lower line's intercept: the output of a constant input (lo == hi), else 0."""
        return np.where(lo == hi, np.maximum(hi, 0.0), 0.0)

    def back_step(self, lam, c, lo, hi, slope=None):
        su, iu, alpha, _ = self.relax(lo, hi)
        alpha = alpha if slope is None else slope
        pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        il = self.lower_intercept(lo, hi)
        if il.any():
            c = c + pos @ il
        return pos * alpha + neg * su, c + neg @ iu

    def relaxed_value(self, v, lam, lo, hi, slope=None):
        su, iu, alpha, _ = self.relax(lo, hi)
        alpha = alpha if slope is None else slope
        return np.where(lam >= 0, v * alpha + self.lower_intercept(lo, hi), v * su + iu)

    def encode(self, enc, forms, lo, hi, tag: str):
        return enc.relu(forms, lo, hi, tag)


@dataclass(frozen=True)
class Reshape:
    """Change the per-sample shape (Flatten, Reshape); C-order, like ONNX."""

    shape: tuple[int, ...]
    linear = True

    def forward(self, a: np.ndarray) -> np.ndarray:
        return a.reshape((len(a), *self.shape))


@dataclass(frozen=True)
class Transpose:
    """Permute the per-sample axes (the batch axis excluded)."""

    perm: tuple[int, ...]
    linear = True

    def forward(self, a: np.ndarray) -> np.ndarray:
        return a.transpose((0, *[p + 1 for p in self.perm]))


@dataclass(frozen=True)
class Pool:
    """Max or average pooling on (C, H, W); pads (top, left, bottom, right)."""

    kind: str  # "max" or "avg"
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    count_include_pad: bool = False

    @property
    def linear(self) -> bool:
        return self.kind != "max"

    def forward(self, a: np.ndarray) -> np.ndarray:
        return pool2d(a, self)

    def lowered(self, in_shape: tuple[int, ...]) -> MaxPool:
        return MaxPool(_maxpool_windows(self, in_shape))


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
            a = layer.forward(a)
        return a.reshape(len(a), -1)

    def lower(self) -> list[LoweredLayer]:
        """The flat affine/ReLU/max-pool chain the engine verifies (see `lower`), computed once
        per network."""
        return self._lowered

    @cached_property
    def _lowered(self) -> list[LoweredLayer]:
        return lower(self)


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


class Nonlinear(Protocol):
    """What the engine needs of a nonlinear operator between two `Affine` maps (`Relu`,
    `MaxPool`): a new operator is one such class plus one importer handler. Bounds are over
    boxes [lo, hi] of its inputs; `lam` are linear coefficients on its outputs (rows). Imported
    layers have `linear` and `forward`; a nonlinear one also `lowered(in_shape)`, its
    `Nonlinear` on flat vectors."""

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Outputs for a batch of inputs (N, n)."""

    def backward(self, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Gradient rows `g` on the outputs pulled back to the inputs, at inputs `a` (1, n)."""

    def interval(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interval image of the box."""

    def back_step(self, lam, c, lo, hi, slope=None) -> tuple[np.ndarray, np.ndarray]:
        """Back-substitution: `lam . out + c >= lam' . in + c'` on the box; (lam', c')."""

    def relaxed_value(self, v, lam, lo, hi, slope=None) -> np.ndarray:
        """The linear relaxation `back_step` used, evaluated at inputs `v` (rows as `lam`)."""

    def encode(self, enc, forms, lo, hi, tag: str):
        """The exact operator in z3 (`verifier.engine.smt`'s encoder)."""


@dataclass(frozen=True)
class Affine:
    """y = W x + b on flat vectors; W is (out, in) float64. Every linear layer folds into one."""

    weight: np.ndarray
    bias: np.ndarray

    def forward(self, a: np.ndarray) -> np.ndarray:
        return a @ self.weight.T + self.bias

    def backward(self, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        return g @ self.weight

    def interval(self, lo: np.ndarray, hi: np.ndarray, absw: np.ndarray | None = None):
        mid, rad = (lo + hi) / 2.0, (hi - lo) / 2.0
        absw = np.abs(self.weight) if absw is None else absw
        c, r = self.weight @ mid + self.bias, absw @ rad
        return c - r, c + r

    def back_step(self, lam, c, lo=None, hi=None, slope=None):
        return lam @ self.weight, c + lam @ self.bias


@dataclass(frozen=True)
class MaxPool:
    """y_j = max_k x[windows[j, k]]; entries of -1 are padding (ignored)."""

    windows: np.ndarray  # (out, k) int64

    def forward(self, a: np.ndarray) -> np.ndarray:
        padded = np.concatenate([a, np.full((len(a), 1), -np.inf)], axis=1)
        return padded[:, self.windows].max(axis=2)

    def backward(self, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        padded = np.concatenate([a[0], [-np.inf]])
        arg = self.windows[np.arange(len(self.windows)), padded[self.windows].argmax(axis=1)]
        return scatter_cols(g, arg, a.shape[1])

    def interval(self, lo: np.ndarray, hi: np.ndarray):
        return self.window_max(lo), self.window_max(hi)

    def window_max(self, v: np.ndarray) -> np.ndarray:
        """Max over each window of a vector (padding ignored)."""
        return np.concatenate([v, [-np.inf]])[self.windows].max(axis=1)

    def relax(self, lo: np.ndarray, hi: np.ndarray):
        """Lower by the input with the largest lower bound (`arg`); upper exact where that input
        dominates its window (`dominated`), else the window's largest upper bound (`umax`)."""
        lp = np.concatenate([lo, [-np.inf]])
        up = np.concatenate([hi, [-np.inf]])
        w = self.windows
        arg = w[np.arange(len(w)), lp[w].argmax(axis=1)]
        others = np.where(w == arg[:, None], -1, w)
        dominated = lp[arg] >= up[others].max(axis=1)
        return arg, dominated, up[w].max(axis=1)

    def back_step(self, lam, c, lo, hi, slope=None):
        arg, dom, umax = self.relax(lo, hi)
        pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        return scatter_cols(pos + neg * dom, arg, len(lo)), c + (neg * ~dom) @ umax

    def relaxed_value(self, v, lam, lo, hi, slope=None):
        arg, dom, umax = self.relax(lo, hi)
        return np.where((lam >= 0) | dom, v[:, arg], umax)

    def encode(self, enc, forms, lo, hi, tag: str):
        return enc.maxpool(self, forms, lo, hi, tag)


def scatter_cols(vals: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """(m, n) matrix with vals[:, j] added to column cols[j]."""
    out = np.zeros((vals.shape[0], n))
    np.add.at(out.T, cols, vals.T)
    return out


LoweredLayer = Affine | Relu | MaxPool


def _linear_map(layers: list[Layer], in_shape: tuple[int, ...]) -> Affine:
    """The affine map of a run of linear layers, found by pushing a basis through them."""
    n = int(np.prod(in_shape))
    zero = np.zeros((1, *in_shape))
    basis = np.eye(n).reshape((n, *in_shape))
    b = zero
    for layer in layers:
        b = layer.forward(b)
    bias = b.reshape(-1)
    # columns are images of basis vectors minus the bias; do it in chunks to bound memory
    cols = []
    for start in range(0, n, 1024):
        a = basis[start : start + 1024]
        for layer in layers:
            a = layer.forward(a)
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
        if layer.linear:
            if not run:
                run_start = shapes[i]
            run.append(layer)
            continue
        if run:
            out.append(_fold(run, run_start))
            run = []
        out.append(layer.lowered(shapes[i]))
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
        a = layer.forward(a)
    return a


def jacobian(chain: list[LoweredLayer], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outputs (m,) and Jacobian (m, n) of the lowered chain at one flat input `x`."""
    a = np.asarray(x, dtype=np.float64).reshape(1, -1)
    inputs = []
    for layer in chain:
        inputs.append(a)
        a = layer.forward(a)
    jac = np.eye(a.shape[1])
    for layer, a_in in zip(reversed(chain), reversed(inputs), strict=True):
        jac = layer.backward(jac, a_in)
    return a[0], jac
