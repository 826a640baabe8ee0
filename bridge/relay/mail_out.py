"""Matrix → mail: messages written in a linked room composed into mail and queued for SMTP.

Each event is handled once per link, in room order, by the inbox dispatcher. What leaves this
module is a row in the outbox (bridge/db/outbox.py), stored together with the Message-ID ⇄
event mapping, so that a crash never loses a message and a re-run never queues it twice; the
outbox worker sends it, and OutcomeReporter tells the room what became of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Callable

from bridge.config import Config
from bridge.core.audit import AuditEntry, content_digest
from bridge.core.commands import parse_command
from bridge.core.errors import Ignored, PermanentError, TransientError
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link, LinkSettings
from bridge.core.message import Attachment
from bridge.core.permissions import PermissionLevel
from bridge.core.tasks import wait_for
from bridge.db import audit as audit_db
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db.deferred import DEFERRED
from bridge.db.engine import Database
from bridge.db.inbox import InboxEvent
from bridge.db.mail import MappedEvent
from bridge.db.outbox import NewOutgoing, Outcome
from bridge.mail.compose import (
    ComposeError,
    compose,
    conversation_subject,
    has_loop_marker,
    is_own_message_id,
    loop_marker,
    own_message_id,
)
from bridge.mail.outbox import OutboxItem
from bridge.mail.outgoing import NotSent, PlannedMail, outgoing_mail, plan_event
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.members import RoomMembers
from bridge.matrix.render import notice_content
from bridge.relay.bounces import envelope_sender
from bridge.relay.notices import tell_once, thread_of
from bridge.relay.room_links import RoomLinks

log = logging.getLogger("passerelle.mail.out")

REPORT_BATCH = 50
REPORT_INTERVAL = 30.0
SENT_REACTION = "✉️"


def sender_address(config: Config, link: Link) -> str | None:
    """The From address of the link's mail: its own, or the bridge's."""
    return link.settings.from_address or config.mail.from_address


def marking_of(config: Config, settings: LinkSettings) -> tuple[str, str] | None:
    """(header, level) that every mail of a marked link carries; None for an unmarked link."""
    if settings.marking is None:
        return None
    return config.mail.markings.header, settings.marking


def groupable(item: InboxEvent, bot: str, command_prefix: str) -> bool:
    """A message that is not a command, as the bot reads commands (`parse_command`: the prefix
    as the first word, in any case). A redaction or a command reads what was queued before it,
    so the dispatcher commits the group before them."""
    if item.event_type != "m.room.message" or item.sender == bot:
        return False
    content = item.event.get("content")
    body = content.get("body") if isinstance(content, dict) else None
    if not isinstance(body, str):
        return True
    return parse_command(body, command_prefix, is_direct=False) is None


def _memo_key(link_id: int, event_id: str) -> tuple[str, int, str]:
    return ("mail_out", link_id, event_id)


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class MailOut:
    """Turns the messages of linked rooms into outbox rows."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        members: RoomMembers,
        *,
        notify_outbox: Callable[[], None],
        offer_outbox: Callable[[OutboxItem], None] | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        # Each queued mail is handed to the outbox worker with offer_outbox when given (no
        # read back from the database), else the worker is told to look with notify_outbox.
        self.notify_outbox = notify_outbox
        self.offer_outbox = offer_outbox
        self.clock = clock
        self.enabled = config.mail.smtp is not None
        self.secret = config.message_id_secret
        self.members = members
        self._links = RoomLinks(db, "mail")

    def links_changed(self) -> None:
        self._links.changed()

    async def room_links(self, room_id: RoomID) -> list[Link]:
        """The room's mail links, paused ones included."""
        return await self._links.of(room_id)

    async def _active_links(self, room_id: RoomID) -> list[Link]:
        return [link for link in await self.room_links(room_id) if not link.paused]

    def is_own_message_id(self, message_id: str) -> bool:
        """Whether a Message-ID is one this bridge gave (for any configured sender domain)."""
        return any(
            is_own_message_id(message_id, domain, self.secret) for domain in self.own_domains()
        )

    def has_own_marker(self, raw: bytes) -> bool:
        """Whether a mail carries this bridge's loop header (its own mail, come back)."""
        return has_loop_marker(raw, [loop_marker(d, self.secret) for d in self.own_domains()])

    def own_domains(self) -> set[str]:
        addresses = {self.config.mail.from_address}
        addresses |= {spec.from_address for spec in self.config.links}
        return {_domain(a).lower() for a in addresses if a}

    async def handle(self, item: InboxEvent) -> None:
        """One stored event; raises Ignored when it has nothing to do with mail."""
        if item.event_type == "m.room.member":
            raise Ignored("membership")
        if item.event_type not in ("m.room.message", "m.room.redaction"):
            raise Ignored(f"{item.event_type} is not mailed")
        if not self.enabled:
            raise Ignored("Matrix → mail is off (mail.smtp.host is not set)")
        links = await self._active_links(item.room_id)
        if not links:
            raise Ignored("no mail link in this room")
        if item.event_type == "m.room.redaction":
            await self._redaction(item, links)
            return
        plan = plan_event(
            item.event,
            bot_mxid=self.config.bot_mxid,
            is_bridge_user=self.config.is_ghost,
            command_prefix=self.config.appservice.command_prefix,
        )
        if isinstance(plan, NotSent):
            raise Ignored(plan.reason)
        body_sha256 = content_digest(item.event.get("content", {}))
        if self.config.permissions.level_for(plan.sender) < PermissionLevel.USER:
            await self._tell_not_permitted(item, links)
            for link in links:
                await self._audit_refused(link, plan, body_sha256, "refused", "not permitted")
            raise Ignored(f"{plan.sender} may not use the bridge")
        queued = 0
        for link in links:
            if await self._queue(link, plan, body_sha256):
                queued += 1
        if not queued:
            raise Ignored("nothing to mail")

    def groupable(self, item: InboxEvent) -> bool:
        """Whether the event's mail may be queued in one commit with the room's events just
        before it (see db/deferred.py)."""
        return groupable(item, self.config.bot_mxid, self.config.appservice.command_prefix)

    # --- one message, one link -----------------------------------------------------------------

    async def _queue(self, link: Link, plan: PlannedMail, body_sha256: str) -> bool:
        from_address = sender_address(self.config, link)
        if from_address is None:
            log.warning("no from_address for %s: Matrix messages are not mailed", link.remote)
            return False
        if plan.replaces is not None and not link.settings.send_edits:
            return False
        thread = await self._thread(link, plan)
        if thread is None:
            return False
        root, parent, subject, references = thread
        name, disambiguate = await self.members.name(link.room_id, plan.sender)
        attachments, notes = await self._attachments(plan)
        mail = outgoing_mail(
            plan,
            sender_name=name,
            disambiguate=disambiguate,
            subject=subject or "",
            in_reply_to=parent,
            references=references,
            attachments=attachments,
        )
        if notes:
            separator = "\n\n" if mail.body_text.strip() else ""
            mail = dataclasses.replace(
                mail, body_text=mail.body_text + separator + "\n".join(notes)
            )
        recipients = (link.remote,)
        refused = [r for r in recipients if not link.settings.recipient_allowed(link.remote, r)]
        in_thread = root if root != plan.event_id else None
        if refused:
            why = f"recipient not allowed: {', '.join(refused)}"
            await self._audit_refused(link, plan, body_sha256, "refused", why)
            await self._not_mailed(
                link,
                plan,
                in_thread,
                "egress",
                f"{', '.join(refused)} is not an allowed recipient of this link",
            )
            return False
        try:
            raw = compose(
                mail,
                from_address=from_address,
                list_address=link.remote,
                domain=_domain(from_address),
                secret=self.secret,
                now=self.clock(),
                marker=loop_marker(_domain(from_address), self.secret),
                marking=marking_of(self.config, link.settings),
            )
        except ComposeError as e:
            log.error(
                "message %s in %s could not be composed safely: %s", plan.event_id, link.room_id, e
            )
            await self._audit_refused(link, plan, body_sha256, "failed", "could not compose")
            await self._not_mailed(
                link, plan, in_thread, "compose", "it could not be turned into a safe mail"
            )
            return False
        message_id = own_message_id(plan.event_id, _domain(from_address), self.secret)
        threads = link.settings.thread_mode == "threads"

        def envelope(item_id: int) -> str:
            return envelope_sender(self.config, from_address, item_id)

        new = NewOutgoing(
            link_id=link.id,
            room_id=link.room_id,
            event_id=plan.event_id,
            kind="correction" if plan.replaces is not None else "message",
            message_id=message_id,
            raw=raw,
            mail_from=from_address,
            recipients=recipients,
            thread_root=root if threads else plan.event_id,
            subject=subject if subject else conversation_subject(mail),
            sender=plan.sender,
            body_sha256=body_sha256,
        )
        work = outbox_db.enqueue_steps(new, envelope=envelope)
        group = DEFERRED.get()
        if group is not None:
            # Committed with the room's next events (the dispatcher's group); until then
            # their replies find this mail here.
            group.memo[_memo_key(link.id, plan.event_id)] = MappedEvent(
                new.message_id, new.thread_root, new.subject
            )
            group.add(work, functools.partial(self._queued, link, plan.event_id))
            return True
        return self._queued(link, plan.event_id, await self.db.write(work))

    def _queued(self, link: Link, event_id: EventID, stored: OutboxItem | None) -> bool:
        """After the commit: the mail handed to the outbox worker."""
        if stored is None:
            log.debug("message %s already queued for %s", event_id, link.remote)
            return False
        log.info(
            "queued message %s of %s for %s (#%d)", event_id, link.room_id, link.remote, stored.id
        )
        if self.offer_outbox is not None:
            self.offer_outbox(stored)
        else:
            self.notify_outbox()
        return True

    async def _audit_refused(
        self, link: Link, plan: PlannedMail, body_sha256: str, outcome: str, reason: str
    ) -> None:
        """A message that will not be queued: its audit row, keyed by link and event, as the
        inbox marks the event done only afterwards (a re-run records nothing twice)."""
        entry = AuditEntry(
            direction="mail_out",
            link=link.remote,
            room_id=link.room_id,
            sender=plan.sender,
            outcome=outcome,
            recipients=(link.remote,),
            ids={"event_id": plan.event_id},
            reason=reason,
            body_sha256=body_sha256,
            item_key=f"mail_out:{link.id}:{plan.event_id}",
        )
        await audit_db.append(self.db, entry)

    async def _not_mailed(
        self, link: Link, plan: PlannedMail, thread: EventID | None, what: str, why: str
    ) -> None:
        await self._notice(
            link.room_id,
            f"Not mailed to {link.remote}: {why}.",
            key=f"{what}:{link.id}:{plan.event_id}",
            reply_to=plan.event_id,
            thread_root=thread,
        )

    async def _thread(
        self, link: Link, plan: PlannedMail
    ) -> tuple[EventID, str | None, str | None, tuple[str, ...]] | None:
        """(thread root event, In-Reply-To, thread subject, References) for the mail; None
        when the message must not be mailed (an edit of something never mailed)."""

        group = DEFERRED.get()

        async def mapped(event_id: EventID | None) -> MappedEvent | None:
            if event_id is None:
                return None
            found = await mail_db.lookup_event(self.db, link.id, event_id)
            if found is None and group is not None:
                # Queued by an earlier event of this group, not committed yet.
                found = group.memo.get(_memo_key(link.id, event_id))
            return found

        if plan.replaces is not None:
            original = await mapped(plan.replaces)
            if original is None:
                log.info("edit %s of a message never mailed: not sent", plan.event_id)
                return None
            root = await mapped(original.thread_root)
            first: tuple[str, ...] = (root.message_id,) if root is not None else ()
            return original.thread_root, original.message_id, original.subject, first
        parent = await mapped(plan.reply_to)
        root_event = plan.thread_root or (parent.thread_root if parent is not None else None)
        root = await mapped(root_event)
        if parent is None:
            parent = root
        if parent is None:
            # A new conversation, or a thread whose first message never went by mail.
            return root_event or plan.event_id, None, None, ()
        subject = root.subject if root is not None else parent.subject
        refs = tuple(dict.fromkeys(m.message_id for m in (root, parent) if m is not None))
        return root_event or parent.thread_root, parent.message_id, subject, refs

    async def _attachments(self, plan: PlannedMail) -> tuple[tuple[Attachment, ...], list[str]]:
        """The file of a media message, downloaded; notes for a file that cannot come."""
        media = plan.media
        if media is None:
            return (), []
        limit = self.config.mail.max_attachment_size
        label = media.filename.replace("\n", " ").replace("\r", " ")[:200]
        too_large = (
            f"[{label}: too large to attach here (limit {limit} bytes); see the Matrix room]"
        )
        if media.size is not None and media.size > limit:
            return (), [too_large]
        try:
            data = await self.client.download(media.url, limit)
        except PermanentError as e:
            log.warning("file of %s not downloadable: %s", plan.event_id, e)
            return (), [f"[{label}: the file could not be fetched from Matrix]"]
        if data is None:
            return (), [too_large]
        return (Attachment(media.filename, media.content_type, data),), []

    # --- redactions and refusals ----------------------------------------------------------------

    async def _redaction(self, item: InboxEvent, links: list[Link]) -> None:
        content = item.event.get("content")
        redacts = item.event.get("redacts")
        if not isinstance(redacts, str) and isinstance(content, dict):
            redacts = content.get("redacts")
        if not isinstance(redacts, str):
            raise Ignored("redaction without a target")
        mailed = await outbox_db.mails_for_event(self.db, redacts)
        by_link = {link.id: link for link in links}
        told = False
        for _id, link_id, _state in mailed:
            link = by_link.get(link_id)
            if link is None:
                continue
            mapped = await mail_db.lookup_event(self.db, link.id, redacts)
            await self._notice(
                link.room_id,
                f"That message was already passed on to {link.remote} by mail; deleting it "
                "here cannot unsend the mail.",
                key=f"redaction:{link.id}:{item.event_id}",
                reply_to=EventID(redacts),
                thread_root=thread_of(mapped, EventID(redacts)),
            )
            told = True
        if not told:
            raise Ignored("redacted event was never mailed")

    async def _tell_not_permitted(self, item: InboxEvent, links: list[Link]) -> None:
        """Once per room per day: why this room's messages from someone are not mailed."""
        day = self.clock().date().isoformat()
        lists = ", ".join(sorted({link.remote for link in links}))
        await tell_once(
            self.db,
            self.client,
            f"mailout-not-permitted:{item.room_id}:{day}",
            item.room_id,
            f"Messages from {item.sender} are not mailed to {lists}: this bridge's "
            "configuration does not let them use it. (Said once a day in this room.)",
            reply_to=item.event_id,
        )

    async def _notice(
        self,
        room_id: RoomID,
        text: str,
        *,
        key: str,
        reply_to: EventID | None = None,
        thread_root: EventID | None = None,
    ) -> None:
        content = notice_content(text, reply_to=reply_to, thread_root=thread_root)
        await self.client.send_event(room_id, "m.room.message", content, derived_txn_id(key))


