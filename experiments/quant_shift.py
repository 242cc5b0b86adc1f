"""Quantization shift: per-layer feature divergence of perturbed inputs, float vs quantized.

Usage: python experiments/quant_shift.py [--model mnist] [--bits 8,4,2] [--radius 10]
       [--step 1,1/4,1/16] [--timeout 0.5] [--limit N]
       [--out experiments/results/quant_shift] [--data-dir DIR]

For layer k of a model f, divergence_k = ||f_k(x') - f_k(x)||_2 / ||f_k(x)||_2 (seed 004,
Eq. 8). The models are the lowered float chain and its simulated quantized copies `sim-wXaX`
(weights and activations at X bits, scales calibrated on 500 training images; numerically the
`simulated` mode's ONNX graph, see simchain.py). Perturbed inputs x' per input, on the paper's
feature regions: the float model's adversarial example (the engine's attack on the float
runtime; only where it succeeded) and one random point of the region (random single
manipulations until the radius is spent). For the adversarial examples the quantized rows are
also split by whether the example still fools that model (transferred) or not. A quantization
shift shows as a quantized divergence below the float one at the deeper layers for the examples
that do not transfer. Writes quant_shift.json, quant_shift.md and quant_shift.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from attacks import attack, points, regions  # noqa: E402
from common import (  # noqa: E402
    DATASETS,
    TestInputs,
    base_parser,
    markdown_table,
    number_list,
    stamp,
    step_text,
    test_inputs,
    write_json,
    write_text,
)
from simchain import SimChain, activations, layer_names, sim_chain  # noqa: E402


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("quant_shift", __doc__)
    p.add_argument("--model", choices=["mnist", "cifar"], default="mnist")
    p.add_argument("--bits", type=number_list, default=[8, 4, 2], help="simulated bit widths")
    p.add_argument("--radius", type=number_list, default=[10.0], help="radii (comma list)")
    p.add_argument("--step", type=number_list, default=[1, 1 / 4, 1 / 16], help="steps")
    p.add_argument("--timeout", type=float, default=0.5, help="attack seconds per input")
    p.add_argument("--calib-size", type=int, default=500, help="calibration images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def float_correct(t: TestInputs) -> TestInputs:
    """The inputs the float model classifies correctly (only those are attacked)."""
    keep = t.model.classify(t.x) == t.y
    return TestInputs(t.model, t.x[keep], t.y[keep], t.indices[keep])


def divergence(chain: SimChain, x: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """(N, layers): relative L2 change of every layer's output from x to x'."""
    clean, pert = activations(chain, x), activations(chain, xp)
    cols = [
        np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
        for a, b in zip(clean, pert, strict=True)
    ]
    return np.stack(cols, axis=1)


def summarize(div: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and median divergence per layer over the rows in `mask`, and their count."""
    rows = div[mask]
    if not len(rows):
        return {"count": 0, "mean": None, "median": None}
    return {
        "count": int(len(rows)),
        "mean": rows.mean(axis=0).tolist(),
        "median": np.median(rows, axis=0).tolist(),
    }


def run_setting(t, chains: list[SimChain], radius: float, step: float, args) -> dict:
    """Adversarial and random points for one (r, delta), and every chain's divergences."""
    base = chains[0].layers
    flat = t.x.reshape(len(t.y), -1)
    assert np.all(np.argmax(activations(chains[0], flat)[-1], axis=1) == t.y), "float-correct"
    regs = regions(t.x, t.y, t.indices, base, radius, step)
    found = [
        attack(
            t.model,
            base,
            reg,
            int(t.y[i]),
            timeout=args.timeout,
            seed=args.seed + int(t.indices[i]),
        )
        for i, reg in enumerate(regs)
    ]
    adv_ok = np.array([f.success for f in found])
    rng = np.random.default_rng(args.seed)
    from verifier.outputs.examples import random_point

    x_adv = points(regs, [f.coeffs for f in found])
    x_rand = points(regs, [random_point(reg, rng) for reg in regs])
    out = {"r": radius, "step": step, "attacked": len(regs), "adversarial": int(adv_ok.sum())}
    models = {}
    d_float = divergence(chains[0], flat, x_adv)
    for sc in chains:
        clean_ok = np.argmax(activations(sc, flat)[-1], axis=1) == t.y
        adv_fools = np.argmax(activations(sc, x_adv)[-1], axis=1) != t.y
        d_adv, d_rand = divergence(sc, flat, x_adv), divergence(sc, flat, x_rand)
        ratio = d_adv / np.maximum(d_float, 1e-12)  # this model's divergence over the float one
        models[sc.name] = {
            "ratio_transferred": summarize(ratio, adv_ok & clean_ok & adv_fools),
            "ratio_not_transferred": summarize(ratio, adv_ok & clean_ok & ~adv_fools),
            "adversarial": summarize(d_adv, adv_ok & clean_ok),
            "transferred": summarize(d_adv, adv_ok & clean_ok & adv_fools),
            "not_transferred": summarize(d_adv, adv_ok & clean_ok & ~adv_fools),
            "random": summarize(d_rand, clean_ok),
        }
    out["models"] = models
    return out


