"""VERP envelope senders: ``local+TOKEN@domain``, the token naming one outbox item.

The token is ``b<item id in base 36>-<10 base32 characters of an HMAC of that id>``: short,
only a-z, 0-9 and "-", and unforgeable without the bridge's secret, so a forged bounce cannot
name a mail of the bridge's choosing by guessing. (Whoever received the mail sees its
envelope sender in Return-Path and could replay it; a bounce is therefore only ever told next
to the one message the token names.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

DELIMITER = "+"
MAX_LOCALPART = 64  # RFC 5321: a longer local part may be refused on the way
_TOKEN = re.compile(r"b([0-9a-z]{1,13})-([a-z2-7]{10})")


def _check_secret(secret: bytes) -> None:
    if len(secret) < 16:
        raise ValueError("the VERP secret must be at least 16 bytes")


def _to36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text


def _mac(item_id: int, secret: bytes) -> str:
    digest = hmac.new(secret, f"verp:{item_id}".encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:10].lower()


def verp_token(item_id: int, secret: bytes) -> str:
    """The token naming outbox item `item_id` (a positive integer)."""
    _check_secret(secret)
    if item_id < 1 or item_id >= 36**13:
        raise ValueError("an outbox item id is a positive integer")
    return f"b{_to36(item_id)}-{_mac(item_id, secret)}"


def item_of_token(token: str, secret: bytes) -> int | None:
    """The outbox item a token names, or None for anything this bridge did not make."""
    _check_secret(secret)
    match = _TOKEN.fullmatch(token.lower())
    if match is None or match.group(1).startswith("0"):
        return None
    item_id = int(match.group(1), 36)
    if not hmac.compare_digest(_mac(item_id, secret), match.group(2)):
        return None
    return item_id


def verp_address(base: str, item_id: int, secret: bytes) -> str:
    """The envelope sender of item `item_id` sent from `base` (``local@domain``):
    ``local+TOKEN@domain``, or `base` itself when the token would make the local part longer
    than mail servers must accept."""
    local, at, domain = base.rpartition("@")
    if not at or not local:
        raise ValueError("the base must be an address local@domain")
    tagged = f"{local}{DELIMITER}{verp_token(item_id, secret)}"
    return base if len(tagged) > MAX_LOCALPART else f"{tagged}@{domain}"


def item_of_address(address: str, secret: bytes) -> int | None:
    """The outbox item named by the token of a VERP address (any base), or None."""
    local = address.strip().strip("<>").rpartition("@")[0]
    _, delimiter, token = local.rpartition(DELIMITER)
    if not delimiter or len(token) > 30:
        return None
    return item_of_token(token, secret)
