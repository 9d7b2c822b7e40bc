"""SMTP DATA transparency, sans I/O: find the end of the message, undo and redo dot-stuffing.

Why hand-written: the safety of a before-queue proxy rests on these ~100 lines. The
receiving side must (a) end DATA only at ``<CRLF>.<CRLF>``, (b) refuse any bare CR or
LF, because the upstream may read ``<LF>.<LF>`` as an end of data and a second,
smuggled message would follow (SMTP smuggling, 2023), and (c) read in bulk, not a
line at a time (aiosmtpd's per-line reads cost most of a naive relay's CPU).

Invariant of ``DataReader``: the unprocessed buffer always starts at a line start,
preceded by a CRLF (the first one is virtual: DATA's own line ended with it). Every
segment handed out is therefore line-aligned, so a single ``bytes.replace`` undoes the
stuffing of all of its lines.
"""

from __future__ import annotations

from dataclasses import dataclass

END = b"\r\n.\r\n"
CRLF = b"\r\n"
# A line longer than this without CRLF is flushed in pieces to keep memory bounded.
FLUSH_LONG_LINE_AT = 64 * 1024


@dataclass
class DataProblems:
    """What was wrong with a message's wire form; the message is refused if any is set."""

    bare_newline: bool = False
    oversized: bool = False
    long_line: bool = False


class DataReader:
    """Consumes the bytes after ``354`` until the end-of-data mark.

    ``feed()`` returns the unstuffed content gained from the chunk. Once ``done`` is
    true, ``leftover`` holds bytes the client sent after the mark (pipelined commands).
    Content past ``max_size`` or after a problem is discarded, but reading goes on to
    the real end mark so the session stays in sync.
    """

    def __init__(self, max_size: int, max_line: int = 998) -> None:
        self._buf = bytearray(CRLF)
        self._first = True  # the leading CRLF in _buf is virtual, not content
        self._midline = False  # _buf starts inside a long line that was partly flushed
        self._line_len = 0  # length so far of a long line flushed in pieces
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0  # content bytes seen, including discarded ones
        self.problems = DataProblems()
        self.done = False
        self.leftover = b""

    @property
    def failed(self) -> bool:
        p = self.problems
        return p.bare_newline or p.oversized or p.long_line

    def feed(self, chunk: bytes) -> bytes:
        """Add wire bytes; return the content (unstuffed) they complete, possibly empty."""
        if self.done:
            raise RuntimeError("DataReader fed after end of data")
        buf = self._buf
        search_from = max(0, len(buf) - 4)
        buf += chunk
        end = buf.find(END, search_from)
        if end >= 0:
            segment = bytes(buf[:end])
            self.leftover = bytes(buf[end + len(END) :])
            self.done = True
            self._buf = bytearray()
            return self._take(segment, final=True)
        cut = buf.rfind(CRLF)
        if cut > 0:
            segment = bytes(buf[:cut])
            del buf[:cut]
            return self._take(segment, final=False)
        if len(buf) > FLUSH_LONG_LINE_AT:
            # Keep a trailing CR so a CRLF split across reads is still seen whole.
            n = len(buf) - (1 if buf.endswith(b"\r") else 0)
            segment = bytes(buf[:n])
            del buf[:n]
            return self._take(segment, final=False, continues=True)
        return b""

    def _take(self, segment: bytes, final: bool, continues: bool = False) -> bytes:
        """Check and unstuff one line-aligned segment (it starts with CRLF unless mid-line)."""
        starts_line = not self._midline
        self._check(segment, starts_line, continues)
        self._midline = continues
        if final and self._first and not segment:
            content = b""  # ".\r\n" right after DATA: an empty message
        else:
            content = segment.replace(b"\r\n.", CRLF)
            if self._first:
                content = content[2:]  # drop the virtual CRLF
            if final:
                content += CRLF  # the CRLF of END ends the last line
        self._first = False
        self.size += len(content)
        if self.size > self.max_size:
            self.problems.oversized = True
        return b"" if self.failed else content

    def _check(self, segment: bytes, starts_line: bool, continues: bool) -> None:
        crlf = segment.count(CRLF)
        if segment.count(b"\n") != crlf or segment.count(b"\r") != crlf:
            self.problems.bare_newline = True
        if self.problems.long_line:
            return
        lines = segment.split(CRLF)
        # lines[0] is empty when the segment starts at a line start (leading CRLF).
        first = len(lines[0]) + (self._line_len if not starts_line else 0)
        # Fast path in C; only a candidate over the limit pays for the exact,
        # stuffing-aware count per line.
        if first > self.max_line or max(map(len, lines)) > self.max_line:
            longest = max(first, max((_content_len(x) for x in lines[1:]), default=0))
            if longest > self.max_line:
                self.problems.long_line = True
        if continues:
            self._line_len = first if len(lines) == 1 else _content_len(lines[-1])
        else:
            self._line_len = 0


def _content_len(line: bytes) -> int:
    """Length of a wire line that starts at a line start, without its stuffing dot.

    RFC 5321 4.5.3.1.6: the 1000-octet limit does not count the duplicated leading dot.
    """
    return len(line) - 1 if line.startswith(b".") else len(line)


def stuff(content: bytes) -> bytes:
    """Dot-stuff a whole message (or any content that starts at a line start)."""
    return Stuffer()(content)


class Stuffer:
    """Dot-stuffs content handed over in arbitrary chunks (RFC 5321 4.5.2).

    Remembers the last two bytes so a CRLF or a dot split across chunks is handled.
    """

    def __init__(self) -> None:
        self._tail = CRLF  # the start of content is a line start

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._tail.endswith(CRLF) and chunk.startswith(b"."):
            out = b"." + out
        elif self._tail.endswith(b"\r") and chunk.startswith(b"\n."):
            out = b"\n.." + out[2:]
        self._tail = (self._tail + chunk)[-2:]
        return out
