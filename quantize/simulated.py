"""Simulated n-bit (2-8) uniform quantization as a float ONNX graph, for bit-width sweeps.

Weights: the initializers of Gemm / MatMul / Conv are replaced by their fake-quantized values
(symmetric, per tensor or per output channel, levels -(2^(b-1)-1) .. 2^(b-1)-1). Activations:
the input of every such layer passes through Div -> Round -> Clip -> Mul with a scale
calibrated by min/max on the calibration set. Plain float ops, because onnxruntime's
QuantizeLinear / DequantizeLinear only take 8- and 16-bit (and 4-bit in recent opsets) types;
these run correctly for any width. Activation zero points are 0: a tensor that is never negative
on the calibration set (after a ReLU, the input image) uses the unsigned levels 0 .. 2^b-1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantize.runner import scale_entry
from verifier.engine.onnx_import import optimised_by_ort
from verifier.errors import InputError, UnsupportedModelError

WEIGHT_OPS = ("Gemm", "MatMul", "Conv")
MIN_OPSET = 11  # Round, and Clip with min / max inputs


def fake_quantize(
    w: np.ndarray, bits: int, axis: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fake quantization of `w`, per tensor or per slice along `axis`; and its scales."""
    qmax = 2 ** (bits - 1) - 1
    a = np.abs(w.astype(np.float64))
    if axis is None:
        m = np.array(a.max() if a.size else 0.0)
    else:
        axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        m = a.max(axis=axes, keepdims=True)
    scale = np.where(m > 0, m / qmax, 1.0)
    q = np.clip(np.round(w / scale), -qmax, qmax) * scale
    return q.astype(w.dtype), scale.reshape(-1)


def _weight_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The output-channel axis of a node's weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return ndim - 1  # MatMul: (..., in, out)


def _weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name: i for i in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in WEIGHT_OPS
        and len(n.input) > 1
        and n.input[1] in inits
        and inits[n.input[1]].data_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
    ]


def quantize_weights(model: onnx.ModelProto, bits: int, per_channel: bool) -> list[dict[str, Any]]:
    """Replace weight initializers in place with fake-quantized values; return their scales."""
    inits = {i.name: i for i in model.graph.initializer}
    done: list[dict[str, Any]] = []
    seen: set[str] = set()
    for node in _weight_nodes(model):
        name = node.input[1]
        if name in seen:
            continue
        seen.add(name)
        w = numpy_helper.to_array(inits[name])
        axis = _weight_axis(node, w.ndim) if per_channel and w.ndim > 1 else None
        q, scales = fake_quantize(w, bits, axis)
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        done.append({**scale_entry(name, f"int{bits}", scales, np.zeros(1)), "weight": True})
    return done


def activation_ranges(
    model: onnx.ModelProto, names: list[str], input_name: str, calib: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Min and max of each named tensor over the calibration set (float graph, onnxruntime)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in names:
        if name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for i in range(0, len(calib), 256):
        outs = sess.run(names, {input_name: np.ascontiguousarray(calib[i : i + 256], np.float32)})
        for n, v in zip(names, outs, strict=True):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def activation_scale(lo: float, hi: float, bits: int) -> tuple[float, float, float]:
    """(scale, qmin, qmax): unsigned levels for a never-negative range, else symmetric."""
    if lo >= 0:
        qmin, qmax, m = 0.0, float(2**bits - 1), hi
    else:
        qmax = float(2 ** (bits - 1) - 1)
        qmin, m = -qmax, max(abs(lo), abs(hi))
    return (m / qmax if m > 0 else 1.0), qmin, qmax


def insert_fake_quant(
    model: onnx.ModelProto, name: str, scale: float, qmin: float, qmax: float
) -> None:
    """Route every consumer of tensor `name` through Div/Round/Clip/Mul fake quantization."""
    g = model.graph
    out = f"{name}_simq"
    consts = {f"{name}_sim_scale": scale, f"{name}_sim_qmin": qmin, f"{name}_sim_qmax": qmax}
    for cname, value in consts.items():
        g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), cname))
    for node in g.node:
        for i, inp in enumerate(node.input):
            if inp == name:
                node.input[i] = out
    s, lo, hi = consts
    new = [
        helper.make_node("Div", [name, s], [f"{name}_simd"], name=f"{name}_sim_div"),
        helper.make_node("Round", [f"{name}_simd"], [f"{name}_simr"], name=f"{name}_sim_round"),
        helper.make_node(
            "Clip", [f"{name}_simr", lo, hi], [f"{name}_simc"], name=f"{name}_sim_clip"
        ),
        helper.make_node("Mul", [f"{name}_simc", s], [out], name=f"{name}_sim_mul"),
    ]
    producer = next((i for i, n in enumerate(g.node) if name in n.output), -1)
    nodes = list(g.node)
    nodes[producer + 1 : producer + 1] = new
    del g.node[:]
    g.node.extend(nodes)


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic optimisation (constant folding, BatchNorm into Conv), batch kept.

    Deployment quantizes the folded weights, so the simulation does too.
    """
    folded = optimised_by_ort(model)
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    return folded


def simulate(
    model: onnx.ModelProto,
    input_name: str,
    calib: np.ndarray | None,
    *,
    weight_bits: int = 8,
    act_bits: int = 0,
    per_channel: bool = False,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A fake-quantized copy of `model` and the scales it uses (weights then activations)."""
    check_bits(weight_bits, act_bits)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"simulated quantization needs opset >= {MIN_OPSET}, not {opset}"
        )
    m = fold(model)
    if not _weight_nodes(m):
        raise UnsupportedModelError("no Gemm / MatMul / Conv with constant weights to quantize")
    scales = quantize_weights(m, weight_bits, per_channel) if weight_bits else []
    if act_bits:
        if calib is None or len(calib) == 0:
            raise InputError("simulated activation quantization needs a calibration set")
        targets = list(dict.fromkeys(n.input[0] for n in _weight_nodes(m)))
        ranges = activation_ranges(m, targets, input_name, calib)
        for name in targets:
            s, qmin, qmax = activation_scale(*ranges[name], act_bits)
            s = float(np.float32(s))  # the value the graph divides by
            insert_fake_quant(m, name, s, qmin, qmax)
            zp = np.zeros(1)
            scales.append(
                {
                    **scale_entry(
                        name, f"{'u' if qmin == 0 else ''}int{act_bits}", np.array([s]), zp
                    ),
                    "range": list(ranges[name]),
                    "weight": False,
                }
            )
    return m, scales


def check_bits(weight_bits: int, act_bits: int) -> None:
    """Bit widths must be 2-8 (0 leaves that side in float); at least one side quantized."""
    for label, b in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if b != 0 and not 2 <= b <= 8:
            raise InputError(f"{label} must be 0 (float) or 2 to 8, got {b}")
    if weight_bits == 0 and act_bits == 0:
        raise InputError(
            "simulated quantization with weight_bits=0 and act_bits=0 quantizes nothing"
        )
