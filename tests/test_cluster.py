"""Runs on a Dask cluster (real MNIST inputs, RELROBUST_DATA): the records equal an in-process
run's whatever fails on the way. One 2-process `LocalCluster` is shared by the tests; its
workers start in an empty directory, so nothing they check can come from a model file path.

Faults: a worker killed mid-run (the scheduler reruns its task), a task that kills every worker
it runs on (a one-line error), the driver killed (then `--resume`), the scheduler killed (a
spawned `dask scheduler`: one-line error, then `--resume`), an unreachable scheduler (exit 2).
Workers are killed by a test-only worker plugin (`KillOnStart`). However the driver ends
(normally, on an error, SIGINT, SIGTERM, SIGKILL), its worker plugin leaves the scheduler and
the workers; a stale one from another driver changes nothing."""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, decisions
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from test_faults import check_survivors, count, kill_when, start, stored

import verifier.run.cluster
from verifier.cli import main

MODEL = EXAMPLES / "mnist_mlp.onnx"
N = 12  # real MNIST test inputs
OPTIONS = [
    *["--region", "lattice", "--dims", "6", "--radius", "2", "--step", "0.25"],
    *["--indices", f"0:{N}", "--timeout", "120", "--quiet", "--examples", "0"],
]


def verify(*argv) -> int:
    return main([str(a) for a in argv])


