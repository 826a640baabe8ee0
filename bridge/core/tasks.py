"""Background tasks: one helper that keeps a reference and logs failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

log = logging.getLogger("passerelle.tasks")

T = TypeVar("T")

# How long close() waits for cancelled tasks before cancelling the stragglers again.
_CLOSE_RECANCEL = 1.0


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
    """`asyncio.wait_for` without its Python 3.11 flaw: there, a task cancelled just as the
    awaited thing finishes gets the result and loses the cancellation (CPython gh-86296), so a
    `while True: await wait_for(wake.wait(), …)` loop can outlive its cancel. `asyncio.timeout`
    keeps a cancellation that was not its own (and 3.12's wait_for is built on it)."""
    async with asyncio.timeout(timeout):
        return await aw


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
        """Cancel every task and wait for them all; a task that swallowed its cancellation
        (a library's own `except CancelledError`, say) is cancelled again, and said so."""
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        while pending:
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_RECANCEL)
            for task in pending:
                log.warning(
                    "task %s is still running after its cancel; cancelling again", task.get_name()
                )
                task.cancel()
