"""relay.parse_reply and UpstreamCapabilities: the upstream's replies, kept faithfully."""

from __future__ import annotations

import pytest

from filter.relay import REPLY_LINE_OCTETS, UpstreamCapabilities, parse_reply, printable
from filter.replies import Reply


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"220 mx.example.org ESMTP Postfix\r\n"], Reply(220, "", "mx.example.org ESMTP Postfix")),
        ([b"250 2.0.0 Ok: queued as 4ABC\r\n"], Reply(250, "2.0.0", "Ok: queued as 4ABC")),
        (
            [b"550 5.1.1 <x@example.org>: Recipient address rejected: User unknown\r\n"],
            Reply(550, "5.1.1", "<x@example.org>: Recipient address rejected: User unknown"),
        ),
        (
            [b"451-4.3.0 first\r\n", b"451-4.3.0 second\r\n", b"451 4.3.0 third\r\n"],
            Reply(451, "4.3.0", "first\nsecond\nthird"),
        ),
        ([b"250-a\r\n", b"250 b\r\n"], Reply(250, "", "a\nb")),
        # A status whose class does not match the code is not a status: text kept.
        ([b"550 4.1.1 odd\r\n"], Reply(550, "", "4.1.1 odd")),
        ([b"250 5.0.0 odd\r\n"], Reply(250, "", "5.0.0 odd")),
        (
            [b"354 End data with <CR><LF>.<CR><LF>\r\n"],
            Reply(354, "", "End data with <CR><LF>.<CR><LF>"),
        ),
        ([b"354 3.0.0 go\r\n"], Reply(354, "", "3.0.0 go")),  # no 3.x.x class in RFC 3463
        ([b"250 2.0.0\r\n"], Reply(250, "2.0.0", "")),  # a status without text
        ([b"250 2.0.0a text\r\n"], Reply(250, "", "2.0.0a text")),
        ([b"250 2.1000.0 x\r\n"], Reply(250, "", "2.1000.0 x")),
        ([b"250\r\n"], Reply(250, "", "")),
        ([b"250 \r\n"], Reply(250, "", "")),
        ([b"250 Ok\n"], Reply(250, "", "Ok")),
        ([b"554 5.7.1 caf\xc3\xa9 \xff\r\n"], Reply(554, "5.7.1", "café \ufffd")),
        ([b"250 ok  two  spaces \r\n"], Reply(250, "", "ok  two  spaces ")),
    ],
)
def test_parse_reply(lines: list[bytes], expected: Reply) -> None:
    assert parse_reply(lines) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # Terminal escapes, BEL, NUL, a bare CR: each becomes "?"; the rest is kept.
        (
            [b"250 2.1.0 \x1b[31mred\x07\x00nul\rcr\r\n"],
            Reply(250, "2.1.0", "?[31mred??nul?cr"),
        ),
        (
            [b"550 5.7.1 del\x7f c1\xc2\x9b\xc2\x85 ls\xe2\x80\xa8\r\n"],
            Reply(550, "5.7.1", "del? c1?? ls?"),
        ),
        ([b"250 tab\tkept\r\n"], Reply(250, "", "tab\tkept")),  # HT is reply text (RFC 5321 4.2)
        ([b"250-\x1b[2Jfirst\r\n", b"250 se\x00cond\r\n"], Reply(250, "", "?[2Jfirst\nse?cond")),
        ([b"250 2.0.0 caf\xc3\xa9\r\n"], Reply(250, "2.0.0", "café")),
    ],
)
def test_parse_reply_replaces_control_characters(lines: list[bytes], expected: Reply) -> None:
    assert parse_reply(lines) == expected


