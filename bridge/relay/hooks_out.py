"""Room → legacy system: what people write in a room with outbound hooks, queued durably and
POSTed, signed, to each hook's URL, in order, each event once (one webhook-id per hook and
event, kept across retries, so the receiver drops a repeat).

HooksOut.handle (the inbox dispatcher, once per event) makes a row per hook of the room;
HookSender sends a hook's rows one at a time: a delivery that must wait holds the later ones
behind it, and one that cannot go is failed and told next to its message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable

from yarl import URL

from bridge.config import Config, OutHookSettings
from bridge.core.audit import AuditEntry, content_digest
from bridge.core.errors import Ignored, PermanentError, TransientError
from bridge.core.hooks_out import delivery_id, hook_payload, is_retryable, retry_after
from bridge.core.ids import UserID
from bridge.core.matrix_event import NotSent, event_id_of
from bridge.core.permissions import PermissionLevel
from bridge.core.queue_workers import QueueWorkers
from bridge.core.remote_out import plan_agency_event
from bridge.core.tasks import TaskGroup
from bridge.db import audit as audit_db
from bridge.db import hooks_out as outbox_db
from bridge.db.engine import Database
from bridge.db.hooks_out import HookDelivery
from bridge.db.inbox import InboxEvent
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.members import RoomMembers
from bridge.matrix.render import notice_content
from bridge.relay.notices import tell_once
from bridge.webhooks.delivery import Deliverer
from bridge.webhooks.directory import HookDirectory
from bridge.webhooks.egress import EgressRefused

log = logging.getLogger("passerelle.webhooks.out")

# Seconds between attempts after a failure that may pass (5xx, 408, 425, 429, no answer).
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SWEEP_INTERVAL = 30.0
BATCH = 50
_HANDLED_TYPES = ("m.room.message", "m.sticker", "m.room.redaction")


class HooksOut:
    """Turns the messages of rooms with outbound hooks into outbox rows."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        members: RoomMembers,
        directory: HookDirectory,
        *,
        notify_sender: Callable[[str | None], None],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.members = members
        self.directory = directory
        self.notify_sender = notify_sender
        self.clock = clock

    async def handle(self, item: InboxEvent) -> None:
        """One stored room event; raises Ignored when it goes to no hook."""
        hooks = self.directory.outgoing_in(item.room_id)
        if not hooks:
            raise Ignored("no outbound webhook in this room")
        if item.event_type not in _HANDLED_TYPES:
            raise Ignored(f"{item.event_type} is not passed to webhooks")
        plan = plan_agency_event(
            item.event,
            bot_mxid=self.config.bot_mxid,
            is_bridge_user=self.config.is_ghost,
            command_prefix=self.config.appservice.command_prefix,
        )
        if isinstance(plan, NotSent):
            raise Ignored(plan.reason)
        if self.config.permissions.level_for(UserID(plan.sender)) < PermissionLevel.USER:
            await self._tell_not_permitted(item, hooks)
            for hook in hooks:
                entry = _entry(
                    hook,
                    hook.name,
                    item.event_id,
                    item.sender,
                    "refused",
                    "not permitted",
                    body_sha256=content_digest(item.event.get("content", {})),
                    item_key=f"webhook_out:{hook.name}:{item.event_id}",
                )
                await audit_db.append(self.db, entry)
            raise Ignored(f"{plan.sender} may not use the bridge")
        name, _same = await self.members.name(item.room_id, UserID(plan.sender))
        origin = item.event.get("origin_server_ts")
        found = hook_payload(
            plan,
            hook="",
            room_id=item.room_id,
            sender_name=name,
            origin_ts=origin if isinstance(origin, int) and not isinstance(origin, bool) else None,
        )
        if isinstance(found, NotSent):
            raise Ignored(found.reason)
        kind, payload = found
        # An edit or a redaction goes only where its message went.
        target = event_id_of(payload["data"].get("edits") or payload["data"].get("redacts"))
        queued = 0
        for hook in hooks:
            if target is not None and not await outbox_db.delivered_or_queued(
                self.db, hook.name, [target]
            ):
                log.debug("%s: %s is about a message not sent to it", hook.name, item.event_id)
                continue
            body = {**payload, "data": {**payload["data"], "hook": hook.name}}
            stored = await outbox_db.enqueue(
                self.db,
                hook=hook.name,
                room_id=item.room_id,
                event_id=item.event_id,
                kind=kind,
                payload=body,
                sender=plan.sender,
            )
            if stored is not None:
                queued += 1
                log.info(
                    "queued %s of %s for webhook %s (#%d)", kind, item.room_id, hook.name, stored
                )
                self.notify_sender(hook.name)
        if not queued:
            raise Ignored("no webhook takes it (already queued, or about a message never sent)")

    async def _tell_not_permitted(self, item: InboxEvent, hooks: list[OutHookSettings]) -> None:
        day = self.clock().date().isoformat()
        names = ", ".join(sorted(hook.name for hook in hooks))
        await tell_once(
            self.db,
            self.client,
            f"hook-not-permitted:{item.room_id}:{day}",
            item.room_id,
            f"Messages from {item.sender} are not passed to webhook {names}: this bridge's "
            "configuration does not let them use it. (Said once a day in this room.)",
            reply_to=item.event_id,
        )


