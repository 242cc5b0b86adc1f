"""Covering-design blocks against branch and bound on the whole feature region.

The few-pixel (L0) verifiers Calzone and CoVerD cover "any t of v features move" with blocks of
k features (a covering design: every t-subset inside some block) and close each block's
sub-region on its own. This measures what that would cost with this engine's bounds: per
input, branch and bound on the whole region (linear bounds with optimised root slopes, then
generator splits, the sieve and enumeration, as `decide` runs them), and on random blocks of
k features (every other feature held at 0; the same engine, a time limit a block). A covering
needs at least the Schoenheim bound of blocks, so blocks x seconds a block is a lower bound
on its cost; the ratio to the whole region's seconds is what `--out` records.

    python benchmarks/bench_covering.py --indices 7,11,20 --config b --blocks 8 \
        --out benchmarks/results/covering.json

`--indices` are MNIST test images (dataset indices; the defaults are inputs the whole-region
search certifies in 5-10 s at features r=20 step 1/4, where covering would have to win).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as bench_engine.py

import numpy as np
from bench_engine import CONFIGS, make_region
from checkout import ROOT  # this checkout's packages first

from verifier.engine.bab import Leaf, branch_and_bound
from verifier.engine.bounds import linear_bounds, prepare_chain, spec_chain
from verifier.engine.data import load_dataset, to_layout
from verifier.engine.model import load_model
from verifier.engine.result import CERTIFIED


def covering_lower_bound(v: int, k: int, t: int) -> int:
    """Schoenheim's lower bound on the blocks of k of v points that cover every t-subset."""
    if t == 0:
        return 1
    return math.ceil(v / k * covering_lower_bound(v - 1, k - 1, t - 1))


def most_moved(region) -> int:
    """The most features one point of the region moves (cheapest first within the budget)."""
    movable = np.sort(region.cost[region.hi > region.lo])
    return int(np.sum(np.cumsum(movable) <= region.budget + 1e-9))


def certify_box(model, spec, region, label: int, hi: np.ndarray, seconds: float) -> dict:
    """Linear bounds with optimised slopes on the box [region.lo, hi], then branch and bound
    (the engine's own loop) until certified, refuted or `seconds` are spent."""
    start = time.perf_counter()
    threshold = np.zeros(len(spec.others))
    root = linear_bounds(spec, region.lo, hi, target=threshold, alpha_steps=20)
    nodes, status = 0, CERTIFIED
    if not np.all(root.lower > threshold):

        def bound(lo_, hi_, parent):
            return linear_bounds(
                spec, lo_, hi_, target=threshold, parent=parent, reuse=True, open_only=True
            )

        out = branch_and_bound(
            model,
            region,
            label,
            [Leaf(region.lo, hi, root)],
            bound,
            threshold,
            deadline=start + seconds,
            max_nodes=10**6,
            enum_limit=1024,
        )
        nodes, status = out.nodes, out.status
    return {
        "status": status,
        "nodes": nodes,
        "root_margin": float(np.min(root.lower)),
        "seconds": time.perf_counter() - start,
    }


def measure(model, chain, x, label: int, args, seed: int):
    """One input: the whole region, then `args.blocks` random blocks of each of `args.sizes`."""
    region = make_region(args.config, x)
    spec = spec_chain(chain, region, label, float32=True)
    whole = certify_box(model, spec, region, label, region.hi, args.whole_timeout)
    movable = np.flatnonzero(region.hi > region.lo)
    v, t = len(movable), most_moved(region)
    rng = np.random.default_rng(seed)
    per_size = {}
    for k in (int(k) for k in args.sizes.split(",")):
        if not t < k < v:
            continue
        runs = []
        for _ in range(args.blocks):
            hi = np.zeros_like(region.hi)
            chosen = rng.choice(movable, size=k, replace=False)
            hi[chosen] = region.hi[chosen]
            runs.append(certify_box(model, spec, region, label, hi, args.block_timeout))
        per_block = float(np.mean([r["seconds"] for r in runs]))
        need = covering_lower_bound(v, k, t)
        per_size[str(k)] = {
            "covering_blocks_at_least": need,
            "closed_by_root_bounds": sum(
                r["nodes"] == 0 and r["status"] == CERTIFIED for r in runs
            ),
            "certified": sum(r["status"] == CERTIFIED for r in runs),
            "blocks_tried": args.blocks,
            "root_margin_median": float(np.median([r["root_margin"] for r in runs])),
            "nodes_median": float(np.median([r["nodes"] for r in runs])),
            "seconds_per_block": per_block,
            "covering_seconds_at_least": need * per_block,
            "ratio_to_whole": need * per_block / max(whole["seconds"], 1e-9),
        }
    return {"features": v, "most_moved": t, "whole": whole, "blocks": per_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--indices", default="7,11,20", help="MNIST test images (dataset indices)")
    ap.add_argument("--config", default="b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", default="12,16,24,32,48,64", help="block sizes k")
    ap.add_argument("--blocks", type=int, default=8, help="random blocks tried per size")
    ap.add_argument("--block-timeout", type=float, default=3.0)
    ap.add_argument("--whole-timeout", type=float, default=60.0)
    ap.add_argument("--data-dir", default=os.environ.get("RELROBUST_DATA"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = load_model(ROOT / "examples" / "mnist_mlp.onnx", num_threads=1)
    chain = prepare_chain(model.network.lower())
    ds = load_dataset("mnist", "test", args.data_dir)
    results = {"config": args.config, "region": CONFIGS[args.config], "inputs": {}}
    for i in (int(v) for v in args.indices.split(",")):
        x = to_layout(ds.images[i : i + 1], model.layout, model.input_shape)
        x = x.reshape(-1).astype(np.float64)
        r = measure(model, chain, x, int(ds.labels[i]), args, i)
        results["inputs"][str(i)] = r
        w = r["whole"]
        print(
            f"input {i}: whole region {w['status']} in {w['seconds']:.2f} s, {w['nodes']} nodes "
            f"(root {w['root_margin']:.2f}); {r['features']} features, at most {r['most_moved']} "
            "moved"
        )
        for k, b in r["blocks"].items():
            print(
                f"  k={k:>2}: >= {b['covering_blocks_at_least']:>11,} blocks, "
                f"{b['certified']}/{b['blocks_tried']} certified ({b['closed_by_root_bounds']} by "
                f"root bounds), {b['seconds_per_block']:.2f} s a block -> covering >= "
                f"{b['covering_seconds_at_least']:,.1f} s = {b['ratio_to_whole']:,.1f}x the whole"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
