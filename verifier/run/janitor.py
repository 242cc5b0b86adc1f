"""The scheduler side of a run's worker plugin: a run's plugin is named after the Dask client
that registered it, and this scheduler plugin removes it when that client is gone, so a driver
killed outright (SIGKILL, a lost machine) leaves neither file bytes on the scheduler nor files on
the workers. Only `distributed` is imported here: the scheduler needs nothing else of relrobust.
"""

from __future__ import annotations

import asyncio
import contextlib

from distributed.diagnostics.plugin import SchedulerPlugin

PREFIX = "relrobust-run-"  # worker plugins of runs: PREFIX + client id + "-" + files' hash
NAME = "relrobust-janitor"


def run_plugin_name(client_id: str, key: str) -> str:
    """The worker plugin name of a run: its client's id and the hash of its model files."""
    return f"{PREFIX}{client_id}-{key[:16]}"


def owner(name: str) -> str:
    """The id of the client that registered run plugin `name`."""
    return name[len(PREFIX) :].rsplit("-", 1)[0]


class Janitor(SchedulerPlugin):
    """Unregisters every run plugin whose client has left: when a client leaves, and when a
    client arrives (a plugin left by a scheduler that had no janitor yet)."""

    name = NAME
    idempotent = True  # registered by every run; the first one stays

    def __init__(self) -> None:
        self.tasks: set = set()  # running removals (kept referenced until done)

    async def start(self, scheduler) -> None:
        await self.sweep(scheduler)

    def add_client(self, scheduler, client: str) -> None:
        self.later(scheduler)

    def remove_client(self, scheduler, client: str) -> None:
        self.later(scheduler)

    def later(self, scheduler) -> None:
        """Sweep soon, on the scheduler's event loop (the client hooks are synchronous)."""
        task = asyncio.ensure_future(self.sweep(scheduler))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def sweep(self, scheduler) -> None:
        """Remove the run plugins of clients no longer connected."""
        for name in [n for n in scheduler.worker_plugins if n.startswith(PREFIX)]:
            if owner(name) not in scheduler.clients:
                with contextlib.suppress(ValueError):  # removed meanwhile
                    await scheduler.unregister_worker_plugin(None, name)
