"""The benchmarks measure the checkout they sit in."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_import_their_own_checkout(tmp_path):
    """A benchmark imports the checkout it sits in, and hands it to the processes it starts,
    not the installed copy: two checkouts run side by side measure their own code."""
    other = tmp_path / "other"
    (other / "benchmarks").mkdir(parents=True)
    (other / "verifier").mkdir()
    (other / "verifier" / "__init__.py").write_text("")
    shutil.copy(ROOT / "benchmarks" / "checkout.py", other / "benchmarks" / "checkout.py")
    probe = other / "benchmarks" / "probe.py"
    probe.write_text(
        "import checkout, subprocess, sys, verifier\n"
        "print(verifier.__file__)\n"
        "sub = [sys.executable, '-c', 'import verifier; print(verifier.__file__)']\n"
        "print(subprocess.run(sub, capture_output=True, text=True, cwd='/').stdout.strip())\n"
    )
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True)
    mine, child = out.stdout.split()
    assert Path(mine).parent == other / "verifier"
    assert Path(child).parent == other / "verifier"


def test_covering_bench_counts_blocks_and_moved_features(monkeypatch):
    """bench_covering's lower bound on a covering's blocks (Schoenheim's, met by the Fano and
    affine planes) and its count of the features one point can move."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # checkout.py edits it
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    bench = importlib.import_module("bench_covering")
    assert bench.covering_lower_bound(7, 3, 2) == 7
    assert bench.covering_lower_bound(9, 3, 2) == 12
    assert bench.covering_lower_bound(10, 4, 1) == 3
    assert bench.covering_lower_bound(79, 64, 8) == 15
    region = SimpleNamespace(
        cost=np.array([2.0, 1.0, 5.0, 1.0, 0.5]),
        lo=np.zeros(5, dtype=np.int64),
        hi=np.array([1, 1, 1, 1, 0]),
        budget=4.0,
    )
    assert bench.most_moved(region) == 3  # 1 + 1 + 2; the 0.5 one cannot move


def test_engine_bench_decides_only_the_inputs_asked(real_data, tmp_path, monkeypatch, capsys):
    """bench_engine --inputs decides just those places among the correct inputs, with the seeds
    and indices a full run gives them, and one line each; a place past them is a usage error."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # checkout.py edits it
    monkeypatch.setenv("RELROBUST_DATA", str(real_data))
    bench = importlib.import_module("bench_engine")
    out = tmp_path / "engine.json"
    common = ["--models", str(ROOT / "examples" / "mnist_mlp.onnx"), "--n", "30"]
    common += ["--configs", "a", "--timeouts", "1", "--engines", "milp", "--baseline", "0"]
    assert bench.main([*common, "--inputs", "4,1", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    rows = got["models"][common[1]]["configs"]["a"]["runs"]["milp@1s"]["rows"]
    assert [r["index"] for r in rows] == [4, 1]
    assert got["inputs"] == [4, 1]
    assert "input 4:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main([*common, "--inputs", "30", "--out", str(out)])
    assert exc.value.code == 2


def test_bound_gap_descent_follows_the_worse_child_and_its_milp_is_sound(tmp_path, monkeypatch):
    """bench_bound_gap's descent on a tiny 16x8 MLP: each measured box smaller than the last,
    and the program's "unsat" on a whole region only where the runtime's margin is positive at
    every point of it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # checkout.py edits it
    bench = importlib.import_module("bench_bound_gap")
    from onnx_builders import mlp

    from quantize.error_model import error_model
    from quantize.modes import quantize_model
    from verifier.engine.bounds import spec_chain
    from verifier.engine.model import load_model
    from verifier.engine.quantized_spec import quantized_spec
    from verifier.engine.regions import lattice_region

    model = load_model(mlp(tmp_path / "mlp.onnx", sizes=(16, 80, 40, 4), seed=3))
    rng = np.random.default_rng(0)
    runner = quantize_model(model, "16x8", tmp_path, rng.random((128, 16), dtype=np.float32))
    em = error_model(runner, model.network.lower())
    measured = proved = 0
    for x in rng.random((6, 16), dtype=np.float32):
        region = lattice_region(x, rng.choice(16, 3, replace=False), 0.125, 1.5)
        label = int(runner.predict(x[None]).argmax())
        qs = quantized_spec(em, region, label)
        fspec = spec_chain(model.network.lower(), qs.region, label)
        rows = [r for r in bench.descend(qs.spec, fspec, 1, 5.0, 6) if "points" in r]
        points = [r["points"] for r in rows]
        assert points == sorted(points, reverse=True)
        assert all(r["milp"] in ("unsat", "sat", "unknown") for r in rows)
        pts = np.concatenate(list(region.enumerate()))
        out = runner.predict(region.points(pts).astype(np.float32))
        lowest = float((out[:, label, None] - np.delete(out, label, axis=1)).min())
        if rows and rows[0]["milp"] == "unsat":  # the first box is the whole region
            assert lowest > 0
            proved += 1
        measured += len(rows)
    assert measured >= 3 and proved >= 1
