"""What a quantized runtime computes, as the engine's chain plus how each layer is rounded.

An `ErrorModel` is the lowered chain with the weights and biases the quantized file holds
(dequantized from the file, never taken from the float model), and per Affine layer a
`Rounding`: what the runtime rounds besides its float32 arithmetic. `verifier.bounds` turns it
into per-neuron error bounds over a region (`rounding_errors`), so bounds and branch and bound
speak for the runtime itself.

Runtime behaviours assumed (TFLite kernels and XNNPACK alike):
- dynamic range (hybrid) FULLY_CONNECTED: the float input row is quantized to int8 at run time,
  asymmetric (scale (max(x,0) - min(x,0)) / 255, nudged zero point, clamp to [-128, 127]: the
  TFLite kernel with the op's asymmetric_quantize_inputs option, and XNNPACK's qd8 always) or
  symmetric (scale max|x| / 127: TFLite's kernel without the option); the int32 accumulation
  is exact; the result is scaled back and the float bias added in float32. Each input value
  is then off by at most scale / 2.
- full integer int8 FULLY_CONNECTED: the input is on its grid, the accumulation (with the
  int32 bias) is exact, and the requantization to the output grid rounds to nearest (fixed
  point or float multiplier), then clamps to the grid; a fused ReLU clamps at the zero point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verifier.bounds import PreparedChain, prepare_chain
from verifier.errors import UnsupportedModelError
from verifier.network import Affine, LoweredLayer, MaxPool, Relu


@dataclass(frozen=True)
class Grid:
    """A fixed quantization grid: step `scale`, dequantized range [lo, hi]."""

    scale: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Event:
    """One rounding of a tensor v = gain * t + shift (per element t of an Affine layer's input
    or output, flat): to the fixed `grid` (in v's units; round to nearest, then clamp), or,
    with no grid, dynamically (asymmetric, `levels` steps over [min(v, 0), max(v, 0)] of the
    whole tensor, as ONNX Runtime's DynamicQuantizeLinear). `extra`: further error in steps."""

    gain: np.ndarray | float
    shift: np.ndarray | float
    grid: Grid | None
    levels: int = 255
    extra: float = 0.0


@dataclass(frozen=True)
class PairSums:
    """An integer kernel that adds u8 x s8 products in pairs into int16 with saturation
    (x86 AVX2 VPMADDUBSW, used by ONNX Runtime's u8s8 GEMM and convolution without VNNI).

    Per Affine output row j, |integer weight ji| = |W_ji| / (unit_j |gain_i|); the kernel's
    unsigned input is (gain_i t_i + shift_i) / grid.scale + offset (offset: the zero point, +128
    for an int8 input run as uint8); with no grid the input is quantized per run (dynamic)."""

    unit: np.ndarray
    gain: np.ndarray | float
    shift: np.ndarray | float
    grid: Grid | None
    offset: float = 0.0


@dataclass(frozen=True)
class Rounding:
    """What the runtime rounds around one Affine layer besides float32 arithmetic."""

    dynamic_input: bool = False  # the input row is quantized to int8 at run time (hybrid)
    symmetric_input: bool = False  # ... possibly symmetric (the file's kernel option)
    input_grid: Grid | None = None  # the input is quantized to this fixed grid (model input)
    output_grid: Grid | None = None  # the output is requantized to this grid, then clamped
    multiplier: float = 0.0  # largest requantization multiplier s_in * s_w / s_out
    inputs: tuple = ()  # further Events on the input, in order (after input_grid)
    outputs: tuple = ()  # further Events on the output, in order (before output_grid)
    pairs: PairSums | None = None  # int16 pair sums that may saturate in the accumulation


@dataclass(frozen=True)
class ErrorModel:
    """The runtime's chain (weights from its file) and the rounding of each of its layers."""

    chain: PreparedChain
    rounding: list  # per layer: Rounding for Affine layers, None for Relu / MaxPool
    source: str  # what was mapped, e.g. "litert dynamic range (hybrid int8)"
    how: str = ""  # one line: how the runtime's rounding is modelled (for the report)

    def describe(self) -> dict[str, Any]:
        """A short record for run metadata."""
        kinds = [_kind(r) for r in self.rounding if r is not None]
        return {
            "error_model": True,
            "source": self.source,
            "affine_layers": kinds,
            "how": self.how,
        }


def _kind(r: Rounding) -> str:
    if r.dynamic_input or any(e.grid is None for e in r.inputs):
        return "dynamic int8 input"
    if r.output_grid is not None or any(e.grid is not None for e in r.outputs):
        return "static int8"
    if any(e.grid is not None for e in r.inputs):
        return "quantized input"
    return "float32"


# How each kind of TFLite layer is modelled, one phrase each (ErrorModel.how).
TFLITE_HOW = {
    "dynamic range (hybrid int8)": (
        "hybrid layers: int8 weights from the file, the float input quantized per run to int8 "
        "(scale from its range over the region, half a step per value)"
    ),
    "float": "float layers: the file's weights (float16 or float32)",
    "int8": (
        "int8 layers: weights and int32 biases from the file, inputs and outputs on the file's "
        "grids (half a step per requantization plus the fixed-point multiplier's rounding, "
        "saturation bounded by how far the region's intervals leave the grid)"
    ),
}


def error_model(runner: Any, chain: list[LoweredLayer] | PreparedChain) -> ErrorModel:
    """The error model of `runner` checked against the float `chain`'s shape.

    Raises UnsupportedModelError naming the op (or the mismatch) when the runtime's graph
    cannot be mapped onto the chain.
    """
    from quantize.litert import TfliteRunner
    from quantize.onnx_error_model import onnx_error_model
    from quantize.ort_runner import OrtRunner

    if isinstance(runner, TfliteRunner):
        model = tflite_error_model(runner.path)
    elif isinstance(runner, OrtRunner):
        model = onnx_error_model(runner.path)
    else:
        backend = getattr(runner, "describe", lambda: {})().get("backend", type(runner).__name__)
        raise UnsupportedModelError(f"no error model for {backend} runtimes")
    _check_shapes(model.chain.layers, prepare_chain(chain).layers)
    return model


def error_models(runners: dict, chain: list[LoweredLayer] | PreparedChain) -> dict:
    """name -> ErrorModel, or the reason (a string) why that runner has none."""
    out: dict = {}
    for name, runner in runners.items():
        try:
            out[name] = error_model(runner, chain)
        except UnsupportedModelError as exc:
            out[name] = f"no error model: {exc}"
    return out


def describe_error_model(model: ErrorModel | str | None) -> dict[str, Any]:
    """Run metadata: the model's record, or why there is none."""
    if isinstance(model, ErrorModel):
        return model.describe()
    return {"error_model": False, "reason": model or "no error model"}


def _check_shapes(got: list[LoweredLayer], want: list[LoweredLayer]) -> None:
    """The runtime's chain must have the float chain's layer kinds and Affine shapes."""
    kinds = [type(x).__name__ for x in got]
    if kinds != [type(x).__name__ for x in want]:
        raise UnsupportedModelError(
            f"the runtime's layers {kinds} do not match the float chain's "
            f"{[type(x).__name__ for x in want]}"
        )
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if isinstance(a, Affine) and a.weight.shape != b.weight.shape:
            raise UnsupportedModelError(
                f"layer {i}: the runtime's weight is {a.weight.shape}, the float chain's "
                f"{b.weight.shape}"
            )
        if isinstance(a, MaxPool) and not np.array_equal(a.windows, b.windows):
            raise UnsupportedModelError(f"layer {i}: max pool windows differ")


# --- TFLite ------------------------------------------------------------------------------------


def tflite_error_model(path: str | Path) -> ErrorModel:
    """Map a .tflite file's ops (in order) onto Affine / Relu layers with their rounding."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    path = Path(path)
    fb = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    if fb.SubgraphsLength() != 1:
        raise UnsupportedModelError(f"{fb.SubgraphsLength()} subgraphs (one expected)")
    graph = fb.Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise UnsupportedModelError("expected one input and one output tensor")
    # the stored tensors, without the XNNPACK delegate (it rewrites weight scales in memory)
    interp = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    mapper = _TfliteMapper(interp, tensors, int(graph.Inputs(0)))
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = fb.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        mapper.op(k, name, op, schema)
    if mapper.act != int(graph.Outputs(0)):
        raise UnsupportedModelError("the last mapped op does not produce the model's output")
    if not mapper.layers:
        raise UnsupportedModelError("no FULLY_CONNECTED op found")
    how = "; ".join(TFLITE_HOW[k] for k in sorted(mapper.kinds)) + "; float32 bounded per neuron"
    return ErrorModel(prepare_chain(mapper.layers), mapper.rounding, mapper.source(), how)


class _TfliteMapper:
    """Walks the ops in order, following the one running activation tensor."""

    def __init__(self, interp: Any, tensors: dict, input_index: int):
        self.interp, self.tensors = interp, tensors
        self.act = input_index
        self.consts: dict[int, np.ndarray] = {}  # float values of DEQUANTIZE'd constants
        self.layers: list[LoweredLayer] = []
        self.rounding: list = []
        self.kinds: set[str] = set()
        self.pending_grid: Grid | None = None  # the model input's QUANTIZE grid
        detail = tensors[input_index]
        if detail["dtype"] != np.float32:  # integer input: the runner quantizes it
            self.pending_grid = _grid(detail)

    def op(self, k: int, name: str, op: Any, schema: Any) -> None:
        """Map op number `k` onto the chain, or raise naming it."""
        ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [int(i) for i in op.OutputsAsNumpy()]
        if name == "DEQUANTIZE" and ins and ins[0] != self.act:
            self.consts[outs[0]] = self._value(ins[0])
            return
        if not ins or ins[0] != self.act:
            raise UnsupportedModelError(f"op {name} (#{k}) does not take the running activation")
        if name == "FULLY_CONNECTED":
            self._fully_connected(k, op, ins, outs[0], schema)
        elif name == "RESHAPE":
            before, after = self.tensors[ins[0]]["shape"], self.tensors[outs[0]]["shape"]
            if before[0] != after[0] or np.prod(before) != np.prod(after):
                raise UnsupportedModelError(f"op RESHAPE (#{k}) is not a flatten")
        elif name == "QUANTIZE" and not self.layers and self.pending_grid is None:
            if self.tensors[outs[0]]["dtype"] != np.int8:
                raise UnsupportedModelError(f"op QUANTIZE (#{k}) to a non-int8 type")
            self.pending_grid = _grid(self.tensors[outs[0]])
        elif name == "DEQUANTIZE" and self.tensors[ins[0]]["dtype"] == np.int8:
            pass  # the int8 logits to float: exact values of the grid
        elif name == "RELU" and self.tensors[ins[0]]["dtype"] == np.float32:
            self.layers.append(Relu())
            self.rounding.append(None)
        else:
            raise UnsupportedModelError(f"op {name} (#{k}) is not supported")
        self.act = outs[0]

    def _fully_connected(self, k: int, op: Any, ins: list, out: int, schema: Any) -> None:
        opts = schema.FullyConnectedOptions()
        table = op.BuiltinOptions()
        opts.Init(table.Bytes, table.Pos)
        if opts.WeightsFormat() != 0 or opts.KeepNumDims():
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}): weights format / keep dims")
        act_fn = opts.FusedActivationFunction()
        if act_fn not in (schema.ActivationFunctionType.NONE, schema.ActivationFunctionType.RELU):
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}): fused activation {act_fn}")
        x, w_idx, out_d = self.tensors[ins[0]], ins[1], self.tensors[out]
        weight = self._value(w_idx).astype(np.float64)
        if weight.ndim != 2:
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}): weight of rank {weight.ndim}")
        has_bias = len(ins) > 2 and ins[2] >= 0
        if x["dtype"] == np.float32 and out_d["dtype"] == np.float32:
            bias = self._value(ins[2]) if has_bias else np.zeros(len(weight))
            hybrid = w_idx not in self.consts and self.tensors[w_idx]["dtype"] == np.int8
            rounding = Rounding(hybrid, hybrid and not opts.AsymmetricQuantizeInputs())
            self.kinds.add("dynamic range (hybrid int8)" if hybrid else "float")
        elif x["dtype"] == np.int8 and out_d["dtype"] == np.int8:
            bias, rounding = self._static(k, x, w_idx, ins[2] if has_bias else -1, out_d, weight)
            self.kinds.add("int8")
        else:
            raise UnsupportedModelError(
                f"op FULLY_CONNECTED (#{k}): {np.dtype(x['dtype']).name} input, "
                f"{np.dtype(out_d['dtype']).name} output"
            )
        if rounding.input_grid is None and self.pending_grid is not None and not self.layers:
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}) after an input QUANTIZE")
        self.layers.append(Affine(weight, np.asarray(bias, dtype=np.float64)))
        self.rounding.append(rounding)
        if act_fn == schema.ActivationFunctionType.RELU:
            self.layers.append(Relu())
            self.rounding.append(None)

    def _static(self, k: int, x: dict, w_idx: int, b_idx: int, out_d: dict, weight: np.ndarray):
        """Bias and rounding of an int8 FULLY_CONNECTED (grids from the file)."""
        s_in = _scales(x)
        s_w = _scales(self.tensors[w_idx])
        if s_in.size != 1 or s_w.size not in (1, len(weight)):
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}): scale shapes")
        acc_scale = s_in[0] * np.broadcast_to(s_w, (len(weight),))
        if b_idx >= 0:  # the kernel adds the int32 bias to the accumulator as is
            bias = self.interp.get_tensor(b_idx).astype(np.float64) * acc_scale
        else:
            bias = np.zeros(len(weight))
        out_grid = _grid(out_d)
        first = not self.layers
        in_grid = self.pending_grid if first else None
        if first and in_grid is None:
            raise UnsupportedModelError(f"op FULLY_CONNECTED (#{k}): int8 input of unknown origin")
        return bias, Rounding(
            input_grid=in_grid,
            output_grid=out_grid,
            multiplier=float(acc_scale.max() / out_grid.scale),
        )

    def _value(self, idx: int) -> np.ndarray:
        """A constant tensor's float value: dequantized with its scales / zero points."""
        if idx in self.consts:
            return self.consts[idx]
        d = self.tensors[idx]
        raw = self.interp.get_tensor(idx)
        if raw.dtype in (np.float32, np.float16):
            return raw.astype(np.float64)
        q = d["quantization_parameters"]
        scales, zps = np.asarray(q["scales"], np.float64), np.asarray(q["zero_points"], np.float64)
        if not scales.size:
            raise UnsupportedModelError(f"tensor {d['name']}: {raw.dtype} without scales")
        shape = [1] * raw.ndim
        if scales.size > 1:
            shape[int(q["quantized_dimension"])] = -1
        return (raw.astype(np.float64) - zps.reshape(shape)) * scales.reshape(shape)

    def source(self) -> str:
        """What the mapped ops compute, for the run metadata."""
        return "litert " + " + ".join(sorted(self.kinds))


def _scales(d: dict) -> np.ndarray:
    return np.asarray(d["quantization_parameters"]["scales"], dtype=np.float64)


def _grid(d: dict) -> Grid:
    """The int8 grid of a per-tensor quantized activation tensor."""
    q = d["quantization_parameters"]
    if len(q["scales"]) != 1 or d["dtype"] != np.int8:
        raise UnsupportedModelError(f"tensor {d['name']}: not a per-tensor int8 activation")
    s, zp = float(q["scales"][0]), int(q["zero_points"][0])
    return Grid(s, s * (-128 - zp), s * (127 - zp))
