"""Quantization backends behind one runner API: round trips, file structure, data, CLI, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import cnn_nchw, cnn_nhwc, mlp, with_unsupported_op

from quantize.agreement import agreement
from quantize.calibration import calibration_inputs, check_calibration
from quantize.cli import main
from quantize.litert import quantize_values
from quantize.modes import MODES, build, get_mode, load_quantized, parse_mode, quantize_model
from quantize.runner import DescribedRunner, Runner
from quantize.simulated import fake_quantize
from quantize.tf_graph import build_tf_function, check_supported
from verifier.engine.model import load_model
from verifier.engine.network import (
    Conv,
    Dense,
    Elementwise,
    Network,
    Pool,
    Relu,
    Reshape,
    Transpose,
)
from verifier.errors import InputError, UnsupportedModelError

ROOT = Path(__file__).resolve().parent.parent
MNIST_MLP = ROOT / "examples" / "mnist_mlp.onnx"

# 16 -> 80 -> 4: the first weight (1,280 values) is big enough for TFLite's dynamic range
# quantizer, the second (320) is left in float; both cases are checked.
TINY = {
    "mlp": lambda p: mlp(p, sizes=(16, 80, 4)),
    "mlp-matmul-softmax": lambda p: mlp(p, sizes=(16, 80, 4), gemm=False, softmax=True),
    "cnn-nhwc": cnn_nhwc,
    "cnn-nchw": cnn_nchw,
}
# every mode with its defaults, plus the option variants
VARIANTS = [(m, {}) for m in MODES] + [
    ("int8", {"integer_io": True}),
    ("16x8", {"integer_io": True}),
    ("ort-qdq", {"per_channel": True, "calibration": "entropy"}),
    ("ort-qoperator", {"per_channel": True, "calibration": "percentile"}),
    ("ort-qdq", {"activation_type": "uint8"}),
    ("ort-dynamic", {"per_channel": True}),
    ("simulated", {"weight_bits": 8, "act_bits": 8, "per_channel": True}),
]
DESCRIBE_KEYS = {
    "name",
    "backend",
    "mode",
    "options",
    "quantized_tensors",
    "path",
    "sha256",
    "runtime",
    "provenance",
}


def _vid(v: tuple[str, dict]) -> str:
    return v[0] + "".join(f"-{k}={val}" for k, val in v[1].items())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (model, calibration inputs, evaluation inputs) for the generated networks."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (name, make) in enumerate(TINY.items()):
        model = load_model(make(d / f"{name}.onnx"))
        rng = np.random.default_rng(i)
        out[name] = (
            model,
            rng.random((128, *model.input_shape), dtype=np.float32),
            rng.random((200, *model.input_shape), dtype=np.float32),
        )
    return out


CASES = [(n, v) for n in ("mlp", "cnn-nhwc") for v in VARIANTS] + [
    (n, (m, {})) for n in ("mlp-matmul-softmax", "cnn-nchw") for m in MODES
]


@pytest.mark.parametrize(("net", "variant"), CASES, ids=[f"{n}-{_vid(v)}" for n, v in CASES])
def test_round_trip_tiny(tiny, tmp_path, net, variant):
    model, calib, x = tiny[net]
    mode, opts = variant
    runner = quantize_model(model, mode, tmp_path, calib, **opts)
    assert isinstance(runner, DescribedRunner) and isinstance(model, Runner)
    out = runner.predict(x)
    assert out.shape == (len(x), model.num_classes) and out.dtype == np.float32
    y = model.predict(x).argmax(1)
    # entropy and percentile calibration clip the activation range by design, so on random
    # weights and inputs they may flip a few more near-tied labels than min-max does
    clipping = opts.get("calibration") in ("entropy", "percentile")
    assert agreement(model, runner, x, y)["agreement"] >= (0.9 if clipping else 0.95)
    one = np.concatenate([runner.predict(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(out, one)  # batching never changes an answer
    info = runner.describe()
    assert set(info) >= DESCRIBE_KEYS and info["mode"] == mode
    assert info["name"] == runner.name == get_mode(mode).label(get_mode(mode).resolve(opts))
    assert Path(info["path"]).is_file() and len(info["sha256"]) == 64
    assert info["quantized_tensors"] or info["float_weights"]  # nothing hidden either way
    for t in info["quantized_tensors"]:
        assert set(t) >= {"tensor", "dtype", "channels", "scale_min", "symmetric", "weight"}
    json.dumps(info)  # goes into run metadata as is
    again = load_quantized(info["path"])
    np.testing.assert_array_equal(again.predict(x), out)
    if info["backend"] == "onnxruntime" or info["float_weights"] == []:
        assert again.name == runner.name  # recognised from the file alone


def _hybrid_fc(x, q, w_scale, bias):
    """TFLite's hybrid FULLY_CONNECTED: each input row quantized asymmetrically to int8."""
    rmin, rmax = np.minimum(x.min(1), 0.0), np.maximum(x.max(1), 0.0)
    scale = (rmax - rmin) / 255.0
    zp_min, zp_max = -128 - rmin / scale, 127 - rmax / scale
    err_min, err_max = 128 + np.abs(rmin / scale), 127 + np.abs(rmax / scale)
    zp = np.clip(np.round(np.where(err_min < err_max, zp_min, zp_max)), -128, 127)[:, None]
    v = x / scale[:, None]
    qx = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zp, -128, 127)
    acc = (qx - zp).astype(np.int64) @ q.astype(np.int64).T
    return acc * scale[:, None] * w_scale + bias


