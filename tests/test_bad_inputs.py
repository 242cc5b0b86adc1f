"""Bad inputs to `verify`, table-driven: every case exits with status 2 and one message naming
the problem, prints no traceback, never reaches quantization (the long work), and leaves no
results.json behind (none written, none changed). `CASES` lists them: 65 cases."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import mlp, with_external_data, with_unsupported_op

from verifier.cli import main

SIZES = (16, 8, 4)  # the tiny model: 16 inputs (4x4 images), 4 classes


# --- model builders: small graphs with one thing wrong -----------------------------------------


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def save(nodes, inits, path: Path, in_dims=("N", 16), out_dims=("N", 4), value_info=()) -> Path:
    """An ONNX file written as is (no checker: several of these graphs are invalid on purpose)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_dims))],
        initializer=inits,
        value_info=list(value_info),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def weight(rows=16, cols=4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, cols)).astype(np.float32)


def absurd_initializer(p: Path) -> Path:
    w = onnx.TensorProto(name="W", dims=[100000, 100000], data_type=TensorProto.FLOAT)
    return save([helper.make_node("MatMul", ["input", "W"], ["logits"])], [w], p)


def absurd_value_info(p: Path) -> Path:
    vi = helper.make_tensor_value_info("h", TensorProto.FLOAT, [10**6, 10**6])
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["logits"]),
    ]
    return save(nodes, [_init("W", weight())], p, value_info=[vi])


def absurd_input(p: Path) -> Path:
    nodes = [helper.make_node("Relu", ["input"], ["logits"])]
    return save(nodes, [], p, in_dims=("N", 10**9), out_dims=("N", 10**9))


