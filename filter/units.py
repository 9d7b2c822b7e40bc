"""Parsers and formatters for the human units admins write in policy files.

Pure functions, no I/O. Every parser raises ``ValueError`` with a message that
can be shown to an admin as is (the policy loader prefixes file and key).

Decisions:

* Durations: a bare number is seconds; strings take one unit out of
  ``ms s m h d w`` (``"90s"``, ``"1.5m"``, ``"35d"``). No compound forms like
  ``"1h30m"``: one number, one unit, easy to read back.
* Sizes: IEC units are powers of 1024 (``KiB MiB GiB TiB``), SI units are powers
  of 1000 (``kB MB GB TB``), matching what ``ls``/``df`` print. Bare ``"k"``,
  ``"M"``, ``"G"`` are rejected as ambiguous (rspamd reads ``10k`` as 10240,
  most other tools as 10000), so the admin has to say which one is meant.
* Networks: host bits set (``10.0.0.1/8``) is an error that names the network
  the admin probably meant, instead of silently widening or narrowing it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
from decimal import Decimal, localcontext
from typing import NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Decimal, so that "9ms" is the float nearest 0.009 (9 * 0.001 is 0.009000000000000001)
# and "2.3d" is 198720 exactly: what ``policy show`` prints is what the admin wrote.
_DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
    "w": Decimal(604800),
}
# Units format_duration may pick, largest first. Weeks parse but are not
# printed: "35d" reads better than "5w" next to Postfix's "5d" style settings.
_FORMAT_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
# Beyond this an int has no float: a duration or a score that large is a typo.
_MAX_FLOAT_INT = int(sys.float_info.max)

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_AMBIGUOUS_SIZE_UNITS = {"k", "m", "g", "t"}
# format_size prefers binary units (how limits are usually thought of), then SI.
_FORMAT_SIZE_UNITS = (
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
    ("TB", 1000**4),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("kB", 1000),
)

_NUMBER_UNIT = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class Address(NamedTuple):
    """A host and port; ``host`` never carries IPv6 brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def show_value(value: object) -> str:
    """Render a bad input the way it looks in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def parse_duration(v: int | float | str) -> float:
    """Seconds from ``30``, ``1.5``, ``"500ms"``, ``"90s"``, ``"5m"``, ``"2h"``, ``"35d"``.

    Admins think in minutes and days; code wants one unit (seconds, as a float).
    """
    expected = 'expected a duration like "90s", "5m", "2h", "35d" or a number of seconds'
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"{expected}, got {show_value(v)}")
    if isinstance(v, str):
        m = _NUMBER_UNIT.fullmatch(v.strip())
        if m is None:
            raise ValueError(f"{expected}, got {show_value(v)}")
        unit = m["unit"] or "s"
        if unit not in _DURATION_UNITS:
            units = ", ".join(_DURATION_UNITS)
            raise ValueError(
                f"unknown duration unit {unit!r} in {show_value(v)} (use one of {units})"
            )
        with localcontext(prec=len(m["num"]) + 8):  # the product is exact, then rounded once
            seconds = float(Decimal(m["num"]) * _DURATION_UNITS[unit])
    elif isinstance(v, int) and abs(v) > _MAX_FLOAT_INT:
        # TOML integers are unbounded in tomllib; float() would raise OverflowError.
        raise ValueError(f"{expected}, got a number too large to be one")
    else:
        seconds = float(v)
    if not math.isfinite(seconds):
        raise ValueError(f"{expected}, got {show_value(v)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {show_value(v)}")
    return seconds


def format_duration(seconds: float) -> str:
    """Shortest exact human form (``300 -> "5m"``, ``1.5 -> "1.5s"``) for ``policy show``."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"cannot format duration {seconds!r}")
    if seconds == 0:
        return "0s"
    if float(seconds).is_integer():
        whole = int(seconds)
        for unit, size in _FORMAT_DURATION_UNITS:
            if whole % size == 0:
                return f"{whole // size}{unit}"
    # Positional digits of the shortest repr: "1e-05s" would not parse back.
    exact = Decimal(repr(float(seconds)))
    candidates = [f"{exact:f}s"]
    millis = exact.scaleb(3)
    if millis == millis.to_integral_value():
        candidates.append(f"{int(millis)}ms")
    return min(candidates, key=len)


