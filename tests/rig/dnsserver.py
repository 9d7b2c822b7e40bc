"""Authoritative test DNS server over dnslib, with the semantics SPF/DMARC tests need.

dnslib's stock ZoneResolver answers NXDOMAIN for every miss, sets no AA bit and no SOA,
and its ``truncate()`` drops the question section (so dnspython ignores the reply and
times out).  SPF void lookups, DMARC tree walks and TCP fallback all depend on those
details, hence this resolver.  The class name must not start with ``Test`` (pytest
would try to collect it).
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

from dnslib import (  # type: ignore[import-untyped,unused-ignore]
    AAAA,
    CNAME,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)
from dnslib.server import (  # type: ignore[import-untyped,unused-ignore]
    BaseResolver,
    DNSHandler,
    DNSLogger,
    DNSServer,
)

Mode = Literal["normal", "timeout", "servfail", "refused"]
Record = tuple[str, str, Any]

__all__ = [
    "AAAA",
    "CNAME",
    "MX",
    "NS",
    "PTR",
    "SOA",
    "A",
    "Mode",
    "Record",
    "ZoneDNSServer",
    "base_records",
    "free_udp_tcp_port",
    "soa",
    "txt",
]


def txt(value: str | bytes) -> Any:
    """TXT rdata split into 255-byte character-strings, as a publisher would have to."""
    b = value.encode() if isinstance(value, str) else value
    return TXT([b[i : i + 255] for i in range(0, len(b), 255)] or [b""])


def soa(zone: str, minimum: int = 1) -> Record:
    """A SOA record; the small minimum keeps negative caching (c-ares) from hiding changes."""
    return (zone, "SOA", SOA(f"ns.{zone}", f"hostmaster.{zone}", (1, 3600, 600, 86400, minimum)))


def base_records() -> list[Record]:
    """The zones every test run starts with; tests add their own names under them."""
    recs: list[Record] = []
    for zone in ("test", "example.test", "example.org", "in-addr.arpa", "ip6.arpa"):
        recs.append(soa(zone))
        recs.append((zone, "NS", NS("ns.example.test")))
    recs += [
        ("ns.example.test", "A", A("127.0.0.1")),
        ("example.test", "MX", MX("mail.example.test", 10)),
        ("mail.example.test", "A", A("127.0.0.2")),
    ]
    return recs


def _rdata(rtype: str, value: Any) -> Any:
    """Accept plain strings for the common types so tests stay terse."""
    if not isinstance(value, str):
        return value
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "TXT":
        return txt(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "PTR":
        return PTR(value)
    if rtype == "NS":
        return NS(value)
    if rtype == "MX":
        pref, _, host = value.partition(" ")
        return MX(host, int(pref)) if host else MX(value, 10)
    raise ValueError(f"give an rdata object for {rtype}")


class _Drop(DNSError):  # type: ignore[misc]
    """Raised inside resolve() to send nothing; dnslib's handler swallows DNSError."""


class _Handler(DNSHandler):  # type: ignore[misc]
    """Keeps TCP connections open while 'timing out', so clients see a real timeout."""

    def get_reply(self, data: bytes) -> bytes:
        try:
            return super().get_reply(data)  # type: ignore[no-any-return]
        except _Drop:
            if self.protocol == "tcp":
                time.sleep(self.server.resolver.tcp_hold)
            raise


