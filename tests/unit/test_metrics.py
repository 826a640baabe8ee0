"""The metrics without a bridge: config keys, refusal kinds, counting, queue gauges, render."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import ConfigError, parse_config
from bridge.core.audit import AuditEntry
from bridge.core.health import ComponentHealth
from bridge.core.metric_labels import REFUSAL_KINDS, refusal_kind
from bridge.web.metrics import Metrics
from tests.unit.test_config import minimal


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_config_defaults() -> None:
    config = parse_config(minimal(), env={})
    assert config.metrics.enabled is True
    assert config.metrics.hostname == "127.0.0.1"
    assert config.metrics.port is None


def test_config_port_and_env_override() -> None:
    config = parse_config(
        minimal(metrics={"port": 9101}), env={"PASSERELLE_METRICS__ENABLED": "false"}
    )
    assert config.metrics.port == 9101
    assert config.metrics.enabled is False


@pytest.mark.parametrize(
    ("metrics", "key"),
    [
        ({"port": 0}, "metrics.port"),
        ({"port": "9100"}, "metrics.port"),
        ({"enabled": "yes"}, "metrics.enabled"),
        ({"hostname": ""}, "metrics.hostname"),
        ({"bogus": 1}, "metrics.bogus"),
    ],
)
def test_config_errors_name_the_key(metrics: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(metrics=metrics), env={})
    assert caught.value.key == key


def test_config_port_may_not_be_the_appservice_port() -> None:
    raw = minimal(metrics={"port": 29330})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env={})
    assert caught.value.key == "metrics.port"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("sender bob@evil.example not allowed", "sender_not_allowed"),
        ("recipient not allowed: x@y.z", "recipient_not_allowed"),
        ("@bob:localhost may not use the bridge", "sender_not_allowed"),
        ("not permitted", "not_permitted"),
        ("sender a@b.fr unverified: no Authentication-Results", "not_authenticated"),
        ("sender a@b.fr failed: dmarc=fail", "not_authenticated"),
        ("marking: level too high for this room", "marking"),
        ("mail too large: 99999999 bytes (limit 1000)", "too_large"),
        ("more than 100 MIME parts", "too_large"),
        ("malformed From header", "unparseable"),
        ("unparsable mail headers (ValueError)", "unparseable"),
        ("encrypted media", "encrypted"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_refusal_kinds(reason: str | None, kind: str) -> None:
    assert refusal_kind(reason) == kind
    assert kind in REFUSAL_KINDS


def entry(outcome: str, reason: str | None = None) -> AuditEntry:
    return AuditEntry("mail_out", "list@example.org", None, None, outcome, reason=reason)


def test_every_series_starts_at_zero_and_counts() -> None:
    metrics = Metrics()
    before = samples(metrics)
    key = ("passerelle_items_total", (("direction", "mail_out"), ("outcome", "sent")))
    assert before[key] == 0
    metrics.audited(entry("sent"))
    metrics.audited(entry("refused", "recipient not allowed: a@b.c"))
    after = samples(metrics)
    assert after[key] == 1
    refused = (
        "passerelle_refused_total",
        (("direction", "mail_out"), ("reason", "recipient_not_allowed")),
    )
    assert after[refused] == 1


def test_registries_are_separate() -> None:
    one, two = Metrics(), Metrics()
    one.audited(entry("sent"))
    key = ("passerelle_items_total", (("direction", "mail_out"), ("outcome", "sent")))
    assert samples(one)[key] == 1
    assert samples(two)[key] == 0


async def test_queue_gauges_are_read_by_refresh_not_by_render() -> None:
    metrics = Metrics()
    calls = 0

    async def outbox() -> tuple[int, int | None]:
        nonlocal calls
        calls += 1
        return 3, int((time.time() - 60) * 1000)

    async def empty() -> tuple[int, int | None]:
        return 0, None

    metrics.queues["mail_outbox"] = outbox
    metrics.queues["remote_outbox"] = empty
    metrics.render()
    assert calls == 0
    await metrics.refresh_queues()
    values = samples(metrics)
    assert values[("passerelle_queue_depth", (("queue", "mail_outbox"),))] == 3
    age = values[("passerelle_queue_oldest_age_seconds", (("queue", "mail_outbox"),))]
    assert 59 <= age < 70
    assert values[("passerelle_queue_oldest_age_seconds", (("queue", "remote_outbox"),))] == 0
    assert calls == 1


def test_connections_follow_the_health_objects() -> None:
    metrics = Metrics()
    up, down = ComponentHealth("imap:a"), ComponentHealth("imap:b")
    up.ok()
    down.failed("refused")
    metrics.connections.sources["imap"] = lambda: {"a@x.fr": up, "b@x.fr": down}
    values = samples(metrics)
    assert values[("passerelle_connected", (("component", "imap"), ("name", "a@x.fr")))] == 1
    assert values[("passerelle_connected", (("component", "imap"), ("name", "b@x.fr")))] == 0
