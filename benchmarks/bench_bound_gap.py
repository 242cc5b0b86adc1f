"""Where a quantized runtime's margin bound loses: linear bounds against the exact minimum of the
same error model, along one branch and bound descent.

For each input: the quantized runtime's spec on its region (features, r=10, step 1/8 by default;
`verifier.engine.quantized_spec`), then from the whole region down, always into the child with
the worse bound (`bab.split`), every `--every` levels until the bounds close the box: the box's
points, the worst margin's linear lower bound on the quantized spec, the same on the box's spec
(the first layer's rounding as it is on the box: `box_rounding.on_box`, what branch and bound
nodes are bounded on), the same with the rounding dropped (the float chain of the runtime's own
weights), the float model's bound, and the mixed-integer program (`verifier.engine.milp`: the
same interval rounding model with every ReLU exact) asked whether that margin can be <= 0, with
its answer and time; the same with only the first ReLU layer's phases exact and with only the
last one's (the other keeps its triangle relaxation). A "unsat" where the linear bound is
negative is looseness of the ReLU relaxation, not of the rounding model (and of the layer whose
exact phases answer it); the gap between the quantized and the rounding-free bound is the
rounding's.

    python benchmarks/bench_bound_gap.py --model mnist_cnn --indices 20 \\
        --out benchmarks/results/bench_bound_gap_cnn.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from quantized_regions import add_arguments, quantized_copy  # via checkout.py: ours first

from verifier.engine.bab import Leaf, split
from verifier.engine.bounds import linear_bounds, spec_chain
from verifier.engine.box_rounding import on_box
from verifier.engine.milp import milp_decide
from verifier.engine.points import count_points
from verifier.engine.quantized_spec import quantized_spec
from verifier.run.check import Settings


def descend(qspec, fspec, every: int, milp_seconds: float, max_depth: int) -> list[dict]:
    """The rows of one descent (see the module docstring)."""
    region = qspec.region
    plain = replace(qspec, err=[None] * len(qspec.err), first_input=None, cap=None, lattice=None)
    lo, hi = region.lo, region.hi
    rows = []
    for depth in range(max_depth + 1):
        b = linear_bounds(qspec, lo, hi)
        worst = int(np.argmin(b.lower))
        if b.lower[worst] > 0 or depth == max_depth:
            rows.append({"depth": depth, "closed_by_bounds": bool(b.lower[worst] > 0)})
            break
        if depth % every == 0:
            target = np.where(np.arange(len(b.lower)) == worst, 0.0, -np.inf)
            res = milp_decide(qspec, lo, hi, b, milp_seconds, target)
            # one ReLU layer exact, the other's triangle relaxation kept: which one loses
            first, last = (
                milp_decide(qspec, lo, hi, b, milp_seconds, target, exact={k})
                for k in (1, len(qspec.layers) - 2)
            )
            rows.append(
                {
                    "depth": depth,
                    "points": count_points(lo, hi, region.cost, region.budget, limit=10**12),
                    "quantized_bound": float(b.lower[worst]),
                    "box_rounding": float(
                        linear_bounds(on_box(qspec, lo, hi), lo, hi).lower[worst]
                    ),
                    "without_rounding": float(linear_bounds(plain, lo, hi).lower[worst]),
                    "float_bound": float(linear_bounds(fspec, lo, hi).lower[worst]),
                    "milp": res.status,
                    "milp_seconds": round(res.seconds, 3),
                    "milp_first_exact": first.status,
                    "milp_last_exact": last.status,
                    "unstable": [
                        int(np.sum((p[0] < 0) & (p[1] > 0))) for p in b.pre if p is not None
                    ],
                }
            )
            print(_line(rows[-1]), flush=True)
        children = split(Leaf(lo, hi, b), np.zeros(len(b.lower)))
        lows = [float(np.min(linear_bounds(qspec, c_lo, c_hi).lower)) for c_lo, c_hi in children]
        lo, hi = children[int(np.argmin(lows))]
    return rows


def _line(r: dict) -> str:
    return (
        f"  depth {r['depth']:3} points {r['points']:>14,}  quantized {r['quantized_bound']:7.3f}"
        f"  box rounding {r['box_rounding']:7.3f}"
        f"  no rounding {r['without_rounding']:7.3f}  float {r['float_bound']:7.3f}"
        f"  milp {r['milp']:7} {r['milp_seconds']:6.2f} s  first ReLUs exact"
        f" {r['milp_first_exact']:7}  last ReLUs exact {r['milp_last_exact']:7}"
        f"  unstable {r['unstable']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, "20")
    ap.add_argument("--every", type=int, default=4, help="levels between measured boxes")
    ap.add_argument("--max-depth", type=int, default=40)
    ap.add_argument("--milp-seconds", type=float, default=20.0)
    args = ap.parse_args()
    settings = Settings(radius=args.radius, step=args.step)
    results = {"args": vars(args) | {"out": str(args.out)}, "inputs": {}}
    with quantized_copy(args.model, args.mode, args.data_dir) as q:
        runner, em, chain = q.runner, q.error_model, q.chain
        for i, x, _, region in q.inputs(args.indices, settings):
            label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
            start = time.perf_counter()
            qs = quantized_spec(em, region, label)
            print(f"input {i} ({runner.name}, label {label})", flush=True)
            fspec = spec_chain(chain, qs.region, label)
            rows = descend(qs.spec, fspec, args.every, args.milp_seconds, args.max_depth)
            results["inputs"][i] = {"runner": runner.name, "label": label, "rows": rows}
            print(f"  {time.perf_counter() - start:.1f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(_markdown(results))


def _markdown(results: dict) -> str:
    lines = [
        "| input | depth | points | quantized bound | box rounding | without rounding "
        "| float bound | MILP (exact ReLUs) | MILP s | first ReLUs exact | last ReLUs exact "
        "| unstable ReLUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in results["inputs"].items():
        for row in r["rows"]:
            if "points" not in row:
                continue
            lines.append(
                f"| {i} | {row['depth']} | {row['points']:,} | {row['quantized_bound']:.3f} "
                f"| {row['box_rounding']:.3f} "
                f"| {row['without_rounding']:.3f} | {row['float_bound']:.3f} | {row['milp']} "
                f"| {row['milp_seconds']:.2f} | {row['milp_first_exact']} "
                f"| {row['milp_last_exact']} | {row['unstable']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