class OutcomeReporter:
    """Tells each room what became of its mail: a reply on failure, a ✉️ reaction on success
    when mail.on_sent says so. A report that cannot be posted now is tried again later."""

    def __init__(self, config: Config, db: Database, client: MatrixClient) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.include_sent = config.mail.on_sent == "reaction"
        self._wake = asyncio.Event()

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.report_once()
            except Exception as e:
                log.warning("cannot report mail outcomes now: %s", e)
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), REPORT_INTERVAL)

    async def report_once(self) -> int:
        """Report what is waiting; returns how many were reported."""
        outcomes = await outbox_db.outcomes_to_report(
            self.db, REPORT_BATCH, include_sent=self.include_sent
        )
        if not outcomes:
            return 0
        links = {link.id: link for link in await link_db.all_links(self.db)}
        reported = 0
        for outcome in outcomes:
            link = links.get(outcome.link_id)
            if link is not None:
                try:
                    await self._report(link, outcome)
                except TransientError as e:
                    log.info("outcome of outbox item %d waits: %s", outcome.id, e)
                    return reported
                except PermanentError as e:
                    log.warning("outcome of outbox item %d not posted: %s", outcome.id, e)
            await outbox_db.mark_reported(self.db, outcome.id)
            reported += 1
        return reported

    async def _report(self, link: Link, outcome: Outcome) -> None:
        room_id, event_id = RoomID(outcome.room_id), EventID(outcome.event_id)
        if outcome.state == "sent":
            content = {
                "m.relates_to": {
                    "rel_type": "m.annotation",
                    "event_id": event_id,
                    "key": SENT_REACTION,
                }
            }
            txn = derived_txn_id("mail-sent", str(outcome.id), event_id)
            await self.client.send_event(room_id, "m.reaction", content, txn)
            return
        mapped = await mail_db.lookup_event(self.db, link.id, event_id)
        what = "Your correction" if outcome.kind == "correction" else "Your message"
        text = f"{what} could not be mailed to {link.remote}: {outcome.message or 'failed'}"
        content = notice_content(text, reply_to=event_id, thread_root=thread_of(mapped, event_id))
        txn = derived_txn_id("mail-failed", str(outcome.id), event_id)
        await self.client.send_event(room_id, "m.room.message", content, txn)
