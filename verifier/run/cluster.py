"""Per-input checks on a Dask cluster: a local one of N processes, or a running scheduler.

A run opens one `Session` for all its settings (one local cluster a sweep, not one a setting).
The driver ships the run's model files once, inside a worker plugin that writes them to each
worker's own scratch directory, where every worker loads them as the run starts, so workers
need no shared filesystem, and a worker that joins or restarts later gets them too (and loads
them on its first task); a worker keeps the last `CACHED` sets of loaded runtimes by the files'
hash, for the next run. Workers run their runtimes on one thread and undo a Dask allocator
setting that made checks ~1.4x slower (`restore_mmap_threshold`); a local cluster runs with
less of Dask's background work (`QUIET_CLUSTER`). The plugin is
named after the run's client and unregistered however the session ends (SIGTERM included);
`verifier.run.janitor` removes it on the scheduler when the client vanishes. Inputs go out in chunks
sized from the measured cost per input to take about `CHUNK_SECONDS` (`ChunkPace`), with at
most two chunks per worker thread outstanding, and each chunk's records are yielded as it
completes (a callback queues finished futures, fetched together, so the driver's work per task
does not grow with the cluster). A chunk
whose worker dies is run again by the scheduler (up to its `allowed-failures`, then a one-line
error); the per-input timeout is enforced inside `decide` on the worker.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import logging
import math
import platform
import queue
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, KilledWorker, LocalCluster, get_worker
from distributed.client import FutureCancelledError
from distributed.diagnostics.plugin import WorkerPlugin

from verifier.errors import InputError
from verifier.run.batch import Batch, Loaded, Shipment, WorkerState, shipment
from verifier.run.janitor import Janitor, run_plugin_name
from verifier.run.records import InputRecord

CHUNK_SECONDS = 2.0  # target wall time of a task: its ~15 ms of driver CPU stays under 1%
MIN_CHUNK_SECONDS = 0.25  # and at least this (measured: ~15 ms of driver CPU a task)
MAX_CHUNK = 256  # inputs per task at most, so a lost task costs little
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic mmap threshold (64-bit)
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler
NO_WORKER_TIMEOUT = 120.0  # seconds a cluster may have no worker before the run gives up
POLL_SECONDS = 1.0  # how often the driver looks at the cluster while tasks are outstanding
REDELIVER_SECONDS = 0.05  # a signal swallowed by a finalizer is raised again this much later
CACHED = 2  # sets of loaded model files a worker keeps (this run's, and the one before)


@contextmanager
def dask_client(workers: int, address: str | None) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a new local cluster of `workers`
    single-threaded processes (closed on exit); an unreachable scheduler is an InputError."""
    if address is None:
        with local_cluster(workers) as local, Client(local) as client:
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot reach the Dask scheduler at {address}: {first}") from None
    with client:
        yield client


# Dask's background work, which a local cluster pays on the cores its workers need: the
# sampling profiler (2-3% of a core a worker), an event-loop watchdog tick every 20 ms in every
# scheduler, nanny and worker, the nannies' memory poll every 100 ms and a system monitor every
# 500 ms (measured idle, 2 workers: 0.14 of a core with the defaults, 0.02 with these).
QUIET_CLUSTER = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
}


def local_cluster(workers: int) -> LocalCluster:
    """A cluster of `workers` single-threaded processes on this machine (a context manager),
    with Dask's background work slowed down (`QUIET_CLUSTER`), for a dashboard nobody looks at
    here."""
    with dask.config.set(QUIET_CLUSTER):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )


