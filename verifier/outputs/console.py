"""What a run prints on the terminal: clean accuracy, the per-class summary table, the gate as
understood, and the `--json` summary."""

from __future__ import annotations

import numpy as np

from verifier.run.config import Settings, stored_quantized_budget
from verifier.run.gate import understood
from verifier.run.records import InputRecord, out_of_budget
from verifier.run.relative import format_range


def accuracy_table(y: np.ndarray, preds: dict[str, np.ndarray], classes: int) -> str:
    """Per-class clean accuracy of the float model (F) and each quantized model (Q1, Q2, ...)."""
    names = list(preds)
    tags = ["F", *[f"Q{i}" for i in range(1, len(names))]]
    head = f"{'label':>5} {'inputs':>7} " + " ".join(f"{t + ' acc%':>9}" for t in tags)
    lines = ["clean accuracy", head]
    for c in [*range(classes), None]:
        mask = np.ones(len(y), bool) if c is None else y == c
        if not mask.any():
            continue
        cells = " ".join(f"{100 * np.mean(preds[n][mask] == y[mask]):>9.2f}" for n in names)
        lines.append(f"{'all' if c is None else c:>5} {int(mask.sum()):>7} {cells}")
    lines += [f"{t} = {n}" for t, n in zip(tags, names, strict=True)]
    return "\n".join(lines)


def summary(st: Settings, doc: dict) -> dict:
    """The figures a script wants: per quantized model, the sets and the two measures."""
    agg = doc["aggregates"]
    return {
        "radius": st.radius,
        "step": st.step,
        "float": agg["float"]["overall"],
        "quantized": {n: m["overall"] for n, m in agg["quantized"].items()},
        "gate": doc["gate"],
    }


def summary_table(doc: dict) -> str:
    """Per-class table: the float sets, then each quantized model's two measures."""
    agg = doc["aggregates"]
    fl = agg["float"]
    names = list(agg["quantized"])
    head = f"{'label':>5} {'L_cc':>6} {'R':>6} {'R_NOT':>6} {'unknown':>7}"
    for i, _ in enumerate(names):
        head += f" | Q{i + 1} {'RR%':>13} {'TR%':>13} {'unk':>4}"
    width = 13
    lines = ["", head]
    for lab in [*sorted(fl["per_label"], key=int), "all"]:
        f = fl["overall"] if lab == "all" else fl["per_label"][lab]
        row = f"{lab:>5} {f['l_cc']:>6} {f['r']:>6} {f['r_not']:>6} {f['unknown']:>7}"
        for n in names:
            q = agg["quantized"][n]
            qv = q["overall"] if lab == "all" else q["per_label"].get(lab)
            if qv is None:
                row += f" | {'':>2} {'-':>13} {'-':>13} {'-':>4}"
                continue
            rr = _cell(qv, "relative_robustness")
            tr = _cell(qv, "adversarial_transfer")
            row += f" | {'':>2} {rr:>{width}} {tr:>{width}} {qv['undecided']:>4}"
        lines.append(row)
    lines.append(
        "R: certified robust on the float model; R_NOT: refuted (confirmed counterexample)"
    )
    for i, n in enumerate(names):
        lines.append(f"Q{i + 1} = {n}")
    lines.append(
        "RR = relative robustness |R_Q^FP|/|R|; TR = adversarial transfer |R^0|/|R_NOT|; "
        "unk = undecided inputs; lo..hi = the range the undecided inputs leave open"
    )
    lines += more_time_hint(doc)
    lines += [f"gate: {line}" for line in understood(doc["gate"]["thresholds"])]
    return "\n".join(lines)


def more_time_hint(doc: dict) -> list[str]:
    """A line saying how to narrow the ranges that quantized decisions out of time on inputs
    of R leave (a quantized copy's rounding makes its hard inputs dearer than the float's)."""
    out_of_time = sum(len(out_of_budget(InputRecord.from_dict(r))) for r in doc["records"])
    if not out_of_time:
        return []
    budget = stored_quantized_budget(doc.get("config", {}).get("settings", {}))
    now = f" (this run: {budget:g} s)" if budget else ""
    return [
        f"{out_of_time} quantized decisions on inputs of R ran out of budget: --resume this "
        f"run with a larger --quantized-timeout{now} to decide them again and narrow lo..hi"
    ]


def _cell(o: dict, measure: str) -> str:
    """A measure's percentage, or `lo..hi` when undecided inputs leave a range; `-` if none."""
    rng = o[f"{measure}_range"]
    if rng is None:
        return "-"
    return format_range(rng, digits=1 if rng["lo"] != rng["hi"] else 2, unit="")


def printer(quiet: bool):
    """A `say(text)` that prints unless quiet."""

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say
