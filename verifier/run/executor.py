"""Where the per-input checks run: in this process (`--workers 1`), or on Dask, one parallel
path for both a local cluster of N processes (`--workers N`) and a running scheduler
(`--cluster tcp://HOST:PORT`); see `verifier.run.cluster`.

`Checker.check` depends only on the input (its seed is the dataset index), so every route
yields the same records; they arrive in completion order, in batches (one input in this
process, a chunk on Dask) that the caller stores at once, each batch in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

from verifier.engine.bounds import prepare_chain
from verifier.run.batch import Loaded, WorkerState
from verifier.run.records import InputRecord

__all__ = ["WorkerState", "check_batches"]


def check_batches(
    state: WorkerState,
    todo: list[int],
    workers: int,
    runners: dict,
    model,
    cluster: str | None = None,
) -> Iterator[list[InputRecord]]:
    """Yield the records of the input positions in `todo`, batch by batch as they finish: in
    this process (reusing `model` and `runners`; one record a batch) when `workers` is 1, else
    on `workers` local processes or on `cluster` (a chunk's records a batch)."""
    if not todo:
        return
    if cluster is None and (workers <= 1 or len(todo) == 1):  # no cluster for one input
        chain = prepare_chain(model.network.lower())
        loaded = Loaded(model, chain, runners, state.error_models)
        checker = loaded.checker(state.batch(list(range(len(state.y)))))
        for pos in todo:
            yield [checker.check(pos)]
        return
    from verifier.run.cluster import dask_client, run_on_cluster  # Dask only when it is used

    with dask_client(workers, cluster) as client:
        yield from run_on_cluster(client, state, todo)
