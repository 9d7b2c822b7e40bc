"""SMTP clients for tests: smtplib for well-behaved sessions, RawSMTP for hostile ones.

Both can bind a source address in 127.0.0.0/8 so per-IP limits, DNSBL and greylisting
tests can pose as different clients from one machine.
"""

from __future__ import annotations

import smtplib
import socket
import time
from dataclasses import dataclass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def smtp_client(
    host: str = "127.0.0.1",
    port: int = 25,
    *,
    source_ip: str = "127.0.0.1",
    local_hostname: str = "client.example.test",
    timeout: float = 30.0,
) -> smtplib.SMTP:
    """A connected smtplib.SMTP whose socket is bound to ``source_ip``."""
    return smtplib.SMTP(
        host,
        port,
        local_hostname=local_hostname,
        timeout=timeout,
        source_address=(source_ip, 0),
    )


@dataclass
class Reply:
    """One SMTP reply: numeric code, text lines (without code), raw bytes."""

    code: int
    lines: list[str]
    raw: bytes

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return self.raw.decode("utf-8", "replace").rstrip()


class RawSMTP:
    """Byte-exact SMTP over a socket: send anything, read whole multi-line replies.

    Usage::

        with RawSMTP("127.0.0.1", port, source_ip="127.0.0.5") as c:
            assert c.banner().code == 220
            c.cmd("EHLO x.test")
            c.send(b"DATA\\r\\n"); ...
            assert c.read_reply().code == 250
            assert c.is_closed()
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source_ip: str | None = None,
        timeout: float = 10.0,
        connect: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.source_ip = source_ip
        self.timeout = timeout
        self._buf = b""
        self.sock: socket.socket | None = None
        if connect:
            self.connect()

    def connect(self) -> RawSMTP:
        """Connect unless already connected (the constructor connects by default)."""
        if self.sock is not None:
            return self
        s = socket.socket(_family(self.host), socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        if self.source_ip:
            s.bind((self.source_ip, 0))
        s.connect((self.host, self.port))
        self.sock = s
        return self

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise RuntimeError("not connected")
        return self.sock

    def send(self, data: bytes | str) -> None:
        """Send bytes verbatim (str is UTF-8 encoded, no CRLF added)."""
        self._sock().sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False on EOF."""
        s = self._sock()
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def read_reply(self, timeout: float | None = None) -> Reply:
        """Read one complete (possibly multi-line) reply; raises TimeoutError or EOFError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        raw = b""
        lines: list[str] = []
        while True:
            while b"\n" not in self._buf:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no complete reply; got {raw + self._buf!r}")
                try:
                    if not self._fill(deadline):
                        raise EOFError(f"connection closed; got {raw + self._buf!r}")
                except TimeoutError as e:
                    raise TimeoutError(f"no complete reply; got {raw + self._buf!r}") from e
            line, _, self._buf = self._buf.partition(b"\n")
            raw += line + b"\n"
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                try:
                    code = int(text[:3])
                except ValueError as e:
                    raise ValueError(f"not an SMTP reply: {raw!r}") from e
                return Reply(code, lines, raw)

    def banner(self, timeout: float | None = None) -> Reply:
        return self.read_reply(timeout)

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.read_reply(timeout)

    def read_replies(self, n: int, timeout: float | None = None) -> list[Reply]:
        """Read n replies (for pipelined commands)."""
        return [self.read_reply(timeout) for _ in range(n)]

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True if the peer closes within timeout (pending replies are discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(deadline):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False

    def pending(self) -> bytes:
        """Bytes received but not consumed as replies."""
        return self._buf

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as closing);
    AssertionError if it is still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after {timeout}s; got {data!r}")
