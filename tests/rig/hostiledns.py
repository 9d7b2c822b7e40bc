"""A raw, hostile DNS responder: each reply is whatever bytes a test function makes.

``ZoneDNSServer`` (dnslib) can only send well-formed messages. This one sends what
a broken or malicious server could: garbage, wrong IDs, records for other names,
rdata that does not parse, lying TCP length prefixes. It listens on one loopback
port for UDP and TCP (a thread each) and calls, per query,

    responder(query: Query) -> bytes | list[bytes] | None | Close

``bytes`` is sent as one datagram (UDP) or as one length-prefixed message (TCP);
a list sends several datagrams/messages in order; ``None`` sends nothing; over TCP,
``Close`` closes the connection at once and ``Raw(b"...")`` writes the bytes with
no length prefix (for a prefix that promises more than follows).

``Msg`` builds messages byte by byte, so each test states exactly what goes on the
wire. The class names must not start with ``Test`` (pytest would collect them).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tests.rig.ports import free_port

__all__ = [
    "CLOSE",
    "TYPES",
    "Close",
    "HostileDNSServer",
    "Msg",
    "Query",
    "Raw",
    "Reply",
    "encode_name",
    "rr",
    "soa_rdata",
    "txt_rdata",
]

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
TYPE_NAMES = {v: k for k, v in TYPES.items()}


class Close:
    """Over TCP: close the connection without writing anything."""


CLOSE = Close()


@dataclass(frozen=True)
class Raw:
    """Over TCP: write these bytes as they are (no length prefix added), then hold the
    connection open, or close it when ``close`` is set."""

    data: bytes
    close: bool = False


Reply = bytes | list[bytes] | None | Close | Raw
Responder = Callable[["Query"], Reply]


@dataclass(frozen=True)
class Query:
    """What the client asked: enough to build a reply (or a wrong one) from."""

    wire: bytes
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    protocol: str  # "udp" | "tcp"

    @property
    def question(self) -> bytes:
        """The question section as the client sent it (name, type, class)."""
        end = 12
        while self.wire[end] != 0:
            end += 1 + self.wire[end]
        return self.wire[12 : end + 5]

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.qtype, str(self.qtype))

    def reply(self, **kw: object) -> Msg:
        """A reply header echoing this query's ID and question (override with kw)."""
        msg = Msg(id=self.id, rd=bool(self.flags & 0x0100), question=self.question)
        for k, v in kw.items():
            setattr(msg, k, v)
        return msg


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted name (no checks: tests may want bad names)."""
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode()
            out += bytes([len(raw)]) + raw
    return out + b"\x00"


def rr(name: str | bytes, rtype: str | int, rdata: bytes, ttl: int = 60, rclass: int = 1) -> bytes:
    """One resource record; ``name`` as text or as raw wire bytes (pointers, say)."""
    owner = encode_name(name) if isinstance(name, str) else name
    code = TYPES[rtype] if isinstance(rtype, str) else rtype
    return owner + struct.pack("!HHIH", code, rclass, ttl, len(rdata)) + rdata


def txt_rdata(*strings: bytes) -> bytes:
    """TXT rdata: each string (at most 255 octets) with its length byte."""
    return b"".join(bytes([len(s)]) + s for s in strings)


def soa_rdata(zone: str, minimum: int = 30) -> bytes:
    return (
        encode_name(f"ns.{zone}")
        + encode_name(f"hostmaster.{zone}")
        + struct.pack("!IIIII", 1, 3600, 600, 86400, minimum)
    )


@dataclass
class Msg:
    """A DNS message assembled from parts; counts are computed unless given."""

    id: int = 0
    qr: bool = True
    opcode: int = 0
    aa: bool = True
    tc: bool = False
    rd: bool = False
    ra: bool = True
    rcode: int = 0
    question: bytes = b""
    answer: list[bytes] = field(default_factory=list)
    authority: list[bytes] = field(default_factory=list)
    additional: list[bytes] = field(default_factory=list)
    qdcount: int | None = None
    ancount: int | None = None

    def flags(self) -> int:
        return (
            (self.qr << 15)
            | (self.opcode << 11)
            | (self.aa << 10)
            | (self.tc << 9)
            | (self.rd << 8)
            | (self.ra << 7)
            | self.rcode
        )

    def wire(self) -> bytes:
        qd = (1 if self.question else 0) if self.qdcount is None else self.qdcount
        an = len(self.answer) if self.ancount is None else self.ancount
        header = struct.pack(
            "!HHHHHH",
            self.id,
            self.flags(),
            qd,
            an,
            len(self.authority),
            len(self.additional),
        )
        return (
            header
            + self.question
            + b"".join(self.answer)
            + b"".join(self.authority)
            + b"".join(self.additional)
        )


def parse_query(wire: bytes, protocol: str) -> Query | None:
    """The ID, flags and first question of a query, or None if it has none."""
    if len(wire) < 17:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    labels: list[str] = []
    pos = 12
    while pos < len(wire) and wire[pos] != 0:
        n = wire[pos]
        labels.append(wire[pos + 1 : pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    if pos + 5 > len(wire):
        return None
    (qtype,) = struct.unpack("!H", wire[pos + 1 : pos + 3])
    return Query(wire, qid, flags, ".".join(labels), qtype, protocol)


class HostileDNSServer:
    """UDP + TCP on 127.0.0.1:<free port>; every query answered by ``responder``.

    Usage::

        with HostileDNSServer(lambda q: q.reply(answer=[rr(q.name, "A", b"\\x01\\x02")]).wire())
            as srv: ... Resolver([Address(srv.host, srv.port)]) ...

    ``log`` records (name, type, protocol) per query, so a test can tell whether the
    resolver asked again (not cached) or fell back to TCP. An exception in the
    responder is kept in ``errors`` (nothing is sent) instead of killing the server.
    """

    def __init__(self, responder: Responder, host: str = "127.0.0.1") -> None:
        self.responder = responder
        self.host = host
        self.log: list[tuple[str, str, str]] = []
        self.errors: list[Exception] = []  # raised by the responder (see ``_answer``)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.udp, self.tcp, self.port = self._bind()

    def _bind(self) -> tuple[socket.socket, socket.socket, int]:
        for _ in range(50):
            port = free_port(self.host)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((self.host, port))  # free_port checked TCP only
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.settimeout(0.1)
            tcp.settimeout(0.1)
            return udp, tcp, port
        raise RuntimeError("no port free for both UDP and TCP")

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> HostileDNSServer:
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True, name=f"hostiledns-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        # Wake both loops now rather than at their next poll (tests start many servers).
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"", (self.host, self.port))
        with contextlib.suppress(OSError):
            socket.create_connection((self.host, self.port), timeout=1).close()
        for t in self._threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()

    def __enter__(self) -> HostileDNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------
    def count(self, protocol: str | None = None) -> int:
        with self._lock:
            return sum(1 for _n, _t, p in self.log if protocol is None or p == protocol)

    def _answer(self, wire: bytes, protocol: str) -> Reply:
        query = parse_query(wire, protocol)
        if query is None:
            return None
        with self._lock:
            self.log.append((query.name, query.type_name, protocol))
        try:
            return self.responder(query)
        except Exception as e:  # a test's bug: keep serving, let the test see it
            with self._lock:
                self.errors.append(e)
            return None

    # -- UDP ---------------------------------------------------------------------------
    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(wire, "udp")
            for datagram in _as_list(reply):
                with contextlib.suppress(OSError):
                    self.udp.sendto(datagram, peer)

    # -- TCP ---------------------------------------------------------------------------
    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _peer = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                head = _recv_exactly(conn, 2)
                (length,) = struct.unpack("!H", head)
                reply = self._answer(_recv_exactly(conn, length), "tcp")
                if isinstance(reply, Close):
                    return
                if isinstance(reply, Raw):
                    conn.sendall(reply.data)
                    if reply.close:
                        return
                else:
                    for msg in _as_list(reply):
                        conn.sendall(struct.pack("!H", len(msg)) + msg)
                # Hold the connection open until the client hangs up (or 5 s pass):
                # a lying length prefix must be met by the client's timeout, not an EOF.
                while not self._stop.is_set() and conn.recv(4096):
                    pass
            except OSError:
                return


def _as_list(reply: Reply) -> Iterable[bytes]:
    if reply is None or isinstance(reply, Close | Raw):
        return []
    return reply if isinstance(reply, list) else [reply]


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client closed")
        buf += chunk
    return buf
