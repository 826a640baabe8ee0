"""The audit hash chain: canonical encoding, sealing, and every kind of tampering found."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.audit import (
    GENESIS,
    AuditEntry,
    AuditRow,
    ChainVerifier,
    canonical,
    content_digest,
    iso_time,
    row_hash,
    seal,
)

texts = st.text(max_size=40)
entries = st.builds(
    AuditEntry,
    direction=st.sampled_from(["mail_in", "mail_out", "remote_in", "remote_out"]),
    link=texts,
    room_id=st.none() | texts,
    sender=st.none() | texts,
    outcome=st.sampled_from(["posted", "sent", "refused", "ignored", "failed"]),
    recipients=st.lists(texts, max_size=3).map(tuple),
    ids=st.dictionaries(st.sampled_from(["message_id", "event_id", "remote_event_id"]), texts),
    reason=st.none() | texts,
    verdict=st.none() | st.sampled_from(["authenticated", "unverified", "failed"]),
    body_sha256=st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
    item_key=st.none() | texts,
)


def chain(items: list[AuditEntry], start: int = 1_700_000_000_000) -> list[AuditRow]:
    rows: list[AuditRow] = []
    prev = GENESIS
    for i, entry in enumerate(items, start=1):
        row = seal(entry, seq=i, time_ms=start + i, prev_hash=prev)
        rows.append(row)
        prev = row.hash
    return rows


def entry(n: int = 0, **changes: object) -> AuditEntry:
    base = AuditEntry(
        direction="mail_in",
        link="liste@agency.example.org",
        room_id="!r:localhost",
        sender=f"alice{n}@agency.example.org",
        outcome="posted",
        recipients=("!r:localhost",),
        ids={"message_id": f"m{n}@x", "event_id": f"$e{n}"},
        body_sha256="ab" * 32,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def verify(rows: list[AuditRow], head: tuple[int, str] | None = None) -> str | None:
    verifier = ChainVerifier()
    broken = verifier.feed_all(rows)
    if broken is None and head is not None:
        broken = verifier.finish(*head)
    return None if broken is None else f"{broken.seq}"


def test_canonical_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'.encode()


def test_content_digest_ignores_key_order() -> None:
    assert content_digest({"a": 1, "b": "x"}) == content_digest({"b": "x", "a": 1})
    assert content_digest({"a": 1}) != content_digest({"a": 2})


def test_intact_chain_verifies_against_its_head() -> None:
    rows = chain([entry(i) for i in range(5)])
    assert verify(rows, (5, rows[-1].hash)) is None
    assert verify([], (0, GENESIS)) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sender", "mallory@evil.test"),
        ("outcome", "refused"),
        ("recipients", ("other@x",)),
        ("ids", {"message_id": "forged@x"}),
        ("body_sha256", "cd" * 32),
        ("verdict", "authenticated"),
    ],
)
def test_an_edited_field_names_its_row(field: str, value: object) -> None:
    rows = chain([entry(i) for i in range(5)])
    rows[2] = dataclasses.replace(
        rows[2], entry=dataclasses.replace(rows[2].entry, **{field: value})
    )
    assert verify(rows) == "3"


def test_an_edited_time_names_its_row() -> None:
    rows = chain([entry(i) for i in range(5)])
    rows[1] = dataclasses.replace(rows[1], time_ms=rows[1].time_ms + 1)
    assert verify(rows) == "2"


def test_a_deleted_middle_row_shows_as_a_gap() -> None:
    rows = chain([entry(i) for i in range(5)])
    del rows[2]
    assert verify(rows) == "3"


def test_a_renumbered_chain_after_a_deletion_breaks_on_prev_hash() -> None:
    rows = chain([entry(i) for i in range(5)])
    del rows[2]
    rows = [dataclasses.replace(r, seq=i) for i, r in enumerate(rows, start=1)]
    assert verify(rows) == "3"


def test_a_truncated_end_shows_only_against_the_head() -> None:
    rows = chain([entry(i) for i in range(5)])
    head = (5, rows[-1].hash)
    assert verify(rows[:3]) is None  # the chain alone cannot tell
    assert verify(rows[:3], head) == "4"


def test_an_inserted_row_is_a_hash_mismatch() -> None:
    rows = chain([entry(i) for i in range(5)])
    forged = AuditRow(6, rows[-1].time_ms + 1, entry(99), rows[-1].hash, "0" * 64)
    assert verify([*rows, forged]) == "6"


def test_a_well_forged_append_shows_against_the_head() -> None:
    rows = chain([entry(i) for i in range(5)])
    forged = seal(entry(99), seq=6, time_ms=rows[-1].time_ms, prev_hash=rows[-1].hash)
    assert verify([*rows, forged], (5, rows[-1].hash)) == "6"


def test_a_replaced_head_hash_is_seen() -> None:
    rows = chain([entry(i) for i in range(3)])
    assert verify(rows, (3, "f" * 64)) == "3"


def test_unknown_direction_or_verdict_is_refused() -> None:
    with pytest.raises(ValueError, match="direction"):
        entry(direction="sideways")
    with pytest.raises(ValueError, match="verdict"):
        entry(verdict="maybe")


def test_export_has_iso_time_and_hashes() -> None:
    row = chain([entry()])[0]
    document = row.export()
    assert document["time"] == iso_time(row.time_ms)
    assert document["time"].endswith("Z")
    assert document["hash"] == row.hash
    assert document["prev_hash"] == GENESIS
    assert document["seq"] == 1


@given(st.lists(entries, max_size=6))
def test_any_chain_verifies_after_a_json_round_trip(items: list[AuditEntry]) -> None:
    """What the database gives back (JSON columns, cleaned text) hashes the same."""
    rows = chain(items)
    back = []
    for row in rows:
        stored = row.entry
        again = dataclasses.replace(
            stored,
            recipients=tuple(json.loads(json.dumps(list(stored.recipients)))),
            ids=json.loads(json.dumps(dict(stored.ids))),
        )
        back.append(dataclasses.replace(row, entry=again))
    head = (len(rows), rows[-1].hash if rows else GENESIS)
    assert verify(back, head) is None


@given(entries, texts)
def test_any_change_of_the_sender_breaks_the_hash(item: AuditEntry, other: str) -> None:
    row = seal(item, seq=1, time_ms=1, prev_hash=GENESIS)
    changed = dataclasses.replace(row.entry, sender=other)
    if changed.cleaned() != row.entry:
        assert row_hash(1, 1, changed.cleaned(), GENESIS) != row.hash


def test_text_that_databases_refuse_is_cleaned_before_sealing() -> None:
    row = seal(entry(sender="a\x00b\udcff"), seq=1, time_ms=1, prev_hash=GENESIS)
    assert row.entry.sender is not None
    assert "\x00" not in row.entry.sender
    row.entry.sender.encode("utf-8")  # no lone surrogate left
