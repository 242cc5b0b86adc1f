"""The test inputs a run verifies: the dataset named by `--data` (or guessed from the model's
input size), selected and put in the model's layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verifier.engine.data import Dataset, load_dataset, select, to_layout
from verifier.engine.model import Model
from verifier.errors import InputError

DATASET_BY_INPUT_SIZE = {784: "mnist", 3072: "cifar10"}


@dataclass
class Inputs:
    """The selected test inputs in the model's layout, with their labels and provenance."""

    dataset: Dataset
    x: np.ndarray  # (N, *model.input_shape) float32 in [0,1]
    y: np.ndarray  # (N,) int64


def dataset_name(model: Model, data: str | None) -> str:
    """`--data`, or the dataset a model of this input size is usually tested on."""
    if data is not None:
        return data
    size = int(np.prod(model.input_shape))
    if size not in DATASET_BY_INPUT_SIZE:
        raise InputError(f"no default dataset for a model with {size} input values; pass --data")
    return DATASET_BY_INPUT_SIZE[size]


def load_inputs(
    model: Model,
    data: str,
    data_dir=None,
    indices: str | None = None,
    labels: str | None = None,
    limit: int | None = None,
) -> Inputs:
    """The test side of dataset `data`, selected (`--indices`, `--labels`, `--limit`)."""
    ds = select(load_dataset(data, "test", data_dir), indices, labels, limit)
    x = to_layout(ds.images, model.layout, model.input_shape)
    if ds.labels.max() >= model.num_classes:
        raise InputError(
            f"label {int(ds.labels.max())} is outside the model's {model.num_classes} classes"
        )
    return Inputs(ds, x, ds.labels)
