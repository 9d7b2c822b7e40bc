"""Value types shared by every layer: who is connected, what they asked for, and when.

L0: no I/O, no imports from the rest of mailgate. Mutable where a session fills them
in step by step (ClientInfo, Envelope); everything a check reads after the fact is
read-only by convention.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Stage(enum.IntEnum):
    """SMTP stages in transaction order; a check declares the earliest one it needs."""

    CONNECT = 1
    HELO = 2
    MAIL = 3
    RCPT = 4
    DATA = 5

    @property
    def label(self) -> str:
        """Lower-case name for logs and metric labels."""
        return self.name.lower()


@dataclass
class ClientInfo:
    """The remote SMTP client as mailgate believes it to be.

    In front mode ``ip``/``port`` come from the socket or the PROXY header; in filter
    mode from Postfix's XFORWARD. ``hostname`` is the verified reverse name when one is
    known (XFORWARD NAME), else None.
    """

    ip: str
    port: int
    session_id: str
    hostname: str | None = None
    helo: str | None = None
    proto: str = "SMTP"
    tls: bool = False
    source: str = "socket"  # "socket" | "proxy" | "xforward"
    trusted: bool = False


@dataclass
class Recipient:
    """One accepted RCPT TO: the address as the client sent it and its ESMTP parameters."""

    address: str
    params: list[str] = field(default_factory=list)


@dataclass
class Envelope:
    """One mail transaction (MAIL FROM up to the end of DATA or RSET)."""

    mail_from: str
    mail_params: list[str] = field(default_factory=list)
    recipients: list[Recipient] = field(default_factory=list)
    message_id: str = ""  # mailgate's transaction id, carried in logs and headers
    smtputf8: bool = False

    @property
    def sender_domain(self) -> str:
        """Domain of the envelope sender; empty for the null sender."""
        _, _, domain = self.mail_from.rpartition("@")
        return domain.lower() if "@" in self.mail_from else ""


class UpstreamError(Exception):
    """The upstream MTA could not be reached, broke, timed out or spoke nonsense.

    Raised by the relay, handled by the session; ``stage`` is a bounded metric label.
    """

    def __init__(self, stage: str, detail: str, reply: object | None = None) -> None:
        super().__init__(f"upstream {stage}: {detail}")
        self.stage = stage
        self.detail = detail
        self.reply = reply
