"""What a quantized runtime computes, as the engine's chain plus how each layer is rounded.

An `ErrorModel` is the lowered chain with the weights and biases the quantized file holds
(dequantized from the file, never taken from the float model), and per Affine layer a
`Rounding`: what the runtime rounds besides its float32 arithmetic.
`verifier.engine.bounds` turns it into per-neuron error bounds over a region
(`rounding_errors`), so bounds and branch and bound speak for the runtime itself.

Runtime behaviours assumed (TFLite kernels and XNNPACK alike):
- dynamic range (hybrid) FULLY_CONNECTED: the float input row is quantized to int8 at run time,
  asymmetric (scale (max(x,0) - min(x,0)) / 255, nudged zero point, clamp to [-128, 127]: the
  TFLite kernel with the op's asymmetric_quantize_inputs option, and XNNPACK's qd8 always) or
  symmetric (scale max|x| / 127: TFLite's kernel without the option); the int32 accumulation
  is exact; the result is scaled back and the float bias added in float32. Each input value
  is then off by at most scale / 2. Hybrid CONV_2D: per image, asymmetric when the weights
  have per-channel scales that differ (LiteRT's per-channel kernel; XNNPACK alike), else
  possibly symmetric.
- full integer int8 FULLY_CONNECTED: the input is on its grid, the accumulation (with the
  int32 bias) is exact, and the requantization to the output grid rounds to nearest (fixed
  point or float multiplier), then clamps to the grid; a fused ReLU clamps at the zero point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantize.rounding import ErrorModel, Grid, Rounding
from verifier.engine.bounds import PreparedChain, prepare_chain
from verifier.engine.network import Affine, LoweredLayer, MaxPool, Relu
from verifier.errors import UnsupportedModelError

# How each kind of TFLite layer is modelled, one phrase each (ErrorModel.how).
TFLITE_HOW = {
    "dynamic range (hybrid int8)": (
        "hybrid layers: int8 weights from the file, the float input quantized per run to int8 "
        "(scale from its range over the region, half a step per value; a ReLU's output taken "
        "on its grid at each point the sieve bounds where the kernel is asymmetric)"
    ),
    "float": "float layers: the file's weights (float16 or float32)",
    "16x8": (
        "16x8 layers: int8 weights and int64 biases from the file, int16 inputs and outputs on "
        "the file's grids (half a step per requantization plus the multiplier's rounding, "
        "saturation bounded by how far the region's intervals leave the grid; bounds on an "
        "output cut to its grid's points)"
    ),
    "int8": (
        "int8 layers: weights and int32 biases from the file, inputs and outputs on the file's "
        "grids (half a step per requantization plus the fixed-point multiplier's rounding, "
        "saturation bounded by how far the region's intervals leave the grid; bounds on an "
        "output cut to its grid's points)"
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
    """Map a .tflite file's ops (in order) onto the chain, with the rounding of each layer."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from quantize.quant_chain import lower_marked

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
    mapper = _TfliteMapper(interp, tensors, int(graph.Inputs(0)), schema)
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = fb.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        mapper.op(k, name, op)
    if mapper.act != int(graph.Outputs(0)):
        raise UnsupportedModelError("the last mapped op does not produce the model's output")
    if not mapper.kinds:
        raise UnsupportedModelError("no FULLY_CONNECTED or CONV_2D op found")
    chain, rounding = lower_marked(mapper.input_shape, mapper.layers, mapper.marks)
    rounding = [None if r is None else _plain_fields(r) for r in rounding]
    rounding = _integer_layers(rounding, mapper.integer)
    how = "; ".join(TFLITE_HOW[k] for k in sorted(mapper.kinds)) + "; float32 bounded per neuron"
    return ErrorModel(prepare_chain(chain), rounding, mapper.source(), how)


def _integer_layers(rounding: list, integer: list[bool]) -> list:
    """Each Affine's Rounding marked `integer` when its weighted op accumulates in integers
    (int8 / 16x8: int32 / int64 accumulator and bias; hybrid: int8 weights times the int8
    quantized input, then scaled and the float bias added), one weighted op per Affine;
    unchanged when ops and Affines do not pair up."""
    from dataclasses import replace

    at = [k for k, r in enumerate(rounding) if r is not None]
    if len(at) != len(integer):
        return rounding
    out = list(rounding)
    for k, exact in zip(at, integer, strict=True):
        out[k] = replace(out[k], integer=exact)
    return out


