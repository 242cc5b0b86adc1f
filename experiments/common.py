"""Shared plumbing of the experiment scripts: options, output files, Markdown tables, inputs."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

# Single-threaded BLAS before numpy loads: the machine has 2 cores shared with other work.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from verifier.engine.data import load_dataset, select, to_layout  # noqa: E402
from verifier.engine.model import Model, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
EXAMPLES = REPO / "examples"
MODELS = {"mnist": EXAMPLES / "mnist_mlp.onnx", "cifar": EXAMPLES / "cifar_mlp.onnx"}
DATASETS = {"mnist": "mnist", "cifar": "cifar10"}
PAPER_STEPS = "1,1/2,1/4,1/8,1/16,1/32,1/64"


def fraction(text: str) -> float:
    """A decimal (0.25) or a fraction (1/64) as a float."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


def number_list(text: str) -> list[float]:
    """Comma-separated numbers or fractions: `10,20` or `1,1/2,1/64`."""
    return [fraction(t.strip()) for t in text.split(",") if t.strip()]


def name_list(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def step_text(step: float) -> str:
    """A step as the paper writes it: 1, 1/4, 1/64."""
    return str(Fraction(step).limit_denominator(4096))


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every experiment takes: --limit, --out, --data-dir."""
    p = argparse.ArgumentParser(
        prog=f"{name}.py",
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use the first N test inputs (default: the whole 10,000-image test set)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / name, help="output directory")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where datasets are looked for (default: $RELROBUST_DATA, else the user cache)",
    )
    return p


@dataclass
class TestInputs:
    """A model and its selected test inputs in the model's layout."""

    model: Model
    x: np.ndarray  # (N, *input_shape) float32
    y: np.ndarray  # (N,) int64
    indices: np.ndarray  # positions in the test file


def test_inputs(which: str, data_dir: Path | None, limit: int | None) -> TestInputs:
    """The example model `which` (mnist / cifar) and the first `limit` inputs of its test set."""
    model = load_model(MODELS[which])
    ds = select(load_dataset(DATASETS[which], "test", data_dir), limit=limit)
    x = to_layout(ds.images, model.layout, model.input_shape)
    return TestInputs(model, x, ds.labels, ds.indices)


def rel(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (for reports)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_json(path: Path, obj: object) -> Path:
    """Write `obj` as indented JSON (numpy values converted), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _plain(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(v: float | None, digits: int = 2) -> str:
    """A percentage cell, or a dash when undefined."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}%"


def share(num: float, den: float) -> float | None:
    """100 * num / den, or None when den is 0."""
    return None if den == 0 else 100.0 * num / den


def verify(argv: list[str]) -> float:
    """Run the `verify` CLI in this process; returns the wall time (exit status 2 is fatal)."""
    from verifier.cli import main as verify_main

    started = time.perf_counter()
    status = verify_main(argv)
    if status not in (0, 1):
        raise SystemExit(f"verify {' '.join(argv)}: exit status {status}")
    return time.perf_counter() - started


@contextmanager
def shared_cluster(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
    """The options with one Dask cluster for every `verify` run of an experiment: with
    --workers N > 1 (and no --cluster) a local cluster of N processes starts once and each run
    gets its address (--cluster), instead of each sweep or setting starting its own."""
    if args.cluster is not None or args.workers <= 1:
        yield args
        return
    from verifier.run.cluster import local_cluster

    with local_cluster(args.workers) as local:
        yield argparse.Namespace(**{**vars(args), "cluster": local.scheduler_address, "workers": 1})


def out_or_resume(run_dir: Path) -> list[str]:
    """`--resume RUN` when the run directory holds a run already, else `--out RUN`."""
    return ["--resume" if (run_dir / "run.json").is_file() else "--out", str(run_dir)]


def sweep_docs(run_dir: Path) -> list[dict]:
    """The results of every (r, delta) of a sweep, or of a single-setting run; a setting that
    did not finish (killed, or still running) is read from its run store (`partial_doc`)."""
    docs = []
    for d in [run_dir, *sorted(p for p in Path(run_dir).glob("*") if p.is_dir())]:
        if (d / "results.json").is_file():
            docs.append(json.loads((d / "results.json").read_text()))
        elif (d / "run.sqlite").is_file():
            docs.append(partial_doc(d / "run.sqlite"))
    return docs


def partial_doc(store: Path) -> dict:
    """A results.json-like document (config, aggregates, records) from a run store, with
    `incomplete` = the number of inputs decided so far."""
    from verifier.run.records import InputRecord
    from verifier.run.relative import aggregate

    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        rows = conn.execute("SELECT data FROM records ORDER BY idx").fetchall()
    finally:
        conn.close()
    cfg = json.loads(row[0]) if row else {}
    records = [InputRecord.from_dict(json.loads(d)) for (d,) in rows]
    agg = aggregate(records, cfg.get("quantized_models"))
    return {
        "config": cfg,
        "aggregates": agg.to_dict(),
        "records": [r.to_dict() for r in records],
        "incomplete": len(records),
    }


def stamp(started: float, args: argparse.Namespace) -> dict:
    """Provenance of a result file: date, wall time, options."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        "options": {k: v for k, v in vars(args).items()},
    }
