"""Parsing of SMTP command lines and envelope paths (RFC 5321 4.1), sans I/O.

Lenient where real clients deviate harmlessly (a space after ``FROM:``, lower-case
verbs, source routes), strict where a value travels on to the upstream: no control
characters anywhere, bounded lengths, and ESMTP parameters only in their RFC syntax,
so nothing mailgate relays can inject a second command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, including the angle brackets
MAX_DOMAIN = 255
# No local-part limit: RFC 5321 4.5.3.1's 64 octets is a minimum to accept, and VERP,
# SRS and BATV return paths exceed it every day (Postfix has none either).

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 4.1.2: Quoted-string = DQUOTE *QcontentSMTP DQUOTE; a backslash escapes the
# next character (quoted-pairSMTP), and qtextSMTP includes ">".
_QUOTED = r'"(?:[^"\\]|\\.)*+"'
_QUOTED_STRING = re.compile(_QUOTED, re.DOTALL)
# What may come before the ">" that ends a path: runs without '"' or ">", and whole quoted
# strings. Possessive throughout, so it never backtracks: one linear pass in C.
_PATH_BODY = re.compile(r'(?:[^">]++|' + _QUOTED + r")*+", re.DOTALL)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# The classes reaching U+10FFFF are written as their complements: the same sets of
# characters, but [^...] compiles to a 256-bit map, where a range past U+FFFF made re
# build a table taking ~15 ms at every import (each `mailgate` command paid it).
# _VALUE's class is [\x21-\x3c\x3e-\x7e\x80-\U0010ffff]: no SP, no "=", no controls.
_VALUE = re.compile(r"^[^\x00-\x20=\x7f]+$")
# [A-Za-z0-9\u0080-\U0010ffff], and the same with "-" (test_smtpsyntax checks both).
_LETDIG = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
_LETDIG_HYPHEN = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
_LABEL = _LETDIG + r"(?:" + _LETDIG_HYPHEN + r"*" + _LETDIG + ")?"
# Labels joined by mandatory dots: an optional dot between labels would let the regex
# split a name into labels in exponentially many ways (ReDoS on a non-matching HELO).
# \Z, not $: "$" also matches before a trailing newline.
_DOMAIN = re.compile(
    r"^(?:\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]|" + _LABEL + r"(?:\." + _LABEL + r")*\.?)\Z"
)


class SyntaxProblem(ValueError):
    """A command argument that does not parse; the message is safe to show the client."""


@dataclass(frozen=True)
class Command:
    verb: str  # upper-cased
    arg: str  # the rest of the line, leading blanks removed, CRLF stripped


@dataclass(frozen=True)
class PathArg:
    """The argument of MAIL FROM / RCPT TO: the address without brackets, and parameters."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    raw_params: tuple[str, ...] = ()


def parse_command(line: bytes) -> Command:
    """Split a received line (with its line ending) into verb and argument.

    Raises SyntaxProblem for bytes that are not UTF-8 or carry control characters.
    """
    body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SyntaxProblem("command is not valid UTF-8") from exc
    if _CONTROL.search(text.replace("\t", " ")):
        raise SyntaxProblem("control characters in command")
    verb, _, arg = text.strip(" ").partition(" ")
    return Command(verb.upper(), arg.strip(" "))


def parse_path(arg: str, keyword: str) -> PathArg:
    """Parse ``FROM:<addr> PARAM=VALUE…`` (keyword "FROM") or ``TO:<addr> …`` ("TO")."""
    head = keyword + ":"
    if arg[: len(head)].upper() != head:
        raise SyntaxProblem(f"expected {keyword}:<address>")
    rest = arg[len(head) :].lstrip(" ")
    if not rest.startswith("<"):
        # RFC 5321 requires brackets; Postfix accepts a bare address too. So do we,
        # as long as it is a single token.
        token, _, params_text = rest.partition(" ")
        if not token or "<" in token or ">" in token:
            raise SyntaxProblem("address must be enclosed in <>")
        address = token
    else:
        close = _path_end(rest)
        if close < 0:
            raise SyntaxProblem("missing > after the address")
        address = rest[1:close]
        params_text = rest[close + 1 :]
        if params_text and not params_text.startswith(" "):
            raise SyntaxProblem("garbage after the address")
        if len(rest[: close + 1]) > MAX_PATH:
            raise SyntaxProblem("address too long")
    address = _strip_source_route(address)
    _check_address(address)
    params, raw = _parse_params(params_text)
    return PathArg(address, params, raw)


def _path_end(rest: str) -> int:
    """Index of the ``>`` closing the path that opens at ``rest[0]``, or -1 if none.

    Only a ">" outside quoted strings ends the path, so ``<"a>b"@example.org>`` is one
    path (RFC 5321 4.1.2) and mailgate splits it where the upstream does.
    """
    body = _PATH_BODY.match(rest, 1)
    end = body.end() if body else 1
    if end == len(rest):
        return -1
    if rest[end] == '"':  # a quoted string that never closes stopped the match
        raise SyntaxProblem("unterminated quoted string in the address")
    return end


