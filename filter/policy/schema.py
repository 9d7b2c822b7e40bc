"""The policy schema: typed, frozen, validated; the only place defaults live.

Each TOML table is a frozen dataclass whose attribute names are the TOML keys.
Each field declares its *kind* (duration, size, address list, enum, ...) in
``dataclasses.field(metadata=...)`` through the small helpers below, so adding a
key is one line here: the generic walker (:func:`policy_from_dict`) validates
it, :func:`to_toml_data` dumps it for ``policy show``, and a unit test checks
that the shipped ``policies/mailgate.toml`` mentions it.

Cross-field rules live in a ``problems()`` method on the dataclass they concern;
the walker calls it once every field of that table parsed.

This module is pure: no file or network access (the loader checks that TLS
files are readable).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from filter.dnsbl import derived_tag, is_listing_code, symbol_for
from filter.domains import to_a_label
from filter.storeurl import url_problem
from filter.units import (
    Address,
    Network,
    format_duration,
    format_size,
    is_hostname,
    is_ip,
    parse_address,
    parse_duration,
    parse_network,
    parse_size,
    show_value,
)

# (dotted key, message); the loader turns these into "file: key: message".
Problem = tuple[str, str]
TomlValue = bool | int | float | str | list[Any] | dict[str, Any]

T = TypeVar("T")
KIND = "mailgate.kind"
_TOML_INT_MIN, _TOML_INT_MAX = -(2**63), 2**63 - 1


class _Invalid:
    """Marker for "this value failed validation; the problem is already recorded"."""


INVALID = _Invalid()


def join_key(prefix: str, name: str) -> str:
    """Dotted TOML key path, e.g. ``join_key("server", "tls")`` -> ``"server.tls"``."""
    return f"{prefix}.{name}" if prefix else name


# A check's switch: "enforce" applies its decisions; "monitor" logs them as would-haves
# and scores its symbols 0. "off" (domain overrides only) ignores its results.
CHECK_MODES = ("enforce", "monitor")
DOMAIN_CHECK_MODES = ("enforce", "monitor", "off")
# Policy tables of checks; a check named "dnsbl_domain" or "lists_rcpt" uses "dnsbl"/"lists".
CHECK_TABLES = (
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "dnsbl",
    "greylist",
    "rdns",
    "helo",
    "lists",
    "ratelimit",
)


# --- kinds ------------------------------------------------------------------


class Kind:
    """How one TOML value becomes a typed Python value, and back for ``policy show``."""

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        """Typed value, or ``INVALID`` after appending to ``problems``."""
        try:
            return self.convert(raw)
        except ValueError as exc:
            problems.append((key, str(exc)))
            return INVALID

    def convert(self, raw: object) -> Any:
        """Typed value from a TOML value; ``ValueError`` with an admin-readable message."""
        raise NotImplementedError

    def dump(self, value: Any) -> TomlValue:
        """TOML value the admin would write for ``value``."""
        return cast(TomlValue, value)


@dataclass(frozen=True)
class BoolKind(Kind):
    """``true`` / ``false`` only: ``"yes"`` or ``1`` are mistakes worth reporting."""

    def convert(self, raw: object) -> bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {show_value(raw)}")
        return raw


@dataclass(frozen=True)
class IntKind(Kind):
    """An integer within ``[minimum, maximum]``."""

    minimum: int | None = None
    maximum: int | None = None

    def convert(self, raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {show_value(raw)}")
        if not _TOML_INT_MIN <= raw <= _TOML_INT_MAX:
            # TOML integers are 64-bit; tomllib reads more, which no other tool would.
            raise ValueError("expected a 64-bit integer, got a number too large to be one")
        _check_range(raw, self.minimum, self.maximum, str)
        return raw


@dataclass(frozen=True)
class FloatKind(Kind):
    """A finite number; TOML integers are accepted (``reject = 15``)."""

    minimum: float | None = None
    maximum: float | None = None

    def convert(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {show_value(raw)}")
        try:
            value = float(raw)
        except OverflowError:  # an int beyond any float (tomllib reads unbounded ints)
            raise ValueError("expected a finite number, got a number too large to be one") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {raw!r}")
        _check_range(value, self.minimum, self.maximum, repr)
        return value


@dataclass(frozen=True)
class StrKind(Kind):
    """A string, optionally constrained by a predicate with a description of what it wants."""

    check: Callable[[str], bool] | None = None
    wants: str = ""
    allow_empty: bool = True

    def convert(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {show_value(raw)}")
        if raw == "":
            if not self.allow_empty:
                raise ValueError("must not be empty")
            return raw
        if self.check is not None and not self.check(raw):
            raise ValueError(f"expected {self.wants}, got {show_value(raw)}")
        return raw


@dataclass(frozen=True)
class EnumKind(Kind):
    """One of a fixed set of words; a near miss gets a "did you mean" hint."""

    choices: tuple[str, ...]

    def convert(self, raw: object) -> str:
        if isinstance(raw, str) and raw in self.choices:
            return raw
        options = ", ".join(f'"{c}"' for c in self.choices)
        message = f"expected one of {options}, got {show_value(raw)}"
        if isinstance(raw, str):
            message += _did_you_mean(raw, self.choices)
        raise ValueError(message)


@dataclass(frozen=True)
class DurationKind(Kind):
    """Seconds as a float; TOML holds a number or a string like ``"5m"``."""

    minimum: float = 0.0
    maximum: float | None = None

    def convert(self, raw: object) -> float:
        seconds = parse_duration(cast(Any, raw))  # rejects wrong types with its own message
        _check_range(seconds, self.minimum, self.maximum, format_duration)
        return seconds

    def dump(self, value: Any) -> TomlValue:
        return format_duration(cast(float, value))


@dataclass(frozen=True)
class SizeKind(Kind):
    """Bytes as an int; TOML holds an integer or a string like ``"25MiB"``."""

    minimum: int = 0
    maximum: int | None = None

    def convert(self, raw: object) -> int:
        size = parse_size(cast(Any, raw))  # rejects wrong types with its own message
        _check_range(size, self.minimum, self.maximum, format_size)
        return size

    def dump(self, value: Any) -> TomlValue:
        text = format_size(cast(int, value))
        return int(text) if text.isdigit() else text


@dataclass(frozen=True)
class AddressKind(Kind):
    """``"host:port"``; ``default_port`` allows a bare host, ``ip_only`` forbids names."""

    default_port: int | None = None
    ip_only: bool = False

    def convert(self, raw: object) -> Address:
        address = parse_address(cast(str, raw), self.default_port)
        if self.ip_only and not is_ip(address.host):
            raise ValueError(f"expected an IP address, not a host name, got {show_value(raw)}")
        return address

    def dump(self, value: Any) -> TomlValue:
        address = cast(Address, value)
        if self.default_port is not None and address.port == self.default_port:
            return f"[{address.host}]" if ":" in address.host else address.host
        return str(address)


@dataclass(frozen=True)
class NetworkKind(Kind):
    """A CIDR network; a bare IP means its host network."""

    def convert(self, raw: object) -> Network:
        return parse_network(cast(str, raw))

    def dump(self, value: Any) -> TomlValue:
        return str(value)


@dataclass(frozen=True)
class ListKind(Kind):
    """An array of one kind, as a tuple; duplicates are reported (they are always a slip)."""

    item: Kind
    min_items: int = 0

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, list):
            problems.append((key, f"expected an array, got {show_value(raw)}"))
            return INVALID
        if len(raw) < self.min_items:
            problems.append((key, f"needs at least {self.min_items} entr{_ies(self.min_items)}"))
            return INVALID
        values: list[Any] = []
        for i, item in enumerate(raw):
            value = self.item.parse(item, f"{key}[{i}]", problems)
            if value is not INVALID and value in values:
                problems.append((f"{key}[{i}]", f"{show_value(item)} is listed twice"))
            values.append(value)
        if any(v is INVALID for v in values):
            return INVALID
        return tuple(values)

    def dump(self, value: Any) -> TomlValue:
        return [self.item.dump(v) for v in cast(tuple[Any, ...], value)]


@dataclass(frozen=True)
class TableKind(Kind):
    """A nested TOML table mapped onto a schema dataclass."""

    cls: type[Any]

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        return build_table(self.cls, raw, key, problems)

    def dump(self, value: Any) -> TomlValue:
        return to_toml_data(value)


@dataclass(frozen=True)
class TableListKind(Kind):
    """An array of tables (``[[dnsbl.zones]]``); replaced as a whole when merging."""

    cls: type[Any]

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, list):
            problems.append((key, f"expected an array of tables, got {show_value(raw)}"))
            return INVALID
        values = [
            build_table(self.cls, item, f"{key}[{i}]", problems) for i, item in enumerate(raw)
        ]
        if any(v is INVALID for v in values):
            return INVALID
        return tuple(values)

    def dump(self, value: Any) -> TomlValue:
        return [to_toml_data(v) for v in cast(tuple[Any, ...], value)]


SYMBOL_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


@dataclass(frozen=True)
class ScoreMapKind(Kind):
    """``[scores]``: symbol -> score, laid over the schema's default scores."""

    defaults: Mapping[str, float]

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, dict):
            problems.append((key, f"expected a table, got {show_value(raw)}"))
            return INVALID
        scores = dict(self.defaults)
        ok = True
        number = FloatKind()
        for name, value in raw.items():
            item_key = join_key(key, name)
            if not SYMBOL_NAME.fullmatch(name):
                problems.append(
                    (item_key, "symbol names are upper case letters, digits and _, like SPF_PASS")
                )
                ok = False
                continue
            if name not in KNOWN_SYMBOLS and not name.startswith(ZONE_SYMBOL_PREFIXES):
                problems.append((item_key, "unknown symbol" + _did_you_mean(name, KNOWN_SYMBOLS)))
                ok = False
                continue
            score = number.parse(value, item_key, problems)
            if score is INVALID:
                ok = False
            else:
                scores[name] = score
        return MappingProxyType(scores) if ok else INVALID

    def dump(self, value: Any) -> TomlValue:
        return dict(cast(Mapping[str, float], value))


