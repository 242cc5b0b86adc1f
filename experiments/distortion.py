"""Distortion of the effective perturbations of a finished run: L0, L1, L2, Linf, mean and max.

Usage: python experiments/distortion.py [--run experiments/results/tables/mnist/mcts]
       [--limit N] [--out experiments/results/distortion] [--data-dir DIR]

Reads every results.json of a `verify` run (a sweep or a single setting). For each input the
float model refuted, the region is rebuilt from the run's configuration (`build_region` with
the stored settings, around the stored test input) and the recorded counterexample's
coefficients give the perturbed input x'; the distortion is x' - x over input values (for
CIFAR-10 a value is one colour channel of a pixel). Reported per (r, delta): mean and max of
L0 (values changed), L1, L2 and Linf, over all effective perturbations and split by whether
they transfer to each quantized model (R^0) or not (R_Q). `--limit` keeps the first N refuted
records per setting.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    base_parser,
    markdown_table,
    rel,
    stamp,
    step_text,
    sweep_docs,
    write_json,
    write_text,
)

from verifier.engine.data import load_dataset, to_layout  # noqa: E402
from verifier.engine.model import load_model  # noqa: E402
from verifier.engine.result import REFUTED  # noqa: E402
from verifier.run.check import Settings, build_region  # noqa: E402

NORMS = ("L0", "L1", "L2", "Linf")


def parse_args(argv: list[str] | None):
    """Options of this experiment."""
    p = base_parser("distortion", __doc__)
    p.add_argument(
        "--run",
        type=Path,
        default=RESULTS / "tables" / "mnist" / "mcts",
        help="a finished verify run (sweep or single setting)",
    )
    return p.parse_args(argv)


def norms(delta: np.ndarray) -> dict:
    """L0 (values changed), L1, L2, Linf of one perturbation."""
    a = np.abs(delta)
    return {
        "L0": int(np.count_nonzero(a > 1e-12)),
        "L1": float(a.sum()),
        "L2": float(np.sqrt((a * a).sum())),
        "Linf": float(a.max(initial=0.0)),
    }


def summary(rows: list[dict]) -> dict:
    """Count, and mean and max of each norm."""
    out: dict = {"count": len(rows)}
    for k in NORMS:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = {
            "mean": float(v.mean()) if len(v) else None,
            "max": float(v.max()) if len(v) else None,
        }
    return out


def settings_of(cfg: dict) -> Settings:
    """The region settings stored in a results.json configuration."""
    known = Settings.__dataclass_fields__
    stored = cfg.get("settings") or cfg  # a partial run's store keeps them at the top level
    return Settings(**{k: v for k, v in stored.items() if k in known})


def reconfirmed(model, perturbed: list[tuple[np.ndarray, int]]) -> int:
    """How many rebuilt perturbed inputs the float model still misclassifies (all, if the
    regions were rebuilt exactly)."""
    if not perturbed:
        return 0
    xs = np.stack([p for p, _ in perturbed]).astype(np.float32)
    labels = np.array([lab for _, lab in perturbed])
    return int(np.sum(model.classify(xs.reshape((len(xs), *model.input_shape))) != labels))


def setting_distortion(doc: dict, data_dir: Path | None, limit: int | None, cache: dict) -> dict:
    """Distortion of the float counterexamples of one (r, delta), overall and per transfer."""
    cfg = doc["config"]
    st = settings_of(cfg)
    key = (cfg["model"], cfg["data"])
    if key not in cache:
        model = load_model(cfg["model"], cfg.get("layout"))
        ds = load_dataset(cfg["data"], "test", data_dir or cfg.get("data_dir"))
        cache[key] = (model, ds, model.network.lower())
    model, ds, chain = cache[key]
    refuted = [r for r in doc["records"] if r.get("float") and r["float"]["status"] == REFUTED]
    rows, perturbed = [], []
    for rec in refuted[:limit]:
        image = ds.images[rec["index"] : rec["index"] + 1]
        x = to_layout(image, model.layout, model.input_shape)[0].reshape(-1)
        region = build_region(st, x, chain, rec["label"], rec["index"])
        coeffs = np.asarray(rec["float"]["coeffs"], dtype=np.int64)
        xp = region.points(coeffs[None])[0]
        perturbed.append((xp, rec["label"]))
        delta = xp - region.x
        transfer = {n: q.get("transfer") for n, q in rec["quantized"].items()}
        rows.append({"index": rec["index"], **norms(delta), "transfer": transfer})
    names = list(dict.fromkeys(n for r in rows for n in r["transfer"]))
    return {
        "r": float(cfg["radius"]),
        "step": float(cfg["step"]),
        "reconfirmed": reconfirmed(model, perturbed),
        "all": summary(rows),
        "by_model": {
            n: {
                "transferred": summary([r for r in rows if r["transfer"].get(n) is True]),
                "not_transferred": summary([r for r in rows if r["transfer"].get(n) is False]),
            }
            for n in names
        },
        "rows": rows,
    }


def _cells(s: dict) -> list[str]:
    if not s["count"]:
        return ["–"] * len(NORMS)
    return [f"{s[k]['mean']:.3g} / {s[k]['max']:.3g}" for k in NORMS]


def markdown(result: dict) -> str:
    """distortion.md: all effective perturbations, then split by transfer per model."""
    meta = result["meta"]
    body = [
        [f"{s['r']:g}", f"±{step_text(s['step'])}", s["all"]["count"], s["reconfirmed"]]
        + _cells(s["all"])
        for s in result["settings"]
    ]
    parts = [
        "# Distortion of effective perturbations",
        "",
        f"Date {meta['date']}; commit: see git log. Run: `{result['run']}`. Cells: mean / max "
        "over the float model's confirmed counterexamples (L0 counts input values changed); "
        "`reconfirmed`: rebuilt perturbed inputs the float model still misclassifies.",
        "",
        markdown_table(["r", "δ", "n", "reconfirmed", *NORMS], body),
    ]
    names = list(dict.fromkeys(n for s in result["settings"] for n in s["by_model"]))
    for n in names:
        split = []
        for s in result["settings"]:
            m = s["by_model"].get(n)
            if m is None:
                continue
            for kind in ("transferred", "not_transferred"):
                split.append(
                    [f"{s['r']:g}", f"±{step_text(s['step'])}", kind, m[kind]["count"]]
                    + _cells(m[kind])
                )
        parts += [
            "",
            f"## Split by transfer to {n}",
            "",
            markdown_table(["r", "δ", "points", "n", *NORMS], split),
        ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rebuild the regions of a finished run and write distortion.json / distortion.md."""
    args = parse_args(argv)
    started = time.perf_counter()
    docs = sweep_docs(args.run)
    if not docs:
        raise SystemExit(f"{args.run}: no results.json (run tables.py or verify first)")
    cache: dict = {}
    settings = [setting_distortion(d, args.data_dir, args.limit, cache) for d in docs]
    settings.sort(key=lambda s: (s["r"], -s["step"]))
    result = {"meta": stamp(started, args), "run": rel(args.run), "settings": settings}
    write_json(args.out / "distortion.json", result)
    write_text(args.out / "distortion.md", markdown(result))
    print(f"distortion: {args.out / 'distortion.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