@contextmanager
def session(workers: int, address: str | None) -> Iterator[Session]:
    """A run's Dask session (see `dask_client`); SIGTERM interrupts it like Ctrl-C, so every way
    out of it unregisters the run's plugins, and a signal always ends it as interrupted."""
    with quiet("distributed"), dask_client(workers, address) as client, signals_interrupt():
        with contextlib.suppress(Exception):  # a scheduler that cannot load it: no janitor
            client.register_plugin(Janitor(), name=Janitor.name)
        run = Session(client)
        try:
            yield run
        finally:
            run.close()


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only critical messages from `logger` and its children meanwhile: the run reports a
    cluster's failure itself, in one line (Dask would also log a lost scheduler)."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(f"{logger}.")]
    logs = [logging.getLogger(n) for n in [logger, *names]]  # Dask sets some children's levels
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGINT or SIGTERM meanwhile (main thread only), so `finally`
    runs; and again on the way out when a signal came but its KeyboardInterrupt was swallowed
    below (inside the Dask client's calls): a run stopped by a signal always ends as
    interrupted, never as finished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    active = threading.Event()

    def interrupt(signum, frame):
        came.append(signum)
        raise KeyboardInterrupt

    def redeliver() -> None:
        if active.is_set():
            _thread.interrupt_main(came[-1])

    def unraisable(info) -> None:
        # a signal that landed in a finalizer (a Dask future's __del__): Python prints its
        # KeyboardInterrupt as "Exception ignored" and drops it, so raise it again shortly
        if issubclass(info.exc_type, KeyboardInterrupt) and came:
            threading.Timer(REDELIVER_SECONDS, redeliver).start()
        else:
            hook(info)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    active.set()
    try:
        yield
    finally:
        active.clear()
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        raise KeyboardInterrupt


class Session:
    """A Dask client shared by every setting of a run, with the run's plugins (one per set of
    model files, registered on first use)."""

    def __init__(self, client: Client) -> None:
        self.client, self.plugins = client, {}

    def plugin(self, state: WorkerState) -> str:
        """The name of the plugin carrying the state's model files (registered once)."""
        files = shipment(state)
        key = files.key()
        if key not in self.plugins:
            name = run_plugin_name(self.client.id, key)
            self.client.register_plugin(ModelFiles(key, files), name=name)
            self.plugins[key] = name
            self.client.run(load_plugin, name)  # every worker at once; a bad file fails now
        return self.plugins[key]

    def close(self) -> None:
        """Unregister the run's plugins; a vanished cluster is no error."""
        for name in self.plugins.values():
            with contextlib.suppress(Exception):  # the scheduler or the plugin is gone already
                self.client.unregister_worker_plugin(name)
        self.plugins = {}

    def run(self, state: WorkerState, todo: list[int]) -> Iterator[list[InputRecord]]:
        """Check the input positions `todo` on the workers; yield each chunk's records as it
        completes."""
        client, todo, pending, pace = self.client, list(reversed(todo)), {}, ChunkPace()
        finished: queue.SimpleQueue = queue.SimpleQueue()  # futures, as their tasks end
        try:
            name = self.plugin(state)
            recount = time.monotonic()  # the workers are counted again at most once a poll
            while todo or pending:
                if todo and time.monotonic() >= recount:  # a round trip to the scheduler
                    slots, recount = free_slots(client), time.monotonic() + POLL_SECONDS
                while todo and len(pending) < slots:
                    size = pace.size(len(todo), slots)
                    positions = [todo.pop() for _ in range(min(size, len(todo)))]
                    fut = client.submit(check_batch, name, state.batch(positions), pure=False)
                    pending[fut] = positions
                    fut.add_done_callback(finished.put)
                done = [f for f in set(drain(finished)) if f in pending]  # a callback can repeat
                for fut, (records, seconds) in zip(
                    done, task_results(client, done, state, pending), strict=True
                ):
                    positions = pending.pop(fut)
                    pace.observe(len(positions), seconds)
                    yield records
        except (OSError, FutureCancelledError) as exc:  # the scheduler or its connection is gone
            raise InputError(
                f"the Dask cluster failed ({failure(exc)}); the records decided so far are "
                "stored: continue with --resume"
            ) from None
        finally:
            if pending:
                with contextlib.suppress(Exception):  # the cluster may be gone
                    client.cancel(list(pending))


def failure(exc: Exception) -> str:
    """What went wrong with the cluster, in a few words (one line)."""
    if isinstance(exc, FutureCancelledError):  # the scheduler cancels them all when it goes
        return f"a task was cancelled: {exc.reason}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def drain(finished: queue.SimpleQueue) -> list:
    """The futures that ended, after waiting at most POLL_SECONDS for the first."""
    try:
        out = [finished.get(timeout=POLL_SECONDS)]
    except queue.Empty:  # none ended yet: the caller looks at the cluster again
        return []
    while not finished.empty():
        out.append(finished.get())
    return out


def free_slots(client: Client) -> int:
    """Two outstanding tasks per worker thread; waits (bounded) while the cluster has none."""
    threads, start = sum(client.nthreads().values()), time.monotonic()
    while threads == 0:
        if time.monotonic() - start > NO_WORKER_TIMEOUT:
            raise InputError(
                f"the Dask cluster has had no worker for {NO_WORKER_TIMEOUT:g} s (start one with "
                f"`dask worker {client.scheduler.address}`); the records decided so far are "
                "stored: continue with --resume"
            )
        time.sleep(POLL_SECONDS)
        threads = sum(client.nthreads().values())
    return 2 * threads


def task_results(
    client: Client, done: list, state: WorkerState, pending: dict
) -> list[tuple[list[InputRecord], float]]:
    """The records and compute seconds of finished tasks, fetched in one round trip; a task
    that killed every worker it ran on is an error naming its inputs."""
    try:
        results = client.gather(done)
    except KilledWorker as exc:
        failed = next(f for f in done if f.key == exc.task)
        idx = [str(int(state.indices[p])) for p in pending[failed]]
        shown = ", ".join(idx[:5]) + (f", ... ({len(idx)} inputs)" if len(idx) > 5 else "")
        raise InputError(
            f"worker processes died on each try of inputs {shown}; the records decided so far "
            "are stored: continue with --resume"
        ) from None
    return [([InputRecord.from_dict(d) for d in dicts], seconds) for dicts, seconds in results]


class ChunkPace:
    """Chunk sizes from the measured seconds per input: about CHUNK_SECONDS a task, and never
    more than one slot's share of what is left (remaining / slots), so tasks shrink towards the
    end and no worker is left with a long last task while the others idle; but never under
    MIN_CHUNK_SECONDS, since each task costs the driver and the scheduler ~15 ms of CPU."""

    def __init__(self) -> None:
        self.inputs, self.seconds = 0, 0.0

    def observe(self, inputs: int, seconds: float) -> None:
        """Count a finished task: how many inputs it checked and in how many seconds."""
        self.inputs, self.seconds = self.inputs + inputs, self.seconds + seconds

    def size(self, remaining: int, slots: int) -> int:
        """Inputs in the next task (1 until a task has been measured)."""
        if self.inputs == 0:
            return 1
        per_input = max(self.seconds / self.inputs, 1e-6)
        target = min(MAX_CHUNK, math.ceil(CHUNK_SECONDS / per_input))
        floor = math.ceil(MIN_CHUNK_SECONDS / per_input)
        return max(1, min(target, max(floor, math.ceil(remaining / slots))))


class ModelFiles(WorkerPlugin):
    """Carries a run's model files to every worker and loads them there (`loaded`)."""

    def __init__(self, key: str, files: Shipment) -> None:
        self.key, self.files = key, files

    def setup(self, worker) -> None:
        restore_mmap_threshold()
        self.root = Path(worker.local_directory) / "relrobust"

    def load(self) -> Loaded:
        """The runtimes of the files (loaded on first use)."""
        with LOCK:
            return loaded(self.root, self.key, self.files)

    def check(self, batch: Batch) -> tuple[list[dict], float]:
        """The records (as dicts) of a batch, and the seconds its checks took."""
        with LOCK:
            checker = self.load().checker(batch)
            t0 = time.perf_counter()
            out = [checker.check(i).to_dict() for i in range(len(batch.y))]
            return out, time.perf_counter() - t0


LOCK = threading.RLock()  # one check at a time in a worker: the runtimes are not thread-safe
LOADED: OrderedDict = OrderedDict()  # in a worker: files' hash -> Loaded, the latest last


def loaded(root: Path, key: str, files: Shipment) -> Loaded:
    """The runtimes of `files` (hash `key`), written under `root` and loaded on first use; a
    worker keeps the last CACHED sets and deletes the files of older ones."""
    if key in LOADED:
        LOADED.move_to_end(key)
        return LOADED[key]
    while len(LOADED) >= CACHED:
        old, _ = LOADED.popitem(last=False)
        shutil.rmtree(root / old[:16], ignore_errors=True)
    LOADED[key] = files.load(root / key[:16])
    return LOADED[key]


def restore_mmap_threshold() -> None:
    """Let glibc keep large blocks again: Dask's nanny starts workers with
    MALLOC_TRIM_THRESHOLD_ set, which pins the mmap threshold at 128 KiB (every numpy temporary
    above it mapped and unmapped anew) and trims the task thread's heap at 64 KiB (its pages
    returned and faulted in again); measured: a check cost ~1.4x the CPU. Set both where glibc's
    own dynamic thresholds end up."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD


def load_plugin(name: str, dask_worker=None) -> None:
    """Load a run plugin's files on this worker now (run on every worker as a run starts;
    a worker that joins later loads them on its first task)."""
    dask_worker.plugins[name].load()


def check_batch(plugin: str, batch: Batch) -> tuple[list[dict], float]:
    """The task run on a worker: check a batch on the runtimes of the run's plugin."""
    return get_worker().plugins[plugin].check(batch)
