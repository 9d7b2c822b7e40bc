"""Message header block handling: split into fields, drop some, render new ones. Pure.

Works on raw bytes so that everything mailgate does not touch reaches the upstream
byte for byte (DKIM signatures stay valid).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

MAX_HEADER_BLOCK = 1024 * 1024  # beyond this the "header" is not a header


def header_end(content: bytes) -> int | None:
    """Offset just past the header block's last CRLF (the blank line follows), or None.

    A message starting with CRLF has no header block (offset 0).
    """
    if content.startswith(b"\r\n"):
        return 0
    i = content.find(b"\r\n\r\n")
    return None if i < 0 else i + 2


def split_fields(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(lower-case name, raw field including folded lines and CRLF)``.

    Lines that are neither a field nor a continuation are yielded with an empty name,
    so nothing is lost when the block is rebuilt.
    """
    start = 0
    n = len(block)
    while start < n:
        end = block.find(b"\r\n", start)
        end = n if end < 0 else end + 2
        # Absorb continuation lines (starting with SP or HTAB).
        while end < n and block[end : end + 1] in (b" ", b"\t"):
            nxt = block.find(b"\r\n", end)
            end = n if nxt < 0 else nxt + 2
        raw = block[start:end]
        colon = raw.find(b":")
        name = raw[:colon].strip().lower() if colon > 0 else b""
        yield name, raw
        start = end


def field_value(raw: bytes) -> str:
    """Unfolded value of a raw field, decoded leniently for inspection."""
    _, _, value = raw.partition(b":")
    unfolded = value.replace(b"\r\n", b"").strip()
    return unfolded.decode("utf-8", "replace")


def filter_block(block: bytes, drop: Callable[[bytes, bytes], bool]) -> bytes:
    """The header block without the fields for which ``drop(name, raw)`` is true."""
    return b"".join(raw for name, raw in split_fields(block) if not (name and drop(name, raw)))


#: A word longer than this is split after commas: with the field name and a fold it
#: still fits the 998-octet line limit of RFC 5322 2.1.1.
_LONGEST_WORD = 900


def render_field(name: str, value: str) -> bytes:
    """One header field, folded at spaces to stay under 78 characters per line.

    RFC 5322 §2.2.3: a fold is a CRLF put before existing whitespace, so unfolding
    (removing the CRLFs) gives back the value exactly.

    A word longer than a line (``tests=A,B,C,…`` of X-Spam-Status) is kept whole
    even past 78 characters (a SHOULD in RFC 5322): folding inside it, as
    SpamAssassin does, leaves a tab inside the list after unfolding, and scripts
    reading ``tests=(\\S+)`` lose the rest. Only a word that would break the
    998-octet limit (a MUST) is split, after a comma.
    """
    if len(name) + len(value) <= 74:  # fits on one line: nothing to fold
        return f"{name}: {value}\r\n".encode()
    pieces: list[tuple[str, bool]] = []  # (text, joined to the previous by a space)
    for word in value.split(" "):
        parts = re.findall(r"[^,]*,|[^,]+", word) if len(word) > _LONGEST_WORD else [word]
        pieces += [(p, i == 0) for i, p in enumerate(parts or [""])]
    lines: list[str] = []
    line = f"{name}:"
    for text, spaced in pieces:
        sep = " " if spaced else ""
        if len(line) + len(sep) + len(text) > 76 and line != f"{name}:":
            lines.append(line)
            # Folding at a space keeps that space as the fold's whitespace, so the
            # unfolded field reads as sent ("required=6 tests=…"); only a forced
            # split inside an overlong word adds whitespace of its own.
            line = (" " if spaced else "\t") + text
        else:
            line = f"{line}{sep}{text}"
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
