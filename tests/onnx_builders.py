"""Tiny ONNX graphs written the way real exporters write them, for importer and loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

OPSET = 17


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _save(nodes, inits, in_shape, out_shape, path: Path, in_name="input") -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *out_shape])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp(path: Path, sizes=(16, 12, 4), seed=0, softmax=False, gemm=True) -> Path:
    """Flat MLP: Gemm (torch style) or MatMul+Add (tf2onnx style) layers with ReLU between."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
        bias = rng.normal(0, 0.1, b).astype(np.float32)
        out = f"h{i}"
        if gemm:
            inits += [_init(f"W{i}", w.T.copy()), _init(f"b{i}", bias)]
            nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [out], transB=1))
        else:
            inits += [_init(f"W{i}", w), _init(f"b{i}", bias)]
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [out + "_mm"]))
            nodes.append(helper.make_node("Add", [out + "_mm", f"b{i}"], [out]))
        cur = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [cur + "_r"]))
            cur += "_r"
    if softmax:
        nodes.append(helper.make_node("Softmax", [cur], ["logits"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["logits"]))
    return _save(nodes, inits, [sizes[0]], [sizes[-1]], path)


def cnn_nchw(path: Path, seed=0) -> Path:
    """torch.onnx style CNN on (1,8,8): Conv, BN, Relu, MaxPool, Conv, Shape-computed Reshape."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("cw1", rng.normal(0, 0.5, (4, 1, 3, 3)).astype(f)),
        _init("cb1", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn_s", rng.uniform(0.5, 1.5, 4).astype(f)),
        _init("bn_b", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn_m", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn_v", rng.uniform(0.5, 1.5, 4).astype(f)),
        _init("cw2", rng.normal(0, 0.3, (6, 4, 2, 2)).astype(f)),
        _init("cb2", rng.normal(0, 0.1, 6).astype(f)),
        _init("fw", rng.normal(0, 0.3, (3, 6 * 3 * 3)).astype(f)),
        _init("fb", rng.normal(0, 0.1, 3).astype(f)),
        _init("zero", np.array(0, np.int64)),
        _init("minus1", np.array([-1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "cw1", "cb1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Conv", ["p1", "cw2", "cb2"], ["c2"], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        # torch.flatten as exported: Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape
        helper.make_node("Shape", ["r2"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["r2", "newshape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1),
    ]
    inits.append(_init("ax0", np.array([0], np.int64)))
    return _save(nodes, inits, [1, 8, 8], [3], path)


def cnn_nhwc(path: Path, seed=0) -> Path:
    """tf2onnx style CNN on (6,6,2) NHWC: Transpose, Conv SAME, Transpose back, Reshape, MatMul."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("cw", rng.normal(0, 0.5, (3, 2, 3, 3)).astype(f)),
        _init("cb", rng.normal(0, 0.1, 3).astype(f)),
        _init("shape", np.array([-1, 3 * 3 * 3], np.int64)),
        _init("fw", rng.normal(0, 0.3, (27, 4)).astype(f)),
        _init("fb", rng.normal(0, 0.1, 4).astype(f)),
        _init("scale", np.array(2.0, f)),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["nchw", "cw", "cb"], ["c"], strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
    ]
    return _save(nodes, inits, [6, 6, 2], [4], path)


def cnn_pool_nhwc(path: Path, seed=0) -> Path:
    """tf2onnx style CNN on (4,4,3) NHWC whose convolution is large enough for TFLite's dynamic
    range (>= 1024 weights): Transpose, Conv 48 3x3, Relu, MaxPool 2x2, Transpose, Reshape,
    MatMul, Add."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("cw", rng.normal(0, 0.2, (48, 3, 3, 3)).astype(f)),
        _init("cb", rng.normal(0, 0.1, 48).astype(f)),
        _init("shape", np.array([-1, 192], np.int64)),
        _init("fw", rng.normal(0, 0.1, (192, 4)).astype(f)),
        _init("fb", rng.normal(0, 0.1, 4).astype(f)),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
    ]
    return _save(nodes, inits, [4, 4, 3], [4], path)


def cnn_hidden_hybrid_nhwc(path: Path, seed=0) -> Path:
    """tf2onnx style CNN on (8,8,1) NHWC shaped as the MNIST CNN: a small first convolution
    (72 weights: TFLite's dynamic range leaves it float), Relu, a second one large enough to run
    hybrid (1152 weights, per-channel scales) on the ReLU's output, Relu, Reshape, MatMul."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("cw1", rng.normal(0, 0.5, (8, 1, 3, 3)).astype(f)),
        _init("cb1", rng.normal(0.1, 0.1, 8).astype(f)),
        _init(
            "cw2",
            (rng.normal(0, 0.2, (16, 8, 3, 3)) * rng.uniform(0.3, 1.0, (16, 1, 1, 1))).astype(f),
        ),
        _init("cb2", rng.normal(0, 0.1, 16).astype(f)),
        _init("shape", np.array([-1, 64], np.int64)),
        _init("fw", rng.normal(0, 0.3, (64, 3)).astype(f)),
        _init("fb", rng.normal(0, 0.1, 3).astype(f)),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["nchw", "cw1", "cb1"], ["c1"], strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "Conv", ["r1", "cw2", "cb2"], ["c2"], strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Transpose", ["r2"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
    ]
    return _save(nodes, inits, [8, 8, 1], [3], path)