def _cells(entry: dict, layers: list[str]) -> list[str]:
    if entry["mean"] is None:
        return ["–"] * len(layers)
    return [f"{v:.3f}" for v in entry["mean"]]


def markdown(result: dict) -> str:
    """quant_shift.md: mean divergence per layer, per setting, model and point set."""
    layers, meta = result["layers"], result["meta"]
    parts = [
        f"# Quantization shift: feature divergence per layer ({result['model']})",
        "",
        f"Date {meta['date']}; commit: see git log. Inputs: the {result['inputs']} of the first "
        f"{meta['options']['limit'] or 'all'} test images the float model classifies "
        f"correctly; attack timeout {meta['options']['timeout']:g} s. Mean over inputs of "
        "||f_k(x') - f_k(x)|| / ||f_k(x)||; rows count only inputs the model classifies "
        "correctly; `adversarial` = the float model's adversarial examples, split into those "
        "that still fool the model (`transferred`) and the rest; `random` = a random point "
        "of the same region.",
    ]
    for s in result["settings"]:
        body = []
        for name, m in s["models"].items():
            for kind in ("adversarial", "transferred", "not_transferred", "random"):
                body.append([name, kind, m[kind]["count"], *_cells(m[kind], layers)])
        ratios = [
            [name, kind.removeprefix("ratio_"), m[kind]["count"], *_cells(m[kind], layers)]
            for name, m in s["models"].items()
            if name != "float"
            for kind in ("ratio_transferred", "ratio_not_transferred")
        ]
        parts += [
            "",
            f"## r={s['r']:g}, δ=±{step_text(s['step'])} ({s['adversarial']} of "
            f"{s['attacked']} inputs attacked successfully on the float model)",
            "",
            markdown_table(["model", "points", "n", *layers], body),
            "",
            "Shift ratio on the same adversarial examples: the model's divergence over the float "
            "model's (below 1: quantization shrinks the perturbation's effect on that layer).",
            "",
            markdown_table(["model", "adversarial examples", "n", *layers], ratios),
        ]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> Path:
    """One panel per setting: mean divergence per layer, a line per model (adv. solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, settings = result["layers"], result["settings"]
    fig, axes = plt.subplots(
        1, len(settings), figsize=(4.5 * len(settings), 4), dpi=110, squeeze=False
    )
    for ax, s in zip(axes[0], settings, strict=True):
        for i, (name, m) in enumerate(s["models"].items()):
            color = f"C{i}"
            for kind, style in (("adversarial", "-"), ("random", ":")):
                if m[kind]["mean"] is not None:
                    ax.plot(
                        layers,
                        m[kind]["mean"],
                        style,
                        color=color,
                        marker="o",
                        ms=3,
                        label=f"{name} {kind}",
                    )
        ax.set_yscale("log")
        ax.set_title(f"r={s['r']:g}, δ={step_text(s['step'])}")
        ax.set_xlabel("layer")
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("feature divergence")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Build the chains, run each (r, delta), write the outputs."""
    from quantize import calibration_inputs

    args = parse_args(argv)
    started = time.perf_counter()
    t = float_correct(test_inputs(args.model, args.data_dir, args.limit))
    chain = t.model.network.lower()
    calib, _ = calibration_inputs(
        DATASETS[args.model],
        args.data_dir,
        t.model.layout,
        t.model.input_shape,
        args.calib_size,
        args.seed,
    )
    calib = calib.reshape(len(calib), -1)
    chains = [sim_chain(chain, 0)] + [sim_chain(chain, int(b), int(b), calib) for b in args.bits]
    settings = []
    for radius in args.radius:
        for step in args.step:
            settings.append(run_setting(t, chains, radius, step, args))
            print(f"r={radius:g} step={step_text(step)}: {time.perf_counter() - started:.0f} s")
    result = {
        "meta": stamp(started, args),
        "model": args.model,
        "inputs": len(t.y),
        "layers": layer_names(chain),
        "settings": settings,
    }
    write_json(args.out / "quant_shift.json", result)
    write_text(args.out / "quant_shift.md", markdown(result))
    plot(result, args.out / "quant_shift.png")
    print(f"quantization shift: {args.out / 'quant_shift.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