def parse_size(v: int | str) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"25MiB"``, ``"10MB"`` (= 10**7), ``"1GiB"``."""
    expected = 'expected a size like "25MiB", "512KiB", "10MB" or a number of bytes'
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError(f"{expected}, got {show_value(v)}")
    if isinstance(v, int):
        size = v
    else:
        m = _NUMBER_UNIT.fullmatch(v.strip())
        if m is None:
            raise ValueError(f"{expected}, got {show_value(v)}")
        unit = m["unit"].lower() or "b"
        if unit in _AMBIGUOUS_SIZE_UNITS:
            raise ValueError(
                f"ambiguous size unit in {show_value(v)}: write {m['num']}{unit.upper()}iB "
                f"(powers of 1024) or {m['num']}{unit.upper() if unit != 'k' else 'k'}B "
                "(powers of 1000)"
            )
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown size unit {m['unit']!r} in {show_value(v)}; {expected}")
        num, factor = m["num"], _SIZE_UNITS[unit]
        if "." in num:
            whole, frac = num.split(".")
            # Exact arithmetic: 1.5MiB is fine, 1.3B is not a whole number of bytes.
            numerator = int(whole + frac) * factor
            denominator = 10 ** len(frac)
            if numerator % denominator:
                raise ValueError(f"{show_value(v)} is not a whole number of bytes")
            size = numerator // denominator
        else:
            size = int(num) * factor
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {show_value(v)}")
    return size


def format_size(n: int) -> str:
    """``"25MiB"`` (or ``"10MB"``) when exact, else the plain number of bytes."""
    if n < 0:
        raise ValueError(f"cannot format size {n!r}")
    if n > 0:
        for unit, size in _FORMAT_SIZE_UNITS:
            if n % size == 0:
                return f"{n // size}{unit}"
    return str(n)


def is_hostname(name: str) -> bool:
    """True for a syntactically valid DNS name (letters, digits, ``-``, ``_``; 253 chars max)."""
    if not name or len(name) > 253:
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in name.removesuffix(".").split("."))


def is_ip(host: str) -> bool:
    """True for an IPv4 or IPv6 address literal (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_address(v: str, default_port: int | None = None) -> Address:
    """``"0.0.0.0:25"``, ``"[::]:25"``, ``"localhost:10025"``.

    A bare host (``"127.0.0.1"``, ``"::1"``) is accepted only with ``default_port``.
    """
    if not isinstance(v, str):
        raise ValueError(
            f'expected an address like "127.0.0.1:25" or "[::1]:25", got {show_value(v)}'
        )
    text = v.strip()
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {show_value(v)}")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f'unexpected {rest!r} after "]" in {show_value(v)}')
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] in {show_value(v)} is not an IPv6 address") from None
    elif text.count(":") > 1:
        # A bare IPv6 address; a port can only be given with brackets.
        if not is_ip(text):
            raise ValueError(f"{show_value(v)} is not an address; write IPv6 as [addr]:port")
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {show_value(v)}")
    if not is_ip(host) and not is_hostname(host):
        raise ValueError(f"{host!r} in {show_value(v)} is neither an IP address nor a host name")
    if port_text is None:
        if default_port is None:
            raise ValueError(f'missing port in {show_value(v)} (write it as "host:port")')
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"port {port_text!r} in {show_value(v)} is not a number")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"port {port} in {show_value(v)} is out of range (0-65535)")
    return Address(host, port)


def parse_network(v: str) -> Network:
    """``"10.0.0.0/8"``, ``"::1/128"``; a bare IP is its host network; host bits set is an error."""
    if not isinstance(v, str):
        raise ValueError(f'expected a network like "10.0.0.0/8" or an IP, got {show_value(v)}')
    text = v.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f'{show_value(v)} is not a network; expected a CIDR like "10.0.0.0/8" or an IP'
        ) from None
    raise ValueError(f'{show_value(v)} has host bits set; did you mean "{loose}"?')
