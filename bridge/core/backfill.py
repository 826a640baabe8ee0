"""History backfill decisions: what a request asks for, who may run a job, how progress reads."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

# A backfill takes at most this many mails in one request ("last N"); larger folders are
# taken whole (no "last") or by date.
MAX_LAST = 1_000_000
# A job whose runner has not said it is alive for this long may be taken over by another.
STALE_AFTER_MS = 60_000

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # not \d: it takes any script's digits
_COUNT = re.compile(r"[0-9]{1,7}")


class BadRequest(ValueError):
    """A backfill request that cannot be run; str() says why, for the person who asked."""


@dataclass(frozen=True)
class Selection:
    """Which of a mailbox's existing mails to import: all, those since a date, or the last N."""

    since: dt.date | None = None
    last: int | None = None

    def describe(self) -> str:
        if self.since is not None:
            return f"since {self.since.isoformat()}"
        if self.last is not None:
            return f"the last {self.last}"
        return "all"


USAGE = "backfill ADDRESS [since YYYY-MM-DD | last N]"


def parse_selection(words: list[str], *, today: dt.date) -> Selection:
    """The words after the address: nothing, `since YYYY-MM-DD` or `last N`."""
    if not words:
        return Selection()
    if len(words) != 2:
        raise BadRequest(f"expected “since YYYY-MM-DD” or “last N” after the address ({USAGE})")
    word, value = words[0].casefold(), words[1]
    if word == "since":
        return Selection(since=parse_date(value, today=today))
    if word == "last":
        return Selection(last=parse_count(value))
    raise BadRequest(f"unexpected “{words[0][:50]}” ({USAGE})")


def parse_date(value: str, *, today: dt.date) -> dt.date:
    if not _DATE.fullmatch(value):
        raise BadRequest(f"“{value[:50]}” is not a date written YYYY-MM-DD")
    try:
        date = dt.date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"“{value[:50]}” is not a date of the calendar") from None
    if date > today:
        raise BadRequest(f"{date.isoformat()} is in the future: there is no mail since then yet")
    return date


def parse_count(value: str) -> int:
    if not _COUNT.fullmatch(value):
        raise BadRequest(f"“{value[:50]}” is not a number of mails (1 to {MAX_LAST:,})")
    count = int(value)
    if not 1 <= count <= MAX_LAST:
        raise BadRequest(f"the number of mails must be between 1 and {MAX_LAST:,}, not {count}")
    return count


def pick(uids: list[int], selection: Selection, upto: int) -> list[int]:
    """The UIDs to import, ascending: at most `upto` (the rest is live mail's), and for "last
    N" the N highest of those. `uids` is what the server found for the selection's date."""
    below = sorted({uid for uid in uids if 0 < uid <= upto})
    if selection.last is not None:
        return below[-selection.last :]
    return below


def may_claim(
    owner: str | None, heartbeat_at: int | None, *, me: str, holder_gone: bool, now_ms: int
) -> bool:
    """Whether runner `me` may take a job held by `owner`.

    Owners are "host:pid:kind". A job is free when nobody holds it, when its holder is `me`
    (a restarted process with the same identity), when its holder ran on this host and that
    process is gone (`holder_gone`: the caller checks the pid, see `owner_pid`), or when its
    heartbeat is older than STALE_AFTER_MS (a holder on another machine that died).
    """
    if owner is None or owner == me or holder_gone:
        return True
    return heartbeat_at is None or now_ms - heartbeat_at > STALE_AFTER_MS


def owner_pid(owner: str, host: str) -> int | None:
    """The process ID in an owner string written on `host`; None for another host."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return None
    return int(parts[1])


def grouped(n: int) -> str:
    """1200 → "1 200" (the French thousands separator, a no-break space)."""
    return f"{n:,}".replace(",", "\u202f")


def progress_text(address: str, done: int, total: int, seconds_left: float | None) -> str:
    """The progress notice: "Importing the history of X: 1 200 / 10 000 mails, 3 min left"."""
    text = f"Importing the history of {address}: {grouped(done)} / {grouped(total)} mails"
    if seconds_left is not None and done < total:
        text += f", {duration(seconds_left)} left"
    return text


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d}"


def seconds_left(done_now: int, started_at: float, now: float, remaining: int) -> float | None:
    """Time left at the rate of this run so far (None until a few mails have gone)."""
    elapsed = now - started_at
    if done_now < 3 or elapsed <= 0:
        return None
    return remaining * elapsed / done_now


@dataclass(frozen=True)
class Outcome:
    """How a backfill run ended, counted over the whole job."""

    address: str
    total: int
    posted: int  # posted into the room by this job, over all its runs
    skipped: int  # already bridged (live mail, an earlier run) or not posted (refused, …)
    state: str  # done | failed
    error: str | None = None

    def summary(self) -> str:
        if self.state != "done":
            return (
                f"The history import of {self.address} stopped: {self.error}. "
                f"{grouped(self.posted)} of {grouped(self.total)} mails posted; the same "
                "command resumes it."
            )
        if self.total == 0:
            return f"The history of {self.address} has no mail to import."
        return (
            f"History of {self.address} imported: {grouped(self.total)} mails, "
            f"{grouped(self.posted)} posted, {grouped(self.skipped)} already here or not posted."
        )
