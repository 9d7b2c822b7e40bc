"""Cluster-wide rate limits (L3): 451 4.7.0 once a client network or sender domain
has sent more than its share in the last ``ratelimit.window``.

Why in Redis: a per-process counter would let a sender multiply its quota by the
number of mailgate workers and instances behind the load balancer; the store is
the one place they all see. Why 451 and not 5xx: a limit is about pace, not about
the mail; a real MTA queues and retries, and gets through once the window has slid.

What counts (each limit is events per window; 0 = unlimited, and then its counter
is not even sent to the store):

* ``connections_per_network``: at CONNECT (:class:`RateLimitConnectCheck`), one
  per session. The member is the session id, so the connect stage re-running for
  the same session (XFORWARD/XCLIENT name the client after the fact) counts once.
  The session applies pre-DATA refusals at RCPT, so an over-limit connection gets
  its 451 at each RCPT; its recipients are then not counted again.
* ``messages_per_*``: at RCPT (:class:`RateLimitCheck`), one per transaction. The
  member is an id drawn once per transaction (:class:`_TransactionIds`), so only a
  transaction's first counted recipient adds a message. ``envelope.recipients``
  could not tell (it also holds recipients that were not counted, below), nor could
  ``envelope.message_id`` (it repeats after a transaction that ended in RSET).
* ``recipients_per_*``: at RCPT, one per recipient that gets in.

Only mail that gets in uses quota: the RCPT check runs after the upstream accepted
the recipient (``after_upstream``, as greylisting does) and after greylisting, and
counts nothing for a recipient the upstream refused (an unknown user), that another
check refuses anyway (a greylisting 451 would otherwise be charged again on the
retry), whose domain has the check "off", or that an enforced allow-list entry
lets through whatever we say. So a transaction none of whose recipients got in is
no message. Once a recipient got in its message is counted, like Postfix's
``smtpd_client_message_rate_limit`` (which counts MAIL commands): a transaction
later ended by RSET, or refused after DATA, still counts; checks see no
transaction end to take it back at.

Per network: the client's ``ipv4_prefix``/``ipv6_prefix`` network, as greylisting
groups mail farms. Per sender domain: the MAIL FROM domain (A-label), but only when
SPF passed for it; an unauthenticated claim counts per (domain, client network), so a
botnet writing ``MAIL FROM:<x@bigprovider.example>`` cannot defer the real provider's
mail cluster-wide. The null sender has no domain: only the network limits apply.

One store round trip per counted event (:meth:`filter.store.Store.rate_limit`): every
counter the event touches is checked and, only if none is full, incremented, all
atomically; a refused event uses up no quota, so a client that keeps retrying is
never locked out for longer than the window. The sliding-window log and its memory
bound are explained with the script in :mod:`filter.store`.

Exempt: trusted networks (the session never runs checks for them) and
``exempt_clients``; for messages and recipients, also enforced allow-list entries.
A dry run (``mailgate check``) reads the counters and writes nothing. Store failures
follow ``redis.on_error`` as greylisting's do: "accept" lets mail through with
``RATELIMIT_STORE_ERROR`` (result temperror, no decision), "tempfail" answers
451 4.3.0; ``mailgate_store_errors_total`` counts them either way.

Result words: "policy" over a limit (symbol RATELIMIT_CONNECTIONS, _MESSAGES or
_RECIPIENTS and a tempfail decision), "pass" counted (no symbol: being under a
limit says nothing about the mail), "none" disabled, exempt or skipped, "temperror"
store failure. ``data``: ``outcome`` (counted | checked | limited | exempt |
disabled | skipped | error), ``reason``, ``counts`` (counter -> events already in
the window) and, when limited, ``limit``, ``counter``, ``subject``, ``retry_after``.
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from filter import replies
from filter.checks import Context
from filter.domains import to_a_label
from filter.greylist import client_network
from filter.model import Envelope, Stage
from filter.netaddr import ip_in
from filter.policy.schema import RateLimitPolicy
from filter.results import Action, CheckResult, Decision, Symbol
from filter.store import RateCounter, StoreError
from filter.units import format_duration
from filter.verdict import decide

__all__ = [
    "Limit",
    "RateLimitCheck",
    "RateLimitConnectCheck",
    "connection_limits",
    "exemption",
    "recipient_limits",
    "sender_subject",
]

log = logging.getLogger("mailgate.ratelimit")

CONNECT_CHECK = "ratelimit_connect"
RCPT_CHECK = "ratelimit"


@dataclass(frozen=True)
class Limit:
    """A counter an event counts toward, with what to say when it is full.

    ``setting`` is the ``[ratelimit]`` key that set the limit (for logs and data),
    ``what`` the counted events in words ("recipients from 192.0.2.0/24").
    """

    counter: RateCounter
    symbol: str
    setting: str
    what: str


def exemption(client_ip: str, policy: RateLimitPolicy) -> str | None:
    """Why this client is not rate-limited at all, or None when it is."""
    if not policy.enabled:
        return "disabled"
    if policy.exempt_clients and ip_in(client_ip, policy.exempt_clients):
        return f"client {client_ip} is in ratelimit.exempt_clients"
    return None


def sender_subject(mail_from: str, spf_pass_domain: str | None, network: str) -> str | None:
    """The key subject of the sender's domain counters, or None (null sender, literal).

    ``dom:<domain>`` when SPF passed for exactly that domain; otherwise
    ``domnet:<domain>|<network>``: a claim anyone can make is only charged to the
    network making it. ``|`` cannot occur in a domain, so the two never collide.
    """
    local, at, raw = mail_from.strip().strip("<>").rpartition("@")
    if not at or not local:
        return None
    domain = to_a_label(raw)
    if domain is None:
        return None
    if spf_pass_domain is not None and to_a_label(spf_pass_domain) == domain:
        return f"dom:{domain}"
    return f"domnet:{domain}|{network}"


def connection_limits(policy: RateLimitPolicy, network: str, session_id: str) -> list[Limit]:
    """The counters one connection counts toward (empty when unlimited)."""
    if not policy.connections_per_network:
        return []
    counter = RateCounter(
        "rl_connections", network, policy.connections_per_network, f"c:{session_id}"
    )
    return [
        Limit(
            counter,
            "RATELIMIT_CONNECTIONS",
            "connections_per_network",
            f"connections from {network}",
        )
    ]


def recipient_limits(
    policy: RateLimitPolicy,
    network: str,
    sender: str | None,
    transaction_id: str,
    event_id: str,
    message_counted: bool = False,
) -> list[Limit]:
    """The counters one RCPT counts toward, messages before recipients.

    ``sender`` is :func:`sender_subject`'s answer; ``transaction_id`` names the
    message (the same id again is not a new message), ``event_id`` this recipient.
    ``message_counted``: the transaction's message was let in already, so only the
    recipient counters apply. The order decides which limit a refusal names when
    several are full.
    """
    out: list[Limit] = []
    scopes: list[tuple[str, str, str, int, int]] = [
        (
            "net",
            network,
            f"from {network}",
            policy.messages_per_network,
            policy.recipients_per_network,
        )
    ]
    if sender is not None:
        shown = sender.split(":", 1)[1].replace("|", " from ")
        scopes.append(
            (
                "dom",
                sender,
                f"of sender domain {shown}",
                policy.messages_per_sender_domain,
                policy.recipients_per_sender_domain,
            )
        )
    for scope, subject, where, messages, _ in scopes:
        if messages and not message_counted:
            counter = RateCounter(
                "rl_messages", _subject(scope, subject), messages, f"m:{transaction_id}"
            )
            setting = "messages_per_network" if scope == "net" else "messages_per_sender_domain"
            out.append(Limit(counter, "RATELIMIT_MESSAGES", setting, f"messages {where}"))
    for scope, subject, where, _, recipients in scopes:
        if recipients:
            counter = RateCounter(
                "rl_recipients", _subject(scope, subject), recipients, f"r:{event_id}"
            )
            setting = "recipients_per_network" if scope == "net" else "recipients_per_sender_domain"
            out.append(Limit(counter, "RATELIMIT_RECIPIENTS", setting, f"recipients {where}"))
    return out


def _subject(scope: str, subject: str) -> str:
    """Network subjects get their ``net:`` tag here; sender subjects carry theirs."""
    return f"net:{subject}" if scope == "net" else subject


def _spf_pass_domain(ctx: Context) -> str | None:
    """The MAIL FROM domain SPF passed for (checks never import each other: read the result)."""
    spf = ctx.results.get("spf")
    if spf is None or spf.result != "pass" or spf.data.get("identity") != "mailfrom":
        return None
    return str(spf.data.get("domain") or "") or None


class _TransactionIds:
    """A random id per live transaction (Envelope object), forgotten when it is.

    The session keeps one Envelope per MAIL command until the transaction ends, so
    the object itself is the transaction. Envelopes are unhashable (mutable
    dataclasses), hence ``id()`` as the key; the entry is dropped when the envelope
    is collected, so a later object reusing the address never inherits an id.

    It also remembers whether the transaction's message was counted: the store's
    entry slides out after a window, and a transaction outliving it (a slow client)
    would otherwise be counted again at its next recipient, or refused for the
    message it had already been let in with.
    """

    def __init__(self) -> None:
        self._ids: dict[int, str] = {}
        self._counted: set[int] = set()

    def __call__(self, envelope: Envelope) -> str:
        key = id(envelope)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = secrets.token_hex(8)
            weakref.finalize(envelope, self._forget, key)
        return found

    def counted(self, envelope: Envelope) -> bool:
        """Whether this transaction's message is counted already."""
        return id(envelope) in self._counted

    def mark_counted(self, envelope: Envelope) -> None:
        if id(envelope) in self._ids:  # only a transaction with an id has a finalizer
            self._counted.add(id(envelope))

    def _forget(self, key: int) -> None:
        self._ids.pop(key, None)
        self._counted.discard(key)

    def __len__(self) -> int:
        return len(self._ids)


