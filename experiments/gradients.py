"""Gradient misalignment (float vs simulated quantized) and gradient zero density on runtimes.

Usage: python experiments/gradients.py [--model mnist] [--bits 8,4,2]
       [--runtimes float,int8,dynamic-per-tensor,ort-qdq] [--h 1/1000,1/255,4/255]
       [--pixels K] [--limit N] [--out experiments/results/gradients] [--data-dir DIR]

1. Misalignment (seeds 000 and 004): the input gradient of the logit margin
   `logit[label] - max other` (`verifier.engine.features.margin_gradient`) on the lowered float
   chain and on copies with fake-quantized weights (`sim-wX`, X bits per tensor; activation
   quantization is a straight-through identity, as in the studies' STE gradients). Cosine
   similarity for every pair of precisions, mean / median over the inputs the float model
   classifies correctly.
2. Zero density (seed 000's gradient masking): central finite differences of the runtime's
   margin, (m(x + h e_i) - m(x - h e_i)) / (x_i^+ - x_i^-) (clipped to [0, 1]), for every input
   value i (or the `--pixels` most salient ones), on each runtime (`float` = onnxruntime float,
   else quantization mode names: TFLite int8 first). The share of exactly zero differences is
   the zero density; the cosine of the finite-difference gradient with the float chain's
   analytic gradient is reported beside it.
Writes gradients.json, gradients.md and gradients.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    DATASETS,
    base_parser,
    markdown_table,
    name_list,
    number_list,
    pct,
    stamp,
    step_text,
    test_inputs,
    write_json,
    write_text,
)
from simchain import quantize_weights  # noqa: E402

from verifier.engine.features import activation_order, margin_gradient  # noqa: E402


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("gradients", __doc__)
    p.add_argument("--model", choices=["mnist", "cifar"], default="mnist")
    p.add_argument("--bits", type=number_list, default=[8, 4, 2], help="simulated weight bits")
    p.add_argument(
        "--runtimes",
        type=name_list,
        default=["float", "int8", "dynamic-per-tensor", "ort-qdq"],
        help="runtimes for the finite differences",
    )
    p.add_argument("--h", type=number_list, default=[1 / 1000, 1 / 255, 4 / 255], help="FD steps")
    p.add_argument("--pixels", type=int, default=None, help="input values per input (default all)")
    p.add_argument("--calib-size", type=int, default=500, help="calibration images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity (NaN when either vector is zero: undefined)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float("nan") if na == 0 or nb == 0 else float(a @ b / (na * nb))


def stats(values: list[float]) -> dict:
    """Mean, median, standard deviation, minimum and count of the defined (non-NaN) values,
    and how many were undefined (a zero gradient)."""
    v = np.asarray(values, dtype=np.float64)
    undefined = int(np.isnan(v).sum())
    v = v[~np.isnan(v)]
    if not len(v):
        return {"count": 0, "undefined": undefined, "mean": None, "median": None, "std": None}
    return {
        "count": int(len(v)),
        "undefined": undefined,
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std()),
    }


def misalignment(chain, x: np.ndarray, y: np.ndarray, bits: list[int]) -> dict:
    """Pairwise cosine similarity of margin gradients between float and sim-wX chains."""
    chains = {"float": chain, **{f"sim-w{b}": quantize_weights(chain, b) for b in bits}}
    grads = {
        name: [margin_gradient(c, x[i], int(y[i])) for i in range(len(y))]
        for name, c in chains.items()
    }
    names = list(chains)
    return {
        f"{a}|{b}": stats([cosine(ga, gb) for ga, gb in zip(grads[a], grads[b], strict=True)])
        for a in names
        for b in names
    }


def runtime_margins(runner, xs: np.ndarray, label: int, shape: tuple[int, ...]) -> np.ndarray:
    """The runtime's margin `logit[label] - max other` for flat inputs (B, n)."""
    logits = np.asarray(runner.predict(xs.reshape((len(xs), *shape))), dtype=np.float64)
    others = np.delete(logits, label, axis=1)
    return logits[:, label] - others.max(axis=1)


def finite_differences(runner, x: np.ndarray, label: int, h: float, pos, shape) -> np.ndarray:
    """Central differences of the runtime margin along the input values `pos` (clipped)."""
    up = np.repeat(x[None], len(pos), axis=0)
    down = up.copy()
    rows = np.arange(len(pos))
    up[rows, pos] = np.minimum(x[pos] + h, 1.0)
    down[rows, pos] = np.maximum(x[pos] - h, 0.0)
    span = (up[rows, pos] - down[rows, pos]).astype(np.float64)
    both = np.concatenate([up, down]).astype(np.float32)
    m = runtime_margins(runner, both, label, shape)
    return (m[: len(pos)] - m[len(pos) :]) / np.where(span > 0, span, 1.0)


def zero_density(runners: dict, chain, t, hs: list[float], pixels: int | None) -> dict:
    """Per runtime and h: share of exactly zero differences, and cosine with the analytic one."""
    flat = t.x.reshape(len(t.y), -1)
    out = {}
    for name, runner in runners.items():
        for h in hs:
            zeros, total, cos = 0, 0, []
            for i in range(len(t.y)):
                pos = activation_order(flat[i])[:pixels] if pixels else np.arange(flat.shape[1])
                fd = finite_differences(runner, flat[i], int(t.y[i]), h, pos, t.model.input_shape)
                zeros += int(np.sum(fd == 0.0))
                total += len(fd)
                cos.append(cosine(fd, margin_gradient(chain, flat[i], int(t.y[i]))[pos]))
            out[f"{name}|{h!r}"] = {
                "runtime": name,
                "h": h,
                "zero_density": 100.0 * zeros / max(total, 1),
                "values": total,
                "cosine_with_float_gradient": stats(cos),
            }
    return out