class KillOnStart(WorkerPlugin):
    """Test only: the worker process dies (os._exit) as a check task starts on it, `times`
    times in all (counted by marker files, which survive the worker)."""

    def __init__(self, marker_dir: Path, times: int) -> None:
        self.marker_dir, self.times = marker_dir, times

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith("check_batch"):
            return
        deaths = len(list(self.marker_dir.iterdir()))
        if deaths < self.times:
            (self.marker_dir / f"death-{deaths}").write_text(str(key))
            os._exit(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-process local cluster whose workers run in an empty directory."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    cwd = Path.cwd()
    os.chdir(elsewhere)
    try:
        local = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    finally:
        os.chdir(cwd)
    with local, Client(local) as client:
        assert set(client.run(os.getcwd).values()) == {str(elsewhere)}
        yield local, client


@pytest.fixture(scope="module")
def quantized(real_data, tmp_path_factory) -> Path:
    """A quantized copy of the example model (simulated 8-bit weights: built in a blink)."""
    from quantize import quantize_model
    from verifier.engine.model import load_model

    out = tmp_path_factory.mktemp("q")
    return Path(quantize_model(load_model(MODEL), "simulated", out, None).describe()["path"])


@pytest.fixture(scope="module")
def base(real_data, quantized) -> list:
    return [MODEL, "--data-dir", real_data, "--quantized", quantized, *OPTIONS]


def run_plugins(cluster) -> list[str]:
    """The names of run plugins on the scheduler and on each worker."""
    local, client = cluster
    names = [n for n in local.scheduler.worker_plugins if n.startswith("relrobust-run-")]
    on_workers = client.run(
        lambda dask_worker: [n for n in dask_worker.plugins if n.startswith("relrobust-run-")]
    )
    return sorted(names + [n for found in on_workers.values() for n in found])


def wait_no_run_plugins(cluster, seconds: float = 30.0) -> None:
    """Every run plugin leaves (the janitor removes a dead driver's a moment after it dies)."""
    end = time.time() + seconds
    while run_plugins(cluster) and time.time() < end:
        time.sleep(0.2)
    assert run_plugins(cluster) == []


def test_cluster_records_equal_in_process_run(base, reference, cluster, tmp_path):
    """Also: a stale plugin of a dead driver (bytes that load nothing) changes nothing and is
    swept away; the run leaves no plugin behind."""
    from verifier.run.batch import Shipment
    from verifier.run.janitor import run_plugin_name

    local, client = cluster
    junk = Shipment({"float/m.onnx": b"not a model"}, "float/m.onnx", "flat", {}, {})
    stale = run_plugin_name("Client-of-a-killed-driver", junk.key())
    client.register_plugin(verifier.run.cluster.ModelFiles(junk.key(), junk), name=stale)
    assert stale in run_plugins(cluster)
    out = tmp_path / "run"
    assert verify(*base, "--out", out, "--cluster", local.scheduler_address) == 0
    assert decisions(out) == reference
    wait_no_run_plugins(cluster)


@pytest.fixture
def no_janitor(monkeypatch):
    """The janitor (on the scheduler, which runs in this process) sweeps nothing meanwhile: what
    leaves, the driver removed itself."""
    from verifier.run.janitor import Janitor

    async def idle(self, scheduler) -> None:
        return None

    monkeypatch.setattr(Janitor, "sweep", idle)


def test_run_error_leaves_no_plugin(base, cluster, no_janitor, tmp_path, monkeypatch, capsys):
    import sqlite3

    from verifier.run.store import RunStore

    def full(self, records, replace=False):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(RunStore, "put_many", full)
    out = tmp_path / "run"
    assert verify(*base, "--out", out, "--cluster", cluster[0].scheduler_address) == 2
    assert "disk is full" in capsys.readouterr().err
    assert run_plugins(cluster) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_driver_stopped_by_signal_leaves_no_plugin(base, cluster, no_janitor, tmp_path, sig):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # 400 inputs: the signal must land mid-run, and N of these small regions may all be
    # decided in the moment between the second stored record and the signal
    argv = [*base, "--indices", "0:400", "--out", out, "--cluster", cluster[0].scheduler_address]
    proc = start(argv, log)
    end = time.time() + 180
    while proc.poll() is None and count(out) < 2:
        assert time.time() < end, "the run made no progress"
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130, log.read_text()
    text = log.read_text()
    assert "interrupted; decided inputs are stored" in text and "Traceback" not in text
    assert run_plugins(cluster) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_swallowed_below_still_interrupts(sig):
    """A signal whose KeyboardInterrupt code below the session catches (as Dask's client calls
    may) still ends the session as interrupted, on the way out."""
    import os

    from verifier.run.cluster import signals_interrupt

    with pytest.raises(KeyboardInterrupt), signals_interrupt():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed
    with signals_interrupt():  # no signal: nothing raised
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_a_finalizer_interrupts_soon_and_prints_nothing(sig, capfd):
    """A signal landing in a `__del__` (a Dask future's, as it did mid-run) is not printed as
    an ignored exception with a traceback, and still interrupts the session promptly."""
    from verifier.run.cluster import signals_interrupt

    class Finalized:
        def __del__(self):
            signal.raise_signal(sig)  # its handler runs here, inside the finalizer

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), signals_interrupt():
        Finalized()  # collected at once
        while time.monotonic() - start < 5:
            time.sleep(0.01)
    assert time.monotonic() - start < 2, "the swallowed signal was not raised again"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_worker_killed_mid_run_then_same_records(base, reference, cluster, tmp_path):
    local, client = cluster
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    client.register_plugin(KillOnStart(deaths, 1), name="kill-once")
    try:
        out = tmp_path / "run"
        assert verify(*base, "--out", out, "--cluster", local.scheduler_address) == 0
    finally:
        client.unregister_worker_plugin("kill-once")
    assert len(list(deaths.iterdir())) == 1, "no worker was killed"
    assert decisions(out) == reference
    client.wait_for_workers(2, timeout=120)


