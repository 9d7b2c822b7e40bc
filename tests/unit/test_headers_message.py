"""Header block splitting, filtering and rendering; the spooling message buffer."""

from __future__ import annotations

import random
import re

import pytest

from filter.headers import (
    MAX_HEADER_BLOCK,
    field_value,
    filter_block,
    header_end,
    render_field,
    split_fields,
)
from filter.message import MessageBuffer

BLOCK = (
    b"Received: from a.example by b.example;\r\n"
    b"\tFri, 1 Jan 2027 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: a folded\r\n"
    b" subject line\r\n"
    b"\t  with a tab\r\n"
    b"this line has no colon\r\n"
    b"Authentication-Results: mx.example.org; spf=pass\r\n"
    b"AUTHENTICATION-RESULTS: mx.example.org;\r\n"
    b" dkim=pass\r\n"
    b"Authentication-Results-Extra: kept\r\n"
    b"X-Empty:\r\n"
    b"Name With Space : value\r\n"
)


# -- split_fields -------------------------------------------------------------------------------
def test_split_fields() -> None:
    fields = list(split_fields(BLOCK))
    assert fields == [
        (
            b"received",
            b"Received: from a.example by b.example;\r\n\tFri, 1 Jan 2027 00:00:00 +0000\r\n",
        ),
        (b"from", b"From: Alice <alice@example.org>\r\n"),
        (b"subject", b"Subject: a folded\r\n subject line\r\n\t  with a tab\r\n"),
        (b"", b"this line has no colon\r\n"),
        (b"authentication-results", b"Authentication-Results: mx.example.org; spf=pass\r\n"),
        (b"authentication-results", b"AUTHENTICATION-RESULTS: mx.example.org;\r\n dkim=pass\r\n"),
        (b"authentication-results-extra", b"Authentication-Results-Extra: kept\r\n"),
        (b"x-empty", b"X-Empty:\r\n"),
        (b"name with space", b"Name With Space : value\r\n"),
    ]
    assert b"".join(raw for _, raw in fields) == BLOCK  # lossless


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b"", []),
        (b"A: 1", [(b"a", b"A: 1")]),  # no final CRLF
        (b"A: 1\r\n b", [(b"a", b"A: 1\r\n b")]),
        (
            b" leading continuation\r\nA: 1\r\n",
            [(b"", b" leading continuation\r\n"), (b"a", b"A: 1\r\n")],
        ),
        (b": no name\r\n", [(b"", b": no name\r\n")]),
        (b"A:1\r\nB:2\r\n", [(b"a", b"A:1\r\n"), (b"b", b"B:2\r\n")]),
        (b"A: x: y\r\n", [(b"a", b"A: x: y\r\n")]),
    ],
)
def test_split_fields_edges(block: bytes, expected: list[tuple[bytes, bytes]]) -> None:
    assert list(split_fields(block)) == expected
    assert b"".join(raw for _, raw in split_fields(block)) == block


def test_field_value_unfolds() -> None:
    assert field_value(b"Subject: a folded\r\n subject line\r\n") == "a folded subject line"
    assert field_value(b"X: \xff\r\n") == "\ufffd"


# -- filter_block ---------------------------------------------------------------------------------
def test_filter_block_drops_exactly_the_named_fields() -> None:
    dropped: list[bytes] = []

    def drop(name: bytes, raw: bytes) -> bool:
        dropped.append(raw)
        return name == b"authentication-results"

    out = filter_block(BLOCK, drop)
    assert b"spf=pass" not in out
    assert b"dkim=pass" not in out  # the folded line goes with its field
    assert b"Authentication-Results-Extra: kept\r\n" in out
    expected = [raw for name, raw in split_fields(BLOCK) if name != b"authentication-results"]
    assert out == b"".join(expected)
    # Nameless lines are never offered to drop() and always kept.
    assert b"this line has no colon\r\n" in out
    assert b"this line has no colon\r\n" not in dropped


def test_filter_block_keeps_nameless_lines_even_when_dropping_all() -> None:
    assert filter_block(BLOCK, lambda n, r: True) == b"this line has no colon\r\n"
    assert filter_block(BLOCK, lambda n, r: False) == BLOCK