def _plain_fields(r: Rounding) -> Rounding:
    """TFLite roundings on the layer's own input / output in the plain fields (a hybrid row
    quantization, the input and output grids), as consumers of those fields expect."""
    from dataclasses import replace

    ins, outs = list(r.inputs), list(r.outputs)
    if ins and ins[0].plain and ins[0].grid is None:
        r = replace(r, dynamic_input=True, symmetric_input=ins[0].levels != 255)
        ins.pop(0)
    elif ins and ins[0].plain and ins[0].extra == 0.0:
        r = replace(r, input_grid=ins.pop(0).grid)
    if outs and outs[-1].plain and outs[-1].grid is not None:
        last = outs.pop()
        r = replace(r, output_grid=last.grid, multiplier=last.extra)
    return replace(r, inputs=tuple(ins), outputs=tuple(outs))


class _TfliteMapper:
    """Walks the ops in order, following the one running activation tensor (NHWC as stored;
    convolutions and pools are wrapped in layout transposes, which fold away)."""

    def __init__(self, interp: Any, tensors: dict, input_index: int, schema: Any):
        from quantize.quant_chain import Mark

        self.interp, self.tensors, self.schema = interp, tensors, schema
        self.act = input_index
        self.consts: dict[int, np.ndarray] = {}  # float values of DEQUANTIZE'd constants
        self.layers: list[LoweredLayer] = []
        self.marks: list = []
        self.kinds: set[str] = set()
        self.integer: list[bool] = []  # per weighted op: an integer accumulation
        self.input_shape = tuple(int(v) for v in tensors[input_index]["shape"][1:])
        self.shape = self.input_shape
        self.on_grid: Grid | None = None
        detail = tensors[input_index]
        if detail["dtype"] != np.float32:  # integer input: the runner quantizes it
            self.on_grid = _grid(detail)
            self.marks.append(Mark(0, self.on_grid))

    def op(self, k: int, name: str, op: Any) -> None:
        """Map op number `k` onto the chain, or raise naming it."""
        from verifier.engine.network import Reshape, Transpose

        ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [int(i) for i in op.OutputsAsNumpy()]
        if name == "DEQUANTIZE" and ins and ins[0] != self.act:
            self.consts[outs[0]] = self._value(ins[0])
            return
        if not ins or ins[0] != self.act:
            raise UnsupportedModelError(f"op {name} (#{k}) does not take the running activation")
        x, y = self.tensors[ins[0]], self.tensors[outs[0]]
        if name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            self._weighted(k, name, op, ins, x, y)
        elif name == "RESHAPE":
            self._add([Reshape(tuple(int(v) for v in y["shape"][1:]))])
        elif name == "TRANSPOSE":
            perm = [int(v) for v in self.interp.get_tensor(ins[1])]
            if perm[0] != 0:
                raise UnsupportedModelError(f"op TRANSPOSE (#{k}) moves the batch axis")
            self._add([Transpose(tuple(p - 1 for p in perm[1:]))])
        elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            self._pool(k, name, op, x, y)
        elif name == "QUANTIZE":
            if y["dtype"] not in (np.int8, np.int16):
                raise UnsupportedModelError(f"op QUANTIZE (#{k}) to {np.dtype(y['dtype']).name}")
            self._round(_grid(y))
        elif name == "DEQUANTIZE" and x["dtype"] in (np.int8, np.int16):
            if _grid(x) != self.on_grid:
                raise UnsupportedModelError(f"op DEQUANTIZE (#{k}) off its input's grid")
        elif name == "RELU":
            self._add([Relu()])
            if x["dtype"] != np.float32:
                self._round(_grid(y))
        else:
            raise UnsupportedModelError(f"op {name} (#{k}) is not supported")
        self.act = outs[0]

    def _add(self, new: list) -> None:
        from quantize.quant_chain import structural
        from verifier.engine.network import Transpose

        for layer in new:
            if isinstance(layer, Transpose) and self._cancel(layer):
                continue
            self.shape = tuple(layer.forward(np.zeros((1, *self.shape))).shape[1:])
            self.layers.append(layer)
            if not structural(layer):
                self.on_grid = None

    def _cancel(self, t: Any) -> bool:
        """Drop a layout transpose that undoes the one before it (across a ReLU, which
        commutes with it), so pools and convolutions meet as in the float chain."""
        from dataclasses import replace

        from verifier.engine.network import Transpose

        last = len(self.layers) - 1
        at = last - 1 if last >= 0 and isinstance(self.layers[last], Relu) else last
        prev = self.layers[at] if at >= 0 else None
        if not isinstance(prev, Transpose) or [prev.perm[p] for p in t.perm] != sorted(t.perm):
            return False
        self.shape = tuple(self.shape[p] for p in np.argsort(prev.perm))
        del self.layers[at]
        self.marks = [
            m if m.position <= at else replace(m, position=m.position - 1) for m in self.marks
        ]
        return True

    def _round(self, grid: Grid | None, levels: int = 255, extra: float = 0.0) -> None:
        from quantize.quant_chain import Mark

        if grid is not None and grid == self.on_grid:
            return
        self.marks.append(Mark(len(self.layers), grid, levels, extra))
        self.on_grid = grid

    def _options(self, op: Any, cls: Any) -> Any:
        opts = cls()
        table = op.BuiltinOptions()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def _activation(self, k: int, name: str, opts: Any) -> bool:
        """Whether the op has a fused ReLU (other fused activations are refused)."""
        act = opts.FusedActivationFunction()
        kinds = self.schema.ActivationFunctionType
        if act not in (kinds.NONE, kinds.RELU):
            raise UnsupportedModelError(f"op {name} (#{k}): fused activation {act}")
        return act == kinds.RELU

    def _weighted(self, k: int, name: str, op: Any, ins: list, x: dict, y: dict) -> None:
        """FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D: float, hybrid or integer."""
        schema = self.schema
        w_idx = ins[1]
        weight = self._value(w_idx).astype(np.float64)
        has_bias = len(ins) > 2 and ins[2] >= 0
        if name == "FULLY_CONNECTED":
            opts = self._options(op, schema.FullyConnectedOptions)
            if opts.WeightsFormat() != 0 or opts.KeepNumDims():
                raise UnsupportedModelError(f"op {name} (#{k}): weights format / keep dims")
            hybrid_sym = not opts.AsymmetricQuantizeInputs()
        elif name == "CONV_2D":
            opts = self._options(op, schema.Conv2DOptions)
            hybrid_sym = not _per_channel(self.tensors[w_idx])
        else:
            opts = self._options(op, schema.DepthwiseConv2DOptions)
            hybrid_sym = False
        relu = self._activation(k, name, opts)
        n_out = weight.shape[0] if name != "DEPTHWISE_CONV_2D" else weight.shape[-1]
        xt, yt = x["dtype"], y["dtype"]
        if xt == np.float32 and yt == np.float32:
            bias = self._value(ins[2]) if has_bias else np.zeros(n_out)
            hybrid = w_idx not in self.consts and self.tensors[w_idx]["dtype"] == np.int8
            if hybrid:
                self._round(None, 127 if hybrid_sym else 255)
            self.kinds.add("dynamic range (hybrid int8)" if hybrid else "float")
            out_grid, extra, integer = None, 0.0, hybrid  # hybrid: int8 x int8 accumulated
        elif xt in (np.int8, np.int16) and yt == xt:
            in_grid = _grid(x)
            if in_grid != self.on_grid:
                raise UnsupportedModelError(f"op {name} (#{k}): integer input of unknown origin")
            s_w = np.broadcast_to(_scales(self.tensors[w_idx]), (n_out,))
            acc = in_grid.scale * s_w
            bias = self.interp.get_tensor(ins[2]).astype(np.float64) * acc if has_bias else 0
            bias = np.broadcast_to(bias, (n_out,))
            out_grid = _grid(y)
            extra, integer = min(0.5, float(acc.max() / out_grid.scale)), True
            self.kinds.add("int8" if xt == np.int8 else "16x8")
        else:
            raise UnsupportedModelError(
                f"op {name} (#{k}): {np.dtype(xt).name} input, {np.dtype(yt).name} output"
            )
        self._add(self._layers(k, name, opts, weight, np.asarray(bias, np.float64)))
        self.integer.append(integer)
        if out_grid is not None:
            self._round(out_grid, extra=extra)
        if relu:
            self._add([Relu()])
            self.on_grid = out_grid

    def _layers(self, k: int, name: str, opts: Any, weight: np.ndarray, bias: np.ndarray):
        """The network layers of a weighted op on the NHWC activation."""
        from verifier.engine.network import Conv, Dense, Reshape, Transpose

        if name == "FULLY_CONNECTED":
            if weight.ndim != 2 or int(np.prod(self.shape)) != weight.shape[1]:
                raise UnsupportedModelError(f"op {name} (#{k}): weight {weight.shape}")
            flat = [] if len(self.shape) == 1 else [Reshape((weight.shape[1],))]
            return [*flat, Dense(weight, bias)]
        if len(self.shape) != 3:
            raise UnsupportedModelError(f"op {name} (#{k}) on a {len(self.shape)}-D activation")
        if name == "CONV_2D":
            w, group = weight.transpose(0, 3, 1, 2), 1  # OHWI -> OIHW
        else:  # depthwise (1, kh, kw, C * m) -> (C * m, 1, kh, kw), one group per channel
            w, group = weight[0].transpose(2, 0, 1)[:, None], self.shape[2]
        dil = (opts.DilationHFactor(), opts.DilationWFactor())
        strides = (opts.StrideH(), opts.StrideW())
        pads = _same_pads(opts.Padding(), self.shape[:2], w.shape[2:], strides, dil)
        conv = Conv(np.ascontiguousarray(w), bias, strides, pads, dil, group)
        return [Transpose((2, 0, 1)), conv, Transpose((1, 2, 0))]

    def _pool(self, k: int, name: str, op: Any, x: dict, y: dict) -> None:
        from verifier.engine.network import Pool, Transpose

        opts = self._options(op, self.schema.Pool2DOptions)
        relu = self._activation(k, name, opts)
        kernel = (opts.FilterHeight(), opts.FilterWidth())
        strides = (opts.StrideH(), opts.StrideW())
        pads = _same_pads(opts.Padding(), self.shape[:2], kernel, strides, (1, 1))
        kind = "max" if name == "MAX_POOL_2D" else "avg"
        grid = self.on_grid
        self._add([Transpose((2, 0, 1)), Pool(kind, kernel, strides, pads), Transpose((1, 2, 0))])
        if x["dtype"] != np.float32:
            if kind == "max" and _grid(y) == grid:
                self.on_grid = grid
            else:
                self._round(_grid(y))
        if relu:
            self._add([Relu()])

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


