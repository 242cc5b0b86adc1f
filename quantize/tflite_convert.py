"""Post-training TFLite quantization of a `Network`: dynamic range, int8, 16x8 and float16.

The TF graph comes from `quantize.tf_graph` (the engine's own layer list); the converter is
`tf.lite.TFLiteConverter.from_concrete_functions`. TensorFlow 2.21's dynamic range mode gives
dense weights one scale per output channel and leaves weight tensors under 1,024 elements in
float; `per_tensor_dense=True` sets the converter's flag for one scale per dense weight tensor,
as the paper's 2020 file had.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantize.runner import quiet_native
from quantize.tf_graph import build_tf_function, import_tensorflow
from verifier.engine.network import Network
from verifier.errors import InputError, UnsupportedModelError

TFLITE_MODES = ("dynamic", "int8", "16x8", "float16")


def convert_tflite(
    net: Network,
    mode: str,
    calib: np.ndarray | None = None,
    *,
    per_tensor_dense: bool = False,
    integer_io: bool = False,
) -> bytes:
    """The .tflite bytes of `net` quantized in `mode`; int8 / 16x8 calibrate on `calib`."""
    if mode not in TFLITE_MODES:
        raise InputError(f"unknown TFLite mode {mode!r}: expected one of {', '.join(TFLITE_MODES)}")
    fn, module = build_tf_function(net)
    tf = import_tensorflow()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic":
        conv._experimental_disable_per_channel_quantization_for_dense_layers = per_tensor_dense
    elif mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    else:
        if calib is None or len(calib) == 0:
            raise InputError(f"TFLite mode {mode!r} needs a calibration set (representative data)")
        conv.representative_dataset = lambda: _representative(calib)
        ops = tf.lite.OpsSet
        int16 = ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        conv.target_spec.supported_ops = [ops.TFLITE_BUILTINS_INT8 if mode == "int8" else int16]
        if integer_io:
            io_type = tf.int8 if mode == "int8" else tf.int16
            conv.inference_input_type = io_type
            conv.inference_output_type = io_type
    try:
        with quiet_native():  # the calibrator prints its settings from C++
            return conv.convert()
    except Exception as exc:  # the converter raises ConverterError and plain exceptions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"the TFLite converter failed ({mode}): {first}") from None


def _representative(calib: np.ndarray) -> Iterator[list[np.ndarray]]:
    for i in range(len(calib)):
        yield [np.ascontiguousarray(calib[i : i + 1], dtype=np.float32)]


def write_tflite(
    net: Network, mode: str, out: Path, calib: np.ndarray | None = None, **flags: Any
) -> Path:
    """Convert and write the .tflite file to `out` (parent directories created)."""
    data = convert_tflite(net, mode, calib, **flags)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out
