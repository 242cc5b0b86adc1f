"""The `verify` command: argument parsing and exit statuses, nothing else.

The parsed options become one `config.RunConfig`; nothing below this module sees argparse.

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
from verifier.engine.data import DATASETS, LAYOUTS
from verifier.engine.features import SELECTIONS
from verifier.engine.regions import FAMILIES
from verifier.errors import EXIT_USAGE, RelrobustError
from verifier.run.config import (
    DEFAULT_EXAMPLE_LIMIT,
    DEFAULT_MODEL,
    DEFAULT_MODES,
    DEFAULTS,
    SEARCHES,
    build_config,
    gate_warnings,
    uses_example_limit,
)


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


def _shown(value: object) -> str:
    """A default as `--help` prints it."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The main command's parser; options not given are absent from the parsed namespace, so
    `config.build_config` knows what the user said (and `--resume` what to take from the run)."""
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="verify",
        description=(
            "Decide DLV-style robustness regions of a classifier (certified / refuted / "
            "unknown) and measure how its post-training quantized copies keep them. "
            "Subcommands: `verify quantize MODEL --mode M` writes a quantized model; "
            "`verify show RUN INDEX` writes an input and its perturbation as PNG; "
            "`verify audit RUN` re-checks a finished run on the real runtimes."
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--version", action="version", version=f"relrobust {__version__}")
    p.add_argument(
        "model",
        nargs="?",
        type=Path,
        default=None,  # a positional's default is not suppressed: None means not given
        help="ONNX (.onnx) or Keras (.keras/.h5) classifier (default: the embedded "
        f"{DEFAULT_MODEL.name}, first {DEFAULT_EXAMPLE_LIMIT} inputs)",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="input layout of the model (default: read from the graph); flat = HWC "
        "order (Keras), flat-chw = CHW order (PyTorch)",
    )
    g.add_argument(
        "--data",
        help=f"dataset: {', '.join(DATASETS)} or a .npz with x and y (default: from the "
        "model's input size)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        help="where datasets are looked for (default: $RELROBUST_DATA, else "
        "~/.cache/relrobust/data)",
    )
    g.add_argument("--limit", type=int, help="use the first N selected inputs (default: all)")
    g.add_argument("--indices", help="input positions, START:STOP or a,b,c (default: all)")
    g.add_argument("--labels", help="only inputs with these true labels, e.g. 1,7 (default: all)")

    g = p.add_argument_group("regions (SPEC section 3)")
    g.add_argument(
        "--radius",
        type=_number_list,
        help=f"Manhattan radius r; a comma list sweeps several, e.g. 10,20 (default: "
        f"{_shown(d.radius)})",
    )
    g.add_argument(
        "--step",
        type=_number_list,
        help="manipulation step delta in (0,1]; fractions allowed; a comma list "
        f"sweeps several, e.g. 1,1/2,1/4 (default: {_shown(d.step)})",
    )
    g.add_argument(
        "--region",
        choices=tuple(FAMILIES),
        help="; ".join(f"{f.name}: {f.help}" for f in FAMILIES.values())
        + f" (default: {d.region})",
    )
    g.add_argument(
        "--dims", type=int, help=f"lattice: how many input values move (default: {d.dims})"
    )
    g.add_argument(
        "--feature-dims",
        type=int,
        help=f"input values per feature (default: {d.feature_dims})",
    )
    g.add_argument(
        "--selection",
        choices=SELECTIONS,
        help="feature selection: DLV's |x_i - mean(x)|, gradient saliency of the "
        f"logit margin, or seeded random (default: {d.selection})",
    )

    g = p.add_argument_group("decision")
    g.add_argument(
        "--search",
        choices=SEARCHES,
        help="exact: attack, bounds, branch and bound, enumeration, z3 (certified / "
        "refuted / unknown); mcts: the paper's Monte-Carlo tree search "
        f"(refuted / not-refuted) with replay of its IP / EP sets (default: {d.search})",
    )
    g.add_argument(
        "--timeout",
        type=float,
        help="seconds per input and model before the answer is unknown (quantized models: "
        f"--quantized-timeout when given) (default: {_shown(d.timeout)})",
    )
    g.add_argument(
        "--quantized-timeout",
        type=float,
        help="seconds per input and quantized model (default: --timeout); their rounding "
        "makes hard inputs cost more than on the float model, easy ones finish early",
    )
    g.add_argument(
        "--max-nodes",
        type=int,
        help=f"branch-and-bound nodes per input and model (default: {d.max_nodes})",
    )
    g.add_argument(
        "--enum-limit",
        type=int,
        help="regions or leaves with at most this many points are enumerated on the float "
        f"model (default: {d.enum_limit})",
    )
    g.add_argument(
        "--quantized-enum-limit",
        type=int,
        help="the same on quantized models, whose bounds are looser "
        f"(default: {d.quantized_enum_limit})",
    )
    g.add_argument("--rollouts", type=int, help=f"mcts: rollouts per input (default: {d.rollouts})")
    g.add_argument("--no-smt", action="store_true", help="skip the z3 step")

    g = p.add_argument_group("quantized models (SPEC section 5)")
    g.add_argument(
        "--quantized",
        type=Path,
        action="append",
        metavar="FILE",
        help="a quantized model you already have (.tflite or .onnx); repeatable",
    )
    g.add_argument(
        "--modes",
        help="quantization modes to build, comma list, each MODE or MODE:KEY=VALUE[:...] "
        "(e.g. ort-qdq:reduce_range=true) (default: "
        f"{','.join(DEFAULT_MODES)} when no --quantized file is given; 'none' for none); "
        "see `verify quantize --list-modes`",
    )
    g.add_argument(
        "--calib-data",
        help="calibration dataset (default: the training side of --data; required "
        "for static modes when --data is an .npz)",
    )
    g.add_argument(
        "--calib-size",
        type=int,
        help="calibration inputs drawn from the training side of the dataset "
        f"(default: {d.calib_size})",
    )

    g = p.add_argument_group("output and runs")
    g.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    g.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue an interrupted run in RUN; decided inputs are not recomputed and "
        "options not given take RUN's values",
    )
    g.add_argument("--seed", type=int, help=f"seed of every random choice (default: {d.seed})")
    g.add_argument("--workers", type=int, help=f"worker processes (default: {d.workers})")
    g.add_argument(
        "--cluster",
        metavar="ADDR",
        help="run the checks on the Dask scheduler at ADDR (tcp://HOST:PORT) instead of "
        "--workers; its workers need relrobust installed, not the model files (README: "
        "'On a cluster')",
    )
    g.add_argument("--quiet", action="store_true", help="no progress and no tables")
    g.add_argument("--json", action="store_true", help="print the summary as JSON to stdout")
    g.add_argument(
        "--examples",
        type=int,
        help=f"example images per grid in the report (default: {d.examples})",
    )

    g = p.add_argument_group(
        "CI gate (exit status 1 when breached)",
        "Thresholds are percentages from 0 to 100 (90 means 90%, 0.9 means 0.9%). Where "
        "undecided inputs leave a measure a range lo..hi, a minimum is checked against lo "
        "and a maximum against hi. Default: not checked.",
    )
    g.add_argument(
        "--min-relative-robustness",
        type=float,
        metavar="PCT",
        help="fail when a quantized model's relative robustness |R_Q^FP|/|R| is below PCT percent",
    )
    g.add_argument(
        "--max-transfer",
        type=float,
        metavar="PCT",
        help="fail when a quantized model's adversarial transfer |R^0|/|R_NOT| is above PCT "
        "percent",
    )
    g.add_argument(
        "--max-unknown",
        type=float,
        metavar="PCT",
        help="fail when more than PCT percent of the correctly classified inputs are undecided",
    )
    g.add_argument(
        "--min-accuracy",
        type=float,
        metavar="PCT",
        help="fail when a model's clean accuracy is below PCT percent",
    )
    g.add_argument(
        "--baseline",
        type=Path,
        help="results.json of the previous release: fail when a measure got worse",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        metavar="POINTS",
        help="percentage points a measure may get worse than the baseline "
        f"(default: {_shown(d.tolerance)})",
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
        parsed = vars(build_parser().parse_args(argv))
        given = {k: v for k, v in parsed.items() if v is not None}
        config = build_config(given)
        if uses_example_limit(given):
            print(
                f"notice: embedded default model, first {DEFAULT_EXAMPLE_LIMIT} inputs (pass "
                "--limit, --indices or --labels for others)",
                file=sys.stderr,
            )
        for line in gate_warnings(config):
            print(line, file=sys.stderr)
        from verifier.pipeline import run

        return run(config)
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
