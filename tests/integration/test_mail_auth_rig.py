"""Sender authentication on the real MTA: Postfix with Debian's opendkim and opendmarc writes the
Authentication-Results, Dovecot delivers them, bridge.core.authentication reads them (issue 10).

Every case sends a real mail over SMTP (from 192.0.2.25 by XCLIENT, see AuthRig.send), reads it
back from the Maildir and asks verdict_from_results what it makes of the pinned headers.
"""

from __future__ import annotations

import email
import email.policy
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import authres
import pytest
from publicsuffixlist import PublicSuffixList

from bridge.core.authentication import (
    AUTHENTICATED,
    FAILED,
    UNVERIFIED,
    Verdict,
    verdict_from_results,
)
from bridge.harness.dovecot import DovecotServer
from bridge.harness.mailauth import AuthRig, find_delivered
from tests.conftest import AUTHSERV_ID

SENDER = "presidence.gouv.fr"
AUTHOR = f"cabinet@{SENDER}"
BOUNCE = "bounce@relay.test"  # an envelope sender SPF fails for (unaligned anyway)
_PSL = PublicSuffixList()


def org_domain(domain: str) -> str:
    return _PSL.privatesuffix(domain) or domain


@pytest.fixture(scope="module")
def mailbox(dovecot: DovecotServer) -> str:
    return dovecot.add_user("authrig", "pw-authrig")


@dataclass
class Delivered:
    raw: bytes
    results: list[str]  # the Authentication-Results values, top first, as delivered
    verdict: Verdict


def compose(mailbox: str, body: str = "Bonjour,\r\nla réunion est à 10 h.\r\n") -> bytes:
    message_id = f"<{uuid.uuid4().hex}@{SENDER}>"
    return (
        f"From: {AUTHOR}\r\nTo: {mailbox}\r\nSubject: Réunion\r\n"
        f"Date: Mon, 07 Dec 2026 09:00:00 +0100\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + body
    ).encode()


def message_id(raw: bytes) -> str:
    found = re.search(rb"^Message-ID: (<[^>]+>)", raw, re.MULTILINE | re.IGNORECASE)
    assert found is not None
    return found.group(1).decode()


def deliver(
    rig: AuthRig,
    dovecot: DovecotServer,
    mailbox: str,
    raw: bytes,
    *,
    mail_from: str = BOUNCE,
    case: str,
) -> Delivered:
    """Send through the milters, read back from the Maildir, and judge."""
    started = time.monotonic()
    rig.send(raw, mail_from, mailbox)
    delivered = find_delivered(dovecot.maildir(mailbox), message_id(raw))
    parsed = email.message_from_bytes(delivered, policy=email.policy.compat32)
    results = [str(value) for value in parsed.get_all("Authentication-Results", [])]
    verdict = verdict_from_results(
        results, trusted_ids=[rig.authserv_id], from_domain=SENDER, org_domain=org_domain
    )
    print(f"\n{case}: {time.monotonic() - started:.3f} s -> {verdict}")
    for value in results:
        print(f"  Authentication-Results: {value}")
    return Delivered(delivered, results, verdict)


def results_by_method(results: list[str]) -> dict[str, str]:
    """method -> result of every pinned result (one of each is what the milters write)."""
    out: dict[str, str] = {}
    for value in results:
        header = authres.AuthenticationResultsHeader.parse_value(value)
        if header.authserv_id.lower() == AUTHSERV_ID:
            out.update({str(r.method): str(r.result) for r in header.results})
    return out


def short_b(signed: bytes) -> str:
    """The first 8 characters of the DKIM-Signature b= value: opendkim's header.b."""
    header = re.search(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.DOTALL | re.MULTILINE)
    assert header is not None
    tags = dict(
        tag.strip().split("=", 1)
        for tag in re.sub(r"\s+", "", header.group(1).decode()).split(";")
    )
    return tags["b"][:8]


