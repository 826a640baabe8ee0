"""A mail-authentication rig: Postfix with the real milters, private DNS, test DKIM keys."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
import time
from dataclasses import dataclass, field
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.harness.dns import DnsServer
from bridge.harness.milters import AuthMilters
from bridge.harness.postfix import PostfixServer

SELECTOR = "rig"
CLIENT_IP = "192.0.2.25"  # TEST-NET-1: where test mail claims to come from (see AuthRig.send)


@dataclass(frozen=True)
class DkimKey:
    """An RSA key pair for one signing domain, and its DNS record."""

    domain: str
    selector: str
    private_pem: bytes  # PKCS#1, what dkimpy reads
    public_b64: str  # DER SubjectPublicKeyInfo, the record's p=

    @classmethod
    def generate(cls, domain: str, selector: str = SELECTOR, bits: int = 2048) -> DkimKey:
        """A fresh key (≈ 0.1 s for 2048 bits)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(domain, selector, private_pem, base64.b64encode(public_der).decode())

    @property
    def record_name(self) -> str:
        """``selector._domainkey.domain``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str:
        """The TXT value published for this key."""
        return f"v=DKIM1; k=rsa; p={self.public_b64}"

    def sign(self, raw: bytes) -> bytes:
        """``raw`` with a DKIM-Signature (d=domain, relaxed/relaxed) prepended."""
        signature: bytes = dkim.sign(
            raw,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return signature + raw


@dataclass
class AuthRig:
    """DNS + milters + a Postfix using them, delivering ``postfix.domain`` to Dovecot's LMTP.

    ``keys`` are published as ``rig._domainkey.<domain>``; ``records`` adds other TXT records
    (SPF, DMARC). Build with ``AuthRig.build(...)``, then ``start()``; ``stop()`` at the end.
    """

    dns: DnsServer
    milters: AuthMilters
    postfix: PostfixServer
    keys: dict[str, DkimKey] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        base_dir: Path,
        *,
        lmtp_port: int,
        authserv_id: str,
        keys: dict[str, DkimKey],
        records: dict[str, list[str]],
        dns_timeout: int = 2,
    ) -> AuthRig:
        """The rig's parts, not started; ``records`` maps a name to its TXT values."""
        dns = DnsServer()
        for name, values in records.items():
            dns.set_txt(name, *values)
        for key in keys.values():
            dns.set_txt(key.record_name, key.record)
        milters = AuthMilters(
            base_dir / "milters", dns, authserv_id=authserv_id, dns_timeout=dns_timeout
        )
        postfix = PostfixServer(
            base_dir / "postfix", lmtp_port=lmtp_port, milters=milters.milters, xclient=True
        )
        return cls(dns, milters, postfix, dict(keys))

    @property
    def authserv_id(self) -> str:
        """The id the milters write and the bridge must pin."""
        return self.milters.authserv_id

    def start(self) -> None:
        """DNS, then the milters, then Postfix (which refuses mail while a milter is missing)."""
        self.dns.start()
        self.milters.start()
        self.postfix.start()

    def stop(self) -> None:
        """Postfix, the milters, DNS, in that order."""
        self.postfix.stop()
        self.milters.stop()
        self.dns.stop()

    def sign(self, raw: bytes, domain: str) -> bytes:
        """``raw`` signed with the rig's key for ``domain`` (d=domain)."""
        return self.keys[domain].sign(raw)

    def send(
        self,
        raw: bytes,
        mail_from: str,
        rcpt: str,
        *,
        client_ip: str = CLIENT_IP,
        helo: str = "client.sender.test",
    ) -> None:
        """Hand ``raw`` to the rig's Postfix over SMTP, as-is (no header is added).

        The session claims (XCLIENT) to come from ``client_ip``: libspf2 passes every loopback
        client whatever the SPF record says, so SPF only means something for another address.
        Raises ``smtplib.SMTPResponseException`` when Postfix (or a milter) refuses the mail.
        """
        with smtplib.SMTP(self.postfix.host, self.postfix.smtp_port, timeout=30) as smtp:
            smtp.ehlo()
            code, reply = smtp.docmd("XCLIENT", f"ADDR={client_ip} NAME=[UNAVAILABLE] HELO={helo}")
            if code != 220:
                raise smtplib.SMTPResponseException(code, reply)
            smtp.ehlo(helo)
            smtp.sendmail(mail_from, [rcpt], raw)


def find_delivered(maildir: Path, message_id: str, timeout: float = 20) -> bytes:
    """The raw mail in ``maildir`` (new/ or cur/) whose Message-ID is ``message_id``."""
    deadline = time.monotonic() + timeout
    while True:
        for sub in ("new", "cur"):
            for path in sorted((maildir / sub).glob("*")):
                raw = path.read_bytes()
                parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
                if (parsed.get("Message-ID") or "").strip() == message_id:
                    return raw
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message_id} not delivered to {maildir} within {timeout} s")
        time.sleep(0.05)
