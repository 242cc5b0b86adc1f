"""Benchmark of the MCTS search mode on the MNIST MLP: time per input and rollouts per second.

Usage: python benchmarks/bench_mcts.py [--model examples/mnist_mlp.onnx] [--n 30]
       [--rollouts 100,300,1000,3000] [--evaluate path,endpoint] [--unbatched 3]
       [--out benchmarks/results/bench_mcts.json]

Region: features of 10 values by activation order (all of them), radius 20, step 0.25; the
first `--n` correctly classified MNIST test inputs.

Comparison with the paper's code (DLV's MCTS; MNIST: MCTS_level_maximal_time = 30 s,
MCTS_multi_samples = 5). Its first level ran until 30 s had passed, checking the clock only
between iterations, and one iteration expands all 79 children of the root with 5 rollouts each
(395 rollouts); then its timer bug ended the search. So it spent at least 30 s and at least 395
rollouts per input. At N rollouts the original is credited with
max(30 s, N * path points per rollout * cost of one of its point evaluations), with a point
evaluation measured here as (a) one single-image `predict` on this runtime (a lower bound: it
ran Keras, slower still), or (b) that plus the PNG it wrote with matplotlib for every correctly
classified point (measured here). The `speedup` column divides (a) by our time per input at the
same N (conservative); `(+png)` uses (b). With (a) the original's time is its 30 s floor at
every N shown. `--unbatched` also runs this search with one image per `predict` call (path/1),
to show what batching alone buys on this runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small products; threads only contend

import checkout  # noqa: E402, F401 (this checkout's packages first)
import numpy as np  # noqa: E402

from verifier.engine.data import load_dataset, to_layout  # noqa: E402
from verifier.engine.features import activation_order, chunk  # noqa: E402
from verifier.engine.model import load_model  # noqa: E402
from verifier.engine.regions import feature_region  # noqa: E402
from verifier.engine.search import mcts_search  # noqa: E402

LEVEL_SECONDS = 30.0  # the paper's MCTS_level_maximal_time for MNIST


class Counting:
    """Runtime proxy counting `predict` calls; `single=True` feeds one image per call."""

    def __init__(self, model, single: bool = False):
        self.model, self.single, self.calls = model, single, 0
        self.input_shape = model.input_shape

    def predict(self, x: np.ndarray) -> np.ndarray:
        if not self.single:
            self.calls += 1
            return self.model.predict(x)
        self.calls += len(x)
        return np.concatenate([self.model.predict(x[i : i + 1]) for i in range(len(x))])


def region_of(x: np.ndarray):
    return feature_region(x, chunk(activation_order(x), 10), 0.25, 20.0)


def per_point_costs(model, x: np.ndarray, repeats: int = 200) -> dict:
    """Seconds of one single-image predict on this runtime, and of one matplotlib PNG save."""
    one = x[None].astype(np.float32).reshape((1, *model.input_shape))
    model.predict(one)
    t = time.perf_counter()
    for _ in range(repeats):
        model.predict(one)
    single = (time.perf_counter() - t) / repeats
    png = None
    try:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        img = x.reshape(28, 28)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            for i in range(10):  # as the original's dataBasics.save (it never closed figures)
                fig = plt.figure()
                ax = fig.add_subplot(1, 1, 1)
                ax.imshow(img * 255, cmap=matplotlib.cm.Greys).set_interpolation("nearest")
                plt.savefig(f"{d}/{i}.png")
            png = (time.perf_counter() - t) / 10
            plt.close("all")
    except ImportError:
        pass
    return {"single_predict_s": single, "png_save_s": png}


def run(model, xs, labels, rollouts: int, evaluate: str, single: bool = False) -> dict:
    """Search every input; per-input rows and the means."""
    rows = []
    for i, (x, label) in enumerate(zip(xs, labels, strict=True)):
        rt = Counting(model, single)
        res = mcts_search(
            rt, region_of(x), int(label), rollouts=rollouts, seed=i, evaluate=evaluate
        )
        d = res.decision
        rows.append(
            {
                "index": i,
                "status": d.status,
                "seconds": res.seconds,
                "rollouts": res.rollouts,
                "evaluations": res.evaluations,
                "path_points": d.detail["path_points"],
                "calls": rt.calls,
                "moves": res.moves,
                "stopped": d.detail["stopped"],
                "ip": len(res.ip),
                "ep": len(res.ep),
            }
        )
    secs = np.array([r["seconds"] for r in rows])
    total = float(secs.sum())
    return {
        "rollouts_budget": rollouts,
        "evaluate": evaluate,
        "single_image_calls": single,
        "inputs": len(rows),
        "refuted": sum(r["status"] == "refuted" for r in rows),
        "mean_s": float(secs.mean()),
        "median_s": float(np.median(secs)),
        "rollouts_mean": float(np.mean([r["rollouts"] for r in rows])),
        "rollouts_per_s": sum(r["rollouts"] for r in rows) / total,
        "evaluations_per_s": sum(r["evaluations"] for r in rows) / total,
        "path_points_per_rollout": sum(r["path_points"] for r in rows)
        / sum(r["rollouts"] for r in rows),
        "calls_mean": float(np.mean([r["calls"] for r in rows])),
        "moves_mean": float(np.mean([r["moves"] for r in rows])),
        "ip_mean": float(np.mean([r["ip"] for r in rows])),
        "rows": rows,
    }


def original_seconds(res: dict, costs: dict, with_png: bool) -> float:
    """The paper's code for the same rollouts: at least its 30 s level, else points x cost."""
    point = costs["single_predict_s"]
    if with_png and costs["png_save_s"] is not None:
        ip_share = np.mean([r["ip"] / max(r["evaluations"], 1) for r in res["rows"]])
        point += ip_share * costs["png_save_s"]
    per_rollout = res["path_points_per_rollout"] * point
    return max(LEVEL_SECONDS, res["rollouts_mean"] * per_rollout)


