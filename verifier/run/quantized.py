"""The quantized models a run compares: `--quantized` files and the `--modes` built here, with
each runner's description and, where one can be built, its error model."""

from __future__ import annotations

import sys
from pathlib import Path

from verifier.engine.model import Model
from verifier.errors import InputError, RelrobustError
from verifier.run.config import DEFAULT_MODES, RunConfig


def quantized_runners(model: Model, config: RunConfig, out: Path) -> tuple[dict, list]:
    """name -> runner, and each runner's description (name, describe), in order."""
    from quantize import get_mode, quantize_model

    modes = config.mode_options()
    if config.modes is None and not config.quantized:
        modes = [(m, {}) for m in DEFAULT_MODES]
        if config.data.endswith(".npz") and not config.calib_data:
            modes = [("dynamic", {})]  # static modes need calibration data apart from the tests
            print(
                "notice: no --calib-data for the .npz dataset: building the dynamic-range "
                "model only",
                file=sys.stderr,
            )
    runners, described = {}, []
    for path in config.quantized:
        r = quantized_file(path, model)
        runners[r.name], described = r, [*described, {"name": r.name, "describe": r.describe()}]
    if modes:
        calib, record = None, None
        if any(get_mode(m).needs_calib(get_mode(m).resolve(o)) for m, o in modes):
            calib, record = calibration(model, config)
        for mode, options in modes:
            r = quantize_model(model, mode, out / "models", calib, **options)
            desc = {**r.describe(), "calibration": record.to_dict() if record else None}
            runners[r.name] = r
            described.append({"name": r.name, "describe": desc})
    return runners, described


def runner_error_models(chain, runners: dict, described: list) -> dict:
    """name -> error model of each runner that has one (against the float `chain`); every
    runner's description notes its model or why it has none."""
    from quantize.error_model import ErrorModel, describe_error_model, error_models

    models = error_models(runners, chain)
    for d in described:
        d["describe"]["error_model"] = describe_error_model(models.get(d["name"]))
    return {k: v for k, v in models.items() if isinstance(v, ErrorModel)}


def quantized_file(path: Path, model: Model):
    """A `--quantized` file as a runner; unreadable or incompatible files are InputErrors."""
    from quantize import check_compatible, load_quantized

    try:
        runner = load_quantized(path, model.layout)
    except RelrobustError:
        raise
    except Exception as exc:  # parser errors of the file's format (protobuf, flatbuffers)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the quantized model {path}: {first}") from None
    check_compatible(model, runner)
    return runner


def calibration(model: Model, config: RunConfig):
    """Calibration inputs from the training side of the data, never the verified inputs."""
    from quantize import calibration_inputs

    source = config.calib_data or config.data
    if source.endswith(".npz") and not config.calib_data:
        raise InputError(
            "static quantization needs calibration data apart from the verified inputs: pass "
            "--calib-data TRAIN.npz (or --modes with dynamic modes only, or --quantized FILE)"
        )
    return calibration_inputs(
        source, config.data_dir, model.layout, model.input_shape, config.calib_size, config.seed
    )
