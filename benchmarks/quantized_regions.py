"""What the benchmarks of one quantized copy's decisions share: an example MNIST model, its
chain, its quantized copy and error model, and the regions of chosen test inputs."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from checkout import ROOT  # this checkout's packages first

from quantize.calibration import calibration_inputs
from quantize.error_model import error_model
from quantize.modes import quantize_model
from verifier.engine.bounds import PreparedChain, prepare_chain
from verifier.engine.data import load_dataset, to_layout
from verifier.engine.model import Model, load_model
from verifier.engine.regions import Region
from verifier.run.check import Settings, build_region, one_blas_thread


@dataclass
class QuantizedCopy:
    model: Model
    chain: PreparedChain
    runner: object  # the quantized copy's runtime
    error_model: object
    dataset: object  # the MNIST test set

    def inputs(
        self, indices: str, settings: Settings
    ) -> Iterator[tuple[int, np.ndarray, int, Region]]:
        """Per test input in `indices` ("0,17"): its position, image (model layout), true
        label and region (around that label)."""
        for i in (int(v) for v in indices.split(",")):
            x = to_layout(self.dataset.images[i : i + 1], self.model.layout, self.model.input_shape)
            label = int(self.dataset.labels[i])
            yield i, x[0], label, build_region(settings, x[0], self.chain.layers, label, i)


@contextmanager
def quantized_copy(name: str, mode: str, data_dir: str | None) -> Iterator[QuantizedCopy]:
    """examples/`name`.onnx quantized by `mode` (calibrated on MNIST training images), for the
    time of the `with` block (its file lives in a temporary folder)."""
    model = load_model(ROOT / "examples" / f"{name}.onnx")
    chain = prepare_chain(model.network.lower())
    calib, _ = calibration_inputs("mnist", data_dir, model.layout, model.input_shape)
    dataset = load_dataset("mnist", "test", data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        runner = quantize_model(model, mode, Path(tmp), calib)
        yield QuantizedCopy(model, chain, runner, error_model(runner, chain), dataset)


def add_arguments(ap: argparse.ArgumentParser, indices: str) -> None:
    """The options every such benchmark takes: model, mode, inputs, region, data, output."""
    ap.add_argument("--model", default="mnist_cnn")
    ap.add_argument("--mode", default="int8")
    ap.add_argument("--indices", default=indices)
    ap.add_argument("--radius", type=float, default=10.0)
    ap.add_argument("--step", type=float, default=0.125)
    ap.add_argument("--region", default="features", help="features or lattice (10 values)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None)


def run_inputs(args: argparse.Namespace, per_input: Callable[..., dict]) -> dict:
    """`per_input(q, i, label, region, args)` on each input `add_arguments`' options name, on
    one BLAS thread: the results by input beside the options, written to `args.out` as JSON."""
    one_blas_thread()
    settings = Settings(radius=args.radius, step=args.step, region=args.region)
    results = {"args": vars(args) | {"out": str(args.out)}, "inputs": {}}
    with quantized_copy(args.model, args.mode, args.data_dir) as q:
        for i, _, label, region in q.inputs(args.indices, settings):
            results["inputs"][i] = per_input(q, i, label, region, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results
