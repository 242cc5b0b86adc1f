"""Fault injection on real runs (RELROBUST_DATA): SIGKILL at seeded random points then
`--resume`, a full disk while recording and while writing results.json (worker processes
that die: tests/test_cluster.py). After each, the resumed run must hold every input once,
keep every record committed before the fault unchanged, and end with the decisions of an
uninterrupted run.

Kill/resume cycles: 4 SIGKILLs in one run, each followed by `--resume`: 2 at seeded random
record counts, 1 at a seeded random delay after a resume starts (in its startup or mid-run),
1 once every record is committed (while the report is written). Besides: 2 full-disk faults,
each followed by a resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, decisions

from verifier.cli import main

MODEL = EXAMPLES / "mnist_mlp.onnx"
N = 20  # real MNIST test inputs
REGION = ["--region", "lattice", "--dims", "6", "--radius", "2", "--step", "0.25"]
# A generous timeout: every decision is reached by a deterministic route, never by the clock.
OPTIONS = [*REGION, "--indices", f"0:{N}", "--timeout", "120", "--quiet", "--examples", "0"]


@pytest.fixture(scope="module")
def quantized(real_data, tmp_path_factory) -> Path:
    """A quantized copy of the example model (simulated 8-bit weights: built in a blink)."""
    from quantize import quantize_model
    from verifier.engine.model import load_model

    out = tmp_path_factory.mktemp("q")
    return Path(quantize_model(load_model(MODEL), "simulated", out, None).describe()["path"])


@pytest.fixture(scope="module")
def base(real_data, quantized) -> list[str]:
    """The arguments of every run here, without --out / --resume."""
    return [str(MODEL), "--data-dir", str(real_data), "--quantized", str(quantized), *OPTIONS]


def verify(*argv) -> int:
    return main([str(a) for a in argv])


def stored(run_dir: Path) -> dict[int, str]:
    """The committed records (input index -> stored JSON text), read without the tool."""
    db = run_dir / "run.sqlite"
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        try:
            return dict(con.execute("SELECT idx, data FROM records").fetchall())
        except sqlite3.OperationalError:  # the table is not created yet
            return {}


def count(run_dir: Path) -> int:
    try:
        return len(stored(run_dir))
    except sqlite3.Error:
        return 0


def start(argv: list, log: Path) -> subprocess.Popen:
    """`verify argv` as its own process (the console script's module), output to `log`."""
    cmd = [sys.executable, "-m", "verifier.cli", *map(str, argv)]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, deadline: float = 180) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (or when it ends by itself first)."""
    end = time.time() + deadline
    while proc.poll() is None and not ready():
        assert time.time() < end, "the run made no progress"
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_survivors(run_dir: Path, before: dict[int, str]) -> dict[int, str]:
    """Every record committed before a fault is still there, unchanged; no results.json half."""
    now = stored(run_dir)
    assert {i: now.get(i) for i in before} == before, "a committed record was lost or rewritten"
    results = run_dir / "results.json"
    if results.exists():  # written atomically: complete and valid, never a partial file
        json.loads(results.read_text())
    assert not list(run_dir.glob(".results.json.*")), "a temporary results file was left"
    return now


def test_sigkill_at_random_points_then_resume(base, reference, tmp_path):
    rng = np.random.default_rng(2024)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    counts = sorted(int(c) for c in rng.choice(np.arange(1, N - 1), 2, replace=False))
    delay = float(rng.uniform(0.5, 3.0))
    seen: dict[int, str] = {}
    for cycle, k in enumerate(counts):  # 2 kills at seeded record counts
        argv = [*base, "--out", out] if cycle == 0 else ["--resume", out]
        kill_when(start(argv, log), lambda k=k: count(out) >= k)
        seen = check_survivors(out, seen)
        assert len(seen) >= k or (out / "results.json").exists()
    t0 = time.time()  # a kill at a seeded delay after a resume starts (startup or mid-run)
    kill_when(start(["--resume", out], log), lambda: time.time() - t0 >= delay)
    seen = check_survivors(out, seen)
    kill_when(start(["--resume", out], log), lambda: count(out) >= N)  # during the report
    seen = check_survivors(out, seen)
    assert verify("--resume", out) == 0, log.read_text()
    check_survivors(out, seen)
    assert decisions(out) == reference
    assert "Traceback" not in log.read_text()


def test_full_disk_while_recording_and_writing_results(
    base, reference, tmp_path, monkeypatch, capsys
):
    from verifier.run.store import RunStore

    out = tmp_path / "run"
    real_put, puts = RunStore.put_many, []

    def put_until_full(self, records, replace=False):
        if len(puts) == 7:
            raise sqlite3.OperationalError("database or disk is full")
        puts.extend(r.index for r in records)
        return real_put(self, records, replace)

    monkeypatch.setattr(RunStore, "put_many", put_until_full)
    assert verify(*base, "--out", out) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and f"--resume {out}" in err and "Traceback" not in err
    assert sorted(stored(out)) == sorted(puts) and len(puts) == 7
    assert not (out / "results.json").exists()
    monkeypatch.setattr(RunStore, "put_many", real_put)

    real_fsync = os.fsync

    def fsync_full_for_results(fd: int) -> None:  # the disk fills up while results.json is written
        if "results.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full_for_results)
    before = stored(out)
    assert verify("--resume", out) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"--resume {out}" in err and "Traceback" not in err
    assert not (out / "results.json").exists() and not list(out.glob(".results.json.*"))
    after = check_survivors(out, before)
    assert sorted(after) == list(range(N))  # every input was decided and stored

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert verify("--resume", out) == 0
    assert decisions(out) == reference
