"""Smoke tests of the experiment scripts on a handful of real test inputs and tiny grids."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def script(name: str):
    """Import experiments/<name>.py as a module (its own directory on sys.path)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tables_out(real_data: Path, tmp_path_factory) -> Path:
    """tables.py on 4 MNIST inputs, one (r, delta), both searches, one quantized model."""
    out = tmp_path_factory.mktemp("tables")
    argv = ["--models", "mnist", "--radius", "10", "--step", "1/4", "--limit", "4"]
    argv += ["--modes", "ort-dynamic", "--timeout", "0.2", "--rollouts", "30"]
    argv += ["--out", str(out), "--data-dir", str(real_data)]
    assert script("tables").main(argv) == 0
    return out


def test_tables(tables_out: Path) -> None:
    doc = load(tables_out / "tables.json")
    rows = doc["rows"]
    assert {r["search"] for r in rows} == {"mcts", "exact"}
    for r in rows:
        assert r["inputs"] == 4 and r["l_cc"] == r["R"] + r["R_NOT"] + r["float_unknown"]
        assert r["R"] == r["R_Q^FP"] + r["R^FP"] + r["R_unknown"]
        assert r["R_NOT"] == r["R^0"] + r["R_Q"] + r["R_NOT_unknown"]
    assert len(doc["paper"]["table_iii"]) == 28
    md = (tables_out / "tables.md").read_text()
    assert "Table II" in md and "Table III" in md and "60.34%" in md


def test_tables_resume_keeps_records(tables_out: Path, real_data: Path) -> None:
    argv = ["--models", "mnist", "--search", "mcts", "--radius", "10", "--step", "1/4"]
    argv += ["--limit", "4", "--modes", "ort-dynamic", "--timeout", "0.2", "--rollouts", "30"]
    argv += ["--out", str(tables_out), "--data-dir", str(real_data)]
    before = load(tables_out / "tables.json")["rows"]
    assert script("tables").main(argv) == 0
    after = load(tables_out / "tables.json")["rows"]
    assert before == after


def test_distortion(tables_out: Path, real_data: Path, tmp_path: Path) -> None:
    run = tables_out / "mnist" / "exact"
    argv = ["--run", str(run), "--out", str(tmp_path), "--data-dir", str(real_data)]
    assert script("distortion").main(argv) == 0
    doc = load(tmp_path / "distortion.json")
    for s in doc["settings"]:
        assert s["reconfirmed"] == s["all"]["count"]  # the regions were rebuilt exactly
        for row in s["rows"]:
            assert row["Linf"] <= s["step"] + 1e-9 and row["L1"] <= s["r"] + 1e-9
    assert "L0" in (tmp_path / "distortion.md").read_text()


def test_fig6(real_data: Path, tmp_path: Path) -> None:
    argv = ["--radius", "10", "--step", "1/4", "--limit", "5", "--timeout", "0.2"]
    argv += ["--rollouts", "30", "--out", str(tmp_path), "--data-dir", str(real_data)]
    assert script("fig6").main(argv) == 0
    doc = load(tmp_path / "fig6.json")
    (s,) = doc["settings"]
    assert all(0 <= v["effective"] <= 100 for v in s["labels"].values() if v["l_cc"])
    assert (tmp_path / "fig6.png").stat().st_size > 0


def test_precision_transfer(real_data: Path, tmp_path: Path) -> None:
    argv = ["--precisions", "float,sim-w4a4", "--step", "1/4", "--limit", "5"]
    argv += [
        "--timeout",
        "0.1",
        "--calib-size",
        "100",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(real_data),
    ]
    assert script("precision_transfer").main(argv) == 0
    doc = load(tmp_path / "precision_transfer.json")
    (s,) = doc["settings"]
    for name in doc["precisions"]:
        cell = s["matrix"][f"{name}->{name}"]
        assert cell["conditional"] in (None, 100.0)  # a success on the source fools it
    assert (tmp_path / s["figure"]).is_file()


