"""GET /metrics: the bridge's Prometheus metrics, in a registry of its own, read from memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.core.audit import DIRECTIONS, OUTCOMES, AuditEntry
from bridge.core.health import ComponentHealth
from bridge.core.metric_labels import REFUSAL_KINDS, refusal_kind

log = logging.getLogger("passerelle.metrics")

# Seconds: a mail or event crosses in well under a second when all is well, minutes when a
# server was down; the top buckets show the retries.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
TRANSACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# How often the queue gauges are read from the database; a scrape never queries it.
QUEUE_REFRESH_SECONDS = 5.0

QueueSource = Callable[[], Awaitable[tuple[int, int | None]]]  # (depth, oldest ms or None)
HealthSource = Callable[[], Mapping[str, ComponentHealth]]


class _Connections(Collector):
    """passerelle_connected, read at scrape time from the health objects (memory only)."""

    def __init__(self) -> None:
        self.sources: dict[str, HealthSource] = {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "passerelle_connected",
            "1 when the last contact with the server succeeded, 0 when it failed or never "
            "happened; component is homeserver, smtp, imap (name: the mailbox address) or "
            "remote (name: the remote's name in the config).",
            labels=["component", "name"],
        )
        for component, source in self.sources.items():
            for name, health in sorted(source().items()):
                family.add_metric([component, name], 1.0 if health.reachable else 0.0)
        yield family


class _ErrorCounter(logging.Handler):
    """Counts the ERROR (and worse) records of the passerelle.* loggers by area."""

    def __init__(self, counter: Counter) -> None:
        super().__init__(logging.ERROR)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        # "passerelle.mail.imap" → "mail": a handful of areas, fixed by the code.
        parts = record.name.split(".")
        self.counter.labels(area=parts[1] if len(parts) > 1 else "bridge").inc()


class Metrics:
    """The bridge's metrics. Several bridges in one process each have their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter(
            "passerelle_items",
            "Items that reached a final state, by direction and outcome (one per audit row).",
            ["direction", "outcome"],
            registry=r,
        )
        self.refused = Counter(
            "passerelle_refused",
            "Refused items by direction and kind of reason.",
            ["direction", "reason"],
            registry=r,
        )
        for direction in DIRECTIONS:
            for outcome in OUTCOMES:
                self.items.labels(direction=direction, outcome=outcome)
            for kind in REFUSAL_KINDS:
                self.refused.labels(direction=direction, reason=kind)
        self.latency = Histogram(
            "passerelle_relay_latency_seconds",
            "Time from intake to delivery, retries included (mail_in: fetched → posted; "
            "mail_out: queued → accepted by SMTP; remote_in: from /sync → posted; "
            "remote_out: queued → sent; webhook_out: queued → accepted by the receiver).",
            ["direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transaction = Histogram(
            "passerelle_appservice_transaction_seconds",
            "Time to take one appservice transaction from the homeserver (store and answer).",
            buckets=TRANSACTION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "passerelle_queue_depth",
            "Items waiting in a durable queue (refreshed every few seconds).",
            ["queue"],
            registry=r,
        )
        self.queue_oldest = Gauge(
            "passerelle_queue_oldest_age_seconds",
            "Age of the oldest waiting item of a queue; 0 when it is empty.",
            ["queue"],
            registry=r,
        )
        self.queue_refreshed = Gauge(
            "passerelle_queue_refreshed_timestamp_seconds",
            "When the queue gauges were last read from the database.",
            registry=r,
        )
        self.errors = Counter(
            "passerelle_errors",
            "Errors logged by the bridge, by area (mail, matrix, remote, db, ...).",
            ["area"],
            registry=r,
        )
        info = Gauge("passerelle_build_info", "Passerelle's version.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        self.connections = _Connections()
        r.register(self.connections)
        self.queues: dict[str, QueueSource] = {}
        self._error_handler = _ErrorCounter(self.errors)

    # --- hooks the bridge calls ---------------------------------------------------------

    def audited(self, entry: AuditEntry) -> None:
        """An audit row committed: one item reached its final state."""
        self.items.labels(direction=entry.direction, outcome=entry.outcome).inc()
        if entry.outcome == "refused":
            self.refused.labels(direction=entry.direction, reason=refusal_kind(entry.reason)).inc()

    def relayed(self, direction: str, seconds: float) -> None:
        self.latency.labels(direction=direction).observe(seconds)

    def watch_errors(self, logger: logging.Logger) -> None:
        logger.addHandler(self._error_handler)

    def unwatch_errors(self, logger: logging.Logger) -> None:
        logger.removeHandler(self._error_handler)

    async def refresh_queues(self) -> None:
        now = time.time()
        for name, source in self.queues.items():
            depth, oldest_ms = await source()
            self.queue_depth.labels(queue=name).set(depth)
            age = 0.0 if oldest_ms is None else max(0.0, now - oldest_ms / 1000)
            self.queue_oldest.labels(queue=name).set(age)
        self.queue_refreshed.set(now)

    async def run(self, interval: float = QUEUE_REFRESH_SECONDS) -> None:
        """Refresh the queue gauges until cancelled; a failing database is retried."""
        while True:
            try:
                await self.refresh_queues()
            except Exception as e:
                log.warning("could not read the queue depths: %s", e)
            await asyncio.sleep(interval)

    # --- HTTP ---------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def time_transactions(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Times the appservice transaction PUTs (the other requests pass untimed)."""
        if request.method != "PUT" or "/transactions/" not in request.path:
            response: web.StreamResponse = await handler(request)
            return response
        started = time.perf_counter()
        try:
            response = await handler(request)
        finally:
            self.transaction.observe(time.perf_counter() - started)
        return response


def add_metrics_route(app: web.Application, metrics: Metrics) -> None:
    app.router.add_get("/metrics", metrics.handle)


async def start_metrics_listener(metrics: Metrics, hostname: str, port: int) -> web.AppRunner:
    """/metrics alone on hostname:port (metrics.port set); the caller cleans the runner up."""
    app = web.Application()
    add_metrics_route(app, metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, hostname, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
