"""TOML output of a policy for ``mailgate policy show [--changed]``.

The emitter is hand-written on purpose: the standard library only reads TOML,
and the values here are few and simple (bool, int, float, str, arrays of those,
tables, arrays of tables), so a short emitter beats a new dependency. Output is
checked by reading it back with ``tomllib`` in the tests.
"""

from __future__ import annotations

import math
import re
from typing import Any

from filter.policy.schema import DEFAULT_POLICY, Policy, TomlValue, to_toml_data

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def render_toml(policy: Policy, changed_only: bool = False) -> str:
    """The policy as TOML in human units.

    ``changed_only`` keeps only keys that differ from the defaults, like ``postconf -n``.
    """
    data: dict[str, Any] = to_toml_data(policy)
    if changed_only:
        data = _changed(data, to_toml_data(DEFAULT_POLICY))
    lines: list[str] = []
    for name, table in data.items():
        _emit_table(lines, [name], table, skip_empty=changed_only)
    return "\n".join(lines).lstrip("\n") + "\n" if lines else ""


def _changed(current: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """Keys of ``current`` whose value differs from ``default``; tables are compared key by key."""
    out: dict[str, Any] = {}
    for name, value in current.items():
        base = default.get(name)
        if isinstance(value, dict) and isinstance(base, dict):
            sub = _changed(value, base)
            if sub:
                out[name] = sub
        elif name not in default or value != base:
            out[name] = value
    return out


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit_table(lines: list[str], path: list[str], table: dict[str, Any], skip_empty: bool) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    if scalars or (not skip_empty and not any(isinstance(v, dict) for v in table.values())):
        lines.extend(["", f"[{_dotted(path)}]"])
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    for name, value in table.items():
        if isinstance(value, dict):
            _emit_table(lines, [*path, name], value, skip_empty)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{_dotted([*path, name])}]]"])
                lines.extend(f"{_key(k)} = {_value(v)}" for k, v in item.items())


def _dotted(path: list[str]) -> str:
    return ".".join(_key(p) for p in path)


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} as a policy value")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    # Inline table: only reachable for a table nested inside an array.
    return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
