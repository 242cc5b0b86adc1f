"""Model loading and the ONNX importer: formats, layouts, exporter-style graphs, bad models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import cnn_nchw, cnn_nhwc, mlp, with_unsupported_op

from verifier.engine.model import detect_layout, load_model
from verifier.engine.network import forward_lowered
from verifier.engine.onnx_import import load_network
from verifier.errors import InputError, UnsupportedModelError

BUILDERS = {
    "mlp-gemm": lambda p: mlp(p),
    "mlp-matmul-add-softmax": lambda p: mlp(p, gemm=False, softmax=True),
    "cnn-nchw-torch-style": cnn_nchw,
    "cnn-nhwc-tf2onnx-style": cnn_nhwc,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_import_matches_runtime(tmp_path, name):
    model = load_model(BUILDERS[name](tmp_path / f"{name}.onnx"))
    x = np.random.default_rng(3).random((9, *model.input_shape)).astype(np.float32)
    ref = model.predict(x)
    if model.network.output_softmax:  # the engine works on logits; softmax keeps the argmax
        assert (model.network.forward(x).argmax(1) == ref.argmax(1)).all()
        return
    np.testing.assert_allclose(model.network.forward(x), ref, atol=1e-5)
    chain = model.network.lower()
    np.testing.assert_allclose(forward_lowered(chain, x.reshape(9, -1)), ref, atol=1e-5)


def test_layouts_detected(tmp_path):
    assert load_model(mlp(tmp_path / "a.onnx")).layout == "flat"
    assert load_model(cnn_nchw(tmp_path / "b.onnx")).layout == "nchw"
    assert load_model(cnn_nhwc(tmp_path / "c.onnx")).layout == "nhwc"
    assert detect_layout((3, 32, 32)) == "nchw" and detect_layout((28, 28, 1)) == "nhwc"
    assert detect_layout((4, 5, 4)) is None


def test_layout_override(tmp_path):
    model = load_model(mlp(tmp_path / "a.onnx"), layout="flat-chw")
    assert model.layout == "flat-chw"
    with pytest.raises(InputError, match="unknown layout"):
        load_model(tmp_path / "a.onnx", layout="hwc")


def test_batched_equals_one_at_a_time(tmp_path):
    model = load_model(cnn_nhwc(tmp_path / "c.onnx"))
    x = np.random.default_rng(0).random((13, *model.input_shape)).astype(np.float32)
    one = np.concatenate([model.predict(x[i : i + 1]) for i in range(13)])
    np.testing.assert_array_equal(model.predict(x, batch_size=5), one)


def test_unsupported_operator_named(tmp_path):
    model = load_model(with_unsupported_op(tmp_path / "u.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"Erf \(node 'erf_1'\)"):
        _ = model.network


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(InputError, match="not a valid ONNX"):
        load_model(bad)
    good = mlp(tmp_path / "g.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError):
        load_model(tmp_path / "trunc.onnx")
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported model format"):
        load_model(tmp_path / "m.pt")


def test_absurd_dimensions_refused_before_allocation(tmp_path):
    w = onnx.TensorProto(name="W", dims=[100000, 100000], data_type=TensorProto.FLOAT)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 100000])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 100000])],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "huge.onnx"))
    with pytest.raises(InputError, match="absurd dimensions"):
        load_model(tmp_path / "huge.onnx")


def test_dynamic_image_size_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "H"])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "dyn.onnx"))
    with pytest.raises(UnsupportedModelError, match="dynamic sizes"):
        load_model(tmp_path / "dyn.onnx")


def test_nan_weights_refused(tmp_path):
    path = mlp(tmp_path / "n.onnx")
    m = onnx.load(str(path))
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, m.graph.initializer[0].name))
    onnx.save(m, str(path))
    with pytest.raises(InputError, match="NaN or Inf"):
        load_network(path)
