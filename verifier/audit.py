"""`verify audit RUN`: re-check a finished run's claims on the real runtimes.

For a seeded sample of the run's inputs: clean predictions are re-run; every stored
counterexample is rebuilt from its generator coefficients (the region rebuilt exactly as the
run built it) and must be misclassified by its runtime with the stored label; every transfer
claim (the float counterexample replayed on a quantized model) must give the stored label; and
every certified region of at most `--max-points` points is enumerated in full on the runtime
it was certified for, where every point must keep the label. Larger regions are counted as not
enumerable, never failed. Every certified outcome's kept proof (the cover of sub-boxes that
proved it, in the run store) is re-checked leaf by leaf by `verifier.run.proofcheck`: counted as
checked, failed, or not checkable (no proof kept, or leaves too large to re-close here).
The answer is printed and written to RUN/audit.json; exit status 0
when every check held, 1 when one failed, 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from verifier.engine.model_files import model_sha256, sha256_file
from verifier.engine.points import labels_at
from verifier.engine.proof import FOLD
from verifier.engine.regions import Region
from verifier.engine.result import CERTIFIED, REFUTED
from verifier.errors import EXIT_GATE_FAILED, EXIT_OK, InputError
from verifier.run.check import Settings, build_region
from verifier.run.records import FLOAT, InputRecord, Outcome

DEFAULT_SAMPLE = 1000  # inputs audited when --sample is not given (all of a smaller run)
DEFAULT_MAX_POINTS = 200_000
BATCH = 8192  # region points per runtime call
AUDIT_VERSION = 1


@dataclass
class Failure:
    """One claim of the run that the runtime contradicts."""

    index: int
    model: str
    check: str  # "prediction", "counterexample", "transfer", "certified", "perturbations"
    message: str
    coeffs: list[int] | None = None  # the contradicting point, when there is one


@dataclass
class Tally:
    """How many claims of each kind were checked (and how many regions were too large)."""

    inputs: int = 0
    predictions: int = 0
    counterexamples: int = 0
    transfers: int = 0
    certified: int = 0
    points: int = 0
    not_enumerable: list[dict] = field(default_factory=list)


@dataclass
class ProofTally:
    """Kept proofs re-checked, by verdict, and their leaves by route."""

    checked: int = 0
    failed: int = 0
    not_checkable: int = 0
    leaves: dict = field(default_factory=dict)  # route -> leaves re-closed
    points: int = 0  # enumerated on the runtimes for leaves
    seconds: float = 0.0
    bytes: list = field(default_factory=list)  # size of each proof re-checked
    not_checked: list[dict] = field(default_factory=list)  # index, model, reason


@dataclass
class RunContext:
    """What re-checking one run needs: its document, settings, runtimes and inputs."""

    run_dir: Path
    doc: dict
    settings: Settings
    model: object  # verifier.engine.model.Model, the float model on onnxruntime
    chain: list
    runtimes: dict  # model name -> runtime ("float" first)
    x: dict  # input index -> x in the model's layout
    proofs: dict = field(default_factory=dict)  # (index, model) -> kept proof bytes
    error_models: dict = field(default_factory=dict)  # quantized name -> ErrorModel or None


# --- finding and loading a run ---------------------------------------------------------------


def run_dirs(path: Path) -> tuple[list[Path], list[Path]]:
    """The finished run directories under `path` (itself, or the sub-directories of a sweep),
    and the sweep's unfinished ones (a store but no results.json)."""
    if not path.is_dir():
        raise InputError(f"{path}: no such run directory")
    if (path / "results.json").is_file():
        return [path], []
    subs = sorted(d for d in path.iterdir() if d.is_dir())
    done = [d for d in subs if (d / "results.json").is_file()]
    if done:
        return done, [d for d in subs if (d / "run.sqlite").is_file() and d not in done]
    if (path / "run.json").is_file():
        raise InputError(
            f"{path}: the run is not finished (no results.json): complete it with "
            f"`verify --resume {path}` first"
        )
    raise InputError(f"{path} is not a run directory (no results.json, no run.json)")


def read_results(run_dir: Path) -> dict:
    """results.json of a run, checked against the results schema."""
    from verifier.outputs.document import validate_results

    try:
        doc = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{run_dir / 'results.json'} is unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{run_dir / 'results.json'} is not a results document")
    validate_results(doc)
    return doc


