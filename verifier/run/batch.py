"""What a task of per-input checks carries, and what a worker loads once to run it.

`WorkerState` is one setting's work (settings, model files, inputs, clean predictions);
`Batch` is the slice of it one task checks; `Shipment` is the run's model files as bytes, so a
worker that does not share the driver's filesystem can write and load them; `Loaded` holds the
runtimes built from them. All plain, picklable data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verifier.engine.model import load_model
from verifier.engine.model_files import external_files
from verifier.run.check import Checker
from verifier.run.config import Settings


@dataclass(frozen=True)
class Batch:
    """The inputs of one task: exactly the arrays `Checker.check` reads, for those inputs."""

    settings: Settings
    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray
    preds: dict  # "float" and each runner name -> clean predictions


@dataclass
class WorkerState:
    """What the checks of one setting need: settings, model files, inputs, clean predictions."""

    settings: Settings
    model_path: Path
    layout: str
    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray
    preds: dict  # "float" and each runner name -> clean predictions (N,)
    runner_paths: dict  # runner name -> quantized file
    error_models: dict  # name -> ErrorModel, for the runners that have one (built once)

    def batch(self, positions: list[int]) -> Batch:
        """The inputs at `positions`, as one task's argument."""
        p = np.asarray(positions, dtype=np.int64)
        preds = {k: np.asarray(v)[p] for k, v in self.preds.items()}
        return Batch(self.settings, self.x[p], self.y[p], self.indices[p], preds)


@dataclass(frozen=True)
class Loaded:
    """The runtimes every check uses: float model, its lowered chain, quantized runners."""

    model: object  # verifier.engine.model.Model
    chain: object  # bounds.PreparedChain of the float model
    runners: dict
    error_models: dict

    def checker(self, batch: Batch) -> Checker:
        """A checker of the batch's inputs (positions 0..len-1) on these runtimes."""
        qpred = {k: v for k, v in batch.preds.items() if k != "float"}
        return Checker(
            batch.settings,
            self.model,
            self.chain,
            batch.x,
            batch.y,
            batch.indices,
            batch.preds["float"],
            self.runners,
            qpred,
            self.error_models,
        )


@dataclass(frozen=True)
class Shipment:
    """A run's model files as bytes, by path relative to a scratch directory."""

    files: dict  # relative POSIX path -> bytes
    model: str  # relative path of the float model
    layout: str
    runners: dict  # runner name -> relative path of its file
    error_models: dict

    def key(self) -> str:
        """The hash of the files, their places and the layout: equal keys load equal runtimes."""
        h = hashlib.sha256(json.dumps([self.model, self.layout, self.runners]).encode())
        for rel in sorted(self.files):
            h.update(rel.encode() + b"\0" + hashlib.sha256(self.files[rel]).digest())
        return h.hexdigest()

    def load(self, root: Path) -> Loaded:
        """Write the files under `root`, then load the float model and the runners from there,
        each runtime on one thread (a worker process is one core's worth of work)."""
        from quantize import load_quantized
        from verifier.engine.bounds import prepare_chain

        for rel, data in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        model = load_model(root / self.model, self.layout, num_threads=1)
        runners = {
            n: load_quantized(root / p, self.layout, num_threads=1) for n, p in self.runners.items()
        }
        return Loaded(model, prepare_chain(model.network.lower()), runners, self.error_models)


def shipment(state: WorkerState) -> Shipment:
    """The state's model files, each with the external data files its graph names
    (`model_files.external_files`), read once."""
    files: dict = {}

    def add(tag: str, path: Path) -> str:
        path = Path(path)
        files[f"{tag}/{path.name}"] = path.read_bytes()
        for ext in external_files(path):  # checked: inside the model's folder, long enough
            files[f"{tag}/{ext.location}"] = ext.path.read_bytes()
        return f"{tag}/{path.name}"

    model = add("float", state.model_path)
    runners = {n: add(f"q{i}", p) for i, (n, p) in enumerate(state.runner_paths.items())}
    return Shipment(files, model, state.layout, runners, state.error_models)
