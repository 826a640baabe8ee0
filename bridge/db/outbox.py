"""The outbox of mail to send: queueing, the worker's store, and outcomes to tell the room."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, false, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID
from bridge.db.audit import append_all_steps
from bridge.db.engine import Database
from bridge.db.mail import map_statement
from bridge.db.schema import link, mail_outbox
from bridge.db.steps import Step, Steps
from bridge.db.util import bound_insert_ignore, bound_update, now_ms
from bridge.mail.outbox import OutboxItem
from bridge.mail.smtp import SendResult

log = logging.getLogger("passerelle.db.outbox")

KINDS = ("message", "correction")
STATES = ("pending", "sent", "failed")
# At most this many final outcomes (sent, failed) recorded in one commit, and how long the
# first one waits for others to share it (the mail is sent already: this delays only the
# record, and the slot's next mail).
SETTLE_BATCH = 100
SETTLE_DELAY = 0.005


@dataclass(frozen=True)
class NewOutgoing:
    """A mail to queue for a Matrix event, with what maps its Message-ID back to the thread."""

    link_id: int
    room_id: RoomID
    event_id: EventID
    kind: str  # message | correction
    message_id: str  # without <>
    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]
    thread_root: EventID
    subject: str | None
    sender: str | None = None  # the Matrix user, for the audit row
    body_sha256: str | None = None  # of the event's content, for the audit row

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.message_id or self.message_id.startswith("<") or ">" in self.message_id:
            raise ValueError(f"message_id must be bare, without <>: {self.message_id!r}")
        if not self.recipients:
            raise ValueError("a mail needs at least one recipient")


@dataclass(frozen=True)
class Outcome:
    """A finished mail whose outcome the room may need to hear about."""

    id: int
    link_id: int
    room_id: RoomID
    event_id: EventID
    kind: str
    state: str  # sent | failed
    message: str  # the last error, or the refused recipients of a sent mail; "" if none
    code: int | None


@dataclass(frozen=True)
class SentMail:
    """An outbox mail as a delivery report about it needs it."""

    id: int
    link_id: int
    room_id: RoomID
    event_id: EventID
    kind: str
    message_id: str
    state: str


async def enqueue(
    db: Database, item: NewOutgoing, *, envelope: Callable[[int], str] | None = None
) -> int | None:
    """Queue the mail, due now, and map its Message-ID to the event, in one commit.

    `envelope`, given the new outbox id, names the envelope sender instead of item.mail_from
    (a VERP address naming the item). Returns the outbox id, or None if this link already
    queued a mail for this event (a handler run again after a crash): nothing is changed then.
    """
    queued = await enqueue_item(db, item, envelope=envelope)
    return None if queued is None else queued.id


_ENQUEUE_COLUMNS = (
    "link_id",
    "room_id",
    "event_id",
    "kind",
    "message_id",
    "raw",
    "mail_from",
    "recipients",
    "sender",
    "body_sha256",
    "state",
    "attempts",
    "next_attempt_at",
    "created_at",
)


@functools.cache
def _enqueue_statement(dialect: str) -> Any:
    insert = bound_insert_ignore(dialect, mail_outbox, ("link_id", "event_id"), _ENQUEUE_COLUMNS)
    return insert.returning(mail_outbox.c.id)


async def enqueue_item(
    db: Database, item: NewOutgoing, *, envelope: Callable[[int], str] | None = None
) -> OutboxItem | None:
    """`enqueue`, returning the stored mail as the outbox worker sees it (to be handed to it
    without reading it back), or None if it was already queued. One transaction, straight
    through the driver where it can be (`Database.write`)."""
    return await db.write(enqueue_steps(item, envelope=envelope))


def enqueue_steps(
    item: NewOutgoing, *, envelope: Callable[[int], str] | None = None
) -> Callable[[str], Steps[OutboxItem | None]]:
    """The transaction that queues `item` (see `enqueue_item`), to run alone or with others
    (`deferred.Deferred`). `envelope` (the item's envelope sender from its ID) must be a pure
    function, as it may run in the driver's thread."""
    now = now_ms()

    def steps(dialect: str) -> Steps[OutboxItem | None]:
        row = yield Step(
            f"outbox.enqueue.{dialect}",
            functools.partial(_enqueue_statement, dialect),
            {
                "link_id": item.link_id,
                "room_id": item.room_id,
                "event_id": item.event_id,
                "kind": item.kind,
                "message_id": item.message_id,
                "raw": item.raw,
                "mail_from": item.mail_from,
                "recipients": json.dumps(list(item.recipients)),
                "sender": item.sender,
                "body_sha256": item.body_sha256,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            },
            returns="row",
        )
        if row is None:
            return None
        outbox_id = int(row[0])
        mail_from = item.mail_from
        if envelope is not None and (mail_from := envelope(outbox_id)) != item.mail_from:
            yield Step(
                "outbox.envelope",
                _envelope_statement,
                {"b_key": outbox_id, "v_mail_from": mail_from},
            )
        # A reply to this mail threads back under the event's thread.
        yield Step(
            f"message_map.insert.{dialect}",
            functools.partial(map_statement, dialect),
            {
                "link_id": item.link_id,
                "message_id": item.message_id,
                "room_id": item.room_id,
                "event_id": item.event_id,
                "thread_root": item.thread_root,
                "subject": item.subject,
                "created_at": now,
            },
        )
        return OutboxItem(
            id=outbox_id,
            raw=item.raw,
            mail_from=mail_from,
            recipients=item.recipients,
            attempts=0,
            first_tried_at=None,
            next_attempt_at=now / 1000,
            created_at=now / 1000,
        )

    return steps


def _envelope_statement() -> Any:
    return bound_update(mail_outbox, "id", ("mail_from",))


def _ms(seconds: float) -> int:
    # Rounded, for stored times and "now" alike: monotonic, so a time t is due at any now >= t,
    # and a time read back from the store (ms / 1000) gives the same milliseconds again.
    return round(seconds * 1000)


def _item(row: Row[Any]) -> OutboxItem:
    return OutboxItem(
        id=int(row.id),
        raw=bytes(row.raw),
        mail_from=row.mail_from,
        recipients=tuple(json.loads(row.recipients)),
        attempts=int(row.attempts),
        first_tried_at=None if row.first_tried_at is None else row.first_tried_at / 1000,
        next_attempt_at=row.next_attempt_at / 1000,
        created_at=row.created_at / 1000,
    )


class DbOutboxStore:
    """Implements the outbox worker's OutboxStore on the database.

    An outcome only changes a mail still pending: a finished one is never brought back.
    """

    def __init__(
        self, db: Database, clock: Callable[[], float] = time.time, *, report_sent: bool = True
    ) -> None:
        self.db = db
        self._clock = clock  # the worker's clock, for first_tried_at and finished_at
        # False: success is not told in the room, so a sent mail is recorded as reported at
        # once (turning reactions on later must not react to every mail sent before).
        self._report_sent = report_sent
        # Final outcomes waiting for the commit under way (see _finish).
        self._waiting: list[_Finished] = []
        self._writing = False

    async def due(self, now: float, limit: int, exclude: set[int]) -> list[OutboxItem]:
        query = (
            select(mail_outbox)
            .where(mail_outbox.c.state == "pending", mail_outbox.c.next_attempt_at <= _ms(now))
            .order_by(mail_outbox.c.next_attempt_at, mail_outbox.c.id)
            .limit(limit)
        )
        if exclude:
            query = query.where(mail_outbox.c.id.not_in(exclude))
        async with self.db.begin() as conn:
            rows = (await conn.execute(query)).all()
        return [_item(r) for r in rows]

    async def mark_sent(self, item_id: int, result: SendResult) -> None:
        await self._finish(
            item_id,
            {
                "state": "sent",
                "finished_at": _ms(self._clock()),
                "smtp_code": result.code,
                "last_error": result.message if result.refused else None,
                "reported": not self._report_sent,
            },
        )

    async def mark_retry(self, item_id: int, result: SendResult, next_attempt_at: float) -> None:
        async with self.db.begin() as conn:
            result_row = await conn.execute(
                update(mail_outbox)
                .where(mail_outbox.c.id == item_id, mail_outbox.c.state == "pending")
                .values(
                    attempts=mail_outbox.c.attempts + 1,
                    first_tried_at=func.coalesce(mail_outbox.c.first_tried_at, _ms(self._clock())),
                    next_attempt_at=_ms(next_attempt_at),
                    last_error=result.message,
                    smtp_code=result.code,
                )
            )
        if not result_row.rowcount:
            log.warning("outbox item %d is not pending any more; outcome not recorded", item_id)

    async def mark_failed(self, item_id: int, result: SendResult) -> None:
        await self._finish(
            item_id,
            {
                "state": "failed",
                "finished_at": _ms(self._clock()),
                "attempts": _ONE_MORE_ATTEMPT,
                "last_error": result.message,
                "smtp_code": result.code,
            },
        )

    async def _finish(self, item_id: int, values: dict[str, Any]) -> None:
        """Record a final outcome; returns once it is committed (raises if it was not).

        Outcomes are written together (group commit): the caller that finds no commit running
        waits SETTLE_DELAY for others, then writes every outcome waiting, its own and others',
        batch after batch (those that come meanwhile in the next), and the others wait for
        theirs."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item_id, values, done))
        if not self._writing:
            self._writing = True
            try:
                await asyncio.sleep(SETTLE_DELAY)
                while self._waiting:
                    batch = self._waiting[:SETTLE_BATCH]
                    del self._waiting[: len(batch)]
                    await self._write(batch, done)
            finally:
                self._writing = False
                # Interrupted (cancelled): the outcomes not written are retried by their callers.
                for _, _, waiting in self._waiting:
                    if waiting is done:
                        waiting.cancel()
                    elif not waiting.done():
                        waiting.set_exception(RuntimeError("outcome not recorded: interrupted"))
                self._waiting.clear()
        await done

    async def _write(self, batch: list[_Finished], own: asyncio.Future[None]) -> None:
        """Commit a batch of outcomes and resolve their futures. When the batch fails, each
        outcome is tried again alone, so that one that cannot be stored fails only itself."""
        try:
            await settle_outcomes(self.db, [(item_id, values) for item_id, values, _ in batch])
        except Exception as e:
            if len(batch) > 1:
                for one in batch:
                    await self._write([one], own)
                return
            failed: BaseException = e
        except BaseException:
            for _, _, waiting in batch:
                if waiting is own:
                    waiting.cancel()
                elif not waiting.done():
                    waiting.set_exception(RuntimeError("outcome not recorded: interrupted"))
            raise
        else:
            for _, _, waiting in batch:
                if not waiting.done():
                    waiting.set_result(None)
            return
        for _, _, waiting in batch:
            if not waiting.done():
                waiting.set_exception(failed)


_Finished = tuple[int, dict[str, Any], "asyncio.Future[None]"]

# What an outcome's audit row needs, returned by the UPDATE that stores the outcome (the
# link's address by a subquery: RETURNING cannot join).
_AUDIT_COLUMNS = (
    mail_outbox.c.id,
    mail_outbox.c.state,
    mail_outbox.c.room_id,
    mail_outbox.c.event_id,
    mail_outbox.c.message_id,
    mail_outbox.c.recipients,
    mail_outbox.c.sender,
    mail_outbox.c.body_sha256,
    mail_outbox.c.last_error,
    mail_outbox.c.smtp_code,
    mail_outbox.c.kind,
    select(link.c.remote)
    .where(link.c.id == mail_outbox.c.link_id)
    .scalar_subquery()
    .label("remote"),
)
_AUDIT_NAMES = tuple(str(column.key) for column in _AUDIT_COLUMNS)


async def settle_outcomes(db: Database, outcomes: list[tuple[int, dict[str, Any]]]) -> None:
    """Store final outcomes (sent, failed) of outbox mails still pending, each with its audit
    row, in one commit: the only place where the outbox settles mail (a fencing check for the
    instance's lease belongs in this transaction). A mail no longer pending is left alone.
    Straight through the driver where it can be (`Database.write`)."""
    engine = db.engine.sync_engine

    def steps(dialect: str, audited: list[AuditEntry]) -> Steps[set[int]]:
        changed: list[dict[str, Any]] = []
        for item_id, values in outcomes:
            # SQL expressions (attempts + 1) are part of the statement; values are bound.
            exprs = tuple((c, v) for c, v in values.items() if isinstance(v, ColumnElement))
            bound = tuple(c for c in values if not isinstance(values[c], ColumnElement))
            params = {f"v_{column}": values[column] for column in bound}
            found = yield Step(
                f"outbox.settle.{','.join(bound)}.{','.join(c for c, _ in exprs)}",
                functools.partial(_settle_statement, bound, exprs),
                params | {"b_key": item_id, "b_state": "pending"},
                returns="row",
            )
            if found is not None:
                changed.append(dict(zip(_AUDIT_NAMES, found, strict=True)))
        # One audit row each, chained in the order the outcomes came.
        entries = [_audit_entry(found) for found in changed]
        yield from append_all_steps(dialect, engine, entries, audited)
        return {int(found["id"]) for found in changed}

    done = await db.write_audited(steps)
    for item_id, _ in outcomes:
        if item_id not in done:
            log.warning("outbox item %d is not pending any more; outcome not recorded", item_id)


# One expression object, so that the statements built from it are built once (see below).
_ONE_MORE_ATTEMPT = mail_outbox.c.attempts + 1


@functools.lru_cache(maxsize=32)
def _settle_statement(
    columns: tuple[str, ...], expressions: tuple[tuple[str, ColumnElement[Any]], ...]
) -> Any:
    """UPDATE of a pending mail's `columns` (and `expressions`), returning its audit columns,
    built once per kind of outcome (the expressions are the module's own, made once each)."""
    statement = bound_update(mail_outbox, "id", columns, with_state=True)
    if expressions:
        statement = statement.values(dict(expressions))
    return statement.returning(*_AUDIT_COLUMNS)


def _audit_entry(row: dict[str, Any]) -> AuditEntry:  # _AUDIT_NAMES to values
    """The audit row of a mail whose final outcome was just stored."""
    code = f"{row['smtp_code']} " if row["smtp_code"] is not None else ""
    reason = f"{code}{row['last_error']}" if row["last_error"] else (code.strip() or None)
    if row["kind"] == "correction":
        reason = f"correction; {reason}" if reason else "correction"
    return AuditEntry(
        direction="mail_out",
        link=row["remote"],
        room_id=row["room_id"],
        sender=row["sender"],
        outcome=row["state"],
        recipients=tuple(json.loads(row["recipients"])),
        ids={"event_id": row["event_id"], "message_id": row["message_id"]},
        reason=reason,
        body_sha256=row["body_sha256"],
    )


async def outcomes_to_report(db: Database, limit: int, *, include_sent: bool) -> list[Outcome]:
    """Finished mails not reported yet, oldest first: failed ones, and sent ones if asked."""
    states = ["failed", "sent"] if include_sent else ["failed"]
    query = (
        select(mail_outbox)
        .where(_unreported(), mail_outbox.c.state.in_(states))
        .order_by(mail_outbox.c.id)
        .limit(limit)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        Outcome(
            id=int(r.id),
            link_id=int(r.link_id),
            room_id=RoomID(r.room_id),
            event_id=EventID(r.event_id),
            kind=r.kind,
            state=r.state,
            message=r.last_error or "",
            code=None if r.smtp_code is None else int(r.smtp_code),
        )
        for r in rows
    ]


def _unreported() -> ColumnElement[bool]:
    return mail_outbox.c.reported == false()


async def mark_reported(db: Database, item_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(mail_outbox).where(mail_outbox.c.id == item_id).values(reported=True)
        )


async def mails_for_event(db: Database, event_id: str) -> list[tuple[int, int, str]]:
    """(outbox id, link id, state) of every mail carrying this event, in id order."""
    query = (
        select(mail_outbox.c.id, mail_outbox.c.link_id, mail_outbox.c.state)
        .where(mail_outbox.c.event_id == event_id)
        .order_by(mail_outbox.c.id)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [(int(r.id), int(r.link_id), str(r.state)) for r in rows]


async def counts(db: Database) -> dict[str, int]:
    """Number of outbox mails per state (every state, zeros included)."""
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(mail_outbox.c.state, func.count()).group_by(mail_outbox.c.state)
            )
        ).all()
    result = dict.fromkeys(STATES, 0)
    result.update({str(state): int(n) for state, n in rows})
    return result


def _sent(row: Any) -> SentMail:  # a Row of _SENT_COLUMNS
    return SentMail(
        id=int(row.id),
        link_id=int(row.link_id),
        room_id=RoomID(row.room_id),
        event_id=EventID(row.event_id),
        kind=row.kind,
        message_id=row.message_id,
        state=row.state,
    )


_SENT_COLUMNS = (
    mail_outbox.c.id,
    mail_outbox.c.link_id,
    mail_outbox.c.room_id,
    mail_outbox.c.event_id,
    mail_outbox.c.kind,
    mail_outbox.c.message_id,
    mail_outbox.c.state,
)


async def sent_mail(db: Database, item_id: int) -> SentMail | None:
    """The outbox mail with this id, if it is still there."""
    async with db.begin() as conn:
        row = (
            await conn.execute(select(*_SENT_COLUMNS).where(mail_outbox.c.id == item_id))
        ).first()
    return None if row is None else _sent(row)


async def sent_mail_of_event(
    db: Database, link_id: int, event_id: str, message_id: str
) -> SentMail | None:
    """The link's outbox mail for this event with this Message-ID (the event is found in the
    message map first: the outbox has no index on Message-IDs)."""
    query = (
        select(*_SENT_COLUMNS)
        .where(
            mail_outbox.c.event_id == event_id,
            mail_outbox.c.link_id == link_id,
            mail_outbox.c.message_id == message_id,
        )
        .limit(1)
    )
    async with db.begin() as conn:
        row = (await conn.execute(query)).first()
    return None if row is None else _sent(row)


async def pending_summary(db: Database) -> tuple[int, int | None]:
    """Mails waiting to be sent, and when the oldest was queued (ms since the epoch)."""
    query = select(func.count(), func.min(mail_outbox.c.created_at)).where(
        mail_outbox.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
