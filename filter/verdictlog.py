"""Verdicts kept in the store for a bounded time, for ``mailgate explain ID`` (L2).

Why: a log line says *what* happened to a message (action, score, symbol names), but
an admin answering "why was this rejected?" days later needs the symbol scores and
details, the reply and the envelope, looked up by the id the logs and headers carry.
Logs may be sampled, rotated or shipped elsewhere; the store is at hand.

Layout (declared in :data:`filter.store.KEYS`):

* ``{prefix}v:{message id}`` — a list of JSON records for one transaction
  (``<session>.<n>``): each RCPT refusal as it happens, then the message's verdict.
  A list, not one value, because one transaction can be refused at several
  recipients before (or instead of) a verdict after DATA, and none should hide another.
* ``{prefix}vs:{session id}`` — a sorted set of the session's message ids, so
  ``mailgate explain SESSION`` finds every transaction of a connection.

Both keys get ``explain.keep`` as TTL on every write (one Lua script, so no key is
ever left without one), and both are capped, so a session that sends thousands of
recipients cannot grow a key without bound.

Recording must never hurt mail: :func:`record` swallows store failures (the store
has counted them in ``mailgate_store_errors_total``) and :func:`record_soon` runs it
off the SMTP path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Mapping
from typing import Any

from filter.store import Store, StoreError
from filter.verdict import Verdict

__all__ = [
    "MAX_RECORDS",
    "MAX_SESSION_MESSAGES",
    "build_record",
    "fetch",
    "parse_id",
    "record",
    "record_soon",
]

log = logging.getLogger("mailgate.verdictlog")

MAX_RECORDS = 200  # per transaction: max_recipients refusals and the verdict fit
MAX_SESSION_MESSAGES = 1000

# One encoder for every record: json.dumps with options builds a new one per call.
_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode

# A session id (hex from the session, "CHECK" from dry runs) and an optional ".<n>".
_ID = re.compile(r"^([A-Za-z0-9_-]{1,64})(?:\.([0-9]{1,9}))?$")

# KEYS[1] the transaction's list, KEYS[2] the session index.
# ARGV: record JSON, ttl (ms), message id, now (unix time), max records, max messages.
_RECORD_LUA = """
local ttl = tonumber(ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[3])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1) end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# The same steps for many records in one call: record i uses KEYS[2i-1], KEYS[2i] and
# ARGV[6i-5 .. 6i]. One command for a whole batch costs a fraction of one per record.
_BATCH_LUA = """
for i = 1, #KEYS / 2 do
  local k1, k2, a = KEYS[2 * i - 1], KEYS[2 * i], 6 * (i - 1)
  local ttl = tonumber(ARGV[a + 2])
  redis.call('RPUSH', k1, ARGV[a + 1])
  redis.call('LTRIM', k1, -tonumber(ARGV[a + 5]), -1)
  redis.call('PEXPIRE', k1, ttl)
  redis.call('ZADD', k2, 'NX', ARGV[a + 4], ARGV[a + 3])
  local extra = redis.call('ZCARD', k2) - tonumber(ARGV[a + 6])
  if extra > 0 then redis.call('ZREMRANGEBYRANK', k2, 0, extra - 1) end
  redis.call('PEXPIRE', k2, ttl)
end
return #KEYS / 2
"""


def parse_id(text: str) -> tuple[str, str | None]:
    """``"ABC.2"`` -> ("ABC", "ABC.2"); ``"ABC"`` -> ("ABC", None). ValueError otherwise.

    Checked before any key is built: an id is typed by an admin and must not be able
    to name other keys (``*``, ``:``) or anything that is not a session/message id.
    """
    m = _ID.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a session id or a message id <session>.<n>")
    session = m.group(1)
    return session, (f"{session}.{m.group(2)}" if m.group(2) is not None else None)


def build_record(
    fields: Mapping[str, object], verdict: Verdict | None, now: float | None = None
) -> dict[str, Any]:
    """The record to keep, from the fields the session logs and the verdict it logged.

    Takes the session's own log fields (``_log_message`` / ``_log_refusal``) so the
    record and the log line can never disagree, and adds what the log line leaves out
    because it would be too long for a line: each symbol's score and detail, and the
    verdict's reason. ``verdict`` is None where the session refused without one
    (a malformed DATA).
    """
    rec: dict[str, Any] = {k: _plain(v) for k, v in fields.items() if k != "symbols"}
    rec["time"] = time.time() if now is None else now
    if "rcpts" not in rec and "rcpt" in rec:  # a refusal at RCPT names one recipient
        rec["rcpts"] = [rec["rcpt"]]
    if verdict is not None:
        rec["action"] = verdict.action.value
        rec["score"] = verdict.score
        rec["reason"] = verdict.reason
        if verdict.would is not None:
            rec["would"] = verdict.would.value
        rec["symbols"] = [
            {"name": s.name, "score": s.score, "detail": s.detail} for s in verdict.symbols
        ]
    else:
        rec["symbols"] = [{"name": str(n), "score": 0.0, "detail": ""} for n in _names(fields)]
    return rec