def _same_pads(padding: int, hw, kernel, strides, dil) -> tuple[int, int, int, int]:
    """TFLite's padding (0: SAME, 1: VALID) as (top, left, bottom, right)."""
    if padding == 1:
        return (0, 0, 0, 0)
    pads = []
    for size, k, s, d in zip(hw, kernel, strides, dil, strict=True):
        out = -(-size // s)
        pads.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
    return (pads[0] // 2, pads[1] // 2, pads[0] - pads[0] // 2, pads[1] - pads[1] // 2)


def _scales(d: dict) -> np.ndarray:
    return np.asarray(d["quantization_parameters"]["scales"], dtype=np.float64)


def _per_channel(d: dict) -> bool:
    """Whether a hybrid CONV_2D's int8 weights have per-channel scales that differ: LiteRT then
    runs its per-channel kernel, which quantizes each image's float input asymmetrically (255
    steps over [min(x, 0), max(x, 0)]), as XNNPACK's qd8 does; with one scale its kernel is
    symmetric (max|x| / 127). Measured: tests/test_error_model.py."""
    s = _scales(d)
    return s.size > 1 and bool(np.any(s != s[0]))


def _grid(d: dict) -> Grid:
    """The int8 / int16 grid of a per-tensor quantized activation tensor."""
    q = d["quantization_parameters"]
    if len(q["scales"]) != 1 or d["dtype"] not in (np.int8, np.int16):
        raise UnsupportedModelError(f"tensor {d['name']}: not a per-tensor int8 activation")
    s, zp = float(q["scales"][0]), int(q["zero_points"][0])
    lo, hi = (-128, 127) if d["dtype"] == np.int8 else (-32768, 32767)
    return Grid(s, s * (lo - zp), s * (hi - zp))
