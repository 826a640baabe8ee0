"""Settling records off the send path: posted items committed in the background, many per
commit, in the order they were posted."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bridge.core.tasks import TaskGroup

log = logging.getLogger("passerelle.recorder")

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Records of items already sent, written by one background task: while a commit runs,
    the next records gather, and the following commit takes them all (at most `max_batch`).

    The sender does not wait for the commit: an item whose record fails is handed to
    `failed`, and the caller keeps it pending so that it is sent again with the same
    transaction ID (the other side answers with what it already made: exactly once). A batch
    that fails is retried one record at a time, so one bad record fails alone.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[None]],
        tasks: TaskGroup,
        name: str,
        *,
        done: Callable[[T], None],
        failed: Callable[[T, Exception], None],
        max_batch: int = 100,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self._write = write
        self._tasks = tasks
        self._name = name
        self._done = done
        self._failed = failed
        self._max_batch = max_batch
        self._queue: collections.deque[T] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0  # how many commits were made (for tests and the bench)

    def add(self, item: T) -> None:
        """Queue a record; the writer starts if it was not running."""
        self._queue.append(item)
        self._idle.clear()
        if self._task is None:
            self._task = self._tasks.spawn(self._drain(), name=f"{self._name}-records")

    def pending(self) -> int:
        return len(self._queue)

    async def wait_idle(self) -> None:
        """Until every queued record is written (or handed to `failed`)."""
        await self._idle.wait()

    async def _drain(self) -> None:
        try:
            while self._queue:
                size = min(self._max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(size)]
                await self._settle(batch)
        finally:
            self._task = None
            if self._queue:  # cancelled with records left: they stay pending in the store
                self._queue.clear()
            self._idle.set()

    async def _settle(self, batch: list[T]) -> None:
        try:
            await self._write(batch)
            self.commits += 1
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0], e)
                return
            log.warning(
                "%s: a commit of %d records failed (%s); one at a time", self._name, len(batch), e
            )
            for item in batch:
                try:
                    await self._write([item])
                    self.commits += 1
                except Exception as e:
                    self._fail(item, e)
                else:
                    self._call(self._done, item)
            return
        for item in batch:
            self._call(self._done, item)

    def _fail(self, item: T, error: Exception) -> None:
        try:
            self._failed(item, error)
        except Exception:
            log.exception("%s: failure callback failed", self._name)

    def _call(self, callback: Callable[[T], None], item: T) -> None:
        try:
            callback(item)
        except Exception:
            log.exception("%s: record callback failed", self._name)
