"""One worker per queue key (a link, a hook) while it has work: the shape every durable outbox
that sends in order per key shares (remote outbox, webhook outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Protocol, TypeVar

from bridge.core.tasks import TaskGroup, wait_for


class Due(Protocol):
    @property
    def next_attempt_at(self) -> int: ...  # ms since the epoch


K = TypeVar("K", bound=Hashable)
C = TypeVar("C")
T = TypeVar("T", bound=Due)


class QueueWorkers(Generic[K, C, T]):
    """`ensure(key, context)` starts a worker for `key` unless one runs. A worker reads the
    key's next items (`fetch`), waits until the first is due, and hands the due ones to
    `send`, which returns False to stop the worker (the key waits for the next sweep). A
    worker with nothing left ends; `notify(key)` wakes it, or the sweep (`sleep`)."""

    def __init__(
        self,
        tasks: TaskGroup,
        label: str,
        fetch: Callable[[C], Awaitable[list[T]]],
        send: Callable[[C, list[T]], Awaitable[bool]],
    ) -> None:
        self.tasks = tasks
        self.label = label
        self.fetch = fetch
        self.send = send
        self._wake = asyncio.Event()
        self._workers: dict[K, asyncio.Task[None]] = {}
        self._key_wake: dict[K, asyncio.Event] = {}

    def notify(self, key: K | None = None) -> None:
        """Something was queued (for `key`): its worker looks now, or the sweep starts one."""
        if key is not None and key in self._key_wake:
            self._key_wake[key].set()
            return
        self._wake.set()
        for event in self._key_wake.values():
            event.set()

    def running(self, key: K) -> bool:
        return key in self._workers

    def ensure(self, key: K, context: C) -> None:
        if key not in self._workers:
            self._key_wake[key] = asyncio.Event()
            self._workers[key] = self.tasks.spawn(
                self._worker(key, context), name=f"{self.label}:{key}"
            )

    def begin_sweep(self) -> None:
        """Call before reading which keys have work: a notify from then on is not missed."""
        self._wake.clear()

    async def sleep(self, seconds: float) -> None:
        """Until notified, or `seconds`."""
        with contextlib.suppress(TimeoutError):
            await wait_for(self._wake.wait(), seconds)

    async def _worker(self, key: K, context: C) -> None:
        wake = self._key_wake[key]
        try:
            while True:
                wake.clear()
                items = await self.fetch(context)
                if not items:
                    if wake.is_set():
                        continue  # queued while we looked
                    # No await from here on: a notify now finds no worker and wakes the sweep.
                    return
                delay = items[0].next_attempt_at / 1000 - time.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await wait_for(wake.wait(), delay)
                    continue
                if not await self.send(context, items):
                    return
        finally:
            self._workers.pop(key, None)
            self._key_wake.pop(key, None)