@dataclass(frozen=True)
class OptionalFloatKind(Kind):
    """A number that may be left out: ``None`` means "inherit the global value"."""

    def convert(self, raw: object) -> float:
        return FloatKind().convert(raw)


@dataclass(frozen=True)
class CheckModeMapKind(Kind):
    """``checks = { greylist = "off", spf = "monitor" }``: a mode per check table name."""

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, dict):
            problems.append((key, f"expected a table, got {show_value(raw)}"))
            return INVALID
        ok = True
        for name, mode in raw.items():
            item = join_key(key, name)
            if name not in CHECK_TABLES:
                problems.append((item, "unknown check" + _did_you_mean(name, CHECK_TABLES)))
                ok = False
            elif mode not in DOMAIN_CHECK_MODES:
                choices = ", ".join(f'"{m}"' for m in DOMAIN_CHECK_MODES)
                problems.append((item, f"expected one of {choices}, got {show_value(mode)}"))
                ok = False
        return MappingProxyType(dict(raw)) if ok else INVALID

    def dump(self, value: Any) -> TomlValue:
        return dict(cast(Mapping[str, str], value))


@dataclass(frozen=True)
class DomainMapKind(Kind):
    """``[domains."example.com"]`` tables: per recipient domain overrides."""

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, dict):
            problems.append((key, f"expected a table, got {show_value(raw)}"))
            return INVALID
        out: dict[str, Any] = {}
        spelt: dict[str, str] = {}  # A-label -> the key as written, for duplicates
        ok = True
        for domain, table in raw.items():
            item = join_key(key, f'"{domain}"')
            # Recipient domains are compared as A-labels: "bücher.example" is written
            # either way, and both spellings of an SMTPUTF8 recipient find it.
            name = to_a_label(domain) or ""
            if not is_hostname(name):
                problems.append((item, "expected a domain name like example.com"))
                ok = False
                continue
            if "." not in name:
                # override_for never applies a top-level domain: it would be dead.
                message = "expected a domain name like example.com; a single label never applies"
                problems.append((item, message))
                ok = False
                continue
            if name in spelt:
                # Otherwise the later table silently replaces the earlier one whole.
                first = join_key(key, f'"{spelt[name]}"')
                problems.append((item, f"the same domain as {first}; merge the two tables"))
                ok = False
                continue
            spelt[name] = domain
            value = build_table(DomainOverride, table, item, problems)
            if isinstance(value, _Invalid):
                ok = False
            else:
                out[name] = value
        return MappingProxyType(out) if ok else INVALID

    def dump(self, value: Any) -> TomlValue:
        out: dict[str, TomlValue] = {}
        for domain, override in cast(Mapping[str, Any], value).items():
            data = to_toml_data(override)
            out[domain] = {
                k: v
                for k, v in data.items()
                if v is not None and v != {} and not (k == "mode" and v == "inherit")
            }
        return out


