"""Run outputs: results.json, report.md / report.html, junit.xml, perturbations.npz, sweep tables.

results.json is the single source: the Markdown, HTML and JUnit files are rendered from the
results document, so what a person reads is exactly what CI parses. Every file is written
through `store.write_atomic`. Percentages are 0-100; None (null) when a denominator is 0.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import platform
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from verifier import __version__
from verifier.errors import InputError
from verifier.records import InputRecord
from verifier.relative import (
    FLOAT_UNKNOWN,
    L_IC,
    R_0,
    R_FP,
    R_NOT,
    R_NOT_UNKNOWN,
    R_UNKNOWN,
    Aggregate,
    R,
    float_set,
    quant_set,
)
from verifier.store import write_atomic

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = "results.schema.json"
RUNTIME_PACKAGES = (
    "numpy",
    "onnx",
    "onnxruntime",
    "tensorflow",
    "tensorflow-cpu",
    "ai-edge-litert",
    "z3-solver",
    "matplotlib",
    "jsonschema",
)
MAX_EXAMPLES = 24  # per example grid, to keep report.html readable
FLOAT = "float"  # the model name used for the float model in junit.xml and perturbations.npz


@dataclass
class Example:
    """One input to picture: original and perturbed NHWC images with every model's answer."""

    index: int
    original: np.ndarray  # (H, W, C) or (1, H, W, C), values in [0, 1]
    perturbed: np.ndarray
    label: int
    float_label: int | None
    quantized_labels: dict[str, int | None] = field(default_factory=dict)


# -- results.json --------------------------------------------------------------------------


def _jsonable(obj: object) -> object:
    """json.dumps fallback for paths, numpy values and sets."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inputs_sha256(x: np.ndarray) -> str:
    """SHA-256 of an input array (dtype, shape and values): identifies the selected inputs."""
    x = np.ascontiguousarray(x)
    digest = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def describe_model(path: str | Path, **extra: object) -> dict:
    """The `model` section: path, file hash and size, plus whatever the caller adds."""
    path = Path(path)
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}


def describe_data(name: str, source: str, inputs: np.ndarray, **extra: object) -> dict:
    """The `data` section: where the inputs came from, how many, and their hash."""
    return {
        "name": name,
        "source": source,
        "sha256": inputs_sha256(inputs),
        "count": int(len(inputs)),
        **extra,
    }


def runtime_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages that can change an answer."""
    out: dict[str, str | None] = {"python": platform.python_version(), "relrobust": __version__}
    for name in RUNTIME_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_results(
    config: dict,
    records: Sequence[InputRecord],
    aggregate: Aggregate,
    *,
    model: dict,
    data: dict,
    quantized: Sequence[dict] = (),
    gate: dict | None = None,
    runtimes: dict | None = None,
) -> dict:
    """The results document (plain JSON types), in the layout of results.schema.json."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "relrobust", "version": __version__},
        "config": config,
        "model": model,
        "quantized": [{"name": q["name"], "describe": q.get("describe", {})} for q in quantized],
        "data": data,
        "runtimes": runtime_versions() if runtimes is None else runtimes,
        "records": [r.to_dict() for r in sorted(records, key=lambda r: r.index)],
        "aggregates": aggregate.to_dict(),
        "gate": gate
        if gate is not None
        else {
            "passed": True,
            "thresholds": {},
            "baseline": None,
            "tolerance": 0.0,
            "failures": [],
        },
    }
    return json.loads(json.dumps(doc, default=_jsonable))


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of results.json, shipped inside the package."""
    return json.loads(resources.files("verifier").joinpath(SCHEMA_FILE).read_text("utf-8"))


