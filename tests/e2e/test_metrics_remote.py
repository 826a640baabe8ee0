"""/metrics with a linked remote room: both directions counted, timed, the /sync connection up."""

from __future__ import annotations

import asyncio
import time

from tests.e2e.test_remote_relay import REMOTE, Linked, sent_by
from tests.integration.test_metrics import Samples, scrape, value


async def test_remote_traffic_is_counted(linked: Linked) -> None:
    await linked.bob.send_text(linked.remote_room, "Bonjour du ministère")
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "Bonjour du ministère"), timeout=30
    )
    await linked.alice.send_text(linked.agency_room, "Bien reçu")
    await linked.bob.wait_for_event(
        linked.remote_room, sent_by(linked.bridge_remote_user, "Bien reçu"), timeout=30
    )

    def counted(samples: Samples) -> bool:
        return all(
            value(samples, "passerelle_items_total", direction=d, outcome=o) >= 1
            for d, o in (("remote_in", "posted"), ("remote_out", "sent"))
        )

    deadline = time.monotonic() + 15
    samples = await scrape(linked.bridge.base_url)
    while not counted(samples) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        samples = await scrape(linked.bridge.base_url)
    assert value(samples, "passerelle_items_total", direction="remote_in", outcome="posted") == 1
    assert value(samples, "passerelle_items_total", direction="remote_out", outcome="sent") == 1
    for direction in ("remote_in", "remote_out"):
        count = value(samples, "passerelle_relay_latency_seconds_count", direction=direction)
        assert count == 1, direction
    assert value(samples, "passerelle_connected", component="remote", name=REMOTE) == 1
    # The remote outbox is watched (read at start, then every few seconds in the background).
    assert value(samples, "passerelle_queue_depth", queue="remote_outbox") in (0, 1)
    assert value(samples, "passerelle_queue_refreshed_timestamp_seconds") > 0
