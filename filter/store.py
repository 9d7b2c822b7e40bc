"""The store (L2): Redis through redis-py asyncio, and every key mailgate keeps there.

Why this module exists: checks must not speak Redis. They call a few operations
here (evaluate a greylist triplet, count a rate-limited event, ping), get plain
values back, and see one exception type, :class:`StoreError`, whatever went wrong
underneath (refused connection, timeout, failover, a script error). Each failure
is counted in ``mailgate_store_errors_total`` here, so no caller can forget to.

Deployments (``redis.url``):

* ``redis://[[user]:pass@]host[:port][/db]``, ``rediss://…`` (TLS), ``unix:///path.sock[?db=N]``
  — one server, through a ``BlockingConnectionPool``: when every connection is busy
  a caller waits (up to ``pool_timeout``) instead of failing, which the default
  pool does under load (LIBRARY-NOTES §9).
* ``redis+sentinel://[[user]:pass@]host[:port][,host[:port]…]/service[/db][?sentinel_password=…]``
  (``rediss+sentinel://`` for TLS; sentinel port defaults to 26379) — the master
  of ``service`` as the sentinels name it, rediscovered on failover (and confirmed
  before a pooled connection is reused: ``_BlockingSentinelPool``). The pool is
  blocking as above; a sentinel that does not answer is passed over after one
  socket timeout.
* ``redis+cluster://[[user]:pass@]host[:port][,host[:port]…]`` (``rediss+cluster://``)
  — Redis Cluster from a few seed nodes. redis-py's cluster client has no blocking
  pool (it raises when a node's connections run out), so a semaphore of
  ``max_connections`` makes callers wait instead. Every key carries the prefix as
  a hash tag (``{mailgate:}gl:…``): the greylist script reads and writes several
  keys atomically, which Cluster allows only within one hash slot. Greylist state
  is small (a few hundred bytes per triplet), so one slot holds millions.

Every operation (but the bulk delete of ``greylist forget``) fails, as a counted
StoreError, after ``pool_timeout + socket_timeout`` whatever stopped answering
(``Store._call``): far below ``server.check_timeout``, so ``redis.on_error`` decides.

Every key is declared in :data:`KEYS` with its type, TTL and purpose, and every
key gets a TTL when written: Redis memory is bounded by recent traffic, never
by time since installation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

from filter.greylist import AllowTarget, Triplet, allow_argument
from filter.policy.schema import GreylistPolicy, RedisPolicy
from filter.redisscripts import ConnectParams, ScriptRunner
from filter.storeurl import StoreURL, parse_store_url
from filter.units import Network

if TYPE_CHECKING:  # annotations only: `greylist` and `explain` need no prometheus_client
    from filter.metrics import Metrics

__all__ = [
    "KEYS",
    "AllowEntry",
    "AwlEntry",
    "ForgetReport",
    "GreylistOutcome",
    "GreylistStats",
    "KeySpec",
    "RateCounter",
    "RateOutcome",
    "Store",
    "StoreError",
    "StoreURL",
    "TripletEntry",
    "parse_store_url",
]

T = TypeVar("T")


# --- the keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    """One kind of key: its name after the prefix, Redis type, TTL rule and purpose."""

    pattern: str
    type: str
    ttl: str
    purpose: str


KEYS: dict[str, KeySpec] = {
    "triplet": KeySpec(
        "gl:t:{sha1(origin NUL sender NUL recipient)}",
        "hash: first, last, passed, seen, origin, sender, rcpt, net",
        "greylist.retry_window while waiting; greylist.max_age once passed, renewed on every pass",
        "one greylist triplet: when it was first seen, when (if) a retry passed, and its "
        "readable parts for `mailgate greylist show/forget` (the name is one-way)",
    ),
    "awl": KeySpec(
        "gl:awl:{client network CIDR}",
        "hash: count, counted, seen",
        "greylist.max_age, renewed on every pass and every allowlisted message",
        "auto-allowlist of a client network: retries that ended a triplet's greylisting, "
        "counted at most once per hour; at greylist.awl_count the network is no longer "
        "greylisted",
    ),
    "allow": KeySpec(
        "gl:allow",
        "hash: net:{CIDR} | domain:{domain} -> expiry (unix time)",
        "the longest entry's remaining time, extended by each `allow`; each field also "
        "carries its own expiry, checked on read and pruned on write",
        "admin allow entries from `mailgate greylist allow` (domains count only when SPF "
        "passes for them)",
    ),
    "verdict": KeySpec(
        "v:{message id <session>.<n>}",
        "list of JSON records (filter.verdictlog): RCPT refusals, then the message verdict",
        "explain.keep, set on every write",
        "what mailgate decided about one transaction and why (envelope, symbols with "
        "scores and details, action, reply, queue id), for `mailgate explain ID`; at most "
        "the last 200 records",
    ),
    "verdict_session": KeySpec(
        "vs:{session id}",
        "sorted set: message id -> time of its first record",
        "explain.keep, set on every write",
        "the message ids of one session that have verdict records, so `mailgate explain "
        "SESSION` finds them all; at most the last 1000",
    ),
    "rl_connections": KeySpec(
        "rl:c:{client network CIDR}",
        "sorted set: c:{session id} -> time (ms)",
        "ratelimit.window, renewed on every counted connection",
        "sliding-window log of the connections a client network made; holds at most "
        "ratelimit.connections_per_network members (refused events are not logged)",
    ),
    "rl_messages": KeySpec(
        "rl:m:{net:CIDR | dom:sender domain | domnet:sender domain|CIDR}",
        "sorted set: m:{transaction id} -> time (ms)",
        "ratelimit.window, renewed on every counted message",
        "sliding-window log of the messages (transactions) of a client network or sender "
        "domain (domnet: the domain as claimed without an SPF pass, per client network); "
        "the transaction id as member counts a message once however many recipients it has",
    ),
    "rl_recipients": KeySpec(
        "rl:r:{net:CIDR | dom:sender domain | domnet:sender domain|CIDR}",
        "sorted set: r:{random event id} -> time (ms)",
        "ratelimit.window, renewed on every counted recipient",
        "sliding-window log of the recipients (accepted RCPTs) of a client network or sender "
        "domain, scoped like rl:m:",
    ),
}

HOUR = 3600.0


# --- the greylist script ----------------------------------------------------------------

# One round trip, atomic: Redis runs a script to completion before any other command,
# so two connections racing on the first attempt of one triplet see "new" then
# "early", never two creations. Times come from the caller (ARGV[1]) so that every
# mailgate instance, and tests with an injected clock, agree on "now"; TTLs (real
# Redis time) bound memory, the stored times decide. ARGV[6] = "0" evaluates
# without writing (dry run). ARGV[11] holds the allow-hash fields to look up, one per
# line: as one argument, not 25 (113 for IPv6), the client packs one string instead of
# many, which was most of the client's cost of a greylist call. Floats go back as
# strings: Lua numbers returned to Redis would be truncated to integers.
_GREYLIST_LUA = """
local now = tonumber(ARGV[1])
local delay = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_age = tonumber(ARGV[4])
local awl_needed = tonumber(ARGV[5])
local write = ARGV[6] == '1'
local hour = 3600
local function ms(s) return math.max(1, math.ceil(s * 1000)) end

