"""The table of quantization modes, and the two ways in: quantize a float model, or load a file.

Each mode declares its builder, its options (default, allowed values, help) and a one-line
description once; the CLI lists and parses them from this table. Unknown modes and options are
InputErrors naming the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantize.calibration import check_calibration
from quantize.litert import TfliteRunner
from quantize.ort_quant import CALIBRATIONS, INT_TYPES, quantize_dynamic_file, quantize_static_file
from quantize.ort_runner import OrtRunner, infer_onnx_mode, read_metadata, write_metadata
from quantize.runner import DescribedRunner, tensorflow_version
from quantize.simulated import simulate
from quantize.tflite_convert import write_tflite
from verifier.engine.data import LAYOUTS
from verifier.engine.model import Model, detect_layout
from verifier.engine.onnx_import import read_onnx
from verifier.errors import InputError


@dataclass(frozen=True)
class Option:
    """One mode option: its default (which also fixes its type), allowed values and help."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def parse(self, key: str, value: Any) -> Any:
        """`value` (a Python value, or a string from the command line) checked and typed."""
        kind = type(self.default)
        if isinstance(value, str) and kind is not str:
            value = _from_text(key, value, kind)
        if kind is bool and not isinstance(value, bool):
            raise InputError(f"option {key}: expected true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise InputError(f"option {key}: expected an integer, got {value!r}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise InputError(f"option {key}={value!r}: expected one of {allowed}")
        return kind(value)


def _from_text(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InputError(f"option {key}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"option {key}: expected {kind.__name__}, got {text!r}") from None


Builder = Callable[[Model, Path, "np.ndarray | None", str, dict[str, Any]], DescribedRunner]


@dataclass(frozen=True)
class Mode:
    """A quantization mode: builder, backend, file suffix, options, and how runs are named."""

    name: str
    backend: str
    suffix: str
    description: str
    build: Builder
    label: Callable[[dict[str, Any]], str]
    options: dict[str, Option] = field(default_factory=dict)
    needs_calib: Callable[[dict[str, Any]], bool] = lambda opts: False

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every given option checked; unknown names are refused."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise InputError(
                f"mode {self.name!r} has no option {', '.join(unknown)} (its options: {valid})"
            )
        return {k: opt.parse(k, options.get(k, opt.default)) for k, opt in self.options.items()}


# --- builders ------------------------------------------------------------------------------------


def _build_tflite(kind: str, per_tensor_dense: bool = False) -> Builder:
    def build(
        model: Model, out: Path, calib: np.ndarray | None, mode: str, opts: dict[str, Any]
    ) -> DescribedRunner:
        write_tflite(
            model.network,
            kind,
            out,
            calib,
            per_tensor_dense=per_tensor_dense,
            integer_io=opts.get("integer_io", False),
        )
        provenance = {
            "converter": f"tensorflow {tensorflow_version()}",
            "source_sha256": model.sha256,
            "calibration_inputs": len(calib) if kind in ("int8", "16x8") else 0,
        }
        if kind == "dynamic":
            provenance["dense_weight_scales"] = "per-tensor" if per_tensor_dense else "per-channel"
        return TfliteRunner(
            out, MODES[mode].label(opts), mode, opts, provenance, layout=model.layout
        )

    return build


def _build_ort(fmt: str | None) -> Builder:
    def build(
        model: Model, out: Path, calib: np.ndarray | None, mode: str, opts: dict[str, Any]
    ) -> DescribedRunner:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt is None:
            record = quantize_dynamic_file(
                model.path,
                out,
                per_channel=opts["per_channel"],
                reduce_range=opts["reduce_range"],
            )
        else:
            assert calib is not None, "static quantization needs calibration inputs"
            record = quantize_static_file(
                model.path,
                out,
                model.input_name,
                calib,
                fmt=fmt,
                per_channel=opts["per_channel"],
                calibration=opts["calibration"],
                activation_type=opts["activation_type"],
                reduce_range=opts["reduce_range"],
            )
        record["source_sha256"] = model.sha256
        _stamp(out, onnx.load(str(out)), mode, opts, record)
        return OrtRunner(
            out, MODES[mode].label(opts), mode, opts, layout=model.layout, per_sample=fmt is None
        )

    return build


def _build_simulated(
    model: Model, out: Path, calib: np.ndarray | None, mode: str, opts: dict[str, Any]
) -> DescribedRunner:
    proto, scales = simulate(read_onnx(model.path), model.input_name, calib, **opts)
    record = {
        "source_sha256": model.sha256,
        "calibration_inputs": len(calib) if opts["act_bits"] and calib is not None else 0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _stamp(out, proto, mode, opts, record, scales)
    return OrtRunner(out, MODES[mode].label(opts), mode, opts, layout=model.layout)


def _stamp(
    out: Path,
    proto: onnx.ModelProto,
    mode: str,
    opts: dict[str, Any],
    provenance: dict[str, Any],
    scales: list[dict[str, Any]] | None = None,
) -> None:
    """Save `proto` to `out` with this package's metadata record."""
    record: dict[str, Any] = {"mode": mode, "options": opts, "provenance": provenance}
    if scales is not None:
        record["scales"] = scales
    write_metadata(proto, record)
    onnx.save(proto, str(out))


# --- the table -----------------------------------------------------------------------------------


def _channels(opts: dict[str, Any]) -> str:
    return "per-channel" if opts.get("per_channel") else "per-tensor"


def _range(opts: dict[str, Any]) -> str:
    return "-reduce-range" if opts.get("reduce_range") else ""


def _io(opts: dict[str, Any]) -> str:
    return "-int-io" if opts.get("integer_io") else ""


def _sim_label(opts: dict[str, Any]) -> str:
    w = f"w{opts['weight_bits']}" if opts["weight_bits"] else ""
    a = f"a{opts['act_bits']}" if opts["act_bits"] else ""
    return f"sim-{w}{a}-{_channels(opts)}"


def _static_label(fmt: str) -> Callable[[dict[str, Any]], str]:
    def label(opts: dict[str, Any]) -> str:
        act = "" if opts["activation_type"] == "int8" else f"-{opts['activation_type']}"
        return f"ort-static-{fmt}-{_channels(opts)}-{opts['calibration']}{act}{_range(opts)}"

    return label


INTEGER_IO = Option(
    False, "integer input/output tensors instead of float (quantized by the runner)", (False, True)
)
STATIC_OPTIONS = {
    "per_channel": Option(False, "one weight scale per output channel", (False, True)),
    "calibration": Option("minmax", "activation range calibration", CALIBRATIONS),
    "activation_type": Option("int8", "activation integer type", INT_TYPES),
    "reduce_range": Option(
        False,
        "7-bit weights: int16 pair sums of x86 kernels without VNNI can never saturate",
        (False, True),
    ),
}
SIM_OPTIONS = {
    "weight_bits": Option(8, "weight bit width (0 leaves weights in float)", (0, *range(2, 9))),
    "act_bits": Option(
        0, "activation bit width (0 leaves activations in float)", (0, *range(2, 9))
    ),
    "per_channel": Option(False, "one weight scale per output channel", (False, True)),
}

MODES: dict[str, Mode] = {
    m.name: m
    for m in [
        Mode(
            "dynamic",
            "litert",
            ".tflite",
            "TFLite dynamic range: int8 weights (per channel on dense layers), float activations",
            _build_tflite("dynamic"),
            lambda o: "tflite-dynamic",
        ),
        Mode(
            "dynamic-per-tensor",
            "litert",
            ".tflite",
            "TFLite dynamic range with one scale per weight tensor (the paper's 2020 file)",
            _build_tflite("dynamic", per_tensor_dense=True),
            lambda o: "tflite-dynamic-per-tensor",
        ),
        Mode(
            "int8",
            "litert",
            ".tflite",
            "TFLite full integer int8 (weights and activations), calibrated",
            _build_tflite("int8"),
            lambda o: f"tflite-int8{_io(o)}",
            {"integer_io": INTEGER_IO},
            lambda o: True,
        ),
        Mode(
            "16x8",
            "litert",
            ".tflite",
            "TFLite int16 activations with int8 weights, calibrated",
            _build_tflite("16x8"),
            lambda o: f"tflite-16x8{_io(o)}",
            {"integer_io": INTEGER_IO},
            lambda o: True,
        ),
        Mode(
            "float16",
            "litert",
            ".tflite",
            "TFLite float16 weights, float32 compute",
            _build_tflite("float16"),
            lambda o: "tflite-float16",
        ),
        Mode(
            "ort-qdq",
            "onnxruntime",
            ".onnx",
            "ONNX Runtime static quantization, QDQ format, calibrated",
            _build_ort("qdq"),
            _static_label("qdq"),
            STATIC_OPTIONS,
            lambda o: True,
        ),
        Mode(
            "ort-qoperator",
            "onnxruntime",
            ".onnx",
            "ONNX Runtime static quantization, QOperator format (QLinear* ops), calibrated",
            _build_ort("qoperator"),
            _static_label("qoperator"),
            STATIC_OPTIONS,
            lambda o: True,
        ),
        Mode(
            "ort-dynamic",
            "onnxruntime",
            ".onnx",
            "ONNX Runtime dynamic quantization: int8 weights, activations quantized per run",
            _build_ort(None),
            lambda o: f"ort-dynamic-{_channels(o)}{_range(o)}",
            {k: STATIC_OPTIONS[k] for k in ("per_channel", "reduce_range")},
        ),
        Mode(
            "simulated",
            "onnxruntime",
            ".onnx",
            "simulated n-bit (2-8) symmetric uniform quantization in a float ONNX graph",
            _build_simulated,
            _sim_label,
            SIM_OPTIONS,
            lambda o: bool(o["act_bits"]),
        ),
    ]
}


def get_mode(name: str) -> Mode:
    """The mode called `name`; an InputError listing the valid names otherwise."""
    if name not in MODES:
        raise InputError(f"unknown quantization mode {name!r}: expected one of {', '.join(MODES)}")
    return MODES[name]


def parse_mode(text: str) -> tuple[str, dict[str, Any]]:
    """`MODE` or `MODE:KEY=VALUE[:KEY=VALUE...]` (as `--modes` takes them) to the mode's name
    and its options, checked against the mode's table."""
    name, *pairs = [part.strip() for part in text.split(":")]
    options = parse_options(pairs)
    get_mode(name).resolve(options)  # unknown names and bad values are refused here
    return name, options


def parse_options(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings to a dict (values stay text; the mode's table types them)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def list_modes() -> str:
    """A plain-text table of modes, their options and descriptions (for `--list-modes`)."""
    lines = []
    for m in MODES.values():
        lines.append(f"{m.name:<20} {m.backend:<12} {m.description}")
        for key, opt in m.options.items():
            allowed = f" ({'|'.join(map(str, opt.choices))})" if opt.choices else ""
            lines.append(f"{'':<22}-o {key}={opt.default}{allowed}: {opt.help}")
    return "\n".join(lines)


# --- entry points --------------------------------------------------------------------------------


def default_path(model: Model, mode: str, out_dir: Path, **options: Any) -> Path:
    """Where `quantize_model` writes: `<out_dir>/<model stem>.<runner name><suffix>`."""
    m = get_mode(mode)
    return Path(out_dir) / f"{model.path.stem}.{m.label(m.resolve(options))}{m.suffix}"


def build(
    model: Model, mode: str, out: Path, calib: np.ndarray | None, **options: Any
) -> DescribedRunner:
    """Quantize `model` in `mode` into the file `out`; return the runner on that file."""
    m = get_mode(mode)
    opts = m.resolve(options)
    calib = check_calibration(calib, model.input_shape)
    if m.needs_calib(opts) and calib is None:
        raise InputError(f"mode {mode!r} needs calibration inputs")
    out = Path(out)
    if out.suffix != m.suffix:
        raise InputError(f"mode {mode!r} writes a {m.suffix} file, not {out.name!r}")
    return m.build(model, out, calib, mode, opts)


def quantize_model(
    model: Model, mode: str, out_dir: Path, calib: np.ndarray | None, **options: Any
) -> DescribedRunner:
    """Quantize `model` in `mode`, write the file into `out_dir`, and return its runner."""
    return build(model, mode, default_path(model, mode, out_dir, **options), calib, **options)


def float_runner(model: Model, *, num_threads: int | None = None) -> DescribedRunner:
    """The float model itself as a described runner ("float-ort"), for baselines and metadata."""
    return OrtRunner(model.path, "float-ort", "float", num_threads=num_threads, layout=model.layout)


def load_quantized(
    path: str | Path, layout: str | None = None, *, num_threads: int | None = None
) -> DescribedRunner:
    """A runner on a quantized file the user already has (.tflite, or .onnx)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"quantized model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        runner: Any = TfliteRunner(path, "tflite", "unknown", num_threads=num_threads)
        runner.mode = runner.detected_mode()
        if runner.mode in ("int8", "16x8"):
            runner.options = {"integer_io": runner.integer_io}
        m = MODES.get(runner.mode)
        runner.name = m.label(m.resolve(runner.options)) if m else f"tflite-{runner.mode}"
    elif suffix == ".onnx":
        proto = onnx.load(str(path), load_external_data=False)
        mode, meta = infer_onnx_mode(proto), read_metadata(proto)
        opts = meta.get("options", {})
        name = MODES[mode].label(MODES[mode].resolve(opts)) if mode in MODES else mode
        runner = OrtRunner(
            path, name, mode, opts, num_threads=num_threads, per_sample=mode == "ort-dynamic"
        )
    else:
        raise InputError(
            f"{path}: unsupported quantized model format {path.suffix!r}; use .tflite or .onnx"
        )
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    runner.layout = layout or detect_layout(runner.input_shape)
    return runner


def check_compatible(model: Model, runner: DescribedRunner) -> None:
    """Refuse a quantized runner whose input shape or class count differs from the float model's."""
    if tuple(runner.input_shape) != tuple(model.input_shape):
        raise InputError(
            f"quantized model {runner.name} takes input {tuple(runner.input_shape)}, the float "
            f"model {tuple(model.input_shape)}"
        )
    classes = getattr(runner, "num_classes", model.num_classes)
    if classes != model.num_classes:
        raise InputError(
            f"quantized model {runner.name} has {classes} outputs, the float model "
            f"{model.num_classes}"
        )
