"""Mail → room: each stored mail parsed, checked, threaded and posted once, in order per room."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from bridge.core.audit import AuditEntry, digest
from bridge.core.authentication import AUTHENTICATED, Verdict, load_suffix_list
from bridge.core.backoff import Backoff
from bridge.core.errors import Ignored, Refused, TransientError
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link
from bridge.core.marking import Levels, mail_marking, may_post
from bridge.core.message import Attachment, IncomingMessage
from bridge.core.recorder import GroupCommit
from bridge.core.retry import describe, settle_stored
from bridge.core.router import RoomQueues
from bridge.core.tasks import TaskGroup, wait_for
from bridge.core.threading import Mapped, ThreadTarget, resolve_thread
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import Database
from bridge.db.mail import PostedMail, RawMail

log = logging.getLogger("passerelle.mail.relay")

BATCH = 200
# Mails of a room prepared (parsed, sender checked, looked up) while the one before them is
# sent. A few are enough to keep the send path free; more would only hold the interpreter.
AHEAD = 4
SWEEP_INTERVAL = 10.0
TRIMMED = "quoted history trimmed"


class RoomPoster(Protocol):
    """What the relay needs from the Matrix side."""

    async def post(
        self,
        room_id: RoomID,
        message: IncomingMessage,
        target: ThreadTarget,
        *,
        key: str,
        threads: bool,
        ts: int | None,
    ) -> EventID: ...

    async def notice(
        self, room_id: RoomID, text: str, *, key: str, thread_root: EventID | None = None
    ) -> None: ...


class BounceTaker(Protocol):
    """What the relay needs to keep delivery reports out of rooms (bridge/relay/bounces.py)."""

    async def take(self, link: Link, raw: bytes) -> bool: ...


Parser = Callable[[bytes], IncomingMessage]
# The verdict on a raw mail whose From: is the given (validated) address; may block on DNS, so
# it runs in a worker thread.
Authenticator = Callable[[bytes, str], Verdict]


def synthetic_message_id(raw: bytes) -> str:
    """For a mail without Message-ID: stable, so a refetch maps to the same message."""
    return f"{hashlib.sha256(raw).hexdigest()[:40]}@no-message-id.passerelle.invalid"


def with_original(message: IncomingMessage, raw: bytes) -> IncomingMessage:
    """When the text was trimmed, the whole mail comes along as a file, so nothing is lost."""
    if TRIMMED not in message.notes:
        return message
    original = Attachment("original-message.eml", "message/rfc822", raw)
    return dataclasses.replace(message, attachments=(*message.attachments, original))


# A mail's final state → its audit outcome.
_OUTCOMES = {"done": "posted", "rejected": "refused", "duplicate": "ignored"}


@dataclasses.dataclass(frozen=True)
class MailFacts:
    """What handle() learned of a mail, for its audit row when it settles."""

    sender: str
    message_id: str
    verdict: str | None = None  # sender authentication: authenticated | unverified | failed


@dataclasses.dataclass
class _Prepared:
    """A mail's parse, sender verdict and Message-ID lookup, worked out ahead of its turn.
    Each failure is kept and raised at the step of the turn that needs it, as if that step
    had run then."""

    message: IncomingMessage | None = None
    parse_error: Exception | None = None
    verdict: Verdict | None = None
    verdict_error: Exception | None = None
    looked_up: bool = False
    existing: Mapped | None = None


@dataclasses.dataclass
class _Remembered:
    """A posted mail's mapping, known here from its send until no lookup can miss it."""

    mapped: Mapped
    committed_at: int | None = None  # the relay's sequence number when its record committed


@dataclasses.dataclass(frozen=True)
class _Record:
    posted: PostedMail
    key: tuple[int, str]


