"""Models whose weights live in external data files, as PyTorch's exporter writes them
(`model.onnx` + `model.onnx.data`; also a sub-folder, several files): loaded, imported and
quantized in every mode exactly like the same model in one file, run end to end, resumed and
audited; the model hash covers every weight byte. Bad external data: tests/test_bad_inputs.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import mlp, torch_export_cnn, with_external_data

from quantize import calibration_inputs, load_quantized, quantize_model
from quantize.modes import MODES
from verifier.cli import main
from verifier.engine.model import load_model
from verifier.engine.model_files import describe_files, external_files, model_sha256, sha256_file
from verifier.engine.network import Conv, Dense, Pool, Relu, Reshape
from verifier.errors import InputError

NETS = {"mlp": lambda p: mlp(p, sizes=(16, 8, 4)), "torch-export-cnn": torch_export_cnn}
LAYOUTS = {
    "next-to-graph": lambda p: with_external_data(p),
    "sub-folder": lambda p: with_external_data(p, "weights/{name}.data"),
    "several-files": lambda p: with_external_data(p, "w/{name}", split=True),
}
CALIB_SIZE = 8


def verify(*argv) -> int:
    return main([str(a) for a in argv])


def flip_byte(path: Path, at: int) -> None:
    """Change one byte of a file in place (xor 1)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("net", sorted(NETS))