def _prepare(
    store: Store, msg_id: str, rec: Mapping[str, Any], ttl: float
) -> tuple[list[str], list[str | int]] | None:
    """Keys and arguments of the record script, or None when nothing is to be kept."""
    if ttl <= 0:
        return None
    try:
        session, message = parse_id(msg_id)
    except ValueError:
        log.warning("verdict not kept: bad message id %r", msg_id)
        return None
    if message is None:
        message = f"{session}.0"  # a refusal before any transaction numbered one
    body = _ENCODE({**rec, "id": message})
    keys = [store.key("verdict", message), store.key("verdict_session", session)]
    args: list[str | int] = [
        body,
        max(1, int(ttl * 1000)),
        message,
        repr(float(rec.get("time") or time.time())),
        MAX_RECORDS,
        MAX_SESSION_MESSAGES,
    ]
    return keys, args


async def record(store: Store, msg_id: str, rec: Mapping[str, Any], ttl: float) -> bool:
    """Append ``rec`` to the transaction ``msg_id`` and index it under its session.

    Returns False when nothing was kept: ``ttl`` is 0 (``explain.keep`` off), the id
    is malformed, or the store failed (already counted by the store; logged here at
    debug level only, since a down store is reported by every check that uses it).
    """
    prepared = _prepare(store, msg_id, rec, ttl)
    if prepared is None:
        return False
    keys, args = prepared
    script = store.client.register_script(_RECORD_LUA)
    try:
        await store.call("verdict", lambda: script(keys=keys, args=args))
    except StoreError as exc:
        log.debug("verdict %s not kept: %s", msg_id, exc)
        return False
    return True


FLUSH_DELAY = 0.01  # seconds a record may wait to share a round trip with others


class _Batcher:
    """Writes queued verdict records in one script call per ``FLUSH_DELAY``.

    Why: one script call per message cost ~0.2 ms of CPU on the SMTP process (the
    proxy core lost a third of its throughput in the benchmark); batched, the cost is
    shared by every message of the interval. A crash loses at most the last interval
    of explain records, never mail.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.script = store.client.register_script(_BATCH_LUA)
        self.pending: list[tuple[list[str], list[str | int]]] = []
        self.task: asyncio.Task[None] | None = None

    def add(self, keys: list[str], args: list[str | int]) -> None:
        self.pending.append((keys, args))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_DELAY)
        finally:
            batch, self.pending = self.pending, []
            self.task = None
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[tuple[list[str], list[str | int]]]) -> None:
        keys = [k for ks, _ in batch for k in ks]
        args = [a for _, as_ in batch for a in as_]

        async def run() -> Any:
            return await self.store.run_script(self.script, keys, args)

        try:
            await self.store.call("verdict", run)
        except StoreError as exc:
            log.debug("%d verdict records not kept: %s", len(batch), exc)


_BATCHERS: weakref.WeakKeyDictionary[Store, _Batcher] = weakref.WeakKeyDictionary()


def record_soon(
    store: Store | None,
    msg_id: str,
    rec: Mapping[str, Any],
    ttl: float,
    background: set[asyncio.Task[None]] | None = None,
) -> None:
    """Queue ``rec`` for the store; the reply to the client never waits for Redis.

    ``background`` is accepted for callers that track their tasks; the batcher keeps
    its own flush task referenced.
    """
    if store is None:
        return
    prepared = _prepare(store, msg_id, rec, ttl)
    if prepared is None:
        return
    batcher = _BATCHERS.get(store)
    if batcher is None:
        batcher = _BATCHERS[store] = _Batcher(store)
    batcher.add(*prepared)


async def fetch(store: Store, ident: str) -> dict[str, Any] | None:
    """Every kept record of a message id (``<session>.<n>``) or of a whole session.

    Returns ``{"id", "session", "messages": [ids], "records": [...]}`` with records
    in time order, or None when nothing is kept (never recorded, or expired).
    Raises ValueError for a malformed id and StoreError when the store fails.
    """
    session, message = parse_id(ident)
    if message is not None:
        ids = [message]
    else:
        index = store.key("verdict_session", session)
        ids = [
            str(m) for m in await store.call("explain", lambda: store.client.zrange(index, 0, -1))
        ]
    if not ids:
        return None

    async def read() -> list[Any]:
        pipe = store.client.pipeline(transaction=False)
        for m in ids:
            pipe.lrange(store.key("verdict", m), 0, -1)
        return list(await pipe.execute())

    lists = await store.call("explain", read)
    records: list[dict[str, Any]] = []
    found: list[str] = []
    for m, raw in zip(ids, lists, strict=True):
        if raw:
            found.append(m)
        for item in raw:
            try:
                value = json.loads(item)
            except ValueError:
                continue  # not ours: never let one bad value hide the rest
            if isinstance(value, dict):
                records.append(value)
    if not records:
        return None
    records.sort(key=_record_time)
    return {"id": ident.strip(), "session": session, "messages": found, "records": records}


def _record_time(rec: Mapping[str, Any]) -> float:
    """A record's time for ordering; 0 for one whose time is missing or not a number
    (a value written by something else must not make ``explain`` fail)."""
    value = rec.get("time")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0.0
    try:
        when = float(value)
    except ValueError:
        return 0.0
    return when if math.isfinite(when) else 0.0


def _plain(value: object) -> Any:
    """A log field as JSON can hold it (tuples as lists; anything odd as text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _names(fields: Mapping[str, object]) -> list[object]:
    names = fields.get("symbols")
    return list(names) if isinstance(names, list | tuple) else []
