"""Room → remote: what people write in a linked agency room, queued durably and sent to the
linked remote room by the bridge's account there, in order, each message once.

Each event is handled once per link by the inbox dispatcher (RemoteOut.handle): it becomes a
row of the remote outbox. RemoteSender sends a link's rows one at a time, with a transaction
ID derived from the agency event (so the remote server itself drops a resend after a crash),
maps the remote event back to the agency event, and tells the room when one cannot go.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from bridge.config import Config
from bridge.core.audit import AuditEntry, content_digest
from bridge.core.errors import Ignored, PermanentError, TransientError
from bridge.core.ids import EventID, RoomID, UserID
from bridge.core.links import REMOTE_KIND, Link, split_remote_key
from bridge.core.matrix_event import MXC, NotSent, image_type
from bridge.core.permissions import PermissionLevel
from bridge.core.queue_workers import QueueWorkers
from bridge.core.remote_out import OutgoingPlan, plan_agency_event, remote_event, sender_label
from bridge.core.tasks import TaskGroup
from bridge.db import audit as audit_db
from bridge.db import kv
from bridge.db import links as link_db
from bridge.db import remote as remote_db
from bridge.db.engine import Database
from bridge.db.inbox import InboxEvent
from bridge.db.remote import RemoteOutgoing
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.members import RoomMembers
from bridge.matrix.render import notice_content
from bridge.relay.notices import tell_once
from bridge.relay.remote_in import RemoteSide
from bridge.relay.room_links import RoomLinks
from bridge.remote.client import RemoteAuthError

log = logging.getLogger("passerelle.remote.out")

# Seconds between attempts after an outage or a refusal that may pass (429, 5xx).
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SWEEP_INTERVAL = 30.0
OUT_BATCH = 50  # items of a link read at once
AVATAR_MAX_BYTES = 1 << 20
_HANDLED_TYPES = ("m.room.message", "m.sticker", "m.reaction", "m.room.redaction")


class RemoteOut:
    """Turns the messages of rooms linked to remote rooms into outbox rows."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        members: RoomMembers,
        sides: Mapping[str, RemoteSide],
        *,
        notify_sender: Callable[[int | None], None],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.members = members
        self.sides = sides
        self.notify_sender = notify_sender
        self.clock = clock
        self._links = RoomLinks(db, REMOTE_KIND)

    def links_changed(self) -> None:
        self._links.changed()

    async def room_links(self, room_id: RoomID) -> list[Link]:
        """The room's remote links, paused ones included."""
        return await self._links.of(room_id)

    async def handle(self, item: InboxEvent) -> None:
        """One stored agency event; raises Ignored when it goes to no remote room."""
        if item.event_type not in _HANDLED_TYPES:
            raise Ignored(f"{item.event_type} is not passed on")
        links = [
            link
            for link in await self.room_links(item.room_id)
            if not link.paused and split_remote_key(link.remote)[0] in self.sides
        ]
        if not links:
            raise Ignored("no remote link in this room")
        plan = plan_agency_event(
            item.event,
            bot_mxid=self.config.bot_mxid,
            is_bridge_user=self.config.is_ghost,
            command_prefix=self.config.appservice.command_prefix,
        )
        if isinstance(plan, NotSent):
            raise Ignored(plan.reason)
        if self.config.permissions.level_for(UserID(plan.sender)) < PermissionLevel.USER:
            await self._tell_not_permitted(item, links)
            for link in links:
                await audit_db.append(self.db, refused_entry(link, item, "not permitted"))
            raise Ignored(f"{plan.sender} may not use the bridge")
        sender = UserID(plan.sender)
        name, _same = await self.members.name(item.room_id, sender)
        avatar = await self.members.avatar(item.room_id, sender)
        queued = 0
        for link in links:
            side = self.sides[split_remote_key(link.remote)[0]]
            label = sender_label(name, plan.sender, side.settings.agency_suffix)
            stored = await remote_db.enqueue(
                self.db,
                link_id=link.id,
                room_id=item.room_id,
                event_id=item.event_id,
                plan={"plan": plan.as_json(), "label": label, "avatar": avatar},
            )
            if stored is not None:
                queued += 1
                log.info(
                    "queued %s of %s for %s (#%d)",
                    item.event_id,
                    item.room_id,
                    link.remote,
                    stored,
                )
        if queued:
            for link in links:
                self.notify_sender(link.id)
        else:
            raise Ignored("already queued")

    async def _tell_not_permitted(self, item: InboxEvent, links: list[Link]) -> None:
        """Once per room per day: why someone's messages do not go to the remote rooms."""
        day = self.clock().date().isoformat()
        names = ", ".join(sorted({split_remote_key(link.remote)[0] for link in links}))
        await tell_once(
            self.db,
            self.client,
            f"remote-not-permitted:{item.room_id}:{day}",
            item.room_id,
            f"Messages from {item.sender} are not passed on to {names}: this bridge's "
            "configuration does not let them use it. (Said once a day in this room.)",
            reply_to=item.event_id,
        )