_transaction_ids = _TransactionIds()


def _none(check: str, outcome: str, reason: str) -> CheckResult:
    return CheckResult(check, "none", (), None, {"outcome": outcome, "reason": reason})


async def _evaluate(check: str, ctx: Context, limits: Sequence[Limit]) -> CheckResult:
    """One round trip for all ``limits``; the result the checks below return."""
    policy = ctx.policy.ratelimit
    store = ctx.store
    if store is None:
        return _store_failed(check, ctx, "no store configured")
    try:
        outcome = await store.rate_limit(
            [lim.counter for lim in limits], policy.window, ctx.clock(), write=not ctx.dry_run
        )
    except StoreError as exc:
        return _store_failed(check, ctx, str(exc))
    counts = {lim.setting: n for lim, n in zip(limits, outcome.counts, strict=False)}
    if not ctx.dry_run:
        if outcome.over is None:
            for lim in limits:
                store.count_ratelimit(lim.setting, "under")
        else:
            store.count_ratelimit(limits[outcome.over].setting, "over")
    if outcome.over is None:
        reason = "under every limit" if not ctx.dry_run else "under every limit (dry run)"
        data: dict[str, object] = {
            "outcome": "checked" if ctx.dry_run else "counted",
            "reason": reason,
            "counts": counts,
        }
        return CheckResult(check, "pass", (), None, data)
    full = limits[outcome.over]
    reason = (
        f"rate limit: {full.counter.limit} {full.what} per {format_duration(policy.window)} "
        f"(ratelimit.{full.setting})"
    )
    data = {
        "outcome": "limited",
        "reason": reason,
        "counts": counts,
        "counter": full.setting,
        "subject": full.counter.subject,
        "limit": full.counter.limit,
        "retry_after": outcome.retry_after,
    }
    symbol = Symbol(full.symbol, ctx.policy.score(full.symbol), reason)
    decision = Decision(Action.TEMPFAIL, replies.RATE_LIMITED, reason)
    return CheckResult(check, "policy", (symbol,), decision, data)