# --- field helpers: one line per key in the dataclasses below ---------------


def _field(default: T, kind: Kind) -> T:
    # Typed as the value so the dataclass annotation type-checks; at runtime a Field.
    return field(default=default, metadata={KIND: kind})


def boolean(default: bool) -> bool:
    return _field(default, BoolKind())


def integer(default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    return _field(default, IntKind(minimum, maximum))


def number(default: float, minimum: float | None = None, maximum: float | None = None) -> float:
    return _field(float(default), FloatKind(minimum, maximum))


def text(
    default: str,
    check: Callable[[str], bool] | None = None,
    wants: str = "",
    allow_empty: bool = True,
) -> str:
    return _field(default, StrKind(check, wants, allow_empty))


def choice(default: str, *choices: str) -> str:
    assert default in choices
    return _field(default, EnumKind(choices))


def duration(
    default: float | str, minimum: float | str = 0.0, maximum: float | str | None = None
) -> float:
    upper = None if maximum is None else parse_duration(maximum)
    return _field(parse_duration(default), DurationKind(parse_duration(minimum), upper))


def size(default: int | str, minimum: int | str = 0) -> int:
    return _field(parse_size(default), SizeKind(parse_size(minimum)))


def address(default: str, default_port: int | None = None) -> Address:
    return _field(parse_address(default, default_port), AddressKind(default_port))


def addresses(
    *defaults: str, default_port: int | None = None, ip_only: bool = False, min_items: int = 0
) -> tuple[Address, ...]:
    kind = ListKind(AddressKind(default_port, ip_only), min_items)
    return _field(tuple(parse_address(d, default_port) for d in defaults), kind)


def networks(*defaults: str) -> tuple[Network, ...]:
    return _field(tuple(parse_network(d) for d in defaults), ListKind(NetworkKind()))


def table(cls: type[Any]) -> dict[str, Kind]:
    """Field metadata for a nested table: ``field(default_factory=Cls, metadata=table(Cls))``."""
    return {KIND: TableKind(cls)}


def tables(cls: type[T], *defaults: T) -> tuple[T, ...]:
    return _field(tuple(defaults), TableListKind(cls))


def score_map(defaults: Mapping[str, float]) -> Mapping[str, float]:
    frozen = MappingProxyType(dict(defaults))
    kind = ScoreMapKind(frozen)
    # hash=False: a mapping is not hashable; equality still compares the scores.
    return cast(
        Mapping[str, float],
        field(default_factory=lambda: frozen, hash=False, metadata={KIND: kind}),
    )


# --- value checks used by the schema -----------------------------------------


def _is_token(value: str) -> bool:
    """An RFC 8601 authserv-id we can emit unquoted: no spaces, no ``;`` or quotes."""
    return not re.search(r'[\s;"()\\]', value)


def _is_recipient_pattern(value: str) -> bool:
    """``user@domain``, ``@domain`` or ``user@``: exactly one ``@``, something around it."""
    local, at, domain = value.partition("@")
    return bool(at) and "@" not in domain and bool(local or domain) and not re.search(r"\s", value)


def _is_redis_url(value: str) -> bool:
    parts = urlsplit(value)
    if parts.scheme == "unix":
        return bool(parts.path)
    # Sentinel and Cluster URLs carry a host list (``h1:26379,h2:26379``); the store
    # parses them, this only checks the shape.
    schemes = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
    return parts.scheme in (*schemes, "redis+cluster", "rediss+cluster") and bool(parts.netloc)


# --- the schema ----------------------------------------------------------------


@dataclass(frozen=True)
class TLSPolicy:
    """``[server.tls]``: STARTTLS is offered only when both files are set."""

    cert_file: str = text("")
    key_file: str = text("")

    def problems(self) -> Iterable[Problem]:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            yield missing, "cert_file and key_file must be set together (or both left empty)"


# Raised to command_timeout when left here (see ServerPolicy.__post_init__).
DEFAULT_SESSION_TIMEOUT = parse_duration("30m")


@dataclass(frozen=True)
class ServerPolicy:
    """``[server]``: the listener clients (or Postfix, in filter mode) connect to."""

    listen: tuple[Address, ...] = addresses("0.0.0.0:25", "[::]:25", min_items=1)
    # "" means the machine's FQDN at startup (see effective_hostname): a fixed
    # default would be wrong everywhere, and resolving here would make the
    # defaults depend on the host.
    hostname: str = text("", is_hostname, "a host name like mx.example.org")
    mode: str = choice("enforce", "enforce", "monitor")
    trusted_networks: tuple[Network, ...] = networks("127.0.0.1/32", "::1/128")
    max_message_size: int = size("25MiB", minimum=1)
    max_recipients: int = integer(100, minimum=1)
    max_connections: int = integer(1000, minimum=1)
    max_connections_per_ip: int = integer(20, minimum=1)
    command_timeout: float = duration("5m", minimum="1s")
    session_timeout: float = duration(DEFAULT_SESSION_TIMEOUT, minimum="1s")
    max_errors: int = integer(20, minimum=1)
    greet_pause: float = duration(0, maximum="1m")
    check_timeout: float = duration("20s", minimum="100ms")
    shutdown_grace: float = duration("30s")
    proxy_protocol: bool = boolean(False)
    # Balancers whose PROXY header is believed; empty: any peer (then let only the
    # balancer reach the port). A peer outside the list is cut before it is read.
    proxy_hosts: tuple[Network, ...] = networks()
    xforward_hosts: tuple[Network, ...] = networks()
    # Commands that end the session with 221 2.7.0 (Postfix's smtpd_forbidden_commands):
    # an HTTP request or proxy probe on port 25. Lines that look like a header field
    # ("Subject: …") or do not start with a letter always do.
    forbidden_commands: tuple[str, ...] = _field(
        ("CONNECT", "GET", "POST"),
        ListKind(StrKind(lambda s: bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", s)), "a word")),
    )
    workers: int = integer(1, minimum=1, maximum=256)
    tls: TLSPolicy = field(default_factory=TLSPolicy, metadata=table(TLSPolicy))

    def __post_init__(self) -> None:
        # A session_timeout left at its default follows a longer command_timeout:
        # "command_timeout = 2h" alone is a valid duration for a key the contract names,
        # and must not be refused for a key the admin never set.
        if self.session_timeout == DEFAULT_SESSION_TIMEOUT < self.command_timeout:
            object.__setattr__(self, "session_timeout", self.command_timeout)

    @property
    def effective_hostname(self) -> str:
        """``hostname``, or the machine's FQDN when it is empty."""
        return self.hostname or _machine_fqdn()

    def problems(self) -> Iterable[Problem]:
        if self.session_timeout < self.command_timeout:
            yield "session_timeout", "must be at least command_timeout"
        if self.greet_pause >= self.command_timeout:
            yield "greet_pause", "must be shorter than command_timeout"


@cache
def _machine_fqdn() -> str:
    """Looked up once per process: ``getfqdn`` may wait on DNS."""
    import socket

    return socket.getfqdn()


@dataclass(frozen=True)
class UpstreamPolicy:
    """``[upstream]``: the Postfix smtpd that mailgate relays to in lockstep."""

    address: Address = address("127.0.0.1:10025")  # noqa: RUF009 (returns a Field)
    xclient: bool = boolean(True)
    timeout: float = duration("2m", minimum="1s")
    connect_timeout: float = duration("10s", minimum="100ms")
    # NOOP after this long without a command while a transaction waits on the client
    # (body upload, checks): Postfix drops a silent client after smtpd_timeout, 10 s
    # under stress. 0 turns it off.
    keepalive: float = duration("5s", minimum=0.0)


@dataclass(frozen=True)
class DNSPolicy:
    """``[dns]``: resolvers for every check; empty uses /etc/resolv.conf."""

    nameservers: tuple[Address, ...] = addresses(default_port=53, ip_only=True)
    timeout: float = duration("3s", minimum="100ms", maximum="1m")


@dataclass(frozen=True)
class RedisPolicy:
    """``[redis]``: the store for greylisting and other shared state."""

    url: str = text(
        "redis://127.0.0.1:6379/0",
        _is_redis_url,
        "a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL",
        allow_empty=False,
    )
    key_prefix: str = text(
        "mailgate:", lambda s: not re.search(r"\s", s), "a prefix without spaces"
    )
    on_error: str = choice("accept", "accept", "tempfail")
    # A store that stops answering costs a call at most pool_timeout (waiting for a
    # connection) plus timeout (its answer); then on_error decides. Sentinel: per sentinel.
    timeout: float = duration("1s", minimum="10ms", maximum="30s")
    pool_size: int = integer(50, minimum=1, maximum=10000)
    pool_timeout: float = duration("2s", maximum="30s")

    def problems(self) -> Iterable[Problem]:
        # The shape is the field's own check; this asks what redis-py will make of it.
        if _is_redis_url(self.url):
            problem = url_problem(self.url)
            if problem is not None:
                yield "url", problem


@dataclass(frozen=True)
class MetricsPolicy:
    """``[metrics]``: Prometheus and health endpoints (always on; bind to loopback to hide)."""

    listen: Address = address("127.0.0.1:9464")  # noqa: RUF009 (returns a Field)


@dataclass(frozen=True)
class AuthPolicy:
    """``[auth]``: naming in the Authentication-Results header."""

    authserv_id: str = text("", _is_token, "a token without spaces, ';' or quotes")


@dataclass(frozen=True)
class ActionsPolicy:
    """``[actions]``: score thresholds, checked from the top (reject first)."""

    reject: float = number(15.0)
    add_header: float = number(6.0)
    greylist: float = number(4.0)

    def problems(self) -> Iterable[Problem]:
        if not self.greylist <= self.add_header <= self.reject:
            yield (
                "",
                "thresholds must satisfy greylist <= add_header <= reject, got "
                f"greylist = {self.greylist}, add_header = {self.add_header}, "
                f"reject = {self.reject}",
            )


@dataclass(frozen=True)
class SPFPolicy:
    """``[spf]``: RFC 7208 for the MAIL FROM identity (and the HELO identity)."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    helo: bool = boolean(True)
    reject_on_fail: bool = boolean(False)


@dataclass(frozen=True)
class DKIMPolicy:
    """``[dkim]``: RFC 6376 verification with RFC 8301/8463 algorithm rules."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    max_signatures: int = integer(5, minimum=1, maximum=50)
    min_key_bits: int = integer(1024, minimum=1024, maximum=16384)


@dataclass(frozen=True)
class DMARCPolicy:
    """``[dmarc]``: RFC 9989 evaluation (RFC 7489 on request)."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    honor_reject: bool = boolean(True)
    honor_quarantine: bool = boolean(True)
    standard: str = choice("rfc9989", "rfc9989", "rfc7489")
    on_temperror: str = choice("tempfail", "tempfail", "accept")


@dataclass(frozen=True)
class ARCPolicy:
    """``[arc]``: RFC 8617 chain verification, trusted sealers, optional sealing."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    trusted_sealers: tuple[str, ...] = field(
        default=(), metadata={KIND: ListKind(StrKind(is_hostname, "a domain name", False))}
    )
    seal: bool = boolean(False)
    seal_domain: str = text("", is_hostname, "a domain name")
    seal_selector: str = text("", _is_token, "a DKIM selector")
    seal_key_file: str = text("")

    def problems(self) -> Iterable[Problem]:
        if self.seal and not (self.seal_domain and self.seal_selector and self.seal_key_file):
            yield "seal", "needs seal_domain, seal_selector and seal_key_file"


@dataclass(frozen=True)
class RDNSPolicy:
    """``[rdns]``: forward-confirmed reverse DNS of the client (RFC 8601 iprev), at connect."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)


@dataclass(frozen=True)
class HeloPolicy:
    """``[helo]``: HELO/EHLO name sanity, scored (RFC 5321 forbids refusing on it alone)."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)


@dataclass(frozen=True)
class DNSBLCode:
    """One entry of a zone's ``codes``: what an answer address means and weighs.

    ``score`` None means the zone's own score.
    """

    code: str
    label: str
    score: float | None = None


_CODE_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


@dataclass(frozen=True)
class CodeMapKind(Kind):
    """``codes``: answer address -> ``{ label = "SBL", score = 10.0 }`` (score optional).

    Kept as a sorted tuple of :class:`DNSBLCode` so the zone stays hashable and
    comparable. Keys must be addresses that can be a listing at all: a code in
    127.255.255.0/24, 127.0.0.1 or outside 127/8 is an error answer and could
    never match.
    """

    def parse(self, raw: object, key: str, problems: list[Problem]) -> Any:
        if not isinstance(raw, dict):
            problems.append((key, f"expected a table of answer codes, got {show_value(raw)}"))
            return INVALID
        codes: list[DNSBLCode] = []
        ok = True
        for code, entry in raw.items():
            item_key = join_key(key, f'"{code}"')
            if not is_listing_code(code):
                problems.append(
                    (
                        item_key,
                        "expected a listing address in 127.0.0.0/8 (not 127.0.0.1 "
                        "or 127.255.255.x, which are error answers)",
                    )
                )
                ok = False
                continue
            if not isinstance(entry, dict):
                problems.append(
                    (item_key, f"expected {{ label = ..., score = ... }}, got {show_value(entry)}")
                )
                ok = False
                continue
            for name in entry:
                if name not in ("label", "score"):
                    problems.append(
                        (
                            join_key(item_key, name),
                            "unknown key" + _did_you_mean(name, ("label", "score")),
                        )
                    )
                    ok = False
            label = entry.get("label")
            if not isinstance(label, str) or not _CODE_LABEL.fullmatch(label):
                problems.append(
                    (
                        join_key(item_key, "label"),
                        "required: letters, digits and _ (up to 32), like SBL",
                    )
                )
                ok = False
                continue
            score = None
            if "score" in entry:
                score = FloatKind().parse(entry["score"], join_key(item_key, "score"), problems)
                if score is INVALID:
                    ok = False
                    continue
            codes.append(DNSBLCode(str(IPv4Address(code)), label.upper(), score))
        if not ok:
            return INVALID
        return tuple(sorted(codes, key=lambda c: IPv4Address(c.code)))

    def dump(self, value: Any) -> TomlValue:
        out: dict[str, Any] = {}
        for c in cast(tuple[DNSBLCode, ...], value):
            entry: dict[str, Any] = {"label": c.label}
            if c.score is not None:
                entry["score"] = c.score
            out[c.code] = entry
        return out


def _is_code_address(value: str) -> bool:
    try:
        return IPv4Address(value) in IPv4Network("127.0.0.0/8")
    except ValueError:
        return False


_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_key(value: str) -> bool:
    return not value or bool(_KEY.fullmatch(value))


@dataclass(frozen=True)
class DNSBLZone:
    """One ``[[dnsbl.zones]]`` entry; ``zone`` is required.

    ``type = "ip"`` lists client addresses (RFC 5782 2.1/2.4, queried at connect);
    ``"domain"`` lists names (2.3), queried with the HELO name and the sender
    domain at MAIL FROM. ``allow`` makes it an allowlist (DNSWL): a negative
    score, never a reject, and the client counts as allowlisted for greylisting.
    ``codes`` names answer addresses (Spamhaus ZEN's SBL/XBL/PBL...);
    ``blocked_codes`` adds a list's own "query refused" answers to the built-in
    ones (127.0.0.1, 127.255.255.0/24, anything outside 127/8). ``key``, a paid
    list's access key (Spamhaus DQS, Abusix), goes in front of the zone in queries
    only (``<ip>.<key>.<zone>``): logs, metrics, symbols and headers show ``zone``.
    A key written into ``zone`` itself is hidden only when it looks like one.
    """

    zone: str = cast(str, field(metadata={KIND: StrKind(is_hostname, "a DNS zone name", False)}))
    score: float = number(0.0)
    reject: bool = boolean(False)
    name: str = text(
        "", lambda s: bool(SYMBOL_NAME.fullmatch(s)), "upper case letters, digits and _, like ZEN"
    )
    type: str = choice("ip", "ip", "domain")
    allow: bool = boolean(False)
    codes: tuple[DNSBLCode, ...] = _field((), CodeMapKind())
    blocked_codes: tuple[str, ...] = _field(
        (), ListKind(StrKind(_is_code_address, "an address in 127.0.0.0/8", False))
    )
    key: str = text("", _is_key, "letters, digits and hyphens (one DNS label)")

    @property
    def tag(self) -> str:
        """The zone's part of its symbols: ``name``, else derived from the zone."""
        return self.name or derived_tag(self.zone)

    @property
    def query_zone(self) -> str:
        """The zone as queries name it: with the access key in front, if any."""
        return f"{self.key}.{self.zone}" if self.key else self.zone

    def problems(self) -> Iterable[Problem]:
        if self.allow:
            if self.type == "domain":
                # HELO and MAIL FROM are the client's own claims: an allowlist on
                # them would let anyone opt out of the blocklists.
                yield "allow", 'allowlists work on the client address only (type = "ip")'
            if self.reject:
                yield "reject", "an allowlist zone (allow = true) never rejects"
            if self.score > 0:
                yield "score", "an allowlist zone (allow = true) needs a score <= 0"
            for c in self.codes:
                if c.score is not None and c.score > 0:
                    yield f'codes."{c.code}".score', "an allowlist zone needs scores <= 0"


@dataclass(frozen=True)
class DNSBLPolicy:
    """``[dnsbl]``: client IP (at connect) and HELO/sender domain (at MAIL) lookups."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    # postscreen_dnsbl_threshold: the summed scores of all hits reject at or
    # above this; 0 leaves rejecting to the zones' own reject flags.
    threshold: float = number(0.0, minimum=0.0)
    # RFC 5782 section 5 test queries per zone; 0 = only after a refused answer.
    probe_interval: float = duration("5m")
    zones: tuple[DNSBLZone, ...] = tables(DNSBLZone, DNSBLZone("zen.spamhaus.org", 10.0, True))

    def problems(self) -> Iterable[Problem]:
        seen: set[tuple[str, str]] = set()
        tags: dict[str, int] = {}
        for i, zone in enumerate(self.zones):
            name = zone.zone.lower().rstrip(".")
            if (name, zone.type) in seen:
                yield f"zones[{i}].zone", f'"{zone.zone}" is listed twice'
                continue
            seen.add((name, zone.type))
            # Every symbol the zone can produce, its codes' included: "ZEN" with code
            # label "SBL" and a zone named "ZEN_SBL" both make DNSBL_ZEN_SBL, and the
            # check keeps one hit per symbol, so one zone's listing (maybe the one
            # that rejects) would silently vanish behind the other's.
            symbols = [symbol_for(zone.tag, "", zone.allow)]
            symbols += [symbol_for(zone.tag, c.label, zone.allow) for c in zone.codes]
            clashes = sorted({tags[sym] for sym in symbols if tags.get(sym, i) != i})
            for j in clashes:
                shared = sorted(sym for sym in set(symbols) if tags.get(sym) == j)
                yield (
                    f"zones[{i}].name",
                    f"symbol {', '.join(shared)} is already used by zones[{j}]; "
                    "set a distinct name",
                )
            for sym in symbols:
                tags.setdefault(sym, i)


@dataclass(frozen=True)
class GreylistPolicy:
    """``[greylist]``: triplet greylisting kept in the store."""

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    apply: str = choice("always", "always", "score")
    delay: float = duration("5m")
    retry_window: float = duration("2d", minimum="1m")
    max_age: float = duration("35d", minimum="1h")
    ipv4_prefix: int = integer(24, minimum=8, maximum=32)
    ipv6_prefix: int = integer(64, minimum=32, maximum=128)
    # Passes (at most one per hour) after which a client network is no longer
    # greylisted, like postgrey's --auto-whitelist-clients; 0 turns it off.
    awl_count: int = integer(5, minimum=0, maximum=1000)
    # Key SPF-passing mail by the sender domain instead of the client network, so a
    # retry from another address of the sender's pool matches.
    pool_aware: bool = boolean(True)
    allow_clients: tuple[Network, ...] = networks()
    allow_rdns: tuple[str, ...] = field(
        default=(), metadata={KIND: ListKind(StrKind(is_hostname, "a host name suffix", False))}
    )
    allow_sender_domains: tuple[str, ...] = field(
        default=(), metadata={KIND: ListKind(StrKind(is_hostname, "a domain name", False))}
    )
    skip_recipients: tuple[str, ...] = field(
        default=(),
        metadata={
            KIND: ListKind(StrKind(_is_recipient_pattern, "user@domain, @domain or user@", False))
        },
    )

    def problems(self) -> Iterable[Problem]:
        if self.delay >= self.retry_window:
            yield "delay", "must be shorter than retry_window"
        if self.max_age < self.retry_window:
            yield "max_age", "must be at least retry_window"


@dataclass(frozen=True)
class ExplainPolicy:
    """``[explain]``: how long each verdict stays in the store for ``mailgate explain``.

    Bounded so that Redis memory follows recent traffic (every record carries this
    TTL); 0 keeps nothing, for sites that must not hold envelopes outside their logs.
    """

    keep: float = duration("7d", maximum="365d")


@dataclass(frozen=True)
class RateLimitPolicy:
    """``[ratelimit]``: cluster-wide sliding-window limits kept in the store; off by default.

    Each limit is events per ``window``; 0 leaves that one unlimited. Over a limit the
    client gets 451 4.7.0 (it retries later, as for greylisting). Sender domains count
    as themselves only when SPF passed for them; otherwise per claimed domain and
    client network, so a forged MAIL FROM cannot use up a real domain's quota.
    """

    enabled: bool = boolean(False)
    mode: str = choice("enforce", *CHECK_MODES)
    window: float = duration("1m", minimum="1s", maximum="1d")
    connections_per_network: int = integer(0, minimum=0, maximum=1_000_000)
    messages_per_network: int = integer(0, minimum=0, maximum=1_000_000)
    recipients_per_network: int = integer(0, minimum=0, maximum=1_000_000)
    messages_per_sender_domain: int = integer(0, minimum=0, maximum=1_000_000)
    recipients_per_sender_domain: int = integer(0, minimum=0, maximum=1_000_000)
    ipv4_prefix: int = integer(24, minimum=8, maximum=32)
    ipv6_prefix: int = integer(64, minimum=32, maximum=128)
    exempt_clients: tuple[Network, ...] = networks()


def _is_path(value: str) -> bool:
    """A file name as written: no NUL, no surrounding spaces (a pasted path keeps them)."""
    return "\0" not in value and value == value.strip()


@dataclass(frozen=True)
class ListsPolicy:
    """``[lists]``: allow and block list files (see ``policies/lists/README``).

    Paths only: this module reads no files. The loader resolves relative paths
    against the main policy file's directory and parses every named file at each
    load, so a bad line refuses the policy (and a SIGHUP) like any other error.
    A block list entry is a hard reject; an allow list entry scores (``LIST_ALLOW_*``)
    and exempts from greylisting. Allowing by sender needs SPF to pass for the
    sender's domain unless ``allow_senders_require_spf`` is off: anyone can write
    any MAIL FROM.
    """

    enabled: bool = boolean(True)
    mode: str = choice("enforce", *CHECK_MODES)
    allow_clients: str = text("", _is_path, "a file name")
    block_clients: str = text("", _is_path, "a file name")
    allow_senders: str = text("", _is_path, "a file name")
    block_senders: str = text("", _is_path, "a file name")
    block_recipients: str = text("", _is_path, "a file name")
    allow_senders_require_spf: bool = boolean(True)

    def files(self) -> list[tuple[str, str]]:
        """(key, path) of every list that is set, in a fixed order."""
        names = ("allow_clients", "block_clients", "allow_senders", "block_senders")
        return [(n, getattr(self, n)) for n in (*names, "block_recipients") if getattr(self, n)]

    def problems(self) -> Iterable[Problem]:
        seen: dict[str, str] = {}
        for name, path in self.files():
            if path in seen:
                yield name, f"also set as {seen[path]}: one file is one list"
            seen.setdefault(path, name)


@dataclass(frozen=True)
class LoggingPolicy:
    """``[logging]``: format and verbosity of the log lines on stderr."""

    format: str = choice("kv", "kv", "json")
    level: str = choice("info", "debug", "info", "warning", "error")


# Default symbol scores (rspamd's order of magnitude: a pass is a small negative,
# SPF + DKIM + DMARC passing sum to -1.5). Checks add theirs here and to mailgate.toml.
DEFAULT_SCORES: Mapping[str, float] = MappingProxyType(
    {
        "SPF_PASS": -0.5,
        "SPF_FAIL": 2.0,
        "SPF_SOFTFAIL": 1.0,
        "SPF_NEUTRAL": 0.0,
        "SPF_NONE": 0.0,
        "SPF_TEMPERROR": 0.0,
        "SPF_PERMERROR": 0.5,
        "SPF_HELO_PASS": 0.0,
        "SPF_HELO_FAIL": 1.0,
        "DKIM_PASS": -0.5,
        "DKIM_FAIL": 1.0,
        "DKIM_NONE": 0.0,
        "DKIM_TEMPERROR": 0.0,
        "DKIM_PERMERROR": 0.5,
        "DMARC_PASS": -0.5,
        "DMARC_REJECT": 4.0,
        "DMARC_QUARANTINE": 3.0,
        "DMARC_POLICY_NONE": 0.0,  # RFC 9989 §5.4: p=none must not change handling
        "DMARC_NONE": 0.0,
        "DMARC_TEMPERROR": 0.0,
        "DMARC_PERMERROR": 0.0,
        "ARC_PASS": -0.2,
        "ARC_FAIL": 0.5,
        "ARC_NONE": 0.0,
        "ARC_TEMPERROR": 0.0,
        "ARC_TRUSTED_OVERRIDE": 0.0,
        "GREYLIST_NEW": 0.0,
        "GREYLIST_EARLY": 0.0,
        "GREYLIST_PASSED": 0.0,
        "GREYLIST_AWL": 0.0,
        "GREYLIST_STORE_ERROR": 0.0,
        "RATELIMIT_CONNECTIONS": 0.0,
        "RATELIMIT_MESSAGES": 0.0,
        "RATELIMIT_RECIPIENTS": 0.0,
        "RATELIMIT_STORE_ERROR": 0.0,
        # DNSBL hits score per zone/code ([dnsbl]); these cover "no zone answered".
        "DNSBL_TEMPERROR": 0.0,
        "DNSBL_DOMAIN_TEMPERROR": 0.0,
        "RDNS_PASS": 0.0,
        "RDNS_NONE": 1.5,
        "RDNS_MISMATCH": 0.5,
        "RDNS_TEMPERROR": 0.0,
        "HELO_INVALID": 1.5,
        "HELO_BARE_IP": 1.5,
        "HELO_LITERAL_MISMATCH": 1.0,
        "HELO_NOT_FQDN": 1.0,
        "HELO_OURS": 4.0,
        "HELO_NXDOMAIN": 0.5,
        "HELO_TEMPERROR": 0.0,
        # List files ([lists]): an allow entry outweighs a typical spam score; a block
        # entry rejects by itself, its score only counts in monitor mode.
        "LIST_ALLOW_CLIENT": -10.0,
        "LIST_ALLOW_SENDER": -10.0,
        "LIST_BLOCK_CLIENT": 10.0,
        "LIST_BLOCK_SENDER": 10.0,
        "LIST_BLOCK_RECIPIENT": 10.0,
    }
)


#: Check names as the pipeline runs them (one table may run as two checks).
PIPELINE_CHECKS = (*CHECK_TABLES, "dnsbl_domain", "lists_rcpt", "ratelimit_connect")

#: Every symbol ``[scores]`` may name: the defaults, each check's ``<NAME>_TEMPERROR``
#: (a check that timed out or crashed), and the result words of SPF, DKIM and ARC
#: without a default score. A name outside it is an error, not a silently dead line:
#: ``SPF_PAS = -1`` would otherwise score nothing. DNSBL symbols are not here: the
#: zones' symbols (``DNSBL_<NAME>[_<LABEL>]``, ``DNSWL_…``) are named by the admin's
#: own zone tables, so any name with their prefix is accepted.
ZONE_SYMBOL_PREFIXES = ("DNSBL_", "DNSWL_")
KNOWN_SYMBOLS: frozenset[str] = frozenset(
    {
        *DEFAULT_SCORES,
        *(f"{name.upper()}_TEMPERROR" for name in PIPELINE_CHECKS),
        *(
            f"{method}_{word.upper()}"
            for method in ("SPF", "DKIM", "ARC")
            for word in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
            if not (method != "SPF" and word in ("softfail", "neutral"))
        ),
    }
)


@dataclass(frozen=True)
class DomainOverride:
    """One ``[domains."example.com"]`` table: what differs for mail to that domain.

    Applies to recipients in the domain and its subdomains (the most specific entry
    wins). Keys left out inherit the global policy.
    """

    mode: str = choice("inherit", "inherit", "enforce", "monitor")
    checks: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), metadata={KIND: CheckModeMapKind()}
    )
    reject: float | None = field(default=None, metadata={KIND: OptionalFloatKind()})
    add_header: float | None = field(default=None, metadata={KIND: OptionalFloatKind()})
    greylist: float | None = field(default=None, metadata={KIND: OptionalFloatKind()})
    scores: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({}), metadata={KIND: ScoreMapKind({})}
    )

    def problems(self) -> Iterable[Problem]:
        names = ("greylist", "add_header", "reject")
        given = [(k, getattr(self, k)) for k in names if getattr(self, k) is not None]
        values = [v for _, v in given]
        if values != sorted(values):
            shown = ", ".join(f"{k} = {v:g}" for k, v in given)
            yield "", f"thresholds must satisfy greylist <= add_header <= reject, got {shown}"


@dataclass(frozen=True)
class Policy:
    """The whole validated policy; a session keeps the snapshot it started with."""

    server: ServerPolicy = field(default_factory=ServerPolicy, metadata=table(ServerPolicy))
    upstream: UpstreamPolicy = field(default_factory=UpstreamPolicy, metadata=table(UpstreamPolicy))
    dns: DNSPolicy = field(default_factory=DNSPolicy, metadata=table(DNSPolicy))
    redis: RedisPolicy = field(default_factory=RedisPolicy, metadata=table(RedisPolicy))
    metrics: MetricsPolicy = field(default_factory=MetricsPolicy, metadata=table(MetricsPolicy))
    auth: AuthPolicy = field(default_factory=AuthPolicy, metadata=table(AuthPolicy))
    actions: ActionsPolicy = field(default_factory=ActionsPolicy, metadata=table(ActionsPolicy))
    spf: SPFPolicy = field(default_factory=SPFPolicy, metadata=table(SPFPolicy))
    dkim: DKIMPolicy = field(default_factory=DKIMPolicy, metadata=table(DKIMPolicy))
    dmarc: DMARCPolicy = field(default_factory=DMARCPolicy, metadata=table(DMARCPolicy))
    arc: ARCPolicy = field(default_factory=ARCPolicy, metadata=table(ARCPolicy))
    rdns: RDNSPolicy = field(default_factory=RDNSPolicy, metadata=table(RDNSPolicy))
    helo: HeloPolicy = field(default_factory=HeloPolicy, metadata=table(HeloPolicy))
    dnsbl: DNSBLPolicy = field(default_factory=DNSBLPolicy, metadata=table(DNSBLPolicy))
    greylist: GreylistPolicy = field(default_factory=GreylistPolicy, metadata=table(GreylistPolicy))
    lists: ListsPolicy = field(default_factory=ListsPolicy, metadata=table(ListsPolicy))
    ratelimit: RateLimitPolicy = field(
        default_factory=RateLimitPolicy, metadata=table(RateLimitPolicy)
    )
    logging: LoggingPolicy = field(default_factory=LoggingPolicy, metadata=table(LoggingPolicy))
    explain: ExplainPolicy = field(default_factory=ExplainPolicy, metadata=table(ExplainPolicy))
    scores: Mapping[str, float] = score_map(DEFAULT_SCORES)
    domains: Mapping[str, DomainOverride] = field(
        default_factory=lambda: MappingProxyType({}), metadata={KIND: DomainMapKind()}
    )

    def problems(self) -> Iterable[Problem]:
        """Rules across tables: settings that could never take effect."""
        lists = self.lists
        if lists.allow_senders and lists.allow_senders_require_spf and not self.spf.enabled:
            # The SPF check is not even built then, so no entry could ever match.
            yield (
                "lists.allow_senders",
                "never matches with [spf] enabled = false (allow_senders_require_spf "
                "wants an SPF pass); enable SPF or set allow_senders_require_spf = false",
            )

    def override_for(self, domain: str | None) -> DomainOverride | None:
        """The ``[domains]`` entry for ``domain`` or its nearest parent, if any."""
        name = to_a_label(domain) if domain and self.domains else None
        if not name:
            return None
        labels = name.split(".")
        for i in range(len(labels) - 1):
            found = self.domains.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None

    def check_mode(self, check: str, override: DomainOverride | None = None) -> str:
        """ "enforce", "monitor" or "off" for a check, domain override first."""
        table = check.split("_", 1)[0]
        if override is not None and table in override.checks:
            return override.checks[table]
        section = getattr(self, table, None)
        if section is not None and not getattr(section, "enabled", True):
            return "off"
        return str(getattr(section, "mode", "enforce"))

    def score(self, symbol: str, default: float = 0.0) -> float:
        """Score of ``symbol`` from ``[scores]``, else ``default``."""
        return self.scores.get(symbol, default)

    @property
    def authserv_id(self) -> str:
        """``auth.authserv_id``, else the server's host name (RFC 8601 suggests the host)."""
        return self.auth.authserv_id or self.server.effective_hostname


DEFAULT_POLICY = Policy()


# --- the generic walker --------------------------------------------------------


def _ies(n: int) -> str:
    return "y" if n == 1 else "ies"


def _check_range(value: Any, minimum: Any, maximum: Any, show: Callable[[Any], str]) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {show(minimum)}, got {show(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {show(maximum)}, got {show(value)}")


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    import difflib  # only a policy with a mistake in it needs it

    close = difflib.get_close_matches(word, list(options), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def kind_of(f: dataclasses.Field[Any]) -> Kind:
    """The declared kind of a schema field."""
    return cast(Kind, f.metadata[KIND])


def build_table(cls: type[T], raw: object, key: str, problems: list[Problem]) -> T | _Invalid:
    """Validate one TOML table into ``cls``; every problem found is appended, not just the first."""
    if not isinstance(raw, dict):
        problems.append((key or "-", f"expected a table, got {show_value(raw)}"))
        return INVALID
    schema_fields = dataclasses.fields(cast(Any, cls))
    names = [f.name for f in schema_fields]
    for name in raw:
        if name not in names:
            problems.append((join_key(key, name), "unknown key" + _did_you_mean(name, names)))
    values: dict[str, Any] = {}
    ok = True
    for f in schema_fields:
        if f.name in raw:
            value = kind_of(f).parse(raw[f.name], join_key(key, f.name), problems)
            if value is INVALID:
                ok = False
            else:
                values[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((join_key(key, f.name), "required key is missing"))
            ok = False
    if not ok:
        return INVALID
    obj = cls(**values)
    check = getattr(obj, "problems", None)
    if check is not None:
        for sub, message in check():
            problems.append((join_key(key, sub) if sub else key, message))
    return obj


def policy_from_dict(data: Mapping[str, Any]) -> tuple[Policy | None, list[Problem]]:
    """Validate merged TOML data; the policy is ``None`` whenever there are problems."""
    problems: list[Problem] = []
    result = build_table(Policy, dict(data), "", problems)
    if problems or isinstance(result, _Invalid):
        return None, problems
    return result, problems


def to_toml_data(obj: Any) -> dict[str, TomlValue]:
    """The TOML data an admin would write for a schema object (human units)."""
    return {f.name: kind_of(f).dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def schema_keys(cls: type[Any] = Policy, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, tables included; arrays of tables are not descended."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        key = join_key(prefix, f.name)
        keys.append(key)
        kind = kind_of(f)
        if isinstance(kind, TableKind):
            keys.extend(schema_keys(kind.cls, key))
    return keys