local fields = {}
for field in string.gmatch(ARGV[11] or '', '[^\\n]+') do fields[#fields + 1] = field end
if #fields > 0 then
  local found = redis.call('HMGET', KEYS[3], unpack(fields))
  for i = 1, #fields do
    local untl = tonumber(found[i])
    if untl and untl > now then return {'allowlisted', '0', fields[i]} end
  end
end

local awl = redis.call('HMGET', KEYS[2], 'count', 'counted', 'seen')
local awl_count = tonumber(awl[1]) or 0
local awl_seen = tonumber(awl[3])
if awl_seen and now - awl_seen > max_age then awl_count = 0 end
if awl_needed > 0 and awl_count >= awl_needed then
  if write then
    redis.call('HSET', KEYS[2], 'seen', ARGV[1])
    redis.call('PEXPIRE', KEYS[2], ms(max_age))
  end
  return {'allowlisted', '0', 'awl:' .. awl_count}
end

local t = redis.call('HMGET', KEYS[1], 'first', 'last', 'passed')
local first, last, passed = tonumber(t[1]), tonumber(t[2]), tonumber(t[3]) or 0
local known = first ~= nil and last ~= nil
if known then
  if passed == 0 then known = now - first <= window else known = now - last <= max_age end
end
if not known then
  if write then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'first', ARGV[1], 'last', ARGV[1], 'passed', '0',
      'seen', '1', 'origin', ARGV[7], 'sender', ARGV[8], 'rcpt', ARGV[9], 'net', ARGV[10])
    redis.call('PEXPIRE', KEYS[1], ms(window))
  end
  return {'new', tostring(delay), ''}
