"""The pure lease decisions: who still holds, when to renew, when to stop, how many to share."""

from __future__ import annotations

import pytest

from bridge.core.leases import (
    LeaseHolder,
    LeaseLost,
    LeaseTiming,
    check_holder,
    default_instance_id,
    fair_share,
    mailbox_lease,
    must_stop,
    next_tick,
    remote_lease,
    stop_at,
    surplus,
)

HOLDER = LeaseHolder("mailbox:liste@example.test", "a-1-ff", 3)


def test_the_holder_that_still_holds_passes() -> None:
    check_holder(HOLDER, ("a-1-ff", 3))


@pytest.mark.parametrize(
    "row",
    [
        None,  # the row is gone
        ("b-2-ee", 4),  # another instance took it over
        ("a-1-ff", 4),  # this same owner ID took it again (a restarted process): not us
        ("b-2-ee", 3),  # same epoch, other owner: impossible, refused all the same
    ],
)
def test_anything_else_is_a_lost_lease(row: tuple[str, int] | None) -> None:
    with pytest.raises(LeaseLost, match=r"mailbox:liste@example\.test"):
        check_holder(HOLDER, row)


def test_defaults_replace_a_dead_instance_within_30_seconds() -> None:
    timing = LeaseTiming()
    assert (timing.ttl, timing.renew_every) == (15.0, 5.0)
    assert timing.takeover_within <= 30


def test_a_holder_stops_before_its_lease_can_expire() -> None:
    timing = LeaseTiming(ttl=15, renew_every=5)
    # Renewal sent at t=100: the database extends to (its now ≥ 100) + 15, so nobody may take
    # it before 115; the holder stops by 115 - margin.
    assert stop_at(100.0, timing) == pytest.approx(112.0)
    assert not must_stop(111.9, 100.0, timing)
    assert must_stop(112.0, 100.0, timing)
    assert stop_at(100.0, timing) < 100.0 + timing.ttl


def test_next_tick_is_the_interval_or_sooner_when_the_deadline_is_near() -> None:
    timing = LeaseTiming(ttl=15, renew_every=5)
    assert next_tick(100.0, 100.0, timing) == 5.0
    # Renewals failed since t=100: the last tick before the stop deadline comes on time.
    assert next_tick(109.0, 100.0, timing) == pytest.approx(3.0)
    assert next_tick(111.999, 100.0, timing) == pytest.approx(0.001)
    # Past the deadline (work stopped, database still away): tried at the regular pace.
    assert next_tick(112.0, 100.0, timing) == 5.0
    assert next_tick(500.0, 100.0, timing) == 5.0


@pytest.mark.parametrize(("ttl", "renew"), [(10, 6), (0, 1), (5, 0), (-1, -1)])
def test_timings_that_cannot_work_are_refused(ttl: float, renew: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        LeaseTiming(ttl=ttl, renew_every=renew)


@pytest.mark.parametrize(
    ("held", "units", "instances", "extra"),
    [
        (10, 10, 1, 0),  # alone: everything
        (10, 10, 2, 5),  # a second instance came: hand back half
        (5, 10, 2, 0),
        (6, 11, 2, 0),  # 11 for 2: a share is 6
        (1, 1, 3, 0),  # never the last one
        (3, 3, 10, 2),  # more instances than units: one each at most
        (0, 0, 2, 0),
    ],
)
def test_surplus_hands_back_down_to_a_fair_share(
    held: int, units: int, instances: int, extra: int
) -> None:
    assert surplus(held, units, instances) == extra


def test_fair_share_covers_every_unit() -> None:
    for units in range(0, 40):
        for instances in range(1, 7):
            assert fair_share(units, instances) * instances >= units
    assert fair_share(5, 0) == 5  # no live instance seen yet: this one counts


def test_default_instance_ids_are_readable_and_distinct() -> None:
    assert default_instance_id("mail-1", 4242, "ab12cd") == "mail-1-4242-ab12cd"
    assert default_instance_id("h", 1) != default_instance_id("h", 1)
    assert len(default_instance_id("x" * 400, 1)) == 255


def test_lease_names() -> None:
    assert mailbox_lease("liste@example.test") == "mailbox:liste@example.test"
    assert remote_lease("ministry") == "remote:ministry"
