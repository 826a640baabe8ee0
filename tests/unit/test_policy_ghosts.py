"""Domain patterns match exactly; ghost localparts round-trip; display names are defanged."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.ghosts import (
    clean_display_name,
    decode_localpart,
    encode_localpart,
    ghost_display_name,
)
from bridge.core.policy import DomainPattern, domain_allowed

# --- DomainPattern ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain", "wildcard"),
    [
        ("gouv.fr", "gouv.fr", False),
        ("GOUV.FR", "gouv.fr", False),
        ("gouv.fr.", "gouv.fr", False),
        ("  gouv.fr  ", "gouv.fr", False),
        ("*.gouv.fr", "gouv.fr", True),
        ("*.Gouv.Fr.", "gouv.fr", True),
        ("préfecture.gouv.fr", "xn--prfecture-c4a.gouv.fr", False),
        ("*.PRÉFECTURE.gouv.fr", "xn--prfecture-c4a.gouv.fr", True),
        ("xn--prfecture-c4a.gouv.fr", "xn--prfecture-c4a.gouv.fr", False),
        ("ｇｏｕｖ。fr", "gouv.fr", False),  # UTS #46 maps fullwidth letters and dots
        ("*.fr", "fr", True),
    ],
)
def test_pattern_parse(text: str, domain: str, wildcard: bool) -> None:
    pattern = DomainPattern.parse(text)
    assert pattern == DomainPattern(domain=domain, wildcard=wildcard)
    assert str(pattern) == ("*." if wildcard else "") + domain


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ".",
        "*",
        "*.",
        "*.*.gouv.fr",
        "a.*.gouv.fr",
        "*gouv.fr",
        "gouv.*",
        "**.gouv.fr",
        "gouv..fr",
        ".gouv.fr",
        "gouv.fr..",
        "1.2.3.4",
        "*.1.2.3.4",
        "127.1",
        "[1.2.3.4]",
        "::1",
        "[IPv6:::1]",
        "gouv_x.fr",
        "-gouv.fr",
        "gouv fr",
        "xn--zz.fr",
        "a@gouv.fr",
        "gouv.fr\x00",
        "gouv\u202e.fr",
        "gouv\u00ad.fr",
        "g\u200bouv.fr",
        "a" * 64 + ".fr",
        "a." * 130 + "fr",
        "x" * 5000,
    ],
)
def test_pattern_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="domain") as info:
        DomainPattern.parse(text)
    assert str(info.value).isascii()
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("domain", ["GOUV.FR", "gouv.fr.", "", "*.gouv.fr", "préfecture.fr"])
def test_pattern_constructor_refuses_unnormalised(domain: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        DomainPattern(domain=domain)


def test_exact_pattern() -> None:
    gouv = DomainPattern.parse("gouv.fr")
    assert gouv.matches("gouv.fr")
    assert gouv.matches("GOUV.FR")
    assert gouv.matches("gouv.fr.")
    for other in [
        "a.gouv.fr",
        "evilgouv.fr",
        "gouv.fr.evil.com",
        "gouv.fr@evil.com",
        "x@protonmail.com@gouv.fr",
        "gouv.f",
        "ouv.fr",
        "",
        "gouv..fr",
        "gouv.fr\x00",
        "gouv.fr\n",
    ]:
        assert not gouv.matches(other), other


def test_wildcard_pattern() -> None:
    subdomains = DomainPattern.parse("*.gouv.fr")
    assert subdomains.matches("a.gouv.fr")
    assert subdomains.matches("x.y.gouv.fr")
    assert subdomains.matches("Interieur.GOUV.fr")
    assert subdomains.matches("préfecture.gouv.fr")
    assert subdomains.matches("xn--prfecture-c4a.gouv.fr")
    for other in [
        "gouv.fr",
        "evilgouv.fr",
        "a.evilgouv.fr",
        "gouv.fr.evil.com",
        "a.gouv.fr.evil.com",
        ".gouv.fr",
        "..gouv.fr",
        "a..gouv.fr",
        "a_b.gouv.fr",
        "*.gouv.fr",
        "a.gouv.fr@evil.com",
        "1.2.gouv.fr.1",
    ]:
        assert not subdomains.matches(other), other


def test_unencodable_domains_never_match() -> None:
    patterns = [DomainPattern.parse("gouv.fr"), DomainPattern.parse("*.gouv.fr")]
    for domain in [
        "\ud800.gouv.fr",
        "xn--zz.gouv.fr",
        "a b.gouv.fr",
        " a.gouv.fr",
        # UTS #46 would delete these and see "a.gouv.fr"; they are refused instead.
        "a\u200b.gouv.fr",
        "a\u00ad.gouv.fr",
        "a\ufe0f.gouv.fr",
        "a\u3164.gouv.fr",
        "a\u2060.gouv.fr",
        "a\U000e0100.gouv.fr",
    ]:
        assert not domain_allowed(domain, patterns), ascii(domain)


def test_domain_allowed() -> None:
    patterns = [DomainPattern.parse("gouv.fr"), DomainPattern.parse("*.interieur.gouv.fr")]
    assert domain_allowed("gouv.fr", patterns)
    assert domain_allowed("dgsi.interieur.gouv.fr", patterns)
    assert not domain_allowed("interieur.gouv.fr", patterns)
    assert not domain_allowed("justice.gouv.fr", patterns)
    assert not domain_allowed("gouv.fr.evil.com", patterns)
    assert not domain_allowed("gouv.fr", [])


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LABEL, min_size=1, max_size=4), st.lists(_LABEL, min_size=0, max_size=3))
def test_wildcard_is_a_label_boundary(base: list[str], prefix: list[str]) -> None:
    base_domain = ".".join([*base, "fr"])
    exact = DomainPattern.parse(base_domain)
    wildcard = DomainPattern.parse("*." + base_domain)
    candidate = ".".join([*prefix, base_domain])
    assert exact.matches(candidate) == (not prefix)
    assert wildcard.matches(candidate) == bool(prefix)
    # Gluing characters onto the first label never crosses the boundary.
    glued = "evil" + base_domain
    assert not exact.matches(glued)
    assert not wildcard.matches(glued)


# --- ghost localparts ------------------------------------------------------------------------

_LOCALPART = re.compile(r"[a-z0-9._=/+-]*")


@pytest.mark.parametrize(
    ("address", "localpart"),
    [
        ("agent@gouv.fr", "agent=40gouv.fr"),
        ("Agent@gouv.fr", "=41gent=40gouv.fr"),
        ("a=b@gouv.fr", "a=3db=40gouv.fr"),
        ("a+tag@gouv.fr", "a=2btag=40gouv.fr"),
        ("a/b", "a=2fb"),
        ("élodie@x.fr", "=c3=a9lodie=40x.fr"),
        ("😀", "=f0=9f=98=80"),
        ("", ""),
        ("a_b", "a_b"),
        (" ", "=20"),
        ("\x00", "=00"),
    ],
)
def test_encode_localpart(address: str, localpart: str) -> None:
    assert encode_localpart(address) == localpart
    assert decode_localpart(localpart) == address


@pytest.mark.parametrize(
    "localpart",
    [
        "=61gent",  # "a" must be literal
        "=2e",  # "." must be literal
        "=2d",  # "-" must be literal
        "=4A",  # uppercase hex
        "=4",  # truncated escape
        "=",
        "a=",
        "=zz",
        "Agent",  # uppercase is always escaped
        "a+b",  # allowed by Matrix, never produced by encode
        "a/b",
        "a@b",
        "a b",
        "=c3",  # truncated UTF-8
        "=c3=28",  # invalid UTF-8
        "=c0=80",  # overlong NUL
        "=f4=90=80=80",  # beyond U+10FFFF
        "=ff",
        "é",
    ],
)
def test_decode_localpart_rejects(localpart: str) -> None:
    with pytest.raises(ValueError, match=r"ghost localpart|canonical|UTF-8"):
        decode_localpart(localpart)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_localpart_round_trip(address: str) -> None:
    localpart = encode_localpart(address)
    assert _LOCALPART.fullmatch(localpart)
    assert decode_localpart(localpart) == address


def test_localpart_round_trip_lone_surrogates() -> None:
    for text in ["\ud800", "\udfff", "a\ud83d\ude00b", "\U0001f600"]:
        assert decode_localpart(encode_localpart(text)) == text
    assert encode_localpart("\ud83d\ude00") != encode_localpart("\U0001f600")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._=/+-ABCDEF", max_size=12))
def test_decode_accepts_only_encode_output(localpart: str) -> None:
    try:
        address = decode_localpart(localpart)
    except ValueError:
        return
    assert encode_localpart(address) == localpart


def test_encoding_is_injective_on_lookalikes() -> None:
    addresses = ["agent@gouv.fr", "Agent@gouv.fr", "agent=40gouv.fr", "agent@gouv.fr."]
    assert len({encode_localpart(a) for a in addresses}) == len(addresses)


# --- display names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        ("Jean Dupont", "Jean Dupont"),
        ("  Jean   Dupont  ", "Jean Dupont"),
        ("Jean\nDupont", "Jean Dupont"),
        ("Jean\r\nBcc: x@evil.com", "Jean Bcc: x@evil.com"),
        ("Jean\tDupont", "Jean Dupont"),
        ("Jean\u2028Dupont\u2029", "Jean Dupont"),
        ("Jean\u00a0Dupont", "Jean Dupont"),
        ("Jean\u3000Dupont", "Jean Dupont"),
        ("Jean\x00\x1b[31mDupont", "Jean[31mDupont"),
        ("Jean\x7f\x85Dupont", "Jean Dupont"),
        ("Jean\u202eDupont\u202c", "JeanDupont"),
        ("\u202a\u202b\u202c\u202d\u202eJean", "Jean"),
        ("\u2066\u2067\u2068Jean\u2069", "Jean"),
        ("J\u200be\u200ca\u200dn\u200e\u200f", "Jean"),
        ("\ufeffJean\u2060", "Jean"),
        ("Jean\U000e0041\U000e007f", "Jean"),
        ("Jean\ue000\U000f0000", "Jean"),
        ("Jean\ud800", "Jean"),
        ("Jean\u3164\u115f\u2800", "Jean"),
        ("e\u0301lodie", "élodie"),
        ("\u0301Jean", "Jean"),
        ("Z" + "\u0336" * 50, "Z" + "\u0336" * 4),
        ("", ""),
        ("   ", ""),
        ("\u202e\u200b\x00\n", ""),
        ("\u3164", ""),
        ("日本 政府", "日本 政府"),
    ],
)
def test_clean_display_name(name: str, clean: str) -> None:
    assert clean_display_name(name) == clean


def test_clean_display_name_truncates() -> None:
    assert clean_display_name("a" * 10_000) == "a" * 100
    assert clean_display_name("a" * 10_000, max_length=10) == "a" * 10
    assert clean_display_name("abc", max_length=0) == ""
    with pytest.raises(ValueError, match="max_length"):
        clean_display_name("abc", max_length=-1)
    # The space before the cut is stripped.
    assert clean_display_name("abcd efgh", max_length=5) == "abcd"


def test_truncation_keeps_clusters_whole() -> None:
    # "a" + 3 combining marks with no precomposed form: never keep "a" without its marks.
    cluster = "q\u0301\u0323\u0304"
    name = "x" * 98 + cluster
    assert clean_display_name(name) == "x" * 98
    # Flags are pairs of regional indicators: never keep half a flag.
    flag = "\U0001f1eb\U0001f1f7"
    assert clean_display_name("x" + flag * 3, max_length=4) == "x" + flag
    assert clean_display_name(flag * 3, max_length=5) == flag * 2
    # Skin-tone modifiers stay with their emoji.
    assert clean_display_name("xx\U0001f44d\U0001f3fd", max_length=3) == "xx"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())), st.integers(0, 120))
def test_clean_display_name_properties(name: str, max_length: int) -> None:
    clean = clean_display_name(name, max_length)
    assert len(clean) <= max_length
    assert clean == clean.strip()
    assert "  " not in clean
    for char in clean:
        assert char == " " or not char.isspace()
        assert char not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\u200e"
        assert char.isprintable()
    assert clean_display_name(clean, max_length) == clean


# --- ghost display names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "address", "shown"),
    [
        ("Jean Dupont", "jean@gouv.fr", "Jean Dupont (jean@gouv.fr)"),
        ("", "x@evil.com", "x@evil.com"),
        ("\u202e\u200b", "x@evil.com", "x@evil.com"),
        ("agent@gouv.fr", "x@evil.com", "x@evil.com"),
        ("Agent <agent@gouv.fr>", "x@evil.com", "x@evil.com"),
        ("agent\uff20gouv.fr", "x@evil.com", "x@evil.com"),  # FULLWIDTH COMMERCIAL AT
        ("agent\ufe6bgouv.fr", "x@evil.com", "x@evil.com"),  # SMALL COMMERCIAL AT
        ("agent\u200b@\u200bgouv.fr", "x@evil.com", "x@evil.com"),
        ("Jean\u202e moc.live@x", "x@evil.com", "x@evil.com"),
        ("Jean\nDupont", "jean@gouv.fr", "Jean Dupont (jean@gouv.fr)"),
    ],
)
def test_ghost_display_name(name: str, address: str, shown: str) -> None:
    assert ghost_display_name(name, address) == shown