# -- render_field ---------------------------------------------------------------------------------
def _check_rendered(name: str, value: str, out: bytes) -> None:
    assert out.endswith(b"\r\n")
    lines = out[:-2].split(b"\r\n")
    for line in lines:
        # over 78 only when the line is one word that is itself longer (kept whole)
        assert len(line) < 78 or b" " not in line.strip(), line
        assert len(line) <= 998
        assert b"\r" not in line and b"\n" not in line
    for line in lines[1:]:
        assert line[:1] in (b" ", b"\t")  # continuation lines are folded whitespace
    # RFC 5322 unfolding removes the CRLFs only: a fold at a space keeps the space (a
    # tab there made "required=6<TAB>tests=" of X-Spam-Status); a CRLF+TAB marks a
    # forced split inside an overlong word and adds nothing of the value
    unfolded = out[:-2].replace(b"\r\n\t", b"").replace(b"\r\n", b"")
    assert unfolded == f"{name}: {value}".encode()
    assert list(split_fields(out)) == [(name.lower().encode(), out)]


def test_render_short_field() -> None:
    out = render_field("X-Spam-Score", "3.5")
    assert out == b"X-Spam-Score: 3.5\r\n"
    _check_rendered("X-Spam-Score", "3.5", out)


def test_render_long_field_folds() -> None:
    value = "Yes, score=16.2 required=6 tests=SPF_FAIL,DKIM_NONE " + " ".join(["word"] * 40)
    out = render_field("X-Spam-Status", value)
    assert out.count(b"\r\n") > 1
    _check_rendered("X-Spam-Status", value, out)


def test_render_keeps_a_comma_list_whole_on_its_line() -> None:
    # X-Spam-Status: the tests= list stays one word, so that after RFC 5322
    # unfolding no whitespace sits inside it (tests=(\\S+) reads every symbol).
    names = [f"SYMBOL_NUMBER_{i}" for i in range(12)]
    value = f"Yes, score=16.2 required=6 tests={','.join(names)}"
    out = render_field("X-Spam-Status", value)
    unfolded = out[:-2].replace(b"\r\n", b"").decode()
    m = re.search(r"tests=(\S+)", unfolded)
    assert m is not None and m.group(1).split(",") == names
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    _check_rendered("X-Spam-Status", value, out)


def test_render_splits_a_list_only_past_the_998_octet_limit() -> None:
    names = [f"SYMBOL_NUMBER_{i}" for i in range(80)]  # a ~1,300-character word
    out = render_field("X-Spam-Status", f"Yes, tests={','.join(names)}")
    lines = out[:-2].split(b"\r\n")
    assert len(lines) > 1 and all(len(line) <= 998 for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])
    unfolded = out[:-2].replace(b"\r\n", b"").decode()
    assert [n.strip() for n in unfolded.split("tests=")[1].split(",")] == names


def test_render_keeps_a_long_word_without_commas_whole() -> None:
    word = "x" * 90
    out = render_field("X-Test", f"a {word} b")
    assert out[:-2].split(b"\r\n") == [b"X-Test: a", b" " + word.encode(), b" b"]


def test_render_random_values_fold_under_78() -> None:
    rng = random.Random(7)
    for _ in range(300):
        words = ["x" * rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        value = " ".join(words)
        name = rng.choice(["X-Spam-Status", "Authentication-Results", "X"])
        _check_rendered(name, value, render_field(name, value))


# -- header_end ------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "end"),
    [
        (b"A: 1\r\n\r\nbody", 6),
        (b"\r\nbody", 0),
        (b"A: 1\r\n", None),
        (b"", None),
    ],
)
def test_header_end(content: bytes, end: int | None) -> None:
    assert header_end(content) == end


# -- MessageBuffer ---------------------------------------------------------------------------------
HEAD = b"From: a@example.org\r\nSubject: hi\r\n"


def write_all(buf: MessageBuffer, data: bytes, rng: random.Random | None = None) -> None:
    if rng is None:
        buf.write(data)
        return
    i = 0
    while i < len(data):
        n = rng.randint(0, 50)  # includes empty writes
        buf.write(data[i : i + n])
        i += n


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_header_block_with_body(seed: int | None) -> None:
    buf = MessageBuffer()
    data = HEAD + b"\r\nbody line\r\n"
    write_all(buf, data, None if seed is None else random.Random(seed))
    assert buf.header_block == HEAD
    assert [name for name, _ in buf.headers()] == [b"from", b"subject"]
    assert buf.size == len(data)
    assert buf.content() == data
    assert b"".join(buf.iter_chunks()) == data


