"""DATA transparency: end of data, dot-stuffing, size and line limits, SMTP smuggling."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from filter.smtpdata import FLUSH_LONG_LINE_AT, DataReader, Stuffer, stuff

LEFTOVER = b"MAIL FROM:<next@example.org>\r\nQUIT\r\n"


def read(
    chunks: Iterable[bytes], max_size: int = 10_000_000, max_line: int = 998
) -> tuple[DataReader, bytes, bytes]:
    """Feed chunks until done; return (reader, content, leftover incl. unfed chunks)."""
    reader = DataReader(max_size, max_line)
    content = bytearray()
    rest = bytearray()
    for chunk in chunks:
        if reader.done:
            rest += chunk  # a real front end keeps these as the next commands
            continue
        content += reader.feed(chunk)
    return reader, bytes(content), reader.leftover + bytes(rest)


def random_chunks(data: bytes, rng: random.Random, max_chunk: int = 17) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_chunk)
        out.append(data[i : i + n])
        i += n
    return out


# -- plain cases ------------------------------------------------------------------------------
# (wire bytes after "354", expected content); every case ends with LEFTOVER.
CASES = [
    ("empty message", b".\r\n", b""),
    ("single line", b"hello\r\n.\r\n", b"hello\r\n"),
    ("empty line", b"\r\n.\r\n", b"\r\n"),
    ("headers and body", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n"),
    ("stuffed dot line", b"..\r\n.\r\n", b".\r\n"),
    ("stuffed dot first", b"..hidden\r\n.\r\n", b".hidden\r\n"),
    ("stuffed double dot", b"...\r\n.\r\n", b"..\r\n"),
    ("stuffed dot later", b"a\r\n..b\r\n...c\r\n.\r\n", b"a\r\n.b\r\n..c\r\n"),
    ("dot inside line", b"a.b\r\na.\r\n.\r\n", b"a.b\r\na.\r\n"),
    ("stuffed end lookalike", b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
]


@pytest.mark.parametrize(("wire", "content"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_whole(wire: bytes, content: bytes) -> None:
    reader, got, leftover = read([wire + LEFTOVER])
    assert reader.done
    assert not reader.failed
    assert got == content
    assert leftover == LEFTOVER
    assert reader.size == len(content)


@pytest.mark.parametrize(("wire", "content"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_split_at_every_position(wire: bytes, content: bytes) -> None:
    data = wire + LEFTOVER
    for i in range(len(data) + 1):
        reader, got, leftover = read([data[:i], data[i:]])
        assert reader.done, i
        assert not reader.failed, i
        assert (got, leftover) == (content, LEFTOVER), i


@pytest.mark.parametrize(("wire", "content"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_byte_by_byte(wire: bytes, content: bytes) -> None:
    data = wire + LEFTOVER
    reader, got, leftover = read(data[i : i + 1] for i in range(len(data)))
    assert (got, leftover) == (content, LEFTOVER)
    assert not reader.failed


def test_end_mark_split_in_three_everywhere() -> None:
    data = b"line one\r\n..two\r\n.\r\nRSET\r\n"
    end = data.index(b"\r\n.\r\n", 10)
    for i in range(end - 2, end + 6):
        for j in range(i, end + 7):
            reader, got, leftover = read([data[:i], data[i:j], data[j:]])
            assert got == b"line one\r\n.two\r\n", (i, j)
            assert leftover == b"RSET\r\n", (i, j)
            assert not reader.failed


def test_not_done_without_end_mark() -> None:
    reader = DataReader(1000)
    for chunk in (b"a\r\n", b".\r", b"x\r\n", b"\r\n.", b"\r"):
        reader.feed(chunk)
        assert not reader.done
    reader.feed(b"\n")
    assert reader.done


def test_feed_after_done_raises() -> None:
    reader = DataReader(1000)
    reader.feed(b".\r\n")
    assert reader.done
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_leftover_exact_including_pipelined_data() -> None:
    tail = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"
    reader, got, leftover = read([b"m\r\n.\r\n" + tail])
    assert not reader.failed
    assert got == b"m\r\n"
    assert leftover == tail  # the second message's end mark is not ours


# -- size ------------------------------------------------------------------------------------
def test_size_exactly_at_limit_is_fine() -> None:
    content = b"x" * 98 + b"\r\n"
    reader, got, _ = read([content + b".\r\n"], max_size=100)
    assert not reader.problems.oversized
    assert got == content


def test_oversized_discards_but_reads_to_the_end() -> None:
    content = b"".join(b"%04d" % i + b"y" * 44 + b"\r\n" for i in range(200))  # 10_000 bytes
    wire = stuff(content) + b".\r\n" + LEFTOVER
    for seed in range(20):
        rng = random.Random(seed)
        reader, got, leftover = read(random_chunks(wire, rng, 300), max_size=1000)
        assert reader.done
        assert reader.problems.oversized
        assert reader.failed
        assert not reader.problems.bare_newline
        assert not reader.problems.long_line
        assert len(got) <= 1000
        assert content.startswith(got)
        assert leftover == LEFTOVER
        assert reader.size == len(content)  # discarded bytes are still counted


# -- long lines ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "long"),
    [
        (b"x" * 998, False),
        (b"x" * 999, True),
        (b"." + b"x" * 997, False),  # 998 content bytes; the stuffing dot does not count
        (b"." + b"x" * 998, True),
        (b"." * 998, False),
    ],
)
def test_line_limit(line: bytes, long: bool) -> None:
    content = b"short\r\n" + line + b"\r\nafter\r\n"
    wire = stuff(content) + b".\r\n" + LEFTOVER
    for seed in range(5):
        reader, got, leftover = read(random_chunks(wire, random.Random(seed), 400))
        assert reader.problems.long_line is long
        assert leftover == LEFTOVER
        if not long:
            assert got == content


def test_long_last_line_before_end() -> None:
    reader, _, leftover = read([b"x" * 1200 + b"\r\n.\r\n" + LEFTOVER])
    assert reader.problems.long_line
    assert leftover == LEFTOVER


def test_long_line_flushed_in_pieces() -> None:
    reader = DataReader(10_000_000)
    for _ in range(5):
        assert reader.feed(b"x" * 40_000) == b""  # no CRLF for 200 KB
    assert reader.problems.long_line
    reader.feed(b"\r\nnext\r\n.\r\n" + LEFTOVER)
    assert reader.done
    assert reader.leftover == LEFTOVER
    assert not reader.problems.bare_newline


def test_long_line_flush_keeps_a_trailing_cr() -> None:
    reader = DataReader(10_000_000)
    reader.feed(b"x" * (FLUSH_LONG_LINE_AT + 10) + b"\r")
    reader.feed(b"\n.\r\nQUIT\r\n")
    assert reader.done
    assert reader.leftover == b"QUIT\r\n"
    assert reader.problems.long_line
    assert not reader.problems.bare_newline  # the CRLF split over two reads is one CRLF


@pytest.mark.parametrize(("length", "long"), [(150_000, False), (150_001, True)])
def test_line_length_counted_across_flushed_pieces(length: int, long: bool) -> None:
    # With a limit above the flush size, a line flushed in pieces is measured as a whole.
    for first_line in (b"", b"head\r\n"):
        reader = DataReader(10_000_000, max_line=150_000)
        out = bytearray(reader.feed(first_line))
        remaining = length
        while remaining:
            n = min(70_000, remaining)
            out += reader.feed(b"y" * n)
            remaining -= n
        out += reader.feed(b"\r\n.\r\n")
        assert reader.done
        assert reader.problems.long_line is long, first_line
        if not long:
            assert bytes(out) == first_line + b"y" * length + b"\r\n"


# -- SMTP smuggling ----------------------------------------------------------------------------
SMUGGLING = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r", b"\n"]
SECOND = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("bad", SMUGGLING, ids=[repr(b) for b in SMUGGLING])
def test_smuggling_variants(bad: bytes) -> None:
    wire = b"From: a@example.org\r\n\r\nfirst" + bad + SECOND + b".\r\n" + LEFTOVER
    first_end = wire.index(b"\r\n.\r\n")
    for i in range(len(wire) + 1):
        reader, _, leftover = read([wire[:i], wire[i:]])
        assert reader.done, i
        assert reader.problems.bare_newline, i
        assert reader.failed
        # The first real <CRLF>.<CRLF> is the only end: nothing after it is message.
        assert leftover == wire[first_end + 5 :] == LEFTOVER, i


@pytest.mark.parametrize("bare", [b"\r", b"\n"])
def test_bare_newline_anywhere(bare: bytes) -> None:
    content = b"ab\r\n\r\ncd\r\nef\r\n"
    for i in range(len(content) + 1):
        # A last line after the bare one, so the bare byte never touches the end mark.
        data = content[:i] + bare + content[i:] + b"z\r\n.\r\n" + LEFTOVER
        for seed in range(3):
            chunks = random_chunks(data, random.Random(seed), 5)
            reader, got, leftover = read(chunks)
            assert reader.done, (i, seed)
            assert reader.problems.bare_newline, (i, seed)
            assert leftover == LEFTOVER, (i, seed)
            assert bare not in got.replace(b"\r\n", b""), (i, seed)


def test_bare_lf_dot_lf_is_not_an_end() -> None:
    reader = DataReader(1000)
    reader.feed(b"a\n.\n")
    reader.feed(b"b\r\n")
    assert not reader.done
    reader.feed(b".\r\n")
    assert reader.done
    assert reader.problems.bare_newline


def test_content_after_problem_is_discarded() -> None:
    reader = DataReader(10_000)
    first = reader.feed(b"good line\r\nmore\r\n")
    assert first == b"good line\r\nmore"  # a line's CRLF comes with the next segment
    assert reader.feed(b"bad\nline\r\nlater\r\n") == b""
    assert reader.feed(b".\r\n") == b""
    assert reader.done and reader.problems.bare_newline


# -- round trip --------------------------------------------------------------------------------
def random_content(rng: random.Random) -> bytes:
    alphabet = [b".", b".", b"a", b"b", b" ", b"\t", b"\xc3\xa9", b"-"]
    lines = []
    for _ in range(rng.randint(0, 30)):
        length = rng.choice([0, 0, 1, 1, 2, 3, 5, 10, 40, 200])
        lines.append(b"".join(rng.choice(alphabet) for _ in range(length)))
    return b"".join(line + b"\r\n" for line in lines)


def test_stuff_then_read_round_trips() -> None:
    for seed in range(400):
        rng = random.Random(seed)
        content = random_content(rng)
        wire = stuff(content) + b".\r\n" + LEFTOVER
        assert b"\r\n.\r\n" not in b"\r\n" + stuff(content)  # no early end mark
        reader, got, leftover = read(random_chunks(wire, rng, rng.choice([1, 3, 7, 64, 4096])))
        assert reader.done, seed
        assert not reader.failed, seed
        assert got == content, seed
        assert leftover == LEFTOVER, seed
        assert reader.size == len(content), seed


STUFF = [
    (b"", b""),
    (b".", b".."),
    (b".\r\n", b"..\r\n"),
    (b"a\r\n.\r\n", b"a\r\n..\r\n"),
    (b"a.b\r\n..c\r\n", b"a.b\r\n...c\r\n"),
    (b"\r\n.", b"\r\n.."),
    (b"x\n.y", b"x\n.y"),  # only CRLF starts a line
]


@pytest.mark.parametrize(("plain", "stuffed"), STUFF)
def test_stuff_table(plain: bytes, stuffed: bytes) -> None:
    assert stuff(plain) == stuffed


def test_stuffer_in_chunks_equals_stuff_of_the_whole() -> None:
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b".."]
    for seed in range(1000):
        rng = random.Random(seed)
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stuffer = Stuffer()
        chunks = random_chunks(data, rng, rng.choice([1, 2, 3, 8]))
        if rng.random() < 0.3:
            chunks.insert(rng.randint(0, len(chunks)), b"")  # empty chunks change nothing
        assert b"".join(stuffer(c) for c in chunks) == stuff(data), (seed, chunks)


def test_stuffer_every_split_position() -> None:
    data = b".a\r\n.\r\n..\r\nb.\r\n\r\n.c\r\n"
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            stuffer = Stuffer()
            out = stuffer(data[:i]) + stuffer(data[i:j]) + stuffer(data[j:])
            assert out == stuff(data), (i, j)