def _hybrid_fc_symmetric(x, q, w_scale, bias):
    scale = np.abs(x).max(1) / 127.0
    qx = np.clip(np.round(x / scale[:, None]), -127, 127)
    return (qx.astype(np.int64) @ q.astype(np.int64).T) * scale[:, None] * w_scale + bias


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-per-tensor"])
def test_tflite_dynamic_range_structure(tiny, tmp_path, mode):
    from ai_edge_litert.interpreter import Interpreter

    model, _, x = tiny["mlp"]
    runner = quantize_model(model, mode, tmp_path, None)
    interp = Interpreter(model_path=str(runner.describe()["path"]))
    details = interp.get_tensor_details()
    weights = [d for d in details if d["dtype"] == np.int8]
    assert len(weights) == 1 and tuple(weights[0]["shape"]) == (80, 16)
    qp = weights[0]["quantization_parameters"]
    assert len(qp["scales"]) == (80 if mode == "dynamic" else 1)
    assert np.all(qp["zero_points"] == 0)  # symmetric weights
    consts = [d for d in details if len(d["shape"]) == 1 and d["shape"][0] in (80, 4)]
    assert consts and all(d["dtype"] == np.float32 for d in consts)  # float biases
    runner.predict(x)  # allocation (XNNPACK) must not change what describe() reports
    stored = [t for t in runner.describe()["quantized_tensors"] if t["weight"]]
    assert [t["channels"] for t in stored] == [len(qp["scales"])]
    float_weights = runner.describe()["float_weights"]
    assert [w["elements"] for w in float_weights] == [320]  # under 1,024 values: left in float
    assert runner.describe()["provenance"]["dense_weight_scales"] == (
        "per-channel" if mode == "dynamic" else "per-tensor"
    )
    # numpy reference of the hybrid layer, then the float layer, against the interpreter
    dense0, dense1 = [la for la in model.network.layers if isinstance(la, Dense)]
    q = interp.get_tensor(weights[0]["index"])
    xs = np.random.default_rng(5).uniform(-0.3, 1.0, (64, 16)).astype(np.float32)
    got = runner.predict(xs)
    for fc, tol in ((_hybrid_fc, 1e-5), (_hybrid_fc_symmetric, None)):
        h = np.maximum(fc(xs.astype(np.float64), q, qp["scales"], dense0.bias), 0.0)
        err = np.abs(h @ dense1.weight.T + dense1.bias - got).max()
        if tol:
            assert err < tol, f"asymmetric per-row input quantization: error {err}"
        else:
            assert err > 1e-3, "the symmetric model should not match (kernel is asymmetric)"