def test_task_that_kills_every_worker_is_one_line_error():
    from distributed import KilledWorker

    from verifier.errors import InputError
    from verifier.run.batch import WorkerState
    from verifier.run.cluster import task_results

    class Future:
        def __init__(self, key):
            self.key = key

    class Client:  # the scheduler gave up on the second task
        def gather(self, futures):
            raise KilledWorker("check_batch-2", "tcp://127.0.0.1:1", 2)

    state = WorkerState(None, Path("m.onnx"), "flat", None, None, np.arange(10, 20), {}, {}, {})
    done = [Future("check_batch-1"), Future("check_batch-2")]
    pending = {done[0]: [0, 1], done[1]: [2, 5]}
    with pytest.raises(InputError, match=r"died on each try of inputs 12, 15; .*--resume"):
        task_results(Client(), done, state, pending)


def test_driver_killed_then_resume_same_records(base, reference, cluster, tmp_path):
    addr = cluster[0].scheduler_address
    out, log = tmp_path / "run", tmp_path / "log.txt"
    kill_when(start([*base, "--out", out, "--cluster", addr], log), lambda: count(out) >= 4)
    before = check_survivors(out, {})
    assert 0 < len(before) < N, "the kill came before any record or after the last one"
    wait_no_run_plugins(cluster)  # the janitor's work: the driver had no chance to
    assert verify("--resume", out, "--cluster", addr) == 0, log.read_text()
    check_survivors(out, before)
    assert decisions(out) == reference
    assert "Traceback" not in log.read_text()


def test_worker_without_the_model_files(real_data, quantized, cluster, tmp_path, monkeypatch):
    """The driver's model files vanish once read: workers (another cwd) check from the
    shipped bytes and give the records of the in-process route."""
    from quantize import load_quantized
    from verifier.engine.data import load_dataset, select, to_layout
    from verifier.engine.model import load_model
    from verifier.run.batch import WorkerState
    from verifier.run.check import Settings
    from verifier.run.executor import check_batches

    local, _ = cluster
    src = tmp_path / "models"
    src.mkdir()
    shutil.copy(MODEL, src / "m.onnx")
    qfile = Path("q" + quantized.suffix)
    shutil.copy(quantized, src / qfile)
    model, runner = load_model(src / "m.onnx"), load_quantized(src / qfile)
    ds = select(load_dataset("mnist", "test", real_data), f"0:{N}", None, None)
    x = to_layout(ds.images, model.layout, model.input_shape)
    state = WorkerState(
        Settings(2.0, 0.25, "lattice", 6, timeout=120.0),
        Path("m.onnx"),  # relative to the driver's directory only
        model.layout,
        x,
        ds.labels,
        ds.indices,
        {"float": model.classify(x), runner.name: runner.predict(x).argmax(axis=1)},
        {runner.name: qfile},  # paths relative to the driver's directory only
        {},
    )
    monkeypatch.chdir(src)
    runners = {runner.name: runner}
    want = [r.to_dict() for b in check_batches(state, list(range(N)), 1, runners, model) for r in b]
    real_shipment = verifier.run.cluster.shipment

    def ship_then_hide(st):
        shipped = real_shipment(st)
        src.rename(tmp_path / "hidden")
        return shipped

    monkeypatch.setattr(verifier.run.cluster, "shipment", ship_then_hide)
    got = check_batches(state, list(range(N)), 1, runners, model, local.scheduler_address)
    got = sorted((r.to_dict() for b in got for r in b), key=lambda r: r["index"])
    assert not src.exists()

    def strip(o):
        return None if o is None else {k: v for k, v in o.items() if k not in ("seconds", "detail")}

    def decided(recs):
        return [
            {**r, "float": strip(r["float"]), "quantized": {k: strip(v) for k, v in q.items()}}
            for r, q in ((r, r["quantized"]) for r in recs)
        ]

    assert any(r["quantized"] for r in want), "no quantized decisions to compare"
    assert decided(got) == decided(want)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_killed_mid_run_then_resume(base, reference, tmp_path):
    """A `dask scheduler` process killed mid-run: the driver exits 2 with one line, keeps every
    finished record, and `--resume` (in this process) completes the same records."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    dask = [sys.executable, "-m", "dask"]
    with open(tmp_path / "dask.txt", "ab") as f:
        scheduler = subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
        worker = subprocess.Popen(
            [*dask, "worker", addr, "--nthreads", "1", "--no-dashboard"],
            cwd=elsewhere,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        out, log = tmp_path / "run", tmp_path / "log.txt"
        driver = start([*base, "--out", out, "--cluster", addr], log)
        kill_when(scheduler, lambda: count(out) >= 2 or driver.poll() is not None)
        assert driver.wait(timeout=120) == 2, log.read_text()
        lines = log.read_text().strip().splitlines()
        assert len(lines) == 1 and "the Dask cluster failed" in lines[0], lines
        assert "--resume" in lines[0]
        before = check_survivors(out, {})
        assert 0 < len(before) < N, "the kill came before any record or after the last one"
        assert verify("--resume", out) == 0
        check_survivors(out, before)
        assert decisions(out) == reference
    finally:
        for proc in (worker, scheduler):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_sweep_starts_one_local_cluster(base, reference, tmp_path, monkeypatch):
    """`--workers 2` over two steps: one local cluster for both settings, the records of each
    equal to an in-process run's."""
    started, real = [], verifier.run.cluster.local_cluster

    def counted(workers):
        started.append(workers)
        return real(workers)

    monkeypatch.setattr(verifier.run.cluster, "local_cluster", counted)
    argv = list(base)
    argv[argv.index("--step") + 1] = "0.25,0.5"
    out, half = tmp_path / "sweep", tmp_path / "half"
    assert verify(*argv, "--out", out, "--workers", "2") == 0
    assert started == [2]
    argv[argv.index("--step") + 1] = "0.5"
    assert verify(*argv, "--out", half) == 0  # in this process
    assert decisions(out / "r2-s0.25") == reference
    assert decisions(out / "r2-s0.5") == decisions(half)