def two_linear(path: Path, seed=0) -> Path:
    """Two MatMuls with no activation between them (one affine map for the float engine)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [_init("w1", rng.normal(0, 0.5, (8, 6)).astype(f))]
    inits.append(_init("w2", rng.normal(0, 0.5, (6, 3)).astype(f)))
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["logits"]),
    ]
    return _save(nodes, inits, [8], [3], path)


def with_unsupported_op(path: Path) -> Path:
    """A flat model with an Erf node (not supported by the engine, fine for onnxruntime)."""
    w = np.eye(4, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("Erf", ["h"], ["logits"], name="erf_1"),
    ]
    return _save(nodes, [_init("W", w)], [4], [4], path)


def torch_export_cnn(path: Path, seed=0) -> Path:
    """A CNN on (1,8,8) in the shape `torch.onnx.export(..., dynamo=True)` writes it: opset 18,
    IR 10, a static batch of 1, every attribute spelled out, parameter names like `conv1.weight`,
    node metadata, Conv/MaxPool in NCHW, `view` as a Reshape with a constant shape, Gemm."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("conv1.weight", rng.normal(0, 0.5, (4, 1, 3, 3)).astype(f)),
        _init("conv1.bias", rng.normal(0, 0.1, 4).astype(f)),
        _init("conv2.weight", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(f)),
        _init("conv2.bias", rng.normal(0, 0.1, 6).astype(f)),
        _init("fc.weight", rng.normal(0, 0.3, (3, 6 * 2 * 2)).astype(f)),
        _init("fc.bias", rng.normal(0, 0.1, 3).astype(f)),
        _init("val_0", np.array([1, 6 * 2 * 2], np.int64)),
    ]
    conv = {"auto_pad": "NOTSET", "dilations": [1, 1], "group": 1, "strides": [1, 1]}
    pool = {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "conv1.weight", "conv1.bias"],
            ["conv2d"],
            "node_conv2d",
            pads=[1, 1, 1, 1],
            **conv,
        ),
        helper.make_node("Relu", ["conv2d"], ["relu"], "node_relu"),
        helper.make_node(
            "MaxPool", ["relu"], ["max_pool2d"], "node_max_pool2d", pads=[0, 0, 0, 0], **pool
        ),
        helper.make_node(
            "Conv",
            ["max_pool2d", "conv2.weight", "conv2.bias"],
            ["conv2d_1"],
            "node_conv2d_1",
            pads=[0, 0, 0, 0],
            **conv,
        ),
        helper.make_node("Relu", ["conv2d_1"], ["relu_1"], "node_relu_1"),
        helper.make_node("Reshape", ["relu_1", "val_0"], ["view"], "node_view", allowzero=0),
        helper.make_node(
            "Gemm",
            ["view", "fc.weight", "fc.bias"],
            ["linear"],
            "node_linear",
            alpha=1.0,
            beta=1.0,
            transA=0,
            transB=1,
        ),
    ]
    for node in nodes:
        meta = node.metadata_props.add()
        meta.key, meta.value = "namespace", f": __main__.Net/{node.output[0]}"
    shapes = {
        "conv2d": [1, 4, 8, 8],
        "relu": [1, 4, 8, 8],
        "max_pool2d": [1, 4, 4, 4],
        "conv2d_1": [1, 6, 2, 2],
        "relu_1": [1, 6, 2, 2],
        "view": [1, 24],
    }
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("linear", TensorProto.FLOAT, [1, 3])],
        initializer=inits,
        value_info=[
            helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model.producer_name, model.producer_version = "pytorch", "2.9.0"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def with_external_data(path: Path, location="{name}.data", split=False) -> Path:
    """Re-save the model at `path` with every tensor in external data, as exporters do.

    `location` is relative to the model's folder (a sub-folder is created); `{name}` is the
    model file's name. `split=True` spreads the tensors over two files (`.0` / `.1` suffixes).
    """
    model = onnx.load(str(path))
    loc = location.format(name=path.name)
    if not split:
        (path.parent / loc).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / loc).unlink(missing_ok=True)  # the writer appends to existing files
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=loc,
            size_threshold=0,
        )
        return path
    for i, tensor in enumerate(model.graph.initializer):
        target = f"{loc}.{i % 2}"
        (path.parent / target).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / target).unlink(missing_ok=True)  # the writer appends to existing files
        set_external_data(tensor, target)
    onnx.save_model(model, str(path))
    return path


