"""Outbound webhook egress policy: parsing `webhooks.egress`, URL and address checks (no SSRF)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.webhooks.egress import (
    EgressNetworkRefused,
    EgressPolicy,
    EgressPrefix,
    EgressRefused,
    check_address,
    check_url,
    egress_refusal,
    parse_egress,
)

POLICY = parse_egress(
    [
        "https://hooks.example.com/api",
        "https://*.example.org/in/",
        "http://plain.example.net:8080",
        "https://[2001:db8::5]/v6",
        "10.20.0.0/16",
    ]
)


def refused(url: str, policy: EgressPolicy = POLICY) -> str:
    with pytest.raises(EgressRefused) as caught:
        check_url(policy, url)
    return str(caught.value)


# -- parse_egress ---------------------------------------------------------------------------------


def test_nothing_configured_allows_nothing() -> None:
    for value in (None, []):
        policy = parse_egress(value)
        assert policy.allows_nothing
        assert "not under any URL prefix" in refused("https://example.com/", policy)


def test_good_entries() -> None:
    policy = parse_egress(
        [
            "https://Hooks.EXAMPLE.com./api/",
            "http://*.Example.org",
            "https://192.0.2.10:8443/x",
            "http://[FD00::1]/",
            " 10.20.0.0/16 ",
            "fd00:1::/32",
            "192.0.2.99",
            "2001:db8::7",
            "https://héllo.example/",
        ]
    )
    assert policy.prefixes == (
        EgressPrefix("https", "hooks.example.com", 443, "/api/"),
        EgressPrefix("http", "example.org", 80, "/", wildcard=True),
        EgressPrefix("https", "192.0.2.10", 8443, "/x"),
        EgressPrefix("http", "fd00::1", 80, "/"),
        EgressPrefix("https", "xn--hllo-bpa.example", 443, "/"),
    )
    assert policy.networks == tuple(
        ipaddress.ip_network(n)
        for n in (
            "192.0.2.10/32",
            "fd00::1/128",
            "10.20.0.0/16",
            "fd00:1::/32",
            "192.0.2.99/32",
            "2001:db8::7/128",
        )
    )
    assert str(policy.prefixes[1]) == "http://*.example.org:80/"


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("ftp://example.com/", "scheme"),
        ("https://user:hunter2@example.com/", "user name or password"),
        ("https://example.com/api?x=1", "query"),
        ("https://example.com/api#top", "fragment"),
        ("https:///api", "host is empty"),
        ("https://a.*.example.com/", "wildcard"),
        ("https://*example.com/", "wildcard"),
        ("https://**.example.com/", "wildcard"),
        ("https://*.com.*/", "wildcard"),
        ("https://*/", "wildcard"),
        ("https://*.192.0.2.1/", "wildcard cannot apply"),
        ("https://127.1/", "dotted-quad"),
        ("https://example.com:0/", "port"),
        ("https://example.com/a%2fb", "encoded"),
        ("https://exa mple.com/", "whitespace"),
        ("https://example.com\\@evil/", "backslash"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("10.20.1.0/16", "host bits"),
        ("10.20.0.0/33", "URL prefix"),
        ("example.com", "URL prefix"),
        ("", "URL prefix"),
        ("https://exa$mple.com/", "DNS name"),
    ],
)
def test_bad_entries(entry: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"^entry 2: .*{why}") as caught:
        parse_egress(["https://fine.example/", entry])
    assert "hunter2" not in str(caught.value)


def test_the_value_must_be_a_list_of_strings() -> None:
    with pytest.raises(ValueError, match="list"):
        parse_egress("https://example.com/")
    with pytest.raises(ValueError, match="entry 1: must be a string"):
        parse_egress([42])


# -- check_url ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://hooks.example.com/api", "https://hooks.example.com/api"),
        ("https://hooks.example.com/api/", "https://hooks.example.com/api/"),
        (
            "https://hooks.example.com/api/x/y?a=1&b=%2F",
            "https://hooks.example.com/api/x/y?a=1&b=/",
        ),
        ("https://HOOKS.Example.COM./api", "https://hooks.example.com/api"),
        ("https://hooks.example.com:443/api", "https://hooks.example.com/api"),
        ("https://hooks.example.com/api/a/../b", "https://hooks.example.com/api/b"),
        ("https://a.example.org/in/", "https://a.example.org/in/"),
        ("https://b.a.example.org/in/x", "https://b.a.example.org/in/x"),
        ("https://DÉJÀ.example.org/in/x", "https://xn--dj-kia8a.example.org/in/x"),
        ("http://plain.example.net:8080/anything", "http://plain.example.net:8080/anything"),
        ("https://[2001:DB8::5]/v6/x", "https://[2001:db8::5]/v6/x"),
    ],
)
def test_allowed_urls(url: str, normalised: str) -> None:
    assert str(check_url(POLICY, url)) == normalised


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/api", "http"),
        ("file:///etc/passwd", "http"),
        ("hooks.example.com/api", "http"),
        ("//hooks.example.com/api", "http"),
        ("http://hooks.example.com/api", "not under"),  # scheme differs
        ("https://good@hooks.example.com/api", "user name"),
        ("https://:@hooks.example.com/api", "user name"),
        ("http://evil.org#@hooks.example.com/api", "fragment"),
        ("https://hooks.example.com/api#x", "fragment"),
        ("https://hooks.example.com\\@evil.org/api", "backslash"),
        ("https://hooks.example.com/api\\..\\admin", "backslash"),
        ("https://hooks.example.com/api/%2e%2e/admin", "encoded"),
        ("https://hooks.example.com/api/%2E%2E/admin", "encoded"),
        ("https://hooks.example.com/api%2f..%2fadmin", "encoded"),
        ("https://hooks.example.com/api/..%2Fadmin", "encoded"),
        ("https://hooks.example.com/api/%252e%252e/admin", "encoded"),
        ("https://hooks.example.com/api/%5c..%5cadmin", "encoded"),
        ("https://hooks.example.com/api/../admin", "not under"),
        ("https://hooks.example.com/apix", "not under"),
        ("https://hooks.example.com/ap", "not under"),
        ("https://hooks.example.com/", "not under"),
        ("https://hooks.example.com:8443/api", "not under"),
        ("https://a.example.org/in", "not under"),  # prefix "/in/" wants the slash
        ("https://example.org/in/", "not under"),  # "*." is for subdomains only
        ("https://evilexample.org/in/", "not under"),
        ("https://example.org.evil.com/in/", "not under"),
        ("http://plain.example.net/anything", "not under"),  # port 80, not 8080
        ("https://hooks.example.com/api\n", "control"),
        ("https://hooks.example.com/api x", "whitespace"),
        ("https://hooks.example.com/api\u200b", "control"),
        ("https://hooks.example.com/" + "a" * 2048, "longer than 2048"),
        ("http://127.1/", "dotted-quad"),
        ("http://2130706433/", "dotted-quad"),
        ("http://0x7f.1/", "dotted-quad"),
        ("http://0177.0.0.1/", "dotted-quad"),
        ("http://0x7f000001/", "dotted-quad"),
        ("http://127.0.0.1/", "not under"),
        ("http://[::1]/", "not under"),
        ("http://[fe80::1%25eth0]/", "zone"),
        ("https://hooks.example.com:99999/api", "not valid"),
    ],
)
def test_refused_urls(url: str, why: str) -> None:
    assert why in refused(url)


def test_an_ip_literal_prefix_lists_its_address_and_nothing_else() -> None:
    policy = parse_egress(["http://127.0.0.1:8080/", "http://[::1]:8080/"])
    assert str(check_url(policy, "http://127.0.0.1:8080/x")) == "http://127.0.0.1:8080/x"
    assert str(check_url(policy, "http://[::1]:8080/")) == "http://[::1]:8080/"
    assert "not under" in refused("http://[::ffff:127.0.0.1]:8080/", policy)
    assert "not under" in refused("http://127.0.0.2:8080/", policy)
    assert "not under" in refused("http://localhost:8080/", policy)


def test_an_ipv4_mapped_prefix_lists_its_ipv4_address() -> None:
    policy = parse_egress(["http://[::ffff:127.0.0.1]:8080/"])
    assert policy.networks == (ipaddress.ip_network("127.0.0.1/32"),)
    assert check_url(policy, "http://[::ffff:7f00:1]:8080/").host == "::ffff:7f00:1"


def test_an_ip_literal_url_is_checked_as_an_address() -> None:
    """A prefix may name a private IP literal only if its network is listed; with an explicit
    list of networks this cannot be bypassed by the prefix alone."""
    policy = EgressPolicy(prefixes=parse_egress(["http://10.0.0.1/"]).prefixes)
    assert "is private" in refused("http://10.0.0.1/", policy)
    policy = parse_egress(["http://169.254.169.254/latest/"])
    assert str(check_url(policy, "http://169.254.169.254/latest/meta-data"))


# -- check_address --------------------------------------------------------------------------------

HOSTILE = [
    "127.0.0.1",
    "127.255.255.254",
    "[::1]",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::",
    "2002:a9fe:a9fe::1",
    "169.254.169.254",
    "fe80::1",
    "fe80::1%eth0",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "fd00::1",
    "fc00::1",
    "100.64.0.1",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "255.255.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "198.18.0.1",
    "240.0.0.1",
    "2001:db8::1",
    "fec0::1",
    "64:ff9b:1::1",
    "2001::1",
]


@pytest.mark.parametrize("address", HOSTILE)
def test_hostile_addresses_are_refused(address: str) -> None:
    with pytest.raises(EgressRefused, match="no network listed"):
        check_address(EgressPolicy(), address)
    if "%" not in address:
        with pytest.raises(EgressRefused):
            check_address(EgressPolicy(), ipaddress.ip_address(address.strip("[]")))


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_global_addresses_are_allowed(address: str) -> None:
    check_address(EgressPolicy(), address)


def test_listed_networks_are_allowed() -> None:
    policy = parse_egress(["127.0.0.0/8", "10.20.0.0/16", "fd00::/8", "169.254.169.254"])
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "10.20.3.4", "fd12::1", "169.254.169.254"):
        check_address(policy, address)
    for address in ("10.21.0.1", "::1", "169.254.169.253", "fe80::1", "192.168.0.1"):
        with pytest.raises(EgressRefused):
            check_address(policy, address)


def test_an_embedded_address_is_judged_by_its_ipv4() -> None:
    with pytest.raises(EgressRefused, match=r"embeds 127\.0\.0\.1, which is loopback"):
        check_address(EgressPolicy(), "64:ff9b::7f00:1")
    check_address(parse_egress(["127.0.0.1"]), "64:ff9b::7f00:1")


def test_not_an_address() -> None:
    with pytest.raises(EgressRefused, match="not an IP address"):
        check_address(EgressPolicy(), "localhost")


_PRIVATE_V4 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16")]


@given(st.sampled_from(_PRIVATE_V4), st.integers(0, 2**24 - 1), st.sampled_from(range(4)))
def test_every_form_of_a_private_ipv4_is_refused(
    network: ipaddress.IPv4Network, offset: int, form: int
) -> None:
    """Whichever IPv6 wrapping hides it, an address of a private network is refused."""
    v4 = network.network_address + (offset % network.num_addresses)
    wrapped = [
        v4,
        ipaddress.IPv6Address(0xFFFF_0000_0000 | int(v4)),  # IPv4-mapped
        ipaddress.IPv6Address((0x64FF9B << 96) | int(v4)),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1),  # 6to4
    ][form]
    with pytest.raises(EgressRefused):
        check_address(EgressPolicy(), wrapped)
    check_address(EgressPolicy(networks=(network,)), wrapped)


@given(st.text(min_size=1, max_size=40))
def test_a_path_never_escapes_its_prefix(suffix: str) -> None:
    """Whatever follows, an allowed URL stays under "/api" on the listed host."""
    try:
        url = check_url(POLICY, "https://hooks.example.com/api" + suffix)
    except EgressRefused:
        return
    assert url.host == "hooks.example.com"
    assert url.port == 443
    assert url.raw_path == "/api" or url.raw_path.startswith("/api/")


def test_a_resolution_refusal_is_an_oserror_and_found_in_a_chain() -> None:
    refusal = EgressNetworkRefused("x resolves to 10.0.0.1, which is private")
    assert isinstance(refusal, OSError)
    assert str(refusal) == "x resolves to 10.0.0.1, which is private"
    outer = RuntimeError("wrapped")
    outer.__cause__ = refusal
    assert egress_refusal(outer) is refusal
    assert egress_refusal(RuntimeError("other")) is None
