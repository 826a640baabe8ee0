"""History backfill decisions: the request's words, which UIDs, who may run a job, the notice."""

from __future__ import annotations

import datetime as dt

import pytest

from bridge.backfill_cli import UsageError, selection_from
from bridge.core.backfill import (
    STALE_AFTER_MS,
    BadRequest,
    Outcome,
    Selection,
    duration,
    may_claim,
    owner_pid,
    parse_selection,
    pick,
    progress_text,
    seconds_left,
)
from bridge.mail.backfill import imap_date

TODAY = dt.date(2026, 12, 7)


def test_selection_words() -> None:
    assert parse_selection([], today=TODAY) == Selection()
    assert parse_selection(["since", "2024-02-29"], today=TODAY).since == dt.date(2024, 2, 29)
    assert parse_selection(["SINCE", "2026-12-07"], today=TODAY).since == TODAY
    assert parse_selection(["last", "1000000"], today=TODAY).last == 1_000_000
    assert parse_selection(["Last", "007"], today=TODAY).last == 7


@pytest.mark.parametrize(
    ("words", "told"),
    [
        (["since"], "expected “since YYYY-MM-DD” or “last N”"),
        (["last", "3", "more"], "expected"),
        (["until", "2024-01-01"], "unexpected “until”"),
        (["since", "2023-02-29"], "not a date of the calendar"),
        (["since", "2024-1-1"], "not a date written YYYY-MM-DD"),
        (["since", "２０２４-０１-０１"], "not a date written YYYY-MM-DD"),  # full-width digits
        (["since", "2024-01-01T00:00"], "not a date written YYYY-MM-DD"),
        (["since", "2026-12-08"], "in the future"),
        (["last", "0"], "between 1 and"),
        (["last", "1000001"], "between 1 and"),
        (["last", "-1"], "not a number of mails"),
        (["last", "1e3"], "not a number of mails"),
        (["last", "٣"], "not a number of mails"),  # an Arabic-Indic digit: isdigit() says yes
        (["last", "9" * 400], "not a number of mails"),
    ],
)
def test_bad_selection_is_told(words: list[str], told: str) -> None:
    with pytest.raises(BadRequest, match=told):
        parse_selection(words, today=TODAY)


def test_long_words_are_cut_in_answers() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_selection(["x" * 5000, "1"], today=TODAY)
    assert len(str(caught.value)) < 200


def test_command_line_selection() -> None:
    assert selection_from(None, "5", today=TODAY) == Selection(last=5)
    assert selection_from("2025-01-31", None, today=TODAY) == Selection(since=dt.date(2025, 1, 31))
    with pytest.raises(UsageError, match="cannot be used together"):
        selection_from("2025-01-31", "5", today=TODAY)
    with pytest.raises(UsageError, match="between 1 and"):
        selection_from(None, "0", today=TODAY)


def test_pick_keeps_below_the_live_start_oldest_first() -> None:
    found = [9, 3, 12, 5, 5, 0, 7]
    assert pick(found, Selection(), upto=9) == [3, 5, 7, 9]
    assert pick(found, Selection(last=2), upto=9) == [7, 9]
    assert pick(found, Selection(last=50), upto=9) == [3, 5, 7, 9]
    assert pick(found, Selection(), upto=0) == []


def test_claims() -> None:
    now = 10_000_000
    me = "host:10:bridge"
    assert may_claim(None, None, me=me, holder_gone=False, now_ms=now)
    assert may_claim(me, now, me=me, holder_gone=False, now_ms=now)
    other = "host:11:cli"
    assert not may_claim(other, now - 1000, me=me, holder_gone=False, now_ms=now)
    assert may_claim(other, now - 1000, me=me, holder_gone=True, now_ms=now)
    assert may_claim(other, now - STALE_AFTER_MS - 1, me=me, holder_gone=False, now_ms=now)
    assert may_claim(other, None, me=me, holder_gone=False, now_ms=now)


def test_owner_pid() -> None:
    assert owner_pid("host:42:cli", "host") == 42
    assert owner_pid("other:42:cli", "host") is None
    assert owner_pid("host:x:cli", "host") is None
    assert owner_pid("nonsense", "host") is None
    assert owner_pid("a:b:host:42:bridge", "a:b:host") == 42  # a host name with colons


def test_progress_text() -> None:
    assert progress_text("l@x.fr", 1200, 10000, 180) == (
        "Importing the history of l@x.fr: 1\u202f200 / 10\u202f000 mails, 3 min left"
    )
    assert progress_text("l@x.fr", 0, 10, None) == "Importing the history of l@x.fr: 0 / 10 mails"
    assert progress_text("l@x.fr", 10, 10, 5) == "Importing the history of l@x.fr: 10 / 10 mails"
    assert duration(0.2) == "1 s"
    assert duration(59) == "59 s"
    assert duration(3 * 3600 + 5 * 60) == "3 h 05"
    assert seconds_left(2, 0.0, 10.0, 100) is None  # too early to say
    assert seconds_left(10, 0.0, 10.0, 100) == 100.0


def test_summaries() -> None:
    done = Outcome("l@x.fr", total=5, posted=3, skipped=2, state="done")
    assert done.summary() == (
        "History of l@x.fr imported: 5 mails, 3 posted, 2 already here or not posted."
    )
    assert "has no mail to import" in Outcome("l@x.fr", 0, 0, 0, "done").summary()
    failed = Outcome("l@x.fr", 5, 1, 0, "failed", error="the link was removed")
    assert "stopped: the link was removed" in failed.summary()
    assert "resumes it" in failed.summary()


def test_imap_dates_are_english_whatever_the_locale() -> None:
    assert imap_date(dt.date(2024, 2, 1)) == "1-Feb-2024"
    assert imap_date(dt.date(1999, 12, 31)) == "31-Dec-1999"
