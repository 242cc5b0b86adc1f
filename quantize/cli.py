"""`verify quantize`: float model in, quantized file out, clean accuracy of both and agreement.

Exit status 0 on success, 2 with one message naming the problem on a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quantize.agreement import agreement
from quantize.calibration import DEFAULT_CALIB_SIZE, calibration_inputs
from quantize.modes import (
    MODES,
    build,
    check_compatible,
    default_path,
    get_mode,
    list_modes,
    parse_options,
)
from verifier.engine.data import LAYOUTS, load_dataset, select, to_layout
from verifier.errors import EXIT_OK, EXIT_USAGE, RelrobustError


def parser() -> argparse.ArgumentParser:
    """The argument parser of `verify quantize`."""
    p = argparse.ArgumentParser(
        prog="verify quantize",
        description="Quantize a float model post-training and compare it with the original.",
        epilog="modes: " + ", ".join(MODES) + " (--list-modes shows their options)",
    )
    p.add_argument("model", nargs="?", type=Path, help="float model (.onnx, .keras, .h5)")
    p.add_argument("--mode", help="quantization mode (see --list-modes)")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mode option, repeatable (e.g. -o per_channel=true)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="quantized file to write (default: <model>.<name>.* in the current directory)",
    )
    p.add_argument("--data", default="mnist", help="dataset: mnist, cifar10 or an .npz path")
    p.add_argument("--data-dir", type=Path, help="data folder (default $RELROBUST_DATA or cache)")
    p.add_argument(
        "--calib-size",
        type=int,
        default=DEFAULT_CALIB_SIZE,
        help="calibration inputs drawn from the training split",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--limit", type=int, help="evaluate on the first N test inputs only")
    p.add_argument("--layout", choices=LAYOUTS, help="input layout, if it cannot be detected")
    p.add_argument("--json", type=Path, help="also write the run record (describe, agreement)")
    p.add_argument("--list-modes", action="store_true", help="list the modes and their options")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, evaluate both models on the test split, print and return the record."""
    from verifier.engine.model import load_model

    mode = get_mode(args.mode)
    options = parse_options(args.option)
    opts = mode.resolve(options)
    model = load_model(args.model, args.layout)
    calib, record = None, None
    if mode.needs_calib(opts):
        calib, record = calibration_inputs(
            args.data, args.data_dir, model.layout, model.input_shape, args.calib_size, args.seed
        )
    out = args.out or default_path(model, args.mode, Path.cwd(), **options)
    runner = build(model, args.mode, out, calib, **options)
    check_compatible(model, runner)
    test = select(load_dataset(args.data, "test", args.data_dir), limit=args.limit)
    x = to_layout(test.images, model.layout, model.input_shape)
    result = agreement(model, runner, x, test.labels)
    _print(runner.name, out, runner.describe()["sha256"], record, test.source, result)
    return {
        "describe": runner.describe(),
        "agreement": result,
        "calibration": record.to_dict() if record else None,
        "evaluation": {
            "dataset": args.data,
            "split": "test",
            "source": test.source,
            "inputs": len(test),
        },
    }


def _print(name: str, out: Path, sha: str, record: Any, source: str, r: dict[str, Any]) -> None:
    print(f"quantized: {name} -> {out} (sha256 {sha[:16]})")
    if record is not None:
        print(
            f"calibration: {record.size} {record.dataset} {record.split} images "
            f"({record.source}), seed {record.seed}"
        )
    print(f"evaluation: {r['inputs']} test images ({source})")
    print(f"float accuracy:     {100 * r['float_accuracy']:.2f}%")
    print(
        f"quantized accuracy: {100 * r['quantized_accuracy']:.2f}% "
        f"(drop {100 * r['accuracy_drop']:.2f} points)"
    )
    print(
        f"agreement:          {100 * r['agreement']:.2f}% "
        f"({r['disagreements']} of {r['inputs']} differ)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `verify quantize ...`; returns the exit status."""
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return int(exc.code or 0)
    if args.list_modes:
        print(list_modes())
        return EXIT_OK
    if args.model is None or args.mode is None:
        p.print_usage(sys.stderr)
        print("verify quantize: error: MODEL and --mode are required", file=sys.stderr)
        return EXIT_USAGE
    try:
        record = run(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    except RelrobustError as exc:
        print(f"verify quantize: error: {exc}", file=sys.stderr)
        return exc.exit_status
    return EXIT_OK
