"""Sender authentication in the mail relay (real database, real parser, the real verdict code):
what is refused, what is marked, what every relayed message carries. The same rules with a
real MTA writing the results: tests/integration/test_mail_auth_rig.py and the e2e tests."""

# The relay fixtures come from test_mail_relay; pytest finds them by their imported names.
# ruff: noqa: F811

from __future__ import annotations

from bridge.core.authentication import AUTHENTICATED, FAILED, MARKS, UNVERIFIED
from tests.integration.test_mail_relay import (  # noqa: F401  (fixtures)
    MTA,
    Relay,
    database,
    make_mail,
    relay,
)

PARTNER = "partner.example.org"


async def test_an_authenticated_mail_is_posted_with_its_verdict(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Signed", sender="Agent <agent@achats.gouv.fr>"))
    await relay.settle()
    posted = relay.poster.by_subject("Signed")
    assert posted.message.auth is not None
    assert posted.message.auth.verdict == AUTHENTICATED
    assert (posted.message.auth.method, posted.message.auth.domain) == ("dmarc", "achats.gouv.fr")
    assert relay.poster.notices == []


async def test_unauthenticated_mail_from_a_required_domain_is_refused_and_told_once_a_day(
    relay: Relay,
) -> None:
    link = await relay.link()  # require_authenticated: default, every allowed sender
    for uid in (1, 2, 3):
        await relay.deliver(
            link, uid, make_mail(f"Forged {uid}", sender="agent@achats.gouv.fr", auth=None)
        )
    await relay.deliver(link, 4, make_mail("Real", sender="agent@achats.gouv.fr"))
    await relay.settle()
    assert await relay.states(link) == {1: "rejected", 2: "rejected", 3: "rejected", 4: "done"}
    assert [p.message.subject for p in relay.poster.posts] == ["Real"]
    [notice] = relay.poster.notices
    assert "agent@achats.gouv.fr" in notice.text
    assert "authenticated" in notice.text
    assert "unverified" in notice.text
    assert "once a day" in notice.text


async def test_a_failed_verdict_is_refused_even_when_another_result_passes(relay: Relay) -> None:
    link = await relay.link()
    both = (
        "dkim=pass header.d={domain}\r\nAuthentication-Results: "
        + MTA
        + "; dkim=fail header.d={domain}"
    )
    fail = "dmarc=fail header.from={domain}"
    await relay.deliver(link, 1, make_mail("Conflict", sender="a@achats.gouv.fr", auth=both))
    await relay.deliver(link, 2, make_mail("Fail", sender="b@achats.gouv.fr", auth=fail))
    await relay.settle()
    assert await relay.states(link) == {1: "rejected", 2: "rejected"}
    assert relay.poster.posts == []
    assert len(relay.poster.notices) == 2
    assert all(FAILED in n.text for n in relay.poster.notices)


async def test_a_dmarc_pass_alone_is_not_believed(relay: Relay) -> None:
    """opendmarc passes d=gouv.fr for presidence.gouv.fr (test_mail_auth_rig.py): a DMARC pass
    counts only with an aligned DKIM or SPF pass beside it."""
    link = await relay.link()
    alone = "dmarc=pass header.from={domain}"
    await relay.deliver(link, 1, make_mail("Alone", sender="a@presidence.gouv.fr", auth=alone))
    await relay.settle()
    assert await relay.states(link) == {1: "rejected"}


async def test_results_of_another_server_or_a_sender_are_not_believed(relay: Relay) -> None:
    link = await relay.link()
    forged = make_mail("Forged", sender="agent@achats.gouv.fr", auth=None).replace(
        b"From:",
        b"Authentication-Results: mx.attacker.example; dmarc=pass "
        b"header.from=achats.gouv.fr\r\nFrom:",
        1,
    )
    await relay.deliver(link, 1, forged)
    await relay.settle()
    assert await relay.states(link) == {1: "rejected"}
    assert relay.poster.posts == []


async def test_an_allowed_unverified_sender_is_posted_with_a_visible_marker(
    relay: Relay,
) -> None:
    link = await relay.link(allowed=("gouv.fr", "*.gouv.fr", PARTNER), required=("*.gouv.fr",))
    await relay.deliver(link, 1, make_mail("Partner", sender=f"p@{PARTNER}", auth=None))
    await relay.deliver(link, 2, make_mail("Agent", sender="a@achats.gouv.fr", auth=None))
    await relay.settle()
    assert await relay.states(link) == {1: "done", 2: "rejected"}
    posted = relay.poster.by_subject("Partner")
    assert posted.message.auth is not None
    assert posted.message.auth.verdict == UNVERIFIED
    assert MARKS[UNVERIFIED].startswith("⚠")


async def test_an_empty_requirement_posts_unverified_mail_from_every_allowed_domain(
    relay: Relay,
) -> None:
    link = await relay.link(required=())
    await relay.deliver(link, 1, make_mail("Open", sender="a@achats.gouv.fr", auth=None))
    await relay.settle()
    assert await relay.states(link) == {1: "done"}
    assert relay.poster.by_subject("Open").message.auth is not None


async def test_a_disallowed_sender_is_refused_before_any_authentication(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Outsider", sender="x@evil.example"))
    await relay.settle()
    [notice] = relay.poster.notices
    assert "allowed senders" in notice.text