class HookSender:
    """Sends the webhook outbox: one worker per hook, in queue order."""

    def __init__(
        self,
        db: Database,
        client: MatrixClient,
        directory: HookDirectory,
        deliverer: Deliverer,
        tasks: TaskGroup,
        *,
        give_up_after: float,
    ) -> None:
        self.db = db
        self.client = client
        self.directory = directory
        self.deliverer = deliverer
        self.tasks = tasks
        self.give_up_after = give_up_after
        self._workers: QueueWorkers[str, str, HookDelivery] = QueueWorkers(
            tasks, "webhook-out", self._next, self._send_in_order
        )
        # Told the seconds from queued to delivered of every delivery (the metrics' latency).
        self.on_sent: Callable[[float], None] | None = None

    def notify(self, hook: str | None = None) -> None:
        """Something was queued (for `hook`): its worker looks now, or one is started."""
        self._workers.notify(hook)

    async def run(self) -> None:
        while True:
            self._workers.begin_sweep()
            try:
                await self._report_failures()
                waiting = await outbox_db.hooks_with_pending(self.db)
            except Exception as e:
                log.error("cannot read the webhook outbox (%s); retrying", e)
                await asyncio.sleep(5)
                continue
            for name in sorted(waiting):
                self._workers.ensure(name, name)
            await self._workers.sleep(SWEEP_INTERVAL)

    async def _next(self, name: str) -> list[HookDelivery]:
        return await outbox_db.next_pending(self.db, name, BATCH)

    async def _send_in_order(self, _name: str, items: list[HookDelivery]) -> bool:
        """Due items one after the other, stopping at one that must wait."""
        for item in items:
            if item.next_attempt_at / 1000 > time.time() or not await self._attempt(item):
                break
        return True

    async def _attempt(self, item: HookDelivery) -> bool:
        """True when the item is finished (sent, or failed and told), False when it waits."""
        hook = self.directory.outgoing.get(item.hook)
        if hook is None:
            # Revoked (or removed from the config): dropped, as the revoke said; not told
            # message by message.
            why = "the webhook was removed before it could be sent"
            audit = _delivery_entry(None, item, "failed", why, None)
            await outbox_db.finish(
                self.db, item.id, "failed", status=None, error=why, audit=audit, told=True
            )
            log.info("%s not delivered to webhook %s: %s", item.event_id, item.hook, why)
            return True
        body = json.dumps(item.payload, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            answer = await self.deliverer.post(
                hook.url,
                delivery_id(hook.name, item.event_id),
                body,
                self.directory.signing_keys(hook.name),
            )
        except EgressRefused as e:
            await self._fail(item, None, f"refused by webhooks.egress: {e}")
            return True
        except TransientError as e:
            return await self._retry(item, None, str(e), None)
        except PermanentError as e:
            await self._fail(item, None, str(e))
            return True
        if 200 <= answer.status < 300:
            await outbox_db.finish(
                self.db,
                item.id,
                "sent",
                status=answer.status,
                error=None,
                audit=_delivery_entry(hook, item, "sent", None, answer.status),
            )
            log.info("delivered %s to webhook %s (%d)", item.event_id, hook.name, answer.status)
            if self.on_sent is not None:
                self.on_sent(max(0.0, time.time() - item.created_at / 1000))
            return True
        if is_retryable(answer.status):
            wait = retry_after(answer.retry_after, time.time())
            return await self._retry(item, answer.status, f"HTTP {answer.status}", wait)
        what = "a redirect (not followed)" if 300 <= answer.status < 400 else "a refusal"
        await self._fail(item, answer.status, f"HTTP {answer.status}, {what}")
        return True

    async def _retry(
        self, item: HookDelivery, status: int | None, why: str, wait: float | None
    ) -> bool:
        if time.time() - item.created_at / 1000 > self.give_up_after:
            await self._fail(item, status, f"{why}, still after {self.give_up_after:g} s")
            return True
        delay = RETRY_DELAYS[min(item.attempts, len(RETRY_DELAYS) - 1)]
        delay = max(delay, wait or 0.0)
        log.warning("%s to webhook %s waits %.0f s: %s", item.event_id, item.hook, delay, why)
        await outbox_db.mark_retry(
            self.db, item.id, why, status, int((time.time() + delay) * 1000)
        )
        return False

    async def _fail(self, item: HookDelivery, status: int | None, why: str) -> None:
        log.warning("%s not delivered to webhook %s: %s", item.event_id, item.hook, why)
        hook = self.directory.outgoing.get(item.hook)
        audit = _delivery_entry(hook, item, "failed", why, status)
        await outbox_db.finish(self.db, item.id, "failed", status=status, error=why, audit=audit)
        await self._report_failures()

    async def _report_failures(self) -> None:
        """A reply next to each message that could not go, told once."""
        for item_id, hook, room_id, event_id, error in await outbox_db.failures_to_report(
            self.db, 50
        ):
            text = f"Not delivered to webhook {hook}: {error}"
            content = notice_content(text, reply_to=event_id)
            try:
                await self.client.send_event(
                    room_id,
                    "m.room.message",
                    content,
                    derived_txn_id("webhook-failed", str(item_id), event_id),
                )
            except TransientError:
                return  # told on a later sweep
            except PermanentError as e:
                log.warning("failure of webhook delivery %d not told: %s", item_id, e)
            await outbox_db.mark_reported(self.db, item_id)


async def drop_deliveries(db: Database, name: str, why: str) -> int:
    """A revoked hook's waiting deliveries: failed with `why` and audited, not told one by
    one; how many."""

    def entry(item: HookDelivery) -> AuditEntry:
        return _delivery_entry(None, item, "failed", why, None)

    dropped = await outbox_db.drop_pending(db, name, why, entry)
    if dropped:
        log.info("%d deliveries to webhook %s dropped: %s", dropped, name, why)
    return dropped


def _entry(
    hook: OutHookSettings | None,
    name: str,
    event_id: str,
    sender: str | None,
    outcome: str,
    reason: str | None,
    *,
    status: int | None = None,
    body_sha256: str | None = None,
    item_key: str | None = None,
) -> AuditEntry:
    """The audit row of an event and a hook: its URL without query (which may hold a token)."""
    ids = {"event_id": event_id, "webhook_id": delivery_id(name, event_id)}
    if status is not None:
        ids["http_status"] = str(status)
    recipients: tuple[str, ...] = ()
    if hook is not None:
        url = URL(hook.url)
        recipients = (str(url.with_query(None).with_fragment(None).with_user(None)),)
    return AuditEntry(
        direction="webhook_out",
        link=f"webhook:{name}",
        room_id=hook.room_id if hook is not None else None,
        sender=sender,
        outcome=outcome,
        recipients=recipients,
        ids=ids,
        reason=reason,
        body_sha256=body_sha256,
        item_key=item_key,
    )


def _delivery_entry(
    hook: OutHookSettings | None,
    item: HookDelivery,
    outcome: str,
    reason: str | None,
    status: int | None,
) -> AuditEntry:
    return _entry(
        hook,
        item.hook,
        item.event_id,
        item.sender,
        outcome,
        reason,
        status=status,
        body_sha256=content_digest(item.payload.get("data", {})),
    )
