"""ONNX Runtime post-training quantization: static (QDQ / QOperator) and dynamic.

The float graph is first run through `quant_pre_process` (shape inference and graph
optimisation, which onnxruntime recommends before quantizing); if that step fails the original
graph is quantized and the record says so. The optimisation matters for accuracy: it fuses
MatMul + Add into Gemm, which quantizes to one QGemm (int32 bias, one requantization) instead of
a QLinearMatMul whose output is rounded to an int8 grid before a second rounding after the Add.
Both steps see a self-contained copy of the model: they write graphs into temporary folders of
their own, without the external data files (`verifier.engine.model_files`) a graph's weights
may live in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from verifier.errors import InputError, UnsupportedModelError

CALIBRATIONS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
INT_TYPES = ("int8", "uint8")
CALIB_BATCH = 64


def _reader(input_name: str, calib: np.ndarray, batch: int) -> Any:
    """A CalibrationDataReader over `calib` in batches of `batch` inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [
                    {input_name: np.ascontiguousarray(calib[i : i + batch], np.float32)}
                    for i in range(0, len(calib), batch)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Reader()


def calib_batch(n: int) -> int:
    """The largest divisor of `n` up to CALIB_BATCH.

    Equal batches: onnxruntime's histogram calibrators (entropy, percentile) stack the
    per-batch outputs into one array and fail on a shorter last batch.
    """
    return max(d for d in range(1, min(n, CALIB_BATCH) + 1) if n % d == 0)


def preprocess(src: Path, dst: Path) -> dict[str, Any]:
    """`quant_pre_process` from `src` to `dst`, else `dst` a plain copy; the provenance record
    says which, and why it failed (an unfused graph quantizes each MatMul and Add apart).

    Symbolic shape inference is skipped: it is for symbolic dimensions (the classifiers here
    have fixed ones, which ONNX shape inference covers) and it needs sympy, so with it the
    graph quantized would depend on whether sympy happens to be installed.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return {"preprocessed": True}
    except Exception as exc:  # an optional optimisation: fall back to the original graph
        dst.write_bytes(Path(src).read_bytes())
        return {"preprocessed": False, "preprocess_error": _first_line(exc)}


def self_contained(src: Path, dst: Path) -> Path:
    """Write the model `src`, its external data (checked) read back in, as the one file `dst`."""
    from verifier.engine.onnx_import import read_onnx

    onnx.save(read_onnx(src), str(dst))
    return dst


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    if name not in INT_TYPES:
        raise InputError(f"unknown integer type {name!r}: expected one of {', '.join(INT_TYPES)}")
    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _fixed_batch(model_path: Path) -> int | None:
    """The graph's batch size when it is fixed (calibration batches must match it)."""
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    dims = [i for i in model.graph.input if i.name not in inits][0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].dim_value > 0 else None


def quantize_static_file(
    src: Path,
    out: Path,
    input_name: str,
    calib: np.ndarray,
    *,
    fmt: str = "qdq",
    per_channel: bool = False,
    calibration: str = "minmax",
    activation_type: str = "int8",
    weight_type: str = "int8",
    reduce_range: bool = False,
) -> dict[str, Any]:
    """Write a statically quantized copy of `src` to `out`; return what was done.

    `reduce_range`: 7-bit weights, so that x86 kernels that add u8 x s8 products in int16
    pairs (AVX2 without VNNI) can never saturate: the file then runs alike on every CPU."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if calibration not in CALIBRATIONS:
        raise InputError(
            f"unknown calibration {calibration!r}: expected one of {', '.join(CALIBRATIONS)}"
        )
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibration]
    fixed = _fixed_batch(src)
    if fixed:  # calibration batches must have the graph's own batch size
        usable = len(calib) // fixed * fixed
        if usable == 0:
            raise InputError(f"calibration needs at least {fixed} inputs (the graph's batch size)")
        calib = calib[:usable]
    batch = fixed or calib_batch(len(calib))
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        done = preprocess(self_contained(src, Path(tmp) / "src.onnx"), pre)
        with _quiet():
            try:
                quantize_static(
                    str(pre),
                    str(out),
                    _reader(input_name, calib, batch),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=per_channel,
                    activation_type=_qtype(activation_type),
                    weight_type=_qtype(weight_type),
                    calibrate_method=method,
                    calibration_providers=["CPUExecutionProvider"],
                    reduce_range=reduce_range,
                )
            except (InputError, MemoryError):
                raise
            except Exception as exc:
                raise UnsupportedModelError(
                    f"onnxruntime's quantize_static failed: {_first_line(exc)}"
                ) from None
    return {**done, "calibration_inputs": len(calib)}


def quantize_dynamic_file(
    src: Path,
    out: Path,
    *,
    per_channel: bool = False,
    weight_type: str = "int8",
    reduce_range: bool = False,
) -> dict[str, Any]:
    """Write a dynamically quantized copy of `src` (int8 weights, activations per run) to `out`
    (`reduce_range`: 7-bit weights, as for `quantize_static_file`)."""
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        done = preprocess(self_contained(src, Path(tmp) / "src.onnx"), pre)
        with _quiet():
            try:
                quantize_dynamic(
                    str(pre),
                    str(out),
                    per_channel=per_channel,
                    weight_type=_qtype(weight_type),
                    reduce_range=reduce_range,
                )
            except InputError:
                raise
            except Exception as exc:
                raise UnsupportedModelError(
                    f"onnxruntime's quantize_dynamic failed: {_first_line(exc)}"
                ) from None
    return done


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizer's logging and its progress prints for the duration of a block."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
