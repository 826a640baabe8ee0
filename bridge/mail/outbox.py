"""The outbox worker: sends stored outgoing mail, retrying on schedule until it goes or fails."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from bridge.core.backoff import Backoff
from bridge.core.tasks import wait_for
from bridge.mail.smtp import MESSAGE_LIMIT, SendResult, SmtpSender, retry_delay

log = logging.getLogger("passerelle.mail.outbox")

# With nothing scheduled that this process knows of, the store is asked again this often
# (items stored without notify(), or scheduled by an earlier run of the bridge).
POLL_INTERVAL = 60.0
# Items handed over by offer() and not started yet: at most this many are kept (the rest wait
# in the store for due()).
READY_LIMIT = 1000
# Ids of the last items started, so that an offer arriving after due() already returned (and
# perhaps sent) the same item is dropped instead of sending it twice.
_STARTED_MEMORY = 4096
# Items sent whose outcome is still being recorded: while this many wait, no new session
# starts (a store that cannot record stops the sending instead of piling up mail that a
# crash would send again).
RECORDING_LIMIT = 64
# Backoff when the store itself fails (due() or recording an outcome).
_STORE_BACKOFF_INITIAL = 1.0
_STORE_BACKOFF_MAXIMUM = 60.0


@dataclass(frozen=True)
class OutboxItem:
    """One stored outgoing mail, as the worker sees it."""

    id: int
    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]
    attempts: int  # failed attempts so far
    first_tried_at: float | None  # epoch seconds, None if never tried
    next_attempt_at: float  # epoch seconds
    # Epoch seconds: when it was queued (for the latency metric only, so not compared).
    created_at: float | None = field(default=None, compare=False)


class OutboxStore(Protocol):
    """What the worker needs from the database (the lead implements it).

    Times are epoch seconds from the same clock as the worker's.
    """

    async def due(self, now: float, limit: int, exclude: set[int]) -> list[OutboxItem]:
        """At most ``limit`` unsent, unfailed items with next_attempt_at <= now whose id is not
        in ``exclude``, earliest next_attempt_at first."""
        ...

    async def mark_sent(self, item_id: int, result: SendResult) -> None:
        """The server accepted the mail: it is never sent again."""
        ...

    async def mark_retry(self, item_id: int, result: SendResult, next_attempt_at: float) -> None:
        """A transient failure: attempts += 1, first_tried_at = now if it was None, the next
        attempt not before ``next_attempt_at``."""
        ...

    async def mark_failed(self, item_id: int, result: SendResult) -> None:
        """Never to be sent: refused with 5xx, or given up after give_up_after seconds since
        the first attempt (``result.message`` then starts with "gave up")."""
        ...


class OutboxWorker:
    """Sends due outbox items, at most ``concurrency`` at a time, and records each outcome.

    A slot is free again as soon as the server has answered: recording the outcome (a commit,
    grouped with others) goes on beside the next mail's session, the item still in flight.

    Delivery is at least once: a mail whose outcome could not be recorded (the bridge stopped
    during the attempt) is sent again. An outcome the store fails to record is retried, the
    item staying in flight meanwhile, so this process never sends it twice.
    """

    def __init__(
        self,
        store: OutboxStore,
        sender: SmtpSender,
        *,
        give_up_after: float,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
        retry_schedule: Callable[[int], float] = retry_delay,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if give_up_after < 0 or poll_interval <= 0:
            raise ValueError("give_up_after must be >= 0 and poll_interval > 0")
        self._store = store
        self._sender = sender
        self._give_up_after = give_up_after
        self._concurrency = concurrency
        self._clock = clock
        self._poll_interval = poll_interval
        self._retry_schedule = retry_schedule
        # Items being sent or having their outcome recorded (left out of every due() call).
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # Of those, the ones in an SMTP session: what `concurrency` bounds.
        self._sending: set[int] = set()
        self._wake = asyncio.Event()  # run() should look at the store now
        self._freed = asyncio.Event()  # a slot became free
        # Told the seconds from queued to sent of every mail sent (the metrics' latency).
        self.on_sent: Callable[[float], None] | None = None
        # Whether the store may hold due items not taken yet: a notify() came, or the last
        # due() call filled every free slot.
        self._maybe_more = True
        # (next_attempt_at, id) of the retries this worker scheduled; stale entries are
        # skipped (``_retry_at`` holds the current one).
        self._timers: list[tuple[float, int]] = []
        self._retry_at: dict[int, float] = {}
        self._running = False
        # While run() sleeps: the clock time it wakes up at by itself (-inf otherwise).
        self._sleeping_until = -math.inf
        # Items just stored and handed over by offer(), oldest first: started without reading
        # them back from the store.
        self._ready: collections.deque[OutboxItem] = collections.deque()
        self._started: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def in_flight(self) -> int:
        """How many items are being sent (or their outcome recorded) right now."""
        return len(self._in_flight)

    def notify(self) -> None:
        """A new item was stored: look now."""
        self._maybe_more = True
        self._wake.set()

    def offer(self, item: OutboxItem) -> None:
        """A new item was stored (committed), here with everything needed to send it: it is
        started without a due() query when a slot is free. Beyond READY_LIMIT waiting, the
        offer is dropped and the store read instead (as after notify())."""
        if item.id in self._in_flight or item.id in self._started:
            # due() found it first (or, on SQLite, a purged item's id came back): the store
            # says which.
            self.notify()
            return
        if len(self._ready) >= READY_LIMIT:
            self.notify()
            return
        self._ready.append(item)
        self._wake.set()

    async def run(self) -> None:
        """Send due items forever; sleep until the next known due time, a notify() or a poll."""
        if self._running:
            raise RuntimeError("OutboxWorker.run() is already running")
        self._running = True
        backoff = Backoff(initial=_STORE_BACKOFF_INITIAL, maximum=_STORE_BACKOFF_MAXIMUM)
        try:
            while True:
                self._wake.clear()
                try:
                    await self._fill()
                except Exception as exc:
                    delay = backoff.next_delay()
                    log.error(
                        "outbox: cannot read due items (%s: %s); trying again in %.0f s",
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
                backoff.reset()
                delay = self._idle_delay()
                self._sleeping_until = self._clock() + delay
                try:
                    if not await self._sleep(delay):
                        # Woken by the clock: a retry is due, or it is time to poll.
                        self._maybe_more = True
                finally:
                    self._sleeping_until = -math.inf
        finally:
            self._running = False
            tasks = list(self._in_flight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    def close(self) -> None:
        """Close the SMTP connections kept open between mails (run() does it when it ends)."""
        self._sender.close()

    async def drain_once(self) -> int:
        """Send every item due now (at most ``concurrency`` at a time); how many were tried."""
        now = self._clock()
        tried: set[int] = set()
        mine: set[asyncio.Task[None]] = set()
        exhausted = False
        while True:
            free = self._free_slots()
            while free > 0 and (item := self._take_ready()) is not None:
                tried.add(item.id)
                mine.add(self._start(item))
                free -= 1
            if not exhausted and free > 0:
                items = await self._store.due(now, free, self._excluded() | tried)
                exhausted = len(items) < free
                for item in items:
                    tried.add(item.id)
                    mine.add(self._start(item))
            mine = {task for task in mine if not task.done()}
            if exhausted and not mine:
                return len(tried)
            if mine:
                await asyncio.wait(mine, return_when=asyncio.FIRST_COMPLETED)
            else:  # every slot is taken by run()
                self._freed.clear()
                if self._free_slots() <= 0:
                    await self._freed.wait()

    # -- scheduling ------------------------------------------------------------------------------

    async def _fill(self) -> None:
        """Start sending in the free slots: offered items first, then due items from the store
        when it may hold some (a notify(), a full batch last time, a retry due, a poll)."""
        free = self._free_slots()
        while free > 0 and (item := self._take_ready()) is not None:
            self._start(item)
            free -= 1
        if free <= 0:
            return  # a finishing task wakes us up
        now = self._clock()
        if not self._maybe_more and not (self._timers and self._timers[0][0] <= now):
            return
        excluded = self._excluded()
        items = await self._store.due(now, free, excluded)
        self._maybe_more = len(items) >= free
        self._expire_timers(now, excluded)
        for item in items:
            self._start(item)

    def _free_slots(self) -> int:
        """How many sessions may start now."""
        recording = len(self._in_flight) - len(self._sending)
        if recording >= RECORDING_LIMIT:
            return 0
        return self._concurrency - len(self._sending)

    def _take_ready(self) -> OutboxItem | None:
        while self._ready:
            item = self._ready.popleft()
            if item.id not in self._in_flight and item.id not in self._started:
                return item
            self._maybe_more = True  # dropped: the store says whether it is still due
        return None

    def _excluded(self) -> set[int]:
        return set(self._in_flight) | {item.id for item in self._ready}

    def _start(self, item: OutboxItem) -> asyncio.Task[None]:
        self._retry_at.pop(item.id, None)
        self._started[item.id] = None
        self._started.move_to_end(item.id)
        if len(self._started) > _STARTED_MEMORY:
            self._started.popitem(last=False)
        task = asyncio.create_task(self._attempt(item), name=f"outbox-{item.id}")
        self._in_flight[item.id] = task
        self._sending.add(item.id)
        task.add_done_callback(lambda done: self._finished(item.id, done))
        return task

    def _finished(self, item_id: int, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(item_id) is task:
            del self._in_flight[item_id]
            self._sending.discard(item_id)
        self._slot_freed()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("outbox item %d: unexpected error", item_id, exc_info=exc)

    def _slot_freed(self) -> None:
        self._freed.set()
        if self._maybe_more or self._ready:
            self._wake.set()

    def _expire_timers(self, now: float, excluded: set[int]) -> None:
        """Forget scheduled times that a due() call at ``now`` has already covered: not those
        of the items it was told to leave out (in flight while it ran: a retry's time set
        meanwhile, already passed, would otherwise be forgotten until the next poll)."""
        kept: list[tuple[float, int]] = []
        while self._timers:
            at, item_id = self._timers[0]
            current = self._retry_at.get(item_id) == at
            if current and at > now:
                break
            heapq.heappop(self._timers)
            if current and item_id in excluded:
                kept.append((at, item_id))  # the next look, a few ms on, covers it
            elif current:
                del self._retry_at[item_id]
        for entry in kept:
            heapq.heappush(self._timers, entry)

    def _idle_delay(self) -> float:
        """Seconds until the next known due time, at most the poll interval."""
        while self._timers and self._retry_at.get(self._timers[0][1]) != self._timers[0][0]:
            heapq.heappop(self._timers)
        if not self._timers:
            return self._poll_interval
        # A time already passed was covered by the last due() (see _expire_timers), so this is
        # positive unless the clock went back: never less than a few milliseconds, never a spin.
        return min(max(self._timers[0][0] - self._clock(), 0.005), self._poll_interval)

    async def _sleep(self, delay: float) -> bool:
        """Until woken (True) or `delay` has passed (False)."""
        with contextlib.suppress(TimeoutError):
            await wait_for(self._wake.wait(), delay)
            return True
        return False

    # -- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, item: OutboxItem) -> None:
        started = self._clock()
        try:
            result = await self._sender.send(item.raw, item.mail_from, item.recipients)
        except Exception as exc:  # a bug, not the network: keep the mail, retry on schedule
            log.exception("outbox item %d: sending raised", item.id)
            result = SendResult(False, False, None, f"internal error: {type(exc).__name__}")
        self._sending.discard(item.id)
        self._slot_freed()
        await self._record(item, result, started)

    async def _record(self, item: OutboxItem, result: SendResult, started: float) -> None:
        backoff = Backoff(initial=_STORE_BACKOFF_INITIAL, maximum=_STORE_BACKOFF_MAXIMUM)
        outcome = self._outcome(item, result, started)
        while True:
            try:
                await outcome()
                return
            except Exception as exc:
                delay = backoff.next_delay()
                log.error(
                    "outbox item %d: cannot record the outcome (%s: %s); trying again in %.0f s",
                    item.id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    def _outcome(
        self, item: OutboxItem, result: SendResult, started: float
    ) -> Callable[[], Awaitable[None]]:
        """Log the outcome once; return what records it (called again if the store fails)."""
        store = self._store
        if result.accepted:
            if result.refused:
                log.warning(
                    "outbox item %d sent, some recipients refused: %s", item.id, result.message
                )
            else:
                log.info("outbox item %d sent: %s", item.id, result.message)
            if item.created_at is not None and self.on_sent is not None:
                self.on_sent(max(0.0, time.time() - item.created_at))
            return lambda: store.mark_sent(item.id, result)
        if result.permanent:
            log.warning("outbox item %d failed permanently: %s", item.id, result.message)
            return lambda: store.mark_failed(item.id, result)
        attempt = item.attempts + 1
        first = item.first_tried_at if item.first_tried_at is not None else started
        now = self._clock()
        elapsed = now - first
        if elapsed >= self._give_up_after:
            final = replace(
                result,
                message=_clip(
                    f"gave up after {attempt} attempts in {_duration(elapsed)}: {result.message}"
                ),
            )
            log.warning("outbox item %d: %s", item.id, final.message)
            return lambda: store.mark_failed(item.id, final)
        # Never later than the give-up time: the last attempt is made right then.
        next_at = min(now + self._retry_schedule(attempt), first + self._give_up_after)
        log.warning(
            "outbox item %d: attempt %d failed, next in %s: %s",
            item.id,
            attempt,
            _duration(next_at - now),
            result.message,
        )

        async def retry() -> None:
            await store.mark_retry(item.id, result, next_at)
            self._retry_at[item.id] = next_at
            heapq.heappush(self._timers, (next_at, item.id))
            if next_at < self._sleeping_until:  # run() would sleep past it
                self._wake.set()

        return retry


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
