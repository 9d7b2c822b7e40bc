"""The reply catalogue: well-formed, and the contract's codes ("SMTP behaviour")."""

from __future__ import annotations

import re

import pytest

from filter import replies
from filter.replies import Reply

CATALOGUE = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
FACTORIES = {
    "banner": replies.banner("mx.example.org"),
    "closing": replies.closing("mx.example.org"),
    "syntax": replies.syntax("MAIL FROM:<address>"),
    "bad_parameter": replies.bad_parameter("FOO=1"),
    "greylisted": replies.greylisted(299.2),
}
ALL = {**CATALOGUE, **FACTORIES}
ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
WIRE_LINE = re.compile(rb"^\d{3}[- ][^\r\n]*\r\n$")


def test_catalogue_is_not_empty() -> None:
    assert len(CATALOGUE) > 30


@pytest.mark.parametrize("name", sorted(ALL))
def test_reply_is_well_formed(name: str) -> None:
    reply = ALL[name]
    assert 200 <= reply.code <= 599, name
    if reply.enhanced:
        m = ENHANCED.match(reply.enhanced)
        assert m is not None, f"{name}: bad enhanced status {reply.enhanced!r}"
        assert m.group(1) == str(reply.code)[0], f"{name}: {reply.code} vs {reply.enhanced}"
    wire = reply.to_bytes()
    lines = wire.splitlines(keepends=True)
    assert all(WIRE_LINE.match(line) for line in lines), wire
    assert all(line.startswith(str(reply.code).encode()) for line in lines)
    assert b"".join(lines) == wire


@pytest.mark.parametrize(
    ("name", "code", "enhanced"),
    [
        ("TOO_MANY_CONNECTIONS", 421, "4.7.0"),
        ("TOO_MANY_FROM_IP", 421, "4.7.0"),
        ("TIMEOUT", 421, "4.4.2"),
        ("MESSAGE_TOO_BIG", 552, "5.3.4"),
        ("TOO_MANY_RECIPIENTS", 452, "4.5.3"),
        ("GREYLISTED", 451, "4.7.1"),
        ("REJECT_DNSBL", 554, "5.7.1"),
        ("REJECT_SPAM", 550, "5.7.1"),
        ("REJECT_DMARC", 550, "5.7.1"),
        ("NOT_IMPLEMENTED", 502, "5.5.1"),
        ("UPSTREAM_UNAVAILABLE", 451, "4.3.0"),
    ],
)
def test_contract_codes(name: str, code: int, enhanced: str) -> None:
    reply = CATALOGUE[name]
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_bare_newline_in_data_is_a_5xx() -> None:
    assert replies.BARE_NEWLINE.is_permanent


def test_greylisted_keeps_the_code_and_rounds_up() -> None:
    r = replies.greylisted(299.2)
    assert (r.code, r.enhanced) == (451, "4.7.1")
    assert "300 seconds" in r.text
    assert "1 seconds" in replies.greylisted(0).text


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, "", "a\nb"), b"250-a\r\n250 b\r\n"),
        (Reply(250, "2.0.0", "a\nb"), b"250-2.0.0 a\r\n250 2.0.0 b\r\n"),
        (Reply(250, "", "one"), b"250 one\r\n"),
        (Reply(550, "5.7.1", "no"), b"550 5.7.1 no\r\n"),
        (Reply(250, "", "a\nb\nc"), b"250-a\r\n250-b\r\n250 c\r\n"),
        (Reply(354, "", "go ahead"), b"354 go ahead\r\n"),
    ],
)
def test_to_bytes(reply: Reply, wire: bytes) -> None:
    assert reply.to_bytes() == wire


def test_reply_helpers() -> None:
    r = Reply(451, "4.3.0", "a\nb")
    assert r.lines() == ["a", "b"]
    assert str(r) == "451 4.3.0 a / b"
    assert r.is_transient and not r.is_permanent and not r.is_positive
    assert r.code_class == "4xx"
    assert Reply(250, "", "").lines() == [""]
    assert replies.OK.is_positive and replies.REJECT_SPAM.is_permanent
    assert replies.OK.with_text("Queued") == Reply(250, "2.0.0", "Queued")
