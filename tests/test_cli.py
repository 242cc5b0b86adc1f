"""The `verify` command: options, exit statuses and messages for bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import cnn_nhwc, mlp, with_unsupported_op

from verifier.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0 and "relrobust" in capsys.readouterr().out
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--layout", "--data", "--data-dir", "--limit", "--indices", "--labels"):
        assert option in text


def test_console_script_installed():
    beside = Path(sys.executable).parent / "verify"
    exe = str(beside) if beside.exists() else shutil.which("verify")
    assert exe, "the verify console script is not on PATH (pip install -e . installs it)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("relrobust ")


_names = count()


def npz(tmp_path, x, y):
    path = tmp_path / f"d{next(_names)}.npz"
    np.savez(path, x=x, y=y)
    return path


def test_runs_on_npz(tmp_path, capsys):
    model = mlp(tmp_path / "m.onnx", sizes=(16, 8, 4))
    data = npz(tmp_path, np.random.default_rng(0).random((10, 4, 4)), np.arange(10) % 4)
    code, out, err = run(capsys, model, "--data", data, "--out", tmp_path / "run", "--radius", "1")
    assert code == 0, err
    assert "m.onnx" in out and "10 inputs" in out and "all" in out
    assert (tmp_path / "run" / "report.html").is_file()


def test_static_modes_need_calibration_apart_from_npz(tmp_path, capsys):
    model = mlp(tmp_path / "m.onnx", sizes=(16, 8, 4))
    data = npz(tmp_path, np.random.default_rng(0).random((10, 4, 4)), np.arange(10) % 4)
    code, _, err = run(capsys, model, "--data", data, "--out", tmp_path / "r", "--modes", "ort-qdq")
    assert code == 2 and "--calib-data" in err


def test_modes_take_options(tmp_path, capsys):
    """`--modes MODE:KEY=VALUE`: the option reaches the built file (its name says so); an
    unknown option or a malformed one is a usage error before anything is checked."""
    model = mlp(tmp_path / "m.onnx", sizes=(16, 8, 4))
    data = npz(tmp_path, np.random.default_rng(0).random((6, 4, 4)), np.arange(6) % 4)
    args = [model, "--data", data, "--radius", "1"]
    code, out, err = run(
        capsys, *args, "--out", tmp_path / "ok", "--modes", "ort-dynamic:reduce_range=true"
    )
    assert code == 0, err
    assert "ort-dynamic-per-tensor-reduce-range" in (tmp_path / "ok" / "report.md").read_text()
    for bad, match in (("ort-dynamic:bogus=1", "has no option bogus"), ("dynamic:x", "KEY=VALUE")):
        code, _, err = run(capsys, *args, "--out", tmp_path / "bad", "--modes", bad)
        assert code == 2 and match in err, err


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing-model", "model file not found"),
        ("corrupt-model", "not a valid ONNX"),
        ("wrong-input-size", "data shape mismatch"),
        ("out-of-range", r"outside \[0,1\]"),
        ("nan-pixels", "NaN"),
        ("empty-npz", "empty"),
        ("unknown-dataset", "unknown dataset"),
        ("label-outside-classes", "outside the model's 4 classes"),
        ("bad-option", "unrecognized arguments"),
        ("bad-selection", "leaves no inputs"),
    ],
)
def test_bad_input_exit_2(tmp_path, capsys, case, match):
    model = mlp(tmp_path / "m.onnx", sizes=(16, 8, 4))
    good_x = np.random.default_rng(0).random((6, 4, 4))
    args = {
        "missing-model": [tmp_path / "nope.onnx"],
        "corrupt-model": [tmp_path / "bad.onnx", "--data", npz(tmp_path, good_x, np.zeros(6, int))],
        "wrong-input-size": [model, "--data", npz(tmp_path, np.zeros((2, 5, 5)), [0, 1])],
        "out-of-range": [model, "--data", npz(tmp_path, good_x * 2, np.zeros(6, int))],
        "nan-pixels": [model, "--data", npz(tmp_path, good_x * np.nan, np.zeros(6, int))],
        "empty-npz": [model, "--data", npz(tmp_path, np.zeros((0, 4, 4)), np.zeros(0, int))],
        "unknown-dataset": [model, "--data", "imagenet"],
        "label-outside-classes": [model, "--data", npz(tmp_path, good_x, np.full(6, 7))],
        "bad-option": [model, "--frobnicate"],
        "bad-selection": [
            model,
            "--data",
            npz(tmp_path, good_x, np.zeros(6, int)),
            "--labels",
            "3",
        ],
    }[case]
    (tmp_path / "bad.onnx").write_bytes(b"not a model at all")
    code, out, err = run(capsys, *args)
    assert code == 2
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_unsupported_operator_exit_2(tmp_path, capsys):
    # The clean-accuracy path does not need the layer list; importing it must name the op.
    from verifier.engine.model import load_model

    model = load_model(with_unsupported_op(tmp_path / "u.onnx"))
    with pytest.raises(Exception, match="Erf"):
        _ = model.network


def test_layout_option(tmp_path, capsys):
    model = cnn_nhwc(tmp_path / "c.onnx")
    data = npz(tmp_path, np.random.default_rng(0).random((3, 6, 6, 2)), [0, 1, 2])
    code, _, err = run(capsys, model, "--data", data, "--layout", "nchw")
    assert code == 2 and "data shape mismatch" in err
    code, out, err = run(capsys, model, "--data", data, "--out", tmp_path / "run")
    assert code == 0, err