def locate(stored: str, run_dir: Path, sha256: str | None, what: str) -> Path:
    """A file the run used, by its stored path (relative paths: from here or a parent of the
    run); refused when missing or when it differs from the run's (`sha256`: `model_sha256`)."""
    p = Path(stored)
    cands = [p] if p.is_absolute() else [p, *(a / p for a in run_dir.resolve().parents)]
    found = [c for c in cands if c.is_file()]
    if not found:
        raise InputError(
            f"{what} {stored} of the run {run_dir} is not found (relative paths are looked up "
            "from here and the run's parent directories: audit from where the run was started)"
        )
    for c in found:
        if sha256 is None or model_sha256(c) == sha256:
            return c
    raise InputError(f"{what} {found[0]} changed since the run {run_dir} (sha256 differs)")


def load_context(run_dir: Path) -> RunContext:
    """Rebuild what the run used: settings, float model, quantized runtimes, selected inputs."""
    from quantize import load_quantized
    from verifier.engine.data import load_dataset, select, to_layout
    from verifier.engine.model import load_model
    from verifier.outputs.document import inputs_sha256

    doc = read_results(run_dir)
    cfg = doc["config"]
    try:
        settings = Settings(**cfg["settings"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"{run_dir}: results.json holds no usable settings ({exc})") from None
    m = doc["model"]
    model = load_model(locate(m["path"], run_dir, m.get("sha256"), "model"), m.get("layout"))
    runtimes: dict = {FLOAT: model}
    for q in doc["quantized"]:
        desc = q.get("describe", {})
        if not desc.get("path"):
            raise InputError(f"{run_dir}: quantized model {q['name']} has no stored path")
        path = locate(desc["path"], run_dir, desc.get("sha256"), "quantized model")
        runtimes[q["name"]] = load_quantized(path, model.layout)
    ds = load_dataset(cfg["data"], "test", cfg.get("data_dir"))
    ds = select(ds, cfg.get("indices"), cfg.get("labels"), cfg.get("limit"))
    x = to_layout(ds.images, model.layout, model.input_shape)
    if inputs_sha256(x) != doc["data"]["sha256"]:
        raise InputError(
            f"the inputs of {run_dir} ({cfg['data']}) differ from the ones the run verified "
            "(data sha256 differs): point --data-dir / RELROBUST_DATA at the run's data"
        )
    xs = {int(i): x[p] for p, i in enumerate(ds.indices)}
    ctx = RunContext(run_dir, doc, settings, model, model.network.lower(), runtimes, xs)
    ctx.proofs = stored_proofs(run_dir)
    return ctx


def stored_proofs(run_dir: Path) -> dict:
    """The kept proofs of the run's store, keyed by (input index, model name)."""
    import sqlite3

    from verifier.run.store import DB_NAME, RunStore

    if not (run_dir / DB_NAME).is_file():
        return {}
    try:
        with RunStore.open(run_dir) as store:
            return store.proofs()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{run_dir / DB_NAME} is unreadable: {exc}") from None


# --- the checks ------------------------------------------------------------------------------


def check_point(
    runtime, region: Region, rec: InputRecord, name: str, o: Outcome, out: list[Failure]
) -> None:
    """A stored counterexample: a region point the runtime misclassifies as `o.adv_label`."""
    s = np.asarray(o.coeffs, dtype=np.int64)
    if s.shape != (region.num_generators,) or not region.contains(s[None])[0]:
        out.append(
            Failure(rec.index, name, "counterexample", "not a point of the region", o.coeffs)
        )
        return
    got = int(labels_at(runtime, region, s)[0])
    if got == rec.label:
        msg = f"the runtime classifies it correctly ({got}): not a counterexample"
        out.append(Failure(rec.index, name, "counterexample", msg, o.coeffs))
    elif o.adv_label is not None and got != o.adv_label:
        msg = f"the runtime says {got}, the run stored {o.adv_label}"
        out.append(Failure(rec.index, name, "counterexample", msg, o.coeffs))


def check_transfer(
    runtime, region: Region, rec: InputRecord, name: str, o: Outcome, out: list[Failure]
) -> None:
    """A transfer claim: the float counterexample gives `o.transfer_label` on this runtime."""
    coeffs = rec.float.coeffs if rec.float else None
    if coeffs is None:
        msg = "a transfer claim without a float counterexample"
        out.append(Failure(rec.index, name, "transfer", msg))
        return
    got = int(labels_at(runtime, region, np.asarray(coeffs))[0])
    fooled = got != rec.label
    if got != o.transfer_label or (o.transfer is not None and o.transfer != fooled):
        msg = (
            f"the float counterexample gives {got} on this runtime; the run stored "
            f"{o.transfer_label} (transfer={o.transfer})"
        )
        out.append(Failure(rec.index, name, "transfer", msg, list(coeffs)))


def check_certified(
    runtime, region: Region, rec: InputRecord, name: str, max_points: int, tally: Tally
) -> Failure | None:
    """A certified region: enumerated in full on the runtime, every point keeps the label."""

    size = region.count(max_points)
    if size > max_points:
        tally.not_enumerable.append({"index": rec.index, "model": name})
        return None
    bad, first, points = 0, None, 0
    for s in region.enumerate(BATCH):
        wrong = np.flatnonzero(labels_at(runtime, region, s) != rec.label)
        points += len(s)
        if len(wrong) and first is None:
            first = [int(v) for v in s[wrong[0]]]
        bad += len(wrong)
    tally.certified += 1
    tally.points += points
    if bad:
        msg = f"certified, but {bad} of its {points} points are misclassified"
        return Failure(rec.index, name, "certified", msg, first)
    return None


def proof_spec(ctx: RunContext, region: Region, label: int, name: str, kind: str):
    """The spec a proof's bounds leaves speak of, rebuilt for this audit; None when there is
    none (no bounds, a kind that does not fit the model, or an error model that does not hold
    over the region): bounds leaves then fail."""
    from verifier.engine.bounds import prepare_chain, spec_chain
    from verifier.engine.quantized_spec import quantized_spec

    if kind == "float32" and name == FLOAT:
        return spec_chain(prepare_chain(ctx.chain), region, label, float32=True)
    if kind != "error-model" or name == FLOAT:
        return None
    if name not in ctx.error_models:
        from quantize.error_model import error_model
        from verifier.errors import UnsupportedModelError

        try:
            ctx.error_models[name] = error_model(ctx.runtimes[name], ctx.chain)
        except UnsupportedModelError:
            ctx.error_models[name] = None
    em = ctx.error_models[name]
    if em is None:
        return None
    try:
        return quantized_spec(em, region, label).spec
    except ValueError:  # the rounding has no bound over the region: its bounds say nothing
        return None


def fold_spec(ctx: RunContext, region: Region, label: int, name: str):
    """For a proof with `fold` nodes: the spec of the input fold's sub-region holding a box,
    rebuilt for this audit (`quantized_spec.fold_parts`); None when the model has no fold."""
    from verifier.engine.quantized_spec import fold_part_of, fold_parts

    em = ctx.error_models.get(name)
    parts = fold_parts(em, region, label) if em is not None else None
    if parts is None:
        return None

    def spec_of(lo, hi):
        qs = fold_part_of(parts, lo, hi)
        return None if qs is None else qs.spec

    return spec_of


def check_kept_proof(
    ctx: RunContext, region: Region, rec: InputRecord, name: str, max_points: int, tally
) -> Failure | None:
    """A certified outcome's kept proof, re-checked leaf by leaf (`verifier.run.proofcheck`)."""
    from verifier.engine.quantized_spec import decision_thresholds, input_levels
    from verifier.run import proofcheck as pc

    start = time.perf_counter()
    data = ctx.proofs.get((rec.index, name))
    if data is None:
        verdict = pc.Verdict(pc.NOT_CHECKABLE, "no proof kept")
    else:
        tally.bytes.append(len(data))
        proof = pc.read(data)
        if isinstance(proof, pc.Verdict):
            verdict = proof
        else:
            spec = proof_spec(ctx, region, rec.label, name, proof.spec)
            runtime = ctx.runtimes[name]
            problem = pc.Problem(region, rec.label, runtime, spec, ctx.chain, max_points)
            if spec is not None and any(n.kind == FOLD for n in proof.nodes):
                problem = replace(problem, fold=fold_spec(ctx, region, rec.label, name))
            if spec is not None and proof.spec == "error-model":
                em = ctx.error_models.get(name)
                if em is not None:  # the runtime's label on a tie: what each margin must exceed
                    threshold = decision_thresholds(em, spec)
                    problem = replace(problem, levels=input_levels(em), threshold=threshold)
            verdict = pc.check_tree(proof, problem)
    tally.seconds += time.perf_counter() - start
    tally.points += verdict.points
    for kind, n in verdict.leaves.items():
        tally.leaves[kind] = tally.leaves.get(kind, 0) + n
    if verdict.status == pc.CHECKED:
        tally.checked += 1
        return None
    if verdict.status == pc.FAILED:
        tally.failed += 1
        return Failure(rec.index, name, "proof", verdict.message)
    tally.not_checkable += 1
    tally.not_checked.append({"index": rec.index, "model": name, "reason": verdict.message})
    return None


def audit_record(
    ctx: RunContext, rec: InputRecord, max_points: int, tally: Tally, proofs: ProofTally
) -> list:
    """Every claim of one input's record, re-checked; returns the failures."""
    out: list[Failure] = []
    tally.inputs += 1
    if rec.float is None:
        return out
    region = build_region(ctx.settings, ctx.x[rec.index], ctx.chain, rec.label, rec.index)
    outcomes = [(FLOAT, rec.float), *rec.quantized.items()]
    for name, o in outcomes:
        runtime = ctx.runtimes.get(name)
        if runtime is None:
            out.append(Failure(rec.index, name, "counterexample", "a model the run did not list"))
            continue
        if o.status == REFUTED and o.coeffs is not None:
            tally.counterexamples += 1
            check_point(runtime, region, rec, name, o, out)
        if name != FLOAT and o.transfer_label is not None:
            tally.transfers += 1
            check_transfer(runtime, region, rec, name, o, out)
        if o.status == CERTIFIED:
            fail = check_certified(runtime, region, rec, name, max_points, tally)
            if fail is not None:
                out.append(fail)
            fail = check_kept_proof(ctx, region, rec, name, max_points, proofs)
            if fail is not None:
                out.append(fail)
    return out


def check_predictions(ctx: RunContext, recs: list[InputRecord], tally: Tally) -> list:
    """The clean predictions the sets are built on (L_cc / L_ic), re-run on every runtime."""
    out: list[Failure] = []
    x = np.stack([ctx.x[r.index] for r in recs])
    for name, runtime in ctx.runtimes.items():
        got = np.asarray(runtime.predict(x)).argmax(axis=1)
        for r, g in zip(recs, got, strict=True):
            stored = r.pred if name == FLOAT else r.quantized_pred.get(name)
            if stored is None:
                continue
            tally.predictions += 1
            if int(g) != stored:
                msg = f"clean prediction {int(g)}, the run stored {stored}"
                out.append(Failure(r.index, name, "prediction", msg))
    return out


def check_perturbations(ctx: RunContext, recs: list[InputRecord]) -> list:
    """perturbations.npz (the compact form) holds the same coefficients as results.json."""
    from verifier.outputs.perturbations import read_perturbations

    path = ctx.run_dir / "perturbations.npz"
    if not path.is_file():
        return []
    try:
        stored = read_perturbations(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path} is unreadable: {exc}") from None
    out: list[Failure] = []
    for r in recs:
        for name, o in [(FLOAT, r.float), *r.quantized.items()]:
            want = None if o is None or o.coeffs is None else list(o.coeffs)
            got = stored.get((r.index, name))
            if (None if got is None else [int(v) for v in got]) != want:
                msg = "perturbations.npz and results.json disagree on its coefficients"
                out.append(Failure(r.index, name, "perturbations", msg))
    return out


def sample(recs: list[InputRecord], size: int | None, seed: int) -> list[InputRecord]:
    """A seeded random sample of the records (all of them when there are at most `size`)."""
    size = DEFAULT_SAMPLE if size is None else size
    if size >= len(recs):
        return list(recs)
    pick = np.sort(np.random.default_rng(seed).choice(len(recs), size, replace=False))
    return [recs[int(i)] for i in pick]


def audit_run(run_dir: Path, size: int | None, seed: int, max_points: int, say) -> dict:
    """Audit one run directory; returns the audit document (also written to audit.json)."""
    from verifier.run.store import write_atomic

    start = time.perf_counter()
    ctx = load_context(run_dir)
    records = [InputRecord.from_dict(r) for r in ctx.doc["records"]]
    chosen = sample(records, size, seed)
    tally, proofs = Tally(), ProofTally()
    failures = check_predictions(ctx, chosen, tally) if chosen else []
    failures += check_perturbations(ctx, chosen)
    for rec in chosen:
        failures += audit_record(ctx, rec, max_points, tally, proofs)
    doc = {
        "audit_version": AUDIT_VERSION,
        "run": str(run_dir),
        "results_sha256": sha256_file(run_dir / "results.json"),
        "sample": {
            "seed": seed,
            "requested": size,
            "inputs": len(chosen),
            "of": len(records),
            "indices": [r.index for r in chosen],
        },
        "max_points": max_points,
        "checked": {k: v for k, v in asdict(tally).items() if k != "not_enumerable"},
        "not_enumerable": tally.not_enumerable,
        "proofs": proof_summary(proofs),
        "failures": [asdict(f) for f in failures],
        "passed": not failures,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_atomic(run_dir / "audit.json", json.dumps(doc, indent=1) + "\n")
    say(describe(doc))
    return doc


def proof_summary(p: ProofTally) -> dict:
    """The proofs section of audit.json: verdict counts, leaves, sizes and time."""
    sizes = sorted(p.bytes)
    return {
        "checked": p.checked,
        "failed": p.failed,
        "not_checkable": p.not_checkable,
        "leaves": dict(sorted(p.leaves.items())),
        "points": p.points,
        "bytes_median": int(np.median(sizes)) if sizes else 0,
        "bytes_max": sizes[-1] if sizes else 0,
        "seconds": round(p.seconds, 3),
        "not_checked": p.not_checked,
    }


def describe(doc: dict) -> str:
    """The audit of one run as a few lines a person reads."""
    c, s = doc["checked"], doc["sample"]
    lines = [
        f"audit of {doc['run']}: {s['inputs']} of {s['of']} inputs (seed {s['seed']})",
        f"  clean predictions re-run: {c['predictions']}",
        f"  counterexamples re-run:   {c['counterexamples']}",
        f"  transfer claims replayed: {c['transfers']}",
        f"  certified regions enumerated in full: {c['certified']} ({c['points']:,} points)",
        f"  certified regions not enumerable (over {doc['max_points']:,} points): "
        f"{len(doc['not_enumerable'])}",
    ]
    p = doc.get("proofs")
    if p is not None:
        leaves = ", ".join(f"{v} {k}" for k, v in p["leaves"].items()) or "none"
        lines.append(
            f"  kept proofs re-checked: {p['checked']} checked, {p['failed']} failed, "
            f"{p['not_checkable']} not checkable (leaves re-closed: {leaves})"
        )
    for f in doc["failures"]:
        at = "" if f["coeffs"] is None else f" at coefficients {f['coeffs']}"
        lines.append(f"  FAILED input {f['index']}, {f['model']}, {f['check']}: {f['message']}{at}")
    lines.append("  all checks hold" if doc["passed"] else f"  {len(doc['failures'])} failed")
    lines.append(f"  written: {Path(doc['run']) / 'audit.json'}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The argument parser of `verify audit`."""
    p = argparse.ArgumentParser(
        prog="verify audit",
        description="Re-check a finished run on the real runtimes: counterexamples re-run, "
        "transfer claims replayed, small certified regions enumerated in full, the kept proof "
        "of every certification re-checked leaf by leaf. Exit status 0 "
        "when every check holds, 1 when one fails, 2 on a usage or input error.",
    )
    p.add_argument("run", type=Path, help="run directory (a sweep root: each sub-directory)")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help=f"inputs to audit, drawn at random (default: all, at most {DEFAULT_SAMPLE})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument(
        "--max-points",
        type=int,
        default=DEFAULT_MAX_POINTS,
        help="certified regions with at most this many points are enumerated in full",
    )
    p.add_argument("--quiet", action="store_true", help="print failures only")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `verify audit`; returns the exit status."""
    args = parser().parse_args(argv)
    if args.sample is not None and args.sample <= 0:
        raise InputError("--sample must be positive")
    if args.max_points <= 0:
        raise InputError("--max-points must be positive")

    def say(text: str) -> None:
        lines = [t for t in text.splitlines() if not args.quiet or "FAILED" in t]
        if lines:
            print("\n".join(lines), flush=True)

    done, unfinished = run_dirs(args.run)
    for d in unfinished:
        print(f"note: {d} is not finished (no results.json): not audited")
    docs = [audit_run(d, args.sample, args.seed, args.max_points, say) for d in done]
    return EXIT_OK if all(d["passed"] for d in docs) else EXIT_GATE_FAILED
