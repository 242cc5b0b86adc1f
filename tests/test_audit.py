"""`verify audit RUN`: a finished run's claims re-checked on the real runtimes. A clean run
passes; every kind of tampered claim fails (exit 1) naming the input, model and check; bad
usage is exit 2 with no audit.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES
from onnx_builders import mlp

from verifier.cli import main

SETTING = "r2-s0.25"  # the sub-directory of the sweep most tests audit


def verify(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished sweep (radius 1.5 and 2) of a tiny model on inputs it classifies correctly,
    with a simulated 8-bit quantized copy built by the run itself."""
    from verifier.engine.model import load_model

    root = tmp_path_factory.mktemp("audit")
    model = mlp(root / "m.onnx", sizes=(16, 12, 4), seed=5)
    x = np.random.default_rng(7).random((24, 4, 4)).astype(np.float32)
    y = load_model(model).classify(x.reshape(24, 16))
    np.savez(root / "d.npz", x=x, y=y)
    argv = [model, "--data", root / "d.npz", "--region", "lattice", "--dims", "6"]
    argv += ["--radius", "1.5,2", "--step", "0.25", "--modes", "simulated", "--quiet"]
    assert verify(*argv, "--examples", "0", "--out", root / "sweep") == 0
    return root / "sweep"


def outcomes(doc: dict):
    """(record, model name, outcome) for every outcome of a results document."""
    for r in doc["records"]:
        if r["float"]:
            yield r, "float", r["float"]
        for name, o in r["quantized"].items():
            yield r, name, o


@pytest.fixture(scope="module")
def run(sweep) -> Path:
    """One setting of the sweep; it holds refuted inputs, transfers and certified regions."""
    path = sweep / SETTING
    doc = json.loads((path / "results.json").read_text())
    statuses = {(name == "float", o["status"]) for _, name, o in outcomes(doc)}
    assert {(True, "refuted"), (True, "certified"), (False, "certified")} <= statuses
    assert any(o.get("transfer") for _, _, o in outcomes(doc))
    return path


