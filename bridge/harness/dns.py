"""A tiny authoritative DNS server on a loopback address of its own, for the mail-auth rig."""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import AAAA, QTYPE, RCODE, RR, SOA, TXT, A, DNSHeader, DNSRecord

log = logging.getLogger("passerelle.harness.dns")

_TTL = 0  # nothing may be cached: tests change records and drop names at run time


def _name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _chunks(value: str) -> list[bytes]:
    """A TXT value as character-strings of at most 255 bytes (a DKIM key is longer)."""
    data = value.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


@dataclass
class DnsServer:
    """Answers A, AAAA and TXT queries from ``records`` (name → type → values), UDP and TCP.

    The system resolver (libresolv, used by opendmarc and libspf2) only talks to port 53, so
    the server binds port 53 on an address of the 127/8 loopback network picked at random
    (``address``), which lets several rigs run at once; root may bind it. Names in ``dropped``
    get no answer at all (a resolver times out), unknown names NXDOMAIN, known names without
    the asked type an empty NOERROR. Every answer has TTL 0 and negative answers an SOA with
    minimum 0, so that caching resolvers (libunbound in opendkim) see changes at once.
    ``queries`` records (name, type, answered) for every query received.
    """

    records: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    address: str = ""
    port: int = 53
    dropped: set[str] = field(default_factory=set)
    queries: list[tuple[str, str, bool]] = field(default_factory=list, init=False)
    _servers: list[socketserver.BaseServer] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.records = {
            _name(n): {t.upper(): list(v) for t, v in types.items()}
            for n, types in self.records.items()
        }
        self.dropped = {_name(n) for n in self.dropped}

    # -- records ----------------------------------------------------------------------------------

    def set(self, name: str, rtype: str, values: Iterable[str]) -> None:
        """Replace the ``rtype`` records of ``name`` (an empty ``values`` removes them)."""
        with self._lock:
            types = self.records.setdefault(_name(name), {})
            types[rtype.upper()] = list(values)
            if not types[rtype.upper()]:
                del types[rtype.upper()]
            if not types:
                del self.records[_name(name)]

    def set_txt(self, name: str, *values: str) -> None:
        """Replace the TXT records of ``name``."""
        self.set(name, "TXT", values)

    def remove(self, name: str) -> None:
        """Forget ``name`` (then it is NXDOMAIN)."""
        with self._lock:
            self.records.pop(_name(name), None)

    def drop(self, name: str) -> None:
        """Never answer queries for ``name``: the resolver asking will time out."""
        with self._lock:
            self.dropped.add(_name(name))

    def undrop(self, name: str) -> None:
        """Answer queries for ``name`` again."""
        with self._lock:
            self.dropped.discard(_name(name))

    def resolv_conf(self) -> str:
        """A resolv.conf pointing at this server only, failing fast when it does not answer."""
        return f"nameserver {self.address}\noptions timeout:1 attempts:1\n"

    # -- answering --------------------------------------------------------------------------------

    def answer(self, data: bytes) -> bytes | None:
        """The reply to one query packet, or None when it must go unanswered."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on garbage
            return None
        qname = _name(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            dropped = qname in self.dropped
            types = dict(self.records.get(qname, {}))
            self.queries.append((qname, str(qtype), not dropped))
        if dropped:
            return None
        reply = DNSRecord(
            DNSHeader(id=request.header.id, qr=1, aa=1, ra=0, rd=request.header.rd), q=request.q
        )
        values = types.get(str(qtype), [])
        for value in values:
            kind = {"TXT": lambda v: TXT(_chunks(v)), "AAAA": AAAA}.get(str(qtype), A)
            rdata = kind(value)
            reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=_TTL))
        if not values:
            if not types:
                reply.header.rcode = RCODE.NXDOMAIN
            zone = qname.rpartition(".")[2] + "."
            soa = SOA("ns." + zone, "hostmaster." + zone, (1, 60, 60, 60, 0))
            reply.add_auth(RR(zone, QTYPE.SOA, rdata=soa, ttl=_TTL))
        packed: bytes = reply.pack()
        return packed

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, attempts: int = 20) -> None:
        """Bind UDP and TCP port ``port`` on ``address`` (a free random 127.53.x.y if empty)."""
        if self._servers:
            return
        for _ in range(attempts):
            address = self.address or f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
            try:
                self._bind(address)
            except OSError as e:
                self._close()
                if self.address or e.errno != errno.EADDRINUSE:
                    raise
                continue
            self.address = address
            log.debug("DNS server on %s:%d", address, self.port)
            return
        raise RuntimeError(f"no free loopback address for port {self.port}")

    def _bind(self, address: str) -> None:
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                with contextlib.suppress(OSError, struct.error):
                    while True:
                        header = _recv_exact(sock, 2)
                        if header is None:
                            return
                        data = _recv_exact(sock, struct.unpack("!H", header)[0])
                        reply = owner.answer(data or b"")
                        if reply is None:
                            # A dropped name: say nothing until the client gives up.
                            sock.settimeout(30)
                            while sock.recv(4096):
                                pass
                            return
                        sock.sendall(struct.pack("!H", len(reply)) + reply)

        udp = socketserver.ThreadingUDPServer((address, self.port), Udp)
        self._servers.append(udp)
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        tcp = socketserver.ThreadingTCPServer((address, self.port), Tcp)
        self._servers.append(tcp)
        for server in (udp, tcp):
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()

    def _close(self) -> None:
        for server in self._servers:
            with contextlib.suppress(OSError):
                server.server_close()
        self._servers.clear()

    def stop(self) -> None:
        """Stop answering and close the sockets."""
        for server in self._servers:
            server.shutdown()
        self._close()

    def resolve(self, name: str, rtype: str = "TXT", timeout: float = 2) -> list[str]:
        """Ask this server over UDP (a self-check for tests); the values, joined per record."""
        query = DNSRecord.question(name, rtype)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(query.pack(), (self.address, self.port))
            reply = DNSRecord.parse(sock.recv(65535))
        out: list[str] = []
        for rr in reply.rr:
            if isinstance(rr.rdata, TXT):
                out.append(b"".join(rr.rdata.data).decode())
            else:
                out.append(str(rr.rdata))
        return out


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
