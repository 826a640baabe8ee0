"""Outbound webhook egress against real servers: a receiving aiohttp app on 127.0.0.1 and the
harness's DNS server; every refusal is checked to have sent nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from bridge.harness.dns import DnsServer
from bridge.harness.ports import free_port
from bridge.webhooks.egress import (
    EgressPolicy,
    EgressRefused,
    egress_refusal,
    egress_session,
    parse_egress,
    post,
)

BODY = b'{"text":"Bonjour"}'
HEADERS = {"Content-Type": "application/json"}


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording every request it gets."""

    port: int
    received: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # method path host

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.method, request.path_qs, request.host, body))
        if request.path == "/hook/redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{self.port}/secret")
        return web.Response(text="reçu " + "x" * 2000)


async def serve(port: int) -> tuple[Receiver, web.AppRunner]:
    receiver = Receiver(port)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return receiver, runner


@pytest.fixture
async def server() -> AsyncIterator[Receiver]:
    receiver, runner = await serve(free_port())
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(address="127.0.0.1", port=free_port())
    server.set("loop.egress.test", "A", ["127.0.0.1"])
    server.set("meta.egress.test", "A", ["169.254.169.254"])
    server.set("mixed.egress.test", "A", ["10.1.2.3", "127.0.0.1"])
    server.set("six.egress.test", "AAAA", ["::1"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def refused(policy: EgressPolicy, url: str, **session: object) -> str:
    async with egress_session(policy, timeout=5, **session) as http:  # type: ignore[arg-type]
        with pytest.raises(EgressRefused) as caught:
            await post(http, policy, url, BODY, HEADERS)
    return str(caught.value)


# -- (a), (b): a name resolving to loopback ------------------------------------------------------


async def test_localhost_is_refused_after_resolution(server: Receiver) -> None:
    policy = parse_egress([f"http://localhost:{server.port}/hook"])
    reason = await refused(policy, f"http://localhost:{server.port}/hook")
    assert reason.startswith("localhost resolves to ")
    assert "loopback" in reason
    assert server.received == []


async def test_localhost_is_allowed_once_loopback_is_listed(server: Receiver) -> None:
    # ::1 too, for systems where localhost also resolves to it.
    policy = parse_egress([f"http://localhost:{server.port}/hook", "127.0.0.0/8", "::1"])
    async with egress_session(policy, timeout=5) as http:
        status, text = await post(http, policy, f"http://LOCALHOST:{server.port}/hook/x", BODY, {})
    assert status == 200
    assert text == "reçu " + "x" * 995  # at most 1000 characters
    assert server.received == [("POST", "/hook/x", f"localhost:{server.port}", BODY)]


async def test_the_aiohttp_error_carries_the_reason(server: Receiver) -> None:
    """A caller using the session without `post` still gets the reason out of aiohttp."""
    policy = parse_egress([f"http://localhost:{server.port}/hook"])
    async with egress_session(policy, timeout=5) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await http.post(f"http://localhost:{server.port}/hook", data=BODY)
    refusal = egress_refusal(caught.value)
    assert refusal is not None
    assert "localhost resolves to 127.0.0.1, which is loopback" in str(refusal)
    assert str(refusal) in str(caught.value)
    assert server.received == []


# -- (c): IP literals and numeric hosts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1]:{port}/hook", "not under"),
        ("http://127.1:{port}/hook", "dotted-quad"),
        ("http://2130706433:{port}/hook", "dotted-quad"),
        ("http://0x7f.1:{port}/hook", "dotted-quad"),
        ("http://0177.0.0.1:{port}/hook", "dotted-quad"),
        ("http://127.0.0.1:{port}/hook", "not under"),
        ("http://169.254.169.254/latest/meta-data", "not under"),
    ],
)
async def test_ip_literals_are_refused(server: Receiver, url: str, why: str) -> None:
    policy = parse_egress([f"http://localhost:{server.port}/hook", "127.0.0.0/8"])
    assert why in await refused(policy, url.format(port=server.port))
    assert server.received == []


async def test_a_listed_metadata_prefix_is_still_refused_without_its_network() -> None:
    """An IP-literal prefix lists its address, but a policy built with no networks refuses it."""
    listed = parse_egress(["http://169.254.169.254/latest/"])
    policy = EgressPolicy(prefixes=listed.prefixes)
    assert "is link-local" in await refused(policy, "http://169.254.169.254/latest/meta-data")


