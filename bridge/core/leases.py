"""Leases on units of work shared by several bridge instances: who holds what, and the timing
decisions (when to renew, when an unrenewed lease must be given up, how many to hand back)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

# Units every instance can run, one holder at a time (see Bridge._start_services).
DISPATCHER = "worker:dispatcher"  # the appservice inbox
MAIL_RELAY = "worker:mail-relay"  # stored mail → rooms
OUTBOX = "worker:outbox"  # SMTP outbox and the reporter of its outcomes
REMOTE_RELAY = "worker:remote-relay"
REMOTE_SENDER = "worker:remote-sender"
WEBHOOKS_RELAY = "worker:webhooks-relay"
WEBHOOKS_SENDER = "worker:webhooks-sender"
MAX_NAME = 255


class LeaseLost(Exception):
    """A write checked its lease and found it taken (or gone): it must not commit."""


def mailbox_lease(address: str) -> str:
    return f"mailbox:{address}"


def remote_lease(name: str) -> str:
    return f"remote:{name}"


@dataclass(frozen=True)
class LeaseHolder:
    """A lease as its holder knows it: the epoch (fencing token) it was granted with."""

    name: str
    owner: str
    epoch: int


def check_holder(expected: LeaseHolder, row: tuple[str, int] | None) -> None:
    """Raise LeaseLost unless the stored (owner, epoch) is still the expected holder's."""
    if row is None:
        raise LeaseLost(f"lease {expected.name} no longer exists")
    owner, epoch = row
    if owner != expected.owner or int(epoch) != expected.epoch:
        raise LeaseLost(
            f"lease {expected.name} (epoch {expected.epoch}) was taken over by another "
            f"instance (epoch {epoch})"
        )


@dataclass(frozen=True)
class LeaseTiming:
    """ttl: how long a lease lasts without renewal; renew_every: how often holders renew (and
    free leases are looked for). A holder that has not renewed for ttl - margin stops its
    work, so that it has stopped before anyone else may take the lease."""

    ttl: float = 15.0
    renew_every: float = 5.0

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.renew_every <= 0:
            raise ValueError("lease times must be positive")
        if self.renew_every * 2 > self.ttl:
            raise ValueError("renew_every must be at most half of ttl")

    @property
    def margin(self) -> float:
        # Room for the cancelled work to unwind, and for clock rate differences.
        return min(self.renew_every, self.ttl / 5)

    @property
    def takeover_within(self) -> float:
        """Longest time from an instance's death to another running its work."""
        return self.ttl + self.renew_every


def stop_at(renew_sent: float, timing: LeaseTiming) -> float:
    """When (on the holder's monotonic clock) its own work must have stopped, given the last
    renewal that succeeded was sent at `renew_sent`. The database set the expiry after it
    received the request, so the lease lasts at least until renew_sent + ttl."""
    return renew_sent + timing.ttl - timing.margin


def must_stop(now: float, renew_sent: float, timing: LeaseTiming) -> bool:
    return now >= stop_at(renew_sent, timing)


def next_tick(now: float, renew_sent: float, timing: LeaseTiming) -> float:
    """Seconds until the next renewal attempt: the regular interval, sooner when a failed
    renewal left the stop deadline nearer than that (so we stop on time); once past it (the
    work stopped, the database still unreachable), the regular interval again: never a spin."""
    until_stop = stop_at(renew_sent, timing) - now
    if until_stop <= 0:
        return timing.renew_every
    return min(timing.renew_every, until_stop)


def fair_share(units: int, instances: int) -> int:
    """How many of `units` one of `instances` live instances should hold at most."""
    return math.ceil(units / max(1, instances))


def surplus(held: int, units: int, instances: int) -> int:
    """How many leases an instance holding `held` should hand back so others get theirs.
    An instance never hands back its last one, and never more than it holds above its share."""
    return max(0, held - max(1, fair_share(units, instances)))


def default_instance_id(hostname: str, pid: int, token: str | None = None) -> str:
    """hostname-pid-random: unique per process, readable in the lease table."""
    token = token if token is not None else secrets.token_hex(3)
    return f"{hostname}-{pid}-{token}"[:MAX_NAME]
