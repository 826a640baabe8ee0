"""The audit log as an administrator finds it after real traffic: one row per item, in every
direction, with the right outcome and IDs, and `passerelle audit verify` content with it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys

import pytest

from bridge.config import DatabaseConfig
from bridge.core.audit import AuditRow
from bridge.db import audit as audit_db
from bridge.db.engine import open_database
from tests.conftest import BridgeProcess, subprocess_env
from tests.e2e.test_mail_to_matrix import MailSetup, body_contains
from tests.e2e.test_mail_to_matrix import mail_setup as mail_setup  # the fixture
from tests.e2e.test_matrix_to_mail import OutSetup, received_with, wait_for
from tests.e2e.test_matrix_to_mail import alice as alice  # the fixture
from tests.e2e.test_matrix_to_mail import via_sink as via_sink  # the fixture
from tests.e2e.test_remote_relay import Linked, sent_by
from tests.integration.test_smtp import ScriptedHandler


async def audit_rows(bridge: BridgeProcess) -> list[AuditRow]:
    db = await open_database(DatabaseConfig(url=bridge.database_url, pool_size=2))
    try:
        return [row async for row in audit_db.rows(db)]
    finally:
        await db.close()


async def rows_until(bridge: BridgeProcess, count: int, timeout: float = 30) -> list[AuditRow]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await audit_rows(bridge)
        if len(rows) >= count or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.3)


def verify_cli(bridge: BridgeProcess) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("PASSERELLE_")}
    env["PASSERELLE_DATABASE__URL"] = bridge.database_url
    return subprocess.run(
        [sys.executable, "-m", "bridge", "audit", "verify", "-c", str(bridge.config_path)],
        capture_output=True,
        text=True,
        env=env | {"PATH": os.environ.get("PATH", "")},
        timeout=120,
        check=False,
    )


@pytest.mark.both_databases
async def test_mail_in_posted_and_refused(mail_setup: MailSetup) -> None:
    message_id, raw = mail_setup.mail("Commande", "trois ramettes de papier")
    await mail_setup.deliver(raw)
    posted = await mail_setup.posted(body_contains("trois ramettes"))
    spam_id, spam = mail_setup.mail("Promo", "buy now", sender="x@protonmail.com")
    await mail_setup.deliver(spam)
    forged_id, forged = mail_setup.mail("Urgent", "virement")  # no trusted result: unverified
    await mail_setup.deliver(forged, auth=False)
    rows = await rows_until(mail_setup.bridge, 3)
    by_id = {r.entry.ids.get("message_id"): r for r in rows if r.entry.direction == "mail_in"}

    ok = by_id[message_id.strip("<>")]
    assert ok.entry.outcome == "posted"
    assert ok.entry.ids["event_id"] == posted["event_id"]
    assert ok.entry.sender == "agent.dupont@achats.gouv.fr"
    assert ok.entry.link == mail_setup.address
    assert ok.entry.room_id == mail_setup.room_id
    assert ok.entry.verdict == "authenticated"
    assert ok.entry.body_sha256 is not None
    assert len(ok.entry.body_sha256) == 64

    refused = by_id[spam_id.strip("<>")]
    assert refused.entry.outcome == "refused"
    assert refused.entry.sender == "x@protonmail.com"
    assert "not allowed" in (refused.entry.reason or "")
    assert "event_id" not in refused.entry.ids
    assert refused.entry.body_sha256 is not None
    assert len(refused.entry.body_sha256) == 64
    assert refused.entry.body_sha256 != hashlib.sha256(b"").hexdigest()

    unverified = by_id[forged_id.strip("<>")]
    assert unverified.entry.outcome == "refused"
    assert unverified.entry.verdict == "unverified"
    assert "unverified" in (unverified.entry.reason or "")

    done = verify_cli(mail_setup.bridge)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"{len(rows)} rows" in done.stdout


async def test_matrix_to_mail_retried_then_sent_is_one_row(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    handler.data_replies = ["451 4.3.0 try again later"]
    event_id = await setup.alice.send_text(setup.mail.room_id, "Réunion jeudi à 14 h.")
    await wait_for(lambda: received_with(handler, "union jeudi"), "the retried mail")
    await rows_until(setup.mail.bridge, 1)
    await asyncio.sleep(1.5)  # a second row, if any, would come within the retry delay
    rows = [r for r in await audit_rows(setup.mail.bridge) if r.entry.direction == "mail_out"]
    assert len(rows) == 1
    entry = rows[0].entry
    assert entry.outcome == "sent"
    assert entry.ids["event_id"] == event_id
    assert entry.ids["message_id"]
    assert entry.sender == setup.alice.user_id
    assert entry.recipients == (setup.mail.address,)
    assert entry.link == setup.mail.address
    assert verify_cli(setup.mail.bridge).returncode == 0


@pytest.mark.both_databases
async def test_remote_both_ways(linked: Linked) -> None:
    await linked.bob.send_text(linked.remote_room, "Note du ministère")
    ghost = linked.ghost_of(linked.bob.user_id)
    relayed = await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "Note du ministère"), timeout=30
    )
    event_id = await linked.alice.send_text(linked.agency_room, "Merci, bien noté")
    sent = await linked.bob.wait_for_event(
        linked.remote_room, sent_by(linked.bridge_remote_user, "Merci, bien noté"), timeout=30
    )
    rows = await rows_until(linked.bridge, 2)
    deadline = asyncio.get_running_loop().time() + 30
    while not any(r.entry.direction == "remote_out" for r in rows):
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.3)
        rows = await audit_rows(linked.bridge)
    incoming = [
        r
        for r in rows
        if r.entry.direction == "remote_in" and r.entry.ids.get("event_id") == relayed["event_id"]
    ]
    assert len(incoming) == 1
    assert incoming[0].entry.outcome == "posted"
    assert incoming[0].entry.sender == linked.bob.user_id
    assert incoming[0].entry.ids["remote_event_id"]
    outgoing = [r for r in rows if r.entry.direction == "remote_out"]
    assert len(outgoing) == 1
    assert outgoing[0].entry.outcome == "sent"
    assert outgoing[0].entry.ids == {"event_id": event_id, "remote_event_id": sent["event_id"]}
    assert outgoing[0].entry.sender == linked.alice.user_id
    assert outgoing[0].entry.recipients == (linked.remote_room,)
    assert verify_cli(linked.bridge).returncode == 0
