"""The main job, top-down (SPEC's data flow): configuration -> model and data -> quantized
models -> every input decided on the float model and each quantized model, committed to the
run's store -> aggregate -> report -> gate.

Records are committed to the run's SQLite store as inputs are decided, so `--resume` continues
an interrupted run without recomputing anything stored. A sweep (several radii or steps) gets
one sub-directory per setting and a Markdown table per measure at the top.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from verifier.engine.model import Model, load_model
from verifier.errors import EXIT_GATE_FAILED, EXIT_OK, InputError
from verifier.outputs.console import accuracy_table, printer, summary, summary_table
from verifier.outputs.progress import Progress
from verifier.run.check import Settings
from verifier.run.config import RunConfig, stored_options, stored_quantized_budget
from verifier.run.executor import Executor, WorkerState, executor
from verifier.run.inputs import Inputs, dataset_name, load_inputs
from verifier.run.records import InputRecord, out_of_budget, with_redecided


@dataclass(frozen=True)
class Run:
    """What every setting of a run shares: the model, its chain, the inputs, the quantized
    models and their clean predictions."""

    config: RunConfig
    out: Path
    model: Model
    chain: object  # bounds.PreparedChain of the float model
    inputs: Inputs
    data: dict  # the results' `data` section (with the inputs' hash, computed once)
    runners: dict  # name -> quantized runner
    described: list  # per runner: {"name", "describe"}
    error_models: dict  # name -> ErrorModel, for the runners that have one
    preds: dict  # "float" and each runner -> clean predictions
    executor: Executor  # where the checks run: one for every setting (one cluster a sweep)


def run(config: RunConfig) -> int:
    """Run the main job; returns the exit status."""
    from verifier.engine.bounds import prepare_chain
    from verifier.outputs.document import describe_data
    from verifier.run.quantized import quantized_runners, runner_error_models
    from verifier.run.store import check_same_model, write_atomic

    out = config.out or fresh_run_dir(Path("runs"))
    model = load_model(config.model_path, config.layout, cache_dir=out / "models")
    if config.resume:  # the same model (graph and weights), before anything is rebuilt
        check_same_model(out, model.sha256)
    chain = prepare_chain(model.network.lower())  # an unsupported operator is named now
    baseline = load_gate_baseline(config)  # an unreadable baseline fails now, not after the run
    config = replace(config, data=dataset_name(model, config.data))
    inputs = load_inputs(
        model, config.data, config.data_dir, config.indices, config.labels, config.limit
    )
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        if (out / "run.json").exists():
            raise InputError(f"{out} already holds a run; pass --resume {out} to continue it")
        write_atomic(out / "run.json", json.dumps(config.stored(), indent=2))
    say = printer(config.quiet or config.json)
    say(
        f"model: {model.source or model.path} (layout {model.layout}, input "
        f"{model.input_shape}, {model.num_classes} classes, sha256 {model.sha256[:12]})"
    )
    say(f"data:  {inputs.dataset.name} from {inputs.dataset.source}, {len(inputs.y)} inputs")

    runners, described = quantized_runners(model, config, out)
    models = runner_error_models(chain, runners, described)
    preds = {"float": model.classify(inputs.x)}  # the float model first: tag F
    for name, runner in runners.items():
        preds[name] = np.asarray(runner.predict(inputs.x)).argmax(axis=1)
    say(accuracy_table(inputs.y, preds, model.num_classes))
    data = describe_data(inputs.dataset.name, inputs.dataset.source, inputs.x, count=len(inputs.y))
    settings = config.sweep()
    sweep = len(settings) > 1
    results = []
    with executor(config.workers, config.cluster, runners, model) as ex:
        job = Run(config, out, model, chain, inputs, data, runners, described, models, preds, ex)
        for st in settings:
            run_dir = out / f"r{st.radius:g}-s{st.step:g}".replace("/", "_") if sweep else out
            try:
                doc = run_setting(job, st, run_dir, baseline, say)
            except (OSError, sqlite3.Error) as exc:  # a full disk, a read-only directory, ...
                reason = getattr(exc, "strerror", None) or str(exc)
                raise InputError(
                    f"cannot write the run's files in {run_dir}: {reason}; the inputs decided so "
                    f"far are stored: fix this and continue with `verify --resume {out}`"
                ) from None
            results.append((st, doc))
    if sweep:
        from verifier.outputs.report import write_sweep_tables

        write_sweep_tables(
            out / "sweep.md", [(st.radius, st.step, doc["aggregates"]) for st, doc in results]
        )
        say(f"sweep tables: {out / 'sweep.md'}")
    # resumed with a larger --quantized-timeout: run.json takes the run's budget now
    if stored_options(out).get("quantized_timeout") != config.quantized_timeout:
        write_atomic(out / "run.json", json.dumps(config.stored(), indent=2))
    failed = any(not doc["gate"]["passed"] for _, doc in results)
    if config.json:
        print(
            json.dumps(
                [summary(st, doc) for st, doc in results] if sweep else summary(*results[0]),
                indent=2,
            )
        )
    return EXIT_GATE_FAILED if failed else EXIT_OK


def load_gate_baseline(config: RunConfig) -> dict | None:
    """The `--baseline` run's aggregates, or None."""
    from verifier.run.gate import load_baseline

    return load_baseline(config.baseline) if config.baseline else None