def _quoted_end(text: str, start: int) -> int:
    """End (exclusive) of the quoted string opening at ``text[start]``; -1 if unterminated."""
    match = _QUOTED_STRING.match(text, start)
    return match.end() if match else -1


def _strip_source_route(address: str) -> str:
    # "<@relay1,@relay2:user@example.org>": RFC 5321 4.1.1.3 says to ignore the route.
    if address.startswith("@") and ":" in address:
        return address.split(":", 1)[1]
    return address


def _check_address(address: str) -> None:
    if not address:
        return  # the null path <>
    if _CONTROL.search(address) or _has_stray_gt(address):
        raise SyntaxProblem("invalid characters in address")
    # Spaces only inside a quoted local part ("john doe"@example.org, RFC 5321 4.1.2).
    unquoted = address[address.rfind('"') + 1 :] if address.startswith('"') else address
    if " " in unquoted:
        raise SyntaxProblem("invalid characters in address")
    if not address.startswith('"') and _SPECIALS.search(address.rpartition("@")[0] or address):
        # Not atext (RFC 5321 4.1.2), and Postfix reads them the RFC 822 way: in
        # <a(b@x> ENVID=)> it sees a comment and queues a@<its own domain>, while
        # the checks would have judged a sender at x.
        raise SyntaxProblem("invalid characters in the local part (quote it)")
    domain = _domain_part(address)
    if domain and (len(domain.encode()) > MAX_DOMAIN or not _DOMAIN.match(domain)):
        raise SyntaxProblem("invalid domain")


_SPECIALS = re.compile(r'[()"\\<>,;:\[\]]')


def _has_stray_gt(address: str) -> bool:
    """Whether a ">" sits anywhere but inside a quoted string opening the local part.

    That is the only place RFC 5321 4.1.2 allows one. Anywhere else the upstream may
    take it for the end of the path and read the rest as parameters, so it would judge
    a different envelope than mailgate's checks did.
    """
    if ">" not in address:
        return False
    end = _quoted_end(address, 0) if address.startswith('"') else -1
    return end < 0 or ">" in address[end:]


def _domain_part(address: str) -> str:
    """The domain of ``local@domain`` ("" for a bare local part such as postmaster)."""
    if address.startswith('"'):
        end = address.rfind('"')
        if end <= 0 or (not address[end + 1 :].startswith("@") and address[end + 1 :]):
            raise SyntaxProblem("malformed quoted local part")
        return address[end + 2 :]
    _, sep, domain = address.rpartition("@")
    return domain if sep else ""


def _parse_params(text: str) -> tuple[dict[str, str | None], tuple[str, ...]]:
    params: dict[str, str | None] = {}
    raw: list[str] = []
    for token in text.split():
        key, eq, value = token.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            # !a (ascii), not !r: the token is echoed in the reply, whose text must be
            # US-ASCII (RFC 5321 4.2 textstring); repr() kept "é" as raw UTF-8 octets.
            raise SyntaxProblem(f"malformed parameter {token[:40]!a}")
        ukey = key.upper()
        if ukey in params:
            # Cut as above: a keyword may be as long as the line, a reply line 512 octets.
            raise SyntaxProblem(f"duplicate parameter {ukey[:40]}")
        params[ukey] = value if eq else None
        raw.append(token)
    return params, tuple(raw)


def is_domain_or_literal(name: str) -> bool:
    """Whether a HELO/EHLO argument is syntactically a domain or address literal."""
    return bool(name) and len(name) <= MAX_DOMAIN and bool(_DOMAIN.match(name))


# RFC 3461 section 4: xtext is xchar (printable US-ASCII but "+" and "=") or "+" HEX HEX.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*\Z")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def dsn_problem(key: str, value: str, smtputf8: bool = False) -> str | None:
    """Why a DSN parameter (RFC 3461) is malformed, or None.

    Passed on to the upstream as sent, so each is checked here as Postfix checks it:
    RET=FULL|HDRS, ENVID=xtext (100 octets at most), NOTIFY=NEVER or a list of
    SUCCESS, FAILURE, DELAY, ORCPT=addr-type;xtext, which with SMTPUTF8 may also
    carry UTF-8 (RFC 6533). Raw 8-bit octets in ENVID or ORCPT otherwise reached the
    upstream, whatever it made of them.
    """
    if key == "RET":
        return None if value.upper() in ("FULL", "HDRS") else "RET must be FULL or HDRS"
    if key == "ENVID":
        if len(value) > 100 or not _XTEXT.match(value):
            return "ENVID must be xtext of at most 100 characters"
        return None
    if key == "NOTIFY":
        words = value.upper().split(",")
        if words == ["NEVER"] or (words and set(words) <= _NOTIFY_WORDS):
            return None
        return "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
    if key == "ORCPT":
        kind, semi, address = value.partition(";")
        if not semi or not _KEYWORD.match(kind) or not address:
            return "ORCPT must be addr-type;address"
        ascii_part = address if not smtputf8 else address.encode("ascii", "ignore").decode()
        if not _XTEXT.match(ascii_part):
            return "ORCPT address must be xtext"
        return None
    return None
