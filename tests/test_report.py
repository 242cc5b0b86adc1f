"""Run outputs: results.json against its schema, JUnit counts, the self-contained HTML, the
Markdown tables, the CI gate both ways, the sweep tables, and perturbations.npz."""

from __future__ import annotations

import base64
import copy
import json
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
from test_relative import sample_records

from verifier.engine.regions import lattice_region
from verifier.errors import InputError
from verifier.outputs.document import build_results, validate_results
from verifier.outputs.perturbations import read_perturbations, write_perturbations
from verifier.outputs.plots import Example
from verifier.outputs.report import render_markdown, report_blocks, sweep_tables, write_report
from verifier.run.gate import GateFailure, Thresholds, check_gate, gate_summary, load_baseline
from verifier.run.records import InputRecord
from verifier.run.relative import aggregate

CONFIG = {"radius": 20, "step": 0.25, "family": "lattice", "mode": "exact", "seed": 0}


def results_doc(gate: dict | None = None) -> dict:
    recs = sample_records()
    return build_results(
        CONFIG,
        recs,
        aggregate(recs),
        model={"path": "model.onnx", "sha256": "ab" * 32},
        data={
            "name": "mnist",
            "source": "t10k-images-idx3-ubyte",
            "sha256": "cd" * 32,
            "count": len(recs),
        },
        quantized=[
            {
                "name": "int8",
                "describe": {
                    "kind": "tflite-dynamic",
                    "error_model": {"error_model": True, "affine_layers": ["dynamic int8 input"]},
                },
            },
            {
                "name": "sim4",
                "describe": {
                    "bits": 4,
                    "error_model": {"error_model": False, "reason": "op QLinearMatMul"},
                },
            },
        ],
        gate=gate,
    )


