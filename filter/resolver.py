"""The one DNS layer every check uses: async, cached, de-duplicated, measured (L2).

API contract (other modules code against exactly this):

- ``Resolver(nameservers: Sequence[Address] = (), timeout: float = 3.0,
  metrics: Metrics | None = None, cache_size: int = 50_000)``: empty ``nameservers``
  means /etc/resolv.conf. ``timeout`` is the lifetime of one lookup including retries.
- ``await resolver.resolve(name, rtype) -> DNSResult``: never raises for NXDOMAIN or
  NODATA (see ``DNSResult.outcome``); raises ``DNSTempError`` for timeout, SERVFAIL,
  REFUSED or network trouble. Names may be Unicode: they are converted to A-labels
  (IDNA 2008 / UTS 46). A trailing dot is optional.
- Convenience: ``txt(name) -> list[bytes]`` (each record's character-strings joined),
  ``addresses(name, rtype="A") -> list[str]``, ``mx(name) -> list[tuple[int, str]]``,
  ``ptr(ip) -> list[str]``, all returning [] for NXDOMAIN/NODATA.
- ``resolver.blocking(loop) -> BlockingResolver`` with the same ``resolve``/``txt``/...
  methods as plain functions, for libraries that must run in a worker thread (pyspf):
  each call runs on ``loop`` and shares the cache.

Additions to the contract (keyword-only, all optional):

- ``Resolver(..., retries=1, clock=time.monotonic)``: ``timeout`` is split into
  ``retries + 1`` tries per nameserver round (a lost UDP packet costs one try, not the
  whole budget); ``clock`` drives cache expiry (tests inject a fake one). Each try
  has its own socket, so an answer later than one try's share is lost: two tries of
  half the budget each, not three of a third (a resolver answering in 1.1 s of a 3 s
  budget timed out every time). The budget is a hard bound on the whole lookup.
- ``resolve(name, rtype="A", *, fresh=False)``: ``rtype`` defaults to A. ``fresh=True``
  skips the cache read and always asks the network (health probes: a cached answer says
  nothing about the server now); see ``Resolver.resolve`` for why its answer is still
  cached and may share a query already in flight.
- ``resolver.clear_cache()``, ``resolver.forget(name, rtype)`` and ``len(resolver.cache)``;
  ``normalise_name(name)``.
- ``DNSCache``: the pure TTL + LRU cache the resolver uses.

Behaviours decided here:

- Invalid names (empty label, label over 63 or name over 255 octets, whitespace or
  backslash, names IDNA refuses) raise ``ValueError``: no query is sent. Unknown or
  meta rtypes (ANY, AXFR...) raise ``ValueError`` too. Callers map that to
  permerror/none as their RFC says.
- ``DNSResult.name`` is the normalised query name (lower-case A-labels, no trailing
  dot), also when the answer came through a CNAME chain.
- Outcomes: NOERROR with data -> "ok"; NOERROR without -> "nodata"; NXDOMAIN ->
  "nxdomain". ``DNSTempError.reason`` is "timeout", "servfail", "refused",
  "yxdomain", "no nameservers", "network: <detail>" or "malformed answer: <detail>".
  YXDOMAIN (a DNAME rewrite too long) is permanent in theory but so rare that it is
  reported as a temporary error rather than invented into an NXDOMAIN; it is not
  cached either.
- Malformed replies are temporary errors, never an answer: over UDP dnspython drops
  what it cannot parse or what does not match the query (ID, QR, opcode, question)
  and waits for the real reply until the timeout; over TCP such a reply, or a
  connection closed early, fails the lookup at once. A NODATA or NXDOMAIN reply
  whose answer section holds records the CNAME chain does not explain (another
  owner, another type) is malformed too, not "no such record".
- Cache: positive TTL is the smallest TTL of the answer (CNAME chain included), capped
  at one day. Negative TTL (NXDOMAIN, NODATA) is min(SOA TTL, SOA minimum) from the
  authority section (RFC 2308), 60 s without a SOA, capped at one hour. TTL 0 is not
  cached, nor is a TTL of 2^31 or more (RFC 2181 8: dnspython reads it as 0).
  Temporary errors are never cached. LRU eviction past ``cache_size``
  entries; ``cache_size=0`` disables the cache. A cached result's ``ttl`` is the time
  it has left.
- Concurrent misses for the same (name, rtype) share one network query; its error
  reaches every waiter; a cancelled waiter leaves the query running for the others.
- Queries use EDNS0 with a 1232-byte UDP payload (DNS flag day 2020) and retry over
  TCP when the reply is truncated (dnspython does that itself; a test proves it).
- Metrics: one ``observe_dns(rtype, outcome, seconds)`` per network query (de-duplicated
  waiters and cache hits are not queries), outcome ok|nxdomain|nodata|timeout|servfail
  |error; REFUSED and network trouble count as "error".
- Without ``nameservers`` and without a usable /etc/resolv.conf the resolver is still
  built (so the proxy starts) and every lookup raises ``DNSTempError("no nameservers")``.
- MX data: ``(preference, host)`` with host "." for a null MX (RFC 7505); ``mx()`` sorts
  by preference, then host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import filter.dnsfeatures  # noqa: F401  # before dns.query loads: no DoH (see there)

# isort: split
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename
import idna

if TYPE_CHECKING:
    from filter.metrics import Metrics
    from filter.units import Address

__all__ = [
    "BlockingResolver",
    "DNSCache",
    "DNSError",
    "DNSResult",
    "DNSTempError",
    "Resolver",
    "normalise_name",
]

POSITIVE_TTL_CAP = 86_400
NEGATIVE_TTL_CAP = 3_600
NEGATIVE_TTL_DEFAULT = 60
EDNS_PAYLOAD = 1232
MAX_TTL = 2**31 - 1  # RFC 2181 8: a TTL with the top bit set is treated as zero

_T = TypeVar("_T")
_Key = tuple[str, str]


class DNSError(Exception):
    """Base of this module's errors."""


