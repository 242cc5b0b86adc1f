"""The main job, top-down: load model and data -> clean accuracy -> ... -> report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from verifier.data import Dataset, load_dataset, select, to_layout
from verifier.errors import EXIT_OK, InputError
from verifier.model import Model, load_model

DATASET_BY_INPUT_SIZE = {784: "mnist", 3072: "cifar10"}


@dataclass
class Inputs:
    """The selected test inputs in the model's layout, with their labels and provenance."""

    dataset: Dataset
    x: np.ndarray  # (N, *model.input_shape) float32 in [0,1]
    y: np.ndarray  # (N,) int64


def load_inputs(model: Model, args: argparse.Namespace) -> Inputs:
    """The dataset named by `--data` (or guessed from the model's input size), selected."""
    name = args.data
    if name is None:
        size = int(np.prod(model.input_shape))
        name = DATASET_BY_INPUT_SIZE.get(size)
        if name is None:
            raise InputError(
                f"no default dataset for a model with {size} input values; pass --data"
            )
    ds = load_dataset(name, "test", args.data_dir)
    ds = select(ds, args.indices, args.labels, args.limit)
    x = to_layout(ds.images, model.layout, model.input_shape)
    if ds.labels.max() >= model.num_classes:
        raise InputError(
            f"label {int(ds.labels.max())} is outside the model's {model.num_classes} classes"
        )
    return Inputs(ds, x, ds.labels)


def accuracy_table(y: np.ndarray, pred: np.ndarray, classes: int) -> str:
    """Per-class accuracy as a fixed-width text table."""
    lines = [f"{'label':>5} {'inputs':>7} {'correct':>8} {'accuracy':>9}"]
    for c in range(classes):
        mask = y == c
        if mask.any():
            ok = int((pred[mask] == c).sum())
            lines.append(f"{c:>5} {int(mask.sum()):>7} {ok:>8} {100 * ok / mask.sum():>8.2f}%")
    ok = int((pred == y).sum())
    lines.append(f"{'all':>5} {len(y):>7} {ok:>8} {100 * ok / len(y):>8.2f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the main job for parsed arguments; returns the exit status."""
    from verifier.cli import DEFAULT_MODEL

    path = args.model or DEFAULT_MODEL
    model = load_model(path, args.layout)
    inputs = load_inputs(model, args)
    print(
        f"model: {model.source or model.path} (layout {model.layout}, input "
        f"{model.input_shape}, {model.num_classes} classes, sha256 {model.sha256[:12]})"
    )
    print(f"data:  {inputs.dataset.name} from {inputs.dataset.source}, {len(inputs.y)} inputs")
    pred = model.classify(inputs.x)
    print(accuracy_table(inputs.y, pred, model.num_classes))
    print(
        "verification: the decision engine is not built yet; clean accuracy only", file=sys.stderr
    )
    return EXIT_OK
