"""`verify` end to end on the example MNIST model and real test images (RELROBUST_DATA)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest
from conftest import EXAMPLES, decisions

from verifier.cli import main
from verifier.outputs.document import validate_results

MODEL = EXAMPLES / "mnist_mlp.onnx"
# A lattice region decides fast; 24 inputs keep the run to seconds.
BASE = [
    "--region",
    "lattice",
    "--dims",
    "6",
    "--radius",
    "2",
    "--step",
    "0.25",
    "--indices",
    "0:24",
    "--timeout",
    "5",
    "--quiet",
]


@pytest.fixture(scope="module")
def quantized(real_data, tmp_path_factory) -> Path:
    """A TFLite dynamic-range copy of the example model, built once for these tests."""
    from quantize import quantize_model
    from verifier.engine.model import load_model

    out = tmp_path_factory.mktemp("q")
    return Path(quantize_model(load_model(MODEL), "dynamic", out, None).describe()["path"])


DROP = ("seconds", "detail")  # a resumed run's decisions, without timings and search details


def verify(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finished_run(real_data, quantized, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    code = verify(MODEL, "--data-dir", real_data, "--quantized", quantized, "--out", out, *BASE)
    assert code == 0
    return out


def test_outputs_valid(finished_run):
    doc = json.loads((finished_run / "results.json").read_text())
    validate_results(doc)
    assert len(doc["records"]) == 24
    statuses = {r["float"]["status"] for r in doc["records"] if r["float"]}
    assert statuses <= {"certified", "refuted", "unknown"} and "certified" in statuses
    suites = ET.parse(finished_run / "junit.xml").getroot()
    cases = suites.findall(".//testcase")
    assert len(cases) == 24
    html = (finished_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "http" not in html
    assert (finished_run / "perturbations.npz").is_file()


# the paper's feature regions, large enough that some of inputs 0-7 are refuted
REFUTING = ["--region", "features", "--radius", "10", "--step", "1", "--indices", "0:8"]


@pytest.fixture(scope="module", params=["exact", "mcts"])
def refuting_run(request, real_data, quantized, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ladders") / request.param
    extra = ["--rollouts", "60"] if request.param == "mcts" else []
    argv = [MODEL, "--data-dir", real_data, "--quantized", quantized, "--out", out, *REFUTING]
    assert verify(*argv, "--search", request.param, "--timeout", "2", "--quiet", *extra) == 0
    return out


def test_ladders_of_refuted_inputs(refuting_run):
    doc = json.loads((refuting_run / "results.json").read_text())
    graph = nx.read_graphml(refuting_run / "ladders.graphml")
    refuted = [r for r in doc["records"] if r["float"] and r["float"]["status"] == "refuted"]
    assert refuted, "the run refuted no input: nothing to check"
    names = ["float", *(q["name"] for q in doc["quantized"])]
    for rec in refuted:
        coeffs = ",".join(str(v) for v in rec["float"]["coeffs"])
        end = graph.nodes[f"{rec['index']}:{coeffs}"]
        assert end["kind"] == "counterexample" and end["label_float"] != rec["label"]
        assert end["margin_float"] <= 0
        start = graph.nodes[f"{rec['index']}:" + ",".join("0" * len(rec["float"]["coeffs"]))]
        assert start["depth"] == 0 and start["label_float"] == rec["label"]
        for name in names:  # every model's margin at every rung
            assert f"margin_{name}" in end and f"label_{name}" in start
        transfer = {
            n: q["transfer"] for n, q in rec["quantized"].items() if q["transfer"] is not None
        }
        for name, fooled in transfer.items():  # the ladder's end is the replayed point
            assert (end[f"label_{name}"] != rec["label"]) == fooled
    html = (refuting_run / "report.html").read_text()
    assert "<h3>Ladders</h3>" in html
    if doc["config"]["search"] == "mcts":  # the explored IP / EP points are in the graph too
        kinds = {k for _, k in graph.nodes(data="kind") if k}
        assert "ineffective" in kinds
        for rec in doc["records"]:
            for p in (rec["float"] or {}).get("detail", {}).get("explored_ip", []):
                assert f"{rec['index']}:" + ",".join(map(str, p)) in graph


def test_gate_exit_status_both_ways(finished_run, real_data, quantized):
    doc = json.loads((finished_run / "results.json").read_text())
    acc = doc["aggregates"]["float"]["overall"]["accuracy"]
    common = [
        MODEL,
        "--data-dir",
        real_data,
        "--quantized",
        quantized,
        "--resume",
        finished_run,
        *BASE,
    ]
    assert verify(*common, "--min-accuracy", acc) == 0
    assert verify(*common, "--min-accuracy", min(acc + 0.5, 100.0) if acc < 100 else 100) in (
        0 if acc == 100 else 1,
    )
    assert verify(*common, "--max-unknown", "100", "--min-relative-robustness", "0") == 0


def test_resume_refuses_other_configuration(finished_run, real_data, quantized, capsys):
    code = verify(
        MODEL,
        "--data-dir",
        real_data,
        "--quantized",
        quantized,
        "--resume",
        finished_run,
        *BASE[:-3],
        "--timeout",
        "9",
        "--quiet",
    )
    assert code == 2
    assert "timeout" in capsys.readouterr().err


def test_workers_equal_one_worker(finished_run, real_data, quantized, tmp_path):
    out = tmp_path / "w2"
    assert (
        verify(
            MODEL,
            "--data-dir",
            real_data,
            "--quantized",
            quantized,
            "--out",
            out,
            "--workers",
            "2",
            *BASE,
        )
        == 0
    )
    assert decisions(out, DROP) == decisions(finished_run, DROP)


def test_kill_and_resume_loses_nothing(finished_run, real_data, quantized, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "verifier.cli",
        str(MODEL),
        "--data-dir",
        str(real_data),
        "--quantized",
        str(quantized),
        "--out",
        str(out),
        *BASE,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    db = out / "run.sqlite"
    deadline = time.time() + 120
    import sqlite3

    while time.time() < deadline:  # kill once a few records are committed, before the end
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    n = con.execute("select count(*) from records").fetchone()[0]
            except sqlite3.Error:
                n = 0
            if n >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists() or proc.returncode == 0
    assert verify("--resume", out, "--quiet") == 0
    assert decisions(out, DROP) == decisions(finished_run, DROP)


def test_resume_with_a_larger_quantized_budget_decides_what_ran_out(
    real_data, quantized, tmp_path, capsys
):
    """A resume with a larger --quantized-timeout decides again only the quantized decisions on
    inputs of R that ran out of budget; every decided outcome stays; a smaller one is refused,
    and the larger one becomes the run's (a plain resume then finds nothing to do)."""
    out = tmp_path / "budget"
    hard = ["--region", "features", "--step", "1/8", "--radius", "10", "--indices", "0:16"]
    argv = [MODEL, "--data-dir", real_data, "--quantized", quantized, *hard, "--quiet"]
    assert verify(*argv, "--out", out, "--quantized-timeout", "0.001") == 0
    before = decisions(out, DROP)

    def ran_out(recs):
        return {
            r["index"]
            for r in recs
            if r["float"] and r["float"]["status"] == "certified"
            for q in r["quantized"].values()
            if q["status"] == "unknown" and q["route"] == "budget"
        }

    short = ran_out(before)
    assert short, "the test needs quantized decisions out of budget at 1 ms"
    assert verify("--resume", out, "--quantized-timeout", "0.0005", "--quiet") == 2
    assert "resume with as much or more" in capsys.readouterr().err
    assert verify("--resume", out, "--quantized-timeout", "5", "--quiet") == 0
    after = decisions(out, DROP)
    assert not ran_out(after)  # these inputs take 0.1 s at most
    for old, new in zip(before, after, strict=True):
        assert new["float"] == old["float"]
        if old["index"] not in short:
            assert new == old  # decided, or not an input of R: never re-decided
    assert json.loads((out / "run.json").read_text())["quantized_timeout"] == 5.0
    assert verify("--resume", out, "--quiet") == 0
    assert decisions(out, DROP) == after