@pytest.mark.parametrize(
    ("host", "refusal"),
    [
        ("127.1", None),  # aiohttp: "is not a canonical IPv4 address"
        ("2130706433", None),
        ("0177.0.0.1", None),
        ("0x7f000001", "0x7f000001 resolves to 127.0.0.1, which is loopback"),
        ("0x7f.1", "0x7f.1 resolves to 127.0.0.1, which is loopback"),
        ("127.0.0.1", "connecting to 127.0.0.1, which is loopback"),
        ("[::ffff:7f00:1]", "connecting to ::ffff:7f00:1, which maps to 127.0.0.1"),
        ("[::1]", "connecting to ::1, which is loopback"),
    ],
)
async def test_numeric_hosts_fail_even_without_check_url(
    server: Receiver, host: str, refusal: str | None
) -> None:
    """Second line: a caller skipping check_url and the session's middleware (middlewares=())
    still reaches nothing — aiohttp refuses non-canonical IPv4 forms, the forms it hands to
    getaddrinfo (0x7f.1) resolve to 127.0.0.1, which the resolver refuses, and the socket
    factory refuses connecting to an IP literal ([::ffff:7f00:1])."""
    policy = parse_egress([f"http://localhost:{server.port}/hook"])
    async with egress_session(policy, timeout=5) as http:
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.post(f"http://{host}:{server.port}/hook", data=BODY, middlewares=())
    found = egress_refusal(caught.value)
    assert (found is None) == (refusal is None)
    assert refusal is None or refusal in str(found)
    assert server.received == []


async def test_the_session_checks_every_request(server: Receiver) -> None:
    policy = parse_egress([f"http://localhost:{server.port}/hook", "127.0.0.0/8"])
    async with egress_session(policy, timeout=5) as http:
        with pytest.raises(EgressRefused, match="dotted-quad"):
            await http.post(f"http://127.1:{server.port}/hook", data=BODY)
        with pytest.raises(EgressRefused, match="not under"):
            await http.post(f"http://localhost:{server.port}/other", data=BODY)
    assert server.received == []


# -- (d): names from a real DNS server ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("loop", "resolves to 127.0.0.1, which is loopback"),
        ("meta", "resolves to 169.254.169.254, which is link-local"),
        ("mixed", "resolves to 10.1.2.3, which is private"),
        ("six", "resolves to ::1, which is loopback"),
    ],
)
async def test_names_resolving_inside_are_refused(
    server: Receiver, dns: DnsServer, name: str, why: str
) -> None:
    policy = parse_egress([f"http://*.egress.test:{server.port}/hook", "127.0.0.1/32"])
    url = f"http://{name}.egress.test:{server.port}/hook"
    if name == "loop":
        policy = EgressPolicy(prefixes=policy.prefixes)  # 127.0.0.1 not listed this time
    reason = await refused(policy, url, dns_server=f"127.0.0.1:{dns.port}", dns_timeout=2)
    assert why in reason
    assert server.received == []


async def test_a_listed_address_is_reached_with_the_right_host(
    server: Receiver, dns: DnsServer
) -> None:
    policy = parse_egress([f"http://*.egress.test:{server.port}/hook", "127.0.0.1/32"])
    url = f"http://loop.egress.test:{server.port}/hook"
    async with egress_session(policy, timeout=5, dns_server=f"127.0.0.1:{dns.port}") as http:
        # Connection: close, or the next request would reuse this (checked) connection.
        status, text = await post(http, policy, url, BODY, {"Connection": "close"})
        assert (status, text[:5]) == (200, "reçu ")
        assert server.received == [("POST", "/hook", f"loop.egress.test:{server.port}", BODY)]
        # DNS rebinding: the next connection resolves again, and the new answer is refused.
        dns.set("loop.egress.test", "A", ["169.254.169.254"])
        with pytest.raises(EgressRefused, match=r"169\.254\.169\.254, which is link-local"):
            await post(http, policy, url, BODY, HEADERS)
    assert len(server.received) == 1


async def test_unknown_and_silent_names_are_dns_errors_not_refusals(dns: DnsServer) -> None:
    dns.drop("silent.egress.test")
    policy = parse_egress(["http://*.egress.test/"])
    async with egress_session(
        policy, timeout=5, dns_server=f"127.0.0.1:{dns.port}", dns_timeout=0.3
    ) as http:
        for name in ("unknown", "silent"):
            with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
                await post(http, policy, f"http://{name}.egress.test/", BODY, HEADERS)
            assert egress_refusal(caught.value) is None


# -- (e) redirects, (f) proxies -------------------------------------------------------------------


async def test_a_redirect_is_not_followed(server: Receiver) -> None:
    policy = parse_egress([f"http://127.0.0.1:{server.port}/hook"])
    url = f"http://127.0.0.1:{server.port}/hook/redirect"
    async with egress_session(policy, timeout=5) as http:
        status, _ = await post(http, policy, url, BODY, HEADERS)
        assert status == 302
        # Even a caller that forgets allow_redirects=False cannot be led outside the policy.
        with pytest.raises(EgressRefused, match="not under"):
            await http.post(url, data=BODY)
    assert [r[1] for r in server.received] == ["/hook/redirect", "/hook/redirect"]


async def test_proxy_variables_are_ignored(
    server: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, runner = await serve(free_port())
    try:
        for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        policy = parse_egress([f"http://127.0.0.1:{server.port}/hook"])
        async with egress_session(policy, timeout=5) as http:
            status, _ = await post(http, policy, f"http://127.0.0.1:{server.port}/hook", BODY, {})
        assert status == 200
        assert len(server.received) == 1
        assert proxy.received == []
    finally:
        await runner.cleanup()
