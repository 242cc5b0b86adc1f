"""The run store (commit per input, resume, refusal of a different config, kill safety) and
atomic file writes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from verifier.errors import InputError
from verifier.run.records import InputRecord, Outcome
from verifier.run.store import DB_NAME, RunStore, write_atomic

CONFIG = {"radius": 20, "step": 0.25, "data": {"name": "mnist", "count": 100}, "seed": 0}


def rec(i: int, status: str = "certified") -> InputRecord:
    return InputRecord(
        i,
        i % 10,
        i % 10,
        Outcome(status, "bounds", seconds=0.5),
        {"int8": Outcome("refuted", "attack", coeffs=[1, -2], adv_label=3)},
        {"int8": i % 10},
    )


def test_put_records_round_trip(tmp_path):
    with RunStore.create(tmp_path / "run", CONFIG) as store:
        for i in (5, 1, 3):
            store.put(rec(i))
        assert store.done_indices() == {1, 3, 5}
        assert [r.index for r in store.records()] == [1, 3, 5]
        assert store.records()[0] == rec(1)
        assert store.get(3) == rec(3) and store.get(2) is None
        assert store.config == CONFIG and len(store.config_hash) == 64
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        assert store.records() == [rec(1), rec(3), rec(5)]


def test_proofs_are_kept_apart_from_records(tmp_path):
    from verifier.engine.proof import from_text, single, to_text

    text = to_text(single("float32", 2, "bounds", 0.5))
    r = rec(7)
    r.float.detail["proof"] = text
    with RunStore.create(tmp_path / "run", CONFIG) as store:
        store.put(r)
        store.put(r)  # identical: a no-op
        assert store.proofs() == {(7, "float"): from_text(text)}
        assert "proof" not in store.get(7).float.detail
        assert r.float.detail["proof"] == text  # the caller's record is left as it was
        store.put(rec(8))
        assert list(store.proofs()) == [(7, "float")]


def test_create_refuses_an_existing_run(tmp_path):
    RunStore.create(tmp_path, CONFIG).close()
    with pytest.raises(InputError, match="--resume"):
        RunStore.create(tmp_path, CONFIG)


def test_resume_with_a_different_config_is_refused(tmp_path):
    RunStore.create(tmp_path, CONFIG).close()
    changed = {**CONFIG, "radius": 10, "data": {"name": "mnist", "count": 200}, "extra": True}
    with pytest.raises(InputError) as err:
        RunStore.open(tmp_path, changed)
    msg = str(err.value)
    assert "radius: 20 -> 10" in msg and "data.count: 100 -> 200" in msg
    assert "extra: (absent) -> true" in msg and "step" not in msg
    RunStore.open(tmp_path, {**CONFIG, "jobs": 4}, ignore=["jobs"]).close()


def test_open_without_a_run_is_refused(tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        RunStore.open(tmp_path, CONFIG)


def test_re_put_never_duplicates(tmp_path):
    with RunStore.create(tmp_path, CONFIG) as store:
        store.put(rec(7))
        store.put(rec(7))  # identical: no-op
        assert len(store) == 1
        with pytest.raises(ValueError, match="input 7 is already recorded"):
            store.put(rec(7, status="unknown"))
        assert store.get(7) == rec(7)
        store.put(rec(7, status="unknown"), replace=True)
        assert len(store) == 1 and store.get(7).float.status == "unknown"


def test_put_many_commits_a_batch_whole_or_not_at_all(tmp_path):
    with RunStore.create(tmp_path, CONFIG) as store:
        store.put_many([rec(1), rec(2), rec(3)])
        assert store.done_indices() == {1, 2, 3} and store.get(2) == rec(2)
        with pytest.raises(ValueError, match="input 2 is already recorded"):
            store.put_many([rec(4), rec(2, status="unknown"), rec(5)])
        assert store.done_indices() == {1, 2, 3}  # the failed batch left nothing behind
        store.put_many([rec(4), rec(2, status="unknown")], replace=True)
        assert store.done_indices() == {1, 2, 3, 4} and store.get(2).float.status == "unknown"


KILLED_WRITER = textwrap.dedent("""
    import sys
    from verifier.run.records import InputRecord, Outcome
    from verifier.run.store import RunStore

    store = RunStore.create(sys.argv[1], {"seed": 1})
    i = 0
    while True:
        detail = {"pad": list(range(i, i + 3000))}
        store.put(InputRecord(i, i % 10, i % 10, Outcome("certified", "bounds", detail=detail)))
        print(i, flush=True)
        i += 1
""")


def test_kill_midway_loses_no_committed_record(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    committed = -1
    deadline = time.monotonic() + 20
    while committed < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert committed >= 40, "the writer died or stalled before the kill"
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with RunStore.open(tmp_path, {"seed": 1}) as store:
        done = store.done_indices()
        assert set(range(committed + 1)) <= done  # every acknowledged commit survived
        assert done == set(range(len(done)))  # no gap, no partial extra row
        for r in store.records():  # every row is a whole record
            assert r.float.detail["pad"] == list(range(r.index, r.index + 3000))


def test_write_atomic_writes(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.json"]


def test_write_atomic_failed_rename_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_atomic(target, "new contents")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_atomic_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        """A file object that accepts a few bytes and then reports a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as err:
        write_atomic(tmp_path / "report.html", "x" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


class _DiesAfter:
    """A sqlite3 connection that is killed (KeyboardInterrupt) at its `calls`-th statement."""

    def __init__(self, conn: sqlite3.Connection, calls: int) -> None:
        self._conn, self._left = conn, calls

    def __getattr__(self, name: str):
        attr = getattr(self._conn, name)
        if name not in ("execute", "executemany", "executescript"):
            return attr

        def call(*args, **kwargs):
            if self._left == 0:
                raise KeyboardInterrupt
            self._left -= 1
            return attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("calls", range(6))
def test_run_killed_while_creating_the_store_can_start_again(tmp_path, monkeypatch, calls):
    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: _DiesAfter(real_connect(*a, **k), calls)
    )
    with contextlib.suppress(KeyboardInterrupt):
        RunStore.create(tmp_path, CONFIG).close()
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    # what `verify --resume` does: open the store if there is one, else create it
    if (tmp_path / DB_NAME).exists():
        store = RunStore.open(tmp_path, CONFIG)
    else:
        store = RunStore.create(tmp_path, CONFIG)
    with store:
        assert store.config == CONFIG and len(store) == 0
        store.put(rec(1))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_redecided_record_keeps_what_was_decided():
    """Only out-of-budget quantized outcomes on inputs of R are taken from the new decision,
    and none when the float decision did not certify the input again."""
    from verifier.run.records import out_of_budget, with_redecided

    cert, budget = Outcome("certified", "bounds"), Outcome("unknown", "budget")
    old = InputRecord(3, 1, 1, cert, {"a": budget, "b": cert, "c": Outcome("unknown", "x")})
    assert out_of_budget(old) == ["a"]
    new = InputRecord(3, 1, 1, cert, {"a": cert, "b": budget, "c": cert})
    got = with_redecided(old, new)
    assert got.quantized == {"a": cert, "b": cert, "c": old.quantized["c"]} and got.float == cert
    timed_out = InputRecord(3, 1, 1, Outcome("unknown", "budget"), {"a": cert})
    assert with_redecided(old, timed_out) is old
    assert out_of_budget(InputRecord(4, 1, 1, Outcome("refuted", "attack"), {"a": budget})) == []