def _store_failed(check: str, ctx: Context, detail: str) -> CheckResult:
    """``redis.on_error``: skip (counted, visible as a symbol) or tempfail."""
    log.warning(
        "check=%s session=%s outcome=store_error on_error=%s detail=%s",
        check,
        ctx.client.session_id,
        ctx.policy.redis.on_error,
        detail,
    )
    reason = f"rate limit store unavailable: {detail}"
    symbol = Symbol("RATELIMIT_STORE_ERROR", ctx.policy.score("RATELIMIT_STORE_ERROR"), reason)
    decision = None
    if ctx.policy.redis.on_error == "tempfail":
        decision = Decision(Action.TEMPFAIL, replies.STORE_TEMPFAIL, reason)
    data: dict[str, object] = {"outcome": "error", "reason": reason}
    return CheckResult(check, "temperror", (symbol,), decision, data)


class RateLimitConnectCheck:
    """Connections per client network, counted when the client connects."""

    name = CONNECT_CHECK
    stage = Stage.CONNECT
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy.ratelimit
        why = exemption(ctx.client.ip, policy)
        if why is not None:
            return _none(self.name, "disabled" if why == "disabled" else "exempt", why)
        network = client_network(ctx.client.ip, policy.ipv4_prefix, policy.ipv6_prefix)
        limits = connection_limits(policy, network, ctx.client.session_id)
        if not limits:
            return _none(self.name, "disabled", "no connection limit set")
        return await _evaluate(self.name, ctx, limits)


