"""GET /health: database, homeserver reachability, queues, version, as JSON."""

from __future__ import annotations

from aiohttp import web

from bridge.status import StatusReporter


def add_health_route(app: web.Application, status: StatusReporter) -> None:
    async def health(_request: web.Request) -> web.Response:
        report = await status.report()
        # 503 only when the bridge cannot take transactions; a missing homeserver is "degraded".
        code = 503 if report["status"] == "failing" else 200
        return web.json_response(report, status=code)

    app.router.add_get("/health", health)
