"""/metrics for Matrix → mail: one mail sent, one refused by the SMTP server, the outbox seen."""

from __future__ import annotations

import asyncio
import time

from tests.e2e.test_matrix_to_mail import OutSetup, received_with, wait_for
from tests.e2e.test_matrix_to_mail import alice as alice
from tests.e2e.test_matrix_to_mail import via_sink as via_sink
from tests.integration.test_metrics import Samples, scrape, value
from tests.integration.test_smtp import ScriptedHandler


async def test_mail_out_is_counted(via_sink: tuple[OutSetup, ScriptedHandler, int]) -> None:
    setup, handler, _ = via_sink
    url = setup.mail.bridge.base_url
    await setup.alice.send_text(setup.mail.room_id, "Premier message.")
    await wait_for(lambda: received_with(handler, "Premier message"), "the first mail")
    handler.data_replies = ["550 5.7.1 message content rejected"]
    await setup.alice.send_text(setup.mail.room_id, "Second message.")

    def outcome(samples: Samples, name: str) -> float:
        return value(samples, "passerelle_items_total", direction="mail_out", outcome=name)

    deadline = time.monotonic() + 20
    samples = await scrape(url)
    while not (outcome(samples, "sent") and outcome(samples, "failed")):
        assert time.monotonic() < deadline, "mail_out outcomes not counted"
        await asyncio.sleep(0.2)
        samples = await scrape(url)
    assert outcome(samples, "sent") == 1
    assert outcome(samples, "failed") == 1
    assert value(samples, "passerelle_relay_latency_seconds_count", direction="mail_out") == 1
    assert value(samples, "passerelle_connected", component="smtp", name="127.0.0.1") == 1
    assert value(samples, "passerelle_queue_depth", queue="mail_outbox") in (0, 1, 2)
