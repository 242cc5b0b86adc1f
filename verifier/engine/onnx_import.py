"""Read an ONNX graph into a `Network` (a list of layers with weights) for the engine.

Constants are folded first by onnxruntime's own basic graph optimisation, run on a copy of the
model whose batch dimension is fixed to 1: that turns the shape-computation subgraphs exporters
write before a Reshape (Shape/Gather/Slice/Concat/Cast) into constants and folds BatchNorm into
Conv. Each remaining node is handled by one function in `HANDLERS`, keyed by ONNX op type;
unsupported operators are reported by name and node, all of them at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from verifier.engine.model_files import load_external_data, parse_graph
from verifier.engine.network import (
    Conv,
    Dense,
    Elementwise,
    Layer,
    Network,
    Pool,
    Relu,
    Reshape,
    Transpose,
)
from verifier.errors import InputError, UnsupportedModelError

# Values with more elements than this in one tensor are refused before anything is allocated.
MAX_TENSOR_ELEMENTS = 200_000_000


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with batch size 1 and constants folded by onnxruntime (basic level)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [*_graph_inputs(m), *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    del m.graph.value_info[:]
    return optimised_by_ort(m)


def optimised_by_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime's basic optimisation makes of `model` (constant folding, BatchNorm
    into Conv, ...), as onnxruntime writes it; a model it cannot load is an InputError."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "folded.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
        return onnx.load(str(out))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (older exporters list weights as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def import_network(model: onnx.ModelProto) -> Network:
    """The `Network` of a single-input classifier ONNX model."""
    model = fold_constants(model)
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise UnsupportedModelError(f"expected one graph input, found {len(inputs)}")
    if len(model.graph.output) != 1:
        raise UnsupportedModelError(f"expected one graph output, found {len(model.graph.output)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
        raise UnsupportedModelError(
            f"input {inputs[0].name!r} must have a batch axis and fixed sizes, got {dims}"
        )
    input_shape = tuple(dims[1:])

    consts: dict[str, np.ndarray] = {
        init.name: numpy_helper.to_array(init) for init in model.graph.initializer
    }
    for name, arr in consts.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise InputError(f"NaN or Inf in the model's weights (tensor {name!r})")
    shapes: dict[str, tuple[int, ...]] = {inputs[0].name: input_shape}
    layers: list[Layer] = []
    layer_shapes: list[tuple[int, ...]] = []
    current = inputs[0].name
    softmax = False

    unsupported = [
        f"{n.op_type} (node {n.name or n.output[0]!r})"
        for n in model.graph.node
        if n.op_type not in HANDLERS
    ]
    if unsupported:
        raise UnsupportedModelError("unsupported operator(s): " + ", ".join(unsupported))

    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
            continue
        acts = [i for i in node.input if i in shapes]
        if not acts:  # a constant subgraph left over: evaluate nothing, it was folded
            raise UnsupportedModelError(
                f"{node.op_type} (node {node.name!r}) computes a constant that was not folded"
            )
        if len(acts) > 1 or acts[0] != current:
            raise UnsupportedModelError(
                f"{node.op_type} (node {node.name!r}) branches or merges activations; only "
                "chains of layers are supported"
            )
        if softmax:
            raise UnsupportedModelError(
                f"{node.op_type} (node {node.name!r}) follows Softmax; Softmax must be last"
            )
        in_shape = shapes[current]
        new = HANDLERS[node.op_type](node, in_shape, consts)
        if node.op_type in ("Softmax", "LogSoftmax"):
            softmax = True
        shape = in_shape
        for layer in new:
            shape = _shape_after(layer, shape, node)
            layers.append(layer)
            layer_shapes.append(shape)
        current = node.output[0]
        shapes[current] = shape
    if current != model.graph.output[0].name:
        raise UnsupportedModelError("the graph output is not the end of the layer chain")
    _check_folded_sizes(input_shape, layers, layer_shapes)
    return Network(input_shape, layers, softmax, layer_shapes)


def _check_folded_sizes(input_shape, layers: list[Layer], shapes: list) -> None:
    """Refuse a network whose folded linear runs (`Network.lower`) would not fit in memory.

    Each run of linear layers between ReLUs / max pools becomes one dense (out x in) matrix;
    runs with other than Dense layers are folded by pushing an (in x in) identity through them.
    """
    start, end, dense_only, in_run = input_shape, input_shape, True, False
    for layer, shape in [*zip(layers, shapes, strict=True), (None, None)]:
        if layer is not None and not _nonlinear(layer):
            in_run, end = True, shape
            dense_only = dense_only and isinstance(layer, Dense)
            continue
        if in_run:
            n_in, n_out = int(np.prod(start)), int(np.prod(end))
            if float(n_in) * (n_out if dense_only else max(n_in, n_out)) > MAX_TENSOR_ELEMENTS:
                raise UnsupportedModelError(
                    f"the network is too large to verify: its linear layers from shape {start} "
                    f"to {end} fold into a {n_out}x{n_in} matrix"
                )
        start, dense_only, in_run = shape, True, False


def _nonlinear(layer: Layer) -> bool:
    return isinstance(layer, Relu) or (isinstance(layer, Pool) and layer.kind == "max")


def load_network(path: str | Path) -> Network:
    """Read and import an ONNX file; corrupt bytes and unsupported graphs are InputErrors."""
    return import_network(read_onnx(path))


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file with its external data, refusing corrupt bytes, bad external data
    (`verifier.engine.model_files`) and absurdly large declared tensors."""
    path = Path(path)
    model = parse_graph(path)
    if not model.graph.node:
        raise InputError(f"{path} is not a valid ONNX model: the graph has no nodes")
    check_declared_sizes(model, path)
    load_external_data(model, path)
    check_shape_values(model, path)
    return model


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors by name."""
    tensors = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    tensors[node.output[0]] = a.t
    return tensors


def check_declared_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse graphs whose declared tensors would not fit in memory, before allocating them.

    Covers graph inputs, outputs and value_info, initializers and Constant tensors (their
    dimensions only: it runs before external data is read). `check_shape_values` covers the
    constant shape tensors of the ops that allocate from them (Reshape targets, Expand,
    ConstantOfShape, Tile repeats, Resize sizes): onnxruntime folds such constants when it
    loads a model, so an absurd shape there would be allocated by loading alone.
    """
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.dim_value > 0]
        if dims and _elements(dims) > MAX_TENSOR_ELEMENTS:
            raise InputError(f"{path}: tensor {vi.name!r} declares absurd dimensions {dims}")
    for name, t in _tensors(model).items():
        if _elements(t.dims) > MAX_TENSOR_ELEMENTS:
            raise InputError(f"{path}: tensor {name!r} declares absurd dimensions {list(t.dims)}")


