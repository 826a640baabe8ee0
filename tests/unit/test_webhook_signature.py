"""Standard Webhooks signatures: signing, verifying, rotation, stale timestamps."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.webhooks.signature import SignatureError, decode_secret, sign, verify, verify_headers

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1_700_000_000


def check(signature: str, body: bytes = b'{"text":"hi"}', **kw: object) -> int:
    args: dict[str, object] = {
        "webhook_id": "msg_1",
        "timestamp": str(NOW),
        "signature": signature,
        "body": body,
        "now": NOW,
        "tolerance": 300,
    }
    args.update(kw)
    return verify(KEY, **args)  # type: ignore[arg-type]


def test_secret_decodes() -> None:
    assert decode_secret(SECRET) == KEY


@pytest.mark.parametrize(
    "secret", ["", "whsec_", "KEY" + SECRET, "whsec_not base64!", "whsec_" + "QUFB", SECRET + "="]
)
def test_bad_secrets_refused(secret: str) -> None:
    with pytest.raises(ValueError, match=r"whsec_|bytes"):
        decode_secret(secret)


def test_known_vector() -> None:
    # The Standard Webhooks reference vector.
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert (
        sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_valid_signature_gives_timestamp() -> None:
    assert check(sign(KEY, "msg_1", NOW, b'{"text":"hi"}')) == NOW


def test_rotation_one_valid_of_several() -> None:
    good = sign(KEY, "msg_1", NOW, b'{"text":"hi"}')
    other = sign(b"x" * 32, "msg_1", NOW, b'{"text":"hi"}')
    assert check(f"{other} {good}") == NOW


@pytest.mark.parametrize("delta", [-301, 301, 10_000])
def test_stale_or_future_timestamp(delta: int) -> None:
    sig = sign(KEY, "msg_1", NOW + delta, b'{"text":"hi"}')
    with pytest.raises(SignatureError, match="too far"):
        check(sig, timestamp=str(NOW + delta))


@pytest.mark.parametrize(
    "headers",
    [
        {"webhook_id": None},
        {"timestamp": None},
        {"signature": None},
        {"timestamp": "abc"},
        {"timestamp": "0" + str(NOW)},
        {"webhook_id": "with space"},
        {"signature": "v1,AAAA " * 9},
    ],
)
def test_malformed_headers(headers: dict[str, object]) -> None:
    args = {"signature": sign(KEY, "msg_1", NOW, b'{"text":"hi"}'), **headers}
    with pytest.raises(SignatureError):
        check(**args)  # type: ignore[arg-type]


def test_other_version_or_key_refused() -> None:
    mac = sign(KEY, "msg_1", NOW, b'{"text":"hi"}').split(",", 1)[1]
    with pytest.raises(SignatureError):
        check("v2," + mac)
    with pytest.raises(SignatureError):
        check(sign(b"y" * 32, "msg_1", NOW, b'{"text":"hi"}'))


ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
keys = st.binary(min_size=16, max_size=64)


@given(key=keys, webhook_id=ids, body=st.binary(max_size=200), skew=st.integers(-300, 300))
def test_round_trip(key: bytes, webhook_id: str, body: bytes, skew: int) -> None:
    sig = sign(key, webhook_id, NOW, body)
    got = verify(
        key,
        webhook_id=webhook_id,
        timestamp=str(NOW),
        signature=sig,
        body=body,
        now=NOW + skew,
        tolerance=300,
    )
    assert got == NOW


@given(key=keys, body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_flipped_byte_fails(key: bytes, body: bytes, data: st.DataObject) -> None:
    sig = sign(key, "msg_1", NOW, body)
    which = data.draw(st.sampled_from(["body", "signature", "id", "key"]))
    bit = data.draw(st.integers(0, 7))
    webhook_id = "msg_1"
    if which == "body":
        i = data.draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ (1 << bit)]) + body[i + 1 :]
    elif which == "signature":
        raw = bytearray(base64.b64decode(sig[3:]))
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << bit
        sig = "v1," + base64.b64encode(bytes(raw)).decode()
    elif which == "id":
        webhook_id = "msg_2"
    else:
        i = data.draw(st.integers(0, len(key) - 1))
        key = key[:i] + bytes([key[i] ^ (1 << bit)]) + key[i + 1 :]
    with pytest.raises(SignatureError):
        verify(
            key,
            webhook_id=webhook_id,
            timestamp=str(NOW),
            signature=sig,
            body=body,
            now=NOW,
            tolerance=300,
        )


def test_verify_headers_reads_the_three_headers_in_any_case() -> None:
    key, body = b"k" * 32, b'{"type":"message.created"}'
    signature = sign(key, "msg_1", 1_700_000_000, body)
    headers = {
        "Webhook-Id": "msg_1",
        "WEBHOOK-TIMESTAMP": "1700000000",
        "webhook-signature": signature,
    }
    assert verify_headers(key, headers, body, now=1_700_000_010, tolerance=60) == 1_700_000_000
    with pytest.raises(SignatureError):
        verify_headers(key, headers, body + b" ", now=1_700_000_010, tolerance=60)
    with pytest.raises(SignatureError):
        verify_headers(key, {"webhook-id": "msg_1"}, body, now=1_700_000_010, tolerance=60)
