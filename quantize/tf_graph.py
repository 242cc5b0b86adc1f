"""The engine's `Network` rebuilt as a TensorFlow function, the input of the TFLite converter.

Chosen over an ONNX-to-TensorFlow converter (onnx2tf, onnx-tf): the layer list is what the
engine verifies, so the TFLite file computes the same layers by construction; it needs a dozen
tf ops (matmul, conv2d, pools, relu, reshape, transpose) instead of a heavy, version-fragile
dependency; and it keeps convolutions in TFLite's native NHWC. Transposes are not emitted as
ops: the builder tracks how the stored tensor's axes map to the logical (ONNX) axes and only
materialises a transpose where a reshape needs C order, so the tf2onnx NHWC -> NCHW -> NHWC
pattern of Keras models costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from verifier.engine.network import (
    Conv,
    Dense,
    Elementwise,
    Network,
    Pool,
    Relu,
    Reshape,
    Transpose,
)
from verifier.errors import UnsupportedModelError


def import_tensorflow() -> Any:
    """TensorFlow, imported on first use (it takes seconds) with its start-up logging silenced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    return tf


def check_supported(net: Network) -> None:
    """Raise UnsupportedModelError naming every layer the TF builder cannot express."""
    problems = []
    shapes = [net.input_shape, *net.shapes]
    for i, layer in enumerate(net.layers):
        why = _unsupported_reason(layer, shapes[i] if i < len(shapes) else None)
        if why:
            problems.append(f"layer {i} ({type(layer).__name__}): {why}")
    if problems:
        raise UnsupportedModelError(
            "the TFLite converter cannot handle this network: " + "; ".join(problems)
        )


def _unsupported_reason(layer: object, shape: tuple[int, ...] | None) -> str | None:
    if isinstance(layer, (Dense, Elementwise, Relu, Reshape, Transpose)):
        return None
    if isinstance(layer, Conv):
        return None if len(layer.weight.shape) == 4 else "not a 2-D convolution"
    if isinstance(layer, Pool):
        if layer.kind not in ("max", "avg"):
            return f"pool kind {layer.kind!r}"
        exact = layer.kind == "avg" and layer.count_include_pad  # zero pads counted: tf.pad
        same = shape is not None and layer.pads == same_pads(
            shape[1:], layer.kernel, layer.strides, (1, 1)
        )
        if any(layer.pads) and not exact and not same:
            return f"{layer.kind} pool pads {layer.pads} are neither zero nor TF 'SAME'"
        return None
    return "no TensorFlow equivalent"


