"""The demo's mail server as an agency runs one: Postfix with Debian's opendkim and opendmarc,
which write the Authentication-Results the bridge trusts, and a DNS server of its own holding
the demo domain's DKIM key, SPF and DMARC records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.harness.mailauth import AuthRig

DEMO_DOMAIN = "achats.gouv.fr"
# What the demo MTA's milters write first in Authentication-Results; the bridge pins it.
DEMO_AUTHSERV_ID = "mx.achats.gouv.fr"


def demo_mta(folder: Path, lmtp_port: int) -> AuthRig:
    """Built, not started. achats.gouv.fr publishes a key (the demo signs its first mail with
    it), an SPF record allowing this machine (so the printed one-liner passes DMARC through
    SPF) and p=reject; presidence.gouv.fr publishes p=reject and no SPF for this machine."""
    from bridge.harness.mailauth import AuthRig, DkimKey  # the demo's extras (cryptography)

    key = DkimKey.generate(DEMO_DOMAIN)
    return AuthRig.build(
        folder,
        lmtp_port=lmtp_port,
        authserv_id=DEMO_AUTHSERV_ID,
        keys={DEMO_DOMAIN: key},
        records={
            DEMO_DOMAIN: ["v=spf1 ip4:127.0.0.0/8 -all"],
            f"_dmarc.{DEMO_DOMAIN}": ["v=DMARC1; p=reject"],
            "presidence.gouv.fr": ["v=spf1 -all"],
            "_dmarc.presidence.gouv.fr": ["v=DMARC1; p=reject"],
        },
    )
