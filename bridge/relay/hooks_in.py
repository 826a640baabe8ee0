"""Webhook → room: each kept request posted once by its hook's ghost, in order per room."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import Config, HookSettings
from bridge.core.audit import AuditEntry, digest
from bridge.core.errors import PermanentError, Refused, TransientError
from bridge.core.hooks_in import (
    BadHookBody,
    hook_display_name,
    hook_message_content,
    parse_hook_body,
)
from bridge.core.ids import EventID, RoomID
from bridge.core.retry import settle_stored
from bridge.core.router import RoomQueues
from bridge.core.tasks import TaskGroup, wait_for
from bridge.db import rooms
from bridge.db import webhooks as webhook_db
from bridge.db.engine import Database
from bridge.db.webhooks import HookInboxItem
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.ghosts import GhostManager

log = logging.getLogger("passerelle.webhooks.relay")

BATCH = 200
SWEEP_INTERVAL = 10.0


class HooksRelay:
    """Drains the webhook inbox into the hooks' rooms. A request for a room the bot is not in
    (or that is encrypted) stays pending until it is; an outage of the homeserver is waited
    out; anything else is retried `max_attempts` times, then the request is set aside."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        ghosts: GhostManager,
        tasks: TaskGroup,
        *,
        max_attempts: int,
        hooks: Mapping[str, HookSettings] | None = None,
    ) -> None:
        self.config = config
        # Live: hooks made or revoked in rooms appear here without a restart.
        self.hooks = config.webhooks.hooks if hooks is None else hooks
        self.db = db
        self.client = client
        self.ghosts = ghosts
        self.max_attempts = max_attempts
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._waiting: set[str] = set()  # hook rooms the bot is not (usably) in
        # Hook rooms whose new requests store() queues itself, in the order of their commits
        # (so of their 202s): the bot was in them at the last sweep, and no request of theirs
        # has been left to a sweep since that sweep read the inbox.
        self._ready: set[str] = set()
        self._unswept: set[str] = set()  # rooms with a request left to the next sweep
        self._queues: RoomQueues[tuple[HookSettings, HookInboxItem]] = RoomQueues(
            self._process, tasks, "webhook"
        )
        self.tasks = tasks
        # A posted request is recorded while its room's next one is sent: per room, the
        # recording of its last posted request (at most one: the next waits for it), and the
        # requests whose recording outlives their turn (in flight until it ends).
        self._recording: dict[str, asyncio.Task[None]] = {}
        self._recorded_later: set[int] = set()
        # Thread roots posted but not yet committed: a reply in the same thread finds its root
        # here meanwhile.
        self._roots: dict[tuple[str, str, str], EventID] = {}
        self.retry_initial = 1.0
        # Told the seconds from accepted (202) to posted of every request (the metrics' latency).
        self.on_posted: Callable[[float], None] | None = None

    async def store(self, hook: str, webhook_id: str, body: str) -> bool:
        """For the webhook server: keep a verified request (False: a duplicate), and queue it
        for its room at once when it can go straight there; otherwise a sweep finds it."""
        item = await webhook_db.store(self.db, hook, webhook_id, body)
        if item is None:
            return False
        settings = self.hooks.get(hook)
        if item.id in self._in_flight:
            pass  # a sweep on another connection (PostgreSQL) read it first and queued it
        elif settings is not None and settings.room_id in self._ready:
            # Committed before its 202 is sent and queued now: a request answered before
            # another was sent is queued first. No inbox read per request.
            self._in_flight.add(item.id)
            self._queues.submit(settings.room_id, (settings, item))
        else:
            # Older requests of its room may be pending outside the queue: its room goes
            # through the inbox (in arrival order) until a sweep has read this one.
            if settings is not None:
                self._unswept.add(settings.room_id)
                self._ready.discard(settings.room_id)
            self._wake.set()
        return True

    def stored(self) -> None:
        """For the webhook server, after a request is kept: store() queued it, or woke a
        sweep for it."""

    def notify(self) -> None:
        """Something changed (the bot joined or left a room, a record failed): sweep."""
        self._wake.set()

    async def report(self) -> dict[str, Any]:
        """For /health and `status`: the inbox's counts by state, and rooms waiting for the bot."""
        return {**await webhook_db.counts(self.db), "waiting_rooms": sorted(self._waiting)}

    async def wait_idle(self) -> None:
        await self._queues.wait_idle()
        while self._recording:
            await asyncio.wait(list(self._recording.values()))

    async def _join_rooms(self) -> None:
        """The bot tries once to join each hook's room (it may have been invited while the
        bridge was down); a refusal is fine: the hook waits for an invite."""
        for room_id in {hook.room_id for hook in self.hooks.values()}:
            room = await rooms.get_room(self.db, RoomID(room_id))
            if room is not None and room.bot_membership == "join":
                continue
            try:
                await self.client.join(RoomID(room_id))
                await self._record_join(RoomID(room_id), room is None)
            except (PermanentError, TransientError) as e:
                log.info("bot is not in %s, a webhook's room: %s", room_id, e)

    async def _record_join(self, room_id: RoomID, new: bool) -> None:
        """The bot joined a hook's room itself: the room is usable now, without waiting for
        the homeserver to push the join back (it may not before an outage, and the catch-up
        reads joined rooms only). Its encryption is read from the room's state."""
        encrypted = await self.client.get_state(room_id, "m.room.encryption") is not None
        if new:
            await rooms.save_room(
                self.db,
                room_id,
                bot_membership="join",
                is_direct=False,
                encrypted=encrypted,
                invited_by=None,
                member_count=await self.client.member_count(room_id),
            )
        else:
            await rooms.set_membership(self.db, room_id, "join")
            if encrypted:
                await rooms.set_encrypted(self.db, room_id)

    async def run(self) -> None:
        try:
            await self._join_rooms()
        except Exception as e:
            log.warning("could not join the webhooks' rooms: %s", e)
        while True:
            self._wake.clear()
            # Requests left to a sweep before this point are read by this one.
            swept, self._unswept = self._unswept, set()
            self._ready -= swept
            try:
                waiting = set()
                for room_id in {h.room_id for h in self.hooks.values()}:
                    room = await rooms.get_room(self.db, RoomID(room_id))
                    if room is None or room.bot_membership != "join" or room.encrypted:
                        waiting.add(room_id)
                # A room the bot is not in holds back its own hooks' requests, not the others'.
                skip = {h.name for h in self.hooks.values() if h.room_id in waiting}
                found = await webhook_db.pending(
                    self.db, BATCH, set(self._in_flight), skip_hooks=skip
                )
            except Exception as e:
                log.error("cannot read the webhook inbox (%s); retrying", e)
                self._unswept |= swept
                await asyncio.sleep(5)
                continue
            for room_id in waiting - self._waiting:
                names = ", ".join(
                    sorted(h.name for h in self.hooks.values() if h.room_id == room_id)
                )
                log.warning(
                    "webhook %s waits: the bot is not in %s (or it is encrypted); requests are "
                    "kept until it is",
                    names,
                    room_id,
                )
            self._waiting = waiting
            gone = []
            for item in found:
                hook = self.hooks.get(item.hook)
                if hook is None:
                    gone.append(item)
                elif item.id not in self._in_flight:  # store() may have queued it meanwhile
                    self._in_flight.add(item.id)
                    self._queues.submit(hook.room_id, (hook, item))
            # With no await since the inbox was read: every pending request of these rooms is
            # queued (unless the batch was full: then some may not be), so store() may queue
            # their next ones itself.
            self._ready = (
                {h.room_id for h in self.hooks.values()} - waiting - self._unswept
                if len(found) < BATCH
                else set()
            )
            for item in gone:
                reason = "the hook no longer exists (removed from the config, or revoked)"
                audit = _audit(None, item, "ignored", reason)
                await webhook_db.finish(self.db, item.id, "ignored", error=reason, audit=audit)
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), SWEEP_INTERVAL)

    async def _process(self, entry: tuple[HookSettings, HookInboxItem]) -> None:
        hook, item = entry
        label = f"webhook {hook.name} request {item.webhook_id}"

        async def handle() -> None:
            await self.handle(hook, item)

        async def finish(state: str, reason: str) -> None:
            audit = _audit(hook, item, state, reason)
            await webhook_db.finish(self.db, item.id, state, error=reason, audit=audit)

        async def count_failure(reason: str) -> int:
            return await webhook_db.count_failure(self.db, item.id, reason)

        async def give_up(reason: str) -> None:
            audit = _audit(hook, item, "failed", reason)
            await webhook_db.finish(self.db, item.id, "failed", error=reason, audit=audit)

        try:
            await settle_stored(
                handle,
                finish,
                refused_state="refused",
                label=label,
                count_failure=count_failure,
                give_up=give_up,
                max_attempts=self.max_attempts,
                log=log,
                initial=self.retry_initial,
            )
        finally:
            if item.id not in self._recorded_later:
                self._in_flight.discard(item.id)

    async def handle(self, hook: HookSettings, item: HookInboxItem) -> None:
        """Post one kept request; Refused if its stored body is not a hook message."""
        try:
            message = parse_hook_body(item.body.encode("utf-8"))
        except BadHookBody as e:
            raise Refused(f"the stored body is not a hook message: {e}") from None
        room_id = RoomID(hook.room_id)
        ghost = await self.ghosts.ensure_user(
            self.config.hook_ghost_mxid(hook.name),
            hook_display_name(hook.name, message.sender),
            room_id,
            kind="webhook",
            remote_id=hook.name,
        )
        root = None
        thread = None if message.thread is None else (hook.name, room_id, message.thread)
        if thread is not None:
            root = self._roots.get(thread) or await webhook_db.thread_root(self.db, *thread)
        content = hook_message_content(message, root)
        event_id = await self.client.send_event(
            room_id,
            "m.room.message",
            content,
            derived_txn_id("webhook-in", hook.name, item.webhook_id),
            as_user=ghost,
        )
        log.debug("webhook %s: %s posted as %s", hook.name, item.webhook_id, event_id)
        if self.on_posted is not None and item.received_at:
            self.on_posted(max(0.0, time.time() - item.received_at / 1000))
        started = thread if thread is not None and root is None else None
        if started is not None:
            self._roots[started] = event_id
        # Recorded while the room's next request is sent. A crash before the commit leaves the
        # request pending: it is sent again with the same transaction ID, and the homeserver
        # answers with the event it already made (exactly once, as remote_out's _Run).
        previous = self._recording.get(room_id)
        if previous is not None:
            await asyncio.wait([previous])
        self._recorded_later.add(item.id)
        self._recording[room_id] = self.tasks.spawn(
            self._record(
                room_id,
                item,
                event_id,
                started,
                _audit(hook, item, "posted", None, event_id, sender=message.sender),
            ),
            name=f"webhook-record:{item.id}",
        )

    async def _record(
        self,
        room_id: str,
        item: HookInboxItem,
        event_id: EventID,
        started: tuple[str, str, str] | None,
        audit: AuditEntry,
    ) -> None:
        """A posted request's state, thread root and audit row committed. On failure it stays
        pending: the next sweep sends it again, and the homeserver dedupes the transaction."""
        try:
            await webhook_db.record_posted(self.db, item.id, event_id, thread=started, audit=audit)
        except Exception as e:
            log.error(
                "webhook %s: %s was posted as %s but could not be recorded (%s); it will be "
                "sent again with the same transaction ID",
                item.hook,
                item.webhook_id,
                event_id,
                e,
            )
            self.notify()
        finally:
            self._recorded_later.discard(item.id)
            self._in_flight.discard(item.id)
            if started is not None and self._roots.get(started) == event_id:
                del self._roots[started]
            if self._recording.get(room_id) is asyncio.current_task():
                del self._recording[room_id]


def _audit(
    hook: HookSettings | None,
    item: HookInboxItem,
    outcome: str,
    reason: str | None,
    event_id: str = "",
    *,
    sender: str | None = None,
) -> AuditEntry:
    """The audit row of a kept request settling with `outcome`, stored with its state."""
    return AuditEntry(
        direction="webhook_in",
        link=f"webhook:{item.hook}",
        room_id=hook.room_id if hook is not None else None,
        sender=sender,
        outcome=outcome,
        recipients=(hook.room_id,) if hook is not None else (),
        ids={"webhook_id": item.webhook_id, "event_id": event_id},
        reason=reason,
        body_sha256=digest(item.body.encode("utf-8")),
    )