@pytest.mark.parametrize(
    "lines",
    [
        [b"550 5.1.1 " + b"x" * 3000 + b"\r\n"],
        [b"550 " + b"x" * 3000 + b"\r\n"],
        [b"451-4.3.0 " + "é".encode() * 1000 + b"\r\n", b"451 4.3.0 " + b"y" * 700 + b"\r\n"],
        [b"250-" + "\U0001f600".encode() * 300 + b"\r\n", b"250 ok\r\n"],
        [b"250 " + b"\xff" * 400 + b"\r\n"],  # each invalid byte grows to U+FFFD (3 octets)
    ],
)
def test_parsed_reply_lines_fit_512_octets_on_the_wire(lines: list[bytes]) -> None:
    """RFC 5321 4.5.3.1.5: code, text and CRLF in 512 octets, cut between characters."""
    reply = parse_reply(lines)
    wire = reply.to_bytes().split(b"\r\n")[:-1]
    assert len(wire) == len(lines)
    for out, original in zip(wire, lines, strict=True):
        assert len(out) + 2 <= REPLY_LINE_OCTETS
        out.decode("utf-8")  # never half a character
        assert out[:4] == original[:4]
    assert len(wire[0]) + 2 >= REPLY_LINE_OCTETS - 3  # cut, not dropped: as much as fits


def test_printable_keeps_short_text_and_cuts_long_text_at_a_character() -> None:
    assert printable("ok", 10) == "ok"
    assert printable("é" * 5, 10) == "é" * 5
    assert printable("é" * 6, 11) == "é" * 5
    assert printable("a\x1bb", 10) == "a?b"


def test_parse_reply_round_trips_our_own_wire_form() -> None:
    for reply in (
        Reply(250, "2.1.5", "Ok"),
        Reply(451, "4.7.1", "a\nb\nc"),
        Reply(250, "", "x\ny"),
    ):
        lines = reply.to_bytes().splitlines(keepends=True)
        assert parse_reply(lines) == reply


EHLO = [
    b"250-mx.example.org\r\n",
    b"250-PIPELINING\r\n",
    b"250-SIZE 10240000\r\n",
    b"250-ETRN\r\n",
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n",
    b"250-xforward name addr proto helo source\r\n",
    b"250-ENHANCEDSTATUSCODES\r\n",
    b"250-AUTH=PLAIN LOGIN\r\n",
    b"250-8BITMIME\r\n",
    b"250 SMTPUTF8\r\n",
]


def test_capabilities_from_ehlo() -> None:
    reply = parse_reply(EHLO)
    assert reply.code == 250
    caps = UpstreamCapabilities.from_reply(reply)
    assert "MX.EXAMPLE.ORG" not in caps.extensions  # the first line is the greeting name
    assert caps.extensions["SIZE"] == "10240000"
    assert caps.extensions["PIPELINING"] == ""
    for name in ("pipelining", "PIPELINING", "Size", "8bitmime", "SMTPUTF8", "XFORWARD"):
        assert caps.has(name), name
    assert not caps.has("STARTTLS")
    assert not caps.has("CHUNKING")
    assert caps.params("xclient") == {
        "NAME",
        "ADDR",
        "PROTO",
        "HELO",
        "REVERSE_NAME",
        "PORT",
        "LOGIN",
        "DESTADDR",
        "DESTPORT",
    }
    assert caps.params("XFORWARD") == {"NAME", "ADDR", "PROTO", "HELO", "SOURCE"}
    assert caps.params("SIZE") == {"10240000"}
    assert caps.params("PIPELINING") == set()
    assert caps.params("STARTTLS") == set()
    assert caps.has("AUTH=PLAIN")  # the old "AUTH=" form is a keyword of its own


def test_capabilities_of_a_one_line_ehlo() -> None:
    caps = UpstreamCapabilities.from_reply(parse_reply([b"250 mx.example.org\r\n"]))
    assert caps.extensions == {}
    assert not caps.has("SIZE")


def test_default_capabilities_are_empty() -> None:
    caps = UpstreamCapabilities()
    assert not caps.has("PIPELINING")
    assert caps.params("XCLIENT") == set()