def test_tf_graph_matches_network(tiny):
    """The TF function built from the layer list computes the float network."""
    for model, _, x in tiny.values():
        fn, _ = build_tf_function(model.network)
        got = fn(x).numpy()
        ref = model.predict(x)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def _network(input_shape, layers):
    """A Network with its per-layer shapes filled in (computed on a zero sample)."""
    shapes, a = [], np.zeros((1, *input_shape))
    for layer in layers:
        a = layer.forward(a)
        shapes.append(tuple(a.shape[1:]))
    return Network(input_shape, layers, shapes=shapes)


def test_tf_graph_layers_match_numpy():
    """Grouped / depthwise / padded convs, per-channel affine, pools, transposes, in TF."""
    rng = np.random.default_rng(7)

    def conv(o, cg, k, **kw):
        return Conv(rng.normal(size=(o, cg, k, k)), rng.normal(size=o), **kw)

    layers = [
        Transpose((2, 0, 1)),  # NHWC input, as tf2onnx writes it
        conv(6, 2, 3, pads=(1, 0, 2, 1), strides=(2, 1)),
        Elementwise(rng.uniform(0.5, 2, (6, 1, 1)), rng.normal(size=(6, 1, 1))),
        Relu(),
        conv(6, 2, 3, pads=(1, 1, 1, 1), group=3, dilations=(1, 2)),
        conv(12, 1, 2, group=6),
        Pool("avg", (3, 3), (1, 1), (1, 1, 1, 1), count_include_pad=True),
        Pool("avg", (2, 2), (1, 1), (0, 0, 1, 1)),  # TF 'SAME', padding not counted
        Pool("max", (2, 2), (2, 2)),
        Transpose((1, 2, 0)),
    ]
    feat = int(np.prod(_network((9, 8, 2), layers).shapes[-1]))
    dense = Dense(rng.normal(size=(5, feat)), rng.normal(size=5))
    net = _network((9, 8, 2), [*layers, Reshape((feat,)), dense])
    x = rng.random((4, 9, 8, 2), dtype=np.float32)
    fn, _ = build_tf_function(net)
    np.testing.assert_allclose(fn(x).numpy(), net.forward(x), rtol=1e-4, atol=1e-4)


def test_simulated_matches_numpy_reference(tiny, tmp_path):
    model, calib, x = tiny["mlp"]
    runner = quantize_model(
        model, "simulated", tmp_path, calib, weight_bits=4, act_bits=3, per_channel=True
    )
    scales = {s["tensor"]: s for s in runner.describe()["quantized_tensors"]}
    dense0, dense1 = [la for la in model.network.layers if isinstance(la, Dense)]

    def act(a, name, bits):
        s = scales[name]
        assert s["dtype"] == f"uint{bits}" and s["symmetric"]  # never negative: unsigned levels
        return np.clip(np.round(a / s["scale_max"]), 0, 2**bits - 1) * s["scale_max"]

    w0 = fake_quantize(dense0.weight.astype(np.float32), 4, axis=0)[0]
    w1 = fake_quantize(dense1.weight.astype(np.float32), 4, axis=0)[0]
    h = np.maximum(act(x, "input", 3) @ w0.T + dense0.bias, 0)
    ref = act(h, "h0_r", 3) @ w1.T + dense1.bias
    np.testing.assert_allclose(runner.predict(x), ref, atol=1e-4)
    assert len(np.unique(w0[0])) <= 2**4 - 1


