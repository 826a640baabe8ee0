"""Standard Webhooks signatures: HMAC-SHA256 over "{id}.{timestamp}.{body}", "v1,<base64>"."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64
MAX_SIGNATURES = 8  # more in one header is not rotation, it is guessing
_TIMESTAMP = re.compile(r"[1-9][0-9]{0,11}")
_WEBHOOK_ID = re.compile(r"[\x21-\x7e]{1,255}")


class SignatureError(Exception):
    """The request is not signed by the hook's secret; the text says why (never the secret)."""


def decode_secret(secret: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError if it is not of that form."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError(f"must be {SECRET_PREFIX} followed by base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes once decoded, "
            f"not {len(key)}"
        )
    return key


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The `v1,<base64>` signature of a message."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    mac = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def verify(
    key: bytes,
    *,
    webhook_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    tolerance: float,
) -> int:
    """Check the three headers against the body; the timestamp when one signature of the
    space-separated list is valid (rotation), else SignatureError."""
    if not webhook_id or not timestamp or not signature:
        raise SignatureError("webhook-id, webhook-timestamp and webhook-signature are required")
    if not _WEBHOOK_ID.fullmatch(webhook_id):
        raise SignatureError("webhook-id must be 1 to 255 printable ASCII characters")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SignatureError("webhook-timestamp must be seconds since the epoch")
    sent_at = int(timestamp)
    if abs(now - sent_at) > tolerance:
        raise SignatureError("webhook-timestamp is too far from the current time")
    expected = sign(key, webhook_id, timestamp, body).encode("ascii")
    candidates = signature.split(" ")
    if len(candidates) > MAX_SIGNATURES:
        raise SignatureError(f"webhook-signature holds more than {MAX_SIGNATURES} signatures")
    valid = False
    for candidate in candidates:
        # Every candidate is compared (no early exit), in constant time each.
        if hmac.compare_digest(candidate.encode("utf-8", "replace"), expected):
            valid = True
    if not valid:
        raise SignatureError("no valid v1 signature in webhook-signature")
    return sent_at


def verify_headers(
    key: bytes, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float
) -> int:
    """verify() with the three Standard Webhooks headers read from a request's headers (any
    letter case): what a receiver of the bridge's deliveries does."""
    lowered = {name.lower(): value for name, value in headers.items()}
    return verify(
        key,
        webhook_id=lowered.get("webhook-id"),
        timestamp=lowered.get("webhook-timestamp"),
        signature=lowered.get("webhook-signature"),
        body=body,
        now=now,
        tolerance=tolerance,
    )
