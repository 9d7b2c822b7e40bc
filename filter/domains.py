"""Domain names in the one form every check compares and looks up: lower-case A-labels.

L0, pure. The checks add their own rules on top (SPF's RFC 7208 4.3, DMARC's LDH
labels, DNSBL's "nothing to look up"); the conversion itself lives here once.
"""

from __future__ import annotations

import idna


def to_a_label(domain: str) -> str | None:
    """Lower-case A-label form without the trailing dot, or None if it is no domain.

    None for empty names, address literals (``[192.0.2.1]``) and names IDNA 2008 (with
    UTS 46 mapping) refuses. Pure-ASCII names are only lower-cased: IDNA 2008 refuses
    some that DNS holds fine (underscores, odd hyphens).
    """
    name = domain.strip().rstrip(".")
    if not name or name.startswith("["):
        return None
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def is_multi_label_host(name: str) -> bool:
    """At least two labels of 1-63 octets, 253 octets at most, a non-numeric top label."""
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or labels[-1].isdigit():
        return False
    return all(0 < len(label) < 64 for label in labels)