class DNSTempError(DNSError):
    """A lookup that may succeed later: timeout, SERVFAIL, REFUSED, network error."""

    def __init__(self, name: str, rtype: str, reason: str) -> None:
        super().__init__(f"{name}/{rtype}: {reason}")
        self.name = name
        self.rtype = rtype
        self.reason = reason


@dataclass(frozen=True)
class DNSResult:
    """One answer. ``data`` is typed by rtype:

    A/AAAA: str address; MX: (preference, host); PTR/CNAME/NS: host (no trailing dot,
    lower case); TXT: tuple[bytes, ...] (the character-strings of one record);
    SOA: str (text form).
    """

    name: str
    rtype: str
    outcome: str  # "ok" | "nxdomain" | "nodata"
    data: tuple[object, ...] = ()
    ttl: int = 0


# -- names -----------------------------------------------------------------------------------

_BAD_CHARS = frozenset(" \t\r\n\v\f\\")


@functools.lru_cache(maxsize=8192)
def normalise_name(name: str) -> str:
    """Lower-case A-label form without trailing dot, or ``ValueError``.

    One form per name keeps the cache and the de-duplication keyed on what is actually
    asked. ASCII labels pass as they are (underscores and digits are everyday DNS:
    ``_dmarc``, DNSBL reversed IPs); only labels with non-ASCII go through IDNA.
    Memoised: every cache hit starts here, and the same few names are asked for
    message after message (a bad name raises, and is not remembered).
    """
    if not isinstance(name, str):
        raise ValueError(f"DNS name must be a string, not {type(name).__name__}")
    if name.isascii():
        text = name.lower()
    else:
        try:  # maps case, full-width dots and other UTS 46 equivalents
            text = idna.uts46_remap(name, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise ValueError(f"invalid DNS name {name!r}: {e}") from None
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty DNS name")
    if any(c in _BAD_CHARS or not c.isprintable() for c in text):
        raise ValueError(f"invalid DNS name {name!r}: whitespace or backslash")
    labels: list[bytes] = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label.encode("ascii"))
            continue
        try:
            labels.append(idna.alabel(label))
        except idna.IDNAError as e:
            raise ValueError(f"invalid DNS name {name!r}: {e}") from None
    try:  # label and name length limits, empty labels
        dns.name.Name([*labels, b""])
    except dns.exception.DNSException as e:
        raise ValueError(f"invalid DNS name {name!r}: {e}") from None
    return b".".join(labels).decode("ascii")


