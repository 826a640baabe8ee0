"""GET /metrics over real HTTP: counts from committed audit rows, queue gauges, listeners."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, update

from bridge.app import Bridge, StartupError
from bridge.config import parse_config
from bridge.core.audit import AuditEntry
from bridge.db import audit as audit_db
from bridge.db.schema import audit_head
from bridge.harness.ports import free_port
from tests.conftest import InProcessBridge, bridge_config_dict
from tests.e2e.test_mail_to_matrix import MailSetup, body_contains
from tests.e2e.test_mail_to_matrix import mail_setup as mail_setup

TXN = "/_matrix/app/v1/transactions/"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


async def scrape(base_url: str) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/metrics") as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return parse(await resp.text())


def entry(outcome: str, reason: str | None = None, direction: str = "mail_in") -> AuditEntry:
    return AuditEntry(
        direction=direction,
        link="list@example.org",
        room_id="!room:localhost",
        sender="alice@example.org",
        outcome=outcome,
        reason=reason,
    )


async def test_metrics_on_the_appservice_listener(offline_bridge: InProcessBridge) -> None:
    samples = await scrape(offline_bridge.base_url)
    assert value(samples, "passerelle_items_total", direction="mail_in", outcome="posted") == 0
    assert value(samples, "passerelle_refused_total", direction="mail_out", reason="marking") == 0
    assert value(samples, "passerelle_connected", component="homeserver", name="localhost") == 0
    assert value(samples, "passerelle_appservice_transaction_seconds_count") == 0
    assert ("passerelle_build_info", ()) not in samples  # it has a version label
    # Queues read at start by the background task (no SMTP, no remotes: no outboxes here).
    await offline_bridge.bridge.metrics.refresh_queues()
    samples = await scrape(offline_bridge.base_url)
    for queue in ("appservice_inbox", "mail_in"):
        assert value(samples, "passerelle_queue_depth", queue=queue) == 0
        assert value(samples, "passerelle_queue_oldest_age_seconds", queue=queue) == 0
    assert ("passerelle_queue_depth", (("queue", "mail_outbox"),)) not in samples


async def test_committed_audit_rows_are_counted_once(offline_bridge: InProcessBridge) -> None:
    db = offline_bridge.bridge.db
    await audit_db.append(db, entry("posted"))
    await audit_db.append(db, entry("refused", "sender bob@evil.example not allowed"))
    await audit_db.append(db, entry("refused", "marking: level too high", "remote_in"))
    keyed = AuditEntry(**{**entry("ignored").__dict__, "item_key": "k1"})
    assert await audit_db.append(db, keyed) is not None
    assert await audit_db.append(db, keyed) is None  # a duplicate is not counted
    # A rolled-back transaction counts nothing.

    async def rolled_back() -> None:
        async with db.begin() as conn:
            await audit_db.append_in(conn, entry("posted"))
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await rolled_back()
    samples = await scrape(offline_bridge.base_url)
    assert value(samples, "passerelle_items_total", direction="mail_in", outcome="posted") == 1
    assert value(samples, "passerelle_items_total", direction="mail_in", outcome="refused") == 1
    assert value(samples, "passerelle_items_total", direction="mail_in", outcome="ignored") == 1
    assert value(samples, "passerelle_items_total", direction="remote_in", outcome="refused") == 1
    assert (
        value(
            samples, "passerelle_refused_total", direction="mail_in", reason="sender_not_allowed"
        )
        == 1
    )
    assert value(samples, "passerelle_refused_total", direction="remote_in", reason="marking") == 1


async def test_transactions_are_timed(offline_bridge: InProcessBridge) -> None:
    headers = {"Authorization": f"Bearer {offline_bridge.hs_token}"}
    async with aiohttp.ClientSession() as session:
        for n in range(3):
            async with session.put(
                f"{offline_bridge.base_url}{TXN}{n}", json={"events": []}, headers=headers
            ) as resp:
                assert resp.status == 200
    samples = await scrape(offline_bridge.base_url)
    assert value(samples, "passerelle_appservice_transaction_seconds_count") == 3
    # Other requests are not transactions.
    assert value(samples, "passerelle_appservice_transaction_seconds_count") == 3


async def test_errors_are_counted_by_area(offline_bridge: InProcessBridge) -> None:
    logging.getLogger("passerelle.mail.imap").error("boom (test)")
    logging.getLogger("passerelle.mail.imap").warning("not an error")
    samples = await scrape(offline_bridge.base_url)
    assert value(samples, "passerelle_errors_total", area="mail") == 1


@pytest.fixture
async def separate_port_bridge(db_url: str) -> AsyncIterator[tuple[InProcessBridge, int]]:
    port, metrics_port = free_port(), free_port()
    config = parse_config(
        bridge_config_dict(
            free_port(), port, db_url, metrics={"port": metrics_port, "hostname": "127.0.0.1"}
        ),
        env={},
    )
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield InProcessBridge(bridge, config, f"http://127.0.0.1:{port}"), metrics_port
    finally:
        await bridge.stop()


async def test_metrics_on_a_port_of_their_own(
    separate_port_bridge: tuple[InProcessBridge, int],
) -> None:
    bridge, metrics_port = separate_port_bridge
    samples = await scrape(f"http://127.0.0.1:{metrics_port}")
    assert value(samples, "passerelle_items_total", direction="mail_out", outcome="sent") == 0
    async with (
        aiohttp.ClientSession() as session,
        session.get(bridge.base_url + "/metrics") as resp,
    ):
        assert resp.status == 404  # not on the appservice listener then
        await resp.read()


async def test_metrics_port_taken_is_a_startup_error(db_url: str) -> None:
    taken = free_port()
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", taken)
    try:
        config = parse_config(
            bridge_config_dict(free_port(), free_port(), db_url, metrics={"port": taken}),
            env={},
        )
        bridge = Bridge(config)
        with pytest.raises(StartupError, match=r"metrics\.port"):
            await bridge.start()
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_disabled(db_url: str) -> None:
    port = free_port()
    config = parse_config(
        bridge_config_dict(free_port(), port, db_url, metrics={"enabled": False}), env={}
    )
    bridge = Bridge(config)
    await bridge.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            assert resp.status == 404
            await resp.read()
    finally:
        await bridge.stop()


async def test_scrape_reads_no_database(offline_bridge: InProcessBridge) -> None:
    """A scrape answers from memory: rendering runs no statement (it cannot await one), and
    with SQLite's write lock held by a long transaction (a busy relay), /metrics still
    answers at once."""
    bridge = offline_bridge.bridge
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(bridge.db.engine.sync_engine, "before_cursor_execute", count)
    try:
        bridge.metrics.render()
    finally:
        event.remove(bridge.db.engine.sync_engine, "before_cursor_execute", count)
    assert statements == []
    if bridge.db.dialect != "sqlite":
        return  # PostgreSQL's row locks do not hold up other work the way SQLite's do
    async with bridge.db.begin() as conn:
        await conn.execute(update(audit_head).values(seq=audit_head.c.seq))  # the write lock
        started = time.perf_counter()
        await asyncio.wait_for(scrape(offline_bridge.base_url), 2)
        assert time.perf_counter() - started < 1.0


async def scrape_until(
    base_url: str, done: Callable[[Samples], bool], timeout: float = 15
) -> Samples:
    """The first scrape where `done` holds: counts move once the item's state is committed,
    a moment after its message shows in the room."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(base_url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def test_mail_traffic_is_counted(mail_setup: MailSetup) -> None:
    """Real traffic through Dovecot and Synapse: one mail refused, one posted."""
    await mail_setup.deliver(mail_setup.mail("Spam", "buy now", sender="x@protonmail.com")[1])
    await mail_setup.deliver(mail_setup.mail("Légitime", "courrier normal")[1])
    await mail_setup.posted(body_contains("courrier normal"))
    url = mail_setup.bridge.base_url

    def posted(samples: Samples) -> float:
        return value(samples, "passerelle_items_total", direction="mail_in", outcome="posted")

    samples = await scrape_until(url, lambda s: posted(s) >= 1)
    assert posted(samples) == 1
    assert value(samples, "passerelle_items_total", direction="mail_in", outcome="refused") == 1
    assert (
        value(
            samples, "passerelle_refused_total", direction="mail_in", reason="sender_not_allowed"
        )
        == 1
    )
    assert value(samples, "passerelle_relay_latency_seconds_count", direction="mail_in") == 1
    assert 0 < value(samples, "passerelle_relay_latency_seconds_sum", direction="mail_in") < 30
    assert value(samples, "passerelle_connected", component="imap", name=mail_setup.address) == 1
    assert value(samples, "passerelle_connected", component="homeserver", name="localhost") == 1
    # Synapse pushed the room's events: the transactions were timed.
    assert value(samples, "passerelle_appservice_transaction_seconds_count") >= 1
