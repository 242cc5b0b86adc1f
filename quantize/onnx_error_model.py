"""The error model of an ONNX file run by onnxruntime: static QDQ and QOperator, dynamic, and
simulated n-bit graphs, MLPs and CNNs.

The file's graph (constants folded at batch 1, as the float importer does) is walked along its
one running activation. Weights are the file's own, dequantized with its scales and zero
points (per tensor or per channel); every place the activation is rounded becomes a
`quant_chain.Mark`: QuantizeLinear and the outputs of QLinearConv / QLinearMatMul / QGemm /
QLinearAdd / QLinearMul to their fixed grid (round to nearest, then saturate), a
DynamicQuantizeLinear to its per-run uint8 grid, a simulated Div / Round / Clip / Mul to its
levels. A DequantizeLinear of the activation is exact (it must use the grid its input was
quantized to). Grid values pass Reshape / Transpose / MaxPool / Relu unchanged, so a repeated
quantization to the same grid costs nothing; a grid whose lowest value is 0 after a weighted
layer is a ReLU (the quantizer drops that ReLU), and one is added to the chain.

What runs: onnxruntime's optimizer fuses DequantizeLinear -> op -> QuantizeLinear groups into
QLinearConv / QLinearMatMul / QGemm and MatMulInteger groups into DynamicQuantizeMatMul, but not
every group (the example CNN's second convolution stays a float Conv): which ones is read from
the graph the optimizer writes out on this machine (`ort_runner.optimized_graph`). Fused kernels
accumulate in int32 exactly (u8 x s8 ones in int16 pairs first, `quantize.cpu`) and requantize
with one float multiplier, rounding to nearest even and saturating; an unfused group computes in
float32 on the dequantized values. Both give the unfused graph's value up to float32 rounding
(and the pair sums' saturation), which the half step's margin
(`verifier.engine.bounds.HALF_STEP`) and the per-layer float32 bound cover.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.cpu import int16_pair_sums
from quantize.ort_runner import FLOAT_WEIGHT_OPS, optimized_graph
from quantize.quant_chain import Mark, PairMark, lower_marked, structural
from quantize.rounding import ErrorModel, Grid, Rounding
from verifier.engine.bounds import prepare_chain
from verifier.engine.network import Conv, Dense, Layer, Pool, Relu
from verifier.errors import UnsupportedModelError

RANGES = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.uint16): (0, 65535),
}

# Float ops onnxruntime's optimizer makes of a float Conv / Gemm / MatMul (an activation or an
# add fused in, a blocked layout): still float32 arithmetic.
FUSED_FLOAT_OPS = ("FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv")

# onnxruntime's integer kernels with an activation zero point (input 2) and int8 weights (3)
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm")

# What each kind of graph's rounding is, one line each (ErrorModel.how).
HOW = {
    "static": (
        "weights and biases dequantized from the file's own scales and zero points; every "
        "quantized activation rounded to its grid (half a step, saturation bounded by how far "
        "the region's intervals leave the grid; bounds on a requantized output cut to its "
        "grid's points), int32 accumulation exact, float32 bounded"
    ),
    "dynamic": (
        "int8 weights dequantized from the file; each weighted layer's input quantized per run "
        "to uint8 over its range and 0 (half a step, the range bounded over the region; a "
        "ReLU's output taken on its grid at each point the sieve bounds); float32 bounded"
    ),
    "simulated": (
        "the file's fake-quantized weights; each simulated activation rounded to its levels "
        "(half a step, the clip bounded by how far the region's intervals leave them); "
        "float32 bounded"
    ),
    "float": "the file's float weights; float32 rounding bounded per neuron",
}


def onnx_error_model(path: str | Path) -> ErrorModel:
    """Map an ONNX file onto Affine / Relu / MaxPool layers with the rounding of each."""
    from verifier.engine.onnx_import import fold_constants

    model = fold_constants(onnx.load(str(path)))
    walker = _Walker(model)
    walker.float_run, walker.unsigned = run_kernels(optimized_graph(path))
    rounds = {i for n in model.graph.node if n.op_type == "Round" for i in n.input}
    walker.sim_divs = {n.output[0] for n in model.graph.node if n.op_type == "Div"} & rounds
    for node in model.graph.node:
        walker.node(node)
    if walker.sim is not None:
        raise UnsupportedModelError("a simulated quantization pattern is cut short")
    if walker.act != model.graph.output[0].name:
        raise UnsupportedModelError("the graph output is not the end of the layer chain")
    if not any(isinstance(x, (Dense, Conv)) for x in walker.layers):
        raise UnsupportedModelError("no weighted layer found")
    chain, rounding = lower_marked(walker.input_shape, walker.layers, walker.marks, walker.pairs)
    rounding = [None if r is None else _run_time_input(r) for r in rounding]
    kind = walker.kind()
    return ErrorModel(prepare_chain(chain), rounding, f"onnxruntime {kind}", HOW[kind])


class _Walker:
    """Follows the running activation through the nodes in order."""

    def __init__(self, model: onnx.ModelProto):
        from verifier.engine.onnx_import import _graph_inputs

        inits = {i.name for i in model.graph.initializer}
        inputs = _graph_inputs(model)
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise UnsupportedModelError("expected one graph input and one output")
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
            raise UnsupportedModelError(f"input dims {dims} are not fixed")
        self.input_shape = tuple(dims[1:])
        self.shape = self.input_shape
        self.consts = {
            i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in inits
        }
        self.act = inputs[0].name
        self.layers: list[Layer] = []
        self.marks: list[Mark] = []
        self.pairs: list[PairMark] = []  # layers run by integer kernels with int16 pair sums
        self.int8_weights: dict[str, np.ndarray] = {}  # DequantizeLinear'd int8 weights: scales
        self.int8_source: dict[str, str] = {}  # ... and the int8 initializer each comes from
        self.float_run: set[str] = set()  # int8 weights onnxruntime runs in a float op
        self.unsigned: set[str] = set()  # ... in an integer kernel on a uint8 input
        self.on_grid: Grid | None = None  # the running tensor's values lie on this grid
        self.dynamic = False  # the running tensor is quantized per run (DynamicQuantizeLinear)
        self.weighted = False  # a weighted layer since the last ReLU / max pool
        self.roles: dict[str, str] = {}  # run-time scale / zero point tensors of dynamic ops
        self.sim: tuple | None = None  # a simulated Div / Round / Clip / Mul in progress
        self.ops: set[str] = set()
        self.sim_divs: set[str] = set()  # Div nodes that start a simulated quantization

    # --- dispatch ---------------------------------------------------------------------------

    def node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        self.ops.add(op)
        if op == "Constant":
            self.consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
            return
        if self.act not in node.input:
            self._side(node)
            return
        if self.sim is not None or (op == "Div" and self._simulated_start(node)):
            self._simulated(node)
            return
        handler = getattr(self, "_" + op, None)
        if handler is not None:
            handler(node)
        else:
            grid = self.on_grid
            self._float(node, node)
            w = node.input[1] if len(node.input) > 1 else ""
            fused = w in self.int8_weights and self.int8_source[w] not in self.float_run
            if op in FLOAT_WEIGHT_OPS and fused:  # an integer kernel: u8 x s8 pair sums
                self._pair(self.int8_weights[w], grid, False, self.int8_source[w])
        self.act = node.output[0]

    def _side(self, node: onnx.NodeProto) -> None:
        """A node off the activation path: a constant dequantization, or dynamic scales."""
        op = node.op_type
        if op == "DequantizeLinear" and all(i in self.consts for i in node.input if i):
            self.consts[node.output[0]] = _dequantize(node, self.consts)
            zp = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else 0
            if self.consts[node.input[0]].dtype == np.int8 and not np.any(zp):
                self.int8_weights[node.output[0]] = self.consts[node.input[1]].reshape(-1)
                self.int8_source[node.output[0]] = node.input[0]
        elif op == "Mul" and any(self.roles.get(i) == "scale" for i in node.input):
            other = [i for i in node.input if self.roles.get(i) != "scale"]
            if len(other) != 1 or other[0] not in self.consts:
                raise UnsupportedModelError(f"Mul (node {node.name!r}) of two run-time scales")
            self.consts[node.output[0]] = self.consts[other[0]].astype(np.float64)
            self.roles[node.output[0]] = "weight scale"
        else:
            raise UnsupportedModelError(
                f"{op} (node {node.name!r}) is neither on the activation path nor a constant"
            )

    # --- layers -----------------------------------------------------------------------------

    def _add(self, new: list[Layer]) -> None:
        from verifier.engine.onnx_import import _shape_after

        for layer in new:
            if isinstance(layer, Relu) and self.layers and isinstance(self.layers[-1], Relu):
                continue  # already clamped at zero by the grid before it
            self.shape = _shape_after(layer, self.shape, None)
            self.layers.append(layer)
            if isinstance(layer, Relu) or (isinstance(layer, Pool) and layer.kind == "max"):
                self.weighted = False
            elif isinstance(layer, (Dense, Conv, Pool)):
                self.weighted = True
            if not structural(layer):
                self.on_grid, self.dynamic = None, False

    def _float(self, node: onnx.NodeProto, real: onnx.NodeProto) -> None:
        """A float op (or the float op a quantized one computes) through the float importer."""
        from verifier.engine.onnx_import import HANDLERS

        if node.op_type not in HANDLERS:
            raise UnsupportedModelError(f"op {real.op_type} (node {real.name!r}) is not supported")
        self._add(HANDLERS[node.op_type](node, self.shape, self.consts))

    def _pair(
        self, weight_scale: np.ndarray, grid: Grid | None, dynamic: bool, weight: str = ""
    ) -> None:
        """The layer just added runs as a u8 x s8 integer kernel (fused by onnxruntime when its
        input is quantized): its int16 pair sums may saturate. `weight`: its int8 initializer
        (whether the kernel onnxruntime runs takes a uint8 input)."""
        if grid is None and not dynamic:
            return  # a float input: not fused, float32 arithmetic
        if not int16_pair_sums():
            return  # this CPU's kernels accumulate in int32 (VNNI) or widen first (SSE)
        shape = self.shape
        ws = np.asarray(weight_scale, dtype=np.float64).reshape(-1)
        if ws.size > 1:
            ws = ws.reshape((-1,) + (1,) * (len(shape) - 1))
        unit = np.broadcast_to(ws, shape).reshape(-1)
        offset = 0.0 if grid is None else -grid.lo / grid.scale
        unsigned = grid is None or weight in self.unsigned
        self.pairs.append(PairMark(len(self.layers) - 1, unit, grid, offset, unsigned))

    def _round(self, grid: Grid | None, levels: int = 255) -> None:
        """The running tensor is rounded here (an exact no-op when already on `grid`)."""
        if grid is not None and grid == self.on_grid:
            return
        self.marks.append(Mark(len(self.layers), grid, levels))
        self.on_grid, self.dynamic = grid, grid is None
        if grid is not None and grid.lo == 0.0 and self.weighted:
            self._add([Relu()])  # saturation at 0: the ReLU the quantizer folded away
            self.on_grid = grid

    # --- quantization ops -------------------------------------------------------------------

    def _QuantizeLinear(self, node: onnx.NodeProto) -> None:
        self._round(_grid(node, self.consts, 1, 2))

    def _DequantizeLinear(self, node: onnx.NodeProto) -> None:
        grid = _grid(node, self.consts, 1, 2)
        if grid != self.on_grid:
            raise UnsupportedModelError(
                f"DequantizeLinear (node {node.name!r}) does not use its input's grid"
            )

    def _quantized(
        self, node: onnx.NodeProto, op: str, ins: list, extra: dict, out: tuple, pair=None
    ):
        """A QLinear* / QGemm node as the float `op` on dequantized constants, then its output
        grid (None: float output); `pair`: its int8 weights' scales (an s8 kernel)."""
        grid, dynamic = self.on_grid, self.dynamic
        names = []
        for k, value in enumerate(ins):
            if value is None:
                names.append(self.act)
                continue
            name = f"{node.output[0]}__in{k}"
            self.consts[name] = value
            names.append(name)
        fake = helper.make_node(op, names, [node.output[0]], **extra)
        self._float(fake, node)
        if pair is not None:
            self._pair(pair, grid, dynamic, node.input[3] if len(node.input) > 3 else "")
        if out is not None:
            self._round(_grid(node, self.consts, *out))

    def _QLinearConv(self, node: onnx.NodeProto) -> None:
        x_grid = _grid(node, self.consts, 1, 2)
        self._check_input(node, x_grid)
        w = _dequantize_parts(node, self.consts, 3, 4, 5, axis=0)
        ins = [None, w]
        if len(node.input) > 8 and node.input[8]:
            ins.append(self.consts[node.input[8]] * (x_grid.scale * _scales(node, self.consts, 4)))
        self._quantized(node, "Conv", ins, _attrs(node), (6, 7), self._s8(node, 3, 4, 5))

    def _QLinearMatMul(self, node: onnx.NodeProto) -> None:
        self._check_input(node, _grid(node, self.consts, 1, 2))
        w = _dequantize_parts(node, self.consts, 3, 4, 5, axis=-1)
        self._quantized(node, "MatMul", [None, w], {}, (6, 7), self._s8(node, 3, 4, 5))

    def _QGemm(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        x_grid = _grid(node, self.consts, 1, 2)
        self._check_input(node, x_grid)
        w = _dequantize_parts(node, self.consts, 3, 4, 5, axis=0 if a.get("transB") else -1)
        ins = [None, w]
        if len(node.input) > 6 and node.input[6]:
            acc = x_grid.scale * _scales(node, self.consts, 4) * a.get("alpha", 1.0)
            ins.append(self.consts[node.input[6]] * acc)
        has_y = len(node.input) > 7 and node.input[7]
        extra = {k: v for k, v in a.items() if k in ("transA", "transB", "alpha")}
        out = (7, 8) if has_y else None
        self._quantized(node, "Gemm", ins, extra, out, self._s8(node, 3, 4, 5))

    def _binary(self, node: onnx.NodeProto, op: str) -> None:
        first = node.input[0] == self.act
        a_grid = _grid(node, self.consts, 1 if first else 4, 2 if first else 5)
        self._check_input(node, a_grid)
        other = _dequantize_parts(node, self.consts, *((3, 4, 5) if first else (0, 1, 2)))
        self._quantized(node, op, [None, other] if first else [other, None], {}, (6, 7))

    def _QLinearAdd(self, node: onnx.NodeProto) -> None:
        self._binary(node, "Add")

    def _QLinearMul(self, node: onnx.NodeProto) -> None:
        self._binary(node, "Mul")

    def _s8(self, node: onnx.NodeProto, kq: int, ks: int, kz: int) -> np.ndarray | None:
        """The weight scales of an int8, zero-point-0 weight input (else None)."""
        q = self.consts[node.input[kq]]
        zp = self.consts[node.input[kz]] if node.input[kz] else 0
        return (
            self.consts[node.input[ks]].reshape(-1)
            if q.dtype == np.int8 and not np.any(zp)
            else None
        )

    def _check_input(self, node: onnx.NodeProto, grid: Grid) -> None:
        if grid != self.on_grid:
            raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): input grid differs")

    # --- dynamic quantization ---------------------------------------------------------------

    def _DynamicQuantizeLinear(self, node: onnx.NodeProto) -> None:
        self._round(None, 255)
        self.roles[node.output[1]] = "scale"
        self.roles[node.output[2]] = "zero point"

    def _integer(self, node: onnx.NodeProto, op: str, axis: int) -> None:
        """MatMulInteger / ConvInteger: the weight minus its zero point, in integer units (the
        following Mul by the scales' product restores the weight scale)."""
        if len(node.input) > 2 and node.input[2] and self.roles.get(node.input[2]) != "zero point":
            raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): input zero point")
        w = self.consts[node.input[1]].astype(np.float64)
        if len(node.input) > 3 and node.input[3]:
            w = w - _along(self.consts[node.input[3]], w.ndim, axis)
        q = self.consts[node.input[1]]
        zp = self.consts[node.input[3]] if len(node.input) > 3 and node.input[3] else 0
        s8 = np.ones(1) if q.dtype == np.int8 and not np.any(zp) else None
        if op == "Conv":  # ConvInteger's kernel does not saturate (measured: test_pair_sums)
            s8 = None
        self._quantized(node, op, [None, w], _attrs(node), None, s8)

    def _MatMulInteger(self, node: onnx.NodeProto) -> None:
        self._integer(node, "MatMul", -1)

    def _ConvInteger(self, node: onnx.NodeProto) -> None:
        self._integer(node, "Conv", 0)

    def _Cast(self, node: onnx.NodeProto) -> None:
        if _attr(node, "to") != onnx.TensorProto.FLOAT:
            raise UnsupportedModelError(f"Cast (node {node.name!r}) to a non-float type")

    # --- simulated quantization (Div, Round, Clip, Mul) --------------------------------------

    def _simulated_start(self, node: onnx.NodeProto) -> bool:
        c = self.consts.get(node.input[1])
        ok = node.input[0] == self.act and c is not None and c.size == 1
        return ok and node.output[0] in self.sim_divs

    def _simulated(self, node: onnx.NodeProto) -> None:
        op, state = node.op_type, self.sim
        if state is None:
            self.sim = ("Div", float(self.consts[node.input[1]]))
        elif op == "Round" and state[0] == "Div":
            self.sim = ("Round", state[1])
        elif op == "Clip" and state[0] == "Round":
            lo, hi = (float(self.consts[node.input[k]]) for k in (1, 2))
            self.sim = ("Clip", state[1], lo, hi)
        elif op == "Mul" and state[0] == "Clip" and self._same_scale(node, state[1]):
            s = state[1]
            self.sim = None
            self._round(Grid(s, state[2] * s, state[3] * s), 0)
        else:
            raise UnsupportedModelError(f"{op} (node {node.name!r}) breaks a Div/Round/Clip/Mul")
        self.act = node.output[0]

    def _same_scale(self, node: onnx.NodeProto, s: float) -> bool:
        other = [i for i in node.input if i != self.act]
        return len(other) == 1 and other[0] in self.consts and float(self.consts[other[0]]) == s

    def kind(self) -> str:
        """Which kind of graph this is (a key of HOW)."""
        if self.ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
            return "dynamic"
        if self.ops & {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm"}:
            return "static"
        if any(m.grid is not None for m in self.marks):
            return "simulated"
        return "float"


# --- helpers ----------------------------------------------------------------------------------


def run_kernels(optimized: onnx.ModelProto | None) -> tuple[set[str], set[str]]:
    """(the int8 weight initializers whose DequantizeLinear still feeds a float Conv / Gemm /
    MatMul in `optimized`, those an integer kernel takes with a uint8 input) in onnxruntime's
    optimized graph: a QDQ group it did not fuse runs in float32, with no integer pair sums;
    one it fused runs on uint8 when the kernel's input zero point is uint8 (onnxruntime turns
    int8 activations into uint8 for its u8 x s8 kernels). Empty sets without a graph: every
    group counts as fused and as possibly int8, the sides that charge more."""
    if optimized is None:
        return set(), set()
    graph = optimized.graph
    types = {i.name: i.data_type for i in graph.initializer}
    int8 = {name for name, t in types.items() if t == onnx.TensorProto.INT8}
    dq = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in int8
    }
    float_run = {
        dq[n.input[1]]
        for n in graph.node
        if n.op_type in FLOAT_WEIGHT_OPS + FUSED_FLOAT_OPS and len(n.input) > 1 and n.input[1] in dq
    }
    unsigned = {
        n.input[3]
        for n in graph.node
        if n.op_type in INTEGER_KERNELS
        and len(n.input) > 3
        and types.get(n.input[2]) == onnx.TensorProto.UINT8
    }
    return float_run, unsigned & int8


