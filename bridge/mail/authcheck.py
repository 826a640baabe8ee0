"""The verdict on a mail's sender: the agency MTA's pinned Authentication-Results first, then,
when they say nothing and the config asks for it, the bridge's own DKIM (and ARC) check with
DMARC alignment, against the DNS. A DNS failure never authenticates anybody."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

import dkim
import dns.exception
import dns.resolver
from dkim.util import InvalidTagValueList, parse_tag_value

from bridge.config.mail import TrustSettings
from bridge.core.authentication import (
    AUTHENTICATED,
    FAILED,
    UNVERIFIED,
    Verdict,
    aligned_spf_pass,
    organizational_domain,
    verdict_from_results,
)

log = logging.getLogger("passerelle.mail.authcheck")
# dkimpy reports every bad key or signature at ERROR; those are a hostile sender's doing.
_DKIMPY_LOG = logging.getLogger("passerelle.mail.dkimpy")
_DKIMPY_LOG.setLevel(logging.CRITICAL)

MAX_SIGNATURES = 5  # DKIM-Signature headers looked at per mail (each may cost a DNS lookup)
MAX_RESULTS_HEADERS = 20  # Authentication-Results headers read per mail
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CACHE_SECONDS = 300.0


class DnsFailure(Exception):
    """The DNS gave no answer (timeout, server failure): the check cannot conclude."""


@dataclass
class _Txt:
    """TXT lookups through one resolver, cached a few minutes (answers and NXDOMAIN alike; a
    DNS failure never is)."""

    resolver: dns.resolver.Resolver
    lock: threading.Lock
    cache: dict[str, tuple[float, tuple[bytes, ...]]] = field(default_factory=dict)

    def lookup(self, name: str) -> bytes | None:
        """The TXT strings of `name`'s first record joined (a DKIM key), None if there is none;
        DnsFailure when the DNS does not answer."""
        found = self.records(name)
        return found[0] if found else None

    def records(self, name: str) -> list[bytes]:
        """Every TXT record of `name` (for DMARC, where several records mean none applies),
        [] if there is none; DnsFailure when the DNS does not answer."""
        key = name.lower().rstrip(".")
        now = time.monotonic()
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None and hit[0] > now:
                return list(hit[1])
        try:
            answer = self.resolver.resolve(key + ".", "TXT", search=False)
            found = tuple(b"".join(r.strings) for r in answer)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            found = ()
        except dns.exception.DNSException as e:
            raise DnsFailure(type(e).__name__) from None
        with self.lock:
            if len(self.cache) > 10_000:
                self.cache.clear()
            self.cache[key] = (now + _CACHE_SECONDS, found)
        return list(found)


def _resolver(trust: TrustSettings) -> dns.resolver.Resolver:
    if trust.dns_server is None:
        resolver = dns.resolver.Resolver(configure=True)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        address, port = trust.dns_server
        resolver.nameservers = [address]
        resolver.port = port
    resolver.timeout = trust.dns_timeout
    resolver.lifetime = trust.dns_timeout
    return resolver


def results_headers(raw: bytes) -> list[str]:
    """The values of a mail's Authentication-Results headers, unfolded (header block only)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = headers.get_all("Authentication-Results") or []
    return [_FOLD.sub("", str(v)) for v in values[:MAX_RESULTS_HEADERS]]


