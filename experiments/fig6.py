"""Fig. 6 of the paper: per-label share of MNIST inputs with an effective perturbation.

Usage: python experiments/fig6.py [--radius 10,20] [--step 1,1/2,1/4] [--search mcts]
       [--timeout 5] [--rollouts 2000] [--workers 1] [--cluster ADDR] [--from-run DIR]
       [--limit N] [--out experiments/results/fig6] [--data-dir DIR]

Runs one `verify` sweep of the MNIST network with no quantized model (`--modes none`) into
`OUT/run/` (continued with `--resume` when it exists), or reads a finished sweep of the same
network (`--from-run`, e.g. the MNIST MCTS run of tables.py: the float decisions do not depend
on the quantized models). The share is |R_NOT| / |L_cc| per true label (the exact engine's
unknowns are reported beside it: its share is then a lower bound). Writes fig6.json, fig6.md
and fig6.png (grouped bars: labels on the x axis, one bar per (r, delta)).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODELS,
    base_parser,
    markdown_table,
    number_list,
    out_or_resume,
    pct,
    rel,
    stamp,
    step_text,
    sweep_docs,
    verify,
    write_json,
    write_text,
)
from paper import FIG6_MAX_GAP, FIG6_TEXT  # noqa: E402


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("fig6", __doc__)
    p.add_argument("--radius", default="10,20", help="radii (comma list)")
    p.add_argument("--step", default="1,1/2,1/4", help="steps (comma list)")
    p.add_argument("--search", choices=["mcts", "exact"], default="mcts")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per input")
    p.add_argument("--rollouts", type=int, default=2000, help="MCTS rollouts per input")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--cluster", default=None, help="run the checks on this Dask scheduler (tcp://HOST:PORT)"
    )
    p.add_argument("--from-run", type=Path, default=None, help="read this finished MNIST sweep")
    args = p.parse_args(argv)
    number_list(args.radius), number_list(args.step)
    return args


def verify_argv(args, run_dir: Path) -> list[str]:
    """The `verify` command line of the float-only sweep."""
    argv = [str(MODELS["mnist"]), "--radius", args.radius, "--step", args.step]
    argv += ["--search", args.search, "--modes", "none", "--timeout", f"{args.timeout:g}"]
    argv += ["--rollouts", str(args.rollouts), "--workers", str(args.workers)]
    argv += ["--examples", "0", "--quiet"]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    if args.cluster is not None:
        argv += ["--cluster", args.cluster]
    return argv + out_or_resume(run_dir)


def per_label(doc: dict) -> dict:
    """One setting: effective share, unknown share and counts per true label."""
    cfg, fl = doc["config"], doc["aggregates"]["float"]
    labels = {
        int(k): {
            "l_cc": v["l_cc"],
            "r_not": v["r_not"],
            "unknown": v["unknown"],
            "effective": v["effective"],
            "unknown_share": v["unknown_share"],
        }
        for k, v in fl["per_label"].items()
    }
    shares = {k: v["effective"] for k, v in labels.items() if v["effective"] is not None}
    most = max(shares, key=lambda k: shares[k]) if shares else None
    least = min(shares, key=lambda k: shares[k]) if shares else None
    return {
        "r": float(cfg["radius"]),
        "step": float(cfg["step"]),
        "overall": fl["overall"]["effective"],
        "labels": labels,
        "most_fragile": most,
        "least_fragile": least,
        "max_gap": shares[most] - shares[least] if shares else None,
    }


def plot(settings: list[dict], path: Path) -> Path:
    """Grouped bar chart: effective share per label, one bar per (r, delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = sorted({k for s in settings for k in s["labels"]})
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    for i, s in enumerate(settings):
        vals = [s["labels"].get(k, {}).get("effective") or 0.0 for k in labels]
        xs = np.arange(len(labels)) + (i - (len(settings) - 1) / 2) * width
        ax.bar(xs, vals, width, label=f"r={s['r']:g}, δ={step_text(s['step'])}")
    ax.set_xticks(np.arange(len(labels)), [str(k) for k in labels])
    ax.set_xlabel("true label")
    ax.set_ylabel("inputs with an effective perturbation (% of L_cc)")
    ax.set_ylim(0, 100)
    ax.set_title("MNIST MLP (784-512-512-10): per-label share refuted (cf. the paper's Fig. 6)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _gap(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} pp"


def markdown(settings: list[dict], meta: dict, source: str) -> str:
    """fig6.md: the per-label table, the extremes, and the paper's statement."""
    labels = sorted({k for s in settings for k in s["labels"]})
    header = ["r", "δ", "all", *(f"label {k}" for k in labels), "most / least", "gap"]
    body = []
    for s in settings:
        cells = []
        for k in labels:
            v = s["labels"].get(k)
            cell = f"{pct(v['effective'], 1)} ({v['r_not']}/{v['l_cc']})" if v else "–"
            if v and v["unknown"]:
                cell += f", {v['unknown']} unk."
            cells.append(cell)
        body.append(
            [f"{s['r']:g}", f"±{step_text(s['step'])}", pct(s["overall"], 1), *cells]
            + [f"{s['most_fragile']} / {s['least_fragile']}", _gap(s["max_gap"])]
        )
    return "\n".join(
        [
            "# Fig. 6: per-label share of MNIST inputs with an effective perturbation",
            "",
            f"Date {meta['date']}; commit: see git log. Run: {source}. Cells: share of the "
            "correctly classified inputs of that label refuted (R_NOT / L_cc).",
            "",
            markdown_table(header, body),
            "",
            f"Paper (section IV-A): {FIG6_TEXT} (gap {FIG6_MAX_GAP['gap']} pp).",
            "",
            "![fig6](fig6.png)",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run (or read) the float sweep, then write fig6.json, fig6.md and fig6.png."""
    args = parse_args(argv)
    started = time.perf_counter()
    run_dir = args.from_run or args.out / "run"
    if args.from_run is None:
        verify(verify_argv(args, run_dir))
    docs = sweep_docs(run_dir)
    if not docs:
        raise SystemExit(f"{run_dir}: no results.json found")
    settings = sorted((per_label(d) for d in docs), key=lambda s: (s["r"], -s["step"]))
    meta = stamp(started, args)
    write_json(args.out / "fig6.json", {"meta": meta, "run": rel(run_dir), "settings": settings})
    plot(settings, args.out / "fig6.png")
    write_text(args.out / "fig6.md", markdown(settings, meta, rel(run_dir)))
    print(f"fig6: {args.out / 'fig6.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
