"""Run a .tflite file on the LiteRT interpreter (`ai_edge_litert`) behind the runner API.

Integer inputs are quantized with the file's own scale and zero point, bit for bit as the
file's own QUANTIZE op would (see `quantize_values`); integer outputs are dequantized. The
input tensor is resized to the batch and the allocated size cached, so a steady batch size
allocates once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantize.runner import (
    DEFAULT_MAX_BATCH,
    check_input,
    package_versions,
    quiet_native,
    run_batched,
    scale_entry,
)
from verifier.engine.model_files import model_sha256
from verifier.errors import InputError

QUANT_BLOCK = 1 << 16
WEIGHT_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1}


def quantize_values(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """Float to integer as LiteRT's QUANTIZE op computes it: rint(x * (1/scale)) + zp, clamped.

    Measured against the op (int8 and int16, XNNPACK and built-in kernels): multiplication by
    the float32 inverse scale, round half to even. Done in blocks that stay in cache.
    """
    info = np.iinfo(dtype)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype)
    inv, zp = np.float32(1) / np.float32(scale), np.float32(zero_point)
    for i in range(0, flat.size, QUANT_BLOCK):
        v = flat[i : i + QUANT_BLOCK] * inv
        np.rint(v, out=v)
        v += zp
        np.clip(v, info.min, info.max, out=v)
        out[i : i + QUANT_BLOCK] = v
    return out.reshape(x.shape)


@dataclass
class TfliteRunner:
    """A LiteRT interpreter on one .tflite file; `predict` takes float inputs in [0,1]."""

    path: Path
    name: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    num_threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    layout: str | None = None

    def __post_init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(self.path)
        threads = self.num_threads or os.cpu_count() or 1
        try:
            with quiet_native():  # LiteRT announces its XNNPACK delegate on stderr
                self._interp = Interpreter(model_path=str(self.path), num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"LiteRT cannot load {self.path}: {exc}") from None
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(f"{self.path}: expected one input and one output tensor")
        self._in, self._out = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"][1:])
        self.num_classes = int(np.prod(self._out["shape"][1:]))
        self._batch: int | None = None  # the batch size the tensors are allocated for

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float scores (N, classes), run in chunks of at most `max_batch`."""
        x = check_input(x, self.input_shape)
        return run_batched(self._run, x, self.max_batch, self.num_classes)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [len(x), *self.input_shape])
            with quiet_native():
                self._interp.allocate_tensors()
            self._batch = len(x)
        dtype = self._in["dtype"]
        if dtype != np.float32:
            scale, zp = self._in["quantization"]
            x = quantize_values(x, scale, zp, dtype)
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        out = self._interp.get_tensor(self._out["index"]).reshape(len(x), -1)
        if out.dtype != np.float32:
            scale, zp = self._out["quantization"]
            out = (out.astype(np.float32) - np.float32(zp)) * np.float32(scale)
        return out

    def _stored(self) -> Any:
        """A fresh, unallocated interpreter on the file: its tensors as stored.

        Allocation applies the XNNPACK delegate, which rewrites per-tensor weight scales into
        per-channel ones in memory; describing the running interpreter would misreport them.
        """
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(self.path))

    @property
    def integer_io(self) -> bool:
        """True when the file takes integer inputs (quantized here with its scale and zp)."""
        return self._in["dtype"] != np.float32

    def detected_mode(self) -> str:
        """The quantization mode the file's tensor types show (see `infer_tflite_mode`)."""
        return infer_tflite_mode(self._stored())

    def describe(self) -> dict[str, Any]:
        """Backend, mode, options, quantized tensors, float weights left, file, versions."""
        info = inspect_tflite(self._stored())
        return {
            "name": self.name,
            "backend": "litert",
            "mode": self.mode,
            "options": dict(self.options),
            "input": {
                "dtype": np.dtype(self._in["dtype"]).name,
                "shape": list(self.input_shape),
                "quantization": list(self._in["quantization"]),
            },
            "output": {
                "dtype": np.dtype(self._out["dtype"]).name,
                "quantization": list(self._out["quantization"]),
            },
            **info,
            "path": str(self.path),
            "sha256": model_sha256(self.path),
            "size_bytes": self.path.stat().st_size,
            "provenance": dict(self.provenance),
            "runtime": {
                **package_versions("ai-edge-litert", "numpy"),
                "op_resolver": "AUTO (LiteRT's default XNNPACK delegate)",
                "num_threads": self.num_threads or os.cpu_count(),
            },
        }


def _weight_indices(interp: Any) -> dict[int, str]:
    """Tensor index -> op name for the weight operand of every FC / conv op.

    A weight stored in float16 reaches its op through a DEQUANTIZE; the stored tensor counts.
    """
    ops = interp._get_ops_details()  # the only LiteRT API listing op operands
    source = {
        int(op["outputs"][0]): int(op["inputs"][0]) for op in ops if op["op_name"] == "DEQUANTIZE"
    }
    out = {}
    for op in ops:
        slot = WEIGHT_OPS.get(op["op_name"])
        if slot is not None and len(op["inputs"]) > slot and op["inputs"][slot] >= 0:
            idx = int(op["inputs"][slot])
            out[source.get(idx, idx)] = op["op_name"]
    return out


def inspect_tflite(interp: Any) -> dict[str, Any]:
    """Quantized tensors (scales summary), weight tensors left in float, and the op list."""
    weights = _weight_indices(interp)
    quantized, float_weights, dtypes = [], [], {}
    for d in interp.get_tensor_details():
        qp = d["quantization_parameters"]
        name = np.dtype(d["dtype"]).name
        dtypes[name] = dtypes.get(name, 0) + 1
        if len(qp["scales"]):
            entry = scale_entry(d["name"], name, qp["scales"], qp["zero_points"])
            entry["weight"] = d["index"] in weights
            quantized.append(entry)
        elif d["index"] in weights:
            float_weights.append(
                {"tensor": d["name"], "dtype": name, "elements": int(np.prod(d["shape"]))}
            )
    ops = [op["op_name"] for op in interp._get_ops_details()]
    return {
        "quantized_tensors": quantized,
        "float_weights": float_weights,
        "tensor_dtypes": dtypes,
        "ops": ops,
    }


def infer_tflite_mode(interp: Any) -> str:
    """Guess the quantization mode of a .tflite file (unallocated) from its tensor types."""
    weights = _weight_indices(interp)
    details = interp.get_tensor_details()
    acts = {np.dtype(d["dtype"]).name for d in details if d["index"] not in weights}
    wts = [d for d in details if d["index"] in weights]
    kinds = {np.dtype(d["dtype"]).name for d in wts}
    if "int16" in acts:
        return "16x8"
    if "int8" in acts:
        return "int8"
    if "float16" in kinds:
        return "float16"
    if "int8" in kinds:
        fc = [d for d in wts if weights[d["index"]] == "FULLY_CONNECTED" and d["dtype"] == np.int8]
        per_tensor = fc and all(len(d["quantization_parameters"]["scales"]) == 1 for d in fc)
        return "dynamic-per-tensor" if per_tensor else "dynamic"
    return "float"
