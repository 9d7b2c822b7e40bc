"""Allow and block list files (L1): plain text, one entry per line, ``#`` comments.

Why files and not TOML arrays: lists grow to thousands of entries, are often written
by scripts or copied from other systems, and are edited far more often than the
policy; a file per list keeps them diffable and keeps ``mailgate.toml`` readable.
The policy names each file by path (``[lists]``); what a list *does* (allow or block)
comes from the key naming it, never from the file, so one line is one entry and an
action word after it (Postfix access-table habit) is an error, not a silent no-op.

Two kinds of list, each with a small fixed syntax:

* Client lists: an IP address (``192.0.2.7``, ``2001:db8::7``), a CIDR network
  (``192.0.2.0/24``; host bits set is an error, it is almost always a typo) or a
  reverse-DNS suffix (``example.com`` or ``.example.com``: that name and every name
  under it, on label boundaries, so ``evil-example.com`` never matches).
* Address lists (senders, recipients): ``user@domain`` (that address), ``user@``
  (that local part in every domain), ``@domain`` (that domain only) and ``domain``
  or ``.domain`` (the domain and its subdomains).

No wildcards: other systems' globs (``*.example.com``, SpamAssassin's ``*@example.com``)
and Postfix's octet prefixes (``192.168``) would match nothing here, so they are
errors that say what to write instead.

Everything compares case-insensitively; domains compare as A-labels (IDNA), so a
list may hold either spelling. Allow lists refuse entries so wide they would
exempt half the internet (networks wider than /8 or /16, a bare top-level domain):
such a line is a slip, and an allow list fails open.

Errors name the file and line (``path:line: message``) and every bad line is
reported, so the policy loader can refuse a reload with the whole picture.

Parsed lists are cached per file, keyed by what ``stat`` says about it (device,
inode, size, mtime, ctime): each policy load re-reads only the files that changed,
and a message never touches the disk.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from filter.domains import to_a_label
from filter.greylist import MIN_ALLOW_PREFIX, normalise_sender
from filter.netaddr import parse_ip
from filter.units import Network, is_hostname

__all__ = [
    "LIST_KEYS",
    "MAX_REPORTED",
    "AddressList",
    "ClientList",
    "Entry",
    "ListFileError",
    "clear_cache",
    "load_addresses",
    "load_clients",
    "load_list",
    "parse_address_list",
    "parse_client_list",
    "recipient_forms",
    "sender_forms",
]

# A broken generated file can have thousands of bad lines; the first few say enough.
MAX_REPORTED = 20

ListKind = Literal["clients", "addresses"]

# The [lists] keys: which kind of file each one names, and whether it allows.
LIST_KEYS: Mapping[str, tuple[ListKind, bool]] = {
    "allow_clients": ("clients", True),
    "block_clients": ("clients", False),
    "allow_senders": ("addresses", True),
    "block_senders": ("addresses", False),
    "block_recipients": ("addresses", False),
}


@dataclass(frozen=True)
class Entry:
    """One list entry and where it is written: the log says which line decided."""

    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.text})"


class ListFileError(ValueError):
    """A list file has bad lines; ``problems`` holds (line, message) for every one."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.messages()))

    def messages(self, limit: int = MAX_REPORTED) -> list[str]:
        """``path:line: message`` lines, at most ``limit`` plus a count of the rest."""
        out = [f"{self.path}:{line}: {message}" for line, message in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"{self.path}: {len(self.problems) - limit} more bad lines not shown")
        return out


# --- reading lines -------------------------------------------------------------------