def absurd_reshape(p: Path) -> Path:
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["big"]),
        helper.make_node("Flatten", ["big"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
    ]
    return save(
        nodes, [_init("shape", np.array([1, 10**6, 10**6], np.int64)), _init("W", weight())], p
    )


def absurd_constant_of_shape(p: Path) -> Path:
    """A 40 GB constant that onnxruntime would fold (allocate) while loading the model."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("ReduceSum", ["zeros", "axes"], ["bias"], keepdims=0),
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("Add", ["h", "bias"], ["logits"]),
    ]
    inits = [
        _init("shape", np.array([50000, 50000, 4], np.int64)),
        _init("axes", np.array([0, 1], np.int64)),
        _init("W", weight()),
    ]
    return save(nodes, inits, p)


def absurd_constant(p: Path) -> Path:
    big = onnx.TensorProto(name="c", dims=[10**6, 10**6], data_type=TensorProto.FLOAT)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=big),
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("Add", ["h", "c"], ["logits"]),
    ]
    return save(nodes, [_init("W", weight())], p)


def absurd_padding(p: Path) -> Path:
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "cw"], ["c"], pads=[30000] * 4),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ]
    inits = [
        _init("shape", np.array([-1, 1, 4, 4], np.int64)),
        _init("cw", np.ones((4, 1, 1, 1), np.float32)),
    ]
    return save(nodes, inits, p)


def branching(p: Path) -> Path:
    """A residual connection (two activations merged): not a chain of layers."""
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["h", "r"], ["logits"]),
    ]
    return save(nodes, [_init("W", weight())], p)


def dynamic_image(p: Path) -> Path:
    nodes = [helper.make_node("Relu", ["input"], ["logits"])]
    return save(nodes, [], p, in_dims=("N", "H"), out_dims=("N", "H"))


def no_batch_axis(p: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["input", "W"], ["logits"])]
    return save(nodes, [_init("W", weight())], p, in_dims=(16,), out_dims=(4,))


def two_inputs(p: Path) -> Path:
    path = mlp(p, sizes=SIZES)
    m = onnx.load(str(path))
    m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 16]))
    onnx.save(m, str(path))
    return path


def external(p: Path) -> Path:
    """The tiny model with its weights in the external data file `<name>.data` next to it."""
    p.parent.mkdir(parents=True, exist_ok=True)
    return with_external_data(mlp(p, sizes=SIZES))


def external_missing(p: Path) -> Path:
    path = external(p)
    (p.parent / f"{p.name}.data").unlink()
    return path


def external_truncated(p: Path) -> Path:
    path = external(p)
    data = p.parent / f"{p.name}.data"
    data.write_bytes(data.read_bytes()[:-8])
    return path


def external_outside(p: Path, location: Callable[[Path], str]) -> Path:
    """A model in `p`'s folder whose (intact) data file sits in the parent folder, its
    location written as `location(data file)`."""
    path = external(p)
    moved = (p.parent / f"{p.name}.data").rename(p.parent.parent / "w.data")
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location(moved)
    path.write_bytes(proto.SerializeToString())
    return path


def bad_weight(p: Path, value: float, gemm: bool, name: str) -> Path:
    path = mlp(p, sizes=SIZES, gemm=gemm)
    m = onnx.load(str(path))
    for init in m.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            arr.reshape(-1)[0] = value
            init.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(m, str(path))
    return path


# --- the environment every case draws on ------------------------------------------------------


@dataclass
class Env:
    """Files the cases refer to: a good model and data, a finished run, quantized copies."""

    root: Path
    model: Path
    data: Path
    run: Path
    q_other_classes: Path
    q_other_shape: Path


def npz(path: Path, x, y) -> Path:
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from quantize import quantize_model
    from verifier.engine.model import load_model

    root = tmp_path_factory.mktemp("bad")
    model = mlp(root / "m.onnx", sizes=SIZES)
    data = npz(root / "good.npz", np.random.default_rng(0).random((6, 4, 4)), np.arange(6) % 4)
    run = root / "run"
    args = [model, "--data", data, "--radius", "1", "--modes", "none", "--quiet", "--examples", "0"]
    assert main([str(a) for a in [*args, "--out", run]]) == 0
    assert (run / "results.json").is_file()
    q5 = load_model(mlp(root / "m5.onnx", sizes=(16, 8, 5), seed=1))
    q9 = load_model(mlp(root / "m9.onnx", sizes=(9, 8, 4), seed=2))
    return Env(
        root,
        model,
        data,
        run,
        Path(quantize_model(q5, "simulated", root / "q", None).describe()["path"]),
        Path(quantize_model(q9, "simulated", root / "q", None).describe()["path"]),
    )


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Env, Path], list]  # (env, a fresh directory for this case) -> arguments
    message: str  # regular expression the error message must match


def run_args(model, data, t: Path, *extra) -> list:
    """A normal run of `model` on `data` into a fresh directory, plus `extra` options."""
    return [model, "--data", data, "--modes", "none", "--quiet", "--out", t / "out", *extra]


def ok(*extra) -> Callable[[Env, Path], list]:
    """The good model and data with `extra` options."""
    return lambda e, t: run_args(e.model, e.data, t, *extra)


def bad_model(build: Callable[[Path], Path], data=None) -> Callable[[Env, Path], list]:
    """A model made by `build`, on the good data (or on `data(t)`)."""
    return lambda e, t: run_args(build(t / "bad.onnx"), data(t) if data else e.data, t)


def bad_data(x, y) -> Callable[[Env, Path], list]:
    """The good model on a dataset with arrays `x`, `y`."""
    return lambda e, t: run_args(e.model, npz(t / "d.npz", x, y), t)


X = np.random.default_rng(1).random((6, 4, 4))
Y = np.arange(6) % 4
TINY_X = np.random.default_rng(1).random((6, 2, 2))  # for the 4-input Erf model


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated(t: Path) -> Path:
    good = mlp(t / "good.onnx", sizes=SIZES).read_bytes()
    return write(t / "trunc.onnx", good[: len(good) // 2])


def folder(t: Path, **files: bytes) -> Path:
    """A directory holding `files` (run_json=... is run.json)."""
    d = t / "dir"
    d.mkdir()
    for name, data in files.items():
        write(d / name.replace("_", "."), data)
    return d


def npz_x_only(t: Path) -> Path:
    np.savez(t / "d.npz", x=X)
    return t / "d.npz"


CASES = [
    # model files
    Case(
        "missing-model", lambda e, t: run_args(t / "nope.onnx", e.data, t), "model file not found"
    ),
    Case(
        "corrupt-onnx",
        lambda e, t: run_args(write(t / "c.onnx", b"\x08\x07junk" * 40), e.data, t),
        "not a valid ONNX",
    ),
    Case("truncated-onnx", lambda e, t: run_args(truncated(t), e.data, t), "not a valid ONNX"),
    Case("empty-onnx", lambda e, t: run_args(write(t / "e.onnx", b""), e.data, t), "no nodes"),
    Case(
        "unknown-model-format",
        lambda e, t: run_args(write(t / "m.pt", b"x"), e.data, t),
        "unsupported model format",
    ),
    Case("absurd-initializer", bad_model(absurd_initializer), "'W' declares absurd dimensions"),
    Case("absurd-value-info", bad_model(absurd_value_info), "'h' declares absurd dimensions"),
    Case("absurd-input", bad_model(absurd_input), "'input' declares absurd dimensions"),
    Case("absurd-reshape-target", bad_model(absurd_reshape), r"Reshape .* absurd dimensions"),
    Case(
        "absurd-constant-of-shape",
        bad_model(absurd_constant_of_shape),
        r"ConstantOfShape .* absurd",
    ),
    Case("absurd-constant-node", bad_model(absurd_constant), "'c' declares absurd dimensions"),
    Case("absurd-conv-padding", bad_model(absurd_padding), r"Conv .*padding .* absurd"),
    Case(
        "unsupported-operator",
        lambda e, t: [
            with_unsupported_op(t / "u.onnx"),
            "--data",
            npz(t / "d.npz", TINY_X, Y),
            "--calib-data",
            npz(t / "c.npz", TINY_X, Y),
            "--quiet",
            "--out",
            t / "out",
        ],
        r"unsupported operator\(s\): Erf \(node 'erf_1'\)",
    ),
    Case(
        "external-data-missing",
        bad_model(external_missing),
        r"external data 'bad\.onnx\.data' .*: file \S*bad\.onnx\.data not found",
    ),
    Case(
        "external-data-truncated",
        bad_model(external_truncated),
        r"external data file \S*bad\.onnx\.data is truncated",
    ),
    Case(
        "external-data-in-parent-folder",
        bad_model(lambda p: external_outside(p.parent / "m" / p.name, lambda f: "../w.data")),
        r"external data '\.\./w\.data' .* is outside the model's folder",
    ),
    Case(
        "external-data-absolute-path",
        bad_model(lambda p: external_outside(p.parent / "m" / p.name, lambda f: str(f))),
        r"external data '/\S*w\.data' .* is outside the model's folder",
    ),
    Case("branching-graph", bad_model(branching), "branches or merges"),
    Case("dynamic-image-dims", bad_model(dynamic_image), "dynamic sizes beyond the batch axis"),
    Case("no-batch-axis", bad_model(no_batch_axis), "no batch axis"),
    Case("two-graph-inputs", bad_model(two_inputs), "expected one input"),
    Case("nan-weight", bad_model(lambda p: bad_weight(p, np.nan, True, "W0")), "NaN or Inf .*'W0'"),
    Case(
        "inf-bias-matmul-add",
        bad_model(lambda p: bad_weight(p, np.inf, False, "b1")),
        "NaN or Inf .*'b1'",
    ),
    # data
    Case("pixels-above-1", bad_data(X * 2, Y), r"outside \[0,1\]"),
    Case("negative-pixels", bad_data(X - 0.5, Y), r"outside \[0,1\]"),
    Case("nan-pixels", bad_data(np.where(X > 0.5, np.nan, X), Y), "NaN or Inf"),
    Case("inf-pixels", bad_data(np.where(X > 0.5, np.inf, X), Y), "NaN or Inf"),
    Case(
        "label-outside-classes",
        bad_data(X, np.full(6, 7)),
        "label 7 is outside the model's 4 classes",
    ),
    Case("negative-label", bad_data(X, -Y - 1), "negative label"),
    Case("non-integer-labels", bad_data(X, Y + 0.5), "labels must be integers"),
    Case("image-size-mismatch", bad_data(np.zeros((2, 5, 5)), [0, 1]), "data shape mismatch"),
    Case("empty-dataset", bad_data(np.zeros((0, 4, 4)), np.zeros(0, int)), "empty"),
    Case("labels-count-mismatch", bad_data(X, Y[:4]), "6 images but labels"),
    Case(
        "npz-without-y",
        lambda e, t: run_args(e.model, npz_x_only(t), t),
        "must hold arrays 'x' and 'y'",
    ),
    Case("unknown-dataset", ok("--data", "imagenet"), "unknown dataset"),
    Case(
        "cifar-not-found",
        lambda e, t: [
            e.model,
            "--data",
            "cifar10",
            "--data-dir",
            t,
            "--modes",
            "none",
            "--out",
            t / "out",
        ],
        "CIFAR-10 test data not found",
    ),
    # region and decision options
    Case("radius-zero", ok("--radius", "0"), "--radius must be positive"),
    Case("radius-negative", ok("--radius", "-1"), "--radius must be positive"),
    Case("radius-nan", ok("--radius", "nan"), "--radius must be positive"),
    Case("step-zero", ok("--step", "0"), r"--step must be in \(0, 1\]"),
    Case("step-negative", ok("--step=-1/4"), r"--step must be in \(0, 1\]"),
    Case("step-above-1", ok("--step", "2"), r"--step must be in \(0, 1\]"),
    Case("step-not-a-number", ok("--step", "abc"), "not a number or fraction"),
    Case("dims-zero", ok("--dims", "0"), "--dims must be positive"),
    Case("workers-zero", ok("--workers", "0"), "--workers must be positive"),
    Case(
        "quantized-enum-limit-zero",
        ok("--quantized-enum-limit", "0"),
        "--quantized-enum-limit must be positive",
    ),
    Case(
        "cluster-and-workers",
        ok("--cluster", "tcp://127.0.0.1:8786", "--workers", "2"),
        "--cluster ADDR or --workers N, not both",
    ),
    Case("timeout-zero", ok("--timeout", "0"), "--timeout must be positive"),
    Case(
        "mcts-on-lattice",
        ok("--search", "mcts", "--region", "lattice"),
        "--search mcts .* --region features",
    ),
    Case(
        "gate-limit-above-100", ok("--min-relative-robustness", "150"), r"percentage in \[0, 100\]"
    ),
    Case(
        "baseline-missing",
        ok("--baseline", "/nonexistent/results.json"),
        "cannot read the baseline",
    ),
    Case("limit-zero", ok("--limit", "0"), "--limit must be positive"),
    Case("indices-out-of-range", ok("--indices", "3,99"), "out of range"),
    Case("labels-select-nothing", ok("--labels", "9"), "leaves no inputs"),
    # quantized files
    Case(
        "quantized-missing",
        ok("--quantized", "/nonexistent/q.tflite"),
        "quantized model file not found",
    ),
    Case(
        "quantized-corrupt-onnx",
        lambda e, t: run_args(e.model, e.data, t, "--quantized", write(t / "q.onnx", b"junk" * 9)),
        "cannot load the quantized model",
    ),
    Case(
        "quantized-external-data-missing",
        lambda e, t: run_args(e.model, e.data, t, "--quantized", external_missing(t / "q.onnx")),
        r"external data 'q\.onnx\.data' .*: file \S*q\.onnx\.data not found",
    ),
    Case(
        "quantized-other-classes",
        lambda e, t: run_args(e.model, e.data, t, "--quantized", e.q_other_classes),
        "has 5 outputs, the float model 4",
    ),
    Case(
        "quantized-other-input",
        lambda e, t: run_args(e.model, e.data, t, "--quantized", e.q_other_shape),
        r"takes input \(9,\)",
    ),
    # runs: --out and --resume
    Case(
        "out-of-existing-run",
        lambda e, t: [e.model, "--data", e.data, "--modes", "none", "--out", e.run],
        "already holds a run; pass --resume",
    ),
    Case(
        "resume-with-other-out",
        lambda e, t: ["--resume", e.run, "--out", t / "elsewhere"],
        "do not also pass a different --out",
    ),
    Case(
        "resume-other-configuration",
        lambda e, t: ["--resume", e.run, "--radius", "2", "--quiet"],
        r"different configuration:\s+radius: 1.0 -> 2.0",
    ),
]
CASES += [
    Case(
        "resume-not-a-run", lambda e, t: ["--resume", folder(t, x_txt=b"")], "not a run directory"
    ),
    Case("resume-missing-dir", lambda e, t: ["--resume", t / "nope"], "not a run directory"),
    Case(
        "resume-corrupt-run-json",
        lambda e, t: ["--resume", folder(t, run_json=b"{trunc")],
        "unreadable run.json",
    ),
    Case(
        "resume-corrupt-store",
        lambda e, t: [
            "--resume",
            folder(t, run_json=(e.run / "run.json").read_bytes(), run_sqlite=b"junk" * 300),
        ],
        "not a readable run store",
    ),
]


def results_files(root: Path) -> dict:
    """Every results.json under `root` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("results.json")}