def test_loads_like_the_one_file_model(tmp_path, net, layout):
    one = load_model(NETS[net](tmp_path / "one.onnx"))
    ext = load_model(LAYOUTS[layout](NETS[net](tmp_path / "ext.onnx")))
    files = external_files(ext.path)
    assert files and all(f.path.is_file() for f in files)
    assert len(files) == (2 if layout == "several-files" else 1)
    assert not onnx.load(str(ext.path), load_external_data=False).graph.initializer[0].raw_data
    x = np.random.default_rng(4).random((7, *one.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(ext.predict(x), one.predict(x))
    np.testing.assert_array_equal(ext.network.forward(x), one.network.forward(x))


def test_torch_export_graph_imports(tmp_path):
    """Opset 18, IR 10, a static batch of 1, a constant-shape Reshape, Conv/Gemm in NCHW."""
    model = load_model(with_external_data(torch_export_cnn(tmp_path / "model.onnx")))
    assert (model.layout, model.input_shape, model.fixed_batch) == ("nchw", (1, 8, 8), 1)
    kinds = [type(layer) for layer in model.network.layers]
    assert kinds == [Conv, Relu, Pool, Conv, Relu, Reshape, Dense]
    x = np.random.default_rng(3).random((9, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.network.forward(x), model.predict(x), atol=1e-5)


def test_hash_covers_graph_and_every_weight_byte(tmp_path):
    path = with_external_data(mlp(tmp_path / "m.onnx"), "w/{name}", split=True)
    files = external_files(path)
    h0 = model_sha256(path)
    # the definition the README gives: a manifest of (sha256, name) lines, graph first
    manifest = f"{sha256_file(path)}  graph\n" + "".join(
        f"{sha256_file(f.path)}  {f.location}\n" for f in files
    )
    assert h0 == hashlib.sha256(manifest.encode()).hexdigest() != sha256_file(path)
    assert describe_files(path)["sha256"] == load_model(path).sha256 == h0
    assert describe_files(path)["bytes"] == sum(
        p.stat().st_size for p in [path, *(f.path for f in files)]
    )
    for f in files:
        for at in (0, f.size - 1):
            flip_byte(f.path, at)
            assert model_sha256(path) != h0, (f.location, at)
            assert load_model(path).sha256 != h0
            flip_byte(f.path, at)
    assert model_sha256(path) == h0
    single = mlp(tmp_path / "single.onnx")
    assert model_sha256(single) == sha256_file(single)  # one file: what sha256sum prints


# --- end to end: every quantization mode on a model exported the new way ---------------------


@pytest.fixture(scope="module")
def ext_run(tmp_path_factory):
    """A finished run of the exporter-shaped CNN (weights in a sub-folder) in every mode."""
    root = tmp_path_factory.mktemp("ext")
    path = with_external_data(torch_export_cnn(root / "model.onnx"), "weights/{name}.data")
    model = load_model(path)
    x = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    np.savez(root / "d.npz", x=x, y=model.classify(x[:, None]))
    xc = np.random.default_rng(2).random((CALIB_SIZE, 8, 8)).astype(np.float32)
    np.savez(root / "c.npz", x=xc, y=model.classify(xc[:, None]))
    argv = [path, "--data", root / "d.npz", "--calib-data", root / "c.npz"]
    argv += ["--calib-size", CALIB_SIZE, "--radius", "1", "--modes", ",".join(MODES)]
    assert verify(*argv, "--quiet", "--examples", "0", "--out", root / "run") == 0
    return root, path, root / "run"


def test_run_records_the_model_and_its_weights(ext_run):
    root, path, run = ext_run
    doc = json.loads((run / "results.json").read_text())
    data = root / "weights" / "model.onnx.data"
    assert doc["model"]["external_data"] == [
        {"location": "weights/model.onnx.data", "bytes": data.stat().st_size}
    ]
    assert doc["model"]["sha256"] == model_sha256(path) != sha256_file(path)
    assert doc["model"]["bytes"] == path.stat().st_size + data.stat().st_size
    assert "weights in external data: weights/model.onnx.data" in (run / "report.md").read_text()
    assert len(doc["quantized"]) == len(MODES)
    assert all(
        q["describe"]["provenance"]["source_sha256"] == model_sha256(path) for q in doc["quantized"]
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_quantizes_like_the_one_file_model(ext_run, tmp_path, mode):
    """The run's quantized copy of the external-data model computes exactly what the same
    mode makes of the same network saved as one file."""
    root, path, run = ext_run
    one = load_model(torch_export_cnn(tmp_path / "model.onnx"))
    calib, _ = calibration_inputs(str(root / "c.npz"), None, "nchw", (1, 8, 8), CALIB_SIZE, 0)
    want = quantize_model(one, mode, tmp_path, calib)
    doc = json.loads((run / "results.json").read_text())
    (desc,) = [q["describe"] for q in doc["quantized"] if q["name"] == want.name]
    got = load_quantized(desc["path"], "nchw")
    x = np.random.default_rng(5).random((6, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(got.predict(x), want.predict(x))


def test_audit_of_the_run_passes(ext_run, capsys):
    _, _, run = ext_run
    assert verify("audit", run) == 0, capsys.readouterr().out
    assert json.loads((run / "audit.json").read_text())["passed"]


def test_workers_load_the_weights_too(ext_run, tmp_path):
    root, path, run = ext_run
    argv = [path, "--data", root / "d.npz", "--radius", "1", "--modes", "none", "--quiet"]
    assert verify(*argv, "--workers", "2", "--examples", "0", "--out", tmp_path / "w") == 0
    status = {
        r["index"]: r["float"]["status"]
        for r in json.loads((run / "results.json").read_text())["records"]
    }
    records = json.loads((tmp_path / "w" / "results.json").read_text())["records"]
    assert {r["index"]: r["float"]["status"] for r in records} == status


def test_quantized_file_with_external_data(ext_run, tmp_path, capsys):
    root, path, run = ext_run
    doc = json.loads((run / "results.json").read_text())
    (src,) = [q["describe"]["path"] for q in doc["quantized"] if q["describe"]["mode"] == "ort-qdq"]
    q = with_external_data(Path(shutil.copy(src, tmp_path / "q.onnx")), "qw/{name}.data")
    argv = [path, "--data", root / "d.npz", "--radius", "1", "--modes", "none", "--quiet"]
    assert verify(*argv, "--quantized", q, "--examples", "0", "--out", tmp_path / "r") == 0
    (desc,) = [
        d["describe"]
        for d in json.loads((tmp_path / "r" / "results.json").read_text())["quantized"]
    ]
    assert desc["external_data"] == [
        {"location": "qw/q.onnx.data", "bytes": (tmp_path / "qw" / "q.onnx.data").stat().st_size}
    ]
    assert desc["sha256"] == model_sha256(q) != sha256_file(q)
    assert verify("audit", tmp_path / "r") == 0, capsys.readouterr().out
    flip_byte(tmp_path / "qw" / "q.onnx.data", 0)
    assert verify("audit", tmp_path / "r") == 2
    assert "quantized model" in capsys.readouterr().err


def test_changed_weight_byte_fails_audit_and_resume(tmp_path, capsys, monkeypatch):
    import quantize

    path = with_external_data(mlp(tmp_path / "m.onnx", sizes=(16, 8, 4)), "weights/{name}.data")
    x = np.random.default_rng(0).random((3, 4, 4))
    np.savez(tmp_path / "d.npz", x=x, y=load_model(path).classify(x.reshape(3, 16)))
    argv = [path, "--data", tmp_path / "d.npz", "--radius", "1", "--modes", "simulated"]
    run = tmp_path / "run"
    assert verify(*argv, "--quiet", "--examples", "0", "--out", run) == 0
    assert verify("--resume", run, "--quiet") == 0  # unchanged: resumes (nothing left to do)
    assert verify("audit", run) == 0
    data = tmp_path / "weights" / "m.onnx.data"
    flip_byte(data, 5)
    capsys.readouterr()
    assert verify("audit", run) == 2
    assert f"model {path} changed since the run" in capsys.readouterr().err

    def long_work(*a, **k):
        raise AssertionError("quantization started before the changed model was refused")

    monkeypatch.setattr(quantize, "quantize_model", long_work)
    assert verify("--resume", run, "--quiet") == 2
    assert re.search(r"different model .*\n\s+model_sha256: ", capsys.readouterr().err)
    flip_byte(data, 5)
    assert verify("audit", run) == 0  # the one byte was the difference; the run is intact


def test_symlink_out_of_the_folder_and_contradicting_length_refused(tmp_path):
    (tmp_path / "m").mkdir()
    path = with_external_data(mlp(tmp_path / "m" / "m.onnx"))
    data = path.parent / "m.onnx.data"
    data.symlink_to(data.rename(tmp_path / "w.data"))
    with pytest.raises(InputError, match=r"'m\.onnx\.data' .* outside the model's folder"):
        load_model(path)
    data.unlink()
    (tmp_path / "w.data").rename(data)
    proto = onnx.load(str(path), load_external_data=False)
    entry = [e for e in proto.graph.initializer[0].external_data if e.key == "length"][0]
    entry.value = str(int(entry.value) - 4)
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=r"tensor 'W0' in \S+ is declared \d+ bytes, its shape"):
        load_model(path)
