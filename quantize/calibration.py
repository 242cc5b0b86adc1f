"""Calibration inputs: a seeded sample of the training split, never the verified (test) inputs.

The record (dataset, split, source, seed, indices into the source file) goes into the run
metadata so a calibration set can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verifier.engine.data import load_dataset, to_layout
from verifier.errors import InputError

CALIB_SPLIT = "train"
DEFAULT_CALIB_SIZE = 500


@dataclass(frozen=True)
class CalibrationRecord:
    """Where a calibration set came from: enough to draw the same images again."""

    dataset: str
    split: str
    source: str
    seed: int
    size: int
    indices: list[int]  # positions in the source file, in draw order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_inputs(
    dataset: str,
    data_dir: str | Path | None,
    layout: str,
    input_shape: tuple[int, ...],
    size: int = DEFAULT_CALIB_SIZE,
    seed: int = 0,
) -> tuple[np.ndarray, CalibrationRecord]:
    """`size` training images drawn without replacement with `seed`, in the model's layout."""
    if size <= 0:
        raise InputError(f"calibration size must be positive, got {size}")
    ds = load_dataset(dataset, CALIB_SPLIT, data_dir)
    if size > len(ds):
        raise InputError(
            f"calibration size {size} exceeds the {len(ds)} images of the {dataset} "
            f"{CALIB_SPLIT} split ({ds.source})"
        )
    picks = np.random.default_rng(seed).choice(len(ds), size=size, replace=False)
    x = to_layout(ds.images[picks], layout, input_shape)
    record = CalibrationRecord(
        dataset, CALIB_SPLIT, ds.source, seed, size, [int(i) for i in ds.indices[picks]]
    )
    return x, record


def check_calibration(calib: np.ndarray | None, input_shape: tuple[int, ...]) -> np.ndarray | None:
    """`calib` as float32 (N, *input_shape), refusing other shapes, NaNs and values off [0,1]."""
    if calib is None:
        return None
    calib = np.asarray(calib)
    if calib.ndim != len(input_shape) + 1 or tuple(calib.shape[1:]) != tuple(input_shape):
        raise InputError(
            f"calibration set has shape {calib.shape}; the model takes (N, "
            f"{', '.join(map(str, input_shape))})"
        )
    if len(calib) == 0:
        raise InputError("calibration set is empty")
    if not np.issubdtype(calib.dtype, np.floating):
        raise InputError(f"calibration set must be float in [0,1], got {calib.dtype}")
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    if not np.all(np.isfinite(calib)) or calib.min() < 0 or calib.max() > 1:
        raise InputError("calibration set must hold finite values in [0,1]")
    return calib
