"""Benchmark of the decision procedure: share decided, time per input and route, cactus curves.

Usage: python benchmarks/bench_engine.py [--models examples/mnist_mlp.onnx,...] [--n 1000]
       [--configs a,b,d] [--timeouts 2,10] [--engines milp,triangle] [--baseline 3] [--no-smt]
       [--ort-threads 1] [--inputs 115,352,519]
       [--out runs/bench_engine.json]

The defaults are the full setting: the first 1,000 test images, the MNIST MLP and CNN, three
regions, 2 s and 10 s per input, the default engine beside the triangle lines. Scale down with --n,
--models, --configs, --timeouts. CIFAR-10: --models examples/cifar_cnn.onnx --n 200
--configs d (a model whose name holds "cifar" is run on CIFAR-10, others on MNIST).

Configurations (SPEC section 3, activation heuristic):
  a  lattice of the 10 most salient values, radius 20, step 0.25
  b  features (chunks of 10, all), radius 20, step 0.25
  c  features (chunks of 10, all), radius 10, step 1/64
  d  features (chunks of 10, all), radius 10, step 1/8
Engines (`decide` options):
  today  branch and bound on generators, z3 on small leaves
  milp   branch and bound on generators, the mixed-integer program on small leaves
  milp-alpha  as milp, with the ReLU slopes optimised at every node too (`node_alpha`)
  milp-own  as milp, every child deriving its own intermediate bounds (`inherit=False`; by
         default the child that keeps its parent's point nearest 0 reuses the parent's)
  mixed  ReLU-phase and generator splits with split multipliers, the program on small leaves
  relu   as mixed, preferring ReLU splits
  triangle  as milp, with the triangle upper lines on the first ReLU instead of the knapsack
         cut (`knapsack_cut=False`: the bounds before `verifier/engine/knapsack_cut.py`)
  no-sieve  as milp, no leaf closed by running only the points its bounds leave open
         (`sieve=False`: leaves are enumerated only when they hold at most `enum_limit` points)
`--inputs` decides only those of the correctly classified inputs (their places among them, the
rows' "index"; each keeps its seed), printing one line per input: to look at a few hard ones.
The baseline is plain exhaustive enumeration on the runtime, run on `--baseline` inputs of (a)
(the feature regions are far too large to enumerate; their sizes are reported instead).
Writes the JSON (`--out`) and one cactus-curve PNG per model and configuration beside it:
inputs decided within t seconds against t, one line per engine and timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

# Single-threaded BLAS: the engine's matrix products are small, and OpenBLAS threads spin
# against each other (and onnxruntime's pool) on a 2-core machine. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import checkout  # noqa: E402, F401 (this checkout's packages first)
import numpy as np  # noqa: E402

from verifier.engine.bounds import prepare_chain  # noqa: E402
from verifier.engine.data import load_dataset, to_layout  # noqa: E402
from verifier.engine.decide import decide  # noqa: E402
from verifier.engine.enumeration import enumerate_box  # noqa: E402
from verifier.engine.features import activation_order  # noqa: E402
from verifier.engine.model import load_model  # noqa: E402
from verifier.engine.regions import FAMILIES  # noqa: E402

CONFIGS = {
    "a": ("lattice", 0.25, 20.0),
    "b": ("features", 0.25, 20.0),
    "c": ("features", 1 / 64, 10.0),
    "d": ("features", 1 / 8, 10.0),
}

ENGINES = {
    "today": {"splits": "generator", "exact": "z3"},
    "milp": {"splits": "generator", "exact": "milp"},
    "milp-alpha": {"splits": "generator", "exact": "milp", "node_alpha": True},
    "milp-own": {"splits": "generator", "exact": "milp", "inherit": False},
    "mixed": {"splits": "mixed", "exact": "milp"},
    "relu": {"splits": "relu", "exact": "milp"},
    "triangle": {"splits": "generator", "exact": "milp", "knapsack_cut": False},
    "no-sieve": {"splits": "generator", "exact": "milp", "sieve": False},
}


def make_region(config: str, x: np.ndarray):
    """The region of one configuration around the flat input `x`."""
    family, step, radius = CONFIGS[config]
    return FAMILIES[family].build(x, activation_order(x), step, radius, 10, 10)


def summarise(rows: list[dict]) -> dict:
    """Shares decided / unknown and time statistics, overall and per route."""
    n = len(rows)
    secs = np.array([r["seconds"] for r in rows]) if rows else np.zeros(0)
    status = Counter(r["status"] for r in rows)
    out = {
        "inputs": n,
        "certified": status["certified"],
        "refuted": status["refuted"],
        "unknown": status["unknown"],
        "decided_share": (status["certified"] + status["refuted"]) / n if n else None,
        "unknown_share": status["unknown"] / n if n else None,
        **_stats(secs),
        "mean_cpu_s": float(np.mean([r["cpu_s"] for r in rows])) if rows else None,
        "routes": {},
    }
    for route in sorted({(r["status"], r["route"]) for r in rows}):
        sel = np.array([r["seconds"] for r in rows if (r["status"], r["route"]) == route])
        out["routes"][f"{route[0]}/{route[1]}"] = {"count": len(sel), **_stats(sel)}
    return out


def _stats(secs: np.ndarray) -> dict:
    if not len(secs):
        return {"mean_s": None, "median_s": None, "p95_s": None}
    return {
        "mean_s": float(secs.mean()),
        "median_s": float(np.median(secs)),
        "p95_s": float(np.percentile(secs, 95)),
    }


def run_config(
    config: str, model, chain, xs, labels, args, engine: str, timeout: float, places=None
):
    """Decide every input of one configuration with one engine and timeout; print progress
    (a line per input when `places`, the inputs' places among the correct ones, are given);
    return rows and summary."""
    rows = []
    t0 = time.perf_counter()
    tag = f"{config} {engine}@{timeout:g}s"
    for i, x, label in zip(places or range(len(xs)), xs, labels, strict=True):
        region = make_region(config, x)
        cpu = time.process_time()
        d = decide(
            model,
            chain,
            region,
            int(label),
            timeout=timeout,
            use_smt=not args.no_smt,
            seed=i,
            **ENGINES[engine],
        )
        rows.append(
            {
                "index": i,
                "label": int(label),
                "status": d.status,
                "route": d.route,
                "seconds": d.seconds,
                "cpu_s": time.process_time() - cpu,
                "nodes": d.nodes,
                "adv_label": d.adv_label,
                "coeffs": None if d.coeffs is None else d.coeffs.tolist(),
                "detail": _jsonable(d.detail),
            }
        )
        if places:
            steps = {k: round(v, 2) for k, v in d.detail.get("steps", {}).items()}
            print(
                f"  [{tag}] input {i}: {d.status} ({d.route}) {d.seconds:.2f} s, "
                f"{d.nodes} nodes, steps {steps}, leaves {d.detail.get('leaves')}",
                file=sys.stderr,
                flush=True,
            )
        if len(rows) % 50 == 0 or len(rows) == len(xs):
            s = summarise(rows)
            print(
                f"  [{tag}] {len(rows)}/{len(xs)} decided {s['decided_share']:.3f} "
                f"mean {s['mean_s'] * 1000:.0f} ms ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return rows, summarise(rows)


def cactus(rows: list[dict]) -> list[float]:
    """Seconds of the decided inputs, sorted: the k-th value is the time within which k inputs
    were decided (a cactus curve)."""
    return sorted(r["seconds"] for r in rows if r["status"] in ("certified", "refuted"))


def plot_cactus(
    curves: dict[str, list[float]], inputs: int, title: str, path: Path, right: float
) -> None:
    """Inputs decided against seconds (log scale, up to `right`), one step line per engine and
    timeout, as a PNG."""
    from verifier.outputs.plots import _figure, _png

    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    left = 0.005
    for name, secs in curves.items():
        xs = [left, *[max(s, left) for s in secs], right]
        ax.step(xs, [0, *range(1, len(secs) + 1), len(secs)], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_ylim(0, inputs * 1.02)
    ax.set_xlabel("seconds per input")
    ax.set_ylabel(f"inputs decided (of {inputs})")
    ax.set_title(title)
    ax.axhline(inputs, color="grey", linewidth=0.5)
    ax.legend(loc="lower right")
    path.write_bytes(_png(fig))


def baseline(config: str, model, xs, labels, count: int) -> dict:
    """Plain exhaustive enumeration on the runtime for the first `count` inputs."""
    out = []
    for x, label in list(zip(xs, labels, strict=True))[:count]:
        region = make_region(config, x)
        size = region.size()
        t = time.perf_counter()
        res = enumerate_box(model, region, int(label))
        out.append(
            {
                "points": int(size),
                "evaluated": res.points,
                "status": "refuted" if res.coeffs is not None else "certified",
                "seconds": time.perf_counter() - t,
            }
        )
    secs = np.array([r["seconds"] for r in out])
    return {"inputs": out, **_stats(secs)}


def region_sizes(config: str, xs, count: int = 20) -> dict:
    """Point counts of the regions (capped), to show why they cannot be enumerated."""
    sizes = []
    for x in xs[:count]:
        r = make_region(config, x)
        sizes.append(r.count(10**15))
    return {"median_points": float(np.median(sizes)), "min_points": int(min(sizes))}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def print_table(results: dict) -> None:
    """One line per (model, configuration, engine, timeout), then one per (status, route)."""
    print(
        f"{'run':<34}{'inputs':>7}{'cert':>7}{'refut':>7}{'unkn':>6}{'decided':>9}"
        f"{'mean ms':>9}{'med ms':>8}{'p95 ms':>8}{'cpu ms':>8}{'dec. ms':>9}"
    )
    for model, per_model in results["models"].items():
        for config, res in per_model["configs"].items():
            for run, entry in res["runs"].items():
                s = entry["summary"]
                name = f"{Path(model).stem}/{config}/{run}"
                dec = entry["decided_mean_s"]
                print(
                    f"{name:<34}{s['inputs']:>7}{s['certified']:>7}{s['refuted']:>7}"
                    f"{s['unknown']:>6}{100 * s['decided_share']:>8.2f}%{1000 * s['mean_s']:>9.1f}"
                    f"{1000 * s['median_s']:>8.1f}{1000 * s['p95_s']:>8.1f}"
                    f"{1000 * s['mean_cpu_s']:>8.1f}"
                    f"{'-' if dec is None else f'{1000 * dec:.1f}':>9}"
                )
                for route, r in s["routes"].items():
                    print(
                        f"  {route:<32}{r['count']:>7}{'':>22}{1000 * r['mean_s']:>9.1f}"
                        f"{1000 * r['median_s']:>8.1f}{1000 * r['p95_s']:>8.1f}"
                    )
            if "baseline" in res:
                b = res["baseline"]
                pts = np.mean([r["points"] for r in b["inputs"]])
                print(
                    f"  {'baseline enumeration':<32}{len(b['inputs']):>7}   {pts:>12.0f} pts/input"
                    f"     {1000 * b['mean_s']:>9.1f}{1000 * b['median_s']:>8.1f}"
                )
            if "region_sizes" in res:
                print(f"  region points (median): {res['region_sizes']['median_points']:.3g}")


def load_inputs(model, n: int):
    """The first `n` test inputs of the model's dataset, flat, the correctly classified ones."""
    name = "cifar10" if "cifar" in Path(model.path).name.lower() else "mnist"
    ds = load_dataset(name, "test", data_dir=os.environ.get("RELROBUST_DATA", "/work/shared/data"))
    x = to_layout(ds.images[:n], model.layout, model.input_shape)
    y = ds.labels[:n]
    correct = model.predict(x).argmax(axis=1) == y
    xs = x[correct].reshape(int(correct.sum()), -1).astype(np.float64)
    return xs, y[correct], len(y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="examples/mnist_mlp.onnx,examples/mnist_cnn.onnx")
    p.add_argument("--n", type=int, default=1000, help="first N test inputs (then correct only)")
    p.add_argument("--configs", default="a,b,d")
    p.add_argument("--timeouts", default="2,10", help="seconds per input, comma-separated")
    p.add_argument("--engines", default="milp,triangle", help=f"of {', '.join(ENGINES)}")
    p.add_argument("--baseline", type=int, default=3, help="inputs enumerated plainly for (a)")
    p.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="onnxruntime threads per model: 1 as a run's workers have (0: every core; each "
        "node's call of a few points then waits on the pool, half the nodes/s at load 3)",
    )
    p.add_argument("--no-smt", action="store_true", help="no exact back end on small leaves")
    p.add_argument(
        "--inputs",
        default=None,
        help="only these of the correct inputs (places among them, comma-separated)",
    )
    p.add_argument("--out", default="runs/bench_engine.json")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    engines = args.engines.split(",")
    timeouts = [float(v) for v in args.timeouts.split(",")]
    bad = [c for c in configs if c not in CONFIGS] + [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown configuration or engine: {', '.join(bad)}")
    try:
        places = [int(v) for v in args.inputs.split(",")] if args.inputs else None
    except ValueError:
        p.error(f"--inputs takes comma-separated integers, not {args.inputs!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "load_average_start": os.getloadavg(),
        "n": args.n,
        "timeouts_s": timeouts,
        "engines": {e: ENGINES[e] for e in engines},
        "use_smt": not args.no_smt,
        "ort_threads": args.ort_threads,
        "inputs": places,
        "models": {},
    }
    for model_path in args.models.split(","):
        model = load_model(model_path, num_threads=args.ort_threads or None)
        chain = prepare_chain(model.network.lower())
        xs, labels, total = load_inputs(model, args.n)
        print(f"{model_path}: {len(xs)} of {total} inputs correctly classified", file=sys.stderr)
        per_model = {"correct": len(xs), "configs": {}}
        if places is not None:
            if not places or min(places) < 0 or max(places) >= len(xs):
                p.error(f"--inputs: places among the {len(xs)} correct inputs, 0 to {len(xs) - 1}")
            xs, labels = xs[places], labels[places]
        results["models"][model_path] = per_model
        for config in configs:
            entry = {
                "region": dict(zip(("family", "step", "radius"), CONFIGS[config], strict=True)),
                "runs": {},
            }
            curves = {}
            for timeout in timeouts:
                for engine in engines:
                    rows, summary = run_config(
                        config, model, chain, xs, labels, args, engine, timeout, places
                    )
                    run = f"{engine}@{timeout:g}s"
                    curves[run] = cactus(rows)
                    entry["runs"][run] = {
                        "summary": summary,
                        "decided_mean_s": float(np.mean(curves[run])) if curves[run] else None,
                        "cactus_s": curves[run],
                        "rows": rows,
                    }
            if config == "a" and args.baseline > 0:
                entry["baseline"] = baseline(config, model, xs, labels, args.baseline)
            elif CONFIGS[config][0] == "features":
                entry["region_sizes"] = region_sizes(config, xs)
            family, step, radius = CONFIGS[config]
            png = out.with_name(f"{out.stem}_{Path(model_path).stem}_{config}.png")
            title = f"{Path(model_path).stem}, {family} r={radius:g} step {step:g}"
            plot_cactus(curves, len(xs), title, png, 1.2 * max(timeouts))
            entry["cactus_png"] = str(png)
            per_model["configs"][config] = entry
    results["load_average_end"] = os.getloadavg()
    out.write_text(json.dumps(_jsonable(results), indent=1))
    print_table(results)
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