class SenderAuthenticator:
    """Decides a mail's verdict. Thread-safe: the relay calls `check` from worker threads."""

    def __init__(self, trust: TrustSettings) -> None:
        self.trust = trust
        self._txt = _Txt(_resolver(trust), threading.Lock())

    def check(self, raw: bytes, from_address: str) -> Verdict:
        """The verdict for a mail whose (already validated) From: address is `from_address`."""
        domain = from_address.rpartition("@")[2].lower()
        headers = results_headers(raw)
        verdict = verdict_from_results(
            headers,
            trusted_ids=self.trust.authserv_ids,
            from_domain=domain,
            org_domain=organizational_domain,
        )
        if verdict.verdict != UNVERIFIED or not self.trust.verify_dkim:
            return verdict
        spf = aligned_spf_pass(
            headers,
            trusted_ids=self.trust.authserv_ids,
            from_domain=domain,
            org_domain=organizational_domain,
        )
        return self._check_locally(raw, domain, spf)

    def _check_locally(self, raw: bytes, domain: str, spf_domain: str | None) -> Verdict:
        try:
            signatures = _aligned_signatures(raw, domain)
            outcomes = [self._verify(raw, index, d) for index, d in signatures]
        except DnsFailure as e:
            return Verdict(UNVERIFIED, "dkim", None, f"DNS lookup failed ({e})")
        passed = [d for d, ok in outcomes if ok]
        failed = [d for d, ok in outcomes if not ok]
        arc = _arc_note(raw, self._dnsfunc_quiet)
        if passed and not failed:
            return Verdict(
                AUTHENTICATED, "dkim", passed[0], f"DKIM pass, d={passed[0]} (bridge){arc}"
            )
        if failed:
            return Verdict(
                FAILED, "dkim", failed[0], f"DKIM signature fails, d={failed[0]} (bridge){arc}"
            )
        if spf_domain is not None:
            return Verdict(
                AUTHENTICATED, "spf", spf_domain, f"aligned SPF pass, {spf_domain}{arc}"
            )
        return self._dmarc_without_pass(domain, arc)

    def _verify(self, raw: bytes, index: int, d: str) -> tuple[str, bool]:
        """Whether signature `index` (by `d`) verifies; DnsFailure if its key did not come."""
        failures: list[str] = []

        def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            try:
                return self._txt.lookup(text) or b""
            except DnsFailure as e:
                failures.append(str(e))
                return b""

        try:
            ok = bool(dkim.DKIM(raw, logger=_DKIMPY_LOG).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException as e:
            log.debug("DKIM signature %d not verifiable: %s", index, type(e).__name__)
            ok = False
        if failures:
            raise DnsFailure(failures[0])
        return d, ok

    def _dnsfunc_quiet(self, name: bytes | str, timeout: float = 5) -> bytes:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            return self._txt.lookup(text) or b""
        except DnsFailure:
            return b""

    def _dmarc_without_pass(self, domain: str, arc: str) -> Verdict:
        """No aligned pass: DMARC fails where the domain publishes a policy (RFC 7489 6.6.3:
        the From: domain's record, else its organisational domain's)."""
        org = organizational_domain(domain)
        try:
            policy = self._dmarc_policy(domain)
            if policy is None and org != domain:
                policy = self._dmarc_policy(org)
        except DnsFailure as e:
            return Verdict(UNVERIFIED, "dmarc", None, f"DNS lookup failed ({e}){arc}")
        if policy is None:
            return Verdict(
                UNVERIFIED, None, None, f"no aligned DKIM signature and no DMARC record{arc}"
            )
        return Verdict(
            FAILED, "dmarc", domain, f"DMARC fail (bridge): no aligned pass, p={policy}{arc}"
        )

    def _dmarc_policy(self, domain: str) -> str | None:
        found = [r for r in self._txt.records(f"_dmarc.{domain}") if r[:8].lower() == b"v=dmarc1"]
        if len(found) != 1:
            return None  # none, or several: RFC 7489 says no policy applies
        try:
            tags = parse_tag_value(found[0])
        except InvalidTagValueList:
            return None
        policy = tags.get(b"p", b"none").decode("ascii", "replace").strip().lower()
        return policy if policy in ("none", "quarantine", "reject") else "none"


def _aligned_signatures(raw: bytes, domain: str) -> list[tuple[int, str]]:
    """(index, d=) of the DKIM signatures whose domain aligns (relaxed) with `domain`."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = headers.get_all("DKIM-Signature") or []
    org = organizational_domain(domain)
    found: list[tuple[int, str]] = []
    for index, value in enumerate(values[:MAX_SIGNATURES]):
        try:
            tags = parse_tag_value(_FOLD.sub("", str(value)).encode("utf-8", "replace"))
        except (InvalidTagValueList, ValueError):
            continue
        d = tags.get(b"d", b"").decode("ascii", "replace").strip().rstrip(".").lower()
        if d and organizational_domain(d) == org:
            found.append((index, d))
    return found


def _arc_note(raw: bytes, dnsfunc: Callable[[bytes | str, float], bytes]) -> str:
    """ "; ARC pass/fail" when the mail carries an ARC chain (evidence only: an ARC sealer is
    not trusted to vouch for a sender)."""
    if b"arc-seal:" not in raw[:65536].lower():
        return ""
    try:
        cv, _results, _comment = dkim.arc_verify(raw, logger=_DKIMPY_LOG, dnsfunc=dnsfunc)
    except Exception as e:  # dkimpy raises several kinds on hostile chains
        log.debug("ARC not verifiable: %s", type(e).__name__)
        return "; ARC not verifiable"
    state = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    return f"; ARC {state.lower()}"
