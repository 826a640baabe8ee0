"""The IMAP side's view of the database: where to resume, and storing what was fetched."""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Callable

from bridge.db import kv
from bridge.db import mail as mail_db
from bridge.db.engine import Database

_MID = re.compile(r"<([^<>\s]{1,900})>")


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID of a raw mail (headers only, bounded), without <>; None if absent."""
    head = raw[:65536].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        value = headers.get("Message-ID")
    except Exception:
        return None
    match = _MID.search(str(value or ""))
    return match.group(1) if match else None


class DbMailboxStore:
    """Implements the IMAP watcher's MailboxStore for one link."""

    def __init__(self, db: Database, link_id: int, notify: Callable[[], None]) -> None:
        self.db = db
        self.link_id = link_id
        self._notify = notify

    def _baseline_key(self, mailbox: str) -> str:
        return f"mail_baseline:{self.link_id}:{mailbox}"

    async def baseline(self, mailbox: str) -> tuple[int, int] | None:
        """(uidvalidity, uid) a new link starts after, so only mail from then on is posted."""
        value = await kv.get_value(self.db, self._baseline_key(mailbox))
        if value is None:
            return None
        validity, _, uid = value.partition(":")
        return int(validity), int(uid)

    async def needs_baseline(self, mailbox: str) -> bool:
        return await self.baseline(mailbox) is None and not await mail_db.has_any_mail(
            self.db, self.link_id
        )

    async def set_baseline(self, mailbox: str, uidvalidity: int, uid: int) -> None:
        await kv.set_value(self.db, self._baseline_key(mailbox), f"{uidvalidity}:{uid}")

    async def resume_point(self, mailbox: str, uidvalidity: int) -> int:
        stored = await mail_db.highest_uid(self.db, mailbox, uidvalidity)
        base = await self.baseline(mailbox)
        if base is not None and base[0] == uidvalidity:
            return max(stored, base[1])
        return stored

    async def store_raw(self, mailbox: str, uidvalidity: int, uid: int, raw: bytes) -> None:
        await mail_db.store_raw(
            self.db,
            link_id=self.link_id,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            uid=uid,
            message_id=message_id_of(raw),
            raw=raw,
            size=len(raw),
        )

    async def store_raw_many(
        self, mailbox: str, uidvalidity: int, mails: list[tuple[int, bytes]]
    ) -> None:
        """Several fetched mails (UID, raw), in UID order, in one commit."""
        await mail_db.store_raw_many(
            self.db,
            link_id=self.link_id,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            mails=[mail_db.FetchedMail(uid, message_id_of(raw), raw) for uid, raw in mails],
        )

    async def store_oversized(self, mailbox: str, uidvalidity: int, uid: int, size: int) -> None:
        await mail_db.store_raw(
            self.db,
            link_id=self.link_id,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            uid=uid,
            message_id=None,
            raw=None,
            size=size,
            error="too large to fetch" if size >= 0 else "could not be fetched",
        )

    def notify(self) -> None:
        self._notify()
