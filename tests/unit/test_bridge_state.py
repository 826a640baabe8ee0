"""core.bridge_state: the content and key of a link's m.bridge state (MSC2346)."""

from __future__ import annotations

from bridge.core.bridge_state import (
    BRIDGE_STATE_TYPES,
    MARKING_KEY,
    bridge_state_content,
    bridge_state_key,
)
from bridge.core.ids import RoomID, UserID
from bridge.core.links import Link, LinkSettings, remote_link_key

BOT = UserID("@passerelle:agence.test")
ROOM = RoomID("!salle:agence.test")


def mail_link(marking: str | None = None, created_by: UserID | None = None) -> Link:
    return Link(
        1,
        "mail:achats@finances.gouv.fr",
        ROOM,
        "mail",
        "achats@finances.gouv.fr",
        LinkSettings(marking=marking),
        False,
        "bot",
        created_by,
    )


def remote_link() -> Link:
    key = remote_link_key("ministere", "!distante:ministere.example")
    return Link(2, f"remote:{key}", ROOM, "remote", key, LinkSettings(), False, "config")


def test_both_event_types_are_set() -> None:
    assert BRIDGE_STATE_TYPES == ("m.bridge", "uk.half-shot.bridge")


def test_the_state_key_is_the_one_rooms_already_have() -> None:
    assert bridge_state_key(mail_link()) == "passerelle:achats@finances.gouv.fr"
    assert bridge_state_key(remote_link()) == "passerelle:ministere/!distante:ministere.example"


def test_a_mail_link() -> None:
    content = bridge_state_content(
        mail_link(created_by=UserID("@alice:agence.test")), bot_mxid=BOT
    )
    assert content == {
        "bridgebot": BOT,
        "creator": "@alice:agence.test",
        "protocol": {"id": "email", "displayname": "Email"},
        "network": {"id": "finances.gouv.fr", "displayname": "finances.gouv.fr"},
        "channel": {
            "id": "achats@finances.gouv.fr",
            "displayname": "achats@finances.gouv.fr",
            "external_url": "mailto:achats@finances.gouv.fr",
        },
    }


def test_a_link_of_the_config_file_has_no_creator() -> None:
    assert "creator" not in bridge_state_content(mail_link(), bot_mxid=BOT)


def test_the_marking_is_kept_among_the_fields() -> None:
    content = bridge_state_content(mail_link(marking="DIFFUSION RESTREINTE"), bot_mxid=BOT)
    assert content[MARKING_KEY] == "DIFFUSION RESTREINTE"
    assert MARKING_KEY not in bridge_state_content(mail_link(), bot_mxid=BOT)


def test_a_remote_link() -> None:
    content = bridge_state_content(remote_link(), bot_mxid=BOT, remote_server="ministere.example")
    assert content == {
        "bridgebot": BOT,
        "protocol": {"id": "matrix", "displayname": "Matrix (another ministry)"},
        "network": {"id": "ministere.example", "displayname": "ministere"},
        "channel": {
            "id": "!distante:ministere.example",
            "displayname": "!distante:ministere.example",
            "external_url": "https://matrix.to/#/!distante:ministere.example"
            "?via=ministere.example",
        },
    }


def test_a_remote_no_longer_configured_is_named_by_its_name() -> None:
    content = bridge_state_content(remote_link(), bot_mxid=BOT)
    assert content["network"] == {"id": "ministere", "displayname": "ministere"}
