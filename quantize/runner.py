"""The runner interface every backend and the float model share, and helpers they all use.

A runner maps a batch of float inputs in [0,1], in the float model's layout, to float scores
(N, classes). Quantized runners also carry a `name` and a `describe()` record for run metadata.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, runtime_checkable

import numpy as np

from verifier.errors import InputError

DEFAULT_MAX_BATCH = 4096


@runtime_checkable
class Runner(Protocol):
    """Anything with a batched `predict`; `verifier.engine.model.Model` satisfies it."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float scores (N, classes) for float inputs (N, *input_shape) in [0,1]."""
        ...


@runtime_checkable
class DescribedRunner(Runner, Protocol):
    """A runner that names itself and describes its file and runtime (every quantize backend)."""

    name: str
    input_shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        """Backend, mode, options, scales summary, file path and sha256, runtime versions."""
        ...


def check_input(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """`x` as contiguous float32, refusing a per-sample shape other than `input_shape`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if tuple(x.shape[1:]) != tuple(input_shape) or x.ndim != len(input_shape) + 1:
        raise InputError(
            f"input shape {tuple(x.shape[1:])} does not match the model's {tuple(input_shape)}"
        )
    return x


def run_batched(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, max_batch: int, classes: int
) -> np.ndarray:
    """Apply `run` to chunks of at most `max_batch` rows and stack the float32 results."""
    outs = [run(x[i : i + max_batch]) for i in range(0, len(x), max_batch)]
    if not outs:
        return np.zeros((0, classes), np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of distributions (cheap: no imports); None when not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def tensorflow_version() -> str | None:
    """The installed TensorFlow version (tensorflow-cpu or tensorflow), without importing it."""
    found = package_versions("tensorflow-cpu", "tensorflow")
    return found["tensorflow-cpu"] or found["tensorflow"]


def scale_entry(name: str, dtype: str, scales: np.ndarray, zero_points: np.ndarray) -> dict:
    """One quantized tensor in describe(): dtype, channel count, scale range, symmetry."""
    scales = np.asarray(scales, dtype=np.float64).reshape(-1)
    zps = np.asarray(zero_points).reshape(-1)
    return {
        "tensor": name,
        "dtype": dtype,
        "channels": int(scales.size),
        "scale_min": float(scales.min()) if scales.size else None,
        "scale_max": float(scales.max()) if scales.size else None,
        "zero_points": sorted({int(z) for z in zps})[:4],
        "symmetric": bool(np.all(zps == 0)),
    }


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null: silences C++ logging of TF and LiteRT."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
