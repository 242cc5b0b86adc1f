"""Per-input checks on a Dask cluster: a local one of N processes, or a running scheduler.

The driver ships the run's model files once, inside a worker plugin that writes them to each
worker's own scratch directory and loads them on its first task, so workers need no shared
filesystem and a worker that joins or restarts later gets them too. Inputs go out in chunks
sized from the measured cost per input to take about `CHUNK_SECONDS`, with at most two chunks
per worker thread outstanding, and each chunk's records are yielded as it completes (a callback
queues finished futures, so the driver's work per task does not grow with the cluster). A chunk
whose worker dies is run again by the scheduler (up to its `allowed-failures`, then a one-line
error); the per-input timeout is enforced inside `decide` on the worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distributed import Client, KilledWorker, LocalCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from verifier.errors import InputError
from verifier.run.batch import Batch, Loaded, Shipment, WorkerState, shipment
from verifier.run.records import InputRecord

CHUNK_SECONDS = 2.0  # target wall time of a task: a task's ~2 ms overhead stays near 0.1%
MAX_CHUNK = 256  # inputs per task at most, so a lost task costs little
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler
NO_WORKER_TIMEOUT = 120.0  # seconds a cluster may have no worker before the run gives up
POLL_SECONDS = 1.0  # how often the driver looks at the cluster while tasks are outstanding


@contextmanager
def dask_client(workers: int, address: str | None) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a new local cluster of `workers`
    single-threaded processes (closed on exit); an unreachable scheduler is an InputError."""
    if address is None:
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as local,
            Client(local) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot reach the Dask scheduler at {address}: {first}") from None
    with client:
        yield client


def run_on_cluster(
    client: Client, state: WorkerState, todo: list[int]
) -> Iterator[list[InputRecord]]:
    """Check the input positions `todo` on the client's workers; yield each chunk's records as
    it completes."""
    name = f"relrobust-{uuid.uuid4().hex[:12]}"
    client.register_plugin(ModelFiles(name, shipment(state)), name=name)
    todo, pending, pace = list(reversed(todo)), {}, ChunkPace()
    finished: queue.SimpleQueue = queue.SimpleQueue()  # futures, as their tasks end
    try:
        while todo or pending:
            slots = free_slots(client)
            while todo and len(pending) < slots:
                size = pace.size(len(todo), slots)
                positions = [todo.pop() for _ in range(min(size, len(todo)))]
                fut = client.submit(check_batch, name, state.batch(positions), pure=False)
                pending[fut] = positions
                fut.add_done_callback(finished.put)
            for fut in drain(finished):
                positions = pending.pop(fut, None)
                if positions is None:  # already taken (a callback can repeat)
                    continue
                records, seconds = task_result(fut, state, positions)
                pace.observe(len(positions), seconds)
                yield records
    except OSError as exc:  # the scheduler or its connection went away (CommClosedError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the Dask cluster failed ({type(exc).__name__}: {first}); the records decided so "
            "far are stored: continue with --resume"
        ) from None
    finally:
        if pending:
            with contextlib.suppress(Exception):  # the cluster may be gone
                client.cancel(list(pending))
        unregister(client, name)


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


def task_result(fut, state: WorkerState, positions: list[int]) -> tuple[list[InputRecord], float]:
    """The records of a finished task; a task that killed every worker it ran on is an error."""
    try:
        dicts, seconds = fut.result()
    except KilledWorker:
        idx = [str(int(state.indices[p])) for p in positions]
        shown = ", ".join(idx[:5]) + (f", ... ({len(idx)} inputs)" if len(idx) > 5 else "")
        raise InputError(
            f"worker processes died on each try of inputs {shown}; the records decided so far "
            "are stored: continue with --resume"
        ) from None
    return [InputRecord.from_dict(d) for d in dicts], seconds


def unregister(client: Client, name: str) -> None:
    """Remove the run's plugin and its files from every worker; a vanished cluster is no error."""
    with contextlib.suppress(Exception):  # the scheduler or the plugin is gone already
        client.unregister_worker_plugin(name)


class ChunkPace:
    """Chunk sizes from the measured seconds per input: about CHUNK_SECONDS a task, but small
    enough near the end that every worker slot still gets work."""

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
        return max(1, min(target, math.ceil(remaining / slots)))


class ModelFiles(WorkerPlugin):
    """Carries a run's model files to every worker: written to the worker's scratch directory
    and loaded on its first task, removed on teardown."""

    def __init__(self, name: str, files: Shipment) -> None:
        self.name, self.files = name, files

    def setup(self, worker) -> None:
        self.root = Path(worker.local_directory) / self.name
        self.lock = threading.Lock()  # one check at a time: the runtimes are not thread-safe
        self.loaded: Loaded | None = None

    def teardown(self, worker) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def check(self, batch: Batch) -> tuple[list[dict], float]:
        """The records (as dicts) of a batch, and the seconds its checks took."""
        with self.lock:
            if self.loaded is None:
                self.loaded = self.files.load(self.root)
            checker = self.loaded.checker(batch)
            t0 = time.perf_counter()
            out = [checker.check(i).to_dict() for i in range(len(batch.y))]
            return out, time.perf_counter() - t0


def check_batch(plugin: str, batch: Batch) -> tuple[list[dict], float]:
    """The task run on a worker: check a batch on the runtimes of the run's plugin."""
    return get_worker().plugins[plugin].check(batch)
