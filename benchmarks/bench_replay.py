"""Replay throughput (perturbed images per second) of every quantization backend on the MNIST MLP.

Replaying candidate perturbations on the real runtime is how counterexamples are confirmed and
small regions enumerated, so this is the rate that bounds those steps. Each backend runs the
same perturbed MNIST test images at batch sizes 1, 256 and 4096.

    python benchmarks/bench_replay.py --out benchmarks/results/replay.json

Uses examples/mnist_mlp.onnx, or a randomly initialised 784-512-512-10 ONNX when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from checkout import ROOT  # this checkout's packages first
from onnx import TensorProto, helper, numpy_helper

from quantize.calibration import calibration_inputs
from quantize.modes import float_runner, quantize_model
from quantize.runner import package_versions, tensorflow_version
from verifier.engine.data import load_dataset, to_layout
from verifier.engine.model import load_model

EXAMPLE = ROOT / "examples" / "mnist_mlp.onnx"
BATCHES = (1, 256, 4096)
# (label, mode, options); "float" is the float model itself on onnxruntime
BACKENDS = [
    ("float-ort", None, {}),
    ("tflite-dynamic", "dynamic", {}),
    ("tflite-dynamic-per-tensor", "dynamic-per-tensor", {}),
    ("tflite-int8", "int8", {}),
    ("tflite-int8-int-io", "int8", {"integer_io": True}),
    ("tflite-16x8", "16x8", {}),
    ("tflite-float16", "float16", {}),
    ("ort-static-qdq", "ort-qdq", {}),
    ("ort-static-qdq-per-channel", "ort-qdq", {"per_channel": True}),
    ("ort-static-qdq-uint8", "ort-qdq", {"activation_type": "uint8"}),
    ("ort-static-qoperator", "ort-qoperator", {}),
    ("ort-static-qoperator-uint8", "ort-qoperator", {"activation_type": "uint8"}),
    ("ort-dynamic", "ort-dynamic", {}),
    ("sim-w4a8", "simulated", {"weight_bits": 4, "act_bits": 8}),
]


def random_mlp(path: Path, sizes=(784, 512, 512, 10), seed: int = 0) -> Path:
    """A randomly initialised MatMul/Add/Relu MLP in tf2onnx style, saved to `path`."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        inits += [
            numpy_helper.from_array(
                rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32), f"W{i}"
            ),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        cur = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def perturbed_images(model, data_dir: Path | None, n: int, seed: int = 0) -> np.ndarray:
    """`n` MNIST test images, each with 10 random pixels moved by +-0.25 (clipped)."""
    test = load_dataset("mnist", "test", data_dir)
    rng = np.random.default_rng(seed)
    x = to_layout(test.images[rng.integers(0, len(test), n)], model.layout, model.input_shape)
    flat = x.reshape(n, -1).copy()
    cols = rng.integers(0, flat.shape[1], (n, 10))
    steps = rng.choice([-0.25, 0.25], (n, 10)).astype(np.float32)
    rows = np.arange(n)[:, None]
    flat[rows, cols] = np.clip(flat[rows, cols] + steps, 0.0, 1.0)
    return flat.reshape(x.shape)


def throughput(runner, x: np.ndarray, batch: int, seconds: float) -> dict:
    """Images per second of `runner.predict` on consecutive batches of `batch` images."""
    runner.predict(x[:batch])  # warm-up: allocation, first-run graph set-up
    done, calls, start = 0, 0, time.perf_counter()
    while True:
        i = (calls * batch) % (len(x) - batch + 1)
        runner.predict(x[i : i + batch])
        done, calls = done + batch, calls + 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {
                "batch": batch,
                "images_per_s": done / elapsed,
                "calls": calls,
                "seconds": elapsed,
            }


def run(args: argparse.Namespace) -> dict:
    """Build every backend, time it at every batch size, return the record."""
    with tempfile.TemporaryDirectory(prefix="bench_replay_") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> dict:
    path = args.model or (EXAMPLE if EXAMPLE.is_file() else random_mlp(tmp / "random_mlp.onnx"))
    model = load_model(path)
    calib, record = calibration_inputs(
        "mnist", args.data_dir, model.layout, model.input_shape, args.calib_size, seed=0
    )
    x = perturbed_images(model, args.data_dir, max(args.batches) * 2)
    load_before = os.getloadavg()
    results = []
    for label, mode, opts in BACKENDS:
        t0 = time.perf_counter()
        if mode is None:
            runner = float_runner(model)
        else:
            runner = quantize_model(model, mode, tmp, calib, **opts)
        build_s = time.perf_counter() - t0
        for batch in args.batches:
            r = throughput(runner, x, batch, args.seconds)
            results.append({"backend": label, "name": runner.name, "build_s": build_s, **r})
            print(
                f"  {label:28} batch {batch:5d}: {r['images_per_s']:>12,.0f} images/s",
                file=sys.stderr,
            )
    return {
        "model": str(path),
        "random_weights": path != EXAMPLE and args.model is None,
        "calibration": record.to_dict() | {"indices": len(record.indices)},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        },
        "versions": {
            **package_versions("onnxruntime", "ai-edge-litert", "numpy"),
            "tensorflow": tensorflow_version(),
        },
        "seconds_per_point": args.seconds,
        "results": results,
    }


def table(record: dict) -> str:
    """The results as a Markdown table: one row per backend, one column per batch size."""
    batches = sorted({r["batch"] for r in record["results"]})
    rows: dict[str, dict[int, float]] = {}
    for r in record["results"]:
        rows.setdefault(r["backend"], {})[r["batch"]] = r["images_per_s"]
    head = "| backend | " + " | ".join(f"batch {b} (img/s)" for b in batches) + " |"
    lines = [head, "|---|" + "---:|" * len(batches)]
    for name, by_batch in rows.items():
        cells = " | ".join(f"{by_batch.get(b, float('nan')):,.0f}" for b in batches)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="float ONNX model (default: the example MLP)")
    p.add_argument("--data-dir", type=Path, help="data folder (default $RELROBUST_DATA)")
    p.add_argument("--calib-size", type=int, default=500)
    p.add_argument("--seconds", type=float, default=1.0, help="timing per backend and batch")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replay.json")
    args = p.parse_args(argv)
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"model: {record['model']} (random weights: {record['random_weights']})")
    print(table(record))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
