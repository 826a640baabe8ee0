"""The mail-auth rig's DNS server, asked by a real resolver (dnspython) over UDP and TCP."""

from __future__ import annotations

from collections.abc import Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from bridge.harness.dns import DnsServer

LONG = "v=DKIM1; k=rsa; p=" + "A" * 600  # longer than one 255-byte character-string


@pytest.fixture
def server() -> Iterator[DnsServer]:
    dns_server = DnsServer({"sel._domainkey.example.test": {"TXT": [LONG]}})
    dns_server.start()
    try:
        yield dns_server
    finally:
        dns_server.stop()


def resolver(server: DnsServer) -> dns.resolver.Resolver:
    found = dns.resolver.Resolver(configure=False)
    found.nameservers = [server.address]
    found.port = server.port
    found.lifetime = 1
    found.cache = None
    return found


def txt(server: DnsServer, name: str, tcp: bool = False) -> list[str]:
    answer = resolver(server).resolve(name, "TXT", tcp=tcp)
    return [b"".join(rdata.strings).decode() for rdata in answer]


def test_answers_txt_over_udp_and_tcp(server: DnsServer) -> None:
    assert server.address.startswith("127.53.")
    assert txt(server, "sel._domainkey.example.test") == [LONG]
    assert txt(server, "SEL._domainkey.Example.Test.", tcp=True) == [LONG]


def test_unknown_names_and_types(server: DnsServer) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        txt(server, "nothing.example.test")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(server).resolve("sel._domainkey.example.test", "A")
    # Negative answers carry an SOA with minimum 0, so caches keep nothing.
    query = dns.message.make_query("nothing.example.test", "TXT")
    reply = dns.query.udp(query, server.address, timeout=1)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.authority[0].ttl == 0
    assert reply.authority[0][0].minimum == 0


def test_records_change_at_run_time(server: DnsServer) -> None:
    server.set_txt("_dmarc.example.test", "v=DMARC1; p=none")
    assert txt(server, "_dmarc.example.test") == ["v=DMARC1; p=none"]
    server.set_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    assert txt(server, "_dmarc.example.test") == ["v=DMARC1; p=reject"]
    server.remove("_dmarc.example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        txt(server, "_dmarc.example.test")


def test_dropped_names_time_out(server: DnsServer) -> None:
    server.drop("sel._domainkey.example.test")
    with pytest.raises(dns.exception.Timeout):
        txt(server, "sel._domainkey.example.test")
    with pytest.raises(dns.exception.Timeout):
        txt(server, "sel._domainkey.example.test", tcp=True)
    assert ("sel._domainkey.example.test", "TXT", False) in server.queries
    server.undrop("sel._domainkey.example.test")
    assert txt(server, "sel._domainkey.example.test") == [LONG]


def test_two_servers_run_at_once(server: DnsServer) -> None:
    other = DnsServer({"x.test": {"TXT": ["other"]}})
    other.start()
    try:
        assert other.address != server.address
        assert txt(other, "x.test") == ["other"]
        assert server.resolv_conf().startswith(f"nameserver {server.address}\n")
    finally:
        other.stop()
