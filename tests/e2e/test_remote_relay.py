"""A room on the agency homeserver and a room on another ministry's homeserver (a second,
unfederated Synapse) behave as one conversation, through the bridge's account there.

Real Synapses on both sides, the bridge as a subprocess.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup
from tests.e2e.test_bot import message_from, replies_to

REMOTE = "ministere"
SUFFIX = "(Ministère)"
AGENCY_SUFFIX = "(Agence)"

Predicate = Callable[[dict[str, Any]], bool]


def remote_config(
    synapse_setup: SynapseSetup,
    ministry: SynapseServer,
    account: tuple[str, str],
    **extra: Any,
) -> dict[str, Any]:
    """The session bridge config with the ministry server as a remote."""
    raw = dump_yaml_source(synapse_setup)
    user_id, token = account
    raw["remotes"] = {
        REMOTE: {
            "address": ministry.base_url,
            "server_name": ministry.server_name,
            "user_id": user_id,
            "access_token": token,
            "display_suffix": SUFFIX,
            "agency_suffix": AGENCY_SUFFIX,
            "sync_timeout": 5,
        }
        | extra
    }
    return raw


def dump_yaml_source(synapse_setup: SynapseSetup) -> dict[str, Any]:
    import ruamel.yaml

    data = ruamel.yaml.YAML(typ="safe").load(synapse_setup.config_path.read_text())
    assert isinstance(data, dict)
    return data


def sent_by(sender: str, text: str) -> Predicate:
    return lambda e: (
        e.get("sender") == sender
        and e.get("type") == "m.room.message"
        and text in str(e.get("content", {}).get("body", ""))
    )


def body_has(text: str) -> Predicate:
    return lambda e: (
        e.get("type") == "m.room.message" and text in str(e.get("content", {}).get("body", ""))
    )


@dataclass
class Linked:
    bridge: BridgeProcess
    alice: MatrixTestClient  # agency user
    bob: MatrixTestClient  # ministry user
    agency_room: str
    remote_room: str
    bridge_remote_user: str
    bot: str

    def ghost_of(self, user_id: str) -> str:
        return self.bridge.config.remote_ghost_mxid(REMOTE, user_id)


LinkFactory = Callable[..., Awaitable[Linked]]


async def link_rooms(
    synapse_setup: SynapseSetup,
    ministry: SynapseServer,
    account: tuple[str, str],
    alice: MatrixTestClient,
    bob: MatrixTestClient,
    db_url: str,
    tmp_path: Path,
    permissions: dict[str, str] | None = None,
    **extra: Any,
) -> Linked:
    raw = remote_config(synapse_setup, ministry, account, **extra)
    if permissions is not None:
        raw["permissions"] = permissions
    config_path = tmp_path / "config-remote.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge-remote.log")
    bridge.start()
    bot = synapse_setup.config.bot_mxid
    remote_room = await bob.create_room(
        invite=[account[0]], name="Coordination", alias_localpart=f"coord{uuid.uuid4().hex[:6]}"
    )
    agency_room = await alice.create_room(invite=[bot], name="Coordination agence")
    await alice.wait_for_membership(agency_room, bot, "join")
    await alice.wait_for_event(agency_room, message_from(bot))
    question = await alice.send_text(
        agency_room, f"!passerelle link-remote {REMOTE} {remote_room}"
    )
    answer = await alice.wait_for_event(agency_room, replies_to(question, bot))
    assert "Linked" in answer["content"]["body"], answer["content"]["body"]
    return Linked(bridge, alice, bob, agency_room, remote_room, account[0], bot)


async def test_text_both_ways_with_names(linked: Linked) -> None:
    # remote → agency: Bob's ghost, named from the remote room, with the suffix
    await linked.bob.send_text(linked.remote_room, "Bonjour de la part du ministère")
    ghost = linked.ghost_of(linked.bob.user_id)
    relayed = await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "Bonjour de la part du ministère"), timeout=30
    )
    assert relayed["content"]["m.mentions"] == {}
    members = await linked.alice.request(
        "GET", f"/_matrix/client/v3/rooms/{linked.agency_room}/joined_members"
    )
    assert members["joined"][ghost]["display_name"] == f"Bob Durand {SUFFIX}"

    # agency → remote: the bridge's account, with a per-message profile and a fallback
    await linked.alice.send_text(linked.agency_room, "Bien reçu, merci")
    sent = await linked.bob.wait_for_event(
        linked.remote_room, sent_by(linked.bridge_remote_user, "Bien reçu, merci"), timeout=30
    )
    content = sent["content"]
    assert content["body"] == f"Alice Martin {AGENCY_SUFFIX} : Bien reçu, merci"
    assert f"Alice Martin {AGENCY_SUFFIX} : " in content["formatted_body"]
    profile = content["com.beeper.per_message_profile"]
    assert profile["displayname"] == f"Alice Martin {AGENCY_SUFFIX}"
    assert profile["id"] == linked.alice.user_id

    # nothing echoes: the relayed messages are not relayed back
    agency = await linked.alice.messages(linked.agency_room)
    assert len([e for e in agency if body_has("Bien reçu")(e)]) == 1
    remote = await linked.bob.messages(linked.remote_room)
    assert len([e for e in remote if body_has("Bonjour de la part")(e)]) == 1


@pytest.mark.both_databases
async def test_replies_threads_edits_reactions_redactions(linked: Linked) -> None:
    ghost = linked.ghost_of(linked.bob.user_id)
    root_remote = await linked.bob.send_text(linked.remote_room, "Question: budget 2027 ?")
    root = await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "budget 2027"), timeout=30
    )
    # agency reply in a thread → remote thread under Bob's message
    await linked.alice.send_event(
        linked.agency_room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "Réponse dans le fil",
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": root["event_id"],
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": root["event_id"]},
            },
        },
    )
    threaded = await linked.bob.wait_for_event(
        linked.remote_room, body_has("Réponse dans le fil"), timeout=30
    )
    relates = threaded["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.thread"
    assert relates["event_id"] == root_remote

    # remote reply to the agency message → reply to the agency original
    agency_msg = await linked.alice.send_text(linked.agency_room, "Message à commenter")
    remote_copy = await linked.bob.wait_for_event(
        linked.remote_room, body_has("Message à commenter"), timeout=30
    )
    await linked.bob.send_event(
        linked.remote_room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "> <@x:y> Message à commenter\n\nD'accord",
            "m.relates_to": {"m.in_reply_to": {"event_id": remote_copy["event_id"]}},
        },
    )
    reply = await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "D'accord"))
    assert reply["content"]["body"] == "D'accord"  # fallback removed
    assert reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == agency_msg

    # remote edit → agency edit of the ghost's message
    await linked.bob.send_event(
        linked.remote_room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* Question: budget 2028 ?",
            "m.new_content": {"msgtype": "m.text", "body": "Question: budget 2028 ?"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": root_remote},
        },
    )
    edit = await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "budget 2028"))
    assert edit["content"]["m.relates_to"] == {
        "rel_type": "m.replace",
        "event_id": root["event_id"],
    }

    # agency reaction → remote reaction on the remote original
    await linked.alice.send_event(
        linked.agency_room,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": root["event_id"], "key": "👍"}},
    )
    reaction = await linked.bob.wait_for_event(
        linked.remote_room, lambda e: e.get("type") == "m.reaction", timeout=30
    )
    assert reaction["content"]["m.relates_to"]["event_id"] == root_remote

    # remote author deletes their message → the ghost's copy is deleted
    doomed = await linked.bob.send_text(linked.remote_room, "À supprimer")
    copy = await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "À supprimer"))
    await linked.bob.redact(linked.remote_room, doomed)
    await linked.alice.wait_for_event(
        linked.agency_room,
        lambda e: e.get("event_id") == copy["event_id"] and not e.get("content"),
        timeout=30,
    )


async def test_files_both_ways(linked: Linked) -> None:
    ghost = linked.ghost_of(linked.bob.user_id)
    data = b"%PDF-1.4 note de service\x00" * 20
    mxc = await linked.bob.upload(data, "application/pdf", "note.pdf")
    await linked.bob.send_event(
        linked.remote_room,
        "m.room.message",
        {
            "msgtype": "m.file",
            "body": "note.pdf",
            "url": mxc,
            "info": {"mimetype": "application/pdf", "size": len(data)},
        },
    )
    relayed = await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "note.pdf"), timeout=30
    )
    url = relayed["content"]["url"]
    assert url.startswith("mxc://localhost/")
    assert await linked.alice.download(url) == data

    image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
    mxc = await linked.alice.upload(image, "image/png", "plan.png")
    await linked.alice.send_event(
        linked.agency_room,
        "m.room.message",
        {"msgtype": "m.image", "body": "plan.png", "url": mxc, "info": {"mimetype": "image/png"}},
    )
    copy = await linked.bob.wait_for_event(linked.remote_room, body_has("plan.png"), timeout=30)
    assert copy["content"]["url"].startswith("mxc://ministere.localhost/")
    assert await linked.bob.download(copy["content"]["url"]) == image
    assert copy["content"]["filename"] == "plan.png"


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


async def set_avatar(client: MatrixTestClient, data: bytes, room_id: str) -> str:
    """Set the user's avatar and wait until their membership in the room shows it (Synapse
    updates room memberships after the profile call returns)."""
    mxc = await client.upload(data, "image/png", "avatar.png")
    await client.request(
        "PUT",
        f"/_matrix/client/v3/profile/{client.user_id}/avatar_url",
        json_body={"avatar_url": mxc},
    )
    path = f"/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{client.user_id}"
    for _ in range(100):
        if (await client.request("GET", path)).get("avatar_url") == mxc:
            return mxc
        await asyncio.sleep(0.1)
    raise AssertionError("the room never showed the new avatar")


async def test_avatars_cross_both_ways(linked: Linked) -> None:
    """A remote user's avatar becomes their ghost's; an agency user's goes with each message
    in the per-message profile, copied to the remote server."""
    await set_avatar(linked.bob, PNG, linked.remote_room)
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "avec avatar")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "avec avatar"))
    profile: dict[str, Any] = {}
    for _ in range(100):  # the ghost's profile is set while its message is sent
        profile = await linked.alice.request("GET", f"/_matrix/client/v3/profile/{ghost}")
        if "avatar_url" in profile:
            break
        await asyncio.sleep(0.1)
    assert profile["avatar_url"].startswith("mxc://localhost/")
    assert await linked.alice.download(profile["avatar_url"]) == PNG

    await set_avatar(linked.alice, PNG[::-1], linked.agency_room)
    await linked.alice.send_text(linked.agency_room, "mon avatar")
    sent = await linked.bob.wait_for_event(
        linked.remote_room, sent_by(linked.bridge_remote_user, "mon avatar")
    )
    avatar = sent["content"]["com.beeper.per_message_profile"]["avatar_url"]
    assert avatar.startswith("mxc://ministere.localhost/")
    assert await linked.bob.download(avatar) == PNG[::-1]


async def test_html_timestamps_and_mentions_from_the_remote(linked: Linked) -> None:
    """HTML is reduced to the allowlist, the original time is kept, and a mention of @room or
    of an agency member pings nobody here."""
    ghost = linked.ghost_of(linked.bob.user_id)
    original = await linked.bob.send_event(
        linked.remote_room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": f"@room attention {linked.alice.user_id}",
            "format": "org.matrix.custom.html",
            "formatted_body": '<b>attention</b><script>alert(1)</script><a href="javascript:x()">'
            'lien</a><img src="mxc://ministere.localhost/abc" onerror="x()">',
            "m.mentions": {"room": True, "user_ids": [linked.alice.user_id]},
        },
    )
    relayed = await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "attention"))
    content = relayed["content"]
    assert content["m.mentions"] == {}
    assert content["formatted_body"].startswith("<b>attention</b>")
    for bad in ("<script", "javascript:", "onerror", "<img"):
        assert bad not in content["formatted_body"]
    remote = [
        e for e in await linked.bob.messages(linked.remote_room) if e["event_id"] == original
    ]
    assert relayed["origin_server_ts"] == remote[0]["origin_server_ts"]


async def test_files_over_the_limit_are_named_not_copied(
    link_with: LinkFactory, people: tuple[MatrixTestClient, MatrixTestClient]
) -> None:
    alice, bob = people
    linked = await link_with(max_media_size=1000)
    ghost = linked.ghost_of(bob.user_id)
    big = b"%PDF" + b"x" * 5000
    mxc = await bob.upload(big, "application/pdf", "gros.pdf")
    await bob.send_event(
        linked.remote_room,
        "m.room.message",
        {"msgtype": "m.file", "body": "gros.pdf", "url": mxc, "info": {"size": len(big)}},
    )
    notice = await alice.wait_for_event(linked.agency_room, sent_by(ghost, "gros.pdf"))
    assert notice["content"]["msgtype"] == "m.notice"
    assert "too large to copy here (limit 1000 bytes)" in notice["content"]["body"]
    assert "url" not in notice["content"]

    # No size in info: the download itself stops at the limit.
    mxc = await alice.upload(big, "application/pdf", "rapport.pdf")
    await alice.send_event(
        linked.agency_room,
        "m.room.message",
        {"msgtype": "m.file", "body": "rapport.pdf", "url": mxc},
    )
    copy = await bob.wait_for_event(linked.remote_room, body_has("rapport.pdf"))
    assert "too large to pass on (limit 1000 bytes)" in copy["content"]["body"]
    assert "url" not in copy["content"]