def test_fake_quantize_levels():
    w = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    for bits in range(2, 9):
        q, scales = fake_quantize(w, bits, axis=0)
        assert scales.shape == (6,) and q.dtype == np.float32
        for row, s in zip(q, scales, strict=True):
            levels = np.round(row / s)
            assert np.abs(levels).max() <= 2 ** (bits - 1) - 1
            np.testing.assert_allclose(levels * s, row, rtol=1e-6)
        per_tensor = fake_quantize(w, bits)[0]
        assert len(np.unique(per_tensor)) <= 2**bits - 1


def test_input_quantization_like_the_quantize_op():
    x = np.array([[0.5, -0.5, 1.5, -2.5, 2.49, -0.51, 300.0, -300.0]], np.float32)
    np.testing.assert_array_equal(
        quantize_values(x, 1.0, 0, np.int8), [[0, 0, 2, -2, 2, -1, 127, -128]]
    )
    np.testing.assert_array_equal(quantize_values(x[:, :4], 0.5, -3, np.int16), [[-2, -4, 0, -8]])


@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_integer_io_runner_matches_float_io_file(tiny, tmp_path, mode):
    """The runner quantizes inputs bit for bit as the file's own QUANTIZE op would."""
    model, calib, _ = tiny["mlp"]
    float_io = quantize_model(model, mode, tmp_path, calib)
    int_io = quantize_model(model, mode, tmp_path, calib, integer_io=True)
    assert int_io.describe()["input"]["dtype"] == ("int8" if mode == "int8" else "int16")
    x = np.random.default_rng(2).random((3000, 16), dtype=np.float32)
    np.testing.assert_array_equal(int_io.predict(x), float_io.predict(x))


def test_agreement_counts():
    class Fixed:
        def __init__(self, labels):
            self.labels = np.asarray(labels)

        def predict(self, x):
            return np.eye(3, dtype=np.float32)[self.labels]

    y = np.array([0, 1, 2, 0])
    r = agreement(Fixed([0, 1, 2, 1]), Fixed([0, 2, 2, 0]), np.zeros((4, 1)), y)
    assert r["agreement"] == 0.5 and r["disagreements"] == 2
    assert r["float_accuracy"] == 0.75 and r["quantized_accuracy"] == 0.75
    assert r["accuracy_drop"] == 0.0


def test_calibration_draw_is_seeded_from_training_split():
    x, rec = calibration_inputs("mnist", None, "flat", (784,), size=50, seed=3)
    again, rec2 = calibration_inputs("mnist", None, "flat", (784,), size=50, seed=3)
    other, rec3 = calibration_inputs("mnist", None, "flat", (784,), size=50, seed=4)
    assert x.shape == (50, 784) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    np.testing.assert_array_equal(x, again)
    assert rec.indices == rec2.indices != rec3.indices and len(set(rec.indices)) == 50
    assert rec.split == "train" and rec.dataset == "mnist" and rec.seed == 3
    json.dumps(rec.to_dict())
    with pytest.raises(InputError, match="exceeds"):
        calibration_inputs("mnist", None, "flat", (784,), size=10**6)


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_mode_and_options(tiny, tmp_path, capsys):
    model, calib, _ = tiny["mlp"]
    with pytest.raises(InputError, match="expected one of dynamic, dynamic-per-tensor"):
        quantize_model(model, "int4", tmp_path, calib)
    with pytest.raises(InputError, match="no option bits"):
        quantize_model(model, "simulated", tmp_path, calib, bits=3)
    with pytest.raises(InputError, match="weight_bits"):
        quantize_model(model, "simulated", tmp_path, calib, weight_bits=9)
    with pytest.raises(InputError, match="needs calibration"):
        quantize_model(model, "int8", tmp_path, None)
    assert main([str(model.path), "--mode", "int4"]) == 2
    assert "unknown quantization mode 'int4'" in capsys.readouterr().err
    assert main([str(model.path), "--mode", "ort-qdq", "-o", "calibration=median"]) == 2
    assert "minmax, entropy, percentile" in capsys.readouterr().err