def _inline_refs(node: object, defs: dict) -> object:
    """The schema with its local `#/$defs/...` references replaced by their targets."""
    if isinstance(node, dict):
        if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
            return _inline_refs(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def validate_results(doc: dict) -> None:
    """Raise InputError naming the first place where `doc` breaks the results schema."""
    import jsonschema

    schema = load_schema()
    # Inlined references validate about four times faster (10,000 records in seconds).
    validator = jsonschema.Draft202012Validator(_inline_refs(schema, schema["$defs"]))
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InputError(
            f"results do not match schema {SCHEMA_VERSION} at {where}: {error.message}"
        )


def write_results(run_dir: str | Path, doc: dict) -> Path:
    """Validate and write `results.json` into the run directory."""
    validate_results(doc)
    return write_atomic(Path(run_dir) / "results.json", json.dumps(doc, indent=1) + "\n")


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
    "|{R0}| / |{RNOT}|."
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
    lines = [
        f"Float model: {model['path']}" + (f" (sha256 {sha}…)" if sha else ""),
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
    checked = ", ".join(f"{k} {v:g}%" for k, v in gate["thresholds"].items())
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
        f"({_pct(o['robust'])}), has a confirmed counterexample ({{RNOT}}) on {o['r_not']} "
        f"({_pct(o['effective'])}), and leaves {o['unknown']} undecided "
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
        _pct(o["robust"]),
        _pct(o["effective"]),
    ]
    return [
        Block("h2", "The float model"),
        Block("p", text),
        Block("table", items=[row], headers=headers),
    ]


def _model_sentence(name: str, o: dict) -> str:
    return (
        f"{name}: keeps robustness on {o['rq_fp']} of the {o['r']} inputs of {{R}} "
        f"({_pct(o['relative_robustness'])}), loses it on {o['r_fp']} ({{RFP}}), "
        f"{o['r_unknown']} undecided. The float counterexamples still fool it on {o['r0']} "
        f"of the {o['r_not']} inputs of {{RNOT}} ({_pct(o['adversarial_transfer'])}), "
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
                _pct(o["relative_robustness"]),
                _pct(o["adversarial_transfer"]),
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
        [lab, o["inputs"], o["l_cc"], o["r"], o["r_not"], o["unknown"], _pct(o["effective"])]
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
                _pct(o["relative_robustness"]),
                o["r_not"],
                o["r_q"],
                o["r0"],
                o["r_not_unknown"],
                _pct(o["adversarial_transfer"]),
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
    return [
        Block("h2", "How the answers were reached"),
        Block(
            "p",
            "Per model, the step that decided each input (bounds, branch and bound, "
            "enumeration and z3 prove; attack and search find counterexamples, confirmed "
            "on the runtime; budget means the time or node limit ran out).",
        ),
        Block("table", items=rows, headers=["model", "route", "status", "inputs", "seconds"]),
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


def report_blocks(doc: dict, examples: Sequence[Example] = (), plots: bool = True) -> list[Block]:
    """The whole report for one results document (plots drawn only when `plots`)."""
    agg = doc["aggregates"]
    blocks = _intro_blocks(doc) + _gate_blocks(doc["gate"])
    blocks += [Block("h2", "How to read this"), Block("p", HOW_TO_READ)]
    blocks += _float_blocks(agg["float"])
    if agg["quantized"]:
        blocks += _model_blocks(agg["quantized"])
    blocks += _per_class_blocks(agg) + _route_blocks(doc)
    if plots:
        blocks += _plot_blocks(agg, examples)
    return blocks + _matrix_blocks(agg) + _config_blocks(doc)


# -- plots (matplotlib, Agg canvas, imported lazily) ----------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def plot_label_effective(agg: dict) -> bytes:
    """Per true label, the share of L_cc inputs with an effective perturbation (paper Fig. 6)."""
    per = agg["float"]["per_label"]
    labels = list(per)
    eff = np.array([per[k]["effective"] or 0.0 for k in labels])
    unk = np.array([per[k]["unknown_share"] or 0.0 for k in labels])
    fig = _figure(max(4.0, 0.5 * len(labels) + 2), 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x, eff, color="#c0392b", label="effective perturbation found")
    ax.bar(x, unk, bottom=eff, color="#bbbbbb", label="undecided")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 100)
    ax.set_xlabel("true label")
    ax.set_ylabel("% of correctly classified inputs")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_label_relative(agg: dict) -> bytes:
    """Per true label and quantized model: relative robustness and adversarial transfer."""
    models = agg["quantized"]
    labels = list(agg["float"]["per_label"])
    fig = _figure(max(8.0, 0.9 * len(labels) + 3), 3.2)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(models))
    measures = [
        ("relative_robustness", "relative robustness (%)"),
        ("adversarial_transfer", "adversarial transfer (%)"),
    ]
    for i, (measure, title) in enumerate(measures):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, (name, m) in enumerate(models.items()):
            xs = x + (j - (len(models) - 1) / 2) * width
            values = [m["per_label"].get(k, {}).get(measure) for k in labels]
            ax.bar(xs, [_nan(v) for v in values], width, label=name)
            for xv, v in zip(xs, values, strict=True):
                if v is None:  # an empty denominator, not a zero
                    ax.text(xv, 1, "n/a", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_ylim(0, 105)
        ax.set_xlabel("true label")
        ax.set_title(title)
    fig.axes[0].legend(fontsize=8, loc="lower left")
    return _png(fig)


def _image(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """An image array for imshow (H, W) or (H, W, 3), and its display options."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 4:
        img = img[0]
    if img.ndim == 3 and img.shape[-1] != 3:  # grey, or channels that are not RGB: the first
        img = img[..., 0]
    if img.ndim == 2:
        return img, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return np.clip(img, 0.0, 1.0), {}


def plot_examples(examples: Sequence[Example], columns: int = 6) -> bytes:
    """Originals (top) above their perturbed images, captioned with every model's answer."""
    cols = min(len(examples), columns)
    rows = math.ceil(len(examples) / cols)
    extra = max((len(e.quantized_labels) for e in examples), default=0)
    fig = _figure(1.6 * cols, rows * (3.4 + 0.3 * extra))
    for i, ex in enumerate(examples):
        r, c = divmod(i, cols)
        answers = [f"float: {ex.float_label}"]
        answers += [f"{name}: {lab}" for name, lab in ex.quantized_labels.items()]
        top = fig.add_subplot(2 * rows, cols, 2 * r * cols + c + 1)
        bottom = fig.add_subplot(2 * rows, cols, (2 * r + 1) * cols + c + 1)
        for ax, img in ((top, ex.original), (bottom, ex.perturbed)):
            data, opts = _image(img)
            ax.imshow(data, interpolation="nearest", **opts)
            ax.set_xticks([])
            ax.set_yticks([])
        top.set_title(f"#{ex.index}, label {ex.label}", fontsize=7)
        bottom.set_xlabel("\n".join(answers), fontsize=7)
    return _png(fig)


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
                "(no bar: empty denominator).",
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


# -- junit.xml ------------------------------------------------------------------------------


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


# -- perturbations.npz ----------------------------------------------------------------------


def perturbation_arrays(records: Sequence[InputRecord]) -> dict[str, np.ndarray]:
    """Every confirmed counterexample as flat arrays: index, model, offsets into coeffs, labels."""
    index, model, adv, chunks = [], [], [], []
    for rec in sorted(records, key=lambda r: r.index):
        outcomes = [(FLOAT, rec.float)] + list(rec.quantized.items())
        for name, o in outcomes:
            if o is not None and o.coeffs is not None:
                index.append(rec.index)
                model.append(name)
                adv.append(-1 if o.adv_label is None else o.adv_label)
                chunks.append(np.asarray(o.coeffs, dtype=np.int64))
    lengths = [len(c) for c in chunks]
    return {
        "index": np.asarray(index, dtype=np.int64),
        "model": np.asarray(model, dtype=np.str_) if model else np.zeros(0, dtype="<U1"),
        "adv_label": np.asarray(adv, dtype=np.int64),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "coeffs": np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64),
    }


def write_perturbations(
    path: str | Path, records: Sequence[InputRecord], config: dict | None = None
) -> Path:
    """perturbations.npz: generator coefficients per (input, model), rebuilt by `Region.points`."""
    arrays = perturbation_arrays(records)
    arrays["config"] = np.asarray(json.dumps(config or {}, default=_jsonable))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_atomic(path, buf.getvalue())


def read_perturbations(path: str | Path) -> dict[tuple[int, str], np.ndarray]:
    """(input index, model name) -> int64 generator coefficients, from perturbations.npz."""
    with np.load(path, allow_pickle=False) as z:
        offsets, coeffs = z["offsets"], z["coeffs"]
        return {
            (int(i), str(m)): coeffs[offsets[k] : offsets[k + 1]].copy()
            for k, (i, m) in enumerate(zip(z["index"], z["model"], strict=True))
        }


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
                    cells[(r, s)] = f"{o[num]}/{o[den]} ({_pct(o[pct])})"
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
    run_dir: str | Path, doc: dict, examples: Sequence[Example] = ()
) -> dict[str, Path]:
    """Write results.json, report.md, report.html, junit.xml and perturbations.npz."""
    run_dir = Path(run_dir)
    out = {"results": write_results(run_dir, doc)}
    blocks = report_blocks(doc, examples)
    out["markdown"] = write_atomic(run_dir / "report.md", render_markdown(blocks))
    out["html"] = write_atomic(run_dir / "report.html", render_html(blocks))
    out["junit"] = write_atomic(run_dir / "junit.xml", junit_xml(doc))
    records = [InputRecord.from_dict(r) for r in doc["records"]]
    out["perturbations"] = write_perturbations(
        run_dir / "perturbations.npz", records, doc["config"]
    )
    return out
