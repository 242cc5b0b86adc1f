"""Where the per-input checks run: in this process (`--workers 1`), or on Dask, one parallel
path for both a local cluster of N processes (`--workers N`) and a running scheduler
(`--cluster tcp://HOST:PORT`); see `verifier.run.cluster`.

A run opens one `Executor` for all its settings: on Dask, one session (one local cluster, the
model files shipped and loaded once per worker) serves every setting of a sweep. It is started
on first need, so a run whose settings need at most one input each starts no cluster.
`Checker.check` depends only on the input (its seed is the dataset index), so every route
yields the same records; they arrive in completion order, in batches (one input in this
process, a chunk on Dask) that the caller stores at once, each batch in one transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

from verifier.engine.bounds import prepare_chain
from verifier.run.batch import Loaded, WorkerState
from verifier.run.records import InputRecord

__all__ = ["Executor", "WorkerState", "check_batches", "executor"]


class Executor:
    """The place a run's checks go: this process, or a Dask session opened on first use and
    kept for the run's other settings (closed with the `executor` context)."""

    def __init__(
        self, workers: int, cluster: str | None, runners: dict, model, stack: contextlib.ExitStack
    ) -> None:
        self.workers, self.cluster, self.runners, self.model = workers, cluster, runners, model
        self.stack, self.session = stack, None

    def check_batches(self, state: WorkerState, todo: list[int]) -> Iterator[list[InputRecord]]:
        """Yield the records of the input positions in `todo`, batch by batch as they finish:
        in this process (one record a batch) when `workers` is 1, else on `workers` local
        processes or on `cluster` (a chunk's records a batch)."""
        if not todo:
            return
        if self.session is None and self.cluster is None and (self.workers <= 1 or len(todo) == 1):
            chain = prepare_chain(self.model.network.lower())
            loaded = Loaded(self.model, chain, self.runners, state.error_models)
            checker = loaded.checker(state.batch(list(range(len(state.y)))))
            for pos in todo:
                yield [checker.check(pos)]
            return
        if self.session is None:
            from verifier.run.cluster import session  # Dask only when it is used

            self.session = self.stack.enter_context(session(self.workers, self.cluster))
        yield from self.session.run(state, todo)


@contextmanager
def executor(workers: int, cluster: str | None, runners: dict, model) -> Iterator[Executor]:
    """A run's executor; on exit its Dask session (if one was opened) is closed."""
    with contextlib.ExitStack() as stack:
        yield Executor(workers, cluster, runners, model, stack)


def check_batches(
    state: WorkerState,
    todo: list[int],
    workers: int,
    runners: dict,
    model,
    cluster: str | None = None,
) -> Iterator[list[InputRecord]]:
    """The records of one setting's inputs `todo`, on an executor of their own."""
    with executor(workers, cluster, runners, model) as ex:
        yield from ex.check_batches(state, todo)
