"""Honest ranges (SPEC section 4): a measure that undecided inputs leave open is shown as
`lo..hi` in every output, overall and per class, and the gate checks a minimum against `lo`
and a maximum against `hi`."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from verifier.outputs.console import summary_table
from verifier.outputs.document import build_results, validate_results
from verifier.outputs.report import sweep_tables, write_report
from verifier.run.gate import Thresholds, check_gate, gate_summary
from verifier.run.records import InputRecord, Outcome
from verifier.run.relative import aggregate

CERT = Outcome("certified", "bounds")
UNK = Outcome("unknown", "budget")


def undecided_doc(gate: dict | None = None) -> dict:
    """Three inputs of R (label 3), none decided on `int8`; one of R_NOT (label 5) transferring,
    one whose transfer is undecided."""
    refuted = Outcome("refuted", "attack", coeffs=[1], adv_label=2)
    recs = [InputRecord(i, 3, 3, CERT, {"int8": UNK}, {"int8": 3}) for i in range(3)] + [
        InputRecord(
            3,
            5,
            5,
            refuted,
            {"int8": Outcome("refuted", "replay", transfer=True, transfer_label=2)},
            {"int8": 5},
        ),
        InputRecord(4, 5, 5, refuted, {}, {"int8": 5}),
    ]
    return build_results(
        {"radius": 1, "step": 1},
        recs,
        aggregate(recs, ["int8"]),
        model={"path": "m.onnx", "sha256": "ab" * 32},
        data={"name": "d", "source": "s", "sha256": "cd" * 32, "count": len(recs)},
        quantized=[{"name": "int8", "describe": {}}],
        gate=gate,
    )


def test_results_json_holds_lo_and_hi_overall_and_per_class():
    doc = undecided_doc()
    validate_results(doc)
    q = doc["aggregates"]["quantized"]["int8"]
    assert q["overall"]["relative_robustness_range"] == {"lo": 0.0, "hi": 100.0}
    assert q["overall"]["adversarial_transfer_range"] == {"lo": 50.0, "hi": 100.0}
    assert q["per_label"]["3"]["relative_robustness_range"] == {"lo": 0.0, "hi": 100.0}
    assert q["per_label"]["5"]["relative_robustness_range"] is None  # no input of R
    fl = doc["aggregates"]["float"]["overall"]
    assert fl["robust_range"] == {"lo": 60.0, "hi": 60.0}  # nothing undecided: one value


def test_markdown_html_console_and_sweep_show_the_range(tmp_path):
    doc = undecided_doc()
    write_report(tmp_path, doc)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for text in (md, html):
        assert "0.00..100.00%" in text and "50.00..100.00%" in text
        # relative robustness is never printed as a bare 0.00% while all of R is undecided
        assert not re.search(r"relative robustness[^.]*\(0\.00%\)", text)
    # per class: label 3's row has the range too
    row3 = next(line for line in md.splitlines() if line.startswith("| 3 | 3 | 0 | 0 | 3 |"))
    assert "0.00..100.00%" in row3
    console = summary_table(doc)
    assert "0.0..100.0" in console and "50.0..100.0" in console
    label3 = next(line for line in console.splitlines() if line.strip().startswith("3 "))
    assert "0.0..100.0" in label3
    assert "0/3 (0.00..100.00%)" in sweep_tables([(1.0, 1.0, doc["aggregates"])])


def test_console_says_how_to_narrow_a_range_left_by_quantized_budgets():
    """Quantized decisions out of budget on inputs of R get a line naming the option that
    gives them more time, with this run's value; a range from other causes gets none."""
    doc = undecided_doc()
    doc["config"]["settings"] = {"timeout": 2.0, "quantized_timeout": None}
    hint = [line for line in summary_table(doc).splitlines() if "--quantized-timeout" in line]
    assert hint == [
        "3 quantized decisions on inputs of R ran out of budget: --resume this run with a "
        "larger --quantized-timeout (this run: 2 s) to decide them again and narrow lo..hi"
    ]
    doc["config"]["settings"]["quantized_timeout"] = 8.0
    assert "(this run: 8 s)" in summary_table(doc)
    for rec in doc["records"]:  # undecided without a budget: an error model distrusted, say
        for q in rec["quantized"].values():
            q["route"] = "untrusted" if q["status"] == "unknown" else q["route"]
    assert "--quantized-timeout" not in summary_table(doc)


def test_junit_properties_carry_the_range(tmp_path):
    write_report(tmp_path, undecided_doc())
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["relative_robustness"] == "0.00..100.00%"
    assert props["relative_robustness.lo"] == "0" and props["relative_robustness.hi"] == "100"
    assert props["adversarial_transfer"] == "50.00..100.00%"
    assert props["relative_robustness[label=3]"] == "0.00..100.00%"
    assert props["relative_robustness[label=5]"] == "n/a"


@pytest.mark.parametrize(
    "thresholds, fails",
    [
        (Thresholds(min_relative_robustness=50), True),  # lo 0 < 50 although hi is 100
        (Thresholds(max_transfer=60), True),  # hi 100 > 60 although lo is 50
        (Thresholds(max_transfer=100), False),
        (Thresholds(min_relative_robustness=0), False),
    ],
)
def test_gate_checks_min_against_lo_and_max_against_hi(thresholds, fails):
    agg = undecided_doc()["aggregates"]
    failures = check_gate(agg, thresholds)
    assert bool(failures) == fails
    for f in failures:
        assert ("lower end" in f.message) == (f.direction == "min")
        assert ("upper end" in f.message) == (f.direction == "max")


def test_report_echoes_thresholds_as_understood(tmp_path):
    th = Thresholds(min_relative_robustness=90, max_transfer=10)
    doc = undecided_doc(gate_summary(th, check_gate(undecided_doc()["aggregates"], th)))
    write_report(tmp_path, doc)
    md = (tmp_path / "report.md").read_text()
    assert "at least 90% (checked against the lower end of its range)" in md
    assert "at most 10% (checked against the upper end of its range)" in md
    console = summary_table(doc)
    assert "gate: relative robustness of each quantized model at least 90%" in console
    assert json.loads(json.dumps(doc["gate"]))["thresholds"] == {
        "min_relative_robustness": 90,
        "max_transfer": 10,
    }