@functools.lru_cache(maxsize=64)
def _normalise_rtype(rtype: str) -> str:
    """Upper-case type mnemonic that dnspython knows and that is a plain query type."""
    text = str(rtype).upper()
    try:
        value = dns.rdatatype.from_text(text)
    except dns.exception.DNSException:
        raise ValueError(f"unknown DNS record type {rtype!r}") from None
    if dns.rdatatype.is_metatype(value) or value == dns.rdatatype.ANY:
        raise ValueError(f"{text} is a meta type, not a record type to look up")
    return dns.rdatatype.to_text(value)


def _host(name: dns.name.Name) -> str:
    """Host text the way DNSResult promises: lower case, no trailing dot ("." for root)."""
    return name.to_text(omit_final_dot=True).lower()


def _rdata_value(rd: dns.rdata.Rdata) -> object:
    """The plain Python value DNSResult.data holds for one record."""
    rdtype = rd.rdtype
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(rd.address)  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        return (int(rd.preference), _host(rd.exchange))  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return tuple(bytes(s) for s in rd.strings)  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return _host(rd.target)  # type: ignore[attr-defined]
    return rd.to_text()


def _stray_record(response: dns.message.Message | None) -> str:
    """The first answer-section RRset that is not part of the answer, as text; "" if none.

    dnspython reads a NOERROR or NXDOMAIN reply by following the CNAME chain from the
    question and ignores everything else in the answer section. So an A query answered
    with an AAAA record, or with an A record for another owner, came out as NODATA: a
    false "no such record" (SPF none, DNSBL "not listed", no DKIM key), cached for a
    minute. No resolver sends that for a sound answer, so the reply is malformed and
    the lookup a temporary error. Only the records the chain explains may be there:
    its CNAMEs, plus DNAMEs above a chain name and signatures on one.
    """
    if not isinstance(response, dns.message.QueryMessage) or not response.answer:
        return ""
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as e:  # dnspython followed it already; never mind
        return f"unusable CNAME chain ({e})"
    names = {response.question[0].name, chain.canonical_name}
    names.update(rrset.name for rrset in chain.cnames)
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.CNAME and rrset.name in names:
            continue
        if rrset.rdtype == dns.rdatatype.RRSIG and rrset.name in names:
            continue
        if rrset.rdtype == dns.rdatatype.DNAME and any(n.is_subdomain(rrset.name) for n in names):
            continue
        rtype = dns.rdatatype.to_text(rrset.rdtype)
        return f"{rtype} record for {_host(rrset.name)} outside the answer"
    return ""


