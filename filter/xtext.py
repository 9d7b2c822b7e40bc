"""RFC 3461 xtext, and the ``NAME=value`` attribute lists of XCLIENT/XFORWARD.

Postfix's XCLIENT and XFORWARD carry client facts (address, name, HELO) as
xtext-encoded attribute values. Those facts come from the internet, so a HELO
name with a space, ``=`` or a control character must be encoded on the way to
Postfix, and decoding what Postfix sends us must refuse anything malformed
rather than guess: a forged attribute here is a forged client identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["format_attributes", "parse_attributes", "xtext_decode", "xtext_encode"]

_HEX = "0123456789ABCDEF"
_HEXCHARS = frozenset("0123456789ABCDEFabcdef")
# Attribute names are Postfix keywords (ADDR, NAME, HELO, PROTO, ...).
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_SEP_RE = re.compile(r"[ \t]+")


def _is_xchar(code: int) -> bool:
    """RFC 3461 xchar: printable ASCII except "+" and "="."""
    return 0x21 <= code <= 0x7E and code not in (0x2B, 0x3D)


def xtext_encode(value: str) -> str:
    """Encode ``value`` (as UTF-8 octets) into xtext."""
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if _is_xchar(byte):
            out.append(chr(byte))
        else:
            out.append("+" + _HEX[byte >> 4] + _HEX[byte & 0x0F])
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Decode xtext; ValueError on a bad ``+HH``, a raw non-xchar or bad UTF-8.

    Lower-case hex digits are accepted (the RFC asks senders for upper case;
    being lenient there cannot change the meaning of a value).
    """
    raw = bytearray()
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEXCHARS for c in pair):
                raise ValueError(f"malformed xtext escape at offset {i}: {text[i : i + 3]!r}")
            raw.append(int(pair, 16))
            i += 3
            continue
        code = ord(ch)
        if not _is_xchar(code):
            raise ValueError(f"character {ch!r} must be +HH-encoded in xtext")
        raw.append(code)
        i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("xtext value is not valid UTF-8") from None


def parse_attributes(arg: str) -> dict[str, str]:
    """Split ``"NAME=foo ADDR=1.2.3.4"`` into ``{"NAME": "foo", "ADDR": "1.2.3.4"}``.

    Names are upper-cased, values xtext-decoded. A missing ``=``, a bad name,
    a malformed value or a repeated name raises ValueError: the caller answers
    501 instead of acting on an ambiguous identity.
    """
    attrs: dict[str, str] = {}
    # Only SP and HTAB separate attributes; any other whitespace is a raw
    # non-xchar inside a value and is refused by xtext_decode.
    for item in _SEP_RE.split(arg.strip(" \t")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"attribute without '=': {item!r}")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad attribute name: {name!r}")
        key = name.upper()
        if key in attrs:
            raise ValueError(f"attribute given twice: {key}")
        attrs[key] = xtext_decode(value)
    return attrs


def format_attributes(attrs: Mapping[str, str]) -> list[str]:
    """Render ``attrs`` as ``["NAME=xtext", ...]`` in the mapping's order.

    Returned as a list so the caller can split a long XCLIENT/XFORWARD over
    several commands to respect the SMTP line length.
    """
    out: list[str] = []
    for name, value in attrs.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"bad attribute name: {name!r}")
        out.append(f"{name.upper()}={xtext_encode(value)}")
    return out
