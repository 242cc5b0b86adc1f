"""The main job, top-down: load model and data -> clean accuracy -> quantize -> decide every
input on the float model and each quantized model -> aggregate -> report -> gate.

Records are committed to the run's SQLite store as inputs are decided, so `--resume` continues
an interrupted run without recomputing anything stored. A sweep (several radii or steps) gets
one sub-directory per setting and a Markdown table per measure at the top.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from verifier.check import Checker, Settings
from verifier.data import Dataset, from_layout, load_dataset, select, to_layout
from verifier.errors import EXIT_GATE_FAILED, EXIT_OK, InputError, RelrobustError
from verifier.executor import WorkerState, check_inputs
from verifier.model import Model, load_model
from verifier.progress import Progress
from verifier.records import InputRecord
from verifier.regions import validate_radius_step
from verifier.result import REFUTED

DATASET_BY_INPUT_SIZE = {784: "mnist", 3072: "cifar10"}
DEFAULT_MODES = ("dynamic", "ort-qdq")
# The README's main command runs the embedded default on this many inputs unless told otherwise.
DEFAULT_EXAMPLE_LIMIT = 100
# Options that may differ on --resume (they do not change any decision).
OUTPUT_KEYS = ("workers", "quiet", "json", "out", "resume", "examples", "gate")


@dataclass
class Inputs:
    """The selected test inputs in the model's layout, with their labels and provenance."""

    dataset: Dataset
    x: np.ndarray  # (N, *model.input_shape) float32 in [0,1]
    y: np.ndarray  # (N,) int64


def dataset_name(model: Model, data: str | None) -> str:
    """`--data`, or the dataset a model of this input size is usually tested on."""
    if data is not None:
        return data
    size = int(np.prod(model.input_shape))
    if size not in DATASET_BY_INPUT_SIZE:
        raise InputError(f"no default dataset for a model with {size} input values; pass --data")
    return DATASET_BY_INPUT_SIZE[size]


def load_inputs(model: Model, args: argparse.Namespace) -> Inputs:
    """The dataset named by `--data` (or guessed from the model's input size), selected."""
    ds = load_dataset(dataset_name(model, args.data), "test", args.data_dir)
    ds = select(ds, args.indices, args.labels, args.limit)
    x = to_layout(ds.images, model.layout, model.input_shape)
    if ds.labels.max() >= model.num_classes:
        raise InputError(
            f"label {int(ds.labels.max())} is outside the model's {model.num_classes} classes"
        )
    return Inputs(ds, x, ds.labels)


