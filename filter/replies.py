"""Every SMTP reply mailgate words itself, in one catalogue.

Checks and the verdict pick a reply from here; nothing else formats reply text. Texts
are generic towards the client (internal detail goes to the log), as Postfix does for
its before-queue proxy failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, optional RFC 3463 enhanced status, and text (may hold newlines)."""

    code: int
    enhanced: str
    text: str

    def lines(self) -> list[str]:
        """The reply's text lines (one per line of a multi-line reply)."""
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self) -> bytes:
        """Wire form with continuation lines ``250-`` and CRLF endings."""
        lines = self.lines()
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {prefix}{' / '.join(self.lines())}"

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def code_class(self) -> str:
        """``2xx``/``3xx``/``4xx``/``5xx`` for bounded metric labels."""
        return f"{self.code // 100}xx"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


def banner(hostname: str) -> Reply:
    """The greeting (the pregreet test sends a ``220-`` line of the same text first)."""
    return Reply(220, "", f"{hostname} ESMTP mailgate")


def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
HELP = Reply(214, "2.0.0", "See RFC 5321")
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

# 421: the session ends after these.
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

# Transient failures that keep the session.
UPSTREAM_UNAVAILABLE = Reply(451, "4.3.0", "Service temporarily unavailable, try again later")
CHECK_TEMPFAIL = Reply(451, "4.7.1", "Temporary failure evaluating the message, try again later")
STORE_TEMPFAIL = Reply(451, "4.3.0", "Temporary local problem, try again later")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, try again later")
RATE_LIMITED = Reply(451, "4.7.0", "Rate limit exceeded, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")

# Protocol errors.
SYNTAX_ERROR = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Error: bare <CR> received in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NO_AUTH = Reply(503, "5.5.1", "Error: authentication not enabled")
PREGREET = Reply(554, "5.5.1", "Protocol error: client talked before the greeting")


def syntax(usage: str) -> Reply:
    """501 with a usage hint, e.g. ``syntax("MAIL FROM:<address>")``."""
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def bad_parameter(detail: str) -> Reply:
    # The detail echoes the client: an unknown keyword of up to ~2000 octets, BODY=<value>
    # where 8-bit values parse. Reply text is US-ASCII (RFC 5321 4.2) and a reply line at
    # most 512 octets (4.5.3.1.5): cut it to 40 characters (as smtpsyntax does), escape
    # the rest.
    detail = detail[:40].encode("ascii", "backslashreplace").decode("ascii")
    return Reply(555, "5.5.4", f"Unsupported option: {detail}")


# Message content.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header size exceeds fixed limit")
# Postfix's answer to non-SMTP input (smtpd_forbidden_commands), word for word.
FORBIDDEN_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
# A header section cannot begin with a continuation line (RFC 5322 2.2.3); prepended
# to our own fields it would extend the last of them with the client's text.
FOLDED_FIRST_LINE = Reply(550, "5.6.0", "Error: message header begins with a folded line")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received in message (RFC 5321 2.3.8)")
DATA_LINE_TOO_LONG = Reply(550, "5.5.6", "Error: message line too long (RFC 5321 4.5.3.1.6)")

# Policy decisions (the verdict picks these).
REJECT_SPAM = Reply(550, "5.7.1", "Message rejected as spam")
REJECT_DMARC = Reply(550, "5.7.1", "Message rejected: DMARC policy of the sender domain")
REJECT_SPF = Reply(550, "5.7.23", "Message rejected: SPF validation failed")
REJECT_DNSBL = Reply(554, "5.7.1", "Service unavailable; client host blocked")
# A block list entry ([lists]); which list and line is logged, never told to the client.
ACCESS_DENIED = Reply(550, "5.7.1", "Access denied")


def retry_seconds(retry_after: float) -> int:
    """Whole seconds a client told "try again in N seconds" must wait: never 0, never short.

    Rounded up: a sender that retries after exactly N seconds (as a well-behaved MTA
    honouring the reply may) must find the delay over, not get another 451.
    """
    return max(1, math.ceil(retry_after))


def greylisted(retry_after_seconds: float) -> Reply:
    """451 that tells a well-behaved client when the retry will be accepted."""
    secs = retry_seconds(retry_after_seconds)
    return GREYLISTED.with_text(f"Greylisted, try again in {secs} seconds")
