"""junit.xml: one suite per quantized model (or the float model), one case per input, for CI.

Each suite's `<properties>` hold its measures, overall and per true label, as the reports print
them (`lo..hi` when undecided inputs leave a range) and as numbers (`.lo`, `.hi`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from verifier.run.records import FLOAT, InputRecord
from verifier.run.relative import (
    FLOAT_UNKNOWN,
    L_IC,
    R_0,
    R_FP,
    R_NOT,
    R_NOT_UNKNOWN,
    R_UNKNOWN,
    float_set,
    format_range,
    quant_set,
)

# suite -> the measures its properties report (the float suite when there is no quantized model)
SUITE_MEASURES = {
    "float": ("robust", "effective"),
    "quantized": ("relative_robustness", "adversarial_transfer"),
}


def _properties(suite: ET.Element, agg: dict, name: str | None) -> None:
    """The suite's measures overall and per true label, as text ranges and as numbers."""
    part = agg["float"] if name is None else agg["quantized"][name]
    props = ET.SubElement(suite, "properties")
    groups = [("", part["overall"])]
    groups += [(f"[label={lab}]", o) for lab, o in part["per_label"].items()]
    for measure in SUITE_MEASURES["float" if name is None else "quantized"]:
        for tag, o in groups:
            rng = o.get(f"{measure}_range")
            ET.SubElement(props, "property", name=measure + tag, value=format_range(rng))
            if rng is not None:
                for end in ("lo", "hi"):
                    value = f"{rng[end]:.6g}"
                    ET.SubElement(props, "property", name=f"{measure}{tag}.{end}", value=value)


def _junit_verdict(rec: InputRecord, name: str | None) -> tuple[str, str]:
    """("passed" | "failure" | "skipped", message) for one input and one model."""
    fset = float_set(rec)
    if fset == L_IC:
        return (
            "skipped",
            f"misclassified by the float model (label {rec.label}, predicted {rec.pred})",
        )
    if fset == FLOAT_UNKNOWN:
        return "skipped", "float model undecided on the region (unknown)"
    if name is None:  # the float suite, written when there is no quantized model
        if fset == R_NOT:
            return "failure", f"not robust: a counterexample is labelled {rec.float.adv_label}"
        return "passed", ""
    qset, q = quant_set(rec, name), rec.quantized.get(name)
    if qset == R_FP:
        at = f" as {q.adv_label}" if q and q.adv_label is not None else ""
        return "failure", (
            f"relative robustness lost (R^FP): the float model is robust on this "
            f"region but {name} misclassifies a point of it{at}"
        )
    if qset == R_0:
        fl = rec.float.adv_label
        at = f" (labelled {q.transfer_label})" if q and q.transfer_label is not None else ""
        return "failure", (
            f"adversarial example transfers (R^0): the float model's "
            f"counterexample (labelled {fl}) also fools {name}{at}"
        )
    if qset == R_UNKNOWN:
        return "skipped", f"{name} undecided on the region (unknown)"
    if qset == R_NOT_UNKNOWN:
        return "skipped", f"transfer of the float counterexample to {name} not decided"
    return "passed", ""


def junit_xml(doc: dict) -> bytes:
    """JUnit XML: one suite per quantized model (or `float` if none), one case per input."""
    records = [InputRecord.from_dict(r) for r in doc["records"]]
    names: list[str | None] = list(doc["aggregates"]["quantized"]) or [None]
    root = ET.Element("testsuites", name="relrobust")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    seconds_total = 0.0
    for name in names:
        suite = ET.SubElement(root, "testsuite", name=name or FLOAT)
        _properties(suite, doc["aggregates"], name)
        counts = dict.fromkeys(totals, 0)
        seconds_suite = 0.0
        for rec in records:
            outcome = rec.float if name is None else rec.quantized.get(name)
            seconds = outcome.seconds if outcome else 0.0
            case = ET.SubElement(
                suite,
                "testcase",
                classname=name or FLOAT,
                name=f"input {rec.index} (label {rec.label})",
                time=f"{seconds:.3f}",
            )
            verdict, message = _junit_verdict(rec, name)
            if verdict == "failure":
                ET.SubElement(case, "failure", message=message, type="robustness").text = message
            elif verdict == "skipped":
                ET.SubElement(case, "skipped", message=message)
            counts["tests"] += 1
            counts["failures"] += verdict == "failure"
            counts["skipped"] += verdict == "skipped"
            seconds_suite += seconds
        suite.attrib.update({k: str(v) for k, v in counts.items()}, time=f"{seconds_suite:.3f}")
        totals = {k: totals[k] + counts[k] for k in totals}
        seconds_total += seconds_suite
    root.attrib.update({k: str(v) for k, v in totals.items()}, time=f"{seconds_total:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
