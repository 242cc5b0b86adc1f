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
SUBCOMMANDS = ("quantize",)


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
            "Subcommand: `verify quantize MODEL --mode M` writes a quantized model."
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `verify` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if argv and argv[0] == "quantize":
            from quantize.cli import main as quantize_main

            return quantize_main(argv[1:])
        args = build_parser().parse_args(argv)
        from verifier.pipeline import run

        return run(args)
    except RelrobustError as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse usage errors exit with 2 already
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