def fresh_run_dir(root: Path) -> Path:
    """`root/<timestamp>`, with a suffix when two runs start in the same second."""
    base = root / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run_setting(job: Run, st: Settings, run_dir: Path, baseline: dict | None, say) -> dict:
    """Decide every input for one (radius, step), commit records, write the report."""
    records = decide_inputs(job, st, run_dir)
    doc = results_document(job, st, records, baseline)
    write_outputs(job, st, run_dir, doc, records)
    say(summary_table(doc))
    for f in doc["gate"]["failures"]:
        print(f"gate failed: {f['message']}", file=sys.stderr)
    say(f"report: {run_dir / 'report.html'}")
    return doc


def decide_inputs(job: Run, st: Settings, run_dir: Path) -> list[InputRecord]:
    """Every input's record for one setting: the stored ones, then the rest as decided."""
    from verifier.run.store import DB_NAME, RunStore

    config, inputs = job.config, job.inputs
    run_dir.mkdir(parents=True, exist_ok=True)
    store_cfg = {
        **config.stored(),
        "radius": st.radius,
        "step": st.step,
        "quantized_models": [d["name"] for d in job.described],
        "data_sha256": job.data["sha256"],
        "model_sha256": job.model.sha256,
    }
    if (run_dir / DB_NAME).exists():
        if not config.resume:
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it")
        store = RunStore.open(run_dir, store_cfg, ignore=("quantized_timeout",))
    else:
        store = RunStore.create(run_dir, store_cfg)
    with store:
        redo = budget_grown(store, st)
        done = store.done_indices() - set(redo)
        todo = [i for i in range(len(inputs.y)) if int(inputs.dataset.indices[i]) not in done]
        state = WorkerState(
            st,
            job.model.path,
            job.model.layout,
            inputs.x,
            inputs.y,
            inputs.dataset.indices,
            job.preds,
            {d["name"]: d["describe"].get("path") for d in job.described},
            job.error_models,
        )
        progress = Progress(
            len(inputs.y),
            len(inputs.y) - len(todo),
            label=f"r={st.radius:g} step={st.step:g}",
            quiet=config.quiet or config.json,
        )
        for batch in job.executor.check_batches(state, todo):
            batch = [with_redecided(redo[r.index], r) if r.index in redo else r for r in batch]
            store.put_many(batch, replace=bool(redo))
            for rec in batch:
                progress.update(rec)
        progress.close()
        if store.config.get("quantized_timeout") != store_cfg["quantized_timeout"]:
            store.set_config(store_cfg)  # every record is decided, or undecided at this budget
        return store.records()


def budget_grown(store, st: Settings) -> dict:
    """On a resume with a larger `--quantized-timeout` than the run's: the stored records whose
    quantized decisions on inputs of R ran out of budget, by input index (to decide again);
    a smaller one is refused (the run's undecided inputs were given more)."""
    before = stored_quantized_budget(store.config)
    if before is None or st.quantized_budget == before:
        return {}
    if st.quantized_budget < before:
        raise InputError(
            f"cannot resume with --quantized-timeout {st.quantized_budget:g}: the run gave its "
            f"quantized decisions {before:g} s; resume with as much or more"
        )
    return {r.index: r for r in store.records() if out_of_budget(r)}


def results_document(job: Run, st: Settings, records: list, baseline: dict | None) -> dict:
    """Aggregate the records, check the gate, and build the results document."""
    from verifier.outputs.document import build_results, describe_model
    from verifier.run.gate import check_gate, gate_summary
    from verifier.run.relative import aggregate

    config, model = job.config, job.model
    agg = aggregate(records, [d["name"] for d in job.described])
    thresholds = config.thresholds()
    failures = check_gate(agg, thresholds, baseline, config.tolerance)
    gate = gate_summary(
        thresholds, failures, str(config.baseline) if config.baseline else None, config.tolerance
    )
    cfg = {**config.stored(), "radius": st.radius, "step": st.step, "settings": asdict(st)}
    return build_results(
        cfg,
        records,
        agg,
        model=describe_model(
            model.path,
            layout=model.layout,
            input_shape=list(model.input_shape),
            classes=model.num_classes,
            source=str(model.source) if model.source else None,
        ),
        data=job.data,
        quantized=job.described,
        gate=gate,
    )


def write_outputs(job: Run, st: Settings, run_dir: Path, doc: dict, records: list) -> dict:
    """results.json, the reports, junit.xml, the perturbations and the ladders of one setting."""
    from verifier.outputs.examples import Regions, refuted_ladders, report_examples
    from verifier.outputs.report import write_report

    regions = Regions(st, job.chain, job.inputs)
    examples = report_examples(regions, job.model, job.runners, records, job.config.examples)
    ladders = refuted_ladders(regions, job.model, job.runners, records)
    return write_report(run_dir, doc, examples, ladders)