def test_calibration_of_wrong_shape(tiny, tmp_path, capsys):
    model, calib, _ = tiny["mlp"]
    for bad in (calib[:, :15], calib.reshape(-1, 4, 4), calib[:0], calib * 3):
        with pytest.raises(InputError, match="calibration set"):
            build(model, "int8", tmp_path / "m.tflite", bad)
    assert check_calibration(calib, (16,)).shape == (128, 16)
    # through the CLI: MNIST calibration images do not fit these models
    for name, mode, shape in (("mlp", "ort-qdq", "(16,)"), ("cnn-nhwc", "int8", "(6, 6, 2)")):
        assert main([str(tiny[name][0].path), "--mode", mode, "--calib-size", "10"]) == 2
        err = capsys.readouterr().err
        assert "data shape mismatch" in err and shape in err


def test_converter_cannot_handle(tmp_path, capsys):
    odd_pool = Network(
        (1, 5, 5),
        [Pool("max", (2, 2), (2, 2), (1, 0, 0, 0)), Relu()],
        shapes=[(1, 3, 2), (1, 3, 2)],
    )
    with pytest.raises(UnsupportedModelError, match="max pool pads"):
        check_supported(odd_pool)

    class Gelu:
        pass

    with pytest.raises(InputError, match="no TensorFlow equivalent"):
        check_supported(Network((4,), [Gelu()], shapes=[(4,)]))  # type: ignore[list-item]
    path = with_unsupported_op(tmp_path / "erf.onnx")
    assert main([str(path), "--mode", "dynamic"]) == 2
    assert "Erf" in capsys.readouterr().err


