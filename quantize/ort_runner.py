"""Run an ONNX file (float, ORT-quantized or simulated n-bit) on onnxruntime behind the runner API.

ORT-quantized graphs keep a float input (their QuantizeLinear applies the model's own input
scale), so `predict` feeds floats. Dynamic quantization computes one activation scale over the
whole input tensor, so a batch would couple its inputs: those graphs run one input per call, as
on a device. `describe()` lists the quantization scales found in the graph
(initializers named `*_scale`, as onnxruntime's quantizer names them) and the metadata this
package writes into the files it creates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.runner import (
    DEFAULT_MAX_BATCH,
    check_input,
    package_versions,
    run_batched,
    scale_entry,
)
from verifier.engine.model_files import describe_files
from verifier.engine.onnx_import import read_onnx
from verifier.errors import InputError, UnsupportedModelError

METADATA_KEY = "relrobust.quantize"
QOPERATOR_OPS = {"QLinearMatMul", "QLinearConv", "QGemm", "QLinearAdd", "QAttention"}
FLOAT_WEIGHT_OPS = ("Gemm", "MatMul", "Conv")
DYNAMIC_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"}


@dataclass
class OrtRunner:
    """An onnxruntime session on one .onnx file; `predict` takes float inputs in [0,1]."""

    path: Path
    name: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    num_threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    layout: str | None = None
    per_sample: bool = False  # one input per run (dynamic quantization couples a batch)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.path = Path(self.path)
        # the graph with its external data read in (and checked): onnxruntime loading a path
        # cannot infer shapes from external constants (a Reshape target) of such a graph
        proto = read_onnx(self.path)
        try:
            self._session = ort.InferenceSession(
                proto.SerializeToString(),
                session_options(self.num_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise InputError(f"onnxruntime cannot load {self.path}: {_first_line(exc)}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise UnsupportedModelError(f"{self.path}: expected one input, found {len(inputs)}")
        if inputs[0].type != "tensor(float)":
            raise UnsupportedModelError(f"{self.path}: input type {inputs[0].type}, not float")
        dims = inputs[0].shape
        if any(not isinstance(d, int) for d in dims[1:]):
            raise UnsupportedModelError(f"{self.path}: input {dims} has dynamic sizes")
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        self.input_shape = tuple(int(d) for d in dims[1:])
        self._fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        out_dims = outputs[0].shape
        classes = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
        self.num_classes = (
            classes or self._run(np.zeros((1, *self.input_shape), np.float32)).shape[1]
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float scores (N, classes), run in chunks (the graph's fixed batch size, if any)."""
        x = check_input(x, self.input_shape)
        step = 1 if self.per_sample else self._fixed or self.max_batch
        return run_batched(self._run, x, step, self.num_classes)

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self._fixed and n < self._fixed:
            x = np.concatenate([x, np.zeros((self._fixed - n, *self.input_shape), np.float32)])
        out = self._session.run([self._output_name], {self._input_name: x})[0]
        return out.reshape(len(x), -1)[:n]

    def describe(self) -> dict[str, Any]:
        """Backend, mode, options, quantization scales, file, runtime versions."""
        model = read_onnx(self.path)
        meta = read_metadata(model)
        files = describe_files(self.path)
        scales = meta.get("scales") or onnx_scales(model)
        return {
            "name": self.name,
            "backend": "onnxruntime",
            "mode": self.mode,
            "options": dict(self.options),
            "quantized_tensors": scales,
            "float_weights": float_weights(model, {t["tensor"] for t in scales}),
            "ops": sorted({n.op_type for n in model.graph.node}),
            "path": str(self.path),
            "sha256": files["sha256"],
            "size_bytes": files["bytes"],
            "external_data": files["external_data"],
            "provenance": {**meta.get("provenance", {}), **self.provenance},
            "runtime": {
                **package_versions("onnxruntime", "onnx", "numpy"),
                "num_threads": self.num_threads or os.cpu_count(),
            },
        }


def session_options(num_threads: int | None = None):
    """The session options every runner uses (the optimizer at onnxruntime's default level:
    what decides which QDQ groups it fuses into integer kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = num_threads or 0
    return opts


def optimized_graph(path: str | Path) -> onnx.ModelProto | None:
    """The graph onnxruntime runs for the file at `path` after its optimizer (fused QDQ groups,
    layout changes), as a runner's session builds it on this machine; None when it cannot be
    written out."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(1)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            proto = read_onnx(Path(path)).SerializeToString()
            ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
            return onnx.load(opts.optimized_model_filepath)
        except Exception:  # onnxruntime's own exception types, or nothing written
            return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def onnx_scales(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Scale summary of every `<tensor>_scale` initializer with its `<tensor>_zero_point`."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for name, init in inits.items():
        if not name.endswith("_scale"):
            continue
        base = name[: -len("_scale")]
        zp_init = inits.get(base + "_zero_point")
        scales = numpy_helper.to_array(init)
        zps = numpy_helper.to_array(zp_init) if zp_init is not None else np.zeros(1, np.int64)
        dtype = np.dtype(zps.dtype).name if zp_init is not None else "unknown"
        entry = scale_entry(base, dtype, scales, zps)
        entry["weight"] = f"{base}_quantized" in inits  # the quantizer's name for weights
        out.append(entry)
    return out


def float_weights(model: onnx.ModelProto, quantized: set[str]) -> list[dict[str, Any]]:
    """Float weight initializers of Gemm / MatMul / Conv nodes not listed as quantized."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type in FLOAT_WEIGHT_OPS and len(node.input) > 1 else ""
        init = inits.get(name)
        if init is not None and name not in quantized and init.data_type == onnx.TensorProto.FLOAT:
            out.append({"tensor": name, "dtype": "float32", "elements": int(np.prod(init.dims))})
    return out


def write_metadata(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    """Store this package's record (mode, options, scales, provenance) in the ONNX metadata."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record, sort_keys=True)


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The record `write_metadata` stored, or {} for files this package did not write."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return {}
    return {}


def infer_onnx_mode(model: onnx.ModelProto) -> str:
    """The quantization mode of an ONNX file: recorded metadata first, else the op types."""
    meta = read_metadata(model)
    if meta.get("mode"):
        return str(meta["mode"])
    ops = {n.op_type for n in model.graph.node}
    if ops & DYNAMIC_OPS:
        return "ort-dynamic"
    if ops & QOPERATOR_OPS:
        return "ort-qoperator"
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "ort-qdq"
    return "float"
