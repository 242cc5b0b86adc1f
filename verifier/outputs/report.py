"""The human-readable outputs of a run: report.md / report.html and the sweep tables, and
`write_report`, which writes every output file of one setting.

results.json (`verifier.outputs.document`) is the single source: the Markdown, HTML, JUnit
(`verifier.outputs.junit`) and perturbation (`verifier.outputs.perturbations`) files are
rendered from the
results document, so what a person reads is exactly what CI parses. Every file is written
through `store.write_atomic`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from verifier.engine.ladders import graphml, margin_graph
from verifier.outputs.document import write_results
from verifier.outputs.junit import junit_xml
from verifier.outputs.perturbations import write_perturbations
from verifier.outputs.plots import (
    Example,
    plot_examples,
    plot_label_effective,
    plot_label_relative,
    plot_ladders,
)
from verifier.run.gate import understood
from verifier.run.records import FLOAT, InputRecord
from verifier.run.relative import Aggregate, R, format_range
from verifier.run.store import write_atomic

MAX_EXAMPLES = 24  # per example grid, to keep report.html readable
MAX_LADDERS = 12  # refuted inputs whose ladders are drawn


# -- document blocks, rendered to Markdown and HTML -----------------------------------------

# Tokens for the set names, rendered per format.
SYMBOLS = {
    "{LCC}": ("L_cc", "L<sub>cc</sub>"),
    "{LIC}": ("L_ic", "L<sub>ic</sub>"),
    "{RNOT}": ("R_NOT", "R<sub>NOT</sub>"),
    "{RQFP}": ("R_Q^FP", "R<sub>Q</sub><sup>FP</sup>"),
    "{RFP}": ("R^FP", "R<sup>FP</sup>"),
    "{RQ}": ("R_Q", "R<sub>Q</sub>"),
    "{R0}": ("R^0", "R<sup>0</sup>"),
    "{R}": ("R", "R"),
}

HOW_TO_READ = (
    "Every test input is first classified by the float model. Inputs it gets wrong ({LIC}) "
    "are set aside; the correctly classified ones ({LCC}) are checked on their region: every "
    "image reachable from the input by the allowed pixel manipulations (radius r, step δ). "
    "{R} holds the inputs where the float model keeps the right label on the whole region: "
    "proven (certified), or, in search (MCTS) mode, no counterexample was found among the "
    "points searched. {RNOT} holds the inputs where a misclassified point of the region was "
    "found and confirmed on the runtime. Unknown means the time or node budget ran out first; "
    "unknowns are counted, never guessed. For each quantized model, the inputs of {R} split "
    "into {RQFP} (the quantized model also keeps the label everywhere: relatively robust) and "
    "{RFP} (quantization broke robustness: the quantized model misclassifies a point the "
    "float model gets right). The inputs of {RNOT} split into {RQ} (the float model's "
    "counterexample no longer fools the quantized model) and {R0} (it still does: the attack "
    "transfers). Relative robustness = |{RQFP}| / |{R}|; adversarial transfer = "
    "|{R0}| / |{RNOT}|. Where undecided inputs could fall either way, a measure is shown as "
    "the range lo..hi they leave open (lo: none of them in the set; hi: all of them)."
)


@dataclass
class Block:
    """One piece of a report: heading, paragraph, list, table or image."""

    kind: str  # "h1" "h2" "h3" "p" "ul" "table" "img"
    text: str = ""
    items: list = field(default_factory=list)  # list items, or table rows
    headers: list[str] = field(default_factory=list)
    png: bytes = b""
    cls: str = ""


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def _share(o: dict, measure: str) -> str:
    """A measure as `lo..hi` when undecided inputs leave it a range, else one value."""
    key = f"{measure}_range"
    return format_range(o[key]) if key in o else _pct(o[measure])


def _plain(text: str) -> str:
    for tok, (md, _) in SYMBOLS.items():
        text = text.replace(tok, md)
    return text


def _md(text: str, cell: bool = False) -> str:
    for tok, (md, _) in SYMBOLS.items():
        text = text.replace(tok, f"`{md}`")
    return text.replace("|", "\\|") if cell else text


def _html(text: str) -> str:
    text = html.escape(str(text))
    for tok, (_, markup) in SYMBOLS.items():
        text = text.replace(tok, markup)
    return text


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown for the blocks; images are left to report.html and named by their caption."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + _md(b.text))
        elif b.kind == "p":
            out.append(_md(b.text))
        elif b.kind == "ul":
            out.append("\n".join(f"- {_md(str(i))}" for i in b.items))
        elif b.kind == "table":
            rows = [[_md(str(c), cell=True) for c in row] for row in b.items]
            head = [_md(h, cell=True) for h in b.headers]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"*Figure (in report.html): {_md(b.text)}*")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:78rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0 1.2rem;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.pass{color:#05620b;font-weight:bold}.fail{color:#a00;font-weight:bold}
figure{margin:1rem 0}img{max-width:100%}figcaption{font-size:.9rem;color:#555}
""".strip()