def test_local_cluster_runs_with_little_background_work():
    """No profiler; watchdog ticks and memory polls once a second (Dask: 20 ms, 100 ms)."""

    def periods(server) -> dict:
        return {k: v.callback_time for k, v in server.periodic_callbacks.items()}

    with verifier.run.cluster.local_cluster(1) as local, Client(local) as client:
        (worker,) = client.run(lambda dask_worker: periods(dask_worker)).values()
        (nanny,) = [periods(n) for n in local.workers.values()]
        scheduler = periods(local.scheduler)
    assert "profile" not in worker
    assert worker["tick"] == nanny["tick"] == scheduler["tick"] == 1000
    assert nanny["memory_monitor"] == 1000
    assert worker["monitor"] == scheduler["monitor"] == 5000


def test_worker_keeps_loaded_runtimes_by_file_hash(tmp_path, monkeypatch):
    from collections import OrderedDict

    from verifier.run.cluster import loaded

    loads = []

    class Files:  # a Shipment's stand-in that counts its loads
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def load(self, root: Path) -> object:
            root.mkdir(parents=True)
            loads.append(self.tag)
            return object()

    monkeypatch.setattr(verifier.run.cluster, "LOADED", OrderedDict())
    monkeypatch.setattr(verifier.run.cluster, "CACHED", 2)
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    first = loaded(tmp_path, a, Files("a"))
    assert loaded(tmp_path, a, Files("a")) is first  # another plugin, the same files
    loaded(tmp_path, b, Files("b"))
    assert loaded(tmp_path, a, Files("a")) is first
    loaded(tmp_path, c, Files("c"))  # evicts b, the least recently used
    assert loads == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [a[:16], c[:16]]


