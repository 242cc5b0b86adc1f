"""perturbations.npz: every confirmed counterexample as integer generator coefficients."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from verifier.outputs.document import jsonable
from verifier.run.records import FLOAT, InputRecord
from verifier.run.store import write_atomic


def perturbation_arrays(records: Sequence[InputRecord]) -> dict[str, np.ndarray]:
    """Every confirmed counterexample as flat arrays: index, model, offsets into coeffs, labels."""
    index, model, adv, chunks = [], [], [], []
    for rec in sorted(records, key=lambda r: r.index):
        outcomes = [(FLOAT, rec.float)] + list(rec.quantized.items())
        for name, o in outcomes:
            if o is not None and o.coeffs is not None:
                index.append(rec.index)
                model.append(name)
                adv.append(-1 if o.adv_label is None else o.adv_label)
                chunks.append(np.asarray(o.coeffs, dtype=np.int64))
    lengths = [len(c) for c in chunks]
    return {
        "index": np.asarray(index, dtype=np.int64),
        "model": np.asarray(model, dtype=np.str_) if model else np.zeros(0, dtype="<U1"),
        "adv_label": np.asarray(adv, dtype=np.int64),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "coeffs": np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64),
    }


def write_perturbations(
    path: str | Path, records: Sequence[InputRecord], config: dict | None = None
) -> Path:
    """perturbations.npz: generator coefficients per (input, model), rebuilt by `Region.points`."""
    arrays = perturbation_arrays(records)
    arrays["config"] = np.asarray(json.dumps(config or {}, default=jsonable))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_atomic(path, buf.getvalue())


def read_perturbations(path: str | Path) -> dict[tuple[int, str], np.ndarray]:
    """(input index, model name) -> int64 generator coefficients, from perturbations.npz."""
    with np.load(path, allow_pickle=False) as z:
        offsets, coeffs = z["offsets"], z["coeffs"]
        return {
            (int(i), str(m)): coeffs[offsets[k] : offsets[k + 1]].copy()
            for k, (i, m) in enumerate(zip(z["index"], z["model"], strict=True))
        }