def _malformed(response: dns.message.Message | None, *, negative: bool) -> str:
    """Why a reply dnspython accepted is still no answer to rely on; "" when it is one.

    - TC still set: dnspython retries a truncated UDP reply over TCP but takes a TCP
      reply as it comes, TC or not, so an empty truncated one read as NODATA. A reply
      that says it is incomplete is no proof that nothing more exists.
    - A negative reply (NODATA, NXDOMAIN) with records the CNAME chain does not
      explain: see ``_stray_record``.
    """
    if response is None:
        return ""
    if response.flags & dns.flags.TC:
        return "truncated reply over TCP"
    return _stray_record(response) if negative else ""


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308 §5: min(SOA TTL, SOA minimum) from the authority section.

    A MINIMUM of 2^31 or more counts as 0, as RFC 2181 8 says of TTLs (dnspython
    already does so for the record's own TTL): the field is used as one here.
    """
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                minimum = int(rrset[0].minimum)
                if minimum > MAX_TTL:
                    minimum = 0
                return max(0, min(int(rrset.ttl), minimum, NEGATIVE_TTL_CAP))
    return NEGATIVE_TTL_DEFAULT


# -- cache -----------------------------------------------------------------------------------


class DNSCache:
    """Results keyed by (name, rtype) with TTL expiry and an LRU size bound.

    Pure (no I/O, injected clock) so TTL and eviction are tested without a server.
    Not thread-safe: only the event loop thread touches it.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max(0, max_entries)
        self._clock = clock
        self._data: OrderedDict[_Key, tuple[float, DNSResult]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: _Key) -> DNSResult | None:
        """The cached result with ``ttl`` set to what is left, or None if absent/expired."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, result = entry
        left = expires - self._clock()
        if left <= 0:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        ttl = int(left)
        if ttl == result.ttl:
            return result
        # the constructor, not dataclasses.replace: this is every cache hit's path
        return DNSResult(result.name, result.rtype, result.outcome, result.data, ttl)

    def put(self, key: _Key, result: DNSResult) -> None:
        """Keep ``result`` for ``result.ttl`` seconds; TTL 0 or a zero-size cache keeps none."""
        if result.ttl <= 0 or self.max_entries == 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + result.ttl, result)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def discard(self, key: _Key) -> None:
        self._data.pop(key, None)


# -- resolver --------------------------------------------------------------------------------


class _Failure(Exception):
    """Internal: a temporary failure with its metric outcome, before naming the query."""

    def __init__(self, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metric = metric


def _error_text(what: object) -> str:
    """One nameserver's failure as the reason text logs show.

    Not everything that is neither a timeout nor an rcode is the network's fault, and
    some exceptions have no text (an unparsable TCP answer once logged "network: ", a
    CNAME loop "network: The CNAME chain is too long."). The log line must say what
    happened: a reply dnspython could not use is "malformed answer: <detail>", a TCP
    connection closed early says so.
    """
    if isinstance(what, dns.exception.Timeout):
        return "timeout"
    if isinstance(what, str):  # the rcode of an answer dnspython did not accept
        return what.lower()
    detail = str(what) or type(what).__name__
    if isinstance(what, EOFError):
        return "network: connection closed before a whole answer"
    if isinstance(what, OSError):
        return f"network: {detail}"
    if isinstance(what, dns.exception.DNSException):  # FormError, BadResponse, ChainTooLong
        return f"malformed answer: {detail}"
    return f"error: {detail}"


def _temp_reason(exc: dns.resolver.NoNameservers) -> tuple[str, str]:
    """(reason, metric outcome) from what each nameserver said."""
    # A truncated UDP reply is no failure of its own, only the cue for TCP: the reason
    # is what went wrong over TCP.
    said = [
        _error_text(err[3])  # (nameserver, tcp, port, exception or rcode, response)
        for err in exc.kwargs.get("errors", [])
        if err[1] or not isinstance(err[3], dns.message.Truncated)
    ]
    if "servfail" in said:
        return "servfail", "servfail"
    if "refused" in said:
        return "refused", "error"
    if said and all(s == "timeout" for s in said):
        return "timeout", "timeout"
    if said:
        return said[0], "error"
    return "no nameservers", "error"


class Resolver:
    """Async resolver with one shared cache; see the module docstring for the contract."""

    def __init__(
        self,
        nameservers: Sequence[Address] = (),
        timeout: float = 3.0,
        metrics: Metrics | None = None,
        cache_size: int = 50_000,
        *,
        retries: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = float(timeout)
        self.metrics = metrics
        self.cache = DNSCache(cache_size, clock)
        self._inflight: dict[_Key, asyncio.Task[DNSResult]] = {}
        self._dns = self._make_resolver(nameservers, self.timeout, max(0, retries))

    @staticmethod
    def _make_resolver(
        nameservers: Sequence[Address], timeout: float, retries: int
    ) -> dns.asyncresolver.Resolver:
        """dnspython resolver with our nameservers (or resolv.conf's) and our timeouts."""
        try:
            res = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.resolver.NoResolverConfiguration:
            # Start anyway: lookups fail as temporary errors, which the checks handle.
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = []
        if nameservers:
            res.nameservers = [
                dns.nameserver.Do53Nameserver(host, port=port) for host, port in nameservers
            ]
        res.timeout = timeout / (retries + 1)
        res.lifetime = timeout
        res.cache = None  # ours, not dnspython's
        res.use_edns(0, 0, EDNS_PAYLOAD)
        return res

    @property
    def nameservers(self) -> list[str]:
        """The nameservers queried, as text (for logs and `mailgate check`)."""
        return [str(ns) for ns in self._dns.nameservers]

    def clear_cache(self) -> None:
        self.cache.clear()

    def forget(self, name: str, rtype: str = "A") -> None:
        """Drop one cached answer: the caller found it says nothing worth keeping."""
        self.cache.discard((normalise_name(name), _normalise_rtype(rtype)))

    async def resolve(self, name: str, rtype: str = "A", *, fresh: bool = False) -> DNSResult:
        """Cached answer for (name, rtype); one shared network query per concurrent miss.

        ``fresh``: never answer from the cache, ask the server (DNSBL health probes,
        whose verdict must be about the zone now, not about an answer up to a day old).
        A fresh lookup is otherwise an ordinary miss, on purpose:

        - Its answer is cached like any other. Harmless: it is the newest answer there
          is, so it only replaces an older one, and probe names (RFC 5782 test entries)
          are asked by client lookups only for a client at 127.0.0.1 or .2, which is
          better served by the newest answer too. Simpler: a query in flight is shared
          by fresh and cached callers alike, so it must not cache for some only.
        - It joins a query for the same key already on the wire: that answer is not
          from the cache but from the server, asked at most one timeout ago.
        """
        key = (normalise_name(name), _normalise_rtype(rtype))
        if not fresh:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._query(*key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._query_done(key, t))
        # shield: a waiter's cancellation must not cancel the query the others wait on
        return await asyncio.shield(task)

    def peek(self, name: str, rtype: str = "A") -> DNSResult | None:
        """The cached answer for (name, rtype) without waiting; None when it would take a
        query (or the name is not one the DNS can hold: ``resolve`` says why)."""
        try:
            key = (normalise_name(name), _normalise_rtype(rtype))
        except ValueError:
            return None
        return self.cache.get(key)

    async def resolve_many(self, queries: Sequence[tuple[str, str]]) -> list[DNSResult | Exception]:
        """``resolve`` for every (name, rtype) concurrently; a failure (``DNSTempError``,
        ``ValueError``) stands in place of its answer.

        Why not plain ``asyncio.gather``: it makes a Task of every lookup, and with a
        warm cache those Tasks, not the DNS, were the cost. Cached answers are taken
        as they are; only the misses go to the network, together.
        """
        out: list[DNSResult | Exception | None] = [self.peek(n, t) for n, t in queries]
        missing = [i for i, r in enumerate(out) if r is None]
        if len(missing) == 1:
            try:
                out[missing[0]] = await self.resolve(*queries[missing[0]])
            except (DNSTempError, ValueError) as e:
                out[missing[0]] = e
        elif missing:
            got = await asyncio.gather(
                *(self.resolve(*queries[i]) for i in missing), return_exceptions=True
            )
            for i, r in zip(missing, got, strict=True):
                if isinstance(r, BaseException) and not isinstance(r, DNSTempError | ValueError):
                    raise r  # a bug or a cancellation is not an answer
                out[i] = r
        return cast("list[DNSResult | Exception]", out)

    def _query_done(self, key: _Key, task: asyncio.Task[DNSResult]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning if all waiters left

    async def _query(self, name: str, rtype: str) -> DNSResult:
        """One network query, mapped to a DNSResult or DNSTempError, measured and cached."""
        start = time.perf_counter()
        outcome = "error"
        try:
            result = await self._ask(name, rtype)
            outcome = result.outcome
        except _Failure as f:
            outcome = f.metric
            raise DNSTempError(name, rtype, f.reason) from None
        finally:
            if self.metrics is not None:
                self.metrics.observe_dns(rtype, outcome, time.perf_counter() - start)
        self.cache.put((name, rtype), result)
        return result

    async def _ask(self, name: str, rtype: str) -> DNSResult:
        """dnspython call and outcome mapping (see the module docstring)."""
        temp = _Failure
        if not self._dns.nameservers:
            raise temp("no nameservers", "error")
        try:
            # dnspython checks its lifetime only between tries, and a try may start
            # just before it ends (1.4 s for a 1 s budget): the budget is ours to keep.
            async with asyncio.timeout(self.timeout):
                answer = await self._dns.resolve(
                    name + ".",
                    rtype,
                    search=False,
                    lifetime=self.timeout,
                    raise_on_no_answer=False,
                )
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            response = responses.get(dns.name.from_text(name))
            flaw = _malformed(response, negative=True)
            if flaw:
                raise temp(f"malformed answer: {flaw}", "error") from None
            return DNSResult(name, rtype, "nxdomain", (), _negative_ttl(response))
        except (dns.exception.Timeout, TimeoutError):  # LifetimeTimeout included
            raise temp("timeout", "timeout") from None
        except dns.resolver.NoNameservers as e:
            reason, metric = _temp_reason(e)
            raise temp(reason, metric) from None
        except dns.resolver.YXDOMAIN:
            raise temp("yxdomain", "error") from None
        except dns.exception.DNSException as e:
            raise temp(f"error: {e}", "error") from None
        except OSError as e:
            raise temp(f"network: {e}", "error") from None
        rrset = answer.rrset
        negative = rrset is None or len(rrset) == 0
        flaw = _malformed(answer.response, negative=negative)
        if flaw:
            raise temp(f"malformed answer: {flaw}", "error")
        if rrset is None or negative:
            return DNSResult(name, rtype, "nodata", (), _negative_ttl(answer.response))
        ttl = min(int(answer.chaining_result.minimum_ttl), POSITIVE_TTL_CAP)
        data = tuple(_rdata_value(rd) for rd in rrset)
        return DNSResult(name, rtype, "ok", data, max(0, ttl))

    # -- convenience -----------------------------------------------------------------------

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record's character-strings joined (SPF, DKIM, DMARC read it so)."""
        res = await self.resolve(name, "TXT")
        return [b"".join(cast("tuple[bytes, ...]", strings)) for strings in res.data]

    async def addresses(self, name: str, rtype: str = "A") -> list[str]:
        """A or AAAA addresses as text."""
        if rtype.upper() not in ("A", "AAAA"):
            raise ValueError(f"addresses() takes A or AAAA, not {rtype!r}")
        res = await self.resolve(name, rtype)
        return [str(a) for a in res.data]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, host) sorted by preference then host; host "." is a null MX."""
        res = await self.resolve(name, "MX")
        return sorted(res.data)  # type: ignore[arg-type]

    async def ptr(self, ip: str) -> list[str]:
        """Host names of an IPv4/IPv6 address (``ValueError`` if ``ip`` is not one)."""
        res = await self.resolve(reverse_name(ip), "PTR")
        return [str(h) for h in res.data]

    def blocking(self, loop: asyncio.AbstractEventLoop) -> BlockingResolver:
        """Synchronous front end for worker threads; the calls run on ``loop``."""
        return BlockingResolver(self, loop)


@functools.lru_cache(maxsize=4096)
def reverse_name(ip: str) -> str:
    """The PTR query name of an address (``ValueError`` if ``ip`` is not one).

    Memoised: dnspython builds it label by label, and every connection of a client
    asks for the same one.
    """
    addr = ipaddress.ip_address(ip)
    return str(dns.reversename.from_address(str(addr)).to_text(omit_final_dot=True))


class BlockingResolver:
    """The Resolver's methods as blocking calls from a worker thread (pyspf).

    Each call is scheduled on the resolver's loop so the cache and the de-duplication
    stay single-threaded. Calling it on that loop's own thread would deadlock: that
    raises ``RuntimeError`` instead.
    """

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        self.resolver = resolver
        self.loop = loop

    def _run(
        self, coro: Coroutine[Any, Any, _T], name: str, rtype: str, wait: float | None = None
    ) -> _T:
        running: asyncio.AbstractEventLoop | None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError("BlockingResolver called on its event loop's thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            limit = self.resolver.timeout + 1.0
            return future.result(limit if wait is None else max(0.0, min(wait, limit)))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DNSTempError(name, rtype, "timeout") from None
        except concurrent.futures.CancelledError:
            raise DNSTempError(name, rtype, "cancelled") from None

    def resolve(self, name: str, rtype: str = "A", wait: float | None = None) -> DNSResult:
        """``wait``: give up (``DNSTempError`` "timeout") sooner than the resolver's
        own timeout, for a caller with a deadline of its own (an SPF evaluation)."""
        return self._run(self.resolver.resolve(name, rtype), name, rtype, wait)

    def txt(self, name: str) -> list[bytes]:
        return self._run(self.resolver.txt(name), name, "TXT")

    def addresses(self, name: str, rtype: str = "A") -> list[str]:
        return self._run(self.resolver.addresses(name, rtype), name, rtype)

    def mx(self, name: str) -> list[tuple[int, str]]:
        return self._run(self.resolver.mx(name), name, "MX")

    def ptr(self, ip: str) -> list[str]:
        return self._run(self.resolver.ptr(ip), ip, "PTR")
