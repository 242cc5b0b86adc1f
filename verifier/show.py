"""`verify show RUN INDEX`: rebuild an input's perturbation from its stored coefficients and
write the original, the perturbed image and their difference as one PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from verifier.engine.data import from_layout, load_dataset, to_layout
from verifier.engine.model import load_model
from verifier.errors import InputError
from verifier.run.check import Settings, build_region
from verifier.run.records import InputRecord


def perturbed_input(run_dir: Path, index: int, which: str = "float"):
    """(model, original x, perturbed x, record) for input `index` of a finished run."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise InputError(f"{run_dir}: no results.json (is it a finished run directory?)")
    doc = json.loads(path.read_text())
    recs = {r["index"]: InputRecord.from_dict(r) for r in doc["records"]}
    if index not in recs:
        raise InputError(f"input {index} is not in the run {run_dir} ({len(recs)} inputs)")
    rec = recs[index]
    outcome = rec.float if which == "float" else rec.quantized.get(which)
    if outcome is None or outcome.coeffs is None:
        raise InputError(f"input {index} has no counterexample for model {which!r}")
    cfg = doc["config"]
    settings = Settings(**cfg["settings"])
    model = load_model(cfg["model"], cfg.get("layout") or None)
    ds = load_dataset(cfg["data"], "test", cfg.get("data_dir"))
    pos = int(np.flatnonzero(ds.indices == index)[0])
    x = to_layout(ds.images[pos : pos + 1], model.layout, model.input_shape)[0]
    region = build_region(settings, x, model.network.lower(), rec.label, index)
    xp = region.points(np.asarray(outcome.coeffs)[None]).astype(np.float32)
    return model, x, xp.reshape(model.input_shape), rec, ds.image_shape


def main(argv: list[str]) -> int:
    """Entry point of `verify show`."""
    p = argparse.ArgumentParser(prog="verify show", description=__doc__)
    p.add_argument("run", type=Path, help="run directory (or a sweep sub-directory)")
    p.add_argument("index", type=int, help="input index as listed in results.json")
    p.add_argument(
        "--model", default="float", help="whose counterexample: float or a quantized name"
    )
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/input-INDEX.png)")
    args = p.parse_args(argv)
    model, x, xp, rec, image_shape = perturbed_input(args.run, args.index, args.model)
    orig = from_layout(x[None], model.layout, image_shape)[0]
    pert = from_layout(xp[None], model.layout, image_shape)[0]
    out = args.out or args.run / f"input-{args.index}-{args.model}.png"
    write_png(out, [orig, pert, 0.5 + 0.5 * (pert - orig)])
    label = int(model.classify(xp[None])[0])
    print(
        f"{out}: input {args.index}, true label {rec.label}, float model says {label} on the "
        f"perturbed image (L1 distance {np.abs(xp - x).sum():.4g})"
    )
    return 0


def write_png(path: Path, images: list[np.ndarray], scale: int = 4) -> None:
    """Images (H, W, C) in [0,1] side by side, upscaled, as one PNG (matplotlib's writer)."""
    from matplotlib.image import imsave

    tiles = [np.repeat(np.repeat(np.clip(im, 0, 1), scale, 0), scale, 1) for im in images]
    gap = np.ones((tiles[0].shape[0], scale * 2, tiles[0].shape[2]))
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    imsave(path, row[..., 0] if row.shape[2] == 1 else row, cmap="gray", vmin=0, vmax=1)
