"""Post-training quantization of the float model, and one runner API for every backend.

Backends: TFLite / LiteRT (dynamic range, int8, 16x8, float16), ONNX Runtime (static QDQ and
QOperator, dynamic) and simulated n-bit quantization in a float ONNX graph. TensorFlow is only
imported when a TFLite file is converted.
"""

from quantize.agreement import agreement
from quantize.calibration import CalibrationRecord, calibration_inputs
from quantize.litert import TfliteRunner
from quantize.modes import (
    MODES,
    build,
    check_compatible,
    float_runner,
    get_mode,
    list_modes,
    load_quantized,
    parse_mode,
    quantize_model,
)
from quantize.ort_runner import OrtRunner
from quantize.runner import DescribedRunner, Runner

__all__ = [
    "MODES",
    "CalibrationRecord",
    "DescribedRunner",
    "OrtRunner",
    "Runner",
    "TfliteRunner",
    "agreement",
    "build",
    "calibration_inputs",
    "check_compatible",
    "float_runner",
    "get_mode",
    "list_modes",
    "load_quantized",
    "parse_mode",
    "quantize_model",
]
