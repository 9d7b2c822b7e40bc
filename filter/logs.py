"""Structured log lines: ``key=value`` by default, one JSON object per line by option (L2).

One line per event that matters to an admin (session, message, reload), with the
session id that also reaches Postfix, so ``grep`` can follow a message across both.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

EVENT = "mailgate_fields"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _kv_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    elif value is None:
        text = ""
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        # Any other control character (NUL, ESC, ...) from a client must not reach a
        # terminal or a log shipper raw.
        escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", escaped)
        return f'"{escaped}"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… event=… k=v …`` with quoting only where needed."""

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, EVENT, {}) or {}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}"]
        parts.append(f"logger={record.name}")
        msg = record.getMessage()
        if msg:
            parts.append(f"msg={_kv_value(msg)}" if fields else msg)
        parts.extend(f"{k}={_kv_value(v)}" for k, v in fields.items())
        out = " ".join(parts)
        if record.exc_info:
            out += " exc=" + _kv_value(self.formatException(record.exc_info))
        return out


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        if msg:
            data["msg"] = msg
        data.update(getattr(record, EVENT, {}) or {})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    """Route mailgate's logs to stderr (journald/docker pick them up from there)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; ``fields`` keep their order."""
    if logger.isEnabledFor(level):
        logger.log(level, "", extra={EVENT: {"event": name, **fields}})
