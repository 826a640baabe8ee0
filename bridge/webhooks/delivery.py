"""Outbound deliveries: one signed POST to a legacy system's URL, through the egress checks.

Redirects are never followed (a 3xx is the receiver's answer, not a way to reach elsewhere);
proxies from the environment are not used; the address connected to is the one checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bridge import __version__
from bridge.core.errors import TransientError
from bridge.webhooks.egress import (
    EgressPolicy,
    EgressRefused,
    check_destination,
    check_url,
    egress_refusal,
    egress_resolver,
    egress_session,
)
from bridge.webhooks.signature import sign

log = logging.getLogger("passerelle.webhooks.out")

USER_AGENT = f"Passerelle/{__version__} (outbound webhook)"
_SHOWN_ANSWER = 300  # characters of an answer body kept for the log (DEBUG)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None  # the Retry-After header, as sent


class Deliverer:
    """POSTs deliveries. EgressRefused when the URL or the address it resolves to is not
    allowed (the caller fails the delivery); TransientError when the receiver could not be
    reached or did not answer in time; otherwise the receiver's answer."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        timeout: float,
        dns_server: tuple[str, int] | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.dns_server = dns_server
        self._session: aiohttp.ClientSession | None = None
        self._resolver = egress_resolver(policy, dns_server)

    async def check(self, url: str) -> str:
        """The URL normalised if it is allowed and its host resolves to allowed addresses now;
        EgressRefused (or TransientError when the name does not resolve) otherwise."""
        try:
            return str(await check_destination(self.policy, url, self._resolver))
        except OSError as e:
            raise TransientError(f"the host of the URL does not resolve: {e}") from None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = egress_session(
                self.policy, timeout=self.timeout, dns_server=self.dns_server
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, webhook_id: str, body: bytes, keys: Sequence[bytes]) -> Answer:
        target = check_url(self.policy, url)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            # Every valid key's signature (after a rotation, the old one too), space-separated.
            "webhook-signature": " ".join(sign(k, webhook_id, timestamp, body) for k in keys),
        }
        try:
            async with self._open().post(
                target, data=body, headers=headers, allow_redirects=False
            ) as response:
                text = await response.content.read(_SHOWN_ANSWER)
                log.debug(
                    "%s answered %d to %s: %r",
                    target.host,
                    response.status,
                    webhook_id,
                    text.decode("utf-8", "replace"),
                )
                return Answer(response.status, response.headers.get("retry-after"))
        except EgressRefused:
            raise
        except aiohttp.ClientConnectorError as e:
            refused = egress_refusal(e)
            if refused is not None:
                raise refused from None
            raise TransientError(f"cannot connect to {target.host}: {e.strerror or e}") from None
        except TimeoutError:
            raise TransientError(
                f"{target.host} did not answer within {self.timeout:g} s"
            ) from None
        except aiohttp.ClientError as e:
            raise TransientError(f"{target.host}: {type(e).__name__}: {e}") from None
