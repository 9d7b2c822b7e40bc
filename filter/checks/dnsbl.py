"""DNS block- and allowlists (RFC 5782) on the client address, HELO name and sender domain (L3).

Two checks, because the pipeline runs a check at one stage only and the inputs
arrive at different times:

- :class:`DNSBLCheck` (``dnsbl``, at connect): every ``type = "ip"`` zone,
  queried in parallel for the client address, so the answers are usually in
  before the client has said EHLO.
- :class:`DNSBLDomainCheck` (``dnsbl_domain``, at MAIL FROM): every
  ``type = "domain"`` zone for the HELO name and the envelope sender's domain.
  It reads the connect-time sum, so the threshold combines both.

A hit on a zone with ``reject = true``, or a summed score at or above
``dnsbl.threshold``, is a ``Decision`` with the generic ``replies.REJECT_DNSBL``;
the session applies pre-DATA decisions at RCPT so the envelope gets logged. The
reply never names the zone (a Spamhaus DQS zone name carries the access key);
logs, metric labels and result data show it through ``mask_zone``.

Zone health (per process): an answer that means "your queries are refused"
(see ``filter.dnsbl.classify``) is never a listing. It disables the zone at
once, logs a warning once per transition and sets
``mailgate_dnsbl_zone_healthy{zone}`` to 0. A disabled zone is skipped (its
name goes to ``data["skipped"]``) until its RFC 5782 test entries answer right:
the prober (:func:`run_prober`, started by the app) tests every zone each
``dnsbl.probe_interval``, and the checks re-test a disabled zone at most once a
minute, so a zone also recovers with the prober off. Probes ask the server
every time, never the resolver's cache, so a verdict is about the zone now. A
lookup that fails (timeout, SERVFAIL) says nothing about the zone and never
disables it.

Result words (RFC 8601 has no DNSBL method, so these are ours to fix): "fail"
for any blocklist hit, "pass" for allowlist hits only, "temperror" when every
queried zone failed, else "none". ``data``: ``listed`` (list of {zone, code,
label, score[, subject]}), ``allowlisted`` (bool; the greylist check skips such
clients), ``score`` (the sum), ``skipped``, ``blocked`` and ``errors`` (masked
zone names).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from filter import replies
from filter.checks import Context
from filter.dnsbl import (
    Hit,
    domain_query_name,
    interpret,
    ip_query_name,
    ipv6_probe_names,
    mask_zone,
    probe_names,
    probe_verdict,
    tally,
)
from filter.logs import event
from filter.metrics import Metrics
from filter.model import Stage
from filter.netaddr import normalize_ip
from filter.policy.schema import DNSBLZone, Policy
from filter.resolver import DNSTempError, Resolver
from filter.results import Action, CheckResult, Decision, Symbol

__all__ = [
    "HEALTH",
    "DNSBLCheck",
    "DNSBLDomainCheck",
    "ZoneHealth",
    "bind_metrics",
    "prepare_metrics",
    "probe",
    "probe_all",
    "run_prober",
]

log = logging.getLogger("mailgate.dnsbl")

# A disabled zone is re-tested by the checks at most this often.
RETEST_INTERVAL = 60.0
# With probe_interval = 0 the prober still wakes this often to see if a
# reloaded policy turned it on.
IDLE_WAKEUP = 60.0


# --- zone health ----------------------------------------------------------------------


@dataclass
class ZoneState:
    """What this process knows about one zone."""

    healthy: bool = True
    reason: str = ""
    last_probe: float | None = None  # monotonic time of the last probe started
    probing: bool = False


def _key(zone: DNSBLZone) -> tuple[str, str]:
    return zone.zone.lower().rstrip("."), zone.type


@dataclass
class ZoneHealth:
    """Per-process zone health, shared by both checks and the prober.

    Module-level (``HEALTH``) because health is a fact about this process's
    resolver and the lists, not about one session or one policy generation: a
    reload must not re-enable a zone that is refusing us.
    """

    metrics: Metrics | None = None
    clock: Callable[[], float] = time.monotonic
    retest: float = RETEST_INTERVAL
    states: dict[tuple[str, str], ZoneState] = field(default_factory=dict)
    _tasks: set[asyncio.Task[str | None]] = field(default_factory=set)

    def state(self, zone: DNSBLZone) -> ZoneState:
        key = _key(zone)
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = ZoneState()
            if self.metrics is not None:  # the series exists from the first sight
                self.metrics.set_dnsbl_zone_health(mask_zone(zone.zone), True)
        return st

    def healthy(self, zone: DNSBLZone) -> bool:
        return self.state(zone).healthy

    def mark(self, zone: DNSBLZone, healthy: bool, reason: str = "") -> None:
        """Record the zone's health; a change is logged once, the gauge always follows."""
        st = self.state(zone)
        changed = st.healthy != healthy
        st.healthy, st.reason = healthy, reason
        if self.metrics is not None:
            self.metrics.set_dnsbl_zone_health(mask_zone(zone.zone), healthy)
        if not changed:
            return
        if healthy:
            event(log, "dnsbl_zone_enabled", logging.WARNING, zone=mask_zone(zone.zone))
        else:
            # Loud on purpose: a disabled list silently lets its spam through.
            event(
                log,
                "dnsbl_zone_disabled",
                logging.WARNING,
                zone=mask_zone(zone.zone),
                reason=reason,
            )

    def count_error(self, zone: DNSBLZone, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_dnsbl_error(mask_zone(zone.zone), reason)

    def count_hit(self, hit: Hit) -> None:
        if self.metrics is not None:
            self.metrics.count_dnsbl_hit(mask_zone(hit.zone), hit.label)

    def retest_due(self, zone: DNSBLZone) -> bool:
        """Whether a disabled zone should be tested again now (not while a test runs)."""
        st = self.state(zone)
        if st.healthy or st.probing:
            return False
        return st.last_probe is None or self.clock() - st.last_probe >= self.retest

    def retest_soon(self, zone: DNSBLZone, resolver: Resolver) -> None:
        """Start a background test of a disabled zone if one is due (never awaited)."""
        if not self.retest_due(zone):
            return
        task = asyncio.get_running_loop().create_task(probe(resolver, zone, self))
        self._tasks.add(task)  # a reference, or the task may be collected mid-way
        task.add_done_callback(self._tasks.discard)

    def retain(self, zones: Iterable[DNSBLZone]) -> None:
        """Forget zones the policy no longer has (and their health series)."""
        keep = {_key(z) for z in zones}
        shown = {mask_zone(z.zone) for z in zones}
        for key in [k for k in self.states if k not in keep]:
            del self.states[key]
            if self.metrics is not None and mask_zone(key[0]) not in shown:
                self.metrics.forget_dnsbl_zone(mask_zone(key[0]))

    def reset(self) -> None:
        """Forget everything (tests; a process starts with every zone healthy)."""
        self.states.clear()


HEALTH = ZoneHealth()


def bind_metrics(metrics: Metrics, health: ZoneHealth = HEALTH) -> None:
    """Let zone health, hits and errors reach ``metrics`` (the app calls this once)."""
    health.metrics = metrics


def prepare_metrics(zones: Iterable[DNSBLZone], health: ZoneHealth = HEALTH) -> None:
    """Create the series of ``zones`` before any lookup: hits (each code's label and
    ``LISTED``) and errors at 0, health at 1 as at first sight (a zone already known,
    a disabled one too, keeps what it has). After ``bind_metrics``."""
    labels: dict[str, set[str]] = {}
    for zone in zones:  # one masked name may stand for an ip and a domain zone
        health.state(zone)
        labels.setdefault(mask_zone(zone.zone), set()).update(c.label for c in zone.codes)
    if health.metrics is not None:
        health.metrics.prepare_dnsbl_zones(labels)


def _error_reason(exc: DNSTempError) -> str:
    return exc.reason if exc.reason in ("timeout", "servfail") else "error"


async def _probe_lookup(
    resolver: Resolver, name: str, zone: DNSBLZone, health: ZoneHealth
) -> list[str] | None:
    """A probe's A answer ([] for NXDOMAIN/NODATA), or None when the lookup failed.

    Always asked of the server (``fresh``): a cached refusal would keep a zone
    disabled after the resolver was fixed, a cached good answer would hide one
    that started refusing.
    """
    try:
        result = await resolver.resolve(name, "A", fresh=True)
    except DNSTempError as exc:
        health.count_error(zone, _error_reason(exc))
        return None
    except ValueError:  # a zone name no query can carry; the schema makes this rare
        return None
    return [str(a) for a in result.data] if result.outcome == "ok" else []


async def probe(resolver: Resolver, zone: DNSBLZone, health: ZoneHealth = HEALTH) -> str | None:
    """Test ``zone`` with its RFC 5782 test entries and record the outcome.

    Returns "" when healthy, the reason when disabled, None when the lookups
    failed (no change: a timeout says nothing about the list). An IP zone
    without 127.0.0.2 is asked for the IPv6 test entries too: an IPv6-only
    list holds ::FFFF:7F00:2 instead, and is not dead.
    """
    st = health.state(zone)
    st.probing, st.last_probe = True, health.clock()
    try:
        listed, unlisted = probe_names(zone.query_zone, zone.type)
        positive, negative = await asyncio.gather(
            _probe_lookup(resolver, listed, zone, health),
            _probe_lookup(resolver, unlisted, zone, health),
        )
        if zone.type == "ip" and positive == [] and not negative:
            listed, unlisted = ipv6_probe_names(zone.query_zone)
            positive, negative6 = await asyncio.gather(
                _probe_lookup(resolver, listed, zone, health),
                _probe_lookup(resolver, unlisted, zone, health),
            )
            # both "never listed" entries must be unlisted; a failed one stays unknown
            negative = negative6 if negative == [] or negative6 else None
    finally:
        st.probing = False
    reason = probe_verdict(zone.type, positive, negative, zone.blocked_codes)
    if reason:
        health.count_error(zone, "blocked")
        health.mark(zone, False, reason)
        return reason
    if positive is None or negative is None:
        return None
    health.mark(zone, True)
    return ""


async def probe_all(
    resolver: Resolver, zones: Sequence[DNSBLZone], health: ZoneHealth = HEALTH
) -> list[str | None]:
    """Probe every zone in parallel; results in ``zones`` order."""
    return list(await asyncio.gather(*(probe(resolver, z, health) for z in zones)))


async def run_prober(
    policy_getter: Callable[[], Policy],
    resolver_getter: Callable[[], Resolver | None],
    interval: float | None = None,
    health: ZoneHealth = HEALTH,
) -> None:
    """Probe the current policy's zones forever (cancel the task to stop it).

    Getters, not values, so a SIGHUP reload (new zones, new resolver, new
    ``probe_interval``) applies from the next round. ``interval`` overrides
    ``dnsbl.probe_interval`` (tests). A failing round is logged and the loop
    goes on: the prober must outlive any one bad answer.
    """
    while True:
        policy = policy_getter()
        every = policy.dnsbl.probe_interval if interval is None else interval
        resolver = resolver_getter()
        if every > 0 and resolver is not None:
            zones = policy.dnsbl.zones if policy.dnsbl.enabled else ()
            health.retain(zones)
            try:
                await probe_all(resolver, zones, health)
            except Exception:  # the loop is the point; a bug here must not end it
                log.exception("dnsbl prober round failed")
        await asyncio.sleep(every if every > 0 else IDLE_WAKEUP)


# --- lookups --------------------------------------------------------------------------


@dataclass
class _Lookups:
    """Outcome of one stage's zone queries."""

    hits: list[Hit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answered: int = 0  # queries with a usable answer (listed or not)


async def _query_zones(
    ctx: Context,
    resolver: Resolver,
    queries: Sequence[tuple[DNSBLZone, str, str]],
    health: ZoneHealth,
) -> _Lookups:
    """Run (zone, query name, subject) queries in parallel and sort out the answers."""
    out = _Lookups()
    live: list[tuple[DNSBLZone, str, str]] = []
    for zone, name, subject in queries:
        if health.healthy(zone):
            live.append((zone, name, subject))
            continue
        if mask_zone(zone.zone) not in out.skipped:
            out.skipped.append(mask_zone(zone.zone))
        if not ctx.dry_run:
            health.retest_soon(zone, resolver)

    async def one(zone: DNSBLZone, name: str, subject: str) -> None:
        try:
            result = await resolver.resolve(name, "A")
        except DNSTempError as exc:
            health.count_error(zone, _error_reason(exc))
            out.errors.append(mask_zone(zone.zone))
            return
        except ValueError:  # no query can carry this name: nothing is listed under it
            out.answered += 1
            return
        answer = interpret(zone, result.data, ctx.policy.score, subject)
        if answer.blocked:
            # A refusal says nothing about this client and may be cached for a day:
            # kept, it would disable the zone again at this client's next connection,
            # after the probes found the resolver allowed again.
            resolver.forget(name, "A")
            if mask_zone(zone.zone) not in out.blocked:  # HELO and sender: one zone, once
                out.blocked.append(mask_zone(zone.zone))
            health.count_error(zone, "blocked")
            health.mark(zone, False, f"answer {','.join(answer.blocked)} means a refused query")
            if not ctx.dry_run:
                health.retest_soon(zone, resolver)
            return
        out.answered += 1
        for hit in answer.hits:
            health.count_hit(hit)
        out.hits.extend(answer.hits)

    if len(live) == 1:
        await one(*live[0])  # one zone: no Task for gather to make
    else:
        await asyncio.gather(*(one(*q) for q in live))
    return out


def _build_result(
    check: str,
    ctx: Context,
    found: _Lookups,
    subject_text: str,
    prior: float = 0.0,
    prior_symbols: tuple[str, ...] = (),
    prior_zones: tuple[str, ...] = (),
) -> CheckResult:
    """The check's report from its lookups: word, symbols, decision, data.

    ``prior``, ``prior_symbols``, ``prior_zones``: the connect-time listings (score,
    symbols, masked zones) the domain check's sum adds to.
    """
    policy = ctx.policy
    hits = _dedupe(found.hits)
    verdict = tally(hits, policy.dnsbl.threshold, prior, prior_zones)
    symbols = [Symbol(h.symbol, h.score, _detail(h, subject_text)) for h in hits]
    if verdict.listed:
        word = "fail"
    elif hits:
        word = "pass"
    elif found.errors and not found.answered:
        word = "temperror"
        symbol = f"{check.upper()}_TEMPERROR"
        symbols.append(Symbol(symbol, policy.score(symbol), "no zone answered"))
    else:
        word = "none"
    decision = None
    if verdict.reject_reason:
        by_zone = any(h.reject and not h.allow for h in hits)  # a reject zone: no sum
        summed = () if by_zone else tuple(sorted({h.symbol for h in hits} | set(prior_symbols)))
        threshold = 0.0 if by_zone else policy.dnsbl.threshold
        decision = Decision(
            Action.REJECT, replies.REJECT_DNSBL, verdict.reject_reason, summed, threshold
        )
    data: dict[str, object] = {
        "listed": [h.as_data() for h in hits],
        "allowlisted": verdict.allowlisted,
        "score": verdict.total,
        "skipped": found.skipped,
        "blocked": found.blocked,
        "errors": sorted(set(found.errors)),
    }
    return CheckResult(check, word, tuple(symbols), decision, data)


def _dedupe(hits: Iterable[Hit]) -> list[Hit]:
    """One hit per symbol: the HELO and the sender domain listed in one zone score once."""
    seen: dict[str, Hit] = {}
    for h in hits:
        if h.symbol not in seen:
            seen[h.symbol] = h
    return sorted(seen.values(), key=lambda h: h.symbol)


def _detail(hit: Hit, subject_text: str) -> str:
    what = subject_text if not hit.subject else f"{hit.subject} domain"
    label = f" {hit.label}" if hit.label else ""
    return f"{what} listed in {mask_zone(hit.zone)}{label} ({hit.code})"


def _disabled(check: str, reason: str) -> CheckResult:
    return CheckResult(check, "none", (), None, {"reason": reason, "listed": []})


def _no_resolver(check: str, policy: Policy) -> CheckResult:
    """Without DNS nothing can be looked up: temperror, never a silent "not listed"."""
    symbol = f"{check.upper()}_TEMPERROR"
    detail = "no DNS resolver available"
    return CheckResult(
        check, "temperror", (Symbol(symbol, policy.score(symbol), detail),), None, {"error": detail}
    )


# --- the checks -----------------------------------------------------------------------


class DNSBLCheck:
    """The client address in every ``type = "ip"`` zone, in parallel, from connect."""

    name = "dnsbl"
    stage = Stage.CONNECT
    needs: tuple[str, ...] = ()

    def __init__(self, health: ZoneHealth = HEALTH) -> None:
        # Injectable so tests keep their zone health to themselves.
        self.health = health

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy
        zones = [z for z in policy.dnsbl.zones if z.type == "ip"]
        if not policy.dnsbl.enabled or not zones:
            return _disabled(self.name, "no ip zones enabled")
        if ctx.resolver is None:
            return _no_resolver(self.name, policy)
        # IPv4-mapped IPv6 is listed under its IPv4 address; a bad address is our bug.
        ip = normalize_ip(ctx.client.ip)
        queries = [(z, ip_query_name(ip, z.query_zone), "") for z in zones]
        found = await _query_zones(ctx, ctx.resolver, queries, self.health)
        return _build_result(self.name, ctx, found, f"client {ip}")


class DNSBLDomainCheck:
    """The HELO name and the sender domain in every ``type = "domain"`` zone, at MAIL FROM.

    Needs ``dnsbl`` only to read its summed score, so that ``dnsbl.threshold``
    combines the client's and the domains' listings like one postscreen sum.
    """

    name = "dnsbl_domain"
    stage = Stage.MAIL
    needs: tuple[str, ...] = ("dnsbl",)

    def __init__(self, health: ZoneHealth = HEALTH) -> None:
        self.health = health

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy
        zones = [z for z in policy.dnsbl.zones if z.type == "domain"]
        if not policy.dnsbl.enabled or not zones:
            return _disabled(self.name, "no domain zones enabled")
        if ctx.resolver is None:
            return _no_resolver(self.name, policy)
        subjects = [("helo", ctx.client.helo or "")]
        if ctx.envelope is not None:
            subjects.append(("mail_from", ctx.envelope.sender_domain))
        queries: list[tuple[DNSBLZone, str, str]] = []
        for zone in zones:
            names: set[str] = set()
            for subject, domain in subjects:
                name = domain_query_name(domain, zone.query_zone)
                if name is not None and name not in names:  # HELO == sender domain: once
                    names.add(name)
                    queries.append((zone, name, subject))
        if not queries:
            return _disabled(self.name, "no HELO name or sender domain to look up")
        found = await _query_zones(ctx, ctx.resolver, queries, self.health)
        prior = ctx.results.get("dnsbl")
        prior_score = prior.data.get("score", 0.0) if prior is not None else 0.0
        base = float(prior_score) if isinstance(prior_score, int | float) else 0.0
        symbols: tuple[str, ...] = ()
        prior_zones: tuple[str, ...] = ()
        if prior is not None:
            symbols = tuple(s.name for s in prior.symbols if s.name != "DNSBL_TEMPERROR")
            listed = prior.data.get("listed")
            if isinstance(listed, list):
                prior_zones = tuple(
                    str(e["zone"]) for e in listed if isinstance(e, dict) and e.get("score", 0) > 0
                )
        return _build_result(self.name, ctx, found, "domain", base, symbols, prior_zones)
