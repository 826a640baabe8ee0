"""The bridge's own DKIM/DMARC check (mail.trust.verify_dkim), against a real DNS server: what it
concludes when the agency MTA's results say nothing. Keys are real 2048-bit RSA keys, mail is
signed with dkimpy, lookups go over UDP through dnspython to the harness's DNS server (on a
port of its own here: the bridge's `dns_server` takes one)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from bridge.config.mail import TrustSettings
from bridge.core.authentication import AUTHENTICATED, FAILED, UNVERIFIED
from bridge.harness.dns import DnsServer
from bridge.harness.mailauth import DkimKey
from bridge.harness.ports import free_port
from bridge.mail.authcheck import SenderAuthenticator
from tests.conftest import AUTHSERV_ID

AGENCY = "presidence.gouv.fr"
NO_POLICY = "sans-politique.example"  # publishes a key but no DMARC record


@pytest.fixture(scope="module")
def dns(dkim_keys: dict[str, DkimKey]) -> Iterator[DnsServer]:
    server = DnsServer(address="127.0.0.1", port=free_port())
    for key in dkim_keys.values():
        server.set_txt(key.record_name, key.record)
    server.set_txt(f"_dmarc.{AGENCY}", "v=DMARC1; p=reject")
    server.set_txt("_dmarc.other.example", "v=DMARC1; p=quarantine")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def check(dns: DnsServer) -> SenderAuthenticator:
    trust = TrustSettings(
        authserv_ids=(AUTHSERV_ID,),
        verify_dkim=True,
        dns_server=(dns.address, dns.port),
        dns_timeout=1.0,
    )
    return SenderAuthenticator(trust)


def mail(sender: str, body: str = "Bonjour,\r\nla réunion est à 10 h.\r\n") -> bytes:
    domain = sender.rpartition("@")[2]
    return (
        f"From: {sender}\r\nTo: liste@example.test\r\nSubject: Réunion\r\n"
        f"Date: Mon, 07 Dec 2026 09:00:00 +0100\r\nMessage-ID: <{uuid.uuid4().hex}@{domain}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode()


def test_an_aligned_signature_authenticates(
    check: SenderAuthenticator, dkim_keys: dict[str, DkimKey]
) -> None:
    verdict = check.check(dkim_keys[AGENCY].sign(mail(f"cabinet@{AGENCY}")), f"cabinet@{AGENCY}")
    assert (verdict.verdict, verdict.method, verdict.domain) == (AUTHENTICATED, "dkim", AGENCY)
    assert "bridge" in verdict.reason


def test_an_altered_body_fails(check: SenderAuthenticator, dkim_keys: dict[str, DkimKey]) -> None:
    signed = dkim_keys[AGENCY].sign(mail(f"cabinet@{AGENCY}"))
    altered = signed.replace(b"10 h", b"11 h")
    verdict = check.check(altered, f"cabinet@{AGENCY}")
    assert verdict.verdict == FAILED
    assert verdict.domain == AGENCY


def test_a_public_suffix_signature_is_no_alignment(
    check: SenderAuthenticator, dkim_keys: dict[str, DkimKey]
) -> None:
    """d=gouv.fr is valid for gouv.fr, but gouv.fr is a public suffix: presidence.gouv.fr,
    which publishes p=reject, has no aligned pass, so DMARC fails."""
    verdict = check.check(
        dkim_keys["gouv.fr"].sign(mail(f"cabinet@{AGENCY}")), f"cabinet@{AGENCY}"
    )
    assert verdict.verdict == FAILED
    assert verdict.method == "dmarc"


def test_another_domains_signature_says_nothing_for_this_sender(
    check: SenderAuthenticator, dkim_keys: dict[str, DkimKey]
) -> None:
    raw = dkim_keys["other.example"].sign(mail(f"a@{NO_POLICY}"))
    verdict = check.check(raw, f"a@{NO_POLICY}")
    assert verdict.verdict == UNVERIFIED
    assert "no DMARC record" in verdict.reason


def test_unsigned_mail_from_a_domain_with_a_policy_fails(check: SenderAuthenticator) -> None:
    verdict = check.check(mail(f"president@{AGENCY}"), f"president@{AGENCY}")
    assert verdict.verdict == FAILED
    assert "p=reject" in verdict.reason


def test_trusted_results_come_first(
    check: SenderAuthenticator, dkim_keys: dict[str, DkimKey]
) -> None:
    """The MTA's word decides when it speaks: a failing trusted result is not overridden by a
    signature the bridge could verify."""
    signed = dkim_keys[AGENCY].sign(mail(f"cabinet@{AGENCY}"))
    header = f"Authentication-Results: {AUTHSERV_ID}; dkim=fail header.d={AGENCY}\r\n"
    verdict = check.check(header.encode() + signed, f"cabinet@{AGENCY}")
    assert verdict.verdict == FAILED
    assert "bridge" not in verdict.reason


def test_a_trusted_aligned_spf_pass_authenticates_unsigned_mail(
    check: SenderAuthenticator,
) -> None:
    header = f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=bounces@{AGENCY}\r\n"
    verdict = check.check(header.encode() + mail(f"cabinet@{AGENCY}"), f"cabinet@{AGENCY}")
    assert (verdict.verdict, verdict.method) == (AUTHENTICATED, "spf")


def test_a_dns_timeout_is_unverified_never_authenticated(
    dns: DnsServer, dkim_keys: dict[str, DkimKey]
) -> None:
    key = dkim_keys["other.example"]
    trust = TrustSettings(
        authserv_ids=(AUTHSERV_ID,),
        verify_dkim=True,
        dns_server=(dns.address, dns.port),
        dns_timeout=0.5,
    )
    check = SenderAuthenticator(trust)  # a fresh cache
    dns.drop(key.record_name)
    try:
        started = time.monotonic()
        verdict = check.check(key.sign(mail("a@other.example")), "a@other.example")
        elapsed = time.monotonic() - started
    finally:
        dns.undrop(key.record_name)
    assert verdict.verdict == UNVERIFIED
    assert "DNS" in verdict.reason
    assert elapsed < 5
    # The same mail once the DNS answers again.
    assert check.check(key.sign(mail("a@other.example")), "a@other.example").verdict == (
        AUTHENTICATED
    )


def test_a_dmarc_lookup_timeout_is_unverified(dns: DnsServer) -> None:
    trust = TrustSettings(verify_dkim=True, dns_server=(dns.address, dns.port), dns_timeout=0.5)
    check = SenderAuthenticator(trust)
    dns.drop(f"_dmarc.{AGENCY}")
    try:
        verdict = check.check(mail(f"president@{AGENCY}"), f"president@{AGENCY}")
    finally:
        dns.undrop(f"_dmarc.{AGENCY}")
    assert verdict.verdict == UNVERIFIED


def test_a_hostile_signature_header_is_no_crash(check: SenderAuthenticator) -> None:
    for header in (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=presidence.gouv.fr; s=rig; b=!!!; bh=???\r\n",
        b"DKIM-Signature: d=presidence.gouv.fr\r\n",
        b"DKIM-Signature: ;;;==;\r\n",
        b"DKIM-Signature: v=1; d=" + b"a" * 5000 + b"\r\n",
    ):
        verdict = check.check(header + mail(f"x@{AGENCY}"), f"x@{AGENCY}")
        assert verdict.verdict in (FAILED, UNVERIFIED)


def test_without_local_checking_nothing_is_looked_up(dns: DnsServer) -> None:
    check = SenderAuthenticator(TrustSettings(dns_server=(dns.address, dns.port)))
    before = len(dns.queries)
    verdict = check.check(mail(f"president@{AGENCY}"), f"president@{AGENCY}")
    assert verdict.verdict == UNVERIFIED
    assert len(dns.queries) == before


def dmarc_queries(dns: DnsServer, domain: str) -> int:
    return sum(1 for name, _type, _answered in dns.queries if name == f"_dmarc.{domain}")


@pytest.mark.parametrize(
    ("domain", "verdict"),
    [(AGENCY, FAILED), (NO_POLICY, UNVERIFIED)],
    ids=["a-record", "no-record"],
)
def test_a_second_mail_from_the_same_domain_asks_no_new_dmarc_question(
    check: SenderAuthenticator, dns: DnsServer, domain: str, verdict: str
) -> None:
    """DMARC answers are cached like keys (5 minutes), "no record" too: a mail with no aligned
    signature must not cost a DNS round trip per mail."""
    before = dmarc_queries(dns, domain)
    first = check.check(mail(f"a@{domain}"), f"a@{domain}")
    asked = dmarc_queries(dns, domain)
    assert asked == before + 1
    second = check.check(mail(f"b@{domain}"), f"b@{domain}")
    assert (first.verdict, second.verdict) == (verdict, verdict)
    assert second.reason == first.reason
    assert dmarc_queries(dns, domain) == asked


def test_a_dmarc_lookup_failure_is_not_remembered(dns: DnsServer) -> None:
    """A timeout is no "no record": once the DNS answers again, the next mail is asked about
    and fails the published policy."""
    trust = TrustSettings(verify_dkim=True, dns_server=(dns.address, dns.port), dns_timeout=0.5)
    check = SenderAuthenticator(trust)
    dns.drop(f"_dmarc.{AGENCY}")
    try:
        assert check.check(mail(f"president@{AGENCY}"), f"president@{AGENCY}").verdict == (
            UNVERIFIED
        )
    finally:
        dns.undrop(f"_dmarc.{AGENCY}")
    before = dmarc_queries(dns, AGENCY)
    verdict = check.check(mail(f"president@{AGENCY}"), f"president@{AGENCY}")
    assert verdict.verdict == FAILED
    assert "p=reject" in verdict.reason
    assert dmarc_queries(dns, AGENCY) == before + 1
