"""Linking rooms on another ministry's server: the commands and their clear refusals, links
from the config file, unlinking, and what the room is told when the remote says no."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_remote_relay import (
    AGENCY_SUFFIX,
    REMOTE,
    Linked,
    LinkFactory,
    body_has,
    remote_config,
    sent_by,
)


async def ask(linked: Linked, command: str) -> str:
    question = await linked.alice.send_text(linked.agency_room, command)
    answer = await linked.alice.wait_for_event(
        linked.agency_room, replies_to(question, linked.bot), timeout=30
    )
    return str(answer["content"]["body"])


async def test_refusals_are_clear(linked: Linked) -> None:
    # A room the bridge's account was not invited to.
    closed = await linked.bob.create_room(name="Fermée")
    answer = await ask(linked, f"!passerelle link-remote {REMOTE} {closed}")
    assert answer.startswith("Not linked:"), answer
    assert "invite it first" in answer, answer
    # An encrypted room: joined, seen encrypted, left again.
    secret = await linked.bob.create_room(invite=[linked.bridge_remote_user], name="Chiffrée")
    await linked.bob.send_state(secret, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    answer = await ask(linked, f"!passerelle link-remote {REMOTE} {secret}")
    assert "end-to-end encrypted" in answer, answer
    # A remote the config does not name.
    answer = await ask(linked, "!passerelle link-remote ailleurs !x:ailleurs.example")
    assert "is not a remote this bridge knows" in answer, answer
    assert REMOTE in answer, answer
    # Not a room reference.
    answer = await ask(linked, f"!passerelle link-remote {REMOTE} salle")
    assert "is not a room ID" in answer, answer
    # The list shows the working link only.
    answer = await ask(linked, "!passerelle links")
    assert f"{linked.remote_room} on {REMOTE}: relayed both ways" in answer, answer
    assert closed not in answer
    assert secret not in answer


async def test_only_moderators_link(
    linked: Linked, make_user: UserFactory, ministry_synapse: SynapseServer
) -> None:
    carol = await make_user("carol")
    await linked.alice.invite(linked.agency_room, carol.user_id)
    await carol.join(linked.agency_room)
    other = await linked.bob.create_room(invite=[linked.bridge_remote_user])
    question = await carol.send_text(
        linked.agency_room, f"!passerelle link-remote {REMOTE} {other}"
    )
    answer = await carol.wait_for_event(linked.agency_room, replies_to(question, linked.bot))
    assert "power level 50" in answer["content"]["body"]


async def test_unlink_stops_relaying(linked: Linked) -> None:
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "encore relié")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "encore relié"))
    answer = await ask(linked, f"!passerelle unlink-remote {REMOTE} {linked.remote_room}")
    assert answer.startswith(f"Unlinked {linked.remote_room} on {REMOTE}"), answer
    await linked.bob.send_text(linked.remote_room, "plus relié")
    await linked.alice.send_text(linked.agency_room, "ne part plus")
    await asyncio.sleep(4)
    agency = await linked.alice.messages(linked.agency_room)
    assert not [e for e in agency if body_has("plus relié")(e)]
    remote = await linked.bob.messages(linked.remote_room)
    assert not [e for e in remote if body_has("ne part plus")(e)]


async def test_edits_and_deletions_from_the_agency(linked: Linked) -> None:
    original = await linked.alice.send_text(linked.agency_room, "Rendez-vous à 10h")
    copy = await linked.bob.wait_for_event(linked.remote_room, body_has("Rendez-vous à 10h"))
    await linked.alice.send_event(
        linked.agency_room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* Rendez-vous à 11h",
            "m.new_content": {"msgtype": "m.text", "body": "Rendez-vous à 11h"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    )
    edit = await linked.bob.wait_for_event(linked.remote_room, body_has("Rendez-vous à 11h"))
    assert edit["content"]["m.relates_to"] == {
        "rel_type": "m.replace",
        "event_id": copy["event_id"],
    }
    assert edit["content"]["m.new_content"]["body"] == (
        f"Alice Martin {AGENCY_SUFFIX} : Rendez-vous à 11h"
    )
    await linked.alice.redact(linked.agency_room, original)
    await linked.bob.wait_for_event(
        linked.remote_room,
        lambda e: e.get("event_id") == copy["event_id"] and not e.get("content"),
        timeout=30,
    )


async def test_a_refused_send_is_told_next_to_the_message(linked: Linked) -> None:
    """The remote room stops letting the bridge's account speak (power levels): the message
    cannot go, and its author is told in a reply, once."""
    levels = await linked.bob.request(
        "GET", f"/_matrix/client/v3/rooms/{linked.remote_room}/state/m.room.power_levels"
    )
    levels["events_default"] = 50
    await linked.bob.send_state(linked.remote_room, "m.room.power_levels", levels)
    await asyncio.sleep(1)
    message = await linked.alice.send_text(linked.agency_room, "muet")
    notice = await linked.alice.wait_for_event(
        linked.agency_room, replies_to(message, linked.bot), timeout=30
    )
    assert notice["content"]["body"].startswith("Your message could not be passed on:")
    assert "M_FORBIDDEN" in notice["content"]["body"] or "403" in notice["content"]["body"]


async def test_a_remote_room_upgrade_is_reported(linked: Linked) -> None:
    await linked.bob.send_state(
        linked.remote_room,
        "m.room.tombstone",
        {"body": "Salle remplacée", "replacement_room": "!nouvelle:ministere.localhost"},
    )
    notice = await linked.alice.wait_for_event(
        linked.agency_room, body_has("was upgraded to !nouvelle:ministere.localhost")
    )
    assert notice["sender"] == linked.bot
    assert "link-remote ministere !nouvelle:ministere.localhost" in notice["content"]["body"]


async def test_a_link_from_the_config_file(
    synapse_setup: SynapseSetup,
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    people: tuple[MatrixTestClient, MatrixTestClient],
    db_url: str,
    tmp_path: Path,
) -> None:
    alice, bob = people
    bot = synapse_setup.config.bot_mxid
    alias = f"cfg{uuid.uuid4().hex[:6]}"
    await bob.create_room(invite=[ministry_bridge_account[0]], alias_localpart=alias)
    agency_room = await alice.create_room(invite=[bot], name="Par la config")
    raw = remote_config(synapse_setup, ministry_synapse, ministry_bridge_account)
    raw["links"] = [
        {"room": agency_room, "remote": REMOTE, "remote_room": f"#{alias}:ministere.localhost"}
    ]
    config_path = tmp_path / "config-links.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge-links.log")
    bridge.start()
    try:
        await alice.wait_for_membership(agency_room, bot, "join")
        await alice.wait_for_event(agency_room, message_from(bot))
        remote_room = await bob.request(
            "GET", f"/_matrix/client/v3/directory/room/%23{alias}:ministere.localhost"
        )
        await bob.send_text(remote_room["room_id"], "depuis la config")
        ghost = bridge.config.remote_ghost_mxid(REMOTE, bob.user_id)
        await alice.wait_for_event(agency_room, sent_by(ghost, "depuis la config"), timeout=30)
        question = await alice.send_text(agency_room, "!passerelle links")
        answer = await alice.wait_for_event(agency_room, replies_to(question, bot))
        assert "(from the config file)" in answer["content"]["body"]
    finally:
        bridge.stop()


async def test_someone_not_permitted_is_told_once_a_day(
    link_with: LinkFactory,
    people: tuple[MatrixTestClient, MatrixTestClient],
    make_user: UserFactory,
) -> None:
    alice, bob = people
    linked = await link_with(permissions={alice.user_id: "admin"})
    carol = await make_user("carol")
    await alice.invite(linked.agency_room, carol.user_id)
    await carol.join(linked.agency_room)
    first = await carol.send_text(linked.agency_room, "puis-je parler ?")
    notice = await alice.wait_for_event(
        linked.agency_room, replies_to(first, linked.bot), timeout=30
    )
    assert "are not passed on to ministere" in notice["content"]["body"]
    await carol.send_text(linked.agency_room, "et maintenant ?")
    await alice.send_text(linked.agency_room, "moi oui")
    await bob.wait_for_event(linked.remote_room, body_has("moi oui"), timeout=30)
    remote = await bob.messages(linked.remote_room)
    assert not [e for e in remote if "parler" in str(e.get("content"))]
    agency = await alice.messages(linked.agency_room)
    told = [e for e in agency if "are not passed on" in str(e.get("content"))]
    assert len(told) == 1


async def test_a_refused_token_is_named_when_linking(
    synapse_setup: SynapseSetup,
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    people: tuple[MatrixTestClient, MatrixTestClient],
    db_url: str,
    tmp_path: Path,
) -> None:
    alice, bob = people
    account = (ministry_bridge_account[0], "syt_not_a_valid_token_at_all")
    raw = remote_config(synapse_setup, ministry_synapse, account)
    config_path = tmp_path / "config-bad-token.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge-bad-token.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        remote_room = await bob.create_room(invite=[account[0]])
        agency_room = await alice.create_room(invite=[bot])
        await alice.wait_for_membership(agency_room, bot, "join")
        await alice.wait_for_event(agency_room, message_from(bot))
        question = await alice.send_text(
            agency_room, f"!passerelle link-remote {REMOTE} {remote_room}"
        )
        answer = await alice.wait_for_event(agency_room, replies_to(question, bot))
        assert "refused the bridge's access token" in answer["content"]["body"]
        assert "syt_not_a_valid_token_at_all" not in bridge.log_text()
    finally:
        bridge.stop()


async def test_the_room_hears_once_what_power_the_bot_needs(linked: Linked) -> None:
    """The bot, invited with power level 0, cannot set m.bridge state: the room is told once
    what level it needs instead of the bridge only logging a 403 (issue 10 defect)."""
    notice = await linked.alice.wait_for_event(
        linked.agency_room, body_has("the bot needs power level 50 here")
    )
    assert notice["sender"] == linked.bot
    await ask(linked, f"!passerelle unlink-remote {REMOTE} {linked.remote_room}")
    await ask(linked, f"!passerelle link-remote {REMOTE} {linked.remote_room}")
    events = await linked.alice.messages(linked.agency_room)
    assert len([e for e in events if body_has("the bot needs power level")(e)]) == 1