def check_shape_values(model: onnx.ModelProto, path: Path) -> None:
    """Refuse absurd constant shapes fed to the ops that allocate from them (reads the data)."""
    tensors = _tensors(model)
    for node in model.graph.node:
        slot = SHAPE_INPUTS.get(node.op_type)
        if slot is None or slot >= len(node.input) or node.input[slot] not in tensors:
            continue
        t = tensors[node.input[slot]]
        if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        values = numpy_helper.to_array(t).reshape(-1)
        if _elements(np.abs(values)) > MAX_TENSOR_ELEMENTS:
            raise InputError(
                f"{path}: {node.op_type} (node {node.name or node.output[0]!r}) asks for "
                f"absurd dimensions {values.tolist()[:8]}"
            )


# Per op, which input is a shape (or repeat counts) that sizes the op's output.
SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Resize": 3}


def _elements(dims) -> float:
    """Element count of a shape, in float (no int64 overflow on absurd shapes)."""
    return float(np.prod(np.asarray(list(dims), dtype=np.float64)))


# --- handlers: node -> layers -------------------------------------------------------------------

Handler = Callable[[onnx.NodeProto, tuple[int, ...], dict[str, np.ndarray]], list[Layer]]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _const(node: onnx.NodeProto, idx: int, consts: dict[str, np.ndarray]) -> np.ndarray:
    if idx >= len(node.input) or not node.input[idx]:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) misses input {idx}")
    name = node.input[idx]
    if name not in consts:
        raise UnsupportedModelError(
            f"{node.op_type} (node {node.name!r}): input {name!r} must be a constant"
        )
    arr = consts[name]
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(f"{node.op_type} (node {node.name!r}): NaN or Inf in weights {name!r}")
    return arr


def _gemm(node, shape, consts):
    a = _attrs(node)
    if a.get("transA", 0):
        raise UnsupportedModelError(f"Gemm (node {node.name!r}) with transA=1")
    b = _const(node, 1, consts).astype(np.float64)
    w = (b if a.get("transB", 0) else b.T) * a.get("alpha", 1.0)
    bias = np.zeros(w.shape[0])
    if len(node.input) > 2 and node.input[2]:
        bias = np.broadcast_to(_const(node, 2, consts) * a.get("beta", 1.0), (w.shape[0],))
    _check_dense(node, shape, w)
    return [Dense(w, np.array(bias, dtype=np.float64))]


def _matmul(node, shape, consts):
    b = _const(node, 1, consts).astype(np.float64)
    if b.ndim != 2:
        raise UnsupportedModelError(f"MatMul (node {node.name!r}) with a {b.ndim}-D weight")
    w = b.T
    _check_dense(node, shape, w)
    return [Dense(w, np.zeros(w.shape[0]))]


