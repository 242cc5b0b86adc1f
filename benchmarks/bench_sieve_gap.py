"""Where a sieved leaf's bound loses: at the points branch and bound runs on a quantized runtime
(route `sieve`), the worst margin's pointwise bound against the runtime's margin, and how much of
the gap the second layer's rounding makes.

For each input: the float decision with its proof kept, then the quantized decision from it
(`diffdecide.decide_from_float`), recording every leaf whose bounds leave points to run
(`bab.sieved_points`). For up to `--leaves` of them (spread over the search): the leaf's box spec
(`box_rounding.on_box`), its optimised linear bounds (`--alpha-steps`), and for the worst open
margin, at every sieved point: that margin's pointwise lower bound (`std`); the same with the
second Affine layer's rounding taken as it is at the point instead of |lambda| . err (`exact2`:
each first-layer output's grid values within the error model's reach, the ReLU, the second
layer's value and every grid value it can round to there, weighted by the back-substituted
row's coefficients on that layer); and the runtime's margin (`runtime`), which no bound may
exceed at a point (`exact2_holds`). `charge2` is what the
second layer's rounding costs the bound, |lambda| . err. Diagnostics only: `exact2` is a bound
at the listed points, not over the box.

    python benchmarks/bench_sieve_gap.py --model mnist_cnn --indices 116,137 \\
        --out benchmarks/results/bench_sieve_gap_cnn.json
"""

from __future__ import annotations

import argparse

import numpy as np
from quantized_regions import add_arguments, run_inputs  # via checkout.py: ours first

from verifier.engine import bab, diffdecide
from verifier.engine.bounds import _backsub, _first_err, linear_bounds
from verifier.engine.box_rounding import NOISE_STEPS, on_box
from verifier.engine.decide import decide
from verifier.engine.quantized_spec import quantized_spec


def sieved_leaves(q, region, label: int, proof, seed: int) -> tuple:
    """The quantized decision, and (lo, hi, thresholds, points) of each leaf it sieved."""
    leaves: list = []
    sieve = bab.sieved_points

    def record(region, leaf, threshold, cap):
        pts = sieve(region, leaf, threshold, cap)
        if pts is not None and len(pts):
            leaves.append((leaf.lo.copy(), leaf.hi.copy(), threshold.copy(), pts.copy()))
        return pts

    bab.sieved_points = record
    try:
        d = diffdecide.decide_from_float(
            q.runner, q.chain, region, label, proof, q.error_model, timeout=600.0, seed=seed
        )
    finally:
        bab.sieved_points = sieve
    return d, leaves