def audit(capsys, *argv) -> tuple[int, str, str]:
    code = verify("audit", *argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_run_passes_and_counts_every_claim(run, capsys):
    code, out, _ = audit(capsys, run)
    assert code == 0, out
    doc = json.loads((run / "audit.json").read_text())
    results = json.loads((run / "results.json").read_text())
    every = list(outcomes(results))
    c = doc["checked"]
    assert doc["passed"] and doc["failures"] == [] and doc["not_enumerable"] == []
    assert c["inputs"] == doc["sample"]["inputs"] == len(results["records"]) == 24
    assert c["predictions"] == 24 * 2  # the float model and the quantized copy
    assert c["counterexamples"] == sum(o["status"] == "refuted" for _, _, o in every)
    assert c["transfers"] == sum(o["transfer_label"] is not None for _, _, o in every)
    assert c["certified"] == sum(o["status"] == "certified" for _, _, o in every)
    assert c["points"] >= c["certified"]
    assert (
        "all checks hold" in out
        and f"certified regions enumerated in full: {c['certified']}" in out
    )


def test_sweep_root_audits_every_setting(sweep, capsys):
    code, out, _ = audit(capsys, sweep, "--quiet")
    assert code == 0 and out == ""
    for sub in ("r1.5-s0.25", SETTING):
        assert json.loads((sweep / sub / "audit.json").read_text())["passed"]


def test_unfinished_setting_of_a_sweep_is_named(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "r1.5-s0.25" / "results.json").unlink()
    for old in copy.rglob("audit.json"):
        old.unlink()
    code, out, _ = audit(capsys, copy, "--quiet")
    assert code == 0 and "r1.5-s0.25 is not finished (no results.json): not audited" in out
    assert (copy / SETTING / "audit.json").is_file()
    assert not (copy / "r1.5-s0.25" / "audit.json").exists()


def test_sample_is_seeded(run, capsys):
    def picked(*argv) -> list[int]:
        assert audit(capsys, run, *argv)[0] == 0
        return json.loads((run / "audit.json").read_text())["sample"]["indices"]

    first = picked("--sample", "5", "--seed", "1")
    assert len(first) == 5 and first == sorted(first)
    assert picked("--sample", "5", "--seed", "1") == first
    assert picked("--sample", "5", "--seed", "2") != first
    assert len(picked("--sample", "99")) == 24


def test_large_regions_are_counted_not_failed(run, capsys):
    code, out, _ = audit(capsys, run, "--max-points", "1")
    doc = json.loads((run / "audit.json").read_text())
    results = json.loads((run / "results.json").read_text())
    certified = sum(o["status"] == "certified" for _, _, o in outcomes(results))
    assert code == 0 and doc["passed"]
    assert len(doc["not_enumerable"]) + doc["checked"]["certified"] == certified
    assert len(doc["not_enumerable"]) > 0 and "not enumerable (over 1 points)" in out


# --- tampered claims: each must fail -------------------------------------------------------------


def first(doc: dict, want: Callable[[dict, str, dict], bool]) -> tuple[dict, str, dict]:
    return next((r, n, o) for r, n, o in outcomes(doc) if want(r, n, o))


def refuted_float(doc):
    return first(doc, lambda r, n, o: n == "float" and o["status"] == "refuted")


def counterexample_is_the_input(doc) -> tuple[int, str]:
    r, n, o = refuted_float(doc)
    o["coeffs"] = [0] * len(o["coeffs"])
    return r["index"], "counterexample"


def counterexample_outside_region(doc) -> tuple[int, str]:
    r, n, o = refuted_float(doc)
    o["coeffs"][0] = 99
    return r["index"], "counterexample"


def wrong_adversarial_label(doc) -> tuple[int, str]:
    r, n, o = refuted_float(doc)
    o["adv_label"] = next(k for k in range(4) if k not in (r["label"], o["adv_label"]))
    return r["index"], "counterexample"


def wrong_transfer_label(doc) -> tuple[int, str]:
    r, n, o = first(doc, lambda r, n, o: n != "float" and o["transfer_label"] is not None)
    o["transfer_label"] = (o["transfer_label"] + 1) % 4
    return r["index"], "transfer"


def float_certified_but_refuted(doc) -> tuple[int, str]:
    r, n, o = refuted_float(doc)
    o.update(status="certified", route="bounds", coeffs=None, adv_label=None)
    return r["index"], "certified"


def quantized_certified_but_fooled(doc) -> tuple[int, str]:
    r, n, o = first(doc, lambda r, n, o: n != "float" and o.get("transfer") is True)
    o.update(status="certified", route="enumeration", coeffs=None, adv_label=None)
    o.update(transfer=None, transfer_label=None)
    return r["index"], "certified"


def wrong_clean_prediction(doc) -> tuple[int, str]:
    r = doc["records"][0]
    r["pred"] = (r["pred"] + 1) % 4
    return r["index"], "prediction"


def perturbations_disagree(doc) -> tuple[int, str]:
    r, n, o = refuted_float(doc)
    o["coeffs"] = o["coeffs"][::-1]  # may or may not still be a counterexample: the npz differs
    return r["index"], "perturbations"


TAMPERS = [
    counterexample_is_the_input,
    counterexample_outside_region,
    wrong_adversarial_label,
    wrong_transfer_label,
    float_certified_but_refuted,
    quantized_certified_but_fooled,
    wrong_clean_prediction,
    perturbations_disagree,
]


def copy_run(run: Path, dest: Path, change: Callable[[dict], object]) -> tuple[Path, object]:
    """A copy of the run whose results.json went through `change` (which returns its answer)."""
    shutil.copytree(run, dest)
    doc = json.loads((dest / "results.json").read_text())
    answer = change(doc)
    (dest / "results.json").write_text(json.dumps(doc))
    return dest, answer


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampered_claim_fails(run, tmp_path, capsys, tamper):
    copy, (index, check) = copy_run(run, tmp_path / "run", tamper)
    code, out, _ = audit(capsys, copy)
    doc = json.loads((copy / "audit.json").read_text())
    assert code == 1 and not doc["passed"]
    assert any(f["index"] == index and f["check"] == check for f in doc["failures"]), doc
    assert f"FAILED input {index}" in out


# --- kept proofs --------------------------------------------------------------------------------


def test_every_certification_keeps_a_proof_that_rechecks(run, capsys):
    code, out, _ = audit(capsys, run)
    doc = json.loads((run / "audit.json").read_text())
    results = json.loads((run / "results.json").read_text())
    certified = sum(o["status"] == "certified" for _, _, o in outcomes(results))
    # every float certification keeps a proof that re-checks; quantized models decided from
    # the float model's leaves (verifier.engine.diffdecide) keep none yet: not checkable, never
    # failed
    floats = sum(o["status"] == "certified" for _, name, o in outcomes(results) if name == "float")
    p = doc["proofs"]
    assert code == 0 and floats > 0
    assert p["failed"] == 0 and p["checked"] + p["not_checkable"] == certified
    assert p["checked"] >= floats
    assert sum(p["leaves"].values()) >= p["checked"] and 0 < p["bytes_median"] <= p["bytes_max"]
    assert f"kept proofs re-checked: {p['checked']} checked, 0 failed" in out
    assert '"proof":' not in (run / "results.json").read_text()  # kept in the store only


def edit_proofs(run: Path, dest: Path, change: Callable[[dict], object]) -> tuple[Path, object]:
    """A copy of the run whose kept proofs (index, model) -> Proof went through `change`."""
    import sqlite3

    from verifier.engine.proof import decode, encode

    shutil.copytree(run, dest)
    conn = sqlite3.connect(dest / "run.sqlite")
    rows = conn.execute("SELECT idx, model, data FROM proofs").fetchall()
    proofs = {(i, m): decode(d) for i, m, d in rows}
    answer = change(proofs)
    conn.execute("DELETE FROM proofs")
    conn.executemany(
        "INSERT INTO proofs VALUES (?, ?, ?)", [(i, m, encode(p)) for (i, m), p in proofs.items()]
    )
    conn.commit()
    conn.close()
    return dest, answer


def drop_last_leaf(proofs: dict):
    key = max(proofs, key=lambda k: len(proofs[k].nodes))
    proofs[key] = replace(proofs[key], nodes=proofs[key].nodes[:-1])
    return key


def alter_evidence(proofs: dict):
    """A bounds leaf's margin made negative, or an enumeration leaf's count off by one."""
    from verifier.engine.proof import Node

    for key, p in proofs.items():
        for i, n in enumerate(p.nodes):
            if n.kind in ("bounds", "enumeration"):
                value = -1.0 if n.kind == "bounds" else n.values[0] + 1
                nodes = list(p.nodes)
                nodes[i] = Node(n.kind, (value,))
                proofs[key] = replace(p, nodes=tuple(nodes))
                return key
    raise AssertionError("no bounds or enumeration leaf")


@pytest.mark.parametrize("tamper", [drop_last_leaf, alter_evidence])
def test_tampered_proof_fails(run, tmp_path, capsys, tamper):
    copy, (index, model) = edit_proofs(run, tmp_path / "run", tamper)
    code, out, _ = audit(capsys, copy)
    doc = json.loads((copy / "audit.json").read_text())
    assert code == 1 and doc["proofs"]["failed"] == 1
    assert [(f["index"], f["model"], f["check"]) for f in doc["failures"]] == [
        (index, model, "proof")
    ]
    assert f"FAILED input {index}, {model}, proof" in out


def test_missing_proof_is_not_checkable(run, tmp_path, capsys):
    def drop(proofs: dict):
        key = next(iter(proofs))
        del proofs[key]
        return key

    copy, (index, model) = edit_proofs(run, tmp_path / "run", drop)
    code, out, _ = audit(capsys, copy)
    p = json.loads((copy / "audit.json").read_text())["proofs"]
    assert code == 0 and p["not_checkable"] == 1 and p["failed"] == 0
    assert p["not_checked"] == [{"index": index, "model": model, "reason": "no proof kept"}]


# --- usage and input errors: exit 2, no audit.json ----------------------------------------------


def no_records(doc):
    del doc["records"]


def other_model_hash(doc):
    doc["model"]["sha256"] = "0" * 64


def other_data_hash(doc):
    doc["data"]["sha256"] = "0" * 64


@pytest.mark.parametrize(
    "change, message",
    [
        (no_records, "do not match schema"),
        (other_model_hash, "changed since the run"),
        (other_data_hash, "differ from the ones the run verified"),
    ],
    ids=["schema", "model-changed", "data-changed"],
)
def test_unusable_results_exit_2(run, tmp_path, capsys, change, message):
    copy, _ = copy_run(run, tmp_path / "run", change)
    (copy / "audit.json").unlink()
    code, _, err = audit(capsys, copy)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (copy / "audit.json").exists()


def test_usage_errors_exit_2(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    shutil.copy(run.parent / "run.json", tmp_path / "unfinished" / "run.json")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "results.json").write_text('{"schema_version": ')
    cases = [
        ([tmp_path / "nope"], "no such run directory"),
        ([tmp_path / "empty"], "not a run directory"),
        ([tmp_path / "unfinished"], "not finished"),
        ([tmp_path / "corrupt"], "unreadable"),
        ([run, "--sample", "0"], "--sample must be positive"),
        ([run, "--max-points", "-5"], "--max-points must be positive"),
        ([run, "--frobnicate"], "unrecognized arguments"),
    ]
    for argv, message in cases:
        code, _, err = audit(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.rglob("audit.json"))


def test_real_mnist_run(real_data, tmp_path, capsys):
    """The example model on real MNIST inputs with a quantized copy: the audit holds."""
    from quantize import quantize_model
    from verifier.engine.model import load_model

    model = EXAMPLES / "mnist_mlp.onnx"
    q = quantize_model(load_model(model), "simulated", tmp_path / "q", None).describe()["path"]
    out = tmp_path / "run"
    argv = [model, "--data-dir", real_data, "--quantized", q, "--region", "lattice"]
    argv += ["--dims", "6", "--radius", "2", "--step", "0.25", "--indices", "0:6"]
    assert verify(*argv, "--quiet", "--examples", "0", "--out", out) == 0
    code, out_text, _ = audit(capsys, out)
    doc = json.loads((out / "audit.json").read_text())
    assert code == 0 and doc["passed"], out_text
    assert doc["checked"]["certified"] > 0 and doc["checked"]["predictions"] == 12
    p = doc["proofs"]
    assert p["checked"] == doc["checked"]["certified"] and p["failed"] == 0


@pytest.mark.parametrize(("mode", "name"), [("dynamic", "tflite-dynamic"), ("int8", "tflite-int8")])
def test_quantized_proofs_on_an_error_model_recheck(tmp_path, capsys, mode, name):
    """TFLite dynamic-range and int8 copies (they have error models; int8's spec folds its
    input grid and caps the margins by the logit clamp's bound): their certifications keep
    proofs on the error model, which the audit re-checks with the model it rebuilds."""
    import sqlite3

    from verifier.engine.model import load_model
    from verifier.engine.proof import decode

    model = mlp(tmp_path / "m.onnx", sizes=(16, 80, 40, 4), seed=3)
    x = np.random.default_rng(0).random((8, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=load_model(model).classify(x.reshape(8, 16)))
    argv = [model, "--data", tmp_path / "d.npz", "--region", "lattice", "--dims", "3"]
    argv += ["--radius", "0.75", "--step", "0.125", "--enum-limit", "16", "--modes", mode]
    argv += ["--quantized-enum-limit", "16"]
    if mode == "int8":  # static quantization: calibration data of its own
        c = np.random.default_rng(1).random((64, 4, 4)).astype(np.float32)
        np.savez(tmp_path / "c.npz", x=c, y=np.zeros(64, dtype=np.int64))
        argv += ["--calib-data", tmp_path / "c.npz", "--calib-size", "64"]
    assert verify(*argv, "--quiet", "--examples", "0", "--out", tmp_path / "run") == 0
    with sqlite3.connect(tmp_path / "run" / "run.sqlite") as conn:
        specs = {(m, decode(d).spec) for m, d in conn.execute("SELECT model, data FROM proofs")}
    assert ("float", "float32") in specs and (name, "error-model") in specs
    code, out, _ = audit(capsys, tmp_path / "run")
    p = json.loads((tmp_path / "run" / "audit.json").read_text())["proofs"]
    # certifications by the differential route keep no proof yet: not checkable, never failed
    assert code == 0 and p["failed"] == 0 and p["checked"] >= 2, out
    assert p["leaves"].get("bounds", 0) >= 2