def test_shipment_key_is_the_files_content(tmp_path):
    from verifier.run.batch import Shipment

    one = Shipment(
        {"float/m.onnx": b"abc", "q0/q.tflite": b"def"},
        "float/m.onnx",
        "flat",
        {"q": "q0/q.tflite"},
        {},
    )
    same = Shipment(
        dict(reversed(one.files.items())), "float/m.onnx", "flat", {"q": "q0/q.tflite"}, {}
    )
    assert one.key() == same.key()
    for other in (
        Shipment({**one.files, "q0/q.tflite": b"deg"}, one.model, one.layout, one.runners, {}),
        Shipment(one.files, one.model, "nhwc", one.runners, {}),
        Shipment(one.files, one.model, one.layout, {"q2": "q0/q.tflite"}, {}),
    ):
        assert other.key() != one.key()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_worker_takes_large_blocks_from_the_heap_again():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_, which keeps glibc mapping every
    block over 128 KiB anew; after `restore_mmap_threshold` a 1 MiB block comes from the heap."""
    code = (
        "import ctypes\n"
        "from verifier.run.cluster import restore_mmap_threshold\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd "
        "usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mallinfo2.restype = Info\n"
        "def mapped():\n"
        "    before = libc.mallinfo2().hblks\n"
        "    block = bytearray(1 << 20)\n"
        "    blocks = libc.mallinfo2().hblks - before\n"
        "    del block\n"
        "    return blocks\n"
        "print(mapped(), mapped(), end=' ')\n"
        "restore_mmap_threshold()\n"
        "print(mapped(), mapped())\n"
    )
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.split() == ["1", "1", "0", "0"], run.stderr


def test_unreachable_scheduler_is_exit_2(base, tmp_path, monkeypatch, capsys):

    monkeypatch.setattr(verifier.run.cluster, "CONNECT_TIMEOUT", 1.0)
    port = free_port()  # nobody listens on it
    out = tmp_path / "run"
    assert verify(*base, "--out", out, "--cluster", f"tcp://127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stored(out) == {}


def test_chunks_grow_to_the_target_and_shrink_at_the_end():
    from verifier.run.cluster import CHUNK_SECONDS, MAX_CHUNK, MIN_CHUNK_SECONDS, ChunkPace

    pace = ChunkPace()
    assert pace.size(1000, 4) == 1  # nothing measured yet
    pace.observe(4, 0.4)  # 0.1 s an input
    assert pace.size(1000, 4) == round(CHUNK_SECONDS / 0.1)
    assert pace.size(60, 4) == 60 // 4  # a slot's share of what is left
    assert pace.size(8, 4) == math.ceil(MIN_CHUNK_SECONDS / 0.1)  # but never a too short task
    pace.observe(1, 10.0)  # now about 2 s an input
    assert pace.size(3, 4) == 1  # the last inputs spread over every slot
    pace.observe(10**6, 1.0)  # very cheap inputs
    assert pace.size(10**7, 4) == MAX_CHUNK


def test_shipment_carries_external_data_files(tmp_path):
    """A model whose weights live in external files (in a sub-folder) is shipped with them and
    loads from the shipped copy alone, giving the same logits."""
    from onnx_builders import mlp, with_external_data

    from verifier.engine.model import load_model
    from verifier.run.batch import WorkerState, shipment
    from verifier.run.config import Settings

    src = tmp_path / "src"
    src.mkdir()
    path = with_external_data(mlp(src / "m.onnx"), location="weights/{name}.bin", split=True)
    assert sorted(p.name for p in (src / "weights").iterdir()) == ["m.onnx.bin.0", "m.onnx.bin.1"]
    model = load_model(path)
    x = np.random.default_rng(0).uniform(0, 1, (5, *model.input_shape)).astype(np.float32)
    state = WorkerState(Settings(), path, model.layout, x, None, None, {}, {}, {})
    shipped = shipment(state)
    assert sorted(shipped.files) == [
        "float/m.onnx",
        "float/weights/m.onnx.bin.0",
        "float/weights/m.onnx.bin.1",
    ]
    shutil.rmtree(src)
    loaded = shipped.load(tmp_path / "worker")
    assert np.array_equal(loaded.model.predict(x), model.predict(x))