end
if passed == 0 and now - first < delay then
  if write then
    redis.call('HINCRBY', KEYS[1], 'seen', 1)
    redis.call('HSET', KEYS[1], 'last', ARGV[1])
  end
  return {'early', tostring(first + delay - now), ''}
end
local how = 'again'
if passed == 0 then how = 'first' end
if write then
  if passed == 0 then redis.call('HSET', KEYS[1], 'passed', ARGV[1]) end
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'seen', 1)
  redis.call('PEXPIRE', KEYS[1], ms(max_age))
  if awl_needed > 0 then
    if awl_seen and now - awl_seen > max_age then redis.call('DEL', KEYS[2]) end
    local counted = tonumber(redis.call('HGET', KEYS[2], 'counted'))
    -- Only a retry that ended a triplet's greylisting counts (postgrey: a pass with
    -- "!last_was_successful"); a known triplet passing again proves no retrying.
    if how == 'first' and (counted == nil or now - counted >= hour) then
      redis.call('HINCRBY', KEYS[2], 'count', 1)
      redis.call('HSET', KEYS[2], 'counted', ARGV[1])
    end
    if redis.call('EXISTS', KEYS[2]) == 1 then  -- never a count-less entry
      redis.call('HSET', KEYS[2], 'seen', ARGV[1])
      redis.call('PEXPIRE', KEYS[2], ms(max_age))
    end
  end
end
return {'passed', '0', how, tostring(now - first)}
"""

# `mailgate greylist allow`: add one field, drop expired ones, and make the key live
# at least as long as the new entry (relative TTLs: no mixing of client and server
# clocks). KEYS[1] allow hash; ARGV: field, expiry (unix time), ttl seconds, now.
_ALLOW_LUA = """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) == nil or tonumber(all[i + 1]) <= tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local want = math.ceil(tonumber(ARGV[3]) * 1000)
if redis.call('PTTL', KEYS[1]) < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
"""


# Sliding-window rate counters, one round trip for all the counters an event touches.
#
# Why a log (a sorted set of event id -> time) and not the cheaper two-bucket estimate
# (current fixed window + the previous one weighted by overlap): the log is exact, so a
# limit of N means at most N events in any window length, concurrent instances
# included; the estimate over-counts right after a burst and under-counts when the
# previous window's events were bunched at its end. The log costs one member per
# counted event per counter, and since refused events are not logged, a key never
# holds more members than its limit: memory is bounded by min(traffic, limit) per
# key, and every key expires one window after its last event. Members are event ids,
# so the same transaction counted again (its second recipient, a re-run after
# XFORWARD) is no new event: that is how "messages" count transactions, not RCPTs.
#
# All-or-nothing: every counter is checked first; only when none is full is the event
# logged in all of them, so a refused recipient uses up no quota anywhere. Times are
# the caller's (ARGV[1], ms) like the greylist's, so tests can inject a clock; Redis
# TTLs (server time) only bound memory. ARGV[3] = "0" evaluates without writing (dry
# run): expired members are then skipped by score instead of removed.
# KEYS[i]: a counter; ARGV[2 + 2i]: its limit; ARGV[3 + 2i]: the event's member.
# Returns {over, retry_ms, count_1, ..., count_k}: over is the index of the first full
# counter (0: none, the event was counted), retry_ms the time until its oldest member
# leaves the window; count_i the members of counter i in the window before this event
# (k = over when refused: later counters were not looked at).
_RATELIMIT_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local write = ARGV[3] == '1'
local since = now - window
local counts, fresh = {}, {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 + 2 * i])
  local member = ARGV[3 + 2 * i]
  if write then redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', since) end
  local n = redis.call('ZCOUNT', KEYS[i], '(' .. since, '+inf')
  local seen = tonumber(redis.call('ZSCORE', KEYS[i], member))
  counts[i] = n
  fresh[i] = not (seen and seen > since)
  if fresh[i] and n >= limit then
    local oldest = redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. since, '+inf',
      'WITHSCORES', 'LIMIT', 0, 1)
    local retry = window
    if oldest[2] then retry = math.max(0, tonumber(oldest[2]) + window - now) end
    local out = {i, retry}
    for j = 1, i do out[#out + 1] = counts[j] end
    return out
  end
end
if write then
  for i = 1, #KEYS do
    if fresh[i] then
      redis.call('ZADD', KEYS[i], now, ARGV[3 + 2 * i])
      redis.call('PEXPIRE', KEYS[i], window)
    end
  end
end
local out = {0, 0}
for i = 1, #KEYS do out[#out + 1] = counts[i] end
return out
"""