def _uncounted(ctx: Context, recipient_domain: str) -> tuple[str, str] | None:
    """(outcome, reason) when this recipient must not be counted, else None.

    Only mail that gets in uses quota (refused events use none, above): not a
    recipient another check refuses anyway (greylisting's 451 comes back after the
    delay and would be charged twice), not one whose domain switched the check off
    (the verdict ignores it there), not an enforced allow-list entry's (the verdict
    drops our 451 for it, so counting would only defer its network's neighbours).
    Judged as the verdict judges: monitor modes and domain overrides apply.
    """
    policy = ctx.policy
    override = policy.override_for(recipient_domain)
    if policy.check_mode(RCPT_CHECK, override) == "off":
        return "disabled", f"ratelimit is off for {recipient_domain}"
    lists = ctx.results.get("lists")
    if (
        lists is not None
        and lists.data.get("allowlisted") is True
        and policy.check_mode("lists", override) == "enforce"
    ):
        return "exempt", f"allow-listed: {lists.data.get('reason')}"
    others = [r for r in ctx.results.values() if r.check != RCPT_CHECK]
    if any(r.decision is not None for r in others):
        verdict = decide(others, policy, Stage.RCPT, recipient_domain)
        if verdict.refuses:
            return "skipped", f"refused anyway ({verdict.action}: {verdict.reason})"
    return None


class RateLimitCheck:
    """Messages and recipients per client network and per sender domain, at each RCPT.

    Runs once the upstream accepted the RCPT, and after greylisting, so that only
    recipients that get in are counted: an unknown user's 550 or a greylisting 451 is
    no recipient sent, and a transaction none of whose recipients got in is no message.
    """

    name = RCPT_CHECK
    stage = Stage.RCPT
    needs: tuple[str, ...] = (CONNECT_CHECK, "spf", "dnsbl", "lists", "lists_rcpt", "greylist")
    after_upstream = True

    async def run(self, ctx: Context) -> CheckResult:
        if ctx.envelope is None or ctx.recipient is None:
            raise RuntimeError("ratelimit runs at RCPT and needs the envelope and recipient")
        policy = ctx.policy.ratelimit
        why = exemption(ctx.client.ip, policy)
        if why is not None:
            return _none(self.name, "disabled" if why == "disabled" else "exempt", why)
        connect = ctx.results.get(CONNECT_CHECK)
        if connect is not None and connect.result == "policy":
            # Already refused for its connections: counting its recipients too would
            # charge the sender for mail that never got in.
            return _none(self.name, "skipped", "connection is over its rate limit")
        uncounted = _uncounted(ctx, ctx.recipient.address.rpartition("@")[2])
        if uncounted is not None:
            return _none(self.name, *uncounted)
        network = client_network(ctx.client.ip, policy.ipv4_prefix, policy.ipv6_prefix)
        sender = sender_subject(ctx.envelope.mail_from, _spf_pass_domain(ctx), network)
        # The random part makes the member one per transaction; the session's
        # message id only makes it readable to an admin looking at the store.
        txn = f"{ctx.envelope.message_id}/{_transaction_ids(ctx.envelope)}"
        counted = _transaction_ids.counted(ctx.envelope)
        event = secrets.token_hex(8)
        limits = recipient_limits(policy, network, sender, txn, event, message_counted=counted)
        if not limits:
            if counted:  # a later recipient of a message let in: under the limit
                data = {"outcome": "counted", "reason": "its message is counted already"}
                return CheckResult(self.name, "pass", (), None, {**data, "counts": {}})
            return _none(self.name, "disabled", "no message or recipient limit set")
        result = await _evaluate(self.name, ctx, limits)
        if result.result == "pass" and not ctx.dry_run:
            _transaction_ids.mark_counted(ctx.envelope)
        return result
