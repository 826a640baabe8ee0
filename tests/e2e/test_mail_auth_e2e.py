"""Sender authentication end to end: mail sent through the real Postfix with Debian's opendkim and
opendmarc (the agency MTA), delivered by Dovecot, read by the bridge, posted (or not) in a real
Synapse room, with the verdict in the room. The milters' own cases are in
tests/integration/test_mail_auth_rig.py; the relay's rules in test_mail_auth_relay.py."""

from __future__ import annotations

import asyncio
import html
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bridge.core.authentication import CONTENT_KEY, FAILED, MARKS
from bridge.core.ghosts import encode_localpart
from bridge.harness.dovecot import DovecotServer
from bridge.harness.mailauth import AuthRig
from bridge.harness.synapse import MatrixRequestError, MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import AUTHSERV_ID, BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_mail_to_matrix import PASSWORD, body_contains, bridge_config_with_mailbox

AGENCY = "presidence.gouv.fr"  # must be authenticated on this link
PARTNER = "other.example"  # allowed, not required: posted with a marker when not authenticated
BOUNCE = "bounce@relay.test"


@dataclass
class AuthSetup:
    rig: AuthRig
    address: str
    alice: MatrixTestClient
    room_id: str
    bot: str
    ghost_of: Any

    def mail(self, sender: str, subject: str, body: str, *, headers: str = "") -> bytes:
        domain = sender.rpartition("@")[2].rstrip(">")
        return (
            f"{headers}From: {sender}\r\nTo: {self.address}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 09:00:00 +0100\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@{domain}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n" + body + "\r\n"
        ).encode()

    async def send(self, raw: bytes, *, signed_by: str | None = None) -> None:
        """Through the agency MTA (the milters), as a mail from outside arrives."""
        if signed_by is not None:
            raw = self.rig.sign(raw, signed_by)
        await asyncio.to_thread(self.rig.send, raw, BOUNCE, self.address)

    async def posted(self, text: str) -> dict[str, Any]:
        return await self.alice.wait_for_event(self.room_id, body_contains(text), timeout=30)


@pytest.fixture
async def auth_setup(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    auth_rig: AuthRig,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[AuthSetup]:
    address = dovecot.add_user(f"auth{uuid.uuid4().hex[:8]}", PASSWORD)
    alice = await make_user("alice")
    bot = synapse_setup.config.bot_mxid
    room_id = await alice.create_room(invite=[bot], name="Cabinet")
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["mail"]["trust"] = {"authserv_id": [AUTHSERV_ID]}
    raw["links"] = [
        {
            "room": room_id,
            "address": address,
            "allowed_senders": [AGENCY, PARTNER],
            "require_authenticated": [AGENCY],
        }
    ]
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    config = synapse_setup.config
    try:
        await alice.wait_for_membership(room_id, bot, "join", timeout=60)
        await asyncio.sleep(1)  # the new link notes where the mailbox ends
        yield AuthSetup(
            auth_rig,
            address,
            alice,
            room_id,
            bot,
            lambda a: config.ghost_mxid(encode_localpart(a)),
        )
    finally:
        bridge.stop()


async def display_name(client: MatrixTestClient, mxid: str) -> str | None:
    """A user's global display name; None when the homeserver knows no such user."""
    try:
        profile = await client.request("GET", f"/_matrix/client/v3/profile/{quote(mxid)}")
    except MatrixRequestError as e:
        if e.status == 404:
            return None
        raise
    return str(profile.get("displayname"))


async def test_only_what_the_agency_mta_authenticated_speaks_as_an_agent(
    auth_setup: AuthSetup,
) -> None:
    setup = auth_setup
    # A forgery first: unsigned, From an agent, with an Authentication-Results claiming the
    # MTA's own id. The MTA strips that header and writes its own (DMARC fail).
    forged_results = f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={AGENCY}; "
    forged_results += f"dmarc=pass header.from={AGENCY}\r\n"
    president = f"president@{AGENCY}"
    await setup.send(
        setup.mail(
            f"Le Président <{president}>", "Ordre", "virement urgent", headers=forged_results
        )
    )
    # The real one, signed by the agency's domain.
    cabinet = f"cabinet@{AGENCY}"
    await setup.send(
        setup.mail(f"Cabinet <{cabinet}>", "Réunion", "réunion à 10 h"), signed_by=AGENCY
    )
    real = await setup.posted("réunion à 10 h")
    assert real["sender"] == setup.ghost_of(cabinet)
    assert real["content"][CONTENT_KEY] == {
        "verdict": "authenticated",
        "method": "dmarc",
        "domain": AGENCY,
    }
    assert "⚠" not in real["content"]["body"]

    events = await setup.alice.messages(setup.room_id, limit=100)
    assert not [e for e in events if "virement urgent" in str(e.get("content"))]
    [notice] = [
        e for e in events if e["sender"] == setup.bot and president in e["content"].get("body", "")
    ]
    assert "requires its sender to be authenticated" in notice["content"]["body"]
    assert FAILED in notice["content"]["body"]
    # No ghost was ever made for the forged sender.
    assert await display_name(setup.alice, setup.ghost_of(president)) is None


async def test_an_allowed_unauthenticated_sender_is_marked_and_cannot_rename_a_ghost(
    auth_setup: AuthSetup,
) -> None:
    setup = auth_setup
    partner = f"alice@{PARTNER}"
    await setup.send(setup.mail(f"Alice <{partner}>", "Devis", "devis signé"), signed_by=PARTNER)
    signed = await setup.posted("devis signé")
    assert signed["content"][CONTENT_KEY]["verdict"] == "authenticated"
    ghost = setup.ghost_of(partner)
    assert await display_name(setup.alice, ghost) == f"Alice ({partner})"

    # Unsigned now, under another name: other.example publishes p=reject, so the MTA says
    # DMARC fail. The link allows the domain without requiring authentication: posted, marked.
    await setup.send(setup.mail(f"Le Ministre <{partner}>", "Devis 2", "second devis"))
    marked = await setup.posted("second devis")
    content = marked["content"]
    assert content["body"].startswith(MARKS[FAILED])
    assert content["formatted_body"].startswith(f"<p><strong>{html.escape(MARKS[FAILED])}")
    assert content[CONTENT_KEY] == {"verdict": FAILED, "method": "dmarc", "domain": PARTNER}
    assert marked["sender"] == ghost
    assert await display_name(setup.alice, ghost) == f"Alice ({partner})"