class _Run:
    """Items one worker pass has sent and is recording in the background: the next send does
    not wait for the commit, and relations to them are resolved from here meanwhile."""

    def __init__(self) -> None:
        self.recent: dict[str, str] = {}  # agency event → remote event
        self._marks: list[asyncio.Task[None]] = []

    def sent(
        self,
        db: Database,
        item: RemoteOutgoing,
        remote_event_id: str,
        sender: str,
        audit: AuditEntry | None = None,
    ) -> None:
        self.recent[item.event_id] = remote_event_id
        self._marks.append(
            asyncio.ensure_future(remote_db.mark_sent(db, item, remote_event_id, sender, audit))
        )

    async def settle(self) -> None:
        """Every recording done (an error surfaces here, after the others finished)."""
        marks, self._marks = self._marks, []
        if marks:
            for result in await asyncio.gather(*marks, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result


class RemoteSender:
    """Sends the remote outbox: one worker per link, in queue order; a message that cannot go
    now holds the link's later ones behind it, so the remote room sees them in order."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        sides: Mapping[str, RemoteSide],
        tasks: TaskGroup,
        *,
        is_stopped: Callable[[str], bool],
        on_token_refused: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.sides = sides
        self.tasks = tasks
        self.is_stopped = is_stopped
        self.on_token_refused = on_token_refused
        self._workers: QueueWorkers[int, Link, RemoteOutgoing] = QueueWorkers(
            tasks, "remote-out", self._next, self._send_in_order
        )
        # Told the seconds from queued to sent of every event sent (the metrics' latency).
        self.on_sent: Callable[[float], None] | None = None

    def notify(self, link_id: int | None = None) -> None:
        """Something was queued (for `link_id`): its worker looks now, or one is started."""
        self._workers.notify(link_id)

    async def run(self) -> None:
        while True:
            self._workers.begin_sweep()
            try:
                await self._report_failures()
                waiting = await remote_db.links_with_pending(self.db)
                links = [
                    link
                    for link in await link_db.all_links(self.db)
                    if link.id in waiting
                    and link.kind == REMOTE_KIND
                    and not link.paused
                    and split_remote_key(link.remote)[0] in self.sides
                    and not self.is_stopped(split_remote_key(link.remote)[0])
                ]
            except Exception as e:
                log.error("cannot read the remote outbox (%s); retrying", e)
                await asyncio.sleep(5)
                continue
            for link in links:
                self._workers.ensure(link.id, link)
            await self._workers.sleep(SWEEP_INTERVAL)

    async def _next(self, link: Link) -> list[RemoteOutgoing]:
        return await remote_db.next_outgoing(self.db, link.id, OUT_BATCH)

    async def _send_in_order(self, link: Link, items: list[RemoteOutgoing]) -> bool:
        """Send due items one after the other; stop at one that must wait. Recording a sent
        item overlaps the next send (a crash in between resends it with the same transaction
        ID, which the remote drops); False when the remote stopped (token refused: the link
        waits)."""
        run = _Run()
        try:
            for item in items:
                if item.next_attempt_at / 1000 > time.time():
                    return True
                outcome = await self._attempt(link, item, run)
                if outcome != "sent":
                    return outcome != "stopped"
            return True
        finally:
            await run.settle()

    async def _attempt(self, link: Link, item: RemoteOutgoing, run: _Run) -> str:
        """sent (or finished otherwise: failed and told), held (retried later), stopped."""
        name, remote_room = split_remote_key(link.remote)
        side = self.sides[name]
        try:
            await self.send(link, side, remote_room, item, run)
        except RemoteAuthError as e:
            # The remote stops as a whole (said once, in the log and the rooms); the message
            # stays queued and goes once a new token is configured.
            await self.on_token_refused(name, str(e))
            return "stopped"
        except TransientError as e:
            age = time.time() - item.created_at / 1000
            if age > side.settings.give_up_after:
                await self._fail(link, item, f"{side.settings.name} could not be reached: {e}")
                return "sent"
            delay = RETRY_DELAYS[min(item.attempts, len(RETRY_DELAYS) - 1)]
            log.warning("%s to %s waits %.0f s: %s", item.event_id, link.remote, delay, e)
            next_at = int((time.time() + delay) * 1000)
            await remote_db.mark_retry(self.db, item.id, str(e), next_at)
            return "held"
        except PermanentError as e:
            await self._fail(link, item, f"{side.settings.name} refused it: {e}")
        return "sent"

    async def send(
        self,
        link: Link,
        side: RemoteSide,
        remote_room: str,
        item: RemoteOutgoing,
        run: _Run | None = None,
    ) -> None:
        run = run if run is not None else _Run()
        plan = OutgoingPlan.from_json(item.plan["plan"])
        label = str(item.plan.get("label", plan.sender))
        txn = derived_txn_id("remote-out", str(link.id), plan.event_id)
        if plan.kind == "redaction":
            await self._redact(link, side, remote_room, item, plan, txn, run)
            return
        mapped: dict[str, str | None] = {}
        for event_id in plan.related():
            mapped[event_id] = await self._remote_copy(link, event_id, run)
        media_url, note = await self._copy_media(side, plan)
        if note is not None:
            plan = OutgoingPlan(
                "message",
                plan.event_id,
                plan.sender,
                content={"msgtype": "m.notice", "body": note},
                thread_root=plan.thread_root,
                reply_to=plan.reply_to,
            )
        avatar = await self._remote_avatar(side, item.plan.get("avatar"))
        found_event = remote_event(
            plan, label=label, mapped=mapped, media_url=media_url, avatar_url=avatar
        )
        if isinstance(found_event, NotSent):
            raise PermanentError(found_event.reason)
        event_type, content = found_event
        remote_event_id = await side.client.send_event(remote_room, event_type, content, txn)
        audit = outbox_entry(link, item, "sent", None, remote_event_id)
        run.sent(self.db, item, remote_event_id, side.settings.user_id, audit)
        log.info("sent %s to %s as %s", item.event_id, link.remote, remote_event_id)
        if self.on_sent is not None:
            self.on_sent(max(0.0, time.time() - item.created_at / 1000))

    async def _remote_copy(self, link: Link, event_id: str, run: _Run) -> str | None:
        """The remote event of an agency event (None: never passed on)."""
        if event_id in run.recent:
            return run.recent[event_id]
        found = await remote_db.by_agency_event(self.db, link.id, event_id)
        return None if found is None else found.remote_event_id

    async def _redact(
        self,
        link: Link,
        side: RemoteSide,
        remote_room: str,
        item: RemoteOutgoing,
        plan: OutgoingPlan,
        txn: str,
        run: _Run,
    ) -> None:
        await run.settle()  # the target may be one of the items just sent
        target = await remote_db.by_agency_event(self.db, link.id, plan.target or "")
        if target is None:
            why = "redaction of a message never passed on"
            audit = outbox_entry(link, item, "ignored", why)
            await remote_db.mark_done_without_event(self.db, item.id, "never passed on", audit)
            return
        if target.direction != "out":
            # The remote user's own message: the bridge's account may not delete it there.
            why = "redaction of a remote user's message"
            audit = outbox_entry(link, item, "ignored", why)
            await remote_db.mark_done_without_event(
                self.db, item.id, "a remote user's message", audit
            )
            return
        redaction = await side.client.redact(remote_room, target.remote_event_id, txn)
        audit = outbox_entry(link, item, "sent", None, redaction)
        run.sent(self.db, item, redaction, side.settings.user_id, audit)

    async def _copy_media(
        self, side: RemoteSide, plan: OutgoingPlan
    ) -> tuple[str | None, str | None]:
        media = plan.media_ref()
        if media is None:
            return None, None
        limit = side.settings.max_media_size
        too_large = f"[{media.filename[:200]}: too large to pass on (limit {limit} bytes)]"
        if media.size is not None and media.size > limit:
            return None, too_large
        try:
            data = await self.client.download(media.url, limit)
        except PermanentError as e:
            log.warning("file of %s not downloadable: %s", plan.event_id, e)
            return None, f"[{media.filename[:200]}: the file could not be fetched]"
        if data is None:
            return None, too_large
        url = await side.client.upload(data, media.content_type, media.filename[:200])
        return url, None

    async def _remote_avatar(self, side: RemoteSide, agency_url: object) -> str | None:
        """The remote copy of an agency avatar, uploaded once per remote and kept."""
        if not isinstance(agency_url, str) or not MXC.fullmatch(agency_url):
            return None
        key = f"remote-avatar:{side.settings.name}:{agency_url}"
        known = await kv.get_value(self.db, key)
        if known is not None:
            return known
        try:
            data = await self.client.download(agency_url, AVATAR_MAX_BYTES)
            if data is None:
                return None
            url = await side.client.upload(data, image_type(data), "avatar")
        except PermanentError as e:
            log.info("avatar %s not copied to %s: %s", agency_url, side.settings.name, e)
            return None
        await kv.set_value(self.db, key, url)
        return url

    async def _fail(self, link: Link, item: RemoteOutgoing, why: str) -> None:
        log.warning("%s not passed on to %s: %s", item.event_id, link.remote, why)
        await remote_db.mark_failed(self.db, item.id, why, outbox_entry(link, item, "failed", why))
        await self._report_failures()

    async def _report_failures(self) -> None:
        """A reply next to each message that could not go, told once."""
        for item_id, _link_id, room_id, event_id, error in await remote_db.failures_to_report(
            self.db, 50
        ):
            text = f"Your message could not be passed on: {error}"
            content = notice_content(text, reply_to=EventID(event_id))
            try:
                await self.client.send_event(
                    room_id,
                    "m.room.message",
                    content,
                    derived_txn_id("remote-failed", str(item_id), event_id),
                )
            except TransientError:
                return  # told on a later sweep
            except PermanentError as e:
                log.warning("failure of remote outbox item %d not told: %s", item_id, e)
            await remote_db.mark_reported(self.db, item_id)


def outbox_entry(
    link: Link, item: RemoteOutgoing, outcome: str, reason: str | None, remote_event_id: str = ""
) -> AuditEntry:
    """The audit row of a remote outbox item settling with `outcome`, stored with its state."""
    plan = item.plan.get("plan")
    plan = plan if isinstance(plan, dict) else {}
    sender = plan.get("sender")
    _name, remote_room = split_remote_key(link.remote)
    return AuditEntry(
        direction="remote_out",
        link=link.remote,
        room_id=link.room_id,
        sender=sender if isinstance(sender, str) else None,
        outcome=outcome,
        recipients=(remote_room,),
        ids={"event_id": item.event_id, "remote_event_id": remote_event_id},
        reason=reason,
        body_sha256=content_digest(plan.get("content", {})),
    )


def refused_entry(link: Link, item: InboxEvent, reason: str) -> AuditEntry:
    """The audit row of an agency event refused before it was queued: keyed, as the inbox
    marks it done only afterwards (a re-run after a crash records nothing twice)."""
    _name, remote_room = split_remote_key(link.remote)
    return AuditEntry(
        direction="remote_out",
        link=link.remote,
        room_id=link.room_id,
        sender=item.sender,
        outcome="refused",
        recipients=(remote_room,),
        ids={"event_id": item.event_id},
        reason=reason,
        body_sha256=content_digest(item.event.get("content", {})),
        item_key=f"remote_out:{link.id}:{item.event_id}",
    )
