"""Drains the durable inbox: each stored event handled once, in order per room, with retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bridge.core.backoff import Backoff
from bridge.core.errors import Ignored
from bridge.core.retry import settle
from bridge.core.router import RoomQueues
from bridge.core.tasks import TaskGroup, wait_for
from bridge.db import inbox
from bridge.db.deferred import DEFERRED, Deferred
from bridge.db.engine import Database
from bridge.db.inbox import InboxEvent

log = logging.getLogger("passerelle.matrix.dispatch")

Handler = Callable[[InboxEvent], Awaitable[None]]

BATCH = 500
SWEEP_INTERVAL = 10.0
# At most this many handled events settled (marked done) in one commit, and how long the
# writer waits for more after the first (off every room's path: the rooms go on meanwhile).
SETTLE_BATCH = 500
SETTLE_DELAY = 0.02
# At most this many of a room's consecutive events share one commit of their deferred writes.
GROUP_LIMIT = 32


class EventDispatcher:
    """Moves pending inbox events to their room's queue and records each outcome.

    A transient failure (homeserver down) is retried in place with capped backoff for as long
    as it takes, holding the room's later events behind it so order is kept. Any other failure
    counts as an attempt; after `max_attempts` the event goes to the dead-letter table and the
    room moves on. Nothing here ever reaches the homeserver's transaction request.

    A handled event is marked done in the background, together with the others handled
    meanwhile (one commit for all, not one per event), so a room's next event does not wait for
    that write. Until it is written the event stays in flight (never dispatched twice); a crash
    before it leaves it pending, to be handled again at start-up, as a crash between the
    handler and the write always could: the handlers are idempotent.

    While more of a room's events wait and `groupable` says the next one may join, the
    handlers' deferrable writes (db/deferred.py) are gathered over up to GROUP_LIMIT events
    and committed once, before any of those events is marked done.
    """

    def __init__(
        self,
        db: Database,
        handler: Handler,
        tasks: TaskGroup,
        max_attempts: int,
        groupable: Callable[[InboxEvent], bool] | None = None,
    ) -> None:
        self.db = db
        self.handler = handler
        self.max_attempts = max_attempts
        self.groupable = groupable
        # Per room: the open group's writes and its events handled so far (with "done").
        self._groups: dict[str, tuple[Deferred, list[tuple[InboxEvent, bool]]]] = {}
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._queues: RoomQueues[InboxEvent] = RoomQueues(self._process, tasks, "room")
        self._tasks = tasks
        self.retry_initial = 1.0
        self.retry_maximum = 60.0
        # Handled events not yet marked done (in order), and the writer's state.
        self._settled: list[int] = []
        self._settled_wake = asyncio.Event()
        self._all_settled = asyncio.Event()
        self._all_settled.set()

    def notify(self) -> None:
        """New events were stored: look for them now rather than at the next sweep."""
        self._wake.set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_settled(), name="dispatcher-settle")
        try:
            await self._dispatch()
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            # Groups left open by rooms stopped mid-way: never committed, so not done.
            for _, members in self._groups.values():
                for member, _ in members:
                    self._in_flight.discard(member.seq)
            self._groups.clear()

    async def _dispatch(self) -> None:
        backoff = Backoff(initial=1.0, maximum=30.0)
        while True:
            self._wake.clear()
            try:
                # A snapshot before the query (see MailRelay.run): never the same event twice.
                found = await inbox.pending_events(self.db, BATCH, set(self._in_flight))
            except Exception as e:
                delay = backoff.next_delay()
                log.error("cannot read the inbox (%s); retrying in %.0f s", e, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for item in found:
                self._in_flight.add(item.seq)
                self._queues.submit(item.room_id, item)
            if len(found) >= BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), SWEEP_INTERVAL)

    async def wait_idle(self) -> None:
        """Until every queued event is handled and marked done (needs run())."""
        await self._queues.wait_idle()
        await self._all_settled.wait()

    async def _process(self, item: InboxEvent) -> None:
        if self.groupable is None or not self.groupable(item):
            done = False
            try:
                done = await self._handle_until_settled(item)
            finally:
                self._settle(item, done)
            return
        room = item.room_id
        opened = self._groups.pop(room, None)
        group, members = opened if opened is not None else (Deferred(), [])
        members.append((item, False))
        committed = False
        try:
            token = DEFERRED.set(group)
            try:
                members[-1] = (item, await self._handle_until_settled(item, group))
            finally:
                DEFERRED.reset(token)
            following = self._queues.upcoming(room, 2)
            if len(members) < GROUP_LIMIT and len(following) == 2 and self.groupable(following[1]):
                self._groups[room] = (group, members)  # the next event joins
                members = []
                return
            await self._commit_group(group, members)
            committed = True
        finally:
            # Interrupted before the commit: none of the group is done (all handled again).
            for member, done in members:
                self._settle(member, done and committed)

    async def _commit_group(self, group: Deferred, members: list[tuple[InboxEvent, bool]]) -> None:
        """Commit the group's deferred writes; if that fails (nothing was written), handle its
        events again one by one, each committing its own."""
        writes = len(group)
        try:
            await group.commit(self.db)
            if len(members) > 1 and writes:
                log.info(
                    "the writes of %d events of %s committed together (%d)",
                    len(members),
                    members[0][0].room_id,
                    writes,
                )
        except Exception as e:
            log.warning(
                "the writes of %d events of %s could not be committed together (%s); "
                "handling them again one by one",
                len(members),
                members[0][0].room_id,
                e,
            )
            group.discard()
            for n, (member, _) in enumerate(members):
                members[n] = (member, await self._handle_until_settled(member))

    def _settle(self, item: InboxEvent, done: bool) -> None:
        if done:  # in flight until written
            self._settled.append(item.seq)
            self._all_settled.clear()
            self._settled_wake.set()
        else:
            self._in_flight.discard(item.seq)

    async def _write_settled(self) -> None:
        """Mark handled events done, as many in one commit as were handled meanwhile."""
        backoff = Backoff(initial=1.0, maximum=30.0)
        while True:
            await self._settled_wake.wait()
            await asyncio.sleep(SETTLE_DELAY)
            self._settled_wake.clear()
            while self._settled:
                batch = self._settled[:SETTLE_BATCH]
                try:
                    await inbox.mark_events_done(self.db, batch)
                except Exception as e:
                    delay = backoff.next_delay()
                    log.error(
                        "cannot mark %d handled events done (%s); retrying in %.0f s",
                        len(batch),
                        e,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                del self._settled[: len(batch)]
                self._in_flight.difference_update(batch)
            self._all_settled.set()

    async def _handle_until_settled(self, item: InboxEvent, group: Deferred | None = None) -> bool:
        """True when the event was handled (to be marked done), False when it was given up
        (already marked dead). In a group, a failure first commits what the group holds: the
        room's earlier events do not wait for this one's retries (an outage may be long)."""

        async def work() -> None:
            try:
                await self.handler(item)
            except Ignored as e:
                log.debug("%s %s ignored: %s", item.event_type, item.event_id, e)
            except Exception:
                if group is not None:
                    # If this fails too, the writes stay in the group for its own commit.
                    with contextlib.suppress(Exception):
                        await group.commit(self.db)
                raise

        async def count_failure(reason: str) -> int:
            return await inbox.record_failure(self.db, item.seq, reason)

        async def give_up(reason: str) -> None:
            await inbox.mark_dead(self.db, item, reason)

        return await settle(
            work,
            label=f"{item.event_id} in {item.room_id}",
            count_failure=count_failure,
            give_up=give_up,
            max_attempts=self.max_attempts,
            log=log,
            initial=self.retry_initial,
            maximum=self.retry_maximum,
        )