def test_case_count():
    assert len(CASES) == 66 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path, capsys, monkeypatch):
    import quantize

    def long_work(*a, **k):
        raise AssertionError("quantization started before the bad input was refused")

    monkeypatch.setattr(quantize, "quantize_model", long_work)
    monkeypatch.setattr(quantize, "calibration_inputs", long_work)
    before = results_files(env.root) | results_files(tmp_path)
    code = main([str(a) for a in case.argv(env, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(case.message, err), err
    assert "Traceback" not in err
    assert err.strip().startswith(("verify: error:", "usage:")), err
    assert results_files(env.root) | results_files(tmp_path) == before


def test_dynamic_batch_dimension_works(env: Env):
    """The env's model has a named dynamic batch axis ("N") and its run finished."""
    dims = onnx.load(str(env.model)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and (env.run / "results.json").is_file()


@pytest.mark.parametrize("batch", ["fixed-1", "unnamed"])
def test_other_batch_dimensions_work(batch: str, env: Env, tmp_path, capsys):
    path = mlp(tmp_path / "m.onnx", sizes=SIZES)
    m = onnx.load(str(path))
    for vi in (m.graph.input[0], m.graph.output[0]):
        d = vi.type.tensor_type.shape.dim[0]
        d.ClearField("dim_param")
        if batch == "fixed-1":
            d.dim_value = 1
    onnx.save(m, str(path))
    out = tmp_path / "out"
    argv = [
        path,
        "--data",
        env.data,
        "--radius",
        "1",
        "--modes",
        "none",
        "--quiet",
        "--examples",
        "0",
    ]
    assert main([str(a) for a in [*argv, "--out", out]]) == 0, capsys.readouterr().err
    assert (out / "results.json").is_file()


def test_absurd_model_under_a_memory_cap(env: Env, tmp_path):
    """The real process, capped at 4 GB of address space, refuses the 40 GB constant cleanly."""
    model = absurd_constant_of_shape(tmp_path / "big.onnx")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    cmd = [sys.executable, "-m", "verifier.cli", str(model), "--data", str(env.data)]
    proc = subprocess.run(
        [*cmd, "--modes", "none", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "absurd" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
