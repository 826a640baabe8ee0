"""Who really sent a mail: a verdict from the Authentication-Results of the agency's own MTA
(RFC 8601), pinned by its authserv-id. Results any other server wrote are ignored: a sender
can add its own header claiming anything."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import authres
from publicsuffixlist import PublicSuffixList

log = logging.getLogger("passerelle.core.authentication")

__all__ = [
    "AUTHENTICATED",
    "CONTENT_KEY",
    "FAILED",
    "MARKS",
    "UNVERIFIED",
    "Verdict",
    "aligned_spf_pass",
    "organizational_domain",
    "verdict_from_results",
]

AUTHENTICATED = "authenticated"
UNVERIFIED = "unverified"
FAILED = "failed"
# What a room sees above a message whose sender is not authenticated (posted only where the
# link allows it): French first, as the agencies' users read it.
MARKS = {
    UNVERIFIED: "⚠ expéditeur non vérifié / unverified sender",
    FAILED: "⚠ échec de l'authentification de l'expéditeur / sender authentication failed",
}
CONTENT_KEY = "fr.passerelle.auth"
_MAX_HEADER = 8192  # characters of one header read; a longer one is not a real MTA's


@dataclass(frozen=True)
class Verdict:
    verdict: str  # authenticated | unverified | failed
    method: str | None  # dmarc | dkim: what decided it
    domain: str | None  # the domain that authenticated (or failed)
    reason: str  # one line, for the room, the audit log and inspect-mail

    def content(self) -> dict[str, str | None]:
        """What every relayed message carries, machine-readable, under CONTENT_KEY."""
        return {"verdict": self.verdict, "method": self.method, "domain": self.domain}

    def as_json(self) -> dict[str, str | None]:
        return {
            "verdict": self.verdict,
            "method": self.method,
            "domain": self.domain,
            "reason": self.reason,
        }


@functools.cache
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def load_suffix_list() -> None:
    """Parse the Public Suffix List now (about a second of CPU), not on the first mail checked."""
    _suffixes()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 3.2) from the Public Suffix List: one label below
    the public suffix. `gouv.fr` is a public suffix, so `presidence.gouv.fr` is its own and
    `gouv.fr` is only itself: a `d=gouv.fr` signature never aligns with an agency's domain."""
    domain = domain.lower().rstrip(".")
    return _suffixes().privatesuffix(domain) or domain


def _domain(value: object) -> str | None:
    """A domain from a result property: lowercase, without a local part or trailing dot."""
    if not isinstance(value, str) or not value or len(value) > 255:
        return None
    domain = value.rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def _trusted(headers: Iterable[str], trusted_ids: Collection[str]) -> list[Any]:
    """The results of every header written by one of the pinned authserv-ids."""
    pinned = {t.lower() for t in trusted_ids}
    results: list[Any] = []
    for raw in headers:
        if not isinstance(raw, str) or len(raw) > _MAX_HEADER:
            continue
        header = _parse(raw)
        if header is None:
            continue
        authserv_id = header.authserv_id
        if isinstance(authserv_id, str) and authserv_id.lower() in pinned:
            results.extend(header.results)
    return results


def _parse(raw: str) -> Any:
    """One header's value parsed, or None when it is not RFC 8601 (hostile input)."""
    try:
        return authres.AuthenticationResultsHeader.parse_value(raw.strip())
    except Exception as e:  # authres raises its own SyntaxError, and others
        log.debug("Authentication-Results not read: %s", type(e).__name__)
        return None


def _property(result: Any, ptype: str, name: str) -> str | None:
    for prop in getattr(result, "properties", ()):
        if getattr(prop, "type", None) == ptype and getattr(prop, "name", None) == name:
            return _domain(getattr(prop, "value", None))
    return None