def _check_dense(node, shape, w):
    if len(shape) != 1 or shape[0] != w.shape[1]:
        raise UnsupportedModelError(
            f"{node.op_type} (node {node.name!r}) takes {w.shape[1]} features, input is {shape}"
        )


def _elementwise(node, shape, consts):
    other = [i for i in node.input if i in consts]
    if len(other) != 1 or len(node.input) != 2:
        raise UnsupportedModelError(
            f"{node.op_type} (node {node.name!r}) must combine the activation with one constant"
        )
    c = consts[other[0]].astype(np.float64)
    c = _per_sample(node, c, shape)
    first_is_const = node.input[0] in consts
    one, zero = np.ones_like(c), np.zeros_like(c)
    if node.op_type == "Add":
        return [Elementwise(one, c)]
    if node.op_type == "Sub":
        return [Elementwise(-one, c)] if first_is_const else [Elementwise(one, -c)]
    if node.op_type == "Mul":
        return [Elementwise(c, zero)]
    if first_is_const:
        raise UnsupportedModelError(f"Div (node {node.name!r}) of a constant by the activation")
    return [Elementwise(1.0 / c, zero)]


def _per_sample(node, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Drop a leading batch axis of size 1 from a broadcast constant and check it broadcasts."""
    if c.ndim == len(shape) + 1:
        if c.shape[0] != 1:
            raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) varies over batch")
        c = c[0]
    try:
        np.broadcast_shapes(c.shape, shape)
    except ValueError:
        raise UnsupportedModelError(
            f"{node.op_type} (node {node.name!r}): constant {c.shape} vs activation {shape}"
        ) from None
    if np.broadcast_shapes(c.shape, shape) != tuple(shape):
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) changes the shape")
    return c


def _spatial(node, shape, kernel):
    """Strides, pads (t, l, b, r) and dilations of a Conv / Pool node, auto_pad resolved."""
    a = _attrs(node)
    strides = tuple(a.get("strides", (1, 1)))
    dil = tuple(a.get("dilations", (1, 1)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = tuple(a.get("pads", (0, 0, 0, 0)))
        pads = (p[0], p[1], p[2], p[3])
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    else:  # SAME_UPPER / SAME_LOWER
        pads_hw = []
        for i in range(2):
            size = shape[1 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_hw.append((small, big) if auto == "SAME_UPPER" else (big, small))
        pads = (pads_hw[0][0], pads_hw[1][0], pads_hw[0][1], pads_hw[1][1])
    if len(strides) != 2 or len(dil) != 2:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) is not 2-D")
    padded = (shape[1] + pads[0] + pads[2], shape[2] + pads[1] + pads[3])
    if min(strides) <= 0 or min(dil) <= 0 or min(pads) < 0:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}): bad strides/pads")
    if _elements([shape[0], *padded]) > MAX_TENSOR_ELEMENTS:
        raise InputError(
            f"{node.op_type} (node {node.name!r}): padding {list(pads)} gives absurd dimensions"
        )
    if any((k - 1) * d + 1 > p for k, d, p in zip(kernel, dil, padded, strict=True)):
        raise UnsupportedModelError(
            f"{node.op_type} (node {node.name!r}): kernel {tuple(kernel)} larger than its input"
        )
    return strides, pads, dil


def _conv(node, shape, consts):
    if len(shape) != 3:
        raise UnsupportedModelError(f"Conv (node {node.name!r}) needs a (C,H,W) input, got {shape}")
    w = _const(node, 1, consts).astype(np.float64)
    if w.ndim != 4:
        raise UnsupportedModelError(f"Conv (node {node.name!r}) is not 2-D (weight {w.shape})")
    bias = np.zeros(w.shape[0])
    if len(node.input) > 2 and node.input[2]:
        bias = _const(node, 2, consts).astype(np.float64)
    group = int(_attrs(node).get("group", 1))
    if shape[0] != w.shape[1] * group:
        raise UnsupportedModelError(
            f"Conv (node {node.name!r}) expects {w.shape[1] * group} channels, input has {shape[0]}"
        )
    strides, pads, dil = _spatial(node, shape, w.shape[2:])
    return [Conv(w, bias, strides, pads, dil, group)]


def _pool(node, shape, consts):
    if len(shape) != 3:
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) needs (C,H,W) input")
    a = _attrs(node)
    if node.op_type == "GlobalAveragePool":
        return [Pool("avg", shape[1:], (1, 1))]
    if a.get("ceil_mode", 0):
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) with ceil_mode=1")
    kernel = tuple(a["kernel_shape"])
    strides, pads, dil = _spatial(node, shape, kernel)
    if dil != (1, 1):
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) with dilations")
    kind = "max" if node.op_type == "MaxPool" else "avg"
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedModelError(f"MaxPool (node {node.name!r}) with an Indices output")
    return [Pool(kind, kernel, strides, pads, bool(a.get("count_include_pad", 0)))]


def _relu(node, shape, consts):
    return [Relu()]


def _identity(node, shape, consts):
    return []


def _softmax(node, shape, consts):
    # Monotone per sample: the decision (argmax) is made on the logits before it.
    axis = _attrs(node).get("axis", -1)
    if len(shape) != 1 or axis not in (-1, 1):
        raise UnsupportedModelError(f"{node.op_type} (node {node.name!r}) on shape {shape}")
    return []


def _flatten(node, shape, consts):
    if _attrs(node).get("axis", 1) != 1:
        raise UnsupportedModelError(f"Flatten (node {node.name!r}) with axis != 1")
    return [Reshape((int(np.prod(shape)),))]


def _reshape(node, shape, consts):
    target = [int(v) for v in _const(node, 1, consts)]
    if not target or target[0] not in (1, -1, 0):
        raise UnsupportedModelError(
            f"Reshape (node {node.name!r}) to {target} changes the batch axis"
        )
    rest = [shape[i - 1] if v == 0 else v for i, v in enumerate(target[1:], start=1)]
    size = int(np.prod(shape))
    if target[0] == -1 and -1 in rest:
        raise UnsupportedModelError(f"Reshape (node {node.name!r}) with two inferred axes")
    if -1 in rest:
        known = int(np.prod([v for v in rest if v != -1]))
        rest = [size // known if v == -1 else v for v in rest]
    if int(np.prod(rest)) != size:
        raise UnsupportedModelError(f"Reshape (node {node.name!r}) of {shape} to {target}")
    return [Reshape(tuple(rest))]


def _squeeze_like(node, shape, consts):
    # Unsqueeze / Squeeze on non-batch axes are reshapes; their output shape comes from ONNX
    # semantics, recomputed here.
    axes = _attrs(node).get("axes")
    if axes is None and len(node.input) > 1:
        axes = [int(v) for v in _const(node, 1, consts)]
    full = [1, *shape]
    if node.op_type == "Squeeze":
        axes = axes if axes is not None else [i for i, d in enumerate(full) if d == 1 and i > 0]
        axes = [a % len(full) for a in axes]
        if 0 in axes:
            raise UnsupportedModelError(f"Squeeze (node {node.name!r}) of the batch axis")
        new = [d for i, d in enumerate(full) if i not in axes]
    else:
        rank = len(full) + len(axes)
        axes = sorted(a % rank for a in axes)
        if 0 in axes:
            raise UnsupportedModelError(f"Unsqueeze (node {node.name!r}) before the batch axis")
        it = iter(full)
        new = [1 if i in axes else next(it) for i in range(rank)]
    return [Reshape(tuple(new[1:]))]


def _transpose(node, shape, consts):
    perm = list(_attrs(node).get("perm", range(len(shape), -1, -1)))  # default: reverse all
    if perm[0] != 0:
        raise UnsupportedModelError(f"Transpose (node {node.name!r}) moves the batch axis: {perm}")
    return [Transpose(tuple(p - 1 for p in perm[1:]))]


def _batchnorm(node, shape, consts):
    scale, bias, mean, var = (_const(node, i, consts).astype(np.float64) for i in range(1, 5))
    eps = _attrs(node).get("epsilon", 1e-5)
    s = scale / np.sqrt(var + eps)
    extra = (1,) * (len(shape) - 1)
    return [Elementwise(s.reshape(-1, *extra), (bias - mean * s).reshape(-1, *extra))]


HANDLERS: dict[str, Handler] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _elementwise,
    "Sub": _elementwise,
    "Mul": _elementwise,
    "Div": _elementwise,
    "Conv": _conv,
    "Relu": _relu,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _pool,
    "BatchNormalization": _batchnorm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Transpose": _transpose,
    "Identity": _identity,
    "Dropout": _identity,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Constant": _identity,
}


def _shape_after(layer: Layer, shape: tuple[int, ...], node: onnx.NodeProto) -> tuple[int, ...]:
    """Per-sample output shape of `layer`, computed on a zero sample (cheap, exact)."""

    if isinstance(layer, Reshape):
        return layer.shape
    if isinstance(layer, Transpose):
        return tuple(shape[p] for p in layer.perm)
    if isinstance(layer, Dense):
        return (layer.weight.shape[0],)
    if isinstance(layer, (Relu, Elementwise)):
        return shape
    out = layer.forward(np.zeros((1, *shape)))
    return tuple(out.shape[1:])
