"""Ordered work per room: items with the same key run one at a time, in submission order."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bridge.core.tasks import TaskGroup

log = logging.getLogger("passerelle.router")

T = TypeVar("T")


class RoomQueues(Generic[T]):
    """One FIFO per key (usually a room ID), drained by a worker that exists while it has work.

    Different keys run concurrently; the same key never does, so a room's messages keep their
    order whatever the other rooms are doing. `run` is expected to handle its own failures; an
    exception that escapes it is logged and the queue moves on.
    """

    def __init__(self, run: Callable[[T], Awaitable[None]], tasks: TaskGroup, name: str) -> None:
        self._run = run
        self._tasks = tasks
        self._name = name
        self._queues: dict[str, collections.deque[T]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, key: str, item: T) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._idle.clear()
            self._tasks.spawn(self._worker(key, queue), name=f"{self._name}:{key}")
        queue.append(item)

    def upcoming(self, key: str, count: int) -> list[T]:
        """The key's next `count` items, the one running first (while its run lasts)."""
        queue = self._queues.get(key)
        return list(itertools.islice(queue, count)) if queue is not None else []

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def _worker(self, key: str, queue: collections.deque[T]) -> None:
        try:
            while queue:
                item = queue[0]
                try:
                    await self._run(item)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("unhandled failure in %s worker for %s", self._name, key)
                queue.popleft()
        finally:
            del self._queues[key]
            if not self._queues:
                self._idle.set()
