"""The `verify` command: argument parsing and exit statuses, nothing else.

`verify [options] [MODEL]` runs the main job (see `verifier.pipeline`); `verify quantize ...`
writes a quantized copy of a model. Every `RelrobustError` becomes one line on stderr and exit
status 2; a breached CI gate is exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from verifier import __version__
from verifier.errors import EXIT_USAGE, RelrobustError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_MODEL = EXAMPLES / "mnist_mlp.onnx"


def _fraction(text: str) -> float:
    """A step or radius: a decimal (0.25) or a fraction (1/64)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


def _number_list(text: str) -> list[float]:
    """Comma-separated numbers or fractions, for sweeps: `10,20` or `1,1/2,1/4`."""
    return [_fraction(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The main command's parser; every option is documented in `--help`."""
    p = argparse.ArgumentParser(
        prog="verify",
        description=(
            "Decide DLV-style robustness regions of a classifier (certified / refuted / "
            "unknown) and measure how its post-training quantized copies keep them. "
            "Subcommands: `verify quantize MODEL --mode M` writes a quantized model; "
            "`verify show RUN INDEX` writes an input and its perturbation as PNG; "
            "`verify audit RUN` re-checks a finished run on the real runtimes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"relrobust {__version__}")
    p.add_argument(
        "model",
        nargs="?",
        type=Path,
        default=None,
        help="ONNX (.onnx) or Keras (.keras/.h5) classifier; default: the embedded "
        f"{DEFAULT_MODEL.name}",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--layout",
        choices=["flat", "flat-chw", "nchw", "nhwc"],
        help="input layout of the model (default: read from the graph); flat = HWC "
        "order (Keras), flat-chw = CHW order (PyTorch)",
    )
    g.add_argument(
        "--data",
        default=None,
        help="dataset: mnist, cifar10 or a .npz with x and y (default: from the "
        "model's input size)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where datasets are looked for (default: $RELROBUST_DATA, else "
        "~/.cache/relrobust/data)",
    )
    g.add_argument("--limit", type=int, default=None, help="use the first N selected inputs")
    g.add_argument("--indices", default=None, help="input positions, START:STOP or a,b,c")
    g.add_argument("--labels", default=None, help="only inputs with these true labels, e.g. 1,7")

    g = p.add_argument_group("regions (SPEC section 3)")
    g.add_argument(
        "--radius",
        type=_number_list,
        default=[20.0],
        help="Manhattan radius r; a comma list sweeps several (10,20)",
    )
    g.add_argument(
        "--step",
        type=_number_list,
        default=[0.25],
        help="manipulation step delta in (0,1]; fractions allowed; a comma list "
        "sweeps several (1,1/2,1/4)",
    )
    g.add_argument(
        "--region",
        choices=["features", "lattice"],
        default="features",
        help="features: subsets of features, each moved once by the step away from "
        "0.5 (the paper's); lattice: --dims values moved by multiples of the step",
    )
    g.add_argument("--dims", type=int, default=10, help="lattice: how many input values move")
    g.add_argument("--feature-dims", type=int, default=10, help="input values per feature")
    g.add_argument(
        "--selection",
        choices=["activation", "gradient", "random"],
        default="activation",
        help="feature selection: DLV's |x_i - mean(x)|, gradient saliency of the "
        "logit margin, or seeded random",
    )

    g = p.add_argument_group("decision")
    g.add_argument(
        "--search",
        choices=["exact", "mcts"],
        default="exact",
        help="exact: attack, bounds, branch and bound, enumeration, z3 (certified / "
        "refuted / unknown); mcts: the paper's Monte-Carlo tree search "
        "(refuted / not-refuted) with replay of its IP / EP sets",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="seconds per input and model before the answer is unknown",
    )
    g.add_argument(
        "--max-nodes", type=int, default=20000, help="branch-and-bound nodes per input and model"
    )
    g.add_argument(
        "--enum-limit",
        type=int,
        default=8192,
        help="regions or leaves with at most this many points are enumerated",
    )
    g.add_argument("--rollouts", type=int, default=2000, help="mcts: rollouts per input")
    g.add_argument("--no-smt", action="store_true", help="skip the z3 step")

    g = p.add_argument_group("quantized models (SPEC section 5)")
    g.add_argument(
        "--quantized",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a quantized model you already have (.tflite or .onnx); repeatable",
    )
    g.add_argument(
        "--modes",
        default=None,
        help="quantization modes to build, comma list (default: dynamic,ort-qdq "
        "when no --quantized file is given; 'none' for none); see "
        "`verify quantize --list-modes`",
    )
    g.add_argument(
        "--calib-data",
        default=None,
        help="calibration dataset (default: the training side of --data; required "
        "for static modes when --data is an .npz)",
    )
    g.add_argument(
        "--calib-size",
        type=int,
        default=500,
        help="calibration inputs drawn from the training side of the dataset",
    )

    g = p.add_argument_group("output and runs")
    g.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<timestamp>)"
    )
    g.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN",
        help="continue an interrupted run in RUN; decided inputs are not recomputed",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument(
        "--cluster",
        default=None,
        metavar="ADDR",
        help="run the checks on the Dask scheduler at ADDR (tcp://HOST:PORT); its workers "
        "need relrobust installed, not the model files (see the README, 'On a cluster')",
    )
    g.add_argument("--quiet", action="store_true", help="no progress and no tables")
    g.add_argument("--json", action="store_true", help="print the summary as JSON to stdout")
    g.add_argument("--examples", type=int, default=12, help="example images per grid in the report")

    g = p.add_argument_group("CI gate (percentages; exit status 1 when breached)")
    g.add_argument("--min-relative-robustness", type=float, default=None)
    g.add_argument("--max-transfer", type=float, default=None)
    g.add_argument("--max-unknown", type=float, default=None)
    g.add_argument("--min-accuracy", type=float, default=None)
    g.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="results.json of the previous release: fail when a measure got worse",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="percentage points a measure may get worse than the baseline",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `verify` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if argv and argv[0] == "quantize":
            from quantize.cli import main as quantize_main

            return quantize_main(argv[1:])
        if argv and argv[0] == "show":
            from verifier.show import main as show_main

            return show_main(argv[1:])
        if argv and argv[0] == "audit":
            from verifier.audit import main as audit_main

            return audit_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        from verifier.pipeline import run

        return run(args, parser)
    except RelrobustError as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(
            "verify: interrupted; decided inputs are stored: continue with --resume RUN",
            file=sys.stderr,
        )
        return 130
    except SystemExit as exc:  # argparse usage errors exit with 2 already
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