def accuracy_table(y: np.ndarray, preds: dict[str, np.ndarray], classes: int) -> str:
    """Per-class clean accuracy of the float model (F) and each quantized model (Q1, Q2, ...)."""
    names = list(preds)
    tags = ["F", *[f"Q{i}" for i in range(1, len(names))]]
    head = f"{'label':>5} {'inputs':>7} " + " ".join(f"{t + ' acc%':>9}" for t in tags)
    lines = ["clean accuracy", head]
    for c in [*range(classes), None]:
        mask = np.ones(len(y), bool) if c is None else y == c
        if not mask.any():
            continue
        cells = " ".join(f"{100 * np.mean(preds[n][mask] == y[mask]):>9.2f}" for n in names)
        lines.append(f"{'all' if c is None else c:>5} {int(mask.sum()):>7} {cells}")
    lines += [f"{t} = {n}" for t, n in zip(tags, names, strict=True)]
    return "\n".join(lines)


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values and combinations that cannot be run (exit status 2)."""
    for r in args.radius:
        for s in args.step:
            validate_radius_step(r, s)
    for name in ("dims", "feature_dims", "max_nodes", "enum_limit", "rollouts", "workers"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    if args.search == "mcts" and args.region != "features":
        raise InputError("--search mcts searches feature subsets: use it with --region features")
    if args.resume and args.out and args.out != args.resume:
        raise InputError("--resume RUN continues RUN in place: do not also pass a different --out")
    from verifier.gate import Thresholds

    Thresholds(  # refuses limits outside [0, 100] now, not after every input is decided
        args.min_relative_robustness, args.max_transfer, args.max_unknown, args.min_accuracy
    )


def run_config(args: argparse.Namespace, model_path: Path, data_name: str) -> dict:
    """The configuration that determines every decision (stored with the run)."""
    return {
        "model": str(model_path),
        "layout": args.layout,
        "data": data_name,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "limit": args.limit,
        "indices": args.indices,
        "labels": args.labels,
        "radius": args.radius,
        "step": args.step,
        "region": args.region,
        "dims": args.dims,
        "feature_dims": args.feature_dims,
        "selection": args.selection,
        "search": args.search,
        "timeout": args.timeout,
        "max_nodes": args.max_nodes,
        "enum_limit": args.enum_limit,
        "rollouts": args.rollouts,
        "use_smt": not args.no_smt,
        "quantized": [str(q) for q in args.quantized],
        "modes": args.modes,
        "calib_size": args.calib_size,
        "calib_data": args.calib_data,
        "seed": args.seed,
    }


def resume_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """On --resume, options left at their defaults take the stored run's values."""
    run_dir = args.resume
    if args.out is not None and Path(args.out).resolve() != Path(run_dir).resolve():
        raise InputError("--resume RUN continues RUN in place: do not also pass a different --out")
    if not (run_dir / "run.json").is_file():
        raise InputError(f"--resume {run_dir}: not a run directory (no run.json)")
    try:
        stored = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--resume {run_dir}: unreadable run.json ({exc})") from None
    if not isinstance(stored, dict):
        raise InputError(f"--resume {run_dir}: run.json does not hold a run configuration")
    for key, value in stored.items():
        dest = key.replace("-", "_")
        if key == "use_smt":
            if not args.no_smt:
                args.no_smt = not value
            continue
        if dest in ("model", "data_dir", "quantized"):
            if getattr(args, dest) in (None, []):
                cast = (
                    [Path(v) for v in value]
                    if dest == "quantized"
                    else (Path(value) if value else None)
                )
                setattr(args, dest, cast)
            continue
        if hasattr(args, dest) and getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)
    args.out = run_dir  # the per-setting stores check the full configuration


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the main job for parsed arguments; returns the exit status."""
    from verifier.cli import DEFAULT_MODEL, build_parser

    if args.resume:
        resume_args(args, parser or build_parser())
    check_options(args)
    model_path = args.model or DEFAULT_MODEL
    if args.model is None and not (args.limit or args.indices or args.labels or args.resume):
        args.limit = DEFAULT_EXAMPLE_LIMIT
        print(
            f"notice: embedded default model, first {DEFAULT_EXAMPLE_LIMIT} inputs (pass "
            "--limit, --indices or --labels for others)",
            file=sys.stderr,
        )
    out = args.out or fresh_run_dir(Path("runs"))
    model = load_model(model_path, args.layout, cache_dir=out / "models")
    _ = model.network  # the layer list now: an unsupported operator is named before long work
    if args.baseline:
        from verifier.gate import load_baseline

        load_baseline(args.baseline)  # an unreadable baseline fails now, not after the run
    data_name = dataset_name(model, args.data)
    inputs = load_inputs(model, args)
    config = run_config(args, model_path, data_name)
    out.mkdir(parents=True, exist_ok=True)
    from verifier.store import write_atomic

    if not args.resume:
        if (out / "run.json").exists():
            raise InputError(f"{out} already holds a run; pass --resume {out} to continue it")
        write_atomic(out / "run.json", json.dumps(config, indent=2))
    say = _printer(args)
    say(
        f"model: {model.source or model.path} (layout {model.layout}, input "
        f"{model.input_shape}, {model.num_classes} classes, sha256 {model.sha256[:12]})"
    )
    say(f"data:  {inputs.dataset.name} from {inputs.dataset.source}, {len(inputs.y)} inputs")

    runners, described = quantized_runners(model, args, data_name, out)
    models = runner_error_models(model, runners, described)
    preds = {"float": model.classify(inputs.x)}  # the float model first: tag F
    for name, runner in runners.items():
        preds[name] = np.asarray(runner.predict(inputs.x)).argmax(axis=1)
    say(accuracy_table(inputs.y, preds, model.num_classes))

    settings = [
        Settings(
            r,
            s,
            args.region,
            args.dims,
            args.feature_dims,
            args.selection,
            args.search,
            args.timeout,
            args.max_nodes,
            args.enum_limit,
            args.rollouts,
            not args.no_smt,
            args.seed,
        )
        for r in args.radius
        for s in args.step
    ]
    sweep = len(settings) > 1
    results = []
    for st in settings:
        run_dir = out / f"r{st.radius:g}-s{st.step:g}".replace("/", "_") if sweep else out
        cfg = {**config, "radius": st.radius, "step": st.step}
        try:
            doc = run_setting(
                st, cfg, model, inputs, runners, described, preds, run_dir, args, say, models
            )
        except (OSError, sqlite3.Error) as exc:  # a full disk, a read-only directory, ...
            reason = getattr(exc, "strerror", None) or str(exc)
            raise InputError(
                f"cannot write the run's files in {run_dir}: {reason}; the inputs decided so far "
                f"are stored: fix this and continue with `verify --resume {out}`"
            ) from None
        results.append((st, doc))
    if sweep:
        from verifier.report import write_sweep_tables

        write_sweep_tables(
            out / "sweep.md", [(st.radius, st.step, doc["aggregates"]) for st, doc in results]
        )
        say(f"sweep tables: {out / 'sweep.md'}")
    failed = any(not doc["gate"]["passed"] for _, doc in results)
    if args.json:
        print(
            json.dumps(
                [summary(st, doc) for st, doc in results] if sweep else summary(*results[0]),
                indent=2,
            )
        )
    return EXIT_GATE_FAILED if failed else EXIT_OK


def fresh_run_dir(root: Path) -> Path:
    """`root/<timestamp>`, with a suffix when two runs start in the same second."""
    base = root / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _printer(args: argparse.Namespace):
    quiet = args.quiet or args.json

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say


def quantized_runners(model: Model, args, data_name: str, out: Path):
    """The quantized models to compare: `--quantized` files and the `--modes` built here."""
    from quantize import get_mode, quantize_model

    modes = args.modes
    if modes is None:
        modes = "" if args.quantized else ",".join(DEFAULT_MODES)
        if data_name.endswith(".npz") and not args.calib_data and not args.quantized:
            modes = "dynamic"  # static modes need calibration data apart from the test inputs
            print(
                "notice: no --calib-data for the .npz dataset: building the dynamic-range "
                "model only",
                file=sys.stderr,
            )
    modes = [m.strip() for m in modes.split(",") if m.strip() and m.strip() != "none"]
    runners, described = {}, []
    for path in args.quantized:
        r = quantized_file(path, model)
        runners[r.name], described = r, [*described, {"name": r.name, "describe": r.describe()}]
    if modes:
        calib, record = None, None
        if any(get_mode(m).needs_calib(get_mode(m).resolve({})) for m in modes):
            calib, record = calibration(model, args, data_name)
        for mode in modes:
            r = quantize_model(model, mode, out / "models", calib)
            desc = {**r.describe(), "calibration": record.to_dict() if record else None}
            runners[r.name] = r
            described.append({"name": r.name, "describe": desc})
    return runners, described


def runner_error_models(model: Model, runners: dict, described: list) -> dict:
    """name -> error model of each runner that has one; every runner's metadata notes its
    model or why it has none."""
    from quantize.error_model import ErrorModel, describe_error_model, error_models

    models = error_models(runners, model.network.lower())
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


def calibration(model: Model, args, data_name: str):
    """Calibration inputs from the training side of the data, never the verified inputs."""
    from quantize import calibration_inputs

    source = args.calib_data or data_name
    if source.endswith(".npz") and not args.calib_data:
        raise InputError(
            "static quantization needs calibration data apart from the verified inputs: pass "
            "--calib-data TRAIN.npz (or --modes with dynamic modes only, or --quantized FILE)"
        )
    return calibration_inputs(
        source, args.data_dir, model.layout, model.input_shape, args.calib_size, args.seed
    )


def run_setting(
    st: Settings,
    cfg: dict,
    model: Model,
    inputs: Inputs,
    runners: dict,
    described: list,
    preds: dict,
    run_dir: Path,
    args,
    say,
    models: dict | None = None,
) -> dict:
    """Decide every input for one (radius, step), commit records, write the report.

    `models`: runner name -> its error model, for the runners that have one (see
    `runner_error_models`)."""
    from verifier.document import build_results, describe_data, describe_model
    from verifier.gate import Thresholds, check_gate, gate_summary, load_baseline
    from verifier.relative import aggregate
    from verifier.report import write_report
    from verifier.store import RunStore

    run_dir.mkdir(parents=True, exist_ok=True)
    store_cfg = {k: v for k, v in cfg.items()}
    store_cfg["quantized_models"] = [d["name"] for d in described]
    store_cfg["data_sha256"] = describe_data(inputs.dataset.name, inputs.dataset.source, inputs.x)[
        "sha256"
    ]
    store_cfg["model_sha256"] = model.sha256
    if (run_dir / "run.sqlite").exists():
        if not args.resume:
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it")
        store = RunStore.open(run_dir, store_cfg)
    else:
        store = RunStore.create(run_dir, store_cfg)
    with store:
        done = store.done_indices()
        todo = [i for i in range(len(inputs.y)) if int(inputs.dataset.indices[i]) not in done]
        state = WorkerState(
            st,
            model.path,
            model.layout,
            inputs.x,
            inputs.y,
            inputs.dataset.indices,
            preds,
            {d["name"]: d["describe"].get("path") for d in described},
            models or {},
        )
        progress = Progress(
            len(inputs.y),
            len(inputs.y) - len(todo),
            label=f"r={st.radius:g} step={st.step:g}",
            quiet=args.quiet or args.json,
        )
        for rec in check_inputs(state, todo, args.workers, runners, model, args.cluster):
            store.put(rec)
            progress.update(rec)
        progress.close()
        records = store.records()

    agg = aggregate(records, [d["name"] for d in described])
    thresholds = Thresholds(
        args.min_relative_robustness, args.max_transfer, args.max_unknown, args.min_accuracy
    )
    baseline = load_baseline(args.baseline) if args.baseline else None
    failures = check_gate(agg, thresholds, baseline, args.tolerance)
    gate = gate_summary(
        thresholds, failures, str(args.baseline) if args.baseline else None, args.tolerance
    )
    doc = build_results(
        {**cfg, "settings": asdict(st)},
        records,
        agg,
        model=describe_model(
            model.path,
            layout=model.layout,
            input_shape=list(model.input_shape),
            classes=model.num_classes,
            source=str(model.source) if model.source else None,
        ),
        data=describe_data(
            inputs.dataset.name, inputs.dataset.source, inputs.x, count=len(inputs.y)
        ),
        quantized=described,
        gate=gate,
    )
    examples = report_examples(st, model, inputs, runners, records, args.examples)
    paths = write_report(run_dir, doc, examples)
    say(summary_table(doc))
    for f in failures:
        print(f"gate failed: {f.message}", file=sys.stderr)
    say(f"report: {paths['html']}")
    return doc


def report_examples(
    st: Settings,
    model: Model,
    inputs: Inputs,
    runners: dict,
    records: list[InputRecord],
    count: int,
) -> list:
    """Original / perturbed image pairs for the report: robust inputs and refuted ones."""
    from verifier.plots import Example

    if count <= 0:
        return []
    pos_of = {int(i): p for p, i in enumerate(inputs.dataset.indices)}
    checker = Checker(
        st,
        model,
        model.network.lower(),
        inputs.x,
        inputs.y,
        inputs.dataset.indices,
        np.zeros(len(inputs.y), int),
    )
    robust = [r for r in records if r.float and r.float.status != REFUTED and r.correct][:count]
    refuted = [r for r in records if r.float and r.float.status == REFUTED][:count]
    out = []
    rng = np.random.default_rng(st.seed)
    for rec in robust + refuted:
        pos = pos_of[rec.index]
        region = checker.region(pos)
        if rec.float.status == REFUTED:
            coeffs = np.asarray(rec.float.coeffs)
        else:
            coeffs = random_point(region, rng)
        xp = region.points(coeffs[None]).astype(np.float32).reshape((1, *model.input_shape))
        image_shape = inputs.dataset.image_shape
        labels = {n: int(np.asarray(r.predict(xp)).argmax()) for n, r in runners.items()}
        out.append(
            Example(
                rec.index,
                from_layout(inputs.x[pos : pos + 1], model.layout, image_shape)[0],
                from_layout(xp, model.layout, image_shape)[0],
                rec.label,
                int(model.classify(xp)[0]),
                labels,
            )
        )
    return out


def random_point(region, rng: np.random.Generator) -> np.ndarray:
    """A point of the region reached by random single manipulations until the budget is spent."""
    s = np.zeros(region.num_generators, dtype=np.int64)
    for g in rng.permutation(region.num_generators):
        choices = [v for v in (region.lo[g], region.hi[g]) if v != 0]
        for v in choices[:1] if choices else []:
            trial = s.copy()
            trial[g] = v
            if region.contains(trial[None])[0]:
                s = trial
    return s


def summary(st: Settings, doc: dict) -> dict:
    """The figures a script wants: per quantized model, the sets and the two measures."""
    agg = doc["aggregates"]
    return {
        "radius": st.radius,
        "step": st.step,
        "float": agg["float"]["overall"],
        "quantized": {n: m["overall"] for n, m in agg["quantized"].items()},
        "gate": doc["gate"],
    }


def summary_table(doc: dict) -> str:
    """Per-class table: the float sets, then each quantized model's two measures."""
    agg = doc["aggregates"]
    fl = agg["float"]
    names = list(agg["quantized"])
    head = f"{'label':>5} {'L_cc':>6} {'R':>6} {'R_NOT':>6} {'unknown':>7}"
    for i, _ in enumerate(names):
        head += f" | Q{i + 1} {'RR%':>13} {'TR%':>13} {'unk':>4}"
    lines = ["", head]
    for lab in [*sorted(fl["per_label"], key=int), "all"]:
        f = fl["overall"] if lab == "all" else fl["per_label"][lab]
        row = f"{lab:>5} {f['l_cc']:>6} {f['r']:>6} {f['r_not']:>6} {f['unknown']:>7}"
        for n in names:
            q = agg["quantized"][n]
            qv = q["overall"] if lab == "all" else q["per_label"].get(lab)
            if qv is None:
                row += f" | {'':>2} {'-':>13} {'-':>13} {'-':>4}"
                continue
            rr = _range(qv["rq_fp"], qv["r_unknown"], qv["r"])
            tr = _range(qv["r0"], qv["r_not_unknown"], qv["r_not"])
            row += f" | {'':>2} {rr:>13} {tr:>13} {qv['undecided']:>4}"
        lines.append(row)
    lines.append(
        "R: certified robust on the float model; R_NOT: refuted (confirmed counterexample)"
    )
    for i, n in enumerate(names):
        lines.append(f"Q{i + 1} = {n}")
    lines.append(
        "RR = relative robustness |R_Q^FP|/|R|; TR = adversarial transfer |R^0|/|R_NOT|; "
        "unk = undecided inputs; lo..hi = the range the undecided inputs leave open"
    )
    return "\n".join(lines)


def _range(hits: int, unknown: int, total: int) -> str:
    """A percentage, or `lo..hi` when undecided inputs could still fall either way."""
    if total == 0:
        return "-"
    lo, hi = 100 * hits / total, 100 * (hits + unknown) / total
    return f"{lo:.2f}" if unknown == 0 else f"{lo:.1f}..{hi:.1f}"