def test_cli_round_trip(tiny, tmp_path, capsys):
    model, _, _ = tiny["mlp"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 4, 4, 1), dtype=np.uint8)
    labels = model.predict(images.reshape(300, 16).astype(np.float32) / 255).argmax(1)
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    out, rec = tmp_path / "q.onnx", tmp_path / "r.json"
    args = [
        str(model.path),
        "--mode",
        "ort-qdq",
        "-o",
        "per_channel=true",
        "--data",
        str(tmp_path / "d.npz"),
        "--calib-size",
        "100",
        "--out",
        str(out),
        "--json",
        str(rec),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "float accuracy:     100.00%" in text and "agreement:" in text and out.is_file()
    record = json.loads(rec.read_text())
    assert record["describe"]["name"] == "ort-static-qdq-per-channel-minmax"
    assert record["calibration"]["size"] == 100 and record["agreement"]["inputs"] == 300
    assert main(["--list-modes"]) == 0
    listed = capsys.readouterr().out
    assert all(m in listed for m in MODES)


# --- the MNIST MLP on real MNIST test data -------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(real_data):
    if not MNIST_MLP.is_file():
        pytest.skip(f"{MNIST_MLP} is not built yet (examples are trained separately)")
    from verifier.engine.data import load_dataset, to_layout

    model = load_model(MNIST_MLP)
    test = load_dataset("mnist", "test", real_data)
    x = to_layout(test.images[:1000], model.layout, model.input_shape)
    calib, _ = calibration_inputs("mnist", real_data, model.layout, model.input_shape, 500)
    return model, calib, x, test.labels[:1000]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_mnist_mlp(mnist, tmp_path, mode):
    model, calib, x, y = mnist
    runner = quantize_model(model, mode, tmp_path, calib)
    r = agreement(model, runner, x, y)
    assert r["agreement"] > 0.98, r
    if mode in ("int8", "16x8"):
        assert r["accuracy_drop"] <= 0.01, r
    if mode.startswith("dynamic"):
        assert runner.describe()["float_weights"] == []  # all three layers exceed 1,024 values


@pytest.mark.slow
def test_mnist_cli(mnist, real_data, tmp_path, capsys):
    out = tmp_path / "m.tflite"
    args = [
        str(MNIST_MLP),
        "--mode",
        "int8",
        "--data-dir",
        str(real_data),
        "--limit",
        "500",
        "--calib-size",
        "200",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "quantized accuracy" in text and out.is_file()


@pytest.mark.parametrize("fmt", ["ort-qdq", "ort-qoperator"])
def test_ort_static_fuses_matmul_add_before_quantizing(tiny, tmp_path, fmt):
    """MatMul + Add become one Gemm before quantizing: one requantization per layer (QGemm),
    not an int8 grid after the MatMul and a second rounding after the Add."""
    import onnx

    model, calib, _ = tiny["mlp-matmul-softmax"]
    runner = quantize_model(model, fmt, tmp_path, calib)
    ops = [n.op_type for n in onnx.load(runner.describe()["path"]).graph.node]
    assert "MatMul" not in ops and "QLinearMatMul" not in ops and "Add" not in ops, ops
    assert ops.count("Gemm") + ops.count("QGemm") == 2, ops


def test_ort_preprocessing_failure_is_recorded(tiny, tmp_path, monkeypatch):
    """A failed `quant_pre_process` still quantizes (the graph unfused), and the model's record
    and the report say so and why."""
    import onnxruntime.quantization.shape_inference as shape_inference

    from verifier.outputs.report import _error_model_blocks

    def fail(*args, **kwargs):
        raise RuntimeError("shape inference broke\nsecond line")

    monkeypatch.setattr(shape_inference, "quant_pre_process", fail)
    model, calib, _ = tiny["mlp-matmul-softmax"]
    described = quantize_model(model, "ort-qdq", tmp_path, calib).describe()
    assert described["provenance"]["preprocessed"] is False
    assert described["provenance"]["preprocess_error"] == "shape inference broke"
    doc = {"quantized": [{"name": "q", "describe": {**described, "error_model": {"reason": "x"}}}]}
    (items,) = [b.items for b in _error_model_blocks(doc) if b.items]
    assert "pre-processing failed: shape inference broke" in items[0]
    monkeypatch.undo()
    described = quantize_model(model, "ort-qdq", tmp_path / "ok", calib).describe()
    assert described["provenance"]["preprocessed"] is True
    assert "preprocess_error" not in described["provenance"]


def test_parse_mode():
    assert parse_mode("ort-qdq") == ("ort-qdq", {})
    assert parse_mode(" ort-qdq : reduce_range=true:per_channel=1 ") == (
        "ort-qdq",
        {"reduce_range": "true", "per_channel": "1"},
    )
    for bad in ("bogus", "ort-qdq:nope=1", "ort-qdq:reduce_range", "ort-qdq:reduce_range=maybe"):
        with pytest.raises(InputError):
            parse_mode(bad)


@pytest.mark.parametrize("mode", ["ort-qdq", "ort-dynamic"])
def test_reduce_range_writes_7_bit_weights(tiny, tmp_path, mode):
    """reduce_range: every int8 weight in [-64, 63] (no int16 pair sum of u8 x s8 products can
    saturate), the name says so, and the file is recognised as such; without it, weights
    use the full int8 range."""
    import onnx
    from onnx import numpy_helper

    model, calib, _ = tiny["mlp"]

    def weights(runner):
        g = onnx.load(runner.describe()["path"]).graph
        ints = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT8]
        return [w for w in map(numpy_helper.to_array, ints) if w.ndim == 2]  # not zero points

    full = quantize_model(model, mode, tmp_path / "full", calib)
    small = quantize_model(model, mode, tmp_path / "small", calib, reduce_range=True)
    assert max(int(np.abs(w.astype(int)).max()) for w in weights(full)) > 64
    assert all(w.min() >= -64 and w.max() <= 63 for w in weights(small))
    assert small.name.endswith("-reduce-range") and not full.name.endswith("-reduce-range")
    assert load_quantized(small.describe()["path"]).name == small.name