def second_moves(spec, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At each point `s` (rows of coefficients), the lowest and highest move the second Affine
    layer's rounding can make (grid value - exact value), over every grid value each first-layer
    output can take there."""
    w1, b1 = spec.layers[0].weight, spec.layers[0].bias
    w2, b2 = spec.layers[2].weight, spec.layers[2].bias
    step1, origin1 = (np.broadcast_to(np.asarray(v, float), b1.shape) for v in spec.lattice[0])
    step2, origin2 = (np.broadcast_to(np.asarray(v, float), b2.shape) for v in spec.lattice[2])
    reach1 = 0.5 + np.maximum(_first_err(spec) / step1 - 0.5, 0.0) + NOISE_STEPS
    reach2 = 0.5 + np.maximum(spec.err[2] / step2 - 0.5, 0.0) + NOISE_STEPS
    t = (s @ w1.T + b1 - origin1) / step1
    a_lo = np.maximum(origin1 + np.ceil(t - reach1) * step1, 0.0)
    a_hi = np.maximum(origin1 + np.floor(t + reach1) * step1, 0.0)
    pos, neg = np.maximum(w2, 0.0), np.minimum(w2, 0.0)
    z_lo = a_lo @ pos.T + a_hi @ neg.T + b2
    z_hi = a_hi @ pos.T + a_lo @ neg.T + b2
    low = origin2 + np.ceil((z_lo - origin2) / step2 - reach2) * step2 - z_hi
    high = origin2 + np.floor((z_hi - origin2) / step2 + reach2) * step2 - z_lo
    return low, high


def leaf_gap(q, spec, region, label: int, leaf: tuple, alpha_steps: int) -> dict:
    """The worst open margin's bounds at a sieved leaf's points (see the module docstring)."""
    lo, hi, threshold, pts = leaf
    box = on_box(spec, lo, hi)
    b = linear_bounds(box, lo, hi, alpha_steps=alpha_steps, target=threshold)
    m = int(np.argmin(b.lower - threshold))
    slopes = None if b.slopes is None else {k: v[m : m + 1] for k, v in b.slopes.items()}
    row = np.zeros((1, len(b.lower)))
    row[0, m] = 1.0
    tape: list = []
    lam_s, c = _backsub(box, b.pre, len(box.layers), row, np.zeros(1), slopes, tape, cut=b.cut)
    lam2 = dict(tape)[2][0]
    charge2 = float(np.abs(lam2) @ box.err[2])
    s = pts.astype(np.float64)
    std = s @ lam_s[0] + c[0]
    low, high = second_moves(spec, s)
    exact2 = std + charge2 + low @ np.maximum(lam2, 0.0) + high @ np.minimum(lam2, 0.0)
    x = region.points(pts)
    logits = q.runner.predict(x.reshape((len(x), *q.runner.input_shape)))
    runtime = logits[:, label] - logits[:, box.others[m]]
    t = float(threshold[m])
    return {
        "free": int(np.count_nonzero(hi > lo)),
        "points": len(pts),
        "threshold": t,
        "leaf_bound": float(b.lower[m]),
        "charge2": charge2,
        "std_min": float(std.min()),
        "exact2_min": float(exact2.min()),
        "exact2_median": float(np.median(exact2)),
        "exact2_proves": float(np.mean(exact2 > t)),
        "runtime_min": float(runtime.min()),
        # a lower bound at each point: never above the runtime's margin there
        "exact2_holds": bool(np.all(exact2 <= runtime + 1e-6)),
    }


def one_input(q, i: int, label: int, region, args) -> dict:
    """The quantized decision of input `i` and its sampled sieved leaves' gaps, printed."""
    f = decide(q.model, q.chain, region, label, timeout=60.0, keep_leaves=True, seed=i)
    d, leaves = sieved_leaves(q, region, label, f.detail.get("reuse"), i)
    spec = quantized_spec(q.error_model, region, label).spec
    picked = np.linspace(0, len(leaves) - 1, min(args.leaves, len(leaves))).round()
    rows = [leaf_gap(q, spec, region, label, leaves[int(j)], args.alpha_steps) for j in picked]
    print(f"input {i}: {d.status}, {d.nodes} nodes, {len(leaves)} leaves sieved", flush=True)
    print("  points | bound | charge2 | std min | exact2 min / median | proves | runtime min")
    for r in rows:
        print(
            f"  {r['points']:6d} | {r['leaf_bound']:6.2f} | {r['charge2']:5.2f} |"
            f" {r['std_min']:6.2f} | {r['exact2_min']:6.2f} / {r['exact2_median']:6.2f} |"
            f" {r['exact2_proves']:5.0%} | {r['runtime_min']:6.2f}"
            + ("" if r["exact2_holds"] else "  exact2 ABOVE the runtime's margin"),
            flush=True,
        )
    return {
        "status": d.status,
        "nodes": d.nodes,
        "sieved_leaves": len(leaves),
        "sieved_points": int(sum(len(v[3]) for v in leaves)),
        "leaves": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, "116,137")
    ap.add_argument("--leaves", type=int, default=12, help="sieved leaves looked at per input")
    ap.add_argument("--alpha-steps", type=int, default=20)
    run_inputs(ap.parse_args(), one_input)


if __name__ == "__main__":
    main()