class _Resolver(BaseResolver):  # type: ignore[misc]
    """Zone data + failure modes; thread-safe since dnslib serves each query in a thread."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.lock = threading.RLock()
        self.rrs: dict[tuple[DNSLabel, str], list[RR]] = collections.defaultdict(list)
        self.names: set[DNSLabel] = set()
        self.zones: set[DNSLabel] = set()
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (qname, qtype, protocol)
        self.mode: Mode = "normal"
        self.name_modes: dict[str, Mode] = {}
        self.delay = 0.0
        self.tcp_hold = 10.0

    def _index(self) -> None:
        self.names.clear()
        self.zones.clear()
        for (lbl, rtype), rrs in self.rrs.items():
            if not rrs:
                continue
            parts = str(lbl).rstrip(".").split(".")
            for i in range(len(parts)):  # empty non-terminals exist -> NODATA, not NXDOMAIN
                self.names.add(DNSLabel(".".join(parts[i:])))
            if rtype == "SOA":
                self.zones.add(lbl)

    def add(self, name: str, rtype: str, rdata: Any, ttl: int | None = None) -> None:
        lbl = DNSLabel(name)
        rtype = rtype.upper()
        rr = RR(lbl, getattr(QTYPE, rtype), rdata=_rdata(rtype, rdata), ttl=ttl or self.ttl)
        with self.lock:
            self.rrs[(lbl, rtype)].append(rr)
            self._index()

    def remove(self, name: str, rtype: str | None = None) -> None:
        lbl = DNSLabel(name)
        with self.lock:
            for key in list(self.rrs):
                if key[0] == lbl and (rtype is None or key[1] == rtype.upper()):
                    del self.rrs[key]
            self._index()

    def _soa_for(self, qname: DNSLabel) -> list[RR]:
        best = None
        for z in self.zones:
            if qname.matchSuffix(z) and (best is None or len(z.label) > len(best.label)):
                best = z
        return list(self.rrs.get((best, "SOA"), [])) if best is not None else []

    def _mode_for(self, qname: str) -> Mode:
        return self.name_modes.get(qname.rstrip(".").lower(), self.mode)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        protocol = getattr(handler, "protocol", "udp")
        with self.lock:
            key = (str(qname).rstrip(".").lower(), qtype)
            self.queries[key] += 1
            self.log.append((key[0], qtype, protocol))
            mode = self._mode_for(key[0])
            delay = self.delay
        if delay:
            time.sleep(delay)
        if mode == "timeout":
            raise _Drop("dropped on purpose")
        reply = request.reply()
        reply.header.aa = 1
        reply.header.ra = 0
        if mode in ("servfail", "refused"):
            reply.header.aa = 0
            reply.header.rcode = RCODE.SERVFAIL if mode == "servfail" else RCODE.REFUSED
            return reply
        with self.lock:
            if qtype == "ANY":
                answers = [rr for (n, _t), rrs in self.rrs.items() if n == qname for rr in rrs]
            else:
                answers = list(self.rrs.get((qname, qtype), []))
            if not answers and qtype != "CNAME":
                cname = self.rrs.get((qname, "CNAME"), [])
                if cname:
                    answers = list(cname) + list(self.rrs.get((cname[0].rdata.label, qtype), []))
            for rr in answers:
                reply.add_answer(rr)
            if not answers:
                if qname not in self.names:
                    reply.header.rcode = RCODE.NXDOMAIN
                for rr in self._soa_for(qname):
                    reply.add_auth(rr)
        if protocol == "udp":
            limit = 512
            for ar in request.ar:
                if ar.rtype == QTYPE.OPT:
                    limit = max(512, ar.rclass)  # EDNS advertised UDP payload size
            if len(reply.pack()) > limit:
                # Keep the question: dnslib's truncate() drops it and resolvers then ignore us.
                reply = DNSRecord(
                    DNSHeader(id=request.header.id, qr=1, aa=1, tc=1, rd=request.header.rd),
                    q=request.q,
                )
        return reply


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (DNS needs the same number for both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port: int = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


class ZoneDNSServer:
    """UDP+TCP authoritative server on one loopback port, editable while it runs.

    Usage::

        srv = ZoneDNSServer([soa("example.test"), ("example.test", "TXT", "v=spf1 -all")])
        srv.start()
        srv.add("new.example.test", "A", "127.0.0.9")
        srv.set_mode("timeout")                 # whole server dead
        srv.set_name_mode("x.example.test", "servfail")
        srv.count("example.test", "TXT")        # queries seen
        srv.stop()
    """

    def __init__(
        self,
        records: Iterable[Record] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        ttl: int = 60,
        log: bool = False,
    ) -> None:
        self.host = host
        self.port = port or free_udp_tcp_port(host)
        self.resolver = _Resolver(ttl)
        for name, rtype, rdata in records:
            self.resolver.add(name, rtype, rdata)
        logger = DNSLogger(
            "request,reply,truncated,error"
            if log
            else "-request,-reply,-truncated,-error,-recv,-send,-data"
        )
        self._servers = [
            DNSServer(
                self.resolver,
                address=host,
                port=self.port,
                tcp=tcp,
                logger=logger,
                handler=_Handler,
            )
            for tcp in (False, True)
        ]
        self._started = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def nameserver(self) -> str:
        """The ``ip:port`` form that ``dns.nameservers`` in the policy takes."""
        return f"{self.host}:{self.port}"

    def start(self) -> ZoneDNSServer:
        for s in self._servers:
            s.start_thread()
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        for s in self._servers:
            s.stop()
            s.server.server_close()
        self._started = False

    def __enter__(self) -> ZoneDNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- zone data ---------------------------------------------------------------------
    def add(self, name: str, rtype: str, rdata: Any, ttl: int | None = None) -> None:
        """Add one record (strings accepted for A/AAAA/TXT/CNAME/PTR/NS/MX "10 host")."""
        self.resolver.add(name, rtype, rdata, ttl)

    def set_records(self, name: str, rtype: str, rdatas: Iterable[Any]) -> None:
        """Replace the RRset name/rtype (an empty iterable deletes it)."""
        with self.resolver.lock:
            self.resolver.remove(name, rtype)
            for r in rdatas:
                self.resolver.add(name, rtype, r)

    def remove(self, name: str, rtype: str | None = None) -> None:
        self.resolver.remove(name, rtype)

    def load(self, records: Iterable[Record]) -> None:
        """Add many records at once."""
        for name, rtype, rdata in records:
            self.resolver.add(name, rtype, rdata)

    def snapshot(self) -> dict[tuple[Any, str], list[Any]]:
        """Copy of the zone data, for restore() after a test that edits it."""
        with self.resolver.lock:
            return {k: list(v) for k, v in self.resolver.rrs.items()}

    def restore(self, snap: dict[tuple[Any, str], list[Any]]) -> None:
        with self.resolver.lock:
            self.resolver.rrs.clear()
            self.resolver.rrs.update({k: list(v) for k, v in snap.items()})
            self.resolver._index()

    def clear(self) -> None:
        """Drop all zone data (every name becomes NXDOMAIN without SOA)."""
        with self.resolver.lock:
            self.resolver.rrs.clear()
            self.resolver._index()

    # -- failure modes -----------------------------------------------------------------
    def set_mode(self, mode: Mode) -> None:
        """'timeout' drops every query, 'servfail'/'refused' answer that rcode, 'normal'."""
        self.resolver.mode = mode

    def set_name_mode(self, name: str, mode: Mode | None) -> None:
        """Fail only queries for this exact name (None restores normal answers)."""
        with self.resolver.lock:
            key = name.rstrip(".").lower()
            if mode is None:
                self.resolver.name_modes.pop(key, None)
            else:
                self.resolver.name_modes[key] = mode

    def set_delay(self, seconds: float) -> None:
        """Delay every answer (slow but alive server)."""
        self.resolver.delay = seconds

    def reset_faults(self) -> None:
        with self.resolver.lock:
            self.resolver.mode = "normal"
            self.resolver.name_modes.clear()
            self.resolver.delay = 0.0

    # -- observation -------------------------------------------------------------------
    def count(self, name: str | None = None, rtype: str | None = None) -> int:
        """Queries seen, optionally for one name and/or type (case-insensitive)."""
        with self.resolver.lock:
            key = name.rstrip(".").lower() if name else None
            return sum(
                n
                for (qn, qt), n in self.resolver.queries.items()
                if (key is None or qn == key) and (rtype is None or qt == rtype.upper())
            )

    def query_log(self) -> list[tuple[str, str, str]]:
        """(qname, qtype, 'udp'|'tcp') in arrival order."""
        with self.resolver.lock:
            return list(self.resolver.log)

    def reset_counters(self) -> None:
        with self.resolver.lock:
            self.resolver.queries.clear()
            self.resolver.log.clear()