def verdict_from_results(
    headers: Iterable[str],
    *,
    trusted_ids: Collection[str],
    from_domain: str,
    org_domain: Callable[[str], str],
) -> Verdict:
    """The verdict for a mail whose From: domain is `from_domain`, from the values of its
    Authentication-Results headers. `org_domain` gives a domain's organisational domain
    (Public Suffix List), for relaxed DKIM alignment: `d=gouv.fr` never aligns with
    `presidence.gouv.fr`, whose organisational domain is itself.

    authenticated: DMARC pass for the From: domain backed by an aligned pass in the same trusted
    results (DKIM d= or SPF smtp.mailfrom), or a DKIM pass whose d= aligns with it.
    failed: DMARC fail for it, an aligned DKIM fail, or trusted results that disagree.
    unverified: nothing usable (no trusted header, none about this domain).

    A DMARC pass is not taken on the MTA's word alone: opendmarc 1.4.2 (Debian 12) says
    dmarc=pass for From: presidence.gouv.fr signed only by d=gouv.fr, a public suffix, which
    RFC 7489 never aligns (seen on the real milters, tests/integration/test_mail_auth_rig.py).
    """
    sender = from_domain.lower().rstrip(".")
    sender_org = org_domain(sender)
    passes: list[Verdict] = []
    fails: list[Verdict] = []
    dmarc_passes: list[Verdict] = []
    aligned_spf_pass = False
    for result in _trusted(headers, trusted_ids):
        method = str(getattr(result, "method", "")).lower()
        outcome = str(getattr(result, "result", "")).lower()
        if method == "dmarc":
            domain = _property(result, "header", "from")
            if domain != sender:
                continue
            if outcome == "pass":
                dmarc_passes.append(Verdict(AUTHENTICATED, "dmarc", domain, "DMARC pass"))
            elif outcome == "fail":
                fails.append(Verdict(FAILED, "dmarc", domain, "DMARC fail"))
        elif method == "spf":
            domain = _property(result, "smtp", "mailfrom")
            if outcome == "pass" and domain is not None and org_domain(domain) == sender_org:
                aligned_spf_pass = True
        elif method == "dkim":
            domain = _property(result, "header", "d") or _property(result, "header", "i")
            if domain is None or org_domain(domain) != sender_org:
                continue  # a signature by another organisation says nothing of this sender
            if outcome == "pass":
                passes.append(Verdict(AUTHENTICATED, "dkim", domain, f"DKIM pass, d={domain}"))
            elif outcome in ("fail", "permerror"):
                fails.append(Verdict(FAILED, "dkim", domain, f"DKIM {outcome}, d={domain}"))
    if dmarc_passes and (passes or aligned_spf_pass):
        passes.extend(dmarc_passes)
    elif dmarc_passes and not fails:
        return Verdict(
            UNVERIFIED, None, None, "DMARC pass without an aligned DKIM or SPF pass (ignored)"
        )
    if passes and fails:
        first = fails[0]
        return Verdict(
            FAILED, first.method, first.domain, f"trusted results disagree: {first.reason}"
        )
    if fails:
        return fails[0]
    if passes:
        dmarc = [v for v in passes if v.method == "dmarc"]
        return dmarc[0] if dmarc else passes[0]
    return Verdict(UNVERIFIED, None, None, "no trusted authentication result for this sender")


def aligned_spf_pass(
    headers: Iterable[str],
    *,
    trusted_ids: Collection[str],
    from_domain: str,
    org_domain: Callable[[str], str],
) -> str | None:
    """The envelope domain of a trusted SPF pass aligned (relaxed) with the From: domain, if
    any: what DMARC would count besides DKIM when the MTA checked SPF but not DMARC."""
    sender_org = org_domain(from_domain.lower().rstrip("."))
    for result in _trusted(headers, trusted_ids):
        if str(getattr(result, "method", "")).lower() != "spf":
            continue
        if str(getattr(result, "result", "")).lower() != "pass":
            continue
        domain = _property(result, "smtp", "mailfrom") or _property(result, "smtp", "helo")
        if domain is not None and org_domain(domain) == sender_org:
            return domain
    return None
