"""The report's PNG plots: per-label bars and example images (matplotlib Agg, imported lazily)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    """One input to picture: original and perturbed NHWC images with every model's answer."""

    index: int
    original: np.ndarray  # (H, W, C) or (1, H, W, C), values in [0, 1]
    perturbed: np.ndarray
    label: int
    float_label: int | None
    quantized_labels: dict[str, int | None] = field(default_factory=dict)


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def plot_label_effective(agg: dict) -> bytes:
    """Per true label, the share of L_cc inputs with an effective perturbation (paper Fig. 6)."""
    per = agg["float"]["per_label"]
    labels = list(per)
    eff = np.array([per[k]["effective"] or 0.0 for k in labels])
    unk = np.array([per[k]["unknown_share"] or 0.0 for k in labels])
    fig = _figure(max(4.0, 0.5 * len(labels) + 2), 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x, eff, color="#c0392b", label="effective perturbation found")
    ax.bar(x, unk, bottom=eff, color="#bbbbbb", label="undecided")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 100)
    ax.set_xlabel("true label")
    ax.set_ylabel("% of correctly classified inputs")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_label_relative(agg: dict) -> bytes:
    """Per true label and quantized model: relative robustness and adversarial transfer (solid
    up to lo, hatched from lo to hi where undecided inputs leave a range)."""
    models = agg["quantized"]
    labels = list(agg["float"]["per_label"])
    fig = _figure(max(8.0, 0.9 * len(labels) + 3), 3.2)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(models))
    measures = [
        ("relative_robustness", "relative robustness (%)"),
        ("adversarial_transfer", "adversarial transfer (%)"),
    ]
    for i, (measure, title) in enumerate(measures):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, (name, m) in enumerate(models.items()):
            xs = x + (j - (len(models) - 1) / 2) * width
            per = [m["per_label"].get(k, {}) for k in labels]
            values = [o.get(measure) for o in per]
            bars = ax.bar(xs, [_nan(v) for v in values], width, label=name)
            ranges = [o.get(f"{measure}_range") for o in per]  # undecided: hatched up to hi
            lo = [r["lo"] if r else math.nan for r in ranges]
            spread = [r["hi"] - r["lo"] if r else math.nan for r in ranges]
            colour = bars.patches[0].get_facecolor() if bars.patches else None
            ax.bar(xs, spread, width, bottom=lo, color="none", edgecolor=colour, hatch="///")
            for xv, v in zip(xs, values, strict=True):
                if v is None:  # an empty denominator, not a zero
                    ax.text(xv, 1, "n/a", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_ylim(0, 105)
        ax.set_xlabel("true label")
        ax.set_title(title)
    fig.axes[0].legend(fontsize=8, loc="lower left")
    return _png(fig)


def _image(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """An image array for imshow (H, W) or (H, W, 3), and its display options."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 4:
        img = img[0]
    if img.ndim == 3 and img.shape[-1] != 3:  # grey, or channels that are not RGB: the first
        img = img[..., 0]
    if img.ndim == 2:
        return img, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return np.clip(img, 0.0, 1.0), {}


def plot_examples(examples: Sequence[Example], columns: int = 6) -> bytes:
    """Originals (top) above their perturbed images, captioned with every model's answer."""
    cols = min(len(examples), columns)
    rows = math.ceil(len(examples) / cols)
    extra = max((len(e.quantized_labels) for e in examples), default=0)
    fig = _figure(1.6 * cols, rows * (3.4 + 0.3 * extra))
    for i, ex in enumerate(examples):
        r, c = divmod(i, cols)
        answers = [f"float: {ex.float_label}"]
        answers += [f"{name}: {lab}" for name, lab in ex.quantized_labels.items()]
        top = fig.add_subplot(2 * rows, cols, 2 * r * cols + c + 1)
        bottom = fig.add_subplot(2 * rows, cols, (2 * r + 1) * cols + c + 1)
        for ax, img in ((top, ex.original), (bottom, ex.perturbed)):
            data, opts = _image(img)
            ax.imshow(data, interpolation="nearest", **opts)
            ax.set_xticks([])
            ax.set_yticks([])
        top.set_title(f"#{ex.index}, label {ex.label}", fontsize=7)
        bottom.set_xlabel("\n".join(answers), fontsize=7)
    return _png(fig)


def plot_ladders(ladders: Sequence, columns: int = 4) -> bytes:
    """Per refuted input, every model's margin along the ladder to its counterexample (the
    first ladder of a `ladders.MarginLadder`): where each line crosses 0, that model flips."""
    from matplotlib.ticker import MaxNLocator

    cols = min(len(ladders), columns)
    rows = math.ceil(len(ladders) / cols)
    fig = _figure(3.0 * cols, 2.4 * rows)
    for i, lad in enumerate(ladders):
        ax = fig.add_subplot(rows, cols, i + 1)
        first = np.asarray(lad.ladder) == 0
        depth = np.abs(np.asarray(lad.rungs)[first]).sum(axis=1)
        for name, margin in lad.margins.items():
            ax.plot(depth, np.asarray(margin)[first], marker=".", label=name)
        ax.axhline(0.0, color="#888888", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"#{lad.index}, label {lad.label}", fontsize=8)
        ax.set_xlabel("rung (manipulations)", fontsize=7)
        ax.set_ylabel("margin", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=6)
    return _png(fig)