def same_pads(
    hw: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...], dil: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """TensorFlow's 'SAME' padding as ONNX pads (top, left, bottom, right)."""
    pads = []
    for size, k, s, d in zip(hw, kernel, strides, dil, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        pads.append((total // 2, total - total // 2))
    return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])


def build_tf_function(net: Network) -> tuple[Any, Any]:
    """A concrete tf.function computing `net` on (None, *input_shape), and its owning module."""
    check_supported(net)
    tf = import_tensorflow()
    module = tf.Module()
    module.ops = _make_ops(net, tf)  # constants are captured by the function

    @tf.function(input_signature=[tf.TensorSpec((None, *net.input_shape), tf.float32, "input")])
    def forward(x: Any) -> Any:
        return _forward(net, module.ops, x, tf)

    return forward.get_concrete_function(), module


def _make_ops(net: Network, tf: Any) -> list[Any]:
    """tf constants per layer (weights in TF's layouts), built once outside the trace."""
    ops = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            ops.append((_const(tf, layer.weight.T), _const(tf, layer.bias)))
        elif isinstance(layer, Conv):
            ops.append((_const(tf, layer.weight.transpose(2, 3, 1, 0)), _const(tf, layer.bias)))
        else:
            ops.append(None)
    return ops


def _const(tf: Any, a: np.ndarray) -> Any:
    return tf.constant(np.asarray(a, dtype=np.float32))


def _forward(net: Network, ops: list[Any], x: Any, tf: Any) -> Any:
    """Trace the layers; `perm` maps logical per-sample axes to the stored tensor's axes."""
    perm = tuple(range(len(net.input_shape)))
    for layer, op in zip(net.layers, ops, strict=True):
        if isinstance(layer, Transpose):
            perm = tuple(perm[q] for q in layer.perm)
        elif isinstance(layer, Reshape):
            x = tf.reshape(_materialise(tf, x, perm), (-1, *layer.shape))
            perm = tuple(range(len(layer.shape)))
        elif isinstance(layer, Dense):
            x = tf.matmul(x, op[0]) + op[1]
        elif isinstance(layer, Relu):
            x = tf.nn.relu(x)
        elif isinstance(layer, Elementwise):
            x = _elementwise(tf, x, layer, perm)
        else:  # Conv or Pool: logical (C, H, W) stored as (H, W, C)
            x = _materialise(tf, x, tuple(perm[q] for q in (1, 2, 0)))
            hw = tuple(int(d) for d in x.shape[1:3])
            x = _conv(tf, x, layer, op, hw) if isinstance(layer, Conv) else _pool(tf, x, layer, hw)
            perm = (2, 0, 1)
    if len(perm) > 1:
        x = tf.reshape(_materialise(tf, x, perm), (-1, int(np.prod(net.shapes[-1]))))
    return tf.nn.softmax(x) if net.output_softmax else x


def _materialise(tf: Any, x: Any, perm: tuple[int, ...]) -> Any:
    """Transpose the stored tensor so that its axes are the logical ones (no-op if already)."""
    if perm == tuple(range(len(perm))):
        return x
    return tf.transpose(x, (0, *[p + 1 for p in perm]))


def _elementwise(tf: Any, x: Any, layer: Elementwise, perm: tuple[int, ...]) -> Any:
    """x * scale + shift with the constants permuted into the stored axis order."""
    inv = tuple(int(i) for i in np.argsort(perm))
    for name, neutral in (("scale", 1.0), ("shift", 0.0)):
        c = np.asarray(getattr(layer, name), dtype=np.float64)
        if np.all(c == neutral):
            continue
        c = c.reshape((1,) * (len(perm) - c.ndim) + c.shape).transpose(inv)
        x = x * _const(tf, c) if name == "scale" else x + _const(tf, c)
    return x


def _conv(tf: Any, x: Any, layer: Conv, op: Any, hw: tuple[int, int]) -> Any:
    """NHWC convolution; 'SAME'/'VALID' padding when the pads match, else an explicit Pad."""
    kernel, bias = op
    kh, kw = layer.weight.shape[2:]
    padding = _padding(tf, layer.pads, hw, (kh, kw), layer.strides, layer.dilations)
    if not isinstance(padding, str):
        x, padding = tf.pad(x, padding), "VALID"
    o, cg = layer.weight.shape[:2]
    g = layer.group
    if g == 1:
        y = tf.nn.conv2d(x, kernel, layer.strides, padding, dilations=layer.dilations)
    elif cg == 1 and o % g == 0:  # depthwise: (kh, kw, 1, O) -> (kh, kw, C, O / C)
        dw = tf.reshape(kernel, (kh, kw, g, o // g))
        y = tf.nn.depthwise_conv2d(
            x, dw, (1, *layer.strides, 1), padding, dilations=layer.dilations
        )
    else:
        og = o // g
        parts = tf.split(x, g, axis=3)
        y = tf.concat(
            [
                tf.nn.conv2d(
                    parts[k],
                    kernel[..., k * og : (k + 1) * og],
                    layer.strides,
                    padding,
                    dilations=layer.dilations,
                )
                for k in range(g)
            ],
            axis=3,
        )
    return y + bias


def _pool(tf: Any, x: Any, layer: Pool, hw: tuple[int, int]) -> Any:
    """NHWC max / average pool; zero pads counted in the mean are made explicit."""
    padding = _padding(tf, layer.pads, hw, layer.kernel, layer.strides, (1, 1))
    if layer.kind == "max":
        return tf.nn.max_pool2d(x, layer.kernel, layer.strides, padding)
    if any(layer.pads) and layer.count_include_pad:
        t, left, b, r = layer.pads
        x, padding = tf.pad(x, [[0, 0], [t, b], [left, r], [0, 0]]), "VALID"
    return tf.nn.avg_pool2d(x, layer.kernel, layer.strides, padding)


def _padding(tf: Any, pads, hw, kernel, strides, dil) -> Any:
    if not any(pads):
        return "VALID"
    if tuple(pads) == same_pads(hw, kernel, strides, dil):
        return "SAME"
    t, left, b, r = pads
    return tf.constant([[0, 0], [t, b], [left, r], [0, 0]])
