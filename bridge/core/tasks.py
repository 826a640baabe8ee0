"""Background tasks: one helper that keeps a reference and logs failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("passerelle.tasks")

# The tasks of one unit of work (held under a lease): every task spawned from inside it, at
# any depth, joins it, so that losing the lease stops them all. Unset: no unit.
SCOPE: ContextVar[set[asyncio.Task[Any]] | None] = ContextVar("passerelle_scope", default=None)


class TaskGroup:
    """Owns long-running background tasks; failures are logged, shutdown cancels them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        scope = SCOPE.get()
        if scope is not None:
            scope.add(task)
            task.add_done_callback(scope.discard)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