def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    img = rng.random((8, 8, 1))
    return [
        Example(0, img, np.clip(img + 0.25, 0, 1), 0, 0, {"int8": 0, "sim4": 5}),
        Example(2, img, img[::-1], 1, 7, {"int8": 7, "sim4": 1}),
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One written run directory shared by the output tests (plots are the slow part)."""
    path = tmp_path_factory.mktemp("run")
    write_report(path, results_doc(), examples())
    return path


# -- results.json ---------------------------------------------------------------------------


def test_results_validate_and_round_trip(run_dir):
    doc = json.loads((run_dir / "results.json").read_text())
    validate_results(doc)
    assert doc["schema_version"] == "1.1" and doc["tool"]["name"] == "relrobust"
    assert [r["index"] for r in doc["records"]] == list(range(7))
    assert doc["aggregates"]["quantized"]["sim4"]["sets"]["R^FP"] == [0, 5]
    assert doc["gate"]["passed"] is True


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("aggregates"),
        lambda d: d["records"][0]["float"].update(status="probably"),
        lambda d: d["aggregates"]["quantized"]["int8"]["overall"].update(relative_robustness=120.0),
        lambda d: d.update(extra_key=1),
        lambda d: d["data"].update(sha256="not a hash"),
    ],
)
def test_invalid_results_are_rejected(breakage):
    doc = results_doc()
    validate_results(doc)
    bad = copy.deepcopy(doc)
    breakage(bad)
    with pytest.raises(InputError, match="schema"):
        validate_results(bad)


# -- junit.xml ------------------------------------------------------------------------------


def test_junit_counts_and_messages(run_dir):
    root = ET.parse(run_dir / "junit.xml").getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("14", "4", "6")
    suites = {s.get("name"): s for s in root}
    assert [(s.get("tests"), s.get("failures"), s.get("skipped")) for s in suites.values()] == [
        ("7", "1", "4"),
        ("7", "3", "2"),
    ]
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert len(cases) == 14
    rfp = cases[("sim4", "input 0 (label 0)")].find("failure")
    assert "R^FP" in rfp.get("message") and "as 5" in rfp.get("message")
    r0 = cases[("int8", "input 2 (label 1)")].find("failure")
    assert "R^0" in r0.get("message")
    lic = cases[("int8", "input 4 (label 2)")].find("skipped")
    assert "misclassified by the float model" in lic.get("message")
    assert cases[("int8", "input 0 (label 0)")].find("*") is None  # passed


# -- report.html and report.md --------------------------------------------------------------


def test_html_is_self_contained(run_dir):
    text = (run_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
    assert len(refs) == 4  # Fig. 6 bars, per-label measures, two example grids
    for ref in refs:
        assert ref.startswith("data:image/png;base64,")
        assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    lowered = text.lower()
    for external in ("http://", "https://", "<link", "<script", "url(", "@import", "//cdn"):
        assert external not in lowered
    assert "<style>" in text and "R<sub>Q</sub><sup>FP</sup>" in text


def test_markdown_has_the_tables(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "## How to read this" in md
    assert (
        "| model | accuracy | `L_cc` | `R` | `R_NOT` | unknown | `R_Q^FP` | `R^FP` | `R_Q` "
        "| `R^0` | relative robustness | adversarial transfer |"
    ) in md
    assert (
        "| int8 | 100.00% | 6 | 3 | 2 | 3 | 2 | 0 | 0 | 1 | 66.67..100.00% | 50.00..100.00% "
        "| 3/4 (75.00%) |" in md  # one input of R and one of R_NOT undecided: ranges
    )
    assert "| sim4 | 71.43% | 6 | 3 | 2 | 1 | 1 | 2 | 1 | 1 | 33.33% | 50.00% |" in md
    assert "| label | inputs | `L_cc` | `R` | `R_NOT` | unknown | effective |" in md
    assert "| 2 | 3 | 2 | 0 | 1 | 1 | 50.00..100.00% |" in md  # float, label 2: 1 unknown
    assert "| true \\| adversarial |" not in md
    assert "| true \\ adversarial | 0 | 1 | 2 | 7 | total |" in md
    assert "| 1 | 0 | 0 | 0 | 1 | 1 |" in md  # float: a 1 turned into a 7
    assert "the gate passes" in md


def test_markdown_says_which_models_bounds_speak_for(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "int8: error model of its rounding (dynamic int8 input)" in md
    assert "sim4: no error model (op QLinearMatMul): certified only by enumeration" in md


def test_report_shows_a_failed_gate(tmp_path):
    recs = sample_records()
    thresholds = Thresholds(min_relative_robustness=50.0)
    failures = check_gate(aggregate(recs), thresholds)
    write_report(tmp_path, results_doc(gate_summary(thresholds, failures)))
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["gate"]["passed"] is False
    assert doc["gate"]["failures"][0]["model"] == "sim4"
    md = (tmp_path / "report.md").read_text()
    assert "FAILED" in md and "relative_robustness (lower end of its range) of sim4 is 33.33%" in md


# -- the gate -------------------------------------------------------------------------------


def test_gate_passes_within_limits():
    agg = aggregate(sample_records())
    t = Thresholds(min_relative_robustness=30, max_transfer=100, max_unknown=50, min_accuracy=70)
    assert check_gate(agg, t) == []
    assert check_gate(agg, Thresholds()) == []


def test_gate_fails_naming_measure_model_and_amount():
    agg = aggregate(sample_records())
    failures = check_gate(agg, Thresholds(min_relative_robustness=90, max_transfer=40))
    found = {(f.measure, f.model): f for f in failures}
    assert set(found) == {
        ("relative_robustness", "int8"),
        ("relative_robustness", "sim4"),
        ("adversarial_transfer", "int8"),
        ("adversarial_transfer", "sim4"),
    }
    f = found[("relative_robustness", "int8")]
    assert f.miss == pytest.approx(90 - 200 / 3)
    assert f.message == (
        "relative_robustness (lower end of its range) of int8 is 66.67%, below the minimum "
        "90.00% by 23.33 percentage points"
    )
    assert "above the maximum 40.00% by 10.00" in found[("adversarial_transfer", "sim4")].message
    acc = check_gate(agg, Thresholds(min_accuracy=80))
    assert [(f.measure, f.model) for f in acc] == [("accuracy", "sim4")]  # float 85.71%


def test_gate_against_a_baseline(tmp_path):
    doc = results_doc()
    (tmp_path / "results.json").write_text(json.dumps(doc))
    baseline = load_baseline(tmp_path / "results.json")
    agg = aggregate(sample_records())
    assert check_gate(agg, Thresholds(), baseline) == []
    better = copy.deepcopy(baseline)
    better["quantized"]["int8"]["overall"]["relative_robustness"] = 80.0
    better["quantized"]["int8"]["overall"]["relative_robustness_range"]["lo"] = 80.0
    failures = check_gate(agg, Thresholds(), better, tolerance=5.0)
    assert len(failures) == 1 and failures[0].against == "baseline"
    assert failures[0].limit == pytest.approx(75.0)
    assert failures[0].miss == pytest.approx(75.0 - 200 / 3)
    assert "baseline minus tolerance" in failures[0].message
    assert check_gate(agg, Thresholds(), better, tolerance=20.0) == []


def test_gate_rejects_bad_limits():
    with pytest.raises(InputError, match="--max-transfer"):
        Thresholds(max_transfer=150)
    with pytest.raises(InputError, match="tolerance"):
        check_gate(aggregate(sample_records()), Thresholds(), {}, tolerance=-1)


def test_gate_failure_is_plain_data():
    f = GateFailure("accuracy", "float", 90.0, 95.0, 5.0, "min")
    assert f.to_dict()["message"].startswith("accuracy of float is 90.00%")


# -- sweep tables ---------------------------------------------------------------------------


def test_sweep_table_layout():
    agg = aggregate(sample_records())
    text = sweep_tables([(10, 1.0, agg), (20, 1.0, agg.to_dict()), (20, 0.25, agg)])
    lines = text.splitlines()
    start = lines.index("### Relative robustness of int8: |R_Q^FP| / |R|")
    assert lines[start + 2 : start + 6] == [
        "| r \\ δ | ±1/4 | ±1 |",
        "|---|---|---|",
        "| 10 | – | 2/3 (66.67..100.00%) |",
        "| 20 | 2/3 (66.67..100.00%) | 2/3 (66.67..100.00%) |",
    ]
    assert "### Adversarial transfer of sim4: |R^0| / |R_NOT|" in lines
    assert "| 10 | – | 1/2 (50.00%) |" in lines


# -- perturbations.npz ----------------------------------------------------------------------


def test_perturbations_round_trip_rebuilds_points(run_dir, tmp_path):
    stored = read_perturbations(run_dir / "perturbations.npz")
    assert set(stored) == {(0, "sim4"), (2, "float"), (6, "float")}
    assert stored[(0, "sim4")].dtype == np.int64
    assert stored[(0, "sim4")].tolist() == [1, 0, -2]
    x = np.linspace(0.1, 0.9, 16)
    region = lattice_region(x, np.array([2, 5, 9]), step=0.25, radius=2.0)
    for (index, model), coeffs in stored.items():
        rec = sample_records()[index]
        orig = rec.float.coeffs if model == "float" else rec.quantized[model].coeffs
        np.testing.assert_array_equal(region.points(coeffs), region.points(np.array(orig)))
    empty = tmp_path / "none.npz"
    write_perturbations(empty, [])
    assert read_perturbations(empty) == {}


def test_float_only_run(tmp_path):
    recs = [InputRecord(r.index, r.label, r.pred, r.float, {}, {}) for r in sample_records()]
    doc = build_results(
        CONFIG,
        recs,
        aggregate(recs),
        model={"path": "m.onnx", "sha256": None},
        data={"name": "npz", "source": "x.npz", "sha256": None, "count": 7},
    )
    write_report(tmp_path, doc)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert [s.get("name") for s in root] == ["float"]
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("7", "2", "2")
    assert "What quantization changed" not in (tmp_path / "report.md").read_text()
    assert check_gate(doc["aggregates"], Thresholds(max_unknown=10))[0].model == "float"


def test_markdown_says_how_quantized_models_were_decided():
    """A quantized model decided from the float proof: its route is explained, and the line on
    its rounding names what was mapped."""
    doc = results_doc()
    doc["quantized"][0]["describe"]["error_model"]["source"] = "litert dynamic range"
    rec = next(r for r in doc["records"] if r["float"] and r["float"]["status"] == "certified")
    rec["quantized"]["int8"]["route"] = "diff-leaves"
    md = render_markdown(report_blocks(doc, plots=False))
    assert "int8: error model of its rounding (litert dynamic range; dynamic int8 input)" in md
    assert "- diff-leaves: every branch-and-bound leaf of the float model's proof" in md
    doc["quantized"][0]["describe"]["error_model"]["how"] = "int8 inputs: half a step per value"
    md = render_markdown(report_blocks(doc, plots=False))
    assert "dynamic int8 input): int8 inputs: half a step per value" in md
    # an input of R whose int8 decision ran out of time: the route says what more time does
    hint = "- budget: undecided when its time (or nodes) ran out: `verify --resume` with a "
    assert hint + "larger --quantized-timeout decides them again" in md
    other = next(
        r
        for r in doc["records"]
        if r["quantized"].get("int8", {}).get("route") == "budget"
        and r["float"]["status"] == "certified"
    )
    other["quantized"]["int8"].update(status="certified", route="bounds")
    assert hint not in render_markdown(report_blocks(doc, plots=False))
    del doc["quantized"][0]["describe"]["error_model"]["source"]
    rec["quantized"]["int8"]["route"] = "bounds"
    assert "start from its proof" not in render_markdown(report_blocks(doc, plots=False))


def test_progress_line_off_a_terminal_and_a_bar_on_one():
    import io

    from verifier.outputs.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    rec = SimpleNamespace(float=SimpleNamespace(status="certified"))
    for stream, want in ((io.StringIO(), "r=1 5/5 "), (Tty(), "5/5 [")):
        p = Progress(5, 1, label="r=1", stream=stream)
        for _ in range(4):
            p.update(rec)
        p.close()
        text = stream.getvalue()
        assert text.startswith("resuming: 1 of 5") and want in text and "certified 4" in text
