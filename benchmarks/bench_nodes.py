"""Seconds a quantized branch and bound node takes, on the same nodes from any checkout.

For each input: the float decision with its proof kept, then the quantized decision from it
(`diffdecide.decide_from_float`) stopped after its first `--nodes` branch and bound nodes, run
`--repeats` times: the least seconds, the nodes and the leaves left open (equal from two
checkouts that bound the same boxes alike, so their times compare the same work; a busy machine
can move them a little, as the sieve's points a leaf follow the runtime's measured speed), and the
boxes whose first rounding was taken as it is there (`box_rounding.on_box`), replayed in
order (the recent-box cache emptied first) for that step's least milliseconds a box. A budget
run (`bench_quantized.py`) counts decisions, which move by a few inputs from run to run; this
times the work itself. Run it from two checkouts (each measures its own code: `checkout.py`),
alternating, on an otherwise idle machine.

    python benchmarks/bench_nodes.py --model mnist_cnn --indices 0,17 \\
        --out benchmarks/results/bench_nodes_cnn.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from quantized_regions import add_arguments, run_inputs  # via checkout.py: ours first

from verifier.engine import box_rounding, diffdecide
from verifier.engine.decide import decide


def timed_nodes(q, region, label: int, proof, nodes: int, seed: int, repeats: int):
    """The least seconds of `repeats` decisions of the quantized copy `q` (`quantized_regions`)
    stopped after `nodes` nodes, the last one's decision, and the boxes (spec, lo, hi) `on_box`
    was asked for in it."""
    boxes: list = []
    on_box = diffdecide.on_box

    def record(spec, lo, hi):
        boxes.append((spec, lo.copy(), hi.copy()))
        return on_box(spec, lo, hi)

    best, d = np.inf, None
    diffdecide.on_box = record
    try:
        for _ in range(repeats):
            boxes.clear()
            box_rounding._RECENT.clear()
            d = diffdecide.decide_from_float(
                q.runner,
                q.chain,
                region,
                label,
                proof,
                q.error_model,
                timeout=600.0,
                max_nodes=nodes,
                seed=seed,
            )
            best = min(best, d.seconds)
    finally:
        diffdecide.on_box = on_box
    return best, d, list(boxes)


def on_box_ms(boxes: list, repeats: int) -> float:
    """The least milliseconds a box of `repeats` replays of `boxes` through `on_box`."""
    best = np.inf
    for _ in range(repeats):
        box_rounding._RECENT.clear()
        start = time.perf_counter()
        for spec, lo, hi in boxes:
            box_rounding.on_box(spec, lo, hi)
        best = min(best, (time.perf_counter() - start) / max(len(boxes), 1) * 1e3)
    return best


def one_input(q, i: int, label: int, region, args) -> dict:
    """The timed quantized decision of input `i` (from its float proof), printed."""
    f = decide(q.model, q.chain, region, label, timeout=60.0, keep_leaves=True, seed=i)
    proof = f.detail.get("reuse")
    seconds, d, boxes = timed_nodes(q, region, label, proof, args.nodes, i, args.repeats)
    row = {
        "status": d.status,
        "nodes": d.nodes,
        "open_leaves": d.detail.get("open_leaves"),
        "seconds": seconds,
        "ms_per_node": seconds / max(d.nodes, 1) * 1e3,
        "boxes": len(boxes),
        "on_box_ms": on_box_ms(boxes, args.repeats) if boxes else None,
    }
    print(
        f"input {i}: {row['status']}, {row['nodes']} nodes ({row['open_leaves']} open) in"
        f" {seconds:.2f} s ({row['ms_per_node']:.2f} ms a node); {len(boxes)} boxes,"
        f" on_box {row['on_box_ms'] or 0:.3f} ms a box",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, "0,17")
    ap.add_argument("--nodes", type=int, default=300, help="each quantized decision's")
    ap.add_argument("--repeats", type=int, default=3)
    run_inputs(ap.parse_args(), one_input)


if __name__ == "__main__":
    main()
