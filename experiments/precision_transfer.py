"""Transfer matrix between precisions: attack each source model, replay on every target.

Usage: python experiments/precision_transfer.py [--model mnist]
       [--precisions float,16x8,int8,sim-w4a4,sim-w2a2] [--radius 10] [--step 1,1/4,1/16]
       [--timeout 0.5] [--limit N] [--out experiments/results/precision_transfer]
       [--data-dir DIR]

Precisions: `float` (the ONNX model on onnxruntime), any quantization mode name (`16x8`, `int8`,
`dynamic`, `ort-qdq`, ...: TFLite / ONNX Runtime, calibrated on 500 training images), and
`sim-wXaY` (simulated X-bit weights, Y-bit activations; `sim-w4` leaves activations float).
For every (r, delta), input and source, the engine's attack (`attacks.attack`: quick attack,
then search until the timeout) runs on the source runtime over the paper's feature region,
guided by the source's chain (the float chain, or its fake-quantized weights at the source's
weight width: 8 bits for the TFLite and ONNX Runtime modes). Its point (the counterexample, or
the lowest-margin point when it failed) is replayed on every target.

Only inputs that both the source and the target classify correctly count for a cell:
- unconditional: share of those inputs whose source point fools the target;
- succeeded on source: the same share among inputs where the point fooled the source (the
  diagonal is 100% by construction).
Writes precision_transfer.json, precision_transfer.md and one heat map PNG per (r, delta).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from attacks import attack, points, regions  # noqa: E402
from common import (  # noqa: E402
    DATASETS,
    base_parser,
    markdown_table,
    name_list,
    number_list,
    pct,
    share,
    stamp,
    step_text,
    test_inputs,
    write_json,
    write_text,
)
from simchain import quantize_weights  # noqa: E402

SIM = re.compile(r"^sim-w(\d)(?:a(\d))?$")


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("precision_transfer", __doc__)
    p.add_argument("--model", choices=["mnist", "cifar"], default="mnist")
    p.add_argument(
        "--precisions", type=name_list, default=["float", "16x8", "int8", "sim-w4a4", "sim-w2a2"]
    )
    p.add_argument("--radius", type=number_list, default=[10.0], help="radii (comma list)")
    p.add_argument("--step", type=number_list, default=[1, 1 / 4, 1 / 16], help="steps")
    p.add_argument("--timeout", type=float, default=0.5, help="attack seconds per input/source")
    p.add_argument("--calib-size", type=int, default=500, help="calibration images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_runners(model, names: list[str], dataset: str, args) -> tuple[dict, dict]:
    """A runner per precision, and the weight width that guides its attack (0 = float)."""
    from quantize import calibration_inputs, float_runner, get_mode, quantize_model

    calib, _ = calibration_inputs(
        dataset, args.data_dir, model.layout, model.input_shape, args.calib_size, args.seed
    )
    runners, widths = {}, {}
    for name in names:
        m = SIM.match(name)
        if name == "float":
            runners[name], widths[name] = float_runner(model), 0
        elif m:
            wb, ab = int(m.group(1)), int(m.group(2) or 0)
            runners[name] = quantize_model(
                model, "simulated", args.out / "models", calib, weight_bits=wb, act_bits=ab
            )
            widths[name] = wb
        else:
            get_mode(name)  # an unknown name is an error naming the valid ones
            runners[name] = quantize_model(model, name, args.out / "models", calib)
            widths[name] = 0 if name == "float16" else 8
    return runners, widths


def matrix(names: list[str], correct: dict, success: dict, fooled: dict) -> dict:
    """Counts and shares per (source, target): unconditional and succeeded-on-source."""
    out: dict = {}
    for s in names:
        for t in names:
            both = correct[s] & correct[t]
            hit = fooled[(s, t)] & both
            src = success[s] & both
            out[f"{s}->{t}"] = {
                "inputs": int(both.sum()),
                "fooled": int(hit.sum()),
                "succeeded_on_source": int(src.sum()),
                "fooled_given_source": int((hit & src).sum()),
                "unconditional": share(hit.sum(), both.sum()),
                "conditional": share((hit & src).sum(), src.sum()),
            }
    return out


def run_setting(t, runners: dict, widths: dict, radius: float, step: float, args) -> dict:
    """Attack on every source, replay on every target, for one (r, delta)."""
    names = list(runners)
    chain = t.model.network.lower()
    guides = {w: (quantize_weights(chain, w) if w else chain) for w in set(widths.values())}
    regs = regions(t.x, t.y, t.indices, chain, radius, step)
    clean = {n: np.asarray(r.predict(t.x)).argmax(axis=1) for n, r in runners.items()}
    correct = {n: clean[n] == t.y for n in names}
    success, fooled, seconds = {}, {}, {}
    for s in names:
        started = time.perf_counter()
        found = [
            attack(
                runners[s],
                guides[widths[s]],
                reg,
                int(t.y[i]),
                timeout=args.timeout,
                seed=args.seed + int(t.indices[i]),
            )
            if correct[s][i]
            else None
            for i, reg in enumerate(regs)
        ]
        seconds[s] = time.perf_counter() - started
        coeffs = [
            f.coeffs if f else np.zeros(reg.num_generators, np.int64)
            for f, reg in zip(found, regs, strict=True)
        ]
        success[s] = np.array([bool(f and f.success) for f in found])
        xs = points(regs, coeffs).reshape((len(regs), *t.model.input_shape))
        for tgt in names:
            pred = np.asarray(runners[tgt].predict(xs)).argmax(axis=1)
            fooled[(s, tgt)] = pred != t.y
    return {
        "r": radius,
        "step": step,
        "clean_accuracy": {n: share(correct[n].sum(), len(t.y)) for n in names},
        "attack_seconds": {n: round(v, 1) for n, v in seconds.items()},
        "matrix": matrix(names, correct, success, fooled),
    }


def matrix_table(setting: dict, names: list[str], key: str) -> str:
    """Rows sources, columns targets: share (fooled / inputs)."""
    m = setting["matrix"]
    num, den = (
        ("fooled", "inputs")
        if key == "unconditional"
        else ("fooled_given_source", "succeeded_on_source")
    )
    body = [
        [f"**{s}**"]
        + [
            f"{pct(m[f'{s}->{t}'][key], 1)} ({m[f'{s}->{t}'][num]}/{m[f'{s}->{t}'][den]})"
            for t in names
        ]
        for s in names
    ]
    return markdown_table(["source \\ target", *names], body)


def heatmap(setting: dict, names: list[str], path: Path) -> Path:
    """Two heat maps (unconditional, succeeded on source) of one (r, delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=110, layout="constrained")
    for ax, key, title in zip(
        axes,
        ("unconditional", "conditional"),
        ("unconditional", "succeeded on source"),
        strict=True,
    ):
        cells = [[setting["matrix"][f"{s}->{t}"][key] for t in names] for s in names]
        vals = np.array([[np.nan if v is None else v for v in row] for row in cells])
        im = ax.imshow(vals, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(vals[i, j]):
                    ax.text(j, i, f"{vals[i, j]:.0f}", ha="center", va="center", color="w")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(f"{title}, r={setting['r']:g}, δ={step_text(setting['step'])}")
    fig.colorbar(im, ax=axes, shrink=0.8, label="% fooled")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(result: dict) -> str:
    """precision_transfer.md: per (r, delta), accuracy and both matrices."""
    names = result["precisions"]
    meta = result["meta"]
    parts = [
        f"# Transfer between precisions ({result['model']})",
        "",
        f"Date {meta['date']}; commit: see git log. Inputs: the first {result['inputs']} test "
        f"images; attack timeout {meta['options']['timeout']:g} s per input and source; "
        "feature regions (10 values per feature, activation heuristic). A cell counts the "
        "inputs both source and target classify correctly; `fooled/inputs`.",
    ]
    for s in result["settings"]:
        acc = ", ".join(f"{n} {pct(v, 1)}" for n, v in s["clean_accuracy"].items())
        tag = f"r={s['r']:g}, δ=±{step_text(s['step'])}"
        parts += [
            "",
            f"## {tag}",
            "",
            f"Clean accuracy: {acc}.",
            "",
            "Unconditional (every attacked input's point, successful on the source or not):",
            "",
            matrix_table(s, names, "unconditional"),
            "",
            "Succeeded on source (points that fooled the source):",
            "",
            matrix_table(s, names, "conditional"),
            "",
            f"![{tag}]({s['figure']})",
        ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Build the precisions, attack and replay per (r, delta), write the outputs."""
    args = parse_args(argv)
    started = time.perf_counter()
    t = test_inputs(args.model, args.data_dir, args.limit)
    runners, widths = build_runners(t.model, args.precisions, DATASETS[args.model], args)
    settings = []
    for radius in args.radius:
        for step in args.step:
            s = run_setting(t, runners, widths, radius, step, args)
            name = f"matrix-r{radius:g}-s{step_text(step).replace('/', '_')}.png"
            s["figure"] = heatmap(s, list(runners), args.out / name).name
            settings.append(s)
            print(f"r={radius:g} step={step_text(step)}: {time.perf_counter() - started:.0f} s")
    result = {
        "meta": stamp(started, args),
        "model": args.model,
        "inputs": len(t.y),
        "precisions": list(runners),
        "runner_names": {n: r.name for n, r in runners.items()},
        "settings": settings,
    }
    write_json(args.out / "precision_transfer.json", result)
    write_text(args.out / "precision_transfer.md", markdown(result))
    print(f"precision transfer: {args.out / 'precision_transfer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
