"""RFC 3461 xtext and XCLIENT/XFORWARD attribute lists."""

from __future__ import annotations

import pytest

from filter.xtext import format_attributes, parse_attributes, xtext_decode, xtext_encode

ENCODE = [
    ("", ""),
    ("mx.example.org", "mx.example.org"),
    ("a+b", "a+2Bb"),
    ("a=b", "a+3Db"),
    ("two words", "two+20words"),
    ("tab\there", "tab+09here"),
    ("cr\r\nlf", "cr+0D+0Alf"),
    ("\x7f", "+7F"),
    ("[UNAVAILABLE]", "[UNAVAILABLE]"),
    ("!~", "!~"),
    ("é", "+C3+A9"),
    ("IPV6:2001:db8::1", "IPV6:2001:db8::1"),
]


@pytest.mark.parametrize(("plain", "encoded"), ENCODE)
def test_encode(plain: str, encoded: str) -> None:
    assert xtext_encode(plain) == encoded


@pytest.mark.parametrize(("plain", "encoded"), ENCODE)
def test_decode_round_trip(plain: str, encoded: str) -> None:
    assert xtext_decode(encoded) == plain


def test_every_byte_round_trips() -> None:
    text = "".join(chr(c) for c in range(128))
    encoded = xtext_encode(text)
    assert all(0x21 <= ord(c) <= 0x7E and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


def test_decode_accepts_lower_case_hex() -> None:
    assert xtext_decode("a+2bb") == "a+b"


@pytest.mark.parametrize(
    "bad",
    [
        "+",
        "+2",
        "abc+",
        "+G0",
        "+ 2",
        "+-1",
        "a b",
        "a=b",
        "tab\t",
        "new\nline",
        "é",
        "+FF",  # not UTF-8 on its own
        "+C3",  # truncated UTF-8 sequence
    ],
)
def test_decode_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


def test_parse_attributes() -> None:
    got = parse_attributes("name=mx.example.org  ADDR=192.0.2.1\tHELO=a+20b PROTO=ESMTP")
    assert got == {
        "NAME": "mx.example.org",
        "ADDR": "192.0.2.1",
        "HELO": "a b",
        "PROTO": "ESMTP",
    }


def test_parse_attributes_empty_value_and_empty_arg() -> None:
    assert parse_attributes("IDENT=") == {"IDENT": ""}
    assert parse_attributes("") == {}
    assert parse_attributes("   ") == {}


def test_parse_attributes_value_may_contain_encoded_equals() -> None:
    assert parse_attributes("HELO=a+3Db") == {"HELO": "a=b"}


@pytest.mark.parametrize(
    "bad",
    [
        "NAME",
        "=foo",
        "NAME=a=b",
        "NAME=+4",
        "1NAME=x",
        "NA.ME=x",
        "NAME=x name=y",
        "NAME=x\x0bADDR=y",
        "NAME=x\nADDR=y",
    ],
)
def test_parse_attributes_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_attributes(bad)


def test_format_attributes() -> None:
    out = format_attributes({"addr": "192.0.2.1", "HELO": "evil HELO=x", "NAME": "[UNAVAILABLE]"})
    assert out == ["ADDR=192.0.2.1", "HELO=evil+20HELO+3Dx", "NAME=[UNAVAILABLE]"]
    assert parse_attributes(" ".join(out)) == {
        "ADDR": "192.0.2.1",
        "HELO": "evil HELO=x",
        "NAME": "[UNAVAILABLE]",
    }


@pytest.mark.parametrize("bad", ["", "A B", "A=B", "1A", "A\r\n"])
def test_format_attributes_bad_name(bad: str) -> None:
    with pytest.raises(ValueError):
        format_attributes({bad: "x"})