def render_html(blocks: Sequence[Block], title: str = "relrobust report") -> str:
    """A self-contained HTML page: inline CSS, images as base64 data URIs, no external links."""
    body = []
    for b in blocks:
        cls = f' class="{b.cls}"' if b.cls else ""
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_html(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p{cls}>{_html(b.text)}</p>")
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_html(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_html(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_html(c)}</td>" for c in row) + "</tr>" for row in b.items
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(_plain(b.text))}" '
                f'src="data:image/png;base64,{data}"><figcaption>{_html(b.text)}'
                "</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _intro_blocks(doc: dict) -> list[Block]:
    cfg, model, data = doc["config"], doc["model"], doc["data"]
    names = [q["name"] for q in doc["quantized"]] or list(doc["aggregates"]["quantized"])
    sha = (model.get("sha256") or "")[:16]
    external = [f"{e['location']} ({e['bytes']:,} bytes)" for e in model.get("external_data", [])]
    lines = [
        f"Float model: {model['path']}"
        + (f" (sha256 {sha}…)" if sha else "")
        + ("; weights in external data: " + ", ".join(external) if external else ""),
        "Quantized copies: " + (", ".join(names) if names else "none"),
        f"Data: {data['name']} from {data['source']}, {data['count']} inputs",
    ]
    region = ", ".join(f"{k} {cfg[k]}" for k in ("radius", "step", "family", "mode") if k in cfg)
    if region:
        lines.append("Region: " + region)
    lines.append(
        f"Tool: relrobust {doc['tool']['version']}, results schema {doc['schema_version']}"
    )
    return [Block("h1", "Relative robustness report"), Block("ul", items=lines)]


def _gate_blocks(gate: dict) -> list[Block]:
    blocks = [Block("h2", "CI gate")]
    if not gate["thresholds"] and gate.get("baseline") is None:
        return blocks + [
            Block("p", "No thresholds and no baseline were set: the gate passes.", cls="pass")
        ]
    checked = "; ".join(understood(gate["thresholds"]))
    if gate.get("baseline"):
        checked += (", " if checked else "") + (
            f"baseline {gate['baseline']} (tolerance {gate['tolerance']:g} points)"
        )
    if gate["passed"]:
        return blocks + [Block("p", f"PASSED. Checked: {checked}.", cls="pass")]
    return blocks + [
        Block("p", f"FAILED. Checked: {checked}.", cls="fail"),
        Block("ul", items=[f["message"] for f in gate["failures"]]),
    ]


def _float_blocks(fl: dict) -> list[Block]:
    o = fl["overall"]
    text = (
        f"Of {o['inputs']} inputs the float model classifies {o['l_cc']} correctly "
        f"({_pct(o['accuracy'])}). Of those it is robust ({{R}}) on {o['r']} "
        f"({_share(o, 'robust')}), has a confirmed counterexample ({{RNOT}}) on {o['r_not']} "
        f"({_share(o, 'effective')}), and leaves {o['unknown']} undecided "
        f"({_pct(o['unknown_share'])})."
    )
    headers = [
        "inputs",
        "{LCC}",
        "{LIC}",
        "{R}",
        "{RNOT}",
        "unknown",
        "accuracy",
        "robust",
        "effective",
    ]
    row = [
        o["inputs"],
        o["l_cc"],
        o["l_ic"],
        o["r"],
        o["r_not"],
        o["unknown"],
        _pct(o["accuracy"]),
        _share(o, "robust"),
        _share(o, "effective"),
    ]
    return [
        Block("h2", "The float model"),
        Block("p", text),
        Block("table", items=[row], headers=headers),
    ]


def _model_sentence(name: str, o: dict) -> str:
    return (
        f"{name}: keeps robustness on {o['rq_fp']} of the {o['r']} inputs of {{R}} "
        f"({_share(o, 'relative_robustness')}), loses it on {o['r_fp']} ({{RFP}}), "
        f"{o['r_unknown']} undecided. The float counterexamples still fool it on {o['r0']} "
        f"of the {o['r_not']} inputs of {{RNOT}} ({_share(o, 'adversarial_transfer')}), "
        f"no longer on {o['r_q']} ({{RQ}}), {o['r_not_unknown']} not decided. "
        f"Clean accuracy {_pct(o['accuracy'])}, agreement with the float model "
        f"{_pct(o['agreement'])}."
    )


def _model_blocks(models: dict) -> list[Block]:
    headers = [
        "model",
        "accuracy",
        "{LCC}",
        "{R}",
        "{RNOT}",
        "unknown",
        "{RQFP}",
        "{RFP}",
        "{RQ}",
        "{R0}",
        "relative robustness",
        "adversarial transfer",
        "EP points transferred",
    ]
    rows = []
    for name, m in models.items():
        o = m["overall"]
        rows.append(
            [
                name,
                _pct(o["accuracy"]),
                o["l_cc"],
                o["r"],
                o["r_not"],
                o["undecided"],
                o["rq_fp"],
                o["r_fp"],
                o["r_q"],
                o["r0"],
                _share(o, "relative_robustness"),
                _share(o, "adversarial_transfer"),
                f"{o['ep_transferred']}/{o['ep_replayed']} ({_pct(o['ep_transfer'])})",
            ]
        )
    return [
        Block("h2", "What quantization changed"),
        Block(
            "p",
            "Numbers of inputs in each set; unknown counts the inputs of {LCC} left "
            "undecided for the float or the quantized model.",
        ),
        Block("table", items=rows, headers=headers),
        Block("ul", items=[_model_sentence(n, m["overall"]) for n, m in models.items()]),
    ]


def _per_class_blocks(agg: dict) -> list[Block]:
    blocks = [Block("h2", "Per class"), Block("h3", "Float model")]
    rows = [
        [lab, o["inputs"], o["l_cc"], o["r"], o["r_not"], o["unknown"], _share(o, "effective")]
        for lab, o in agg["float"]["per_label"].items()
    ]
    blocks.append(
        Block(
            "table",
            items=rows,
            headers=["label", "inputs", "{LCC}", "{R}", "{RNOT}", "unknown", "effective"],
        )
    )
    for name, m in agg["quantized"].items():
        rows = [
            [
                lab,
                o["r"],
                o["rq_fp"],
                o["r_fp"],
                o["r_unknown"],
                _share(o, "relative_robustness"),
                o["r_not"],
                o["r_q"],
                o["r0"],
                o["r_not_unknown"],
                _share(o, "adversarial_transfer"),
            ]
            for lab, o in m["per_label"].items()
        ]
        blocks += [
            Block("h3", name),
            Block(
                "table",
                items=rows,
                headers=[
                    "label",
                    "{R}",
                    "{RQFP}",
                    "{RFP}",
                    "unknown in {R}",
                    "relative robustness",
                    "{RNOT}",
                    "{RQ}",
                    "{R0}",
                    "unknown in {RNOT}",
                    "adversarial transfer",
                ],
            ),
        ]
    return blocks


def _matrix_table(matrix: dict) -> Block:
    labels = matrix["labels"]
    rows = [
        [lab, *row, sum(row)] for lab, row in zip(labels, matrix["counts"], strict=True) if sum(row)
    ]
    return Block("table", items=rows, headers=["true \\ adversarial", *map(str, labels), "total"])


def _matrix_blocks(agg: dict) -> list[Block]:
    blocks = [
        Block("h2", "Adversarial labels"),
        Block(
            "p",
            "Rows: the true label. Columns: the label the model gives at the point that fools "
            "it. Only rows with at least one such point are shown.",
        ),
    ]
    parts = [("Float model, at its counterexamples ({RNOT})", agg["float"]["matrix"])]
    parts += [
        (
            f"{name}, at its own counterexamples ({{RFP}}) and at the float counterexamples "
            "that transfer ({R0})",
            m["matrix"],
        )
        for name, m in agg["quantized"].items()
    ]
    for title, matrix in parts:
        blocks.append(Block("h3", title))
        if any(any(row) for row in matrix["counts"]):
            blocks.append(_matrix_table(matrix))
        else:
            blocks.append(Block("p", "No adversarial point."))
    return blocks


def _route_blocks(doc: dict) -> list[Block]:
    """How each model's answers were reached: counts and seconds per (model, route, status)."""
    counts: dict[tuple[str, str, str], list[float]] = {}
    for rec in doc["records"]:
        outcomes = [(FLOAT, rec["float"])] + list(rec["quantized"].items())
        for name, o in outcomes:
            if o is not None:
                cell = counts.setdefault((name, o["route"], o["status"]), [0, 0.0])
                cell[0] += 1
                cell[1] += o["seconds"]
    rows = [
        [m, route, status, n, f"{sec:.1f}"]
        for (m, route, status), (n, sec) in sorted(
            counts.items(), key=lambda kv: (kv[0][0] != FLOAT, kv[0])
        )
    ]
    return (
        [
            Block("h2", "How the answers were reached"),
            Block(
                "p",
                "Per model, the step that decided each input (bounds, branch and bound, "
                "enumeration and z3 prove; attack and search find counterexamples, confirmed "
                "on the runtime; budget means the time or node limit ran out).",
            ),
            Block("table", items=rows, headers=["model", "route", "status", "inputs", "seconds"]),
        ]
        + _quantized_route_blocks(doc)
        + _error_model_blocks(doc)
    )


QUANTIZED_ROUTES = {
    "bounds": "the runtime's own bounds (its error model) over the whole region, or over "
    "sub-regions with its run-time input quantization folded in",
    "diff-root": "the float model's root bound plus the bound on the quantized-minus-float "
    "difference",
    "diff-leaves": "every branch-and-bound leaf of the float model's proof, reused with the "
    "difference bound or the runtime's own bounds on the leaf",
    "diff-bab": "the float proof's leaves split further, bounded on the quantized runtime",
    "enumeration": "points run on the quantized runtime: every point of the region or of "
    "small leaves, or the points a leaf's bounds leave open (sieve)",
    "attack": "a counterexample found and confirmed on the quantized runtime",
    "budget": "undecided when its time (or nodes) ran out: `verify --resume` with a larger "
    "--quantized-timeout decides them again",
}


def _quantized_route_blocks(doc: dict) -> list[Block]:
    """What the routes of quantized models on R mean (inputs the float model certified)."""
    seen = {
        o["route"]
        for rec in doc["records"]
        if rec["float"] is not None and rec["float"]["status"] == "certified"
        for o in rec["quantized"].values()
    }
    items = [f"{route}: {text}" for route, text in QUANTIZED_ROUTES.items() if route in seen]
    if not any(r.startswith("diff-") for r in seen):
        return []
    return [
        Block("p", "Quantized models on inputs the float model certified start from its proof:"),
        Block("ul", items=items),
    ]


def _error_model_blocks(doc: dict) -> list[Block]:
    """Which quantized models bounds can speak for (an error model of their rounding) and why
    the others can only be certified by enumerating a region."""
    items = []
    for q in doc["quantized"]:
        em = q.get("describe", {}).get("error_model")
        if em is None:
            continue
        if em.get("error_model"):
            kinds = ", ".join(em.get("affine_layers", []))
            source = f"{em['source']}; " if em.get("source") else ""
            how = f": {em['how']}" if em.get("how") else ""
            item = f"{q['name']}: error model of its rounding ({source}{kinds}){how}"
        else:
            reason = em.get("reason")
            item = f"{q['name']}: no error model ({reason}): certified only by enumeration"
        provenance = q["describe"].get("provenance", {})
        if provenance.get("preprocessed") is False:
            why = provenance.get("preprocess_error")
            item += f" (onnxruntime's graph pre-processing failed: {why}; layers quantized unfused)"
        items.append(item)
    if not items:
        return []
    return [
        Block(
            "p",
            "Bounds certify a quantized model on a region only through a sound model of its "
            "rounding, built from the quantized file:",
        ),
        Block("ul", items=items),
    ]


def _config_blocks(doc: dict) -> list[Block]:
    def show(v: object) -> str:
        text = json.dumps(v)
        return text if len(text) <= 100 else text[:97] + "..."

    rows = [[k, show(v)] for k, v in doc["config"].items()]
    runtimes = [[k, v or "not installed"] for k, v in doc["runtimes"].items()]
    return [
        Block("h2", "Configuration"),
        Block("table", items=rows, headers=["key", "value"]),
        Block("h3", "Runtimes"),
        Block("table", items=runtimes, headers=["package", "version"]),
    ]


def report_blocks(
    doc: dict, examples: Sequence[Example] = (), plots: bool = True, ladders: Sequence = ()
) -> list[Block]:
    """The whole report for one results document (plots drawn only when `plots`)."""
    agg = doc["aggregates"]
    blocks = _intro_blocks(doc) + _gate_blocks(doc["gate"])
    blocks += [Block("h2", "How to read this"), Block("p", HOW_TO_READ)]
    blocks += _float_blocks(agg["float"])
    if agg["quantized"]:
        blocks += _model_blocks(agg["quantized"])
    blocks += _per_class_blocks(agg) + _route_blocks(doc)
    if plots:
        blocks += _plot_blocks(agg, examples) + _ladder_blocks(ladders)
    return blocks + _matrix_blocks(agg) + _config_blocks(doc)


def _plot_blocks(agg: dict, examples: Sequence[Example]) -> list[Block]:
    blocks = [
        Block("h2", "Plots"),
        Block(
            "img",
            "Share of correctly classified inputs per true "
            "label with an effective perturbation for the "
            "float model (grey: undecided), as the paper's "
            "Fig. 6.",
            png=plot_label_effective(agg),
        ),
    ]
    if agg["quantized"]:
        blocks.append(
            Block(
                "img",
                "Relative robustness and adversarial transfer per true label "
                "(hatched: the range undecided inputs leave open; no bar: empty denominator).",
                png=plot_label_relative(agg),
            )
        )
    robust = set(agg["float"]["sets"][R])
    groups = [
        (
            "Inputs of {R}: robust for the float model; perturbed points each model answers "
            "(as the paper's Fig. 4, where {RFP} images are misclassified by the quantized model).",
            [e for e in examples if e.index in robust],
        ),
        (
            "Inputs of {RNOT}: the float counterexample and each model's answer on it "
            "(as the paper's Fig. 5: {RQ} when the quantized model keeps the true label).",
            [e for e in examples if e.index not in robust],
        ),
    ]
    for caption, group in groups:
        if len(group) > MAX_EXAMPLES:
            caption += f" The first {MAX_EXAMPLES} of {len(group)} examples."
            group = group[:MAX_EXAMPLES]
        if group:
            blocks.append(Block("img", caption, png=plot_examples(group)))
    return blocks


def _ladder_blocks(ladders: Sequence) -> list[Block]:
    """Margins along the ladders of refuted inputs: where each model flips."""
    refuted = [lad for lad in ladders if lad.kinds and lad.kinds[0] == "counterexample"]
    if not refuted:
        return []
    shown = refuted[:MAX_LADDERS]
    caption = (
        "Ladders (SPEC section 2): each refuted input's path from x to its counterexample, one "
        "manipulation per rung, with every model's margin logit[label] - max other logit; "
        "a model misclassifies where its line is below 0. Every rung of every refuted input "
        "(and, in MCTS mode, of the explored IP / EP points) is in ladders.graphml."
    )
    if len(refuted) > len(shown):
        caption += f" The first {len(shown)} of {len(refuted)} refuted inputs."
    return [Block("h3", "Ladders"), Block("img", caption, png=plot_ladders(shown))]


# -- sweep tables (the paper's Tables II and III) -------------------------------------------


def step_label(step: float) -> str:
    """A manipulation step as the paper writes it: ±1, ±1/4, ±1/64."""
    return "±" + str(Fraction(step).limit_denominator(4096))


def sweep_tables(runs: Sequence[tuple[float, float, Aggregate | dict]]) -> str:
    """Markdown tables per quantized model and measure: rows radius, columns step."""
    aggs = [(r, s, a.to_dict() if isinstance(a, Aggregate) else a) for r, s, a in runs]
    radii = sorted({r for r, _, _ in aggs})
    steps = sorted({s for _, s, _ in aggs})
    names = list(dict.fromkeys(n for _, _, a in aggs for n in a["quantized"]))
    measures = [
        ("Relative robustness", "|R_Q^FP| / |R|", "rq_fp", "r", "relative_robustness"),
        ("Adversarial transfer", "|R^0| / |R_NOT|", "r0", "r_not", "adversarial_transfer"),
    ]
    out = []
    for name in names:
        for title, formula, num, den, pct in measures:
            cells = {}
            for r, s, a in aggs:
                if name in a["quantized"]:
                    o = a["quantized"][name]["overall"]
                    cells[(r, s)] = f"{o[num]}/{o[den]} ({_share(o, pct)})"
            lines = [
                f"### {title} of {name}: {formula}",
                "",
                "| r \\ δ | " + " | ".join(step_label(s) for s in steps) + " |",
                "|---|" + "---|" * len(steps),
            ]
            lines += [
                f"| {r:g} | " + " | ".join(cells.get((r, s), "–") for s in steps) + " |"
                for r in radii
            ]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def write_sweep_tables(
    path: str | Path,
    runs: Sequence[tuple[float, float, Aggregate | dict]],
) -> Path:
    """Write `sweep_tables` to a Markdown file."""
    return write_atomic(path, "# Sweep over radius and step\n\n" + sweep_tables(runs))


# -- everything -----------------------------------------------------------------------------


def write_report(
    run_dir: str | Path, doc: dict, examples: Sequence[Example] = (), ladders: Sequence = ()
) -> dict[str, Path]:
    """Write results.json, report.md, report.html, junit.xml, perturbations.npz and
    ladders.graphml (`ladders.MarginLadder`s of the refuted inputs)."""
    run_dir = Path(run_dir)
    out = {"results": write_results(run_dir, doc)}
    out["ladders"] = write_atomic(run_dir / "ladders.graphml", graphml(margin_graph(ladders)))
    blocks = report_blocks(doc, examples, ladders=ladders)
    out["markdown"] = write_atomic(run_dir / "report.md", render_markdown(blocks))
    out["html"] = write_atomic(run_dir / "report.html", render_html(blocks))
    out["junit"] = write_atomic(run_dir / "junit.xml", junit_xml(doc))
    records = [InputRecord.from_dict(r) for r in doc["records"]]
    out["perturbations"] = write_perturbations(
        run_dir / "perturbations.npz", records, doc["config"]
    )
    return out