@dataclass(frozen=True)
class RateCounter:
    """One sliding-window counter an event counts toward.

    ``kind`` is a :data:`KEYS` name (``rl_connections``, ``rl_messages``,
    ``rl_recipients``), ``subject`` the rest of the key (``net:192.0.2.0/24``),
    ``member`` the event's id: an id already in the window is not counted again.
    """

    kind: str
    subject: str
    limit: int
    member: str


@dataclass(frozen=True)
class RateOutcome:
    """What the store says about one event.

    ``over``: index into the counters of the first one that was full (the event was
    refused and counted nowhere), or None (counted everywhere, unless a dry run).
    ``counts``: events per counter in the window before this one (when refused, only
    up to the full counter). ``retry_after``: seconds until the full counter has room.
    """

    over: int | None
    counts: tuple[int, ...]
    retry_after: float = 0.0


@dataclass(frozen=True)
class GreylistOutcome:
    """What the store says about one triplet.

    ``result``: "new" (first sighting, now remembered), "early" (retried before the
    delay), "passed" (retried in time, or passed before) or "allowlisted" (an admin
    allow entry or the auto-allowlist matched; ``detail`` says which).
    ``retry_after``: seconds until a retry will pass (new/early), else 0.
    ``waited``: for the first pass of a triplet, how long the sender took to retry.
    """

    result: str
    retry_after: float
    detail: str = ""
    waited: float = 0.0  # "passed" from "first": seconds since the first attempt


# --- URLs -------------------------------------------------------------------------------


#: How often (seconds, at most) a pool reusing its connections asks the sentinels
#: whether their address is still the master's (see ``_BlockingSentinelPool``).
_MASTER_RECHECK = 1.0


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait-for-a-connection, and
    no writes to a master the sentinels have replaced.

    The two compose by MRO: SentinelConnectionPool chooses the connection class and
    address, BlockingConnectionPool's ``get_connection`` waits for a free slot.

    Why the recheck: redis-py asks the sentinels for the master only when it opens a
    connection. After a failover whose old master did not die but stopped answering
    (a frozen host, a partition) and then answers again, the pool's open connections
    to it are healthy sockets to a server that still believes it is the master until
    the sentinels demote it (about 10 s later): every greylist triplet and rate event
    in between went there, and was thrown away when it resynced from the new master.
    So before a connection is reused, the master's address is confirmed with the
    sentinels (at most once per ``_MASTER_RECHECK``), and a connection to any other
    address is closed: it reopens through the sentinels, to the new master.

    The caller that triggers the question waits for the answer at most one socket
    timeout (a sentinel that does not answer must not stall mail while the master
    does); the question goes on in the background, and the others do not wait for it.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._asked_at = -math.inf  # monotonic time of the last question to the sentinels
        self._asking: asyncio.Task[None] | None = None

    async def get_master_address(self) -> Any:
        """The sentinels' answer (redis-py's; it also closes idle connections when the
        address changed), remembered as fresh for ``_MASTER_RECHECK``."""
        self._asked_at = time.monotonic()
        return await super().get_master_address()  # type: ignore[no-untyped-call]

    async def ensure_connection(self, connection: Any) -> None:
        """redis-py's check of a connection leaving the pool, after the master check."""
        if connection.is_connected:
            await self._confirm_master()
            master = self.master_address
            if master is not None and (connection.host, connection.port) != tuple(master):
                await connection.disconnect()  # reconnects through the sentinels below
        await super().ensure_connection(connection)

    async def _confirm_master(self) -> None:
        if self._asking is not None and not self._asking.done():
            return  # someone asked already: use what we know meanwhile
        if time.monotonic() - self._asked_at < _MASTER_RECHECK:
            return
        self._asking = asyncio.ensure_future(self._ask())
        await asyncio.wait({self._asking}, timeout=self.connection_kwargs.get("socket_timeout"))

    async def _ask(self) -> None:
        # No answer (sentinels down or in the middle of a failover): keep the connections
        # we have; if the master is gone too, their own errors say so.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.get_master_address()

    async def aclose(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._asking
        await super().aclose()


# --- entries for the admin commands -----------------------------------------------------


@dataclass(frozen=True)
class TripletEntry:
    origin: str
    sender: str
    recipient: str
    net: str
    first: float
    last: float
    passed: float  # 0: still waiting for a retry
    seen: int
    ttl: float  # seconds left, -1 unknown


@dataclass(frozen=True)
class AwlEntry:
    network: str
    count: int
    seen: float
    ttl: float


@dataclass(frozen=True)
class AllowEntry:
    field: str
    expires: float


@dataclass(frozen=True)
class GreylistStats:
    triplets: int
    waiting: int
    passed: int
    awl_networks: int
    awl_active: int
    allow_networks: int
    allow_domains: int


@dataclass(frozen=True)
class ForgetReport:
    triplets: int
    awl: int
    allow: int
    # Allow entries of wider networks that cover the target: an admin's decision about
    # other hosts too, so kept, and named for the admin to forget by name if meant.
    wider_allow: tuple[str, ...] = ()


#: What a store operation can raise that means "the store failed": redis-py's own
#: errors, the socket's, timeouts, and the cluster client's, which are not RedisErrors
#: (``SlotNotCoveredError`` and friends derive from ``RedisClusterException``).
_STORE_FAILURES = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)


