"""IMAP connection pool: at most N connections for every watched mailbox; IDLE for the first
ones, round-robin polling over the remaining connections for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.core.backoff import Backoff
from bridge.core.tasks import wait_for
from bridge.mail.imap_session import expected_failure

log = logging.getLogger("passerelle.mail.imap")


class PooledWatcher(Protocol):
    """What the pool needs from a mailbox watcher (`bridge.mail.imap_watcher.ImapWatcher`)."""

    async def run(self) -> None:
        """Hold one connection and watch forever (IDLE, or poll on it); reconnect on failure."""
        ...

    async def sync_once(self) -> int:
        """Connect, store every new mail, disconnect."""
        ...


_FAILED_POLL_MAXIMUM = 300.0

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


def poll_connections(max_connections: int) -> int:
    """How many of the pool's connections poll once there are more mailboxes than connections:
    a quarter (at least one); each poll holds a connection for tens of milliseconds, so one
    connection checks hundreds of mailboxes per poll interval."""
    return max(1, max_connections // 4)


@dataclass(eq=False)
class _Entry:
    key: str
    watcher: PooledWatcher
    # The context the mailbox was added in (a lease's fence, a unit's task scope): its
    # watcher's work runs there, whichever of the pool's tasks runs it.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    idle_task: asyncio.Task[Any] | None = None
    active: bool = True
    # In the poll queue under this ticket (None: not queued); older tickets are stale.
    ticket: int | None = None
    # Set unless a poll of it runs: a mailbox given a connection of its own waits for it.
    not_polling: asyncio.Event = field(default_factory=asyncio.Event)
    polls: int = 0
    last_poll_at: float | None = None
    # A mailbox whose check fails waits longer each time (up to 5 min), so that one broken
    # mailbox (a server slow to refuse a login, say) does not hold the poll connections.
    failures: Backoff = field(default_factory=lambda: Backoff(maximum=_FAILED_POLL_MAXIMUM))
    retry_in: float = 0.0


@dataclass
class PoolStats:
    """What the pool does right now (for health, tests and the scale bench)."""

    max_connections: int
    idle: int  # mailboxes holding a connection of their own
    polled: int  # mailboxes checked in turn over the poll connections
    in_use: int  # connections held (or being opened) right now
    peak: int  # the most connections ever held at once
    polls: int  # polls done so far
    lagging: int = 0  # polls that started later than one poll interval after they were due
    per_mailbox_polls: dict[str, int] = field(default_factory=dict)


class ImapPool:
    """Runs the watchers of every mailbox within ``max_connections`` IMAP connections.

    While there are at most ``max_connections`` mailboxes, each holds a connection (IDLE, as
    before). Beyond that, the first mailboxes (in the order they were added) keep one each and
    the others share `poll_connections` connections: each is checked (connect, fetch what is
    new, disconnect) once per ``poll_interval``, oldest check first, so none starves. Every
    connection takes a permit of one semaphore, so the bound holds even while a watcher that
    lost its connection of its own is still closing it.
    """

    def __init__(self, spawn: Spawn, *, max_connections: int, poll_interval: float) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._spawn = spawn
        # The pool's own tasks (connections, pollers) are shared by every mailbox: they start
        # in the context the pool was made in, never in the context of one mailbox's caller.
        self._context = contextvars.copy_context()
        self._max = max_connections
        self._poll_interval = poll_interval
        self._poll_slots = poll_connections(max_connections)
        self._permits = asyncio.Semaphore(max_connections)
        self._entries: dict[str, _Entry] = {}
        # Polled mailboxes: (due, ticket, entry), a heap; an entry whose ticket changed is stale.
        self._queue: list[tuple[float, int, _Entry]] = []
        self._tickets = itertools.count()
        self._changed = asyncio.Event()
        self._pollers: list[asyncio.Task[Any]] = []
        self._in_use = 0
        self._peak = 0
        self._polls = 0
        self._lagging = 0

    # -- membership -----------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def add(self, key: str, watcher: PooledWatcher) -> None:
        """Watch one more mailbox (a key already there keeps its watcher)."""
        if key in self._entries:
            return
        entry = self._entries[key] = _Entry(key, watcher, contextvars.copy_context())
        entry.not_polling.set()
        count = len(self._entries)
        if count <= self._max:
            self._give_connection(entry)
        elif count - 1 > self._max:  # already polling, the connections of their own all taken
            self._enqueue(entry, time.monotonic())
            self._start_pollers()
        else:  # one more than the connections: some give theirs back to the pollers
            self._rebalance()

    def remove(self, key: str) -> None:
        """Stop watching a mailbox; its connection (if any) is closed."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entry.active = False
        entry.ticket = None
        had_connection = entry.idle_task is not None
        if entry.idle_task is not None:
            entry.idle_task.cancel()
            entry.idle_task = None
        if had_connection or len(self._entries) == self._max:
            self._rebalance()  # polled mailboxes may take the free connections

    def close(self) -> None:
        """Stop every watcher and poller (the task group also cancels them at shutdown)."""
        for entry in self._entries.values():
            entry.active = False
            entry.ticket = None
            if entry.idle_task is not None:
                entry.idle_task.cancel()
                entry.idle_task = None
        self._entries.clear()
        self._queue.clear()
        for task in self._pollers:
            task.cancel()
        self._pollers.clear()

    def stats(self) -> PoolStats:
        idle = sum(1 for e in self._entries.values() if e.idle_task is not None)
        return PoolStats(
            max_connections=self._max,
            idle=idle,
            polled=len(self._entries) - idle,
            in_use=self._in_use,
            peak=self._peak,
            polls=self._polls,
            lagging=self._lagging,
            per_mailbox_polls={k: e.polls for k, e in self._entries.items() if e.polls},
        )

    def _rebalance(self) -> None:
        """Give connections of their own to the first mailboxes, poll the others.

        Only the first `max_connections + 1` mailboxes can change side: a connection is only
        ever held within them, and the later ones are already polled (or, just added, queued
        by `add`). So this costs O(max_connections), not O(mailboxes): a stop that removes
        5,000 polled mailboxes one by one took 7 s when it walked them all each time.
        """
        count = len(self._entries)
        capacity = self._max if count <= self._max else self._max - self._poll_slots
        now = time.monotonic()
        first = itertools.islice(self._entries.values(), self._max + 1)
        for position, entry in enumerate(first):
            if position < capacity:
                self._give_connection(entry)
            elif entry.idle_task is not None:
                log.info("IMAP %s: more mailboxes than connections: polled from now on", entry.key)
                entry.idle_task.cancel()
                entry.idle_task = None
                self._enqueue(entry, now)
            elif entry.ticket is None and entry.not_polling.is_set():
                self._enqueue(entry, now)
        if count > capacity:
            self._start_pollers()

    def _give_connection(self, entry: _Entry) -> None:
        if entry.idle_task is None:
            entry.ticket = None  # its place in the poll queue, if any, is void
            entry.idle_task = self._start(self._hold(entry), f"imap:{entry.key}")

    def _enqueue(self, entry: _Entry, due: float) -> None:
        """Poll ``entry`` at ``due``; the earliest due first, so each waits its turn."""
        entry.ticket = ticket = next(self._tickets)
        heapq.heappush(self._queue, (due, ticket, entry))
        self._changed.set()

    def _start_pollers(self) -> None:
        if not self._pollers:
            self._pollers = [
                self._start(self._poll_forever(), f"imap-poll:{n}")
                for n in range(self._poll_slots)
            ]

    def _start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self._context.copy().run(self._spawn, coro, name)

    @staticmethod
    async def _as(entry: _Entry, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run one mailbox's work in that mailbox's context (cancelled with the caller)."""
        return await asyncio.create_task(coro, context=entry.context.copy())

    # -- connections ----------------------------------------------------------------------------

    async def _acquire(self) -> None:
        await self._permits.acquire()
        self._in_use += 1
        self._peak = max(self._peak, self._in_use)

    def _release(self) -> None:
        self._in_use -= 1
        self._permits.release()

    async def _hold(self, entry: _Entry) -> None:
        """A connection of its own for one mailbox, for as long as it keeps it."""
        await entry.not_polling.wait()
        await self._acquire()
        try:
            await self._as(entry, entry.watcher.run())
        finally:
            self._release()

    async def _poll_forever(self) -> None:
        """One poll connection: check the mailbox whose check is oldest, again and again."""
        while True:
            due, entry = await self._next_due()
            late = time.monotonic() - due
            if late > self._poll_interval:
                self._lagging += 1
                if self._lagging in (1, 10) or self._lagging % 1000 == 0:
                    log.warning(
                        "IMAP polling is %.0f s late (%d polled mailboxes on %d connections);"
                        " raise mail.max_imap_connections or mail.poll_interval",
                        late,
                        len(self._queue) + 1,
                        self._poll_slots,
                    )
            entry.not_polling.clear()
            try:
                await self._acquire()
                try:
                    if entry.active and entry.idle_task is None:
                        await self._poll(entry)
                finally:
                    self._release()
            finally:
                entry.not_polling.set()
                if entry.active and entry.idle_task is None and entry.ticket is None:
                    wait = max(self._poll_interval, entry.retry_in)
                    self._enqueue(entry, time.monotonic() + wait)

    async def _next_due(self) -> tuple[float, _Entry]:
        """Wait for the polled mailbox that is due first; take it out of the queue."""
        while True:
            self._changed.clear()
            queue = self._queue
            while queue and queue[0][2].ticket != queue[0][1]:
                heapq.heappop(queue)  # stale: removed, or given a connection of its own
            timeout: float | None = None
            if queue:
                wait = queue[0][0] - time.monotonic()
                if wait <= 0:
                    due, _, entry = heapq.heappop(queue)
                    entry.ticket = None
                    return due, entry
                timeout = wait
            with contextlib.suppress(TimeoutError):
                await wait_for(self._changed.wait(), timeout)

    async def _poll(self, entry: _Entry) -> None:
        entry.polls += 1
        entry.last_poll_at = time.monotonic()
        self._polls += 1
        try:
            stored = await self._as(entry, entry.watcher.sync_once())
        except Exception as exc:  # its health says why too; it is tried again later
            entry.retry_in = entry.failures.next_delay()
            wait = max(self._poll_interval, entry.retry_in)
            if expected_failure(exc):  # str() of these is safe to log (sync_once sees to it)
                log.warning("IMAP %s: poll failed: %s; next try in %.0f s", entry.key, exc, wait)
            else:
                log.error(
                    "IMAP %s: poll failed unexpectedly; next try in %.0f s",
                    entry.key,
                    wait,
                    exc_info=True,
                )
            return
        entry.failures.reset()
        entry.retry_in = 0.0
        if stored:
            log.debug("IMAP %s: poll stored %d mail(s)", entry.key, stored)
