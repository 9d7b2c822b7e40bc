"""``redis.url`` taken apart and judged before anything connects.

Why this module exists: a URL that redis-py cannot use fails only when the first
connection is made (a port out of range, an option it does not know, a database
that is not a number), which for ``mailgate serve`` meant a traceback at start or,
after a reload, a store that silently failed every call. ``policy check`` and the
loader ask :func:`url_problem` instead, and get the reason in the admin's words.
The forms of each scheme are in :mod:`filter.store`'s docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["StoreURL", "parse_store_url", "url_problem"]

# Query options of the URL forms that redis-py does not parse (its own forms take
# whatever its connection classes take; url_problem asks them).
_SENTINEL_OPTIONS = frozenset({"db", "sentinel_password"})
_CLUSTER_OPTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StoreURL:
    """``redis.url`` taken apart: which client to build and with what."""

    mode: str  # "standalone" | "sentinel" | "cluster"
    url: str  # the URL as given (standalone: handed to redis-py as is)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


def _hosts(netloc_hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """``h1:1,[::1]:2,h3`` -> ((h1, 1), (::1, 2), (h3, default_port))."""
    out: list[tuple[str, int]] = []
    for item in netloc_hosts.split(","):
        item = item.strip()
        if not item:
            raise ValueError("empty host in the host list")
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, ""
        if port_text and not port_text.isdigit():
            raise ValueError(f"bad port in {item!r}")
        port = int(port_text) if port_text else default_port
        if not host:
            raise ValueError(f"no host in {item!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} of {item!r} is out of range 1-65535")
        out.append((host, port))
    return tuple(out)


def parse_store_url(url: str) -> StoreURL:
    """Split ``redis.url`` into a :class:`StoreURL` (ValueError when it makes no sense).

    Standalone URLs are left to redis-py's own parser; Sentinel and Cluster URLs
    have no standard form in redis-py, so the forms in this module's docstring are
    parsed here. Host lists are split by hand: ``urlsplit`` cannot take
    ``h1:1,h2:2`` apart.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return StoreURL("standalone", url)
    if scheme not in _SENTINEL_SCHEMES and scheme not in _CLUSTER_SCHEMES:
        raise ValueError(f"unsupported scheme {parts.scheme!r}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = _CLUSTER_OPTIONS if scheme in _CLUSTER_SCHEMES else _SENTINEL_OPTIONS
    unknown = sorted(set(query) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown option {unknown[0]!r} (this scheme takes: {allowed})")
    if scheme in _CLUSTER_SCHEMES:
        return StoreURL(
            "cluster",
            url,
            _hosts(hostlist, 6379),
            tls=_CLUSTER_SCHEMES[scheme],
            username=username,
            password=password,
        )
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("redis+sentinel:// needs the service name as the path")
    if len(path) > 2:
        raise ValueError("redis+sentinel:// takes /service[/db] as the path")
    db_text = path[1] if len(path) > 1 else query.get("db", "0")
    if not db_text.isdigit():
        raise ValueError(f"database {db_text!r} is not a number")
    db = int(db_text)
    return StoreURL(
        "sentinel",
        url,
        _hosts(hostlist, 26379),
        service=unquote(path[0]),
        db=db,
        tls=_SENTINEL_SCHEMES[scheme],
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password"),
    )


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot serve as ``redis.url``, or None when it can.

    Standalone URLs are judged the way redis-py will use them: a pool is built from
    the URL and one connection object made (no socket is opened), so an option its
    connection classes do not take is found now. Two things redis-py lets pass are
    refused here: a database path that is not a number (redis-py silently uses 0)
    and port 0.
    """
    try:
        parsed = parse_store_url(url)
    except ValueError as exc:
        return str(exc)
    if parsed.mode != "standalone":
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "port out of range 1-65535"
    if port == 0:
        return "port out of range 1-65535"
    if parts.scheme.lower() in ("redis", "rediss"):
        if not parts.hostname:
            return "no host"
        db = unquote(parts.path).strip("/")
        if db and not db.isdigit():
            return f"database {db!r} is not a number (redis://host:port/DB)"
    # Here, not at the top: redis-py takes longer to import than the rest of the policy
    # code, and only a standalone URL that passed the checks above needs it.
    import redis.asyncio as aioredis

    try:
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        return f"unknown option {name.group(1)!r}" if name else str(exc)
    except ValueError as exc:
        return str(exc)
    return None
