"""Connection limits and the structured log formatters."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any

import pytest

from filter.limits import ConnectionLimiter, SharedCounts
from filter.logs import EVENT, JSONFormatter, KeyValueFormatter, event


# -- ConnectionLimiter -----------------------------------------------------------------------
def test_total_limit() -> None:
    lim = ConnectionLimiter(max_total=3, max_per_ip=10)
    assert [lim.acquire(f"192.0.2.{i}") for i in range(3)] == [None, None, None]
    assert lim.acquire("192.0.2.9") == "refused_limit"
    assert lim.total == 3
    assert lim.count("192.0.2.9") == 0  # a refusal is not counted in
    lim.release("192.0.2.0")
    assert lim.acquire("192.0.2.9") is None
    assert lim.total == 3


def test_per_ip_limit() -> None:
    lim = ConnectionLimiter(max_total=100, max_per_ip=2)
    assert lim.acquire("192.0.2.1") is None
    assert lim.acquire("192.0.2.1") is None
    assert lim.acquire("192.0.2.1") == "refused_per_ip"
    assert lim.acquire("2001:db8::1") is None  # others are unaffected
    assert lim.count("192.0.2.1") == 2
    assert lim.total == 3
    lim.release("192.0.2.1")
    assert lim.count("192.0.2.1") == 1
    assert lim.acquire("192.0.2.1") is None


def test_total_is_checked_before_per_ip() -> None:
    lim = ConnectionLimiter(max_total=1, max_per_ip=1)
    assert lim.acquire("192.0.2.1") is None
    assert lim.acquire("192.0.2.1") == "refused_limit"


def test_release_forgets_idle_addresses() -> None:
    lim = ConnectionLimiter(max_total=10, max_per_ip=10)
    for _ in range(3):
        lim.acquire("192.0.2.1")
    for _ in range(3):
        lim.release("192.0.2.1")
    assert lim.total == 0
    assert lim.count("192.0.2.1") == 0
    assert "192.0.2.1" not in lim._per_ip  # no memory kept per past client


def test_resize_keeps_open_connections() -> None:
    lim = ConnectionLimiter(max_total=10, max_per_ip=5)
    for _ in range(4):
        assert lim.acquire("192.0.2.1") is None
    lim.resize(max_total=3, max_per_ip=2)
    assert lim.total == 4  # nobody is kicked out
    assert lim.acquire("192.0.2.2") == "refused_limit"
    lim.resize(max_total=10, max_per_ip=2)
    assert lim.acquire("192.0.2.1") == "refused_per_ip"
    assert lim.acquire("192.0.2.2") is None
    for _ in range(3):
        lim.release("192.0.2.1")
    assert lim.acquire("192.0.2.1") is None
    assert (lim.max_total, lim.max_per_ip) == (10, 2)


# -- SharedCounts: the limits of several workers ---------------------------------------------
def test_workers_sharing_counts_apply_each_limit_once() -> None:
    counts = SharedCounts(workers=2)
    first = ConnectionLimiter(10, 3, shared=counts.column(0))
    second = ConnectionLimiter(10, 3, shared=counts.column(1))
    assert first.acquire("192.0.2.1") is None
    assert second.acquire("192.0.2.1") is None
    assert first.acquire("192.0.2.1") is None
    assert second.acquire("192.0.2.1") == "refused_per_ip"  # 3 open, in two workers
    assert first.count("192.0.2.1") == second.count("192.0.2.1") == 3
    assert second.acquire("2001:db8::1") is None  # another client is not affected
    second.release("2001:db8::1")
    first.release("192.0.2.1")
    assert second.acquire("192.0.2.1") is None
    assert (first.total, second.total, counts.total()) == (1, 2, 3)


def test_shared_total_limit_and_reservations() -> None:
    counts = SharedCounts(workers=3)
    lims = [ConnectionLimiter(3, 10, shared=counts.column(i)) for i in range(3)]
    assert lims[0].acquire("192.0.2.1") is None
    assert lims[1].reserve()  # a PROXY header still to come counts in the total
    assert lims[2].acquire("192.0.2.2") is None
    assert lims[2].acquire("192.0.2.3") == "refused_limit"
    assert not lims[0].reserve()
    lims[1].unreserve()
    assert lims[0].acquire("192.0.2.3") is None
    assert counts.total() == 3


def test_a_dead_workers_column_is_cleared() -> None:
    counts = SharedCounts(workers=2)
    dying = ConnectionLimiter(10, 2, shared=counts.column(0))
    alive = ConnectionLimiter(10, 2, shared=counts.column(1))
    assert dying.acquire("192.0.2.1") is None
    assert dying.acquire("192.0.2.1") is None
    assert alive.acquire("192.0.2.1") == "refused_per_ip"
    counts.clear(0)  # the supervisor, before it restarts worker 0
    assert counts.total() == 0
    assert alive.acquire("192.0.2.1") is None
    assert alive.count("192.0.2.1") == 1


def test_a_colliding_address_can_only_look_busier() -> None:
    """Count-min: an address's count is the least of its slots, each a sum of the
    addresses sharing it; one shared slot changes nothing, all shared overstate."""
    counts = SharedCounts(workers=1)
    a = SharedCounts.slots_of("192.0.2.1")
    b = SharedCounts.slots_of("192.0.2.2")
    assert len(set(a)) == SharedCounts.HASHES and set(a).isdisjoint(b)
    assert all(1 <= s <= SharedCounts.SLOTS for s in a + b)
    counts.add(0, a, 5)
    counts.add(0, b, 2)
    counts.add(0, (a[0], a[1], b[2]), 3)  # a third address sharing slots with both
    assert (counts.per_ip(a), counts.per_ip(b)) == (5, 2)
    counts.add(0, a, 1)  # one sharing every slot of a's: a looks busier, never idler
    assert (counts.per_ip(a), counts.per_ip(b)) == (6, 2)
    assert SharedCounts.slots_of("192.0.2.1") == a  # stable: every worker agrees


def test_counts_are_shared_with_a_forked_worker() -> None:
    """The mapping is the one the supervisor made before forking: a child's count is
    seen by its parent."""
    counts = SharedCounts(workers=2)
    pid = os.fork()
    if pid == 0:  # the "worker": count two connections, then exit without cleanup
        lim = ConnectionLimiter(10, 5, shared=counts.column(1))
        lim.acquire("192.0.2.7")
        lim.acquire("192.0.2.7")
        os._exit(0)
    os.waitpid(pid, 0)
    here = ConnectionLimiter(10, 2, shared=counts.column(0))
    assert here.count("192.0.2.7") == 2
    assert here.acquire("192.0.2.7") == "refused_per_ip"
    counts.clear(1)
    assert here.acquire("192.0.2.7") is None


def test_a_worker_killed_inside_the_lock_does_not_block_the_others() -> None:
    """The lock is a record lock: the kernel releases it with its dead holder."""
    counts = SharedCounts(workers=2)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with counts.locked():
            os.write(ready_w, b"x")
            time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    started = time.monotonic()
    assert counts.column(0).admit("192.0.2.1", 10, 10) is None
    assert time.monotonic() - started < 1


# -- log formatters ------------------------------------------------------------------------------
def record(
    msg: str = "", fields: dict[str, Any] | None = None, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("mailgate.test", logging.WARNING, __file__, 1, msg, None, exc_info)
    if fields is not None:
        setattr(rec, EVENT, fields)
    return rec


KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


def parse_kv(line: str) -> dict[str, str]:
    """Inverse of the key=value format, to check that quoting round-trips."""
    out = {}
    pos = 0
    while pos < len(line):
        m = KV.match(line, pos)
        assert m is not None, f"unparsable at {pos}: {line[pos:]!r}"
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(
                r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
                lambda e: (
                    chr(int(e.group(1)[1:], 16))
                    if len(e.group(1)) > 1
                    else {"n": "\n", "r": "\r", "t": "\t"}.get(e.group(1), e.group(1))
                ),
                value[1:-1],
            )
        out[m.group(1)] = value
        pos = m.end()
    return out


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("cr\rhere", '"cr\\rhere"'),
        ("back\\slash", '"back\\\\slash"'),
        ("a=b", '"a=b"'),
        ("", '""'),
        (None, '""'),
        (3, "3"),
        (0.123456, "0.1235"),
        (123456.7, "123457"),
        (["a", "b"], "a,b"),
        ("café", "café"),
    ],
)
def test_kv_quoting(value: object, rendered: str) -> None:
    out = KeyValueFormatter().format(record(fields={"event": "x", "k": value}))
    assert out.endswith(f" k={rendered}")


@pytest.mark.parametrize(
    "value",
    ["x", "a b", 'q"uote', "new\nline\r\n", "tab\there", "\\", '\\"', "=", "é ü", "\x00ctl"],
)
def test_kv_round_trip_and_one_line(value: str) -> None:
    out = KeyValueFormatter().format(record("m s g", {"event": "e", "k": value, "n": 1}))
    assert "\n" not in out and "\r" not in out
    assert not re.search(r"[\x00-\x1f\x7f]", out)  # no raw control character at all
    parsed = parse_kv(out)
    assert parsed["k"] == value
    assert parsed["msg"] == "m s g"
    assert parsed["event"] == "e"
    assert parsed["level"] == "warning"
    assert parsed["logger"] == "mailgate.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["ts"])


def test_kv_plain_message_and_exception_stay_on_one_line() -> None:
    out = KeyValueFormatter().format(record("check=spf outcome=timeout", None, exc=True))
    assert "\n" not in out
    assert " check=spf outcome=timeout " in out
    assert "ValueError" in parse_kv(out)["exc"]
    assert "bad\nthing" in parse_kv(out)["exc"]


def test_json_formatter() -> None:
    fields = {"event": "message", "id": "abc", "text": 'a "b"\nc', "n": 2.5, "obj": {1, 2}}
    out = JSONFormatter().format(record("hello", fields, exc=True))
    assert "\n" not in out
    data = json.loads(out)
    assert data["msg"] == "hello"
    assert data["event"] == "message"
    assert data["text"] == 'a "b"\nc'
    assert data["n"] == 2.5
    assert data["obj"] == "{1, 2}"  # not JSON-able: str()
    assert data["level"] == "warning"
    assert data["logger"] == "mailgate.test"
    assert "ValueError" in data["exc"]


def test_json_without_message_or_fields() -> None:
    data = json.loads(JSONFormatter().format(record()))
    assert set(data) == {"ts", "level", "logger"}


def test_event_helper_keeps_field_order(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("mailgate.test.event")
    with caplog.at_level(logging.INFO, logger="mailgate.test.event"):
        event(logger, "session_end", session="s1", client="192.0.2.1", reason="quit now")
    (rec,) = caplog.records
    out = KeyValueFormatter().format(rec)
    assert out.split(" ", 3)[3] == 'event=session_end session=s1 client=192.0.2.1 reason="quit now"'
    assert json.loads(JSONFormatter().format(rec))["reason"] == "quit now"


# Characters a client can get into a logged value (HELO, addresses, header-derived
# details) that some readers take for a line break (Python's str.splitlines, log
# viewers), or a terminal acts on (C1 CSI, bidi overrides), or that cannot be encoded
# (a lone surrogate from surrogateescape-decoded bytes).
HOSTILE = [
    "a\u2028ts=1 level=error event=message id=FAKE",
    "a\u2029b",
    "a\x85b",
    "a\x9b31mred",
    "\u202eevil",
    "a\x1b[2Jb",
    "bytes\udcff\udcfe",
    "nbsp\xa0here",
    "tag\U000e0041",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_kv_escapes_every_unprintable_character(value: str) -> None:
    out = KeyValueFormatter().format(record("m", {"event": "e", "k": value, "n": 1}))
    assert len(out.splitlines()) == 1
    assert out.isprintable(), out.encode("unicode_escape")
    out.encode("utf-8")  # strict: no lone surrogate reaches the stream
    parsed = parse_kv(out)
    assert parsed["k"] == value and parsed["n"] == "1"


@pytest.mark.parametrize("value", HOSTILE)
def test_kv_plain_message_cannot_break_the_line(value: str) -> None:
    out = KeyValueFormatter().format(record(f"upstream said {value}"))
    assert len(out.splitlines()) == 1
    assert out.isprintable()


@pytest.mark.parametrize("value", HOSTILE)
def test_json_escapes_every_unprintable_character(value: str) -> None:
    out = JSONFormatter().format(record(value, {"event": "e", "k": value, "l": [value]}))
    assert len(out.splitlines()) == 1
    assert out.isprintable()
    out.encode("utf-8")
    data = json.loads(out)
    assert data["k"] == value and data["l"] == [value] and data["msg"] == value


def test_json_keeps_printable_non_ascii_readable() -> None:
    out = JSONFormatter().format(record("", {"event": "e", "k": "café ü"}))
    assert '"k": "café ü"' in out


def test_huge_values_are_cut_with_a_marker() -> None:
    subject = "S" * 1_000_000
    rcpts = [f"user{i}@example.test" for i in range(1000)]
    fields = {"event": "message", "subject": subject, "rcpts": rcpts, "after": "kept"}
    kv = KeyValueFormatter().format(record(subject, fields))
    assert len(kv) < 20_000
    parsed = parse_kv(kv)
    assert parsed["after"] == "kept"
    assert parsed["subject"].startswith("SSS") and parsed["subject"].endswith("[+995904 chars]")
    assert parsed["rcpts"].startswith("user0@example.test,user1@")
    assert re.search(r",…\[\+\d+ more\]$", parsed["rcpts"])
    js = JSONFormatter().format(record(subject, fields))
    assert len(js) < 20_000
    data = json.loads(js)
    assert data["after"] == "kept" and data["subject"].endswith("[+995904 chars]")
    assert data["rcpts"][0] == "user0@example.test"
    assert re.fullmatch(r"…\[\+\d+ more\]", data["rcpts"][-1])
    short = {"event": "message", "rcpts": rcpts[:3], "subject": "hi"}
    assert json.loads(JSONFormatter().format(record("", short)))["rcpts"] == rcpts[:3]


def test_a_huge_traceback_is_cut() -> None:
    try:
        raise ValueError("x" * 1_000_000)
    except ValueError:
        exc_info = sys.exc_info()
    rec = logging.LogRecord("mailgate.test", logging.ERROR, __file__, 1, "x=boom", None, exc_info)
    assert len(KeyValueFormatter().format(rec)) < 40_000
    assert len(JSONFormatter().format(rec)) < 40_000
    for exc in (
        parse_kv(KeyValueFormatter().format(rec))["exc"],
        json.loads(JSONFormatter().format(rec))["exc"],
    ):
        assert exc.startswith("Traceback") and "ValueError: xxx" in exc
        assert len(exc) > 30_000 and "chars cut]…" in exc and exc.endswith("xxx")
