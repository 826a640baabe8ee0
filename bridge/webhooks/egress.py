"""Where outbound webhooks may POST: the `webhooks.egress` allow-list, enforced (no SSRF).

A room user can name the URL a room's messages are posted to, so the bridge must never be made to
reach an internal service. Three checks, each covering what the one before cannot:

* `check_url` runs before any connection. The URL must be absolute http(s), without userinfo or
  fragment, and match one listed prefix (scheme, host, effective port, path at a "/" boundary).
  An IP-literal host is checked with `check_address` here, because aiohttp does not call the
  resolver for IP literals. Legacy numeric hosts that getaddrinfo would map onto an address
  ("127.1", "2130706433", "0x7f.1", "0177.0.0.1") are refused outright.
* `EgressResolver` checks every address DNS returns for a name, after resolution and on every
  connection (the session does not cache DNS): aiohttp connects only to the addresses the
  resolver returned, so a name that resolves to a private address — at once or after a DNS
  rebinding — is refused. One refused address refuses the whole answer. A kept-alive
  connection is reused only towards the address already checked.
* The session's socket factory checks the address of every socket it connects, IP literals
  included, for a caller that skipped `check_url`.

Addresses that are not globally routable (loopback, private, link-local incl. the cloud metadata
address 169.254.169.254, CGNAT, multicast, reserved, documentation and benchmarking ranges, and
IPv6 forms embedding such an IPv4 address) are refused unless inside a listed network.

Redirects must never be followed: a 3xx answer is a failure of the delivery, reported with its
status. Always pass ``allow_redirects=False`` (as `post` does); as a second line of defence the
session from `egress_session` also runs `check_url` on every request it sends, redirects
included. The session ignores HTTP(S)_PROXY and friends (``trust_env=False``) and keeps no cookies.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048
MAX_RESPONSE_CHARS = 1000
DEFAULT_PORTS = {"http": 80, "https": 443}

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG URL: a host whose last label is a number is an IPv4 address in some legacy form.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
# Encoded ".", "/", "\", NUL and "%" (double encoding): a server may decode them into a path
# escaping the prefix.
_ENCODED_TRICK = re.compile(r"%(?:2e|2f|5c|00|25)", re.IGNORECASE)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class EgressRefused(Exception):
    """The bridge will not send there; the text says why for a human (never a secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class EgressNetworkRefused(EgressRefused, OSError):
    """A refusal raised inside aiohttp's connector (by `EgressResolver` or the session's socket
    factory): an OSError, as aiohttp expects of a resolver or a connection attempt.

    aiohttp wraps it in ``aiohttp.ClientConnectorDNSError`` (its ``os_error``); `egress_refusal`
    digs it out again and `post` re-raises it as is.
    """

    def __init__(self, reason: str) -> None:
        OSError.__init__(self, errno.EACCES, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class EgressPrefix:
    """One allowed URL prefix; ``host`` is the parent domain if ``wildcard`` (subdomains only)."""

    scheme: str
    host: str
    port: int
    path: str
    wildcard: bool = False

    def __str__(self) -> str:
        host = f"*.{self.host}" if self.wildcard else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.wildcard:
            if not host.endswith("." + self.host):
                return False
        elif host != self.host:
            return False
        return _path_under(path, self.path)


@dataclass(frozen=True)
class EgressPolicy:
    """Where outbound webhooks may go: URL prefixes, and non-global networks explicitly allowed."""

    prefixes: tuple[EgressPrefix, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @property
    def allows_nothing(self) -> bool:
        return not self.prefixes


# -- configuration --------------------------------------------------------------------------------


def parse_egress(entries: object) -> EgressPolicy:
    """The policy for the config value `webhooks.egress` (None or [] allows nothing).

    Each entry is a URL prefix ("https://host[:port][/path]") or a network ("10.20.0.0/16",
    "fd00::/8", a bare address). ValueError("entry N: why") names the first bad entry, counting
    from 1, without repeating it (it could hold a password).
    """
    if entries is None:
        return EgressPolicy()
    if not isinstance(entries, list | tuple):
        raise ValueError("must be a list of URL prefixes and networks")
    prefixes: list[EgressPrefix] = []
    networks: list[IPNetwork] = []
    for number, entry in enumerate(entries, start=1):
        try:
            if not isinstance(entry, str):
                raise ValueError("must be a string (a URL prefix or a network)")
            if "://" in entry:
                prefix = _parse_prefix(entry.strip())
                prefixes.append(prefix)
                address = _ip_literal(prefix.host)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped  # checked as the IPv4 address it is
                if address is not None:
                    networks.append(ipaddress.ip_network(address))
            else:
                networks.append(_parse_network(entry.strip()))
        except ValueError as e:
            raise ValueError(f"entry {number}: {e}") from None
    return EgressPolicy(tuple(dict.fromkeys(prefixes)), tuple(dict.fromkeys(networks)))


def _parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            "must be a URL prefix (https://host/path) or a network (10.20.0.0/16, fd00::/8)"
        ) from None
    raise ValueError("network has host bits set (write e.g. 10.20.0.0/16, not 10.20.1.0/16)")


def _parse_prefix(text: str) -> EgressPrefix:
    _refuse_odd_characters(text)
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("the scheme must be http or https")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise ValueError("a URL prefix may not hold a user name or password")
    if "?" in rest:
        raise ValueError("a URL prefix may not have a query (?…)")
    if "#" in rest:
        raise ValueError("a URL prefix may not have a fragment (#…)")
    _refuse_encoded_tricks(rest[len(authority) :])
    wildcard = authority.startswith("*.")
    if wildcard:
        rest = rest[2:]
    if "*" in rest.split("/", 1)[0]:
        raise ValueError('a wildcard is only allowed as the whole first label ("*.example.org")')
    try:
        url = yarl.URL(f"{scheme}://{rest}")
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    host = _normal_host(url)
    if wildcard and _ip_literal(host) is not None:
        raise ValueError("a wildcard cannot apply to an IP address")
    if wildcard and "." not in host:
        raise ValueError('a wildcard needs a domain with at least two labels ("*.example.org")')
    port = url.port
    if port is None or not 0 < port < 65536:
        raise ValueError("the port must be between 1 and 65535")
    return EgressPrefix(url.scheme, host, port, url.raw_path or "/", wildcard)


# -- checking -------------------------------------------------------------------------------------


def check_url(policy: EgressPolicy, url: str) -> yarl.URL:
    """The URL, normalised, if the policy lets webhooks POST there; EgressRefused otherwise.

    Post to the returned URL (its host is lowercase IDNA without trailing dot), not to ``url``.
    """
    if len(url) > MAX_URL_LENGTH:
        raise EgressRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        _refuse_odd_characters(url)
    except ValueError as e:
        raise EgressRefused(f"the URL {e}") from None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in DEFAULT_PORTS:
        raise EgressRefused("only absolute http:// and https:// URLs are allowed")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise EgressRefused("the URL may not hold a user name or password")
    if "#" in rest:
        raise EgressRefused("the URL may not have a fragment (#…)")
    try:
        _refuse_encoded_tricks(rest[len(authority) :].partition("?")[0])
        parsed = yarl.URL(url)
        host = _normal_host(parsed)
    except ValueError as e:
        raise EgressRefused(f"the URL is not valid: {e}") from None
    port = parsed.port
    if port is None or not 0 < port < 65536:
        raise EgressRefused("the URL's port must be between 1 and 65535")
    path = parsed.raw_path or "/"
    if not any(p.matches(parsed.scheme, host, port, path) for p in policy.prefixes):
        shown = f"[{host}]" if ":" in host else host
        raise EgressRefused(
            f"{parsed.scheme}://{shown}:{port}{path} is not under any URL prefix "
            "listed in webhooks.egress"
        )
    address = _ip_literal(host)
    if address is not None:
        check_address(policy, address)
    if host != parsed.raw_host:
        parsed = parsed.with_host(host)
    return parsed


def check_address(policy: EgressPolicy, address: str | IPAddress) -> None:
    """Refuse (EgressRefused) an address that is neither global nor in a listed network.

    An IPv6 address embedding an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d,
    NAT64 64:ff9b::/96, 6to4 2002::/16) is judged by that IPv4 address too.
    """
    ip = _address(address)
    problem = _refusal(policy, ip)
    if problem is not None:
        raise EgressRefused(f"address {ip} {problem}{_UNLISTED}")


_UNLISTED = ", and is in no network listed in webhooks.egress"


def _address(address: str | IPAddress) -> IPAddress:
    if not isinstance(address, str):
        return address
    try:
        return ipaddress.ip_address(address.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        raise EgressRefused(f"{address!r} is not an IP address") from None


def _refusal(policy: EgressPolicy, ip: IPAddress) -> str | None:
    """Why ``ip`` may not be reached, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "has a scope (zone) and is link-local"
        if ip.ipv4_mapped is not None:  # it *is* that IPv4 address
            inner = _refusal(policy, ip.ipv4_mapped)
            return None if inner is None else f"maps to {ip.ipv4_mapped}, which {inner}"
    if _listed(policy, ip):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            if ip.is_loopback or ip.is_unspecified:
                return _kind(ip)
            inner = _refusal(policy, embedded)
            return None if inner is None else f"embeds {embedded}, which {inner}"
    return _kind(ip)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` not globally reachable, or None if it is."""
    checks = [
        (ip.is_unspecified, "is unspecified"),
        (ip.is_loopback, "is loopback"),
        (ip == ipaddress.IPv4Address("255.255.255.255"), "is broadcast"),
        (ip.is_link_local, "is link-local"),
        (ip.is_multicast, "is multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "is shared (CGNAT) space"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "is site-local"),
        (ip.is_private, "is private or special-purpose"),
        (ip.is_reserved, "is reserved"),
        (not ip.is_global, "is not globally routable"),
    ]
    return next((reason for refused, reason in checks if refused), None)


def _listed(policy: EgressPolicy, ip: IPAddress) -> bool:
    return any(ip.version == network.version and ip in network for network in policy.networks)


def _path_under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _refuse_odd_characters(text: str) -> None:
    for char in text:
        if char == "\\":
            raise ValueError("contains a backslash")
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Zs"):
            raise ValueError("contains whitespace or a control character")


def _refuse_encoded_tricks(path: str) -> None:
    if _ENCODED_TRICK.search(path):
        raise ValueError(
            'the path holds an encoded ".", "/", "\\", NUL or "%" (%2e, %2f, %5c, %00, %25)'
        )


def _normal_host(url: yarl.URL) -> str:
    """The URL's host, lowercase IDNA without trailing dot; ValueError if it is not one we use."""
    if url.scheme not in DEFAULT_PORTS:
        raise ValueError("only absolute http:// and https:// URLs are allowed")
    if not url.raw_host:
        raise ValueError("the host is empty")
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError("no user name or password is allowed")
    host = (url.raw_host or "").lower()
    if not host:
        raise ValueError("the host is empty")
    if ":" in host:
        if "%" in host:
            raise ValueError("an IPv6 zone (%…) is not allowed")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError("the IPv6 address is not valid") from None
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(
                "the host is a number but not a dotted-quad IPv4 address (a.b.c.d)"
            ) from None
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("the host is not a valid DNS name")
    return host


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- resolution -----------------------------------------------------------------------------------


class EgressResolver(AbstractResolver):
    """Resolves with ``inner`` and refuses the whole answer if any address is refused."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            try:
                ip = _address(result["host"])
            except EgressRefused as e:
                raise EgressNetworkRefused(f"{host} resolves to {e.reason}") from None
            problem = _refusal(self.policy, ip)
            if problem is not None:
                reason = f"{host} resolves to {ip}, which {problem}{_UNLISTED}"
                raise EgressNetworkRefused(reason)
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return results

    async def close(self) -> None:
        await self.inner.close()


class DnsServerResolver(AbstractResolver):
    """Asks one DNS server (dnspython) for A and AAAA records, with a timeout; no search list."""

    def __init__(self, address: str, port: int = 53, timeout: float = 5.0) -> None:
        self.resolver = dns.asyncresolver.Resolver(configure=False)
        self.resolver.nameservers = [address]
        self.resolver.port = port
        self.resolver.timeout = timeout
        self.resolver.lifetime = timeout

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            name = dns.name.from_text(host)
        except dns.exception.DNSException:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not a valid name") from None
        kinds = [
            (rtype, fam)
            for rtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6))
            if family in (socket.AF_UNSPEC, fam)
        ]
        answers = await asyncio.gather(*(self._addresses(name, rtype) for rtype, _ in kinds))
        results = [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=fam,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for (_, fam), addresses in zip(kinds, answers, strict=True)
            for address in addresses
        ]
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return results

    async def _addresses(self, name: dns.name.Name, rtype: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(name, rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout:
            raise socket.gaierror(socket.EAI_AGAIN, f"DNS timeout resolving {name}") from None
        except dns.exception.DNSException as e:
            raise socket.gaierror(socket.EAI_FAIL, f"DNS error resolving {name}: {e}") from None
        if answer.rrset is None:
            return []
        return [str(rdata.address) for rdata in answer.rrset]

    async def close(self) -> None:
        return None


def egress_resolver(
    policy: EgressPolicy,
    dns_server: str | tuple[str, int] | None = None,
    dns_timeout: float = 5.0,
) -> EgressResolver:
    """The checking resolver over the system's resolver, or over ``dns_server`` ("IP[:port]"
    or an already parsed (IP, port))."""
    # Imported here: bridge.config imports this module to validate webhooks.egress.
    from bridge.config.mail import parse_dns_server

    inner: AbstractResolver
    if dns_server is None:
        inner = aiohttp.ThreadedResolver()
    else:
        if isinstance(dns_server, str):
            parsed = parse_dns_server("webhooks.egress_dns_server", dns_server)
            assert parsed is not None
            dns_server = parsed
        inner = DnsServerResolver(dns_server[0], dns_server[1], dns_timeout)
    return EgressResolver(policy, inner)


async def check_destination(policy: EgressPolicy, url: str, resolver: EgressResolver) -> yarl.URL:
    """check_url, then the addresses the host resolves to now (EgressRefused; OSError when it
    does not resolve): for telling whoever names a URL at once. Every connection is checked
    again anyway."""
    target = check_url(policy, url)
    host = target.host or ""
    if _ip_literal(host) is None:
        try:
            await resolver.resolve(host, target.port or 0, socket.AF_UNSPEC)
        except EgressNetworkRefused as e:
            raise EgressRefused(e.reason) from None
    return target


def egress_session(
    policy: EgressPolicy,
    *,
    timeout: float,
    dns_server: str | tuple[str, int] | None = None,
    dns_timeout: float = 5.0,
) -> aiohttp.ClientSession:
    """A client session that can only reach what ``policy`` allows (call inside the event loop).

    ``dns_server`` is "IP[:port]" (e.g. "10.0.0.53", "[::1]:5353", ConfigError otherwise) or an
    already parsed (IP, port); None uses the system's resolver. Requests must still go through
    `check_url` (or `post`) with allow_redirects=False.
    """
    connector = aiohttp.TCPConnector(
        resolver=egress_resolver(policy, dns_server, dns_timeout),
        use_dns_cache=False,  # every connection re-resolves, so every answer is checked
        socket_factory=_checking_socket_factory(policy),
    )

    async def check_every_request(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        check_url(policy, str(request.url))
        return await handler(request)

    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=(check_every_request,),
    )


def _checking_socket_factory(policy: EgressPolicy) -> Callable[[tuple[Any, ...]], socket.socket]:
    """Last line: check the very address each socket connects to, IP literals included (aiohttp
    does not call the resolver for those, and a caller could skip check_url)."""

    def new_socket(addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto, _, address = addr_info
        host = str(address[0])
        try:
            ip = _address(host)
        except EgressRefused as e:
            raise EgressNetworkRefused(e.reason) from None
        problem = _refusal(policy, ip)
        if problem is not None:
            raise EgressNetworkRefused(f"connecting to {ip}, which {problem}{_UNLISTED}")
        return socket.socket(family=family, type=kind, proto=proto)

    return new_socket


def egress_refusal(error: BaseException) -> EgressRefused | None:
    """The egress refusal behind an aiohttp error (its os_error or cause chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, EgressRefused):
            return current
        seen.add(id(current))
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, EgressRefused):
            return os_error
        current = current.__cause__ or current.__context__
    return None


async def post(
    session: aiohttp.ClientSession,
    policy: EgressPolicy,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
) -> tuple[int, str]:
    """POST ``body`` if the policy allows ``url``: (status, at most 1000 characters of the answer).

    Redirects are not followed (a 3xx is returned as is). EgressRefused for a refusal, before or
    after DNS; aiohttp errors and timeouts propagate.
    """
    target = check_url(policy, url)
    try:
        async with session.post(
            target, data=body, headers=dict(headers), allow_redirects=False
        ) as response:
            data = b""
            while len(data) < 4 * MAX_RESPONSE_CHARS:
                chunk = await response.content.read(4 * MAX_RESPONSE_CHARS - len(data))
                if not chunk:
                    break
                data += chunk
            try:
                text = data.decode(response.charset or "utf-8", errors="replace")
            except LookupError:  # a charset Python does not know
                text = data.decode("utf-8", errors="replace")
            return response.status, text[:MAX_RESPONSE_CHARS]
    except aiohttp.ClientError as e:
        refusal = egress_refusal(e)
        if refusal is None:
            raise
        raise EgressRefused(refusal.reason) from e