def print_table(results: dict) -> None:
    c = results["costs"]
    png = "n/a" if c["png_save_s"] is None else f"{1000 * c['png_save_s']:.1f} ms"
    load = ", ".join(f"{v:.1f}" for v in results["load_average"])
    print(
        f"single-image predict {1e3 * c['single_predict_s']:.3f} ms, PNG save {png}; "
        f"{results['inputs']} inputs; load average {load} (on {os.cpu_count()} cores)"
    )
    print(
        f"{'mode':<9}{'budget':>7}{'rollouts':>9}{'s/input':>9}{'roll/s':>9}{'eval/s':>9}"
        f"{'calls':>7}{'moves':>6}{'refut':>6}{'orig s':>8}{'speedup':>9}{'(+png)':>9}"
    )
    for r in results["runs"]:
        mode = r["evaluate"] + ("/1" if r["single_image_calls"] else "")
        print(
            f"{mode:<9}{r['rollouts_budget']:>7}{r['rollouts_mean']:>9.0f}{r['mean_s']:>9.3f}"
            f"{r['rollouts_per_s']:>9.0f}{r['evaluations_per_s']:>9.0f}{r['calls_mean']:>7.0f}"
            f"{r['moves_mean']:>6.1f}{r['refuted']:>6}{r['original_s']:>8.1f}"
            f"{r['speedup']:>8.0f}x{r['speedup_png']:>8.0f}x"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="examples/mnist_mlp.onnx")
    p.add_argument("--n", type=int, default=30, help="correctly classified inputs to search")
    p.add_argument("--rollouts", default="100,395,1000,3000")
    p.add_argument("--evaluate", default="path,endpoint")
    p.add_argument(
        "--unbatched",
        type=int,
        default=3,
        help="inputs also searched with one image per predict call (0: skip)",
    )
    p.add_argument("--out", default="benchmarks/results/bench_mcts.json")
    args = p.parse_args(argv)

    model = load_model(args.model)
    ds = load_dataset(
        "mnist", "test", data_dir=os.environ.get("RELROBUST_DATA", "/work/shared/data")
    )
    x = to_layout(ds.images[: 4 * args.n + 50], model.layout, model.input_shape)
    y = ds.labels[: len(x)]
    ok = np.flatnonzero(model.predict(x).argmax(axis=1) == y)[: args.n]
    xs = x[ok].reshape(len(ok), -1).astype(np.float64)
    labels = y[ok]
    costs = per_point_costs(model, xs[0])
    results = {
        "model": args.model,
        "inputs": len(ok),
        "indices": ok.tolist(),
        "region": {
            "family": "features",
            "feature_dims": 10,
            "radius": 20.0,
            "step": 0.25,
            "selection": "activation",
        },
        "level_seconds": LEVEL_SECONDS,
        "costs": costs,
        "runs": [],
    }
    plan = [
        (n, e, False) for e in args.evaluate.split(",") for n in map(int, args.rollouts.split(","))
    ]
    if args.unbatched:
        plan.append((int(args.rollouts.split(",")[0]), "path", True))
    for n, evaluate, single in plan:
        k = args.unbatched if single else len(xs)
        res = run(model, xs[:k], labels[:k], n, evaluate, single)
        res["original_s"] = original_seconds(res, costs, with_png=False)
        res["original_png_s"] = original_seconds(res, costs, with_png=True)
        res["speedup"] = res["original_s"] / res["mean_s"]
        res["speedup_png"] = res["original_png_s"] / res["mean_s"]
        results["runs"].append(res)
        print(
            f"  {evaluate} {n} single={single}: {res['mean_s']:.3f} s/input",
            file=sys.stderr,
            flush=True,
        )
    results["load_average"] = list(os.getloadavg())  # 1, 5, 15 min, at the end of the run
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
