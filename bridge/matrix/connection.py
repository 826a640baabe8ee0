"""Keeps track of the homeserver: first contact, bot registration, self-ping, reachability."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

from bridge.config import Config
from bridge.core.backoff import Backoff
from bridge.core.errors import PermanentError, TransientError
from bridge.core.health import ComponentHealth
from bridge.matrix.client import MatrixClient

log = logging.getLogger("passerelle.matrix.connection")

CHECK_INTERVAL = 10.0


class HomeserverMonitor:
    """Connects to the homeserver with capped backoff, then checks it stays reachable.

    The bridge's HTTP server runs whether or not this has succeeded: the homeserver may come
    up after us, and its transactions are welcome as soon as it does.
    """

    def __init__(
        self,
        config: Config,
        client: MatrixClient,
        health: ComponentHealth,
        on_connected: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.client = client
        self.health = health
        self.on_connected = on_connected
        self.ready = asyncio.Event()
        self.ping_ms: int | None = None

    async def ensure_bot(self) -> None:
        """Register the bot user (already registered is fine)."""
        await self.client.register(self.config.appservice.bot_username)

    async def run(self) -> None:
        backoff = Backoff(initial=1.0, maximum=60.0)
        address = self.config.homeserver.address
        down = False
        while True:
            try:
                await self.client.versions()
                if not self.ready.is_set():
                    await self._first_contact()
                    await self.on_connected()
                elif down:
                    # A ping also tells Synapse to retry the transactions it holds for us now.
                    await self.client.ping(f"pas.ping.{secrets.token_hex(8)}")
                    log.info("homeserver at %s is reachable again", address)
                    await self.on_connected()
                down = False
                self.health.ok()
                backoff.reset()
                await asyncio.sleep(CHECK_INTERVAL)
            except (TransientError, PermanentError) as e:
                down = True
                problem = self._explain(e)
                self.health.failed(problem)
                delay = backoff.next_delay()
                log.warning("homeserver at %s: %s; retrying in %.0f s", address, problem, delay)
                await asyncio.sleep(delay)

    async def _first_contact(self) -> None:
        await self.ensure_bot()
        name = self.config.appservice.bot_displayname
        if await self.client.get_displayname(self.config.bot_mxid) != name:
            await self.client.set_displayname(self.config.bot_mxid, name)
        self.ping_ms = await self.client.ping(f"pas.ping.{secrets.token_hex(8)}")
        log.info(
            "connected to the homeserver as %s; it reached us back in %d ms",
            self.config.bot_mxid,
            self.ping_ms,
        )
        self.ready.set()

    def _explain(self, error: Exception) -> str:
        errcode = MatrixClient.errcode_of(error)
        if errcode == "M_CONNECTION_FAILED" or errcode == "M_CONNECTION_TIMEOUT":
            return (
                f"the homeserver cannot reach Passerelle at {self.config.appservice.address} "
                "(check appservice.address and that the port is open to the homeserver)"
            )
        if errcode in ("M_UNKNOWN_TOKEN", "M_FORBIDDEN") and "ping" not in str(error):
            return (
                f"{error} (is the registration file loaded by the homeserver, with the same "
                "as_token?)"
            )
        return str(error)