@pytest.mark.parametrize("seed", [None, 4, 5])
def test_header_block_without_body(seed: int | None) -> None:
    buf = MessageBuffer()
    write_all(buf, HEAD, None if seed is None else random.Random(seed))
    assert buf.header_block == HEAD
    assert b"".join(buf.iter_chunks(prepend=b"X-New: 1\r\n")) == b"X-New: 1\r\n" + HEAD


def test_header_block_with_empty_body() -> None:
    buf = MessageBuffer()
    buf.write(HEAD + b"\r\n")
    assert buf.header_block == HEAD
    assert b"".join(buf.iter_chunks()) == HEAD + b"\r\n"


@pytest.mark.parametrize(
    "pieces", [[b"\r\nbody\r\n"], [b"\r", b"\nbody\r\n"], [b"\r", b"\n", b"b"]]
)
def test_message_starting_with_crlf_has_no_header(pieces: list[bytes]) -> None:
    buf = MessageBuffer()
    for p in pieces:
        buf.write(p)
    data = b"".join(pieces)
    assert buf.header_block == b""
    assert buf.headers() == []
    assert b"".join(buf.iter_chunks(prepend=b"X-New: 1\r\n")) == b"X-New: 1\r\n" + data


def test_empty_message() -> None:
    buf = MessageBuffer()
    assert buf.header_block == b""
    assert list(buf.iter_chunks()) == []
    assert b"".join(buf.iter_chunks(prepend=b"X: 1\r\n")) == b"X: 1\r\n"


def test_endless_header_is_bounded() -> None:
    buf = MessageBuffer(spool_threshold=4096)
    data = b"X-Long: " + b"a" * (MAX_HEADER_BLOCK + 100)  # no blank line, no CRLF
    buf.write(data)
    assert len(buf.header_block) == MAX_HEADER_BLOCK
    assert b"".join(buf.iter_chunks()) == data


@pytest.mark.parametrize("seed", range(8))
def test_spooled_message_iter_chunks(seed: int) -> None:
    rng = random.Random(seed)
    head = (
        b"Received: by x\r\n"
        b"Authentication-Results: mx.example.org; spf=fail\r\n"
        b" smtp.mailfrom=forged\r\n"
        + HEAD
        + b"authentication-results: other.example; dkim=pass\r\n"
    )
    body = b"".join(b"line %d " % i + b"z" * rng.randint(0, 200) + b"\r\n" for i in range(2000))
    data = head + b"\r\n" + body
    buf = MessageBuffer(spool_threshold=1000)
    write_all(buf, data, rng)
    assert buf._file._rolled  # type: ignore[attr-defined]  # spooled to disk
    assert buf.header_block == head
    prepend = b"X-Spam-Score: 1.0\r\nAuthentication-Results: mx.example.org; spf=pass\r\n"

    def drop(name: bytes, raw: bytes) -> bool:
        return name == b"authentication-results" and b"mx.example.org" in raw

    kept = b"Received: by x\r\n" + HEAD + b"authentication-results: other.example; dkim=pass\r\n"
    for _ in range(2):  # repeatable (a retry re-reads the spool)
        chunks = list(buf.iter_chunks(prepend, drop))
        assert b"".join(chunks) == prepend + kept + b"\r\n" + body
        assert max(len(c) for c in chunks[1:]) <= 64 * 1024
    # Writing after a read appends at the end.
    buf.write(b"tail\r\n")
    assert buf.content() == data + b"tail\r\n"
    assert buf.size == len(data) + 6
    buf.close()


def test_header_overflow_only_when_no_blank_line_within_the_limit() -> None:
    from filter.headers import MAX_HEADER_BLOCK

    field = b"X-Filler: " + b"x" * 60 + b"\r\n"
    fields = field * (MAX_HEADER_BLOCK // len(field) + 2)
    over = MessageBuffer()
    over.write(fields + b"\r\nbody\r\n")
    assert over.header_overflow and not over.header_complete
    fits = MessageBuffer()
    fits.write(field * 10 + b"\r\n" + b"y" * (2 * MAX_HEADER_BLOCK))
    assert not fits.header_overflow and fits.header_complete
    no_body = MessageBuffer()  # all header, no blank line, small: RFC 5322 allows it
    no_body.write(field * 10)
    assert not no_body.header_overflow
    for m in (over, fits, no_body):
        m.close()
