"""Bounces → room: a delivery report about the bridge's mail, told next to the message it names.

A report is found by the VERP token of the address it was delivered to, else by the Message-ID
of the mail it returns. It is never posted as mail; one that names nothing of the bridge's is
dropped (logged without its content). Told once: each (mail, action, recipient) has a key, so a
report read again after a crash, or a second report about the same recipient, says nothing new.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence

from bridge.config import Config
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import EventID
from bridge.core.links import Link
from bridge.db import kv
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db.engine import Database
from bridge.db.outbox import SentMail
from bridge.mail.dsn import (
    DeliveryReport,
    RecipientStatus,
    delay_text,
    failure_text,
    looks_like_report,
    parse_report,
    told_recipients,
)
from bridge.mail.verp import item_of_address, verp_address
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.render import notice_content
from bridge.relay.notices import thread_of

log = logging.getLogger("passerelle.mail.bounces")


def envelope_sender(config: Config, from_address: str, item_id: int) -> str:
    """The envelope sender of outbox item `item_id` of a link sending from `from_address`."""
    settings = config.mail.bounces
    base = settings.address or from_address
    return verp_address(base, item_id, config.bounce_secret) if settings.verp else base


def _recipient_key(sent: SentMail, action: str, status: RecipientStatus) -> str:
    who = hashlib.sha256(status.recipient.lower().encode("utf-8")).hexdigest()[:24]
    return f"bounce:{sent.id}:{action}:{who}"


class Bounces:
    """Reads delivery reports and tells the room of the mail they are about."""

    def __init__(self, config: Config, db: Database, client: MatrixClient) -> None:
        self.secret = config.bounce_secret
        self.db = db
        self.client = client

    async def take(self, link: Link, raw: bytes) -> bool:
        """A mail of a linked mailbox: True if it is a delivery report (told, or dropped when
        it names no mail of this link), False for anything else."""
        if not looks_like_report(raw):
            return False
        report = await asyncio.to_thread(parse_report, raw)
        if report is not None:
            await self._handle(report, [link], link.remote)
        return True

    async def take_unlinked(self, mailbox: str, raw: bytes) -> None:
        """A mail of the bounce mailbox: a report is told in the room of the mail it names
        (any link's); anything else is dropped."""
        report = await asyncio.to_thread(parse_report, raw) if looks_like_report(raw) else None
        if report is None:
            log.info("a mail in the bounce mailbox %s is not a delivery report; dropped", mailbox)
            return
        links = [link for link in await link_db.all_links(self.db) if link.kind == "mail"]
        await self._handle(report, links, mailbox)

    async def _handle(self, report: DeliveryReport, links: Sequence[Link], where: str) -> None:
        if report.null_sender is False:
            # RFC 3464 reports are sent with an empty return path; this one was not.
            log.info("a delivery report in %s with a return path; dropped", where)
            return
        found = await self._find(report, links)
        if found is None:
            log.info("a delivery report in %s names no mail of the bridge here; dropped", where)
            return
        sent, link = found
        failed = told_recipients(report, "failed")
        delayed = told_recipients(report, "delayed")
        log.info(
            "delivery report from %s about outbox item %d: %d failed, %d delayed",
            report.reporting_mta or "an unnamed server",
            sent.id,
            len(failed),
            len(delayed),
        )
        if link.paused:
            log.info("link to %s is paused: the report is not told", link.remote)
            return
        if failed:
            await self._tell(link, sent, "failed", failed)
        if delayed:
            await self._tell(link, sent, "delayed", delayed)

    async def _find(
        self, report: DeliveryReport, links: Sequence[Link]
    ) -> tuple[SentMail, Link] | None:
        by_id = {link.id: link for link in links}
        for address in report.envelope_to:
            item_id = item_of_address(address, self.secret)
            if item_id is None:
                continue
            sent = await outbox_db.sent_mail(self.db, item_id)
            if sent is not None and sent.link_id in by_id:
                return sent, by_id[sent.link_id]
            log.info("a delivery report names outbox item %d, not of this mailbox's link", item_id)
        for message_id in report.original_message_ids:
            for link in links:
                mapped = await mail_db.lookup(self.db, link.id, message_id)
                if mapped is None:
                    continue
                sent = await outbox_db.sent_mail_of_event(
                    self.db, link.id, mapped.event_id, message_id
                )
                if sent is not None:
                    return sent, link
        return None

    async def _tell(
        self, link: Link, sent: SentMail, action: str, statuses: list[RecipientStatus]
    ) -> None:
        """One notice for the recipients not told yet; "delayed" is said once per mail."""
        if action == "delayed":
            keys = {f"bounce:{sent.id}:delayed": statuses}
        else:
            keys = {_recipient_key(sent, action, s): [s] for s in statuses}
        new = {k: v for k, v in keys.items() if await kv.get_value(self.db, k) is None}
        if not new:
            return
        untold = [s for group in new.values() for s in group]
        text = failure_text(untold) if action == "failed" else delay_text(untold)
        event_id = EventID(sent.event_id)
        mapped = await mail_db.lookup_event(self.db, link.id, event_id)
        content = notice_content(text, reply_to=event_id, thread_root=thread_of(mapped, event_id))
        try:
            await self.client.send_event(
                link.room_id, "m.room.message", content, derived_txn_id(*sorted(new))
            )
        except PermanentError as e:
            log.warning("report about outbox item %d not told in the room: %s", sent.id, e)
            return
        # Told before recorded: a crash in between tells again (same transaction ID).
        for key in new:
            await kv.set_value(self.db, key, event_id)


class BounceMailboxStore:
    """Implements the IMAP watcher's MailboxStore for the bounce mailbox: each mail is handled
    as it is fetched (it has no room of its own to wait for) and the position kept in kv."""

    def __init__(self, db: Database, bounces: Bounces) -> None:
        self.db = db
        self.bounces = bounces

    @staticmethod
    def _key(mailbox: str) -> str:
        return f"bounce_mailbox:{mailbox}"

    async def _position(self, mailbox: str) -> tuple[int, int] | None:
        value = await kv.get_value(self.db, self._key(mailbox))
        if value is None:
            return None
        validity, _, uid = value.partition(":")
        return int(validity), int(uid)

    async def needs_baseline(self, mailbox: str) -> bool:
        return await self._position(mailbox) is None

    async def set_baseline(self, mailbox: str, uidvalidity: int, uid: int) -> None:
        await kv.set_value(self.db, self._key(mailbox), f"{uidvalidity}:{uid}")

    async def resume_point(self, mailbox: str, uidvalidity: int) -> int:
        position = await self._position(mailbox)
        return position[1] if position is not None and position[0] == uidvalidity else 0

    async def store_raw(self, mailbox: str, uidvalidity: int, uid: int, raw: bytes) -> None:
        try:
            await self.bounces.take_unlinked(mailbox, raw)
        except TransientError:
            raise  # the homeserver is down: the watcher reconnects and fetches it again
        except Exception:
            # One bad report must not hold up the mailbox; the database being down does (the
            # position below cannot be saved either, so the mail is fetched again).
            log.exception("bounce %s/%d of %s could not be handled", uidvalidity, uid, mailbox)
        await self.set_baseline(mailbox, uidvalidity, uid)

    async def store_oversized(self, mailbox: str, uidvalidity: int, uid: int, size: int) -> None:
        log.info("bounce %s/%d of %s not fetched (%d bytes)", uidvalidity, uid, mailbox, size)
        await self.set_baseline(mailbox, uidvalidity, uid)

    def notify(self) -> None:
        pass
