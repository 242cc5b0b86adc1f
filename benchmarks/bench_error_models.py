"""How far each quantized mode's error model can speak for its runtime on real MNIST regions.

Per model and mode: the share of regions (features, r=10, step 1/8, one per test image) where
the error model is trusted (its rounding bounds hold over the region and the runtime's logits
at the image lie within them: the guard `verifier.engine.decide` applies) and the logit error
half-width there (decide's detail "logit_error_bound": the quantized spec's interval, input
rounding folded and the logit clamp bounded apart where they apply), or why there is no model.

    python benchmarks/bench_error_models.py --images 40 --out benchmarks/results/error_models.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from checkout import ROOT  # this checkout's packages first

from quantize.calibration import calibration_inputs
from quantize.error_model import error_model
from quantize.modes import quantize_model
from verifier.engine.bounds import prepare_chain
from verifier.engine.data import load_dataset, to_layout
from verifier.engine.model import load_model
from verifier.engine.quantized_spec import quantized_spec
from verifier.errors import UnsupportedModelError
from verifier.run.check import Settings, build_region

MODES = [
    ("dynamic", {}),
    ("dynamic-per-tensor", {}),
    ("int8", {}),
    ("16x8", {}),
    ("float16", {}),
    ("ort-qdq", {}),
    ("ort-qdq", {"per_channel": True}),
    ("ort-qoperator", {}),
    ("ort-dynamic", {}),
    ("simulated", {"act_bits": 8}),
]


def measure(name: str, images: int, data_dir: str | None, work: Path) -> dict:
    """model name -> {runner name: trusted count, half-widths or the reason for no model}."""
    model = load_model(ROOT / "examples" / f"{name}.onnx")
    chain = prepare_chain(model.network.lower())
    calib, _ = calibration_inputs("mnist", data_dir, model.layout, model.input_shape)
    ds = load_dataset("mnist", "test", data_dir)
    xs = to_layout(ds.images[:images], model.layout, model.input_shape)
    settings = Settings(radius=10, step=0.125)
    out = {}
    for mode, opts in MODES:
        runner = quantize_model(model, mode, work / name, calib, **opts)
        try:
            em = error_model(runner, chain)
        except UnsupportedModelError as exc:
            out[runner.name] = {"trusted": 0, "images": images, "no_model": str(exc)}
            continue
        widths = []
        for i in range(images):
            region = build_region(settings, xs[i], chain.layers, int(ds.labels[i]), i)
            got = runner.predict(region.x.reshape(1, *model.input_shape).astype(np.float32))[0]
            qs = quantized_spec(em, region, int(np.argmax(got)))
            lo, hi = qs.interval(np.zeros(len(region.lo)))
            if np.all((got >= lo) & (got <= hi)):
                widths.append(float(np.max(hi - lo) / 2))
        out[runner.name] = {
            "trusted": len(widths),
            "images": images,
            "half_width_median": float(np.median(widths)) if widths else None,
            "half_width_max": max(widths, default=None),
            "how": em.how,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_mlp,mnist_cnn")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = measure(name, args.images, args.data_dir, Path(tmp))
            for runner, r in results[name].items():
                width = r.get("half_width_median")
                shown = "-" if width is None else f"{width:.3g} (max {r['half_width_max']:.3g})"
                why = f"  no model: {r['no_model']}" if "no_model" in r else ""
                print(f"{name:10} {runner:40} trusted {r['trusted']}/{r['images']}  {shown}{why}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