def _lines(data: bytes, problems: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(line number, entry) for each line that holds one; bad lines go to ``problems``.

    Lines are decoded one by one so that a stray Latin-1 byte is reported at its
    line instead of refusing the file as a whole.
    """
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append((number, "not UTF-8 text"))
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # some editors start files with a BOM
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        words = text.split()
        if len(words) > 1:
            problems.append(
                (
                    number,
                    f"one entry per line, got {len(words)} words ({text!r}); whether a "
                    "list allows or blocks comes from the policy key that names the file",
                )
            )
            continue
        yield number, text


def _domain(text: str, allow: bool) -> str:
    """The A-label form of a list domain; ValueError with the reason it is not one."""
    if text.startswith("*."):
        name = text[2:]
        raise ValueError(f"write {name} (it matches {name} and every name under it), not {text}")
    name = text.removeprefix(".")
    a_label = to_a_label(name)
    if a_label is None or not is_hostname(a_label) or a_label.startswith("."):
        raise ValueError(f"{text!r} is not a domain name")
    top = a_label.rsplit(".", 1)[-1]
    if top.isdigit():
        raise ValueError(f"{text!r} is neither an IP address nor a domain name")
    if allow and "." not in a_label:
        raise ValueError(f"{text!r} is a whole top-level domain; an allow list needs a domain")
    return a_label


# --- client lists --------------------------------------------------------------------


def _looks_numeric(text: str) -> bool:
    """Meant as an address: a ``/``, a ``:`` or nothing but digits and dots."""
    return "/" in text or ":" in text or all(c.isdigit() or c == "." for c in text)


def _network(text: str, allow: bool) -> Network:
    """IP or CIDR; IPv4-mapped IPv6 becomes IPv4, as client addresses do (netaddr)."""
    address, slash, prefix = text.partition("/")
    try:
        ip = parse_ip(address)
    except ValueError:
        octets = address.split(".")
        if not slash and len(octets) < 4 and all(o.isdigit() and int(o) < 256 for o in octets):
            # Postfix access tables match "192.0.2" as a prefix; here it is a network.
            meant = ".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}"
            message = f"{address!r} is not an IP address; for a network write {meant}"
            raise ValueError(message) from None
        raise ValueError(f"{address!r} is not an IP address") from None
    if slash and not (prefix.isascii() and prefix.isdigit()):
        raise ValueError(f"{text!r}: the prefix length after / must be a number")
    length = int(prefix) if slash else ip.max_prefixlen
    if address.count(":") and ip.version == 4:  # ::ffff:192.0.2.0/120 -> 192.0.2.0/24
        length = length - 96 if slash else 32
    try:
        net: Network = ipaddress.ip_network(f"{ip}/{length}")
    except ValueError:
        try:
            loose = ipaddress.ip_network(f"{ip}/{length}", strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a CIDR network") from None
        raise ValueError(f"{text} has host bits set; did you mean {loose}?") from None
    widest = MIN_ALLOW_PREFIX[net.version]
    if allow and net.prefixlen < widest:
        raise ValueError(f"{net} is wider than /{widest}; an allow list needs narrower networks")
    return net


@dataclass
class ClientList:
    """Client networks and reverse-DNS suffixes from one file.

    Networks are kept by prefix length (network number -> entry), so a lookup is one
    dict probe per prefix length in use instead of a scan over every entry, and the
    narrowest match is found first (it names the most specific line in the log).
    """

    path: str
    networks: dict[int, dict[int, dict[int, Entry]]] = field(default_factory=dict)
    suffixes: dict[str, Entry] = field(default_factory=dict)

    def __len__(self) -> int:
        nets = sum(len(m) for by_len in self.networks.values() for m in by_len.values())
        return nets + len(self.suffixes)

    def add_network(self, net: Network, entry: Entry) -> None:
        by_len = self.networks.setdefault(net.version, {})
        if net.prefixlen not in by_len:
            by_len[net.prefixlen] = {}
            # Longest prefix first: the narrowest network is the one worth naming.
            self.networks[net.version] = dict(sorted(by_len.items(), reverse=True))
        key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
        self.networks[net.version][net.prefixlen].setdefault(key, entry)  # first line wins

    def match_ip(self, ip: str) -> Entry | None:
        """The entry whose network holds ``ip`` (narrowest first); None for a non-address."""
        try:
            addr = parse_ip(ip)
        except ValueError:
            return None
        value = int(addr)
        for length, bucket in self.networks.get(addr.version, {}).items():
            found = bucket.get(value >> (addr.max_prefixlen - length))
            if found is not None:
                return found
        return None

    def match_name(self, hostname: str | None) -> Entry | None:
        """The suffix entry ``hostname`` is or lies under (most specific first)."""
        if not hostname or not self.suffixes:
            return None
        name = to_a_label(hostname)
        if name is None:
            return None
        labels = name.split(".")
        for i in range(len(labels)):
            found = self.suffixes.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None

    def match(self, ip: str, hostname: str | None) -> Entry | None:
        """The address first (it cannot be forged), then the verified name."""
        return self.match_ip(ip) or self.match_name(hostname)


def parse_client_list(data: bytes, path: str, *, allow: bool) -> ClientList:
    """A client list from file contents; ListFileError names every bad line."""
    problems: list[tuple[int, str]] = []
    result = ClientList(path)
    for number, text in _lines(data, problems):
        entry = Entry(path, number, text)
        try:
            if _looks_numeric(text):
                result.add_network(_network(text, allow), entry)
            else:
                result.suffixes.setdefault(_domain(text, allow), entry)
        except ValueError as exc:
            problems.append((number, str(exc)))
    if problems:
        raise ListFileError(path, problems)
    return result


# --- address lists -------------------------------------------------------------------


@dataclass
class AddressList:
    """Sender or recipient patterns from one file, one dict per form."""

    path: str
    addresses: dict[str, Entry] = field(default_factory=dict)  # user@domain
    locals: dict[str, Entry] = field(default_factory=dict)  # user@
    domains: dict[str, Entry] = field(default_factory=dict)  # @domain
    trees: dict[str, Entry] = field(default_factory=dict)  # domain, .domain

    def __len__(self) -> int:
        return len(self.addresses) + len(self.locals) + len(self.domains) + len(self.trees)

    def match(self, forms: Iterable[str]) -> Entry | None:
        """The entry matching any of ``forms`` (``local@a-label`` strings, see
        :func:`sender_forms`), the most specific pattern first."""
        for form in forms:
            local, _, domain = form.rpartition("@")
            found = self.addresses.get(form) or self.locals.get(local) or self.domains.get(domain)
            if found is not None:
                return found
            labels = domain.split(".")
            for i in range(len(labels)):
                found = self.trees.get(".".join(labels[i:]))
                if found is not None:
                    return found
        return None


def _add_address(result: AddressList, text: str, entry: Entry, allow: bool) -> None:
    """File one address pattern under its form; ValueError says what is wrong with it."""
    pattern = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if not pattern:
        raise ValueError("the null sender <> cannot be listed")
    if "@" not in pattern:
        result.trees.setdefault(_domain(pattern, allow), entry)
        return
    local, _, domain = pattern.rpartition("@")
    if "@" in local or "<" in pattern or ">" in pattern:
        raise ValueError(f"{text!r} is not an address (user@domain, user@, @domain or domain)")
    if not local and not domain:
        raise ValueError("a lone @ matches nothing; write user@, @domain or user@domain")
    if "*" in local:
        # Another system's glob (SpamAssassin's *@domain) kept literally never matches.
        hint = f"write @{domain} (every address in {domain})" if local == "*" and domain else ""
        raise ValueError(f"{text!r}: no wildcards in a local part" + (f"; {hint}" if hint else ""))
    if not domain:
        result.locals.setdefault(local.lower(), entry)
        return
    if domain.startswith("."):
        raise ValueError(f"{text!r}: write {domain[1:]} (no @) for a domain and its subdomains")
    a_label = _domain(domain, allow)
    if local:
        result.addresses.setdefault(f"{local.lower()}@{a_label}", entry)
    else:
        result.domains.setdefault(a_label, entry)


def parse_address_list(data: bytes, path: str, *, allow: bool) -> AddressList:
    """A sender or recipient list from file contents; ListFileError names every bad line."""
    problems: list[tuple[int, str]] = []
    result = AddressList(path)
    for number, text in _lines(data, problems):
        try:
            _add_address(result, text, Entry(path, number, text), allow)
        except ValueError as exc:
            problems.append((number, str(exc)))
    if problems:
        raise ListFileError(path, problems)
    return result


def _form(local: str, domain: str) -> str | None:
    a_label = to_a_label(domain)
    return f"{local.lower()}@{a_label}" if a_label else None


def sender_forms(mail_from: str) -> list[str]:
    """The spellings of an envelope sender an address list compares: as written
    (lower-cased, A-label domain), then without BATV/SRS tags and ``+extension``.

    Tags change per message, so ``user+news@`` or a BATV-signed bounce address still
    matches a ``user@`` entry. An unwrapped SRS address has the *original* domain:
    callers that trust a sender only when SPF vouches for it must check the domain
    of the form that matched (see ``filter.checks.lists``). The null sender has no
    forms: it cannot be listed.
    """
    raw = mail_from.strip().strip("<>").strip()
    local, at, domain = raw.rpartition("@")
    if not at or not domain:
        return []
    bare_local, _, bare_domain = normalise_sender(raw).rpartition("@")
    forms: list[str] = []
    for form in (_form(local, domain), _form(bare_local, bare_domain)):
        if form is not None and form not in forms:
            forms.append(form)
    return forms


def recipient_forms(rcpt: str) -> list[str]:
    """A recipient as written, then without its ``+extension`` (``info+x@`` is ``info@``)."""
    raw = rcpt.strip().strip("<>").strip()
    local, at, domain = raw.rpartition("@")
    if not at or not domain:
        return []
    forms: list[str] = []
    base = local.split("+", 1)[0] if not local.startswith("+") else local
    for part in (local, base):
        form = _form(part, domain)
        if form is not None and form not in forms:
            forms.append(form)
    return forms


# --- files and the cache -------------------------------------------------------------

_Stamp = tuple[int, int, int, int, int]
_CACHE: dict[tuple[str, ListKind, bool], tuple[_Stamp, ClientList | AddressList]] = {}


def _load(path: str, kind: ListKind, allow: bool) -> ClientList | AddressList:
    """The parsed file, re-read only when its stat changed; OSError if unreadable.

    ``fstat`` on the open file, not ``stat`` on the name, so the stamp belongs to the
    bytes read even when the admin's editor swaps the file in between.
    """
    name = os.path.abspath(path)
    key = (name, kind, allow)
    with open(name, "rb") as fh:
        st = os.fstat(fh.fileno())
        stamp: _Stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = fh.read()
    parsed: ClientList | AddressList
    if kind == "clients":
        parsed = parse_client_list(data, path, allow=allow)
    else:
        parsed = parse_address_list(data, path, allow=allow)
    _CACHE[key] = (stamp, parsed)  # only good parses are kept: a bad file fails every time
    return parsed


def load_clients(path: str, *, allow: bool) -> ClientList:
    """A client list file (cached while unchanged); OSError or ListFileError."""
    result = _load(path, "clients", allow)
    assert isinstance(result, ClientList)
    return result


def load_addresses(path: str, *, allow: bool) -> AddressList:
    """A sender or recipient list file (cached while unchanged); OSError or ListFileError."""
    result = _load(path, "addresses", allow)
    assert isinstance(result, AddressList)
    return result


def load_list(key: str, path: str) -> ClientList | AddressList:
    """The file a ``[lists]`` key names, parsed as that key's kind (for the loader)."""
    kind, allow = LIST_KEYS[key]
    return _load(path, kind, allow)


def clear_cache() -> None:
    """Forget every parsed file (tests; a long-lived process never needs it)."""
    _CACHE.clear()