def test_signed_and_aligned_is_authenticated(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """d=presidence.gouv.fr on From: presidence.gouv.fr. The exact lines the MTA writes."""
    signed = auth_rig.sign(compose(mailbox), SENDER)
    got = deliver(auth_rig, dovecot, mailbox, signed, case="signed, aligned")
    assert got.verdict.verdict == AUTHENTICATED
    assert got.verdict.method == "dmarc"
    # opendmarc's two headers above opendkim's: each milter adds at the top, opendkim ran first.
    assert got.results == [
        f"{AUTHSERV_ID}; dmarc=pass (p=reject dis=none) header.from={SENDER}",
        f"{AUTHSERV_ID}; spf=fail smtp.mailfrom=relay.test",
        f"{AUTHSERV_ID};\n\tdkim=pass (2048-bit key; unprotected) header.d={SENDER}"
        f" header.i=@{SENDER} header.a=rsa-sha256 header.s=rig header.b={short_b(signed)};"
        "\n\tdkim-atps=neutral",
    ]
    assert (
        f"\nAuthentication-Results: {AUTHSERV_ID}; dmarc=pass (p=reject dis=none)"
        f" header.from={SENDER}\n".encode()
        in got.raw
    )


def test_a_signature_of_another_domain_fails_dmarc(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """d=other.example: the signature is good but says nothing of presidence.gouv.fr, whose
    DMARC record (p=reject) then fails the mail; the MTA's dmarc=fail makes it failed, not just
    unverified."""
    signed = auth_rig.sign(compose(mailbox), "other.example")
    got = deliver(auth_rig, dovecot, mailbox, signed, case="signed by other.example")
    assert results_by_method(got.results) == {
        "dmarc": "fail",
        "spf": "fail",
        "dkim": "pass",
        "dkim-atps": "neutral",
    }
    assert (got.verdict.verdict, got.verdict.method) == (FAILED, "dmarc")


def test_a_signature_by_the_public_suffix_is_not_authenticated(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """d=gouv.fr on From: presidence.gouv.fr. gouv.fr is a public suffix, so RFC 7489 never
    aligns it; opendmarc 1.4.2 (given the PSL) says dmarc=pass all the same. The verdict does
    not take that pass: no aligned DKIM or SPF pass backs it."""
    signed = auth_rig.sign(compose(mailbox), "gouv.fr")
    got = deliver(auth_rig, dovecot, mailbox, signed, case="signed by gouv.fr")
    assert results_by_method(got.results)["dmarc"] == "pass", "opendmarc's alignment changed?"
    assert "header.d=gouv.fr header.i=@gouv.fr" in got.results[2]
    assert got.verdict.verdict == UNVERIFIED
    assert "without an aligned" in got.verdict.reason


def test_unsigned_mail_fails_dmarc(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    got = deliver(auth_rig, dovecot, mailbox, compose(mailbox), case="unsigned")
    assert results_by_method(got.results) == {
        "dmarc": "fail",
        "spf": "fail",
        "dkim": "none",
        "dkim-atps": "neutral",
    }
    assert (got.verdict.verdict, got.verdict.method) == (FAILED, "dmarc")


def test_unsigned_mail_from_a_host_spf_lists_is_authenticated(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """The SPF-only path: envelope sender in presidence.gouv.fr, whose SPF lists the client."""
    got = deliver(
        auth_rig,
        dovecot,
        mailbox,
        compose(mailbox),
        mail_from=f"bounce@{SENDER}",
        case="unsigned, SPF aligned",
    )
    assert f"{AUTHSERV_ID}; spf=pass smtp.mailfrom={SENDER}" in got.results
    assert (got.verdict.verdict, got.verdict.method) == (AUTHENTICATED, "dmarc")


def test_a_broken_body_hash_fails(auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str) -> None:
    signed = auth_rig.sign(compose(mailbox), SENDER)
    tampered = signed.replace(b"10 h", b"11 h")
    got = deliver(auth_rig, dovecot, mailbox, tampered, case="body changed after signing")
    assert 'dkim=fail reason="signature verification failed"' in got.results[2]
    assert results_by_method(got.results)["dmarc"] == "fail"
    assert got.verdict.verdict == FAILED


def test_trusted_results_that_disagree_fail(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """The aligned signature fails (body changed) while SPF passes aligned, so opendmarc says
    dmarc=pass: two trusted results disagree about the same sender."""
    tampered = auth_rig.sign(compose(mailbox), SENDER).replace(b"10 h", b"11 h")
    got = deliver(
        auth_rig,
        dovecot,
        mailbox,
        tampered,
        mail_from=f"bounce@{SENDER}",
        case="DKIM fails, SPF passes",
    )
    assert results_by_method(got.results) == {
        "dmarc": "pass",
        "spf": "pass",
        "dkim": "fail",
        "dkim-atps": "neutral",
    }
    assert got.verdict.verdict == FAILED
    assert "disagree" in got.verdict.reason


# Authentication-Results a sender might write to pass as the agency's MTA. The last two are
# not in the pinned id's name at all and must simply be ignored.
FORGED = [
    f"{AUTHSERV_ID}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID}; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID}; dkim=pass header.d={SENDER} header.b=AAAAAAAA",
    f"MX.Agency.TEST; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID} 1; dmarc=pass header.from={SENDER}",
    f"(relayed) {AUTHSERV_ID}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID} (relayed); dmarc=pass header.from={SENDER}",
    f'"{AUTHSERV_ID}"; dmarc=pass header.from={SENDER}',
    f"{AUTHSERV_ID};dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID};\r\n dmarc=pass\r\n header.from={SENDER}",
    f"{AUTHSERV_ID}; x=y; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID}; garbage!!; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID}. ; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}",
    f"{AUTHSERV_ID}.evil.example; dmarc=pass header.from={SENDER}",
    f"mx.evil.example; dmarc=pass header.from={SENDER}",
]


def _pinned(value: str) -> bool:
    """Whether authres (the bridge's reader) takes ``value`` for the pinned MTA's header."""
    try:
        header = authres.AuthenticationResultsHeader.parse_value(value.strip())
    except Exception:
        return False
    return str(header.authserv_id).lower() == AUTHSERV_ID


def test_forged_results_are_removed_or_ignored(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str
) -> None:
    """An unsigned mail carrying forged results under the pinned id (and look-alikes): opendkim
    strips those it reads as the pinned id's (RemoveARFrom + RemoveARAll); what it cannot read
    is left, and must then be unreadable to the bridge too. The verdict stays DMARC fail."""
    raw = compose(mailbox)
    forged = b"".join(f"Authentication-Results: {value}\r\n".encode() for value in FORGED)
    got = deliver(auth_rig, dovecot, mailbox, forged + raw, case="forged results")
    assert FORGED[0] not in got.results
    pinned = [value for value in got.results if _pinned(value)]
    assert pinned == [
        f"{AUTHSERV_ID}; dmarc=fail (p=reject dis=none) header.from={SENDER}",
        f"{AUTHSERV_ID}; spf=fail smtp.mailfrom=relay.test",
        f"{AUTHSERV_ID}; dkim=none; dkim-atps=neutral",
    ]
    survivors = [value for value in got.results if not _pinned(value)]
    print("  kept by opendkim, ignored by the bridge:", *survivors, sep="\n    ")
    assert f"mx.evil.example; dmarc=pass header.from={SENDER}" in survivors
    assert (got.verdict.verdict, got.verdict.method) == (FAILED, "dmarc")


@pytest.fixture
def dropped(auth_rig: AuthRig) -> Iterator[set[str]]:
    """Names the test makes the DNS server ignore; answered again afterwards."""
    names: set[str] = set()
    try:
        yield names
    finally:
        for name in names:
            auth_rig.dns.undrop(name)


def test_a_dkim_key_lookup_timeout_is_never_authenticated(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str, dropped: set[str]
) -> None:
    """The key's TXT query goes unanswered. opendkim gives up after DNSTimeout (2 s), logs
    "query timed out", and writes no DKIM result at all: it does not temp-fail the mail
    although On-DNSError defaults to tempfail (mlfi_eom drops the code dkimf_libstatus gives
    back). opendmarc, seeing no DKIM result and an SPF fail, says dmarc=fail: a genuine mail is
    then *failed*, not unverified. Never authenticated, which is what matters here; the same
    mail once DNS answers again is authenticated."""
    key = auth_rig.keys[SENDER]
    dropped.add(key.record_name)
    auth_rig.dns.drop(key.record_name)
    signed = auth_rig.sign(compose(mailbox), SENDER)
    got = deliver(auth_rig, dovecot, mailbox, signed, case="DKIM key lookup times out")
    assert (key.record_name, "TXT", False) in auth_rig.dns.queries
    assert any(
        f"'{key.record_name}' query timed out" in line for line in auth_rig.milters.log_lines()
    )
    assert got.results == [
        f"{AUTHSERV_ID}; dmarc=fail (p=reject dis=none) header.from={SENDER}",
        f"{AUTHSERV_ID}; spf=fail smtp.mailfrom=relay.test",
    ]
    assert got.verdict.verdict == FAILED

    auth_rig.dns.undrop(key.record_name)
    again = compose(mailbox)
    got = deliver(auth_rig, dovecot, mailbox, auth_rig.sign(again, SENDER), case="DNS back")
    assert got.verdict.verdict == AUTHENTICATED


def test_a_dmarc_record_lookup_timeout(
    auth_rig: AuthRig, dovecot: DovecotServer, mailbox: str, dropped: set[str]
) -> None:
    """_dmarc.presidence.gouv.fr goes unanswered: opendmarc delivers with dmarc=none (after
    the resolver's 1 s timeout, twice). An aligned signature still authenticates on its own;
    an unsigned mail is unverified, not failed."""
    name = f"_dmarc.{SENDER}"
    dropped.add(name)
    auth_rig.dns.drop(name)
    signed = auth_rig.sign(compose(mailbox), SENDER)
    got = deliver(auth_rig, dovecot, mailbox, signed, case="DMARC lookup times out, signed")
    assert f"{AUTHSERV_ID}; dmarc=none (p=none dis=none) header.from={SENDER}" in got.results
    assert (got.verdict.verdict, got.verdict.method) == (AUTHENTICATED, "dkim")

    got = deliver(auth_rig, dovecot, mailbox, compose(mailbox), case="... and unsigned")
    assert results_by_method(got.results)["dmarc"] == "none"
    assert got.verdict.verdict == UNVERIFIED