class StoreError(Exception):
    """The store failed (down, timed out, failed over mid-command, refused a script)."""


# --- the store --------------------------------------------------------------------------


class Store:
    """One Redis client (and pool) for the process; safe to share between sessions."""

    def __init__(
        self,
        url: str,
        key_prefix: str = "mailgate:",
        *,
        metrics: Metrics | None = None,
        max_connections: int = 50,
        socket_timeout: float = 1.0,
        pool_timeout: float = 2.0,
    ) -> None:
        self.url = parse_store_url(url)
        self.metrics = metrics
        self.mode = self.url.mode
        # Cluster: the prefix becomes a hash tag so every key shares one slot.
        self.prefix = "{" + key_prefix + "}" if self.mode == "cluster" else key_prefix
        self._limit: asyncio.Semaphore | None = None
        # The longest one operation may take, whatever stopped answering: a wait for a
        # connection, then one socket timeout (see ``_call``).
        self.call_timeout = pool_timeout + socket_timeout
        self._sentinel: Sentinel | None = None
        self.client: Any = self._build(max_connections, socket_timeout, pool_timeout)
        self._direct: ScriptRunner | None = None
        if self.mode == "standalone":
            pool = self.client.connection_pool
            self._direct = ScriptRunner(
                ConnectParams.from_pool(pool.connection_class, pool.connection_kwargs),
                max_connections,
                socket_timeout + pool_timeout,
            )
        self._greylist_script = self.client.register_script(_GREYLIST_LUA)
        self._allow_script = self.client.register_script(_ALLOW_LUA)
        self._ratelimit_script = self.client.register_script(_RATELIMIT_LUA)

    @classmethod
    def from_policy(cls, policy: RedisPolicy, metrics: Metrics | None = None) -> Store:
        return cls(
            policy.url,
            policy.key_prefix,
            metrics=metrics,
            max_connections=policy.pool_size,
            socket_timeout=policy.timeout,
            pool_timeout=policy.pool_timeout,
        )

    def _build(self, max_connections: int, socket_timeout: float, pool_timeout: float) -> Any:
        # One quick retry on a broken connection (a pooled socket the server closed),
        # never a backoff that outlasts the SMTP client's patience.
        common: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(
                ExponentialBackoff(cap=0.05, base=0.01), 1, (redis.exceptions.ConnectionError,)
            ),
        }
        u = self.url
        if u.mode == "standalone":
            pool = aioredis.BlockingConnectionPool.from_url(
                u.url, max_connections=max_connections, timeout=pool_timeout, **common
            )
            return aioredis.Redis.from_pool(pool)
        auth: dict[str, Any] = {"username": u.username, "password": u.password}
        if u.mode == "sentinel":
            # No retry on the sentinels: a sentinel that does not answer within the
            # socket timeout is passed over for the next one. redis-py's default for
            # them (10 retries with backoff) spent 14 s on one frozen sentinel before
            # asking the next, and twice that when none answered.
            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_timeout,
                "ssl": u.tls,
                "retry": Retry(NoBackoff(), 0),
            }
            if u.sentinel_password:
                sentinel_kwargs["password"] = u.sentinel_password
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(u.hosts), sentinel_kwargs=sentinel_kwargs
            )
            self._sentinel = sentinel
            return sentinel.master_for(
                u.service,
                connection_pool_class=_BlockingSentinelPool,
                db=u.db,
                ssl=u.tls,
                max_connections=max_connections,
                timeout=pool_timeout,
                **auth,
                **common,
            )
        self._limit = asyncio.Semaphore(max_connections)
        nodes = [ClusterNode(h, p) for h, p in u.hosts]
        return RedisCluster(
            startup_nodes=nodes, ssl=u.tls, max_connections=max_connections, **auth, **common
        )

    def key(self, kind: str, *parts: str) -> str:
        """The full name of a key declared in :data:`KEYS`."""
        if kind not in KEYS:
            raise KeyError(kind)
        name = KEYS[kind].pattern.split("{", 1)[0]
        return self.prefix + name + ":".join(parts)

    async def run_script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One registered script (``client.register_script``) on the fastest path the
        deployment allows; errors as redis-py raises them (wrap in ``call``)."""
        if self._direct is not None:
            return await self._direct.evalsha(script, keys, args)
        return await script(keys=keys, args=args)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], *, bounded: bool = True) -> T:
        """Run one store operation; any failure becomes a counted StoreError.

        ``bounded`` (all but bulk admin writes, and scripts on the standalone direct
        runner, which bounds each call with one timeout of its own and keeps the mail
        path free of a second): the operation fails after
        ``call_timeout`` whatever redis-py is doing. Its own timeouts apply per socket
        operation and compound (a wait for a connection, a connect retried, each
        sentinel asked in turn, the command retried): a frozen master or sentinel made
        one call take up to 28 s, past ``server.check_timeout``, where a check becomes
        a temperror without ``redis.on_error``'s decision and ``tempfail`` no longer
        holds. A cancelled command closes its connection (redis-py), so no late reply
        is ever read as another's.
        """
        try:
            async with asyncio.timeout(self.call_timeout if bounded else None):
                if self._limit is None:
                    return await op()
                async with self._limit:
                    return await op()
        except _STORE_FAILURES as exc:
            if self.metrics is not None:
                self.metrics.store_errors.inc()
            detail = str(exc) or f"no answer within {self.call_timeout:g}s"
            raise StoreError(f"{what}: {type(exc).__name__}: {detail}") from exc

    async def call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """One operation of a module that keeps its own keys here (``filter.verdictlog``).

        Public so those modules get the same failure handling (a counted StoreError)
        without reaching into this class.
        """
        return await self._call(what, op)

    def count_greylist(self, result: str) -> None:
        """``mailgate_greylist_total{result}``, when the app passed metrics in."""
        if self.metrics is not None:
            self.metrics.count_greylist(result)

    def observe_greylist_retry(self, seconds: float) -> None:
        """``mailgate_greylist_retry_delay_seconds``: how long senders take to retry."""
        if self.metrics is not None:
            self.metrics.greylist_retry_delay.observe(seconds)

    def count_ratelimit(self, limit: str, result: str) -> None:
        """``mailgate_ratelimit_total{limit,result}``, when the app passed metrics in."""
        if self.metrics is not None:
            self.metrics.count_ratelimit(limit, result)

    async def ping(self) -> bool:
        """Health: True when the store answers (for /readyz); never raises."""
        try:
            return bool(await self._call("ping", self.client.ping))
        except StoreError:
            return False

    async def aclose(self) -> None:
        # Closing a client whose server is gone is not an error worth raising.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if self._direct is not None:
                await self._direct.aclose()
            await self.client.aclose()
        # The sentinels' own clients are not the master client's to close.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if self._sentinel is not None:
                await self._sentinel.aclose()

    # --- greylisting on the mail path -------------------------------------------------

    async def greylist(
        self,
        triplet: Triplet,
        client_ip: str,
        network: str,
        spf_domain: str | None,
        policy: GreylistPolicy,
        now: float,
        write: bool = True,
    ) -> GreylistOutcome:
        """Evaluate (and unless ``write`` is False, record) one triplet, in one round trip.

        ``network`` is the client's own network (the AWL and `forget` key on it even
        when the triplet's origin is an SPF domain); ``spf_domain`` is set only when
        SPF passed for it, and makes domain allow entries count.
        """
        keys = [
            self.key("triplet", triplet.digest()),
            self.key("awl", network),
            self.key("allow"),
        ]
        args: list[str | float | int] = [
            repr(now),
            repr(policy.delay),
            repr(policy.retry_window),
            repr(policy.max_age),
            policy.awl_count,
            "1" if write else "0",
            triplet.origin,
            triplet.sender,
            triplet.recipient,
            network,
            allow_argument(client_ip, spf_domain),
        ]
        raw = await self._call(
            "greylist",
            lambda: self.run_script(self._greylist_script, keys, args),
            bounded=self._direct is None,  # the direct runner bounds each call itself
        )
        result, retry_after, detail = (str(x) for x in raw[:3])
        waited = float(raw[3]) if len(raw) > 3 else 0.0
        return GreylistOutcome(result, max(0.0, float(retry_after)), detail, max(0.0, waited))

    # --- rate limits on the mail path ---------------------------------------------------

    async def rate_limit(
        self,
        counters: Sequence[RateCounter],
        window: float,
        now: float,
        write: bool = True,
    ) -> RateOutcome:
        """Check (and unless ``write`` is False, count) one event, in one round trip.

        The event is counted in every counter only if none of them is full; see the
        script's comment for why a sorted-set log and why refusals are not counted.
        """
        if not counters:
            return RateOutcome(None, ())
        keys = [self.key(c.kind, c.subject) for c in counters]
        args: list[str | int] = [
            int(now * 1000),
            max(1, math.ceil(window * 1000)),
            "1" if write else "0",
        ]
        for c in counters:
            args += [c.limit, c.member]
        raw = await self._call(
            "ratelimit",
            lambda: self.run_script(self._ratelimit_script, keys, args),
            bounded=self._direct is None,  # as in greylist()
        )
        over, retry_ms, *counts = (int(x) for x in raw)
        return RateOutcome(over - 1 if over else None, tuple(counts), retry_ms / 1000)

    # --- admin commands -----------------------------------------------------------------

    async def _scan(self, kind: str, count: int = 1000) -> AsyncIterator[str]:
        """Key names of one kind, by SCAN (never KEYS: that blocks a busy server)."""
        match = _glob_escape(self.key(kind)) + "*"
        try:
            extra: dict[str, Any] = {}
            if self.mode == "cluster":
                # Every key lives in the prefix's slot: scan only the node owning it. A
                # fresh client (the admin commands) has no slot map until initialised.
                await self.client.initialize()
                extra["target_nodes"] = self.client.get_node_from_key(self.prefix)
            async for k in self.client.scan_iter(match=match, count=count, **extra):
                yield str(k)
        except _STORE_FAILURES as exc:
            if self.metrics is not None:
                self.metrics.store_errors.inc()
            raise StoreError(f"scan: {type(exc).__name__}: {exc}") from exc

    async def _hashes(
        self, keys: Sequence[str], fields: Sequence[str]
    ) -> list[tuple[list[str | None], int]]:
        """HMGET + PTTL for many keys, pipelined (no transaction needed to read)."""

        async def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, list(fields))
                pipe.pttl(k)
            return list(await pipe.execute())

        out = await self._call("read", run)
        return [(out[i], int(out[i + 1])) for i in range(0, len(out), 2)]

    async def triplets(self, limit: int | None = None) -> list[TripletEntry]:
        """Stored triplets (up to ``limit``, in no particular order), with their state."""
        fields = ("origin", "sender", "rcpt", "net", "first", "last", "passed", "seen")
        found: list[TripletEntry] = []
        batch: list[str] = []

        async def flush() -> None:
            for values, pttl in await self._hashes(batch, fields):
                if values[4] is None:
                    continue  # expired between SCAN and HMGET
                o, s, r, n, first, last, passed, seen = values
                found.append(
                    TripletEntry(
                        o or "",
                        s or "",
                        r or "",
                        n or "",
                        float(first or 0),
                        float(last or 0),
                        float(passed or 0),
                        int(seen or 0),
                        pttl / 1000 if pttl >= 0 else -1.0,
                    )
                )
            batch.clear()

        async for k in self._scan("triplet"):
            batch.append(k)
            if len(batch) >= 500:
                await flush()
            if limit is not None and len(found) + len(batch) >= limit:
                break
        await flush()
        return found[:limit] if limit is not None else found

    async def awl_entries(self, limit: int | None = None) -> list[AwlEntry]:
        keys: list[str] = []
        async for k in self._scan("awl"):
            keys.append(k)
            if limit is not None and len(keys) >= limit:
                break
        start = len(self.key("awl"))
        out = []
        for k, (values, pttl) in zip(
            keys, await self._hashes(keys, ("count", "seen")), strict=True
        ):
            if values[0] is None:
                continue
            out.append(
                AwlEntry(
                    k[start:],
                    int(values[0]),
                    float(values[1] or 0),
                    pttl / 1000 if pttl >= 0 else -1.0,
                )
            )
        return out

    async def allow_entries(self, now: float | None = None) -> list[AllowEntry]:
        """Admin allow entries that have not expired."""
        now = time.time() if now is None else now
        raw: dict[str, str] = await self._call(
            "allow", lambda: self.client.hgetall(self.key("allow"))
        )
        out = [AllowEntry(f, float(v)) for f, v in raw.items() if _float(v) > now]
        return sorted(out, key=lambda e: e.field)

    async def allow(self, target: AllowTarget, ttl: float, now: float | None = None) -> float:
        """Add an allow entry for ``ttl`` seconds; returns its expiry (unix time)."""
        now = time.time() if now is None else now
        until = now + ttl
        args = [target.field, repr(until), repr(ttl), repr(now)]
        await self._call("allow", lambda: self._allow_script(keys=[self.key("allow")], args=args))
        return until

    async def stats(self, awl_count: int) -> GreylistStats:
        entries = await self.triplets()
        passed = sum(1 for e in entries if e.passed)
        awl = await self.awl_entries()
        allow = await self.allow_entries()
        return GreylistStats(
            triplets=len(entries),
            waiting=len(entries) - passed,
            passed=passed,
            awl_networks=len(awl),
            awl_active=sum(1 for a in awl if awl_count and a.count >= awl_count),
            allow_networks=sum(1 for a in allow if a.field.startswith("net:")),
            allow_domains=sum(1 for a in allow if a.field.startswith("domain:")),
        )

    async def forget(self, target: AllowTarget) -> ForgetReport:
        """Delete what the store holds about a network (or an SPF-passing domain).

        A network: triplets first seen from a network overlapping it, AWL entries of
        overlapping networks, and allow entries of networks inside it. An allow entry
        of a wider network (``allow 192.0.2.0/24``, then ``forget 192.0.2.7``) is kept
        and reported: it was made for its other hosts as well. A domain: the
        pool-aware triplets (origin ``spf:…``) and allow entries of it and of its
        subdomains, as ``allow DOMAIN`` covers them (a parent domain's are kept).
        """
        if target.kind == "net":
            net = target.network

            def parsed(text: str) -> Network | None:
                try:
                    other = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    return None
                return other if other.version == net.version else None

            def hit(text: str) -> bool:
                other = parsed(text)
                return other is not None and other.overlaps(net)

            def inside(text: str) -> bool:
                other = parsed(text)
                return other is not None and other.subnet_of(net)  # type: ignore[arg-type]

            triplet_match = hit
        else:
            domain = target.value

            def under(name: str) -> bool:
                return name == domain or name.endswith("." + domain)

            def triplet_match(text: str) -> bool:
                return text.startswith("spf:") and under(text[4:])

            def hit(text: str) -> bool:
                return False

            inside = hit

        doomed: list[str] = []
        batch: list[str] = []

        async def flush() -> None:
            field = "net" if target.kind == "net" else "origin"
            for k, (values, _) in zip(batch, await self._hashes(batch, (field,)), strict=True):
                if values[0] is not None and triplet_match(values[0]):
                    doomed.append(k)
            batch.clear()

        async for k in self._scan("triplet"):
            batch.append(k)
            if len(batch) >= 500:
                await flush()
        await flush()
        awl_prefix = self.key("awl")
        awl_doomed = [k async for k in self._scan("awl") if hit(k[len(awl_prefix) :])]
        allow = await self.allow_entries()
        allow_doomed = [
            a.field
            for a in allow
            if a.field == target.field
            or (a.field.startswith("net:") and inside(a.field[4:]))
            or (target.kind == "domain" and a.field.startswith("domain:") and under(a.field[7:]))
        ]
        wider = tuple(
            a.field[4:]
            for a in allow
            if a.field.startswith("net:") and a.field not in allow_doomed and hit(a.field[4:])
        )

        async def delete() -> None:
            pipe = self.client.pipeline(transaction=False)
            for k in doomed + awl_doomed:
                pipe.delete(k)
            if allow_doomed:
                pipe.hdel(self.key("allow"), *allow_doomed)
            await pipe.execute()

        if doomed or awl_doomed or allow_doomed:
            await self._call("forget", delete, bounded=False)  # any number of keys
        return ForgetReport(len(doomed), len(awl_doomed), len(allow_doomed), wider)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


@asynccontextmanager
async def open_store(policy: RedisPolicy, metrics: Metrics | None = None) -> AsyncIterator[Store]:
    """A Store for the length of a block (admin commands), closed afterwards."""
    store = Store.from_policy(policy, metrics)
    try:
        yield store
    finally:
        await store.aclose()