def build_runners(model, names: list[str], dataset: str, args) -> dict:
    """A runner per runtime name: `float` (onnxruntime) or a quantization mode."""
    from quantize import calibration_inputs, float_runner, quantize_model

    calib, _ = calibration_inputs(
        dataset, args.data_dir, model.layout, model.input_shape, args.calib_size, args.seed
    )
    return {
        n: float_runner(model)
        if n == "float"
        else quantize_model(model, n, args.out / "models", calib)
        for n in names
    }


def _cos_cell(st: dict, median: bool = True) -> str:
    """`mean (med. median)`, with the inputs whose gradient was zero (cosine undefined)."""
    if st["mean"] is None:
        return f"– (all {st['undefined']} zero)"
    cell = f"{st['mean']:.3f}" + (f" (med. {st['median']:.3f})" if median else "")
    return cell + (f", {st['undefined']} zero ∇" if st["undefined"] else "")


def markdown(result: dict) -> str:
    """gradients.md: the cosine matrix, then the zero-density table."""
    mis, meta = result["misalignment"], result["meta"]
    names = list(dict.fromkeys(k.split("|")[0] for k in mis))
    body = [[f"**{a}**"] + [_cos_cell(mis[f"{a}|{b}"]) for b in names] for a in names]
    zd = [
        [
            z["runtime"],
            step_text(z["h"]),
            pct(z["zero_density"]),
            _cos_cell(z["cosine_with_float_gradient"], median=False),
        ]
        for z in result["zero_density"].values()
    ]
    return "\n".join(
        [
            f"# Gradients: misalignment and zero density ({result['model']})",
            "",
            f"Date {meta['date']}; commit: see git log. Inputs: the {result['inputs']} of the "
            f"first {meta['options']['limit'] or 'all'} test images the float model classifies "
            "correctly. Gradient of the margin `logit[label] - max other` w.r.t. the input.",
            "",
            "## Cosine similarity of input gradients (mean over inputs, median beside)",
            "",
            "sim-wX: the lowered chain with X-bit per-tensor weights (activation quantization "
            "straight-through). Inputs where a gradient is exactly zero (every ReLU of a layer "
            "off) have no cosine; their count is given.",
            "",
            markdown_table(["", *names], body),
            "",
            "## Zero density of finite-difference gradients on the runtimes",
            "",
            "Share of input values whose central difference of the runtime's margin is exactly "
            "0, and the cosine of the finite-difference gradient with the float chain's "
            "analytic gradient.",
            "",
            markdown_table(["runtime", "h", "zero density", "cosine with float ∇"], zd),
            "",
            "![gradients](gradients.png)",
            "",
        ]
    )


def plot(result: dict, path: Path) -> Path:
    """Left: cosine-similarity heat map; right: zero density per runtime and h."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mis = result["misalignment"]
    names = list(dict.fromkeys(k.split("|")[0] for k in mis))
    means = [[mis[f"{a}|{b}"]["mean"] for b in names] for a in names]
    vals = np.array([[np.nan if v is None else v for v in row] for row in means])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, layout="constrained")
    im = ax1.imshow(vals, vmin=-1, vmax=1, cmap="coolwarm")
    for i in range(len(names)):
        for j in range(len(names)):
            ax1.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center")
    ax1.set_xticks(range(len(names)), names)
    ax1.set_yticks(range(len(names)), names)
    ax1.set_title("cosine similarity of input gradients")
    fig.colorbar(im, ax=ax1, shrink=0.8)
    zd = list(result["zero_density"].values())
    runtimes = list(dict.fromkeys(z["runtime"] for z in zd))
    hs = list(dict.fromkeys(z["h"] for z in zd))
    width = 0.8 / max(len(hs), 1)
    for k, h in enumerate(hs):
        ys = [
            next(z["zero_density"] for z in zd if z["runtime"] == r and z["h"] == h)
            for r in runtimes
        ]
        xs = np.arange(len(runtimes)) + (k - (len(hs) - 1) / 2) * width
        ax2.bar(xs, ys, width, label=f"h={step_text(h)}")
    ax2.set_xticks(range(len(runtimes)), runtimes, rotation=20)
    ax2.set_ylabel("zero finite differences (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("gradient zero density on the runtime")
    ax2.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Compute both analyses and write the outputs."""
    args = parse_args(argv)
    started = time.perf_counter()
    t = test_inputs(args.model, args.data_dir, args.limit)
    keep = t.model.classify(t.x) == t.y
    t.x, t.y, t.indices = t.x[keep], t.y[keep], t.indices[keep]
    chain = t.model.network.lower()
    flat = t.x.reshape(len(t.y), -1)
    mis = misalignment(chain, flat, t.y, [int(b) for b in args.bits])
    print(f"misalignment: {time.perf_counter() - started:.0f} s")
    runners = build_runners(t.model, args.runtimes, DATASETS[args.model], args)
    zd = zero_density(runners, chain, t, args.h, args.pixels)
    print(f"zero density: {time.perf_counter() - started:.0f} s")
    result = {
        "meta": stamp(started, args),
        "model": args.model,
        "inputs": len(t.y),
        "runner_names": {n: r.name for n, r in runners.items()},
        "misalignment": mis,
        "zero_density": zd,
    }
    write_json(args.out / "gradients.json", result)
    write_text(args.out / "gradients.md", markdown(result))
    plot(result, args.out / "gradients.png")
    print(f"gradients: {args.out / 'gradients.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
