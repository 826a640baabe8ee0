"""Reading a folder's existing mail for a history backfill, on a connection of its own."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from bridge.mail.imap_session import ImapFolder, ImapSession, MailboxConfig
from bridge.mail.store import message_id_of

log = logging.getLogger("passerelle.mail.backfill")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Bodies are asked for in runs of about this many bytes (or one mail, if larger).
_FETCH_BYTES = 8 * 1024 * 1024


def imap_date(date: dt.date) -> str:
    """RFC 3501 date-text: 1-Feb-2024 (month names are English whatever the locale)."""
    return f"{date.day}-{_MONTHS[date.month - 1]}-{date.year}"


@dataclass(frozen=True)
class Fetched:
    """One mail of the folder as stored for the backfill: raw None when it was not fetched."""

    uid: int
    message_id: str | None
    raw: bytes | None
    size: int  # -1: could not be fetched
    error: str | None = None


class HistorySession:
    """An open folder: which UIDs a backfill takes, and their mail."""

    def __init__(
        self, mailbox: str, folder: ImapFolder, session: ImapSession, max_size: int
    ) -> None:
        self._mailbox = mailbox
        self._folder = folder
        self._session = session
        self._max_size = max_size

    @property
    def uidvalidity(self) -> int:
        return self._session.uidvalidity

    async def highest_uid(self) -> int:
        found = await self._folder.search_from(self._session, 1)
        return found[-1] if found else 0

    async def search(self, upto: int, since: dt.date | None) -> list[int]:
        """UIDs up to `upto`, received since `since` (the server's INTERNALDATE), ascending."""
        return await self._folder.search_below(
            self._session, upto, imap_date(since) if since is not None else None
        )

    async def fetch(self, uids: Sequence[int]) -> list[Fetched]:
        """The mails of `uids` in UID order; an expunged one is left out, a too large or
        unreadable one comes without its body (the room is told of it as for live mail)."""
        if not uids:
            return []
        sizes = await self._folder.sizes(self._session, uids)
        bodies: dict[int, bytes] = {}
        run: list[int] = []
        weight = 0
        wanted = [uid for uid in uids if (sizes.get(uid) or 0) <= self._max_size]
        for uid in wanted:
            size = sizes.get(uid) or 0
            if run and weight + size > _FETCH_BYTES:
                bodies.update(await self._folder.bodies(self._session, run))
                run, weight = [], 0
            run.append(uid)
            weight += size
        if run:
            bodies.update(await self._folder.bodies(self._session, run))
        out: list[Fetched] = []
        for uid in uids:
            reported = sizes.get(uid)
            body = bodies.get(uid)
            if body is not None and len(body) <= self._max_size:
                out.append(Fetched(uid, message_id_of(body), body, len(body)))
            elif (reported is not None and reported > self._max_size) or body is not None:
                real = len(body) if body is not None else int(reported or 0)
                out.append(Fetched(uid, None, None, real, "too large to fetch"))
            elif await self._folder.exists(self._session, uid):
                log.warning(
                    "IMAP %s backfill: UID %d could not be read; set aside", self._mailbox, uid
                )
                out.append(Fetched(uid, None, None, -1, "could not be fetched"))
            else:
                log.info("IMAP %s backfill: UID %d was expunged meanwhile", self._mailbox, uid)
        return out


class HistoryReader:
    """Opens the folder of one mailbox for a backfill, apart from the live watcher's IDLE."""

    def __init__(
        self, mailbox: str, config: MailboxConfig, *, max_size: int, timeout: float = 30.0
    ) -> None:
        self._mailbox = mailbox
        self._max_size = max_size
        # Never IDLEs or polls: the two intervals are unused.
        self._folder = ImapFolder(
            mailbox, config, idle_renew=60.0, poll_interval=60.0, connect_timeout=timeout
        )

    def reason(self, exc: BaseException) -> str:
        """One line about an IMAP failure, safe to show (no password)."""
        return self._folder.reason(exc)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[HistorySession]:
        async with self._folder.open() as session:
            yield HistorySession(self._mailbox, self._folder, session, self._max_size)
