"""Structured log lines: ``key=value`` by default, one JSON object per line by option (L2).

One line per event that matters to an admin (session, message, reload), with the
session id that also reaches Postfix, so ``grep`` can follow a message across both.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

EVENT = "mailgate_fields"
_NEEDS_QUOTES = re.compile(r'[ "=\\]')

#: Longest value (characters) a line carries; a list is cut between elements.
MAX_VALUE = 4096
#: Longest traceback (``exc``) a line carries: its start and its end are kept.
MAX_TRACEBACK = 32768


def _escape_char(char: str) -> str:
    """``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``: the code point, never the raw character."""
    n = ord(char)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses escaped.

    Why: besides C0 controls, a client's HELO, address or header-derived detail may
    carry characters that readers take for a line end (U+2028, U+2029, NEL U+0085:
    ``str.splitlines``, many log viewers), that terminals act on (C1 CSI U+009B, bidi
    overrides) or that cannot be written as UTF-8 (lone surrogates from
    surrogateescape). Raw, each could forge a log line or corrupt the stream.
    ``mailgate explain`` shows kept values with it too, on an admin's terminal.
    """
    if text.isprintable():  # one C-level scan; the per-character pass is the rare path
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _cut(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` up to ``limit`` characters, then a ``…[+N chars]`` marker."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[+{len(text) - limit} chars]"


def _cut_middle(text: str, limit: int = MAX_TRACEBACK) -> str:
    """A traceback's first and last ``limit / 2`` characters around a ``…[N chars cut]…``.

    Both ends matter: the frames and the error's type open it, the innermost frames
    close it, and a huge value in the error's text (a header, say) sits in between.
    """
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…[{len(text) - 2 * half} chars cut]…{text[-half:]}"


def _cut_list(items: list[str] | tuple[str, ...]) -> list[str]:
    """As many leading elements as fit in ``MAX_VALUE`` characters, then ``…[+N more]``.

    Why: 1,000 recipients of up to 256 octets each made one line a quarter megabyte
    (journald and docker split or drop lines far shorter).
    """
    kept: list[str] = []
    room = MAX_VALUE
    for item in items:
        room -= len(item) + 1
        if room < 0:
            if not kept:  # one huge element: keep its start rather than nothing
                kept.append(_cut(item))
            rest = len(items) - len(kept)
            return [*kept, f"…[+{rest} more]"] if rest else kept
        kept.append(item)
    return kept


def _kv_value(value: Any, limit: int = MAX_VALUE) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
        if len(items) > 8 or sum(map(len, items)) > MAX_VALUE:
            items = _cut_list(items)
        text = ",".join(items)
    elif value is None:
        text = ""
    else:
        text = _cut(str(value), limit)
    # One C-level scan decides (a generator per value showed up in profiles).
    if not text or _NEEDS_QUOTES.search(text) or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        # Any other unprintable character (NUL, ESC, C1, U+2028, ...) from a client must
        # not reach a terminal or a log shipper raw: printable() writes it as \xNN etc.
        escaped = printable(escaped)
        return f'"{escaped}"'
    return text


def kv(value: Any) -> str:
    """``value`` as a logfmt value (quoted and escaped as needed), for the free-text
    lines that write ``key=%s`` themselves: text from outside (an upstream's reply,
    an exception) must not add ``key=value`` pairs of its own."""
    return _kv_value(value)


def _message(record: logging.LogRecord) -> str:
    """The record's text, bounded, with unprintable characters escaped (one line)."""
    return printable(_cut(record.getMessage()))


_last_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    """UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ``; the seconds part is formatted once a second."""
    global _last_second
    second = int(record.created)
    if _last_second[0] != second:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last_second[1]}.{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… event=… k=v …`` with quoting only where needed."""

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, EVENT, {}) or {}
        parts = [f"ts={_timestamp(record)}", f"level={record.levelname.lower()}"]
        parts.append(f"logger={record.name}")
        msg = record.getMessage()
        if msg:
            parts.append(f"msg={_kv_value(msg)}" if fields else _message(record))
        parts.extend(f"{k}={_kv_value(v)}" for k, v in fields.items())
        out = " ".join(parts)
        if record.exc_info:
            exc = _cut_middle(self.formatException(record.exc_info))
            out += " exc=" + _kv_value(exc, len(exc))
        return out


# One encoder for every line: json.dumps with options builds a new one per call.
_JSON_LINE = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _json_value(value: Any) -> Any:
    """A field value bounded as in the key=value format (strings and lists cut)."""
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, list | tuple) and (
        len(value) > 8 or sum(len(str(v)) for v in value) > MAX_VALUE
    ):
        return _cut_list([str(v) for v in value])
    return value


class JSONFormatter(logging.Formatter):
    """One JSON object per line; non-ASCII stays readable, unprintables are ``\\u`` escapes."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        if msg:
            data["msg"] = msg
        data.update(getattr(record, EVENT, {}) or {})
        if record.exc_info:
            data["exc"] = _cut_middle(self.formatException(record.exc_info))
        line = _JSON_LINE(data)
        if len(line) > MAX_VALUE:  # only then can a value be too long: bound them all
            bounded = {k: v if k == "exc" else _json_value(v) for k, v in data.items()}
            line = _JSON_LINE(bounded)
        # ensure_ascii=False leaves U+2028/U+2029/NEL, C1 controls and lone surrogates
        # raw: valid JSON, but a line break to splitlines() readers and no UTF-8. They
        # can only be inside strings, where a \\uXXXX escape is the same character.
        return line if line.isprintable() else _json_printable(line)


def _json_printable(line: str) -> str:
    """``line`` (a JSON text) with each unprintable character as a ``\\uXXXX`` escape."""
    out: list[str] = []
    for c in line:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:  # JSON escapes an astral character as its UTF-16 surrogate pair
            n = ord(c) - 0x10000
            out.append(f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}")
    return "".join(out)


class BufferedStreamHandler(logging.Handler):
    """Writes formatted lines to a stream in batches.

    Why: a write and flush per line cost ~0.1 ms of the event loop per message in
    profiles. Lines are written when 64 are waiting, when a WARNING or worse arrives,
    on ``flush()`` (the app calls it every quarter second) and at exit, so a quiet
    server's log is never more than a moment behind.
    """

    def __init__(self, stream: Any, capacity: int = 64) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if len(self._lines) >= self.capacity or record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            lines, self._lines = self._lines, []
            if not lines:
                return
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone (daemon detached): nothing better to do with logs

    def close(self) -> None:
        self.flush()
        super().close()


def flush_logs() -> None:
    """Write out buffered log lines (called periodically and at shutdown)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    """Route mailgate's logs to stderr (journald/docker pick them up from there)."""
    handler = BufferedStreamHandler(sys.stderr)
    atexit.register(handler.flush)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Our lines never show the caller's file and line, thread or process, so the
    # logging module need not look them up for every record (the "Optimization"
    # section of the logging HOWTO): a frame walk and three calls per line saved.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def event(
    logger: logging.Logger,
    name: str,
    level: int = logging.INFO,
    *,
    message: str = "",
    **fields: Any,
) -> None:
    """Log one structured event; ``fields`` keep their order.

    ``message`` becomes a ``msg=`` field, for the few events whose wording admins
    already grep for (``policy reload refused``).
    """
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={EVENT: {"event": name, **fields}})