def test_quant_shift(real_data: Path, tmp_path: Path) -> None:
    argv = ["--bits", "4", "--step", "1/4", "--limit", "5", "--timeout", "0.1"]
    argv += ["--out", str(tmp_path), "--data-dir", str(real_data)]
    assert script("quant_shift").main(argv) == 0
    doc = load(tmp_path / "quant_shift.json")
    (s,) = doc["settings"]
    assert set(s["models"]) == {"float", "sim-w4a4"}
    assert doc["layers"] == ["dense1", "relu1", "dense2", "relu2", "dense3"]
    rand = s["models"]["float"]["random"]
    assert rand["count"] > 0 and all(v >= 0 for v in rand["mean"])


def test_gradients(real_data: Path, tmp_path: Path) -> None:
    argv = ["--bits", "4", "--runtimes", "float,ort-qdq", "--h", "1/255", "--pixels", "40"]
    argv += ["--limit", "3", "--out", str(tmp_path), "--data-dir", str(real_data)]
    assert script("gradients").main(argv) == 0
    doc = load(tmp_path / "gradients.json")
    assert doc["misalignment"]["float|float"]["mean"] == pytest.approx(1.0)
    zd = {z["runtime"]: z for z in doc["zero_density"].values()}
    assert zd["float"]["zero_density"] < 5.0  # the float runtime has no flat directions
    assert zd["float"]["cosine_with_float_gradient"]["mean"] > 0.9


def test_simchain_matches_simulated_mode(real_data: Path, tmp_path: Path) -> None:
    from quantize import calibration_inputs, quantize_model

    common, simchain = script("common"), script("simchain")
    t = common.test_inputs("mnist", real_data, 50)
    calib, _ = calibration_inputs("mnist", real_data, "flat", (784,), 200, 0)
    runner = quantize_model(t.model, "simulated", tmp_path, calib, weight_bits=4, act_bits=4)
    sc = simchain.sim_chain(t.model.network.lower(), 4, 4, calib)
    np.testing.assert_allclose(simchain.logits(sc, t.x), runner.predict(t.x), atol=1e-3)


def test_tables_and_fig6_pass_cluster_to_verify(tmp_path: Path) -> None:
    addr = "tcp://10.0.0.1:8786"
    tables = script("tables")
    args = tables.parse_args(["--cluster", addr, "--out", str(tmp_path)])
    argv = tables.verify_argv("mnist", "exact", tmp_path / "run", args)
    assert argv[argv.index("--cluster") + 1] == addr
    fig6 = script("fig6")
    argv = fig6.verify_argv(fig6.parse_args(["--cluster", addr]), tmp_path / "run")
    assert argv[argv.index("--cluster") + 1] == addr
    assert "--cluster" not in fig6.verify_argv(fig6.parse_args([]), tmp_path / "run")


def test_tables_runs_every_sweep_on_one_local_cluster(tmp_path: Path, monkeypatch) -> None:
    """--workers 2: one local cluster for all sweeps, each `verify` pointed at it."""
    import verifier.run.cluster

    tables = script("tables")
    events, calls = [], []

    class Local:  # a local cluster's stand-in
        scheduler_address = "tcp://127.0.0.1:9"

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            events.append("closed")

    monkeypatch.setattr(
        verifier.run.cluster, "local_cluster", lambda n: events.append(n) or Local()
    )
    monkeypatch.setattr(tables, "verify", lambda argv: calls.append(argv) or 0.0)
    argv = ["--workers", "2", "--models", "mnist,cifar", "--search", "mcts", "--out", str(tmp_path)]
    tables.run_sweeps(tables.parse_args(argv), {}, {})
    assert events == [2, "closed"] and len(calls) == 2
    for call in calls:
        assert call[call.index("--cluster") + 1] == Local.scheduler_address
        assert call[call.index("--workers") + 1] == "1"
    tables.run_sweeps(tables.parse_args(["--out", str(tmp_path)]), {}, {})  # --workers 1
    assert events == [2, "closed"] and "--cluster" not in calls[-1]