def _log_warm_up(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.warning("the Public Suffix List could not be loaded ahead: %s", error)


def _timestamp(message: IncomingMessage) -> int | None:
    """The mail's own date for the event, never in the future."""
    if message.date is None:
        return None
    ms = int(message.date.timestamp() * 1000)
    return max(0, min(ms, int(time.time() * 1000)))


class MailRelay:
    """Drains the raw mail store into rooms. Parse and policy refusals are final and told to
    the room (once per sender per day); a homeserver outage is waited out; anything else is
    retried `max_attempts` times, then the mail is quarantined and the room told. One bad mail
    never holds up the ones after it."""

    def __init__(
        self,
        db: Database,
        parse: Parser,
        poster: RoomPoster,
        tasks: TaskGroup,
        *,
        authenticate: Authenticator,
        max_attempts: int,
        is_own_message: Callable[[str], bool] = lambda _mid: False,
        has_own_marker: Callable[[bytes], bool] = lambda _raw: False,
        levels: Levels | None = None,  # mail.markings.levels; None: no link checks markings
        bounces: BounceTaker | None = None,
    ) -> None:
        self.db = db
        self.parse = parse
        self.authenticate = authenticate
        self.poster = poster
        self.max_attempts = max_attempts
        self.is_own_message = is_own_message
        self.has_own_marker = has_own_marker
        self.levels = levels
        self.bounces = bounces
        self._wake = asyncio.Event()
        self._warm_up: asyncio.Future[None] | None = None
        self._in_flight: set[int] = set()
        self._ahead: dict[int, asyncio.Task[_Prepared]] = {}
        self._facts: dict[int, MailFacts] = {}
        self._queues: RoomQueues[tuple[Link, RawMail]] = RoomQueues(self._process, tasks, "mail")
        # A posted mail is recorded (mapping, state, audit row) in the background, several per
        # commit, while its room's next mail is sent; until then it stays in flight.
        self._recorder: GroupCommit[_Record] = GroupCommit(
            self._write_records,
            tasks,
            "mail",
            done=self._recorded,
            failed=self._record_failed,
        )
        self._recorded_later: set[int] = set()
        # Mappings of posted mails by (link, Message-ID): a reply or a copy handled before the
        # record commits finds its mail here. Kept past the commit while a lookup made ahead
        # of a mail's turn may have read the database before it (`_readers`: mail ID → the
        # sequence number when its lookup started).
        self._seq = itertools.count()
        self._posted: dict[tuple[int, str], _Remembered] = {}
        self._committed: collections.deque[tuple[int, tuple[int, str], _Remembered]] = (
            collections.deque()
        )
        self._readers: dict[int, int] = {}
        self.retry_initial = 1.0
        # Told the seconds from fetch to post of every mail posted (the metrics' latency).
        self.on_posted: Callable[[float], None] | None = None

    def notify(self) -> None:
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._queues.wait_idle()
        await self._recorder.wait_idle()

    async def run(self) -> None:
        # In a worker thread while the first sweep runs: the first mail checked would wait.
        loop = asyncio.get_running_loop()
        self._warm_up = loop.run_in_executor(None, load_suffix_list)
        self._warm_up.add_done_callback(_log_warm_up)
        while True:
            self._wake.clear()
            try:
                # A snapshot taken before the query: an item that finishes meanwhile is no longer
                # pending when the query reads, so it cannot be submitted twice.
                found = await mail_db.pending_mail(self.db, BATCH, set(self._in_flight))
                links = {link.id: link for link in await link_db.all_links(self.db)}
            except Exception as e:
                log.error("cannot read the mail store (%s); retrying", e)
                await asyncio.sleep(5)
                continue
            rooms = set()
            for raw in found:
                link = links.get(raw.link_id)
                if link is None or link.paused:
                    continue
                self._in_flight.add(raw.id)
                self._queues.submit(link.room_id, (link, raw))
                rooms.add(link.room_id)
            for room_id in rooms:
                self._prepare_ahead(room_id)
            if len(found) < BATCH:
                with contextlib.suppress(TimeoutError):
                    await wait_for(self._wake.wait(), SWEEP_INTERVAL)

    # -- a history backfill settles its mails here, one at a time, outside the live queue ------

    def prepare(self, link: Link, raw: RawMail) -> None:
        """Start working out (parse, verdict, lookup) a mail that `settle` will be given soon."""
        if raw.raw is not None and raw.id not in self._ahead:
            self._ahead[raw.id] = asyncio.create_task(
                self._prepare(link, raw), name=f"mail-ahead:{raw.id}"
            )

    async def settle(self, link: Link, raw: RawMail) -> None:
        """Bridge one stored mail now, exactly as a live one (its record may follow)."""
        await self._process((link, raw))

    def forget(self, raw: RawMail) -> None:
        """Drop what `prepare` started for a mail that will not be settled now."""
        self._drop_ahead(raw)

    async def recorded(self) -> None:
        """Wait until every posted mail's record is committed (its outcome readable)."""
        await self._recorder.wait_idle()

    # -- ahead of a mail's turn -----------------------------------------------------------------

    def _prepare_ahead(self, room_id: str) -> None:
        """The room's current mail and the next AHEAD ones get prepared, in the background:
        a room posts one mail at a time, and while it waits for the homeserver the next
        mails are parsed, checked and looked up, so that their turn is only the send."""
        for link, raw in self._queues.upcoming(room_id, AHEAD + 1):
            if raw.raw is not None and raw.id not in self._ahead:
                self._ahead[raw.id] = asyncio.create_task(
                    self._prepare(link, raw), name=f"mail-ahead:{raw.id}"
                )

    async def _prepare(self, link: Link, raw: RawMail) -> _Prepared:
        assert raw.raw is not None
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(None, self._parse_and_check, raw.raw)
        if prepared.message is None:
            return prepared
        message_id = prepared.message.thread.message_id or synthetic_message_id(raw.raw)
        self._readers[raw.id] = next(self._seq)
        try:
            prepared.existing = await mail_db.lookup(self.db, link.id, message_id)
            prepared.looked_up = True
        except Exception as e:
            log.debug("lookup ahead of mail %d failed (%s); it is done in its turn", raw.id, e)
        return prepared

    def _parse_and_check(self, raw: bytes) -> _Prepared:
        """In a worker thread: parse, then the sender's verdict (it may block on DNS)."""
        prepared = _Prepared()
        try:
            prepared.message = self.parse(raw)
        except Exception as e:
            prepared.parse_error = e
            return prepared
        try:
            prepared.verdict = self.authenticate(raw, prepared.message.sender.address)
        except Exception as e:
            prepared.verdict_error = e
        return prepared

    async def _prepared(self, raw: RawMail) -> _Prepared | None:
        """What was worked out ahead of this turn (None on a retry: each step runs now)."""
        task = self._ahead.pop(raw.id, None)
        if task is None:
            return None
        return await task

    def _drop_ahead(self, raw: RawMail) -> None:
        leftover = self._ahead.pop(raw.id, None)
        if leftover is not None:
            leftover.cancel()
        if self._readers.pop(raw.id, None) is not None:
            self._forget_committed()

    # -- mappings posted but maybe not yet committed --------------------------------------------

    def _remember(self, key: tuple[int, str], mapped: Mapped) -> _Remembered:
        entry = self._posted[key] = _Remembered(mapped)
        return entry

    def _remembered(self, link_id: int, message_id: str) -> Mapped | None:
        entry = self._posted.get((link_id, message_id))
        return entry.mapped if entry is not None else None

    def _forget_committed(self) -> None:
        """Committed mappings no lookup made ahead can have missed leave the memory."""
        floor = min(self._readers.values(), default=math.inf)
        while self._committed and self._committed[0][0] < floor:
            _, key, entry = self._committed.popleft()
            if self._posted.get(key) is entry:
                del self._posted[key]

    async def _known(self, link_id: int, message_id: str) -> Mapped | None:
        remembered = self._remembered(link_id, message_id)
        if remembered is not None:
            return remembered
        return await mail_db.lookup(self.db, link_id, message_id)

    async def _process(self, item: tuple[Link, RawMail]) -> None:
        link, raw = item
        label = f"mail {raw.uidvalidity}/{raw.uid} of {link.remote}"
        self._prepare_ahead(link.room_id)

        async def handle() -> None:
            await self.handle(link, raw)

        async def finish(state: str, reason: str) -> None:
            audit = self._audit(link, raw, state, reason)
            await mail_db.finish(self.db, raw.id, state, error=reason, audit=audit)

        async def count_failure(reason: str) -> int:
            return await mail_db.count_failure(self.db, raw.id, reason)

        async def give_up(reason: str) -> None:
            await self._tell_until_delivered(
                link,
                f"A mail to {link.remote} could not be bridged after {self.max_attempts} "
                f"attempts and was set aside (quarantine #{raw.id}). The administrator can "
                "find it in the bridge's database and logs.",
                key=f"quarantine:{raw.id}",
            )
            audit = self._audit(link, raw, "quarantined", reason)
            await mail_db.finish(self.db, raw.id, "quarantined", error=reason, audit=audit)

        try:
            await settle_stored(
                handle,
                finish,
                refused_state="rejected",
                label=label,
                count_failure=count_failure,
                give_up=give_up,
                max_attempts=self.max_attempts,
                log=log,
                initial=self.retry_initial,
            )
        finally:
            if raw.id not in self._recorded_later:
                self._in_flight.discard(raw.id)
            self._facts.pop(raw.id, None)
            self._drop_ahead(raw)

    async def handle(self, link: Link, raw: RawMail) -> None:
        """Bridge one stored mail; raises Refused or Ignored for final non-posting outcomes."""
        if raw.raw is None:
            problem = (
                f"is larger ({raw.size} bytes) than this bridge accepts"
                if raw.size >= 0
                else "could not be fetched from the mailbox"
            )
            await self._tell(
                link,
                f"A mail to {link.remote} {problem}; it was set aside (#{raw.id}).",
                key=f"oversized:{raw.id}",
            )
            audit = self._audit(link, raw, "quarantined", problem)
            await mail_db.finish(self.db, raw.id, "quarantined", error=problem, audit=audit)
            return
        # The bridge's own mail, come back from the list, is known by its stored Message-ID or
        # its loop header before anything in it is checked (its sender may fail the checks).
        own_id = raw.message_id is not None and self.is_own_message(raw.message_id)
        if own_id or self.has_own_marker(raw.raw):
            raise Ignored("the bridge's own mail coming back")
        # A delivery report (its From is a mailer daemon, it says Auto-Submitted) is told next
        # to the message it is about, before any sender or auto-reply check; never posted.
        if self.bounces is not None and await self.bounces.take(link, raw.raw):
            raise Ignored("a delivery report")
        prepared = await self._prepared(raw)
        try:
            if prepared is None:
                message = self.parse(raw.raw)
            elif prepared.message is not None:
                message = prepared.message
            else:
                assert prepared.parse_error is not None
                raise prepared.parse_error
        except Refused as e:
            await self._refused(
                link, "(unreadable)", f"A mail to {link.remote} was not posted: {e}."
            )
            raise
        message_id = message.thread.message_id or synthetic_message_id(raw.raw)
        self._facts[raw.id] = MailFacts(message.sender.address, message_id, verdict=None)
        if message.auto_generated:
            raise Ignored("automatic reply")
        if self.is_own_message(message_id) or self.has_own_marker(raw.raw):
            raise Ignored("the bridge's own mail coming back")
        address = message.sender.address
        if not link.settings.sender_allowed(address):
            await self._refused(
                link,
                address,
                f"Mail from {address} to {link.remote} is not posted here: its domain is not "
                "among this link's allowed senders.",
            )
            raise Refused(f"sender {address} not allowed")
        await self._check_marking(link, message, raw)
        existing = self._remembered(link.id, message_id)
        if existing is None:
            if prepared is not None and prepared.looked_up:
                existing = prepared.existing
            else:
                existing = await mail_db.lookup(self.db, link.id, message_id)
        if existing is not None:
            # Posted before a crash could record the outcome, or a copy under a new UID.
            audit = self._audit(link, raw, "done", "posted before", existing.event_id)
            await mail_db.finish(self.db, raw.id, "done", event_id=existing.event_id, audit=audit)
            return
        message = await self._authenticated(link, raw, message, prepared)

        async def known(mid: str) -> Mapped | None:
            return await self._known(link.id, mid)

        threads = link.settings.thread_mode == "threads"
        target = await resolve_thread(message.thread, known)
        message = with_original(message, raw.raw)
        event_id = await self.poster.post(
            link.room_id,
            message,
            target,
            key=f"{link.id}:{raw.uidvalidity}:{raw.uid}",
            threads=threads,
            ts=_timestamp(message),
        )
        root = target.thread_root if target.thread_root is not None else event_id
        thread_root = root if threads else event_id
        key = (link.id, message_id)
        self._remember(key, Mapped(event_id, thread_root, message.subject))
        # Recorded while the room's next mail is sent. A crash before the commit leaves the
        # mail pending: it is sent again with the same transaction IDs, and the homeserver
        # answers with the events it already made (exactly once, in order).
        self._recorded_later.add(raw.id)
        posted = PostedMail(
            mail_id=raw.id,
            link_id=link.id,
            message_id=message_id,
            room_id=link.room_id,
            event_id=event_id,
            thread_root=thread_root,
            subject=message.subject,
            audit=self._audit(link, raw, "done", None, event_id),
        )
        self._recorder.add(_Record(posted, key))
        log.info("posted mail %s/%s of %s as %s", raw.uidvalidity, raw.uid, link.remote, event_id)
        if raw.received_at and self.on_posted is not None:
            self.on_posted(max(0.0, time.time() - raw.received_at / 1000))

    # -- records, off the send path --------------------------------------------------------------

    async def _write_records(self, records: list[_Record]) -> None:
        await mail_db.record_posted_many(self.db, [record.posted for record in records])

    def _recorded(self, record: _Record) -> None:
        mail_id = record.posted.mail_id
        self._recorded_later.discard(mail_id)
        self._in_flight.discard(mail_id)
        entry = self._posted.get(record.key)
        if entry is not None and entry.mapped.event_id == record.posted.event_id:
            entry.committed_at = next(self._seq)
            self._committed.append((entry.committed_at, record.key, entry))
        self._forget_committed()

    def _record_failed(self, record: _Record, error: Exception) -> None:
        """The mail stays pending: a sweep sends it again with the same transaction IDs."""
        posted = record.posted
        log.error(
            "mail %d was posted as %s but could not be recorded (%s); it will be sent again "
            "with the same transaction ID",
            posted.mail_id,
            posted.event_id,
            describe(error),
        )
        entry = self._posted.get(record.key)
        if entry is not None and entry.mapped.event_id == posted.event_id:
            del self._posted[record.key]
        self._recorded_later.discard(posted.mail_id)
        self._in_flight.discard(posted.mail_id)
        asyncio.get_running_loop().call_later(self.retry_initial, self.notify)

    async def _authenticated(
        self, link: Link, raw: RawMail, message: IncomingMessage, prepared: _Prepared | None
    ) -> IncomingMessage:
        """The message with its verdict; Refused (the room told once a day per sender) when
        the link requires its sender's domain to be authenticated and it is not. Nothing
        about a refused mail reaches Matrix: no ghost is made or renamed for it."""
        address = message.sender.address
        assert raw.raw is not None
        if prepared is not None and prepared.verdict is not None:
            verdict = prepared.verdict
        elif prepared is not None and prepared.verdict_error is not None:
            raise prepared.verdict_error
        else:
            loop = asyncio.get_running_loop()
            verdict = await loop.run_in_executor(None, self.authenticate, raw.raw, address)
        log.debug("sender %s of a mail to %s: %s", address, link.remote, verdict.reason)
        facts = self._facts.get(raw.id)
        if facts is not None:
            self._facts[raw.id] = dataclasses.replace(facts, verdict=verdict.verdict)
        if verdict.verdict != AUTHENTICATED and link.settings.authentication_required(address):
            await self._refused(
                link,
                address,
                f"Mail from {address} to {link.remote} is not posted here: this link requires "
                f"its sender to be authenticated, and it is {verdict.verdict} "
                f"({verdict.reason}).",
            )
            raise Refused(f"sender {address} {verdict.verdict}: {verdict.reason}")
        return dataclasses.replace(message, auth=verdict)

    def _audit(
        self,
        link: Link,
        raw: RawMail,
        state: str,
        reason: str | None,
        event_id: str | None = None,
    ) -> AuditEntry:
        """The audit row of a mail settling in `state`, stored with that state."""
        facts = self._facts.get(raw.id)
        message_id = facts.message_id if facts is not None else raw.message_id
        ids = {"message_id": message_id or "", "event_id": event_id or ""}
        return AuditEntry(
            direction="mail_in",
            link=link.remote,
            room_id=link.room_id,
            sender=facts.sender if facts is not None else None,
            outcome=_OUTCOMES.get(state, state),
            recipients=(link.room_id,),
            ids=ids,
            reason=reason,
            verdict=facts.verdict if facts is not None else None,
            body_sha256=digest(raw.raw) if raw.raw is not None else None,
        )

    async def _check_marking(self, link: Link, message: IncomingMessage, raw: RawMail) -> None:
        """A mail marked above the link (or with an unknown marking) is not posted. The room
        hears of every such mail (a rare and serious event), never its subject or text."""
        if self.levels is None:
            return
        found = mail_marking(message.marking_headers, message.marking_subjects, self.levels)
        verdict = may_post(link.settings.marking, found, self.levels)
        if verdict.allowed:
            return
        await self._tell(
            link,
            f"A mail from {message.sender.address} to {link.remote} was not posted here: "
            f"{verdict.reason}. Its subject and text are not shown here; it was set aside "
            f"(#{raw.id}).",
            key=f"marking:{raw.id}",
        )
        raise Refused(f"marking: {verdict.reason}")

    async def _refused(self, link: Link, who: str, text: str) -> None:
        """Count a refusal; the room hears of each sender once a day, the log every time."""
        day = dt.datetime.now(dt.UTC).date().isoformat()
        who = who[:320]
        if await mail_db.refusals_today(self.db, link.id, who, day) == 0:
            # Told before counted: if telling fails, the retry tells again instead of nobody.
            await self._tell(
                link, f"{text} (Said once a day per sender.)", key=f"refused:{link.id}:{who}:{day}"
            )
        count = await mail_db.count_refusal(self.db, link.id, who, day)
        log.info("mail from %s to %s not posted (%d today)", who, link.remote, count)

    async def _tell(self, link: Link, text: str, *, key: str) -> None:
        await self.poster.notice(link.room_id, text, key=key)

    async def _tell_until_delivered(self, link: Link, text: str, *, key: str) -> None:
        """A notice that must not be lost: wait out a homeserver outage (same key, so a
        retry after a crash is not posted twice); give up only on a permanent refusal."""
        backoff = Backoff(initial=self.retry_initial, maximum=60.0)
        while True:
            try:
                await self._tell(link, text, key=key)
                return
            except TransientError as e:
                delay = backoff.next_delay()
                log.warning("notice to %s waits: %s; retrying in %.1f s", link.room_id, e, delay)
                await asyncio.sleep(delay)
            except Exception as e:
                log.error("notice to %s failed: %s", link.room_id, describe(e))
                return
