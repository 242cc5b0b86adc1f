"""Benchmark of relative robustness decided: per model, region cell and quantized mode, how much
of R (the inputs the float model certifies) each quantized model gets decided, and at what cost.

Usage: python benchmarks/bench_quantized.py [--n 1000] [--models mnist_mlp,mnist_cnn]
       [--cells f10,f20,l20] [--modes all] [--cifar-n 200] [--timeout 2]
       [--quantized-timeouts 2,8] [--out benchmarks/results/bench_quantized.json]

Cells: f10 = features r=10 step 1/8, f20 = features r=20 step 1/4, l20 = lattice of 10 values
r=20 step 1/4; the CIFAR-10 cell is cifar_cnn, features r=10 step 1/8 (`--cifar-n 0` skips it).
Each (model, cell) is one `verify` run over every mode (one per quantized budget,
`--quantized-timeouts`: what more time buys the quantized decisions, side by side); the table
is read from its results.json. Per mode: |R|, quantized certified / refuted / unknown on R,
decided share of R, mean seconds of the quantized decision beside the float decision's on the
same inputs.
Writes JSON (`--out`) and a Markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from checkout import ROOT  # this checkout's `verify` in the runs

# Single-threaded BLAS in the `verify` runs (they inherit it), as bench_engine.py runs the
# float engine: the products are small, and OpenBLAS threads spin against each other on a
# shared 2-core machine (one branch-and-bound node measured at 13 s with two threads under
# load, 0.2 s with one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

CELLS = {
    "f10": ("features", "1/8", "10"),
    "f20": ("features", "1/4", "20"),
    "l20": ("lattice", "1/4", "20"),
}
ALL_MODES = (
    "dynamic,dynamic-per-tensor,int8,16x8,float16,ort-qdq,ort-qoperator,ort-dynamic,simulated"
)


def run_cell(model: str, cell: str, n: int, modes: str, args, workdir: Path, budget: float) -> dict:
    """One `verify` run, its quantized decisions `budget` seconds each; returns its
    results.json."""
    family, step, radius = CELLS[cell]
    out = workdir / f"{model}-{cell}-q{budget:g}s"
    cmd = [
        sys.executable,
        "-m",
        "verifier.cli",
        str(ROOT / "examples" / f"{model}.onnx"),
        "--limit",
        str(n),
        "--region",
        family,
        "--step",
        step,
        "--radius",
        radius,
        "--modes",
        modes,
        "--timeout",
        str(args.timeout),
        "--quantized-timeout",
        str(budget),
        "--workers",
        str(args.workers),
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, env=os.environ.copy())
    found = sorted(out.rglob("results.json"))
    if not found:
        raise SystemExit(f"no results.json under {out} (command: {' '.join(cmd)})")
    return json.loads(found[-1].read_text())


def summarise(doc: dict) -> list[dict]:
    """Per quantized model: |R|, its statuses on R, decided share, mean seconds (and the float
    model's mean seconds on the same inputs)."""
    recs = [r for r in doc["records"] if r["float"] and r["float"]["status"] == "certified"]
    names = sorted({k for r in recs for k in r["quantized"]})
    rows = []
    for name in names:
        outs = [(r["float"], r["quantized"][name]) for r in recs if name in r["quantized"]]
        count = {s: sum(q["status"] == s for _, q in outs) for s in ("certified", "refuted")}
        unknown = len(outs) - count["certified"] - count["refuted"]
        routes: dict[str, int] = {}
        for _, q in outs:
            routes[f"{q['status']}/{q['route']}"] = routes.get(f"{q['status']}/{q['route']}", 0) + 1
        gains = [q["detail"].get("diff_root_gain") for _, q in outs]
        gains = [g for g in gains if g is not None]
        rows.append(
            {
                "model": name,
                "R": len(recs),
                "certified": count["certified"],
                "refuted": count["refuted"],
                "unknown": unknown,
                "decided_share": (len(outs) - unknown) / len(outs) if outs else None,
                "mean_s": sum(q["seconds"] for _, q in outs) / len(outs) if outs else None,
                "float_mean_s": sum(f["seconds"] for f, _ in outs) / len(outs) if outs else None,
                "routes": routes,
                # the differential root bound beside the runtime's own (inputs where computed)
                "diff_root_computed": len(gains),
                "diff_root_better": sum(g > 0 for g in gains),
                # the inputs of R left undecided, with the nodes their budget reached
                "open": [
                    {"index": r["index"], "nodes": r["quantized"][name]["nodes"]}
                    for r in recs
                    if name in r["quantized"] and r["quantized"][name]["status"] == "unknown"
                ],
            }
        )
    return rows


def markdown(table: list[dict]) -> str:
    """The Markdown table of all cells."""
    head = (
        "| network | cell | images | quantized model | budget s (quantized) | \\|R\\| "
        "| certified | refuted | unknown | decided of R | mean s (quantized) | mean s (float) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"| {r['network']} | {r['cell']} | {r['images']} | {r['model']} | {r['budget']:g} | "
        f"{r['R']} | "
        f"{r['certified']} | {r['refuted']} | {r['unknown']} | {f(r['decided_share'], '.1%')} | "
        f"{f(r['mean_s'], '.3f')} | {f(r['float_mean_s'], '.3f')} |"
        for r in table
    ]
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="MNIST test images (0: no MNIST cells)")
    p.add_argument("--models", default="mnist_mlp,mnist_cnn")
    p.add_argument("--cells", default="f10,f20,l20")
    p.add_argument("--modes", default="all", help=f"comma list, or all ({ALL_MODES})")
    p.add_argument("--cifar-n", type=int, default=200, help="CIFAR-10 images (0: no cell)")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument(
        "--quantized-timeouts",
        default=None,
        help="comma list of seconds per quantized decision, a run each (default: --timeout)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_quantized.json"))
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir)")
    args = p.parse_args()
    modes = ALL_MODES if args.modes == "all" else args.modes
    models = [m for m in args.models.split(",") if m] if args.n > 0 else []
    jobs = [(m, c, args.n) for m in models for c in args.cells.split(",")]
    if args.cifar_n > 0:
        jobs.append(("cifar_cnn", "f10", args.cifar_n))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quantized-"))
    budgets = [float(b) for b in (args.quantized_timeouts or str(args.timeout)).split(",")]
    table = []
    for model, cell, n in jobs:
        for budget in budgets:
            doc = run_cell(model, cell, n, modes, args, workdir, budget)
            new = [
                {"network": model, "cell": cell, "images": n, "budget": budget, **row}
                for row in summarise(doc)
            ]
            table += new
            print(markdown(new))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "modes": modes, "rows": table}, indent=1))
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
