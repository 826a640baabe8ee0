"""Remote → agency: remote state is never mirrored as authority, only what a link must know."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.core.remote_in import NotRelayed, RemoteMember, RemoteRoomChange
from tests.unit.test_remote_in import EVE, MXC_URL, OWN, SERVER, event, plan

# --- state: never mirrored as authority -------------------------------------------------------


def state(type_: str, state_key: Any, content: Any, *, sender: str = EVE) -> object:
    return plan(event(content, type_=type_, sender=sender, state_key=state_key))


@pytest.mark.parametrize(
    "type_",
    [
        "m.room.power_levels",
        "m.room.name",
        "m.room.topic",
        "m.room.server_acl",
        "m.room.join_rules",
        "m.room.avatar",
        "m.room.message",  # a message-typed state event is state, not a message
    ],
)
def test_other_state_is_not_mirrored(type_: str) -> None:
    found = state(type_, "", {"users": {EVE: 100}, "name": "x", "body": "x", "msgtype": "m.text"})
    assert isinstance(found, NotRelayed)
    assert "not mirrored" in found.reason
    assert not found.refused


def test_encryption_turned_on() -> None:
    found = state("m.room.encryption", "", {"algorithm": "m.megolm.v1.aes-sha2"})
    assert found == RemoteRoomChange("$ev1:" + SERVER, EVE, "encrypted")


def test_tombstone() -> None:
    found = state(
        "m.room.tombstone", "", {"replacement_room": "!new:" + SERVER, "body": "moved\u202e"}
    )
    assert found == RemoteRoomChange(
        "$ev1:" + SERVER, EVE, "upgraded", replacement="!new:" + SERVER, reason="moved"
    )


@pytest.mark.parametrize(
    "content",
    [{}, {"replacement_room": None}, {"replacement_room": "new"}, {"replacement_room": ["!a:b"]}],
)
def test_tombstone_without_replacement_room(content: dict[str, Any]) -> None:
    found = state("m.room.tombstone", "", content)
    assert found == RemoteRoomChange("$ev1:" + SERVER, EVE, "upgraded", replacement=None)


def test_tombstone_body_is_bounded() -> None:
    found = state("m.room.tombstone", "", {"body": "b" * 100_000})
    assert isinstance(found, RemoteRoomChange)
    assert len(found.reason) == 300


@pytest.mark.parametrize(("membership", "why"), [("leave", "removed"), ("ban", "banned")])
def test_own_account_removed(membership: str, why: str) -> None:
    found = state("m.room.member", OWN, {"membership": membership})
    assert found == RemoteRoomChange("$ev1:" + SERVER, EVE, "removed", reason=why)


def test_own_account_leaving_by_itself() -> None:
    found = state("m.room.member", OWN, {"membership": "leave"}, sender=OWN)
    assert isinstance(found, RemoteRoomChange)
    assert found.kind == "removed"


@pytest.mark.parametrize("membership", ["join", "invite", "knock", None])
def test_own_membership_otherwise_is_not_relayed(membership: object) -> None:
    assert state("m.room.member", OWN, {"membership": membership}) == NotRelayed(
        "the bridge's own membership"
    )


def test_member_join() -> None:
    found = state(
        "m.room.member", EVE, {"membership": "join", "displayname": "Eve", "avatar_url": MXC_URL}
    )
    assert found == RemoteMember("$ev1:" + SERVER, EVE, EVE, "join", "Eve", MXC_URL)


@pytest.mark.parametrize("membership", ["leave", "ban"])
def test_member_leaves(membership: str) -> None:
    found = state("m.room.member", EVE, {"membership": membership, "displayname": "Eve"})
    assert found == RemoteMember("$ev1:" + SERVER, EVE, EVE, "leave", None, None)


@pytest.mark.parametrize("membership", ["invite", "knock", None, 5, ["join"], "JOIN"])
def test_member_other_memberships_are_not_mirrored(membership: object) -> None:
    found = state("m.room.member", EVE, {"membership": membership})
    assert isinstance(found, NotRelayed)
    assert "not mirrored" in found.reason


@pytest.mark.parametrize(
    ("displayname", "avatar", "name_kept", "avatar_kept"),
    [
        (5, "https://evil.org/a.png", None, None),
        (["Eve"], 5, None, None),
        ("E" * 10_000, "mxc://a/b/c", "E" * 400, None),
        (None, None, None, None),
    ],
)
def test_member_profile_is_hostile(
    displayname: object, avatar: object, name_kept: str | None, avatar_kept: str | None
) -> None:
    content = {"membership": "join", "displayname": displayname, "avatar_url": avatar}
    found = state("m.room.member", EVE, content)
    assert isinstance(found, RemoteMember)
    assert (found.displayname, found.avatar_url) == (name_kept, avatar_kept)


@pytest.mark.parametrize(
    "user_id",
    [
        "@eve:evil.org",
        "@eve:interieur.example.org.evil.org",
        "@eve:INTERIEUR.example.org",
        "@eve:interieur.example.org:8448",
    ],
)
def test_member_of_a_disallowed_server(user_id: str) -> None:
    found = state("m.room.member", user_id, {"membership": "join"}, sender=user_id)
    assert found == NotRelayed(f"{user_id} is not on a server this link relays")


@pytest.mark.parametrize("state_key", ["", "eve", "@eve", EVE + "\n", "@" + "e" * 300])
def test_member_without_a_valid_user(state_key: str) -> None:
    found = state("m.room.member", state_key, {"membership": "join"})
    assert found == NotRelayed("a membership without a valid user")


@pytest.mark.parametrize("state_key", [5, None, [EVE], {"k": EVE}, True])
def test_state_key_of_the_wrong_type_is_not_state(state_key: object) -> None:
    # Not a str: not state at all; a member event then is just an unrelayed event type.
    found = state("m.room.member", state_key, {"membership": "join"})
    assert found == NotRelayed("event type 'm.room.member' is not relayed")
    found = state("m.room.encryption", state_key, {"algorithm": "x"})
    assert isinstance(found, NotRelayed)
