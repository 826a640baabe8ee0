"""Verdicts from pinned Authentication-Results (RFC 8601): only the agency MTA's count."""

from __future__ import annotations

import pytest

from bridge.core.authentication import (
    AUTHENTICATED,
    FAILED,
    UNVERIFIED,
    verdict_from_results,
)

MTA = "mx.agency.example"
SENDER = "achats.gouv.fr"


def org(domain: str) -> str:
    """A stand-in for the Public Suffix List: gouv.fr and fr are public suffixes."""
    labels = domain.split(".")
    suffix = 2 if domain.endswith(".gouv.fr") else 1
    return ".".join(labels[-(suffix + 1) :])


def verdict(*headers: str, sender: str = "achats.gouv.fr") -> tuple[str, str | None]:
    found = verdict_from_results(headers, trusted_ids=[MTA], from_domain=sender, org_domain=org)
    return found.verdict, found.method


def test_dmarc_pass_authenticates() -> None:
    header = f"{MTA}; dkim=pass header.d=achats.gouv.fr; dmarc=pass header.from=achats.gouv.fr"
    assert verdict(header) == (AUTHENTICATED, "dmarc")


def test_an_aligned_dkim_pass_authenticates() -> None:
    assert verdict(f"{MTA}; dkim=pass header.d=achats.gouv.fr") == (AUTHENTICATED, "dkim")
    # Relaxed alignment: a subdomain of the same organisational domain.
    assert verdict(f"{MTA}; dkim=pass header.d=mail.achats.gouv.fr") == (AUTHENTICATED, "dkim")


def test_a_signature_by_a_public_suffix_never_aligns() -> None:
    """d=gouv.fr says nothing about presidence.gouv.fr: gouv.fr is a public suffix."""
    header = f"{MTA}; dkim=pass header.d=gouv.fr"
    assert verdict(header, sender="presidence.gouv.fr") == (UNVERIFIED, None)


def test_a_signature_of_another_domain_says_nothing() -> None:
    assert verdict(f"{MTA}; dkim=pass header.d=protonmail.com") == (UNVERIFIED, None)


def test_results_of_another_server_are_ignored() -> None:
    """A sender can add its own header claiming a pass: only the pinned authserv-id counts."""
    forged = "mx.evil.example; dmarc=pass header.from=achats.gouv.fr"
    assert verdict(forged) == (UNVERIFIED, None)
    lookalike = f"{MTA}.evil.example; dmarc=pass header.from=achats.gouv.fr"
    assert verdict(lookalike) == (UNVERIFIED, None)


def test_the_pinned_id_is_compared_without_case() -> None:
    header = f"{MTA.upper()}; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}"
    assert verdict(header)[0] == AUTHENTICATED


def test_failures() -> None:
    assert verdict(f"{MTA}; dmarc=fail header.from=achats.gouv.fr") == (FAILED, "dmarc")
    assert verdict(f"{MTA}; dkim=fail header.d=achats.gouv.fr") == (FAILED, "dkim")


def test_trusted_results_that_disagree_fail() -> None:
    passed = f"{MTA}; spf=pass smtp.mailfrom={SENDER}; dmarc=pass header.from={SENDER}"
    failed = f"{MTA}; dmarc=fail header.from=achats.gouv.fr"
    found = verdict_from_results(
        [passed, failed], trusted_ids=[MTA], from_domain="achats.gouv.fr", org_domain=org
    )
    assert found.verdict == FAILED
    assert "disagree" in found.reason


def test_a_dmarc_pass_needs_an_aligned_pass_beside_it() -> None:
    """What opendmarc 1.4.2 really wrote for From: presidence.gouv.fr signed by d=gouv.fr (a
    public suffix) from a host SPF fails: its dmarc=pass rests on an alignment RFC 7489 denies."""
    headers = (
        f"{MTA}; dmarc=pass (p=reject dis=none) header.from=presidence.gouv.fr",
        f"{MTA}; spf=fail smtp.mailfrom=relay.test",
        f"{MTA};\n\tdkim=pass (2048-bit key; unprotected) header.d=gouv.fr header.i=@gouv.fr"
        " header.a=rsa-sha256 header.s=rig header.b=XGAqS3uI;\n\tdkim-atps=neutral",
    )
    assert verdict(*headers, sender="presidence.gouv.fr") == (UNVERIFIED, None)
    # An SPF pass for another organisation does not back it either.
    unaligned = f"{MTA}; spf=pass smtp.mailfrom=relay.test; dmarc=pass header.from=achats.gouv.fr"
    assert verdict(unaligned) == (UNVERIFIED, None)


def test_a_dmarc_pass_backed_by_an_aligned_spf_pass_authenticates() -> None:
    """Unsigned mail from a host the From: domain's SPF record lists (opendmarc's own check)."""
    headers = (
        f"{MTA}; dmarc=pass (p=reject dis=none) header.from=presidence.gouv.fr",
        f"{MTA}; spf=pass smtp.mailfrom=presidence.gouv.fr",
        f"{MTA}; dkim=none; dkim-atps=neutral",
    )
    assert verdict(*headers, sender="presidence.gouv.fr") == (AUTHENTICATED, "dmarc")


def test_a_dmarc_result_for_another_from_domain_is_ignored() -> None:
    header = f"{MTA}; dmarc=pass header.from=protonmail.com"
    assert verdict(header) == (UNVERIFIED, None)


@pytest.mark.parametrize(
    "header",
    [
        "",
        ";;;",
        f"{MTA}; dkim=",
        f"{MTA}; dmarc=pass header.from=" + "a" * 10_000,
        "x" * 100_000,
        f"{MTA}; none",
        "\x00\r\nBcc: eve@evil.example",
    ],
)
def test_hostile_or_empty_headers_give_unverified(header: str) -> None:
    assert verdict(header)[0] == UNVERIFIED


def test_no_header_is_unverified() -> None:
    found = verdict_from_results(
        [], trusted_ids=[MTA], from_domain="achats.gouv.fr", org_domain=org
    )
    assert found.verdict == UNVERIFIED
    assert found.reason
