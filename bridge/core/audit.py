"""The audit log's hash chain: entries, their canonical encoding, sealing and verification.

Each row's hash is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of its own
fields, its sequence number and the previous row's hash, so that changing, removing or adding
a row anywhere breaks the chain from there on. Values are cleaned (NUL and lone surrogates
replaced, lengths capped) before sealing, so what the database gives back hashes the same.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
DIRECTIONS = ("mail_in", "mail_out", "remote_in", "remote_out", "webhook_in", "webhook_out")
VERDICTS = ("authenticated", "unverified", "failed")
OUTCOMES = ("posted", "sent", "refused", "ignored", "quarantined", "failed")

# Caps (characters) that fit the columns of bridge/db/schema.py's audit_log.
_SHORT = 255
_ADDRESS = 512
_REASON = 500
_KEY = 1000
_RECIPIENTS = 50


def digest(data: bytes) -> str:
    """SHA-256 of a body, hex: what the log keeps instead of the body."""
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> bytes:
    """The one encoding of a JSON value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def content_digest(content: Any) -> str:
    """SHA-256 of a Matrix event's content (or any JSON value), canonically encoded."""
    return digest(canonical(_clean_json(content)))


def clean(text: str, limit: int) -> str:
    """Text every database stores and gives back unchanged: no NUL, no lone surrogate."""
    text = text.replace("\x00", "\ufffd")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, Mapping):
        return {_clean_json(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN has no JSON form
        return None
    return value


def _optional(text: str | None, limit: int) -> str | None:
    return None if text is None else clean(text, limit)


@dataclass(frozen=True)
class AuditEntry:
    """One relayed or refused item, as the relay knows it when its final state is stored.

    `ids`: the item's identifiers on both sides where known (message_id, event_id,
    remote_event_id). `item_key`: set where a record could be attempted twice for one item
    (outside the transaction that stores its final state); the second attempt is dropped.
    """

    direction: str
    link: str
    room_id: str | None
    sender: str | None
    outcome: str
    recipients: tuple[str, ...] = ()
    ids: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    verdict: str | None = None
    body_sha256: str | None = None
    item_key: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown audit direction {self.direction!r}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"unknown sender verdict {self.verdict!r}")
        if not self.outcome:
            raise ValueError("an audit entry needs an outcome")

    def cleaned(self) -> AuditEntry:
        """The entry as stored: capped and cleaned, so it reads back hashing the same."""
        return AuditEntry(
            direction=self.direction,
            link=clean(self.link, _ADDRESS),
            room_id=_optional(self.room_id, _SHORT),
            sender=_optional(self.sender, _ADDRESS),
            outcome=clean(self.outcome, 16),
            recipients=tuple(clean(r, _ADDRESS) for r in self.recipients[:_RECIPIENTS]),
            ids={clean(k, 32): clean(v, 998) for k, v in sorted(self.ids.items()) if v},
            reason=_optional(" ".join(self.reason.split()) if self.reason else None, _REASON),
            verdict=self.verdict,
            body_sha256=self.body_sha256,
            item_key=_optional(self.item_key, _KEY),
        )


@dataclass(frozen=True)
class AuditRow:
    """A sealed entry: its place in the chain, its time (ms since the epoch, UTC), hashes."""

    seq: int
    time_ms: int
    entry: AuditEntry
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """What the hash covers (everything but the hash itself)."""
        return sealed_fields(self.seq, self.time_ms, self.entry, self.prev_hash)

    def export(self) -> dict[str, Any]:
        """The row as `passerelle audit export` writes it (one JSON Lines record)."""
        document = self.fields()
        document["time"] = iso_time(self.time_ms)
        document["time_ms"] = self.time_ms
        document["hash"] = self.hash
        return document


def sealed_fields(seq: int, time_ms: int, entry: AuditEntry, prev_hash: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": time_ms,
        "direction": entry.direction,
        "item_key": entry.item_key,
        "link": entry.link,
        "room_id": entry.room_id,
        "sender": entry.sender,
        "recipients": list(entry.recipients),
        "ids": dict(entry.ids),
        "verdict": entry.verdict,
        "outcome": entry.outcome,
        "reason": entry.reason,
        "body_sha256": entry.body_sha256,
        "prev_hash": prev_hash,
    }


def row_hash(seq: int, time_ms: int, entry: AuditEntry, prev_hash: str) -> str:
    return digest(canonical(sealed_fields(seq, time_ms, entry, prev_hash)))


def seal(entry: AuditEntry, *, seq: int, time_ms: int, prev_hash: str) -> AuditRow:
    """The next row of the chain after (seq - 1, prev_hash)."""
    stored = entry.cleaned()
    return AuditRow(seq, time_ms, stored, prev_hash, row_hash(seq, time_ms, stored, prev_hash))


def iso_time(time_ms: int) -> str:
    moment = dt.datetime.fromtimestamp(time_ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold."""

    seq: int
    problem: str

    def __str__(self) -> str:
        return f"row {self.seq}: {self.problem}"


class ChainVerifier:
    """Checks rows fed in seq order, one at a time (memory does not grow with the log)."""

    def __init__(self, anchors: Mapping[int, str] | None = None) -> None:
        self.count = 0
        self.last_seq = 0
        self.last_hash = GENESIS
        self.broken: Break | None = None
        # seq → hash printed by an earlier verification and kept outside the database: a
        # chain rewritten whole (every hash recomputed) still differs from them.
        self.anchors = dict(anchors or {})

    def feed(self, row: AuditRow) -> Break | None:
        """Check the next row; the first break found is kept and returned."""
        if self.broken is not None:
            return self.broken
        expected = self.last_seq + 1
        if row.seq > expected:
            self.broken = Break(expected, f"missing (deleted?); the next row is {row.seq}")
        elif row.seq < expected:
            self.broken = Break(row.seq, "out of order or duplicated")
        elif row.prev_hash != self.last_hash:
            self.broken = Break(row.seq, "does not follow the previous row (prev_hash differs)")
        elif row_hash(row.seq, row.time_ms, row.entry, row.prev_hash) != row.hash:
            self.broken = Break(row.seq, "changed or forged (hash does not match its content)")
        elif row.seq in self.anchors and self.anchors[row.seq] != row.hash:
            self.broken = Break(
                row.seq, "differs from the anchor kept outside the database (chain rewritten)"
            )
        else:
            self.count += 1
            self.last_seq = row.seq
            self.last_hash = row.hash
        return self.broken

    def feed_all(self, rows: Iterable[AuditRow]) -> Break | None:
        for row in rows:
            if self.feed(row) is not None:
                break
        return self.broken

    def finish(self, head_seq: int, head_hash: str) -> Break | None:
        """Compare the end of the chain with the separately kept head (count and last hash):
        rows removed from the end, or appended without the head, show here."""
        if self.broken is not None:
            return self.broken
        beyond = [seq for seq in self.anchors if seq > self.last_seq]
        if beyond:
            self.broken = Break(min(beyond), "missing: an anchor names a row the log has not")
            return self.broken
        if head_seq > self.last_seq:
            self.broken = Break(
                self.last_seq + 1, f"missing (deleted?); the log's head says {head_seq} rows"
            )
        elif head_seq < self.last_seq:
            self.broken = Break(head_seq + 1, "not in the log's head (inserted?)")
        elif head_hash != self.last_hash:
            self.broken = Break(self.last_seq, "differs from the log's head hash")
        return self.broken