def _run_time_input(r: Rounding) -> Rounding:
    """A layer whose own input is first quantized per run to uint8 (DynamicQuantizeLinear) with
    that rounding in the plain `dynamic_input` field, as a hybrid TFLite layer has it: the same
    rounding (255 steps over the row's range and 0, integer zero point), which the engine folds
    per region where the scale is fixed (`verifier.engine.dynamic_input`)."""
    ins = r.inputs
    if not ins or ins[0].grid is not None or ins[0].levels != 255 or ins[0].extra:
        return r
    if not ins[0].plain:
        return r
    return replace(r, dynamic_input=True, inputs=ins[1:])


def _attr(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scales(node: onnx.NodeProto, consts: dict, k: int) -> np.ndarray:
    return consts[node.input[k]].astype(np.float64)


def _grid(node: onnx.NodeProto, consts: dict, ks: int, kz: int) -> Grid:
    """The per-tensor grid of a scale / zero point pair of `node`'s inputs."""
    if len(node.input) <= ks or node.input[ks] not in consts:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): no constant scale")
    s = consts[node.input[ks]]
    zp = consts[node.input[kz]] if len(node.input) > kz and node.input[kz] else np.uint8(0)
    if s.size != 1 or np.size(zp) != 1:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): per-channel activation")
    zp = np.asarray(zp)
    if zp.dtype not in RANGES:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): {zp.dtype} grid")
    qmin, qmax = RANGES[zp.dtype]
    scale, z = float(s.reshape(-1)[0]), float(zp.reshape(-1)[0])
    return Grid(scale, (qmin - z) * scale, (qmax - z) * scale)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along `axis` of an `ndim` tensor."""
    v = np.asarray(v, dtype=np.float64)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _dequantize_parts(
    node: onnx.NodeProto, consts: dict, kq: int, ks: int, kz: int, axis: int = 0
) -> np.ndarray:
    """(q - zero point) * scale of a constant input, per tensor or per channel on `axis`."""
    q = consts[node.input[kq]].astype(np.float64)
    s = _along(consts[node.input[ks]], q.ndim, axis)
    zp = _along(consts[node.input[kz]], q.ndim, axis) if node.input[kz] else 0.0
    return (q - zp) * s


def _dequantize(node: onnx.NodeProto, consts: dict) -> np.ndarray:
    """A DequantizeLinear of constants (its `axis` attribute, default 1)."""
    q = consts[node.input[0]]
    axis = _attr(node, "axis")
    axis = 1 if axis is None else axis
    s = consts[node.input[1]].astype(np.float64)
    zp = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0
    if s.size > 1:
        s, zp = _along(s, q.ndim, axis), _along(zp, q.ndim, axis)
    return (q.astype(np.float64) - zp) * s
