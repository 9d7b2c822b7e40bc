"""Hostile client values through a live mailgate: every log line stays one event.

A HELO, an address (SMTPUTF8 quoted local parts), an XFORWARD value and a header can
carry quotes, ``=``, backslashes, spaces and characters some readers take for a line
end (U+2028, U+2029, NEL U+0085) or a terminal acts on (C1 CSI U+009B, bidi
overrides). Each log line is split the strictest way (``str.splitlines``), parsed by a
strict key=value or JSON parser, and the values must come back as sent.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import RawSMTP
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import ScriptedUpstream

# A bare value is printable, without blanks, quotes, "=" or backslashes; a quoted one
# has only the escapes filter.logs writes.
_BARE = r'[^\s"=\\]+'
_QUOTED = r'"(?:[^"\\]|\\(?:[\\"nrt]|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}))*"'
_PAIR = re.compile(rf"([a-z_]+)=({_QUOTED}|{_BARE}|)(?: |$)")
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)")

# A HELO or XFORWARD value with a control character, C1 or a line separator is
# refused (501); quotes, "=" and backslashes are what reach the log from there.
HELO = 'evil"a=b\\c'
# XFORWARD xtext: "+20" a space, "+3D" "=".
XFORWARD_HELO = "x ts=1 level=error event=message id=FAKE"
XFORWARD_ARG = "HELO=x+20ts+3D1+20level+3Derror+20event+3Dmessage+20id+3DFAKE"
SENDER = '"a\u2028ts=1 level=error\x9b31m\u202e b=c \\"q\\"\\\\"@example.org'
RCPTS = ['"x\x85y"@example.test', "b\u2029@example.test", "plain@example.test"]


def strict_kv(line: str) -> dict[str, str]:
    """One logfmt line as filter.logs writes it, or AssertionError."""
    assert line.isprintable(), repr(line)
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m is not None, f"not key=value at {pos}: {line[pos : pos + 80]!r}"
        key, value = m.groups()
        assert key not in out, f"{key} twice in {line!r}"
        if value.startswith('"'):
            value = _ESCAPE.sub(_unescape, value[1:-1])
        out[key] = value
        pos = m.end()
    return out


def _unescape(m: re.Match[str]) -> str:
    code = m.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)


def log_lines(mg: MailgateProcess) -> list[str]:
    """stderr as strict UTF-8, split as the most eager reader splits."""
    raw = mg.stderr_path.read_bytes()
    return raw.decode("utf-8").splitlines()


def events(mg: MailgateProcess, fmt: str, name: str, within: float = 5.0) -> list[dict[str, Any]]:
    """Every parsed log line (all must parse) once one with ``event=name`` is there."""
    deadline = time.monotonic() + within
    while True:
        lines = log_lines(mg)
        parsed = [json.loads(ln) if fmt == "json" else strict_kv(ln) for ln in lines]
        for p in parsed:
            assert set(p) >= {"ts", "level", "logger"}, p
        if any(p.get("event") == name for p in parsed) or time.monotonic() > deadline:
            return parsed
        time.sleep(0.1)


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_hostile_values_stay_one_event_per_line(
    mailgate: StartMailgate, upstream: ScriptedUpstream, fmt: str
) -> None:
    mg = mailgate(
        {
            **AUTH_CHECKS_OFF,
            "logging": {"format": fmt},
            "server": {"xforward_hosts": ["127.0.0.0/8"]},
        }
    )
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.9") as c:
        assert c.banner().code == 220
        assert c.cmd(f"EHLO {HELO}".encode()).code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8".encode()).code == 250
        for rcpt in RCPTS:
            assert c.cmd(f"RCPT TO:<{rcpt}>".encode()).code == 250
        assert c.cmd("DATA").code == 354
        body = message("hostile").replace(b"Subject: hostile", "Subject: a\u2028b".encode())
        c.send(body + b".\r\n")
        assert c.read_reply().code == 250
        assert c.cmd(b"RSET").code == 250
        # A second session: XFORWARD decodes +HH into a line separator.
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.9") as c:
        assert c.banner().code == 220
        assert c.cmd("EHLO relay.example.org").code == 250
        assert c.cmd("XFORWARD HELO=x+E2+80+A8ts+3D1").code == 501  # U+2028
        assert c.cmd(f"XFORWARD {XFORWARD_ARG}").code == 250
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("second") + b".\r\n")
        assert c.read_reply().code == 250
        c.cmd("QUIT")
    parsed = events(mg, fmt, "message")
    deadline = time.monotonic() + 5
    while sum(p.get("event") == "message" for p in parsed) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        parsed = events(mg, fmt, "message")
    messages = [p for p in parsed if p.get("event") == "message"]
    assert len(messages) == 2, parsed
    first, second = messages
    assert first["helo"] == HELO
    assert first["from"] == SENDER
    rcpts = first["rcpts"] if fmt == "json" else first["rcpts"].split(",")
    assert rcpts == RCPTS
    assert second["helo"] == XFORWARD_HELO
    assert not any(p.get("id") == "FAKE" for p in parsed)
    # A hostile client is not an internal error.
    assert not [p for p in parsed if p["level"] in ("error", "critical")], parsed


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_a_thousand_recipients_make_a_bounded_line(
    mailgate: StartMailgate, upstream: ScriptedUpstream, fmt: str
) -> None:
    mg = mailgate(
        {**AUTH_CHECKS_OFF, "logging": {"format": fmt}, "server": {"max_recipients": 1000}}
    )
    rcpts = [f"{'r' * 200}{i}@example.test" for i in range(1000)]
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.9", timeout=30) as c:
        assert c.banner().code == 220
        assert c.cmd(f"EHLO {'h' * 200}.example.org").code == 250
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        c.send("".join(f"RCPT TO:<{r}>\r\n" for r in rcpts))
        assert {r.code for r in c.read_replies(len(rcpts))} == {250}
        assert c.cmd("DATA").code == 354
        c.send(message("many") + b".\r\n")
        assert c.read_reply().code == 250
        c.cmd("QUIT")
    parsed = events(mg, fmt, "message")
    [line] = [ln for ln in log_lines(mg) if "message" in ln and "rcpts" in ln]
    assert len(line) < 16_000
    [msg] = [p for p in parsed if p.get("event") == "message"]
    shown = msg["rcpts"] if fmt == "json" else msg["rcpts"].split(",")
    assert shown[0] == rcpts[0] and 1 < len(shown) < len(rcpts)
    assert re.fullmatch(rf"…\[\+{len(rcpts) - len(shown) + 1} more\]", shown[-1])
    assert msg["outcome"] == "relayed"  # what follows the long field is still there