def pair_mlp(path: Path) -> Path:
    """8-2-2 MatMul+Add MLP whose first weights pair up like-signed (column 0: all +1) and
    alternate (column 1: +1, -0.3, ...) in K order: with inputs near 1, int16 pair sums of u8 x
    s8 kernels saturate in column 0 and, when pairs are (2m, 2m+1), never in column 1 (pairs
    two apart would)."""
    w1 = np.array([[1.0] * 8, [1.0, -0.3] * 4], dtype=np.float32).T
    w2 = np.array([[1.0, -0.5], [0.5, 1.0]], dtype=np.float32)
    inits = [
        _init("W0", w1),
        _init("b0", np.array([0.1, 0.2], np.float32)),
        _init("W1", w2),
        _init("b1", np.zeros(2, np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W0"], ["h0_mm"]),
        helper.make_node("Add", ["h0_mm", "b0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h0_r"]),
        helper.make_node("MatMul", ["h0_r", "W1"], ["h1_mm"]),
        helper.make_node("Add", ["h1_mm", "b1"], ["h1"]),
        helper.make_node("Identity", ["h1"], ["logits"]),
    ]
    return _save(nodes, inits, [8], [2], path)


def pair_last_mlp(path: Path) -> Path:
    """8-4-3 MatMul+Add MLP whose last layer's pair sums saturate both ways: with inputs near
    1 its four hidden values are near their row maximum (uint8 near 255 at run time), and its
    integer weights are +127 (logit 0: pairs lose, the logit drops), -127 (logit 1: it rises)
    and alternating (logit 2: no pair saturates). The first layer's pairs are
    opposite-signed (none saturates there)."""
    w1 = np.array([[0.5, -0.25] * 4] * 4, dtype=np.float32).T
    w2 = np.array([[1.0] * 4, [-1.0] * 4, [1.0, -1.0] * 2], dtype=np.float32).T
    return _matmul_mlp(path, w1, np.array([0.0, 0.05, 0.1, 0.15], np.float32), w2)


def coherent_mlp(path: Path) -> Path:
    """4-8-2 MatMul+Add MLP whose hidden values round the same way at run time: input 0 (at 1)
    gives hidden 0 = 1 (the row's maximum: uint8 scale 1/255), and hidden 1-7 = 57/127 (114.45
    steps: each rounds down by 0.45 of a step), summed by logit 0 (a loss of 0.0123); logit 1
    reads hidden 0. Inputs 1-3 feed nothing. No pair sum reaches int16 saturation."""
    w1 = np.zeros((4, 8), np.float32)
    w1[0] = [1.0] + [57 / 127] * 7
    w2 = np.zeros((8, 2), np.float32)
    w2[1:, 0], w2[0, 1] = 1.0, 1.0
    return _matmul_mlp(path, w1, np.zeros(8, np.float32), w2)


def _matmul_mlp(path: Path, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray) -> Path:
    """MatMul+Add, Relu, MatMul+Add (last bias 0) with the given weights, as a converter
    writes a two-layer MLP."""
    inits = [
        _init("W0", w1),
        _init("b0", b1),
        _init("W1", w2),
        _init("b1", np.zeros(w2.shape[1], np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W0"], ["h0_mm"]),
        helper.make_node("Add", ["h0_mm", "b0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h0_r"]),
        helper.make_node("MatMul", ["h0_r", "W1"], ["h1_mm"]),
        helper.make_node("Add", ["h1_mm", "b1"], ["logits"]),
    ]
    return _save(nodes, inits, [w1.shape[0]], [w2.shape[1]], path)


def pair_cnn(path: Path) -> Path:
    """(2,4,4) -> 3x3 Conv to 2 channels -> Relu -> Flatten -> MatMul+Add to 2: conv channel 0's
    weights are all +1 (with inputs near 1, int16 pair sums of a u8 x s8 kernel saturate in any
    pairing), channel 1's are +1 on input channel 0 and -1 on channel 1: its pairs never
    saturate when a window is read as (kh, kw, c), and do when read as (c, kh, kw). The MatMul's
    pairs are opposite-signed (logits of both signs, no saturation there)."""
    f = np.float32
    w = np.ones((2, 2, 3, 3), f)
    w[1, 1] = -1.0
    inits = [
        _init("cw", w),
        _init("cb", np.array([0.1, 0.2], np.float32)),
        _init("shape", np.array([-1, 8], np.int64)),
        _init("fw", np.array([[1.0, -1.0], [-0.5, 0.5]] * 2 + [[-1.0, 1.0], [0.5, -0.5]] * 2, f)),
        _init("fb", np.zeros(2, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "cw", "cb"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
    ]
    return _save(nodes, inits, [2, 4, 4], [2], path)
