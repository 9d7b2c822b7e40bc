"""Greylisting at RCPT (L3): a 451 for the first message of an unknown triplet.

Why it works: real MTAs queue and retry a temporary failure; most spam software
fires once and moves on. Why it is bearable: a triplet that retried after
``greylist.delay`` is remembered for ``greylist.max_age``, client networks that
keep retrying properly become auto-allowlisted (``awl_count``), and mail that
carries other evidence of being wanted is never delayed at all.

Exempt (no store access, counted as "allowlisted"): ``allow_clients`` networks,
clients whose verified rDNS ends in ``allow_rdns``, recipients in
``skip_recipients`` (postmaster@ should always be reachable), ``allow_sender_domains``
only when SPF passed for that domain (a MAIL FROM alone proves nothing), clients a
DNSWL zone lists (the dnsbl result's ``allowlisted``), and, with ``apply = "score"``,
messages whose score so far is below ``actions.greylist``. Only the checks that ran
by RCPT count toward that score: content checks come after DATA, and by then a
451 would cost the sender the whole message instead of one cheap retry.

The triplet: see :mod:`filter.greylist`. With ``pool_aware`` and an SPF pass for
the MAIL FROM domain, the origin is ``spf:<domain>``: the domain has vouched for
all its sending addresses, so a retry from another member of its pool (big
providers rarely retry from the same address) is the same sender.

One call to the store per recipient evaluates and updates the triplet atomically
(:meth:`filter.store.Store.greylist`); a dry run (``mailgate check``) evaluates
without writing. Each recipient gets its own answer: a message to a known and an
unknown recipient passes for one and is greylisted for the other.

Store failures follow ``redis.on_error``: "accept" lets the mail through with a
``GREYLIST_STORE_ERROR`` symbol (result temperror, no decision); "tempfail"
answers 451 4.3.0. Either way ``mailgate_store_errors_total`` and
``mailgate_greylist_total{result="error"}`` count it.

Result words (RFC 8601 has no greylist method; these keep metrics readable):
"policy" greylisted, "pass" passed or allowlisted by the store, "none" exempt or
disabled, "temperror" store failure. ``data``: ``outcome`` (new | early | passed |
allowlisted | exempt | refused | error | disabled), ``reason``, ``retry_after``,
``triplet``. "refused": another check refuses the recipient anyway (a DNSBL or list
reject), so no triplet is written for it and nothing is counted.
"""

from __future__ import annotations

import logging

from filter import replies
from filter.checks import Context
from filter.greylist import (
    Triplet,
    client_network,
    domain_matches,
    normalise_recipient,
    rdns_matches,
    recipient_matches,
    triplet_sender,
)
from filter.model import Stage
from filter.netaddr import ip_in
from filter.results import Action, CheckResult, Decision, Symbol
from filter.store import StoreError
from filter.verdict import decide

__all__ = [
    "GreylistCheck",
    "exemption",
    "refused_already",
    "score_so_far",
    "spf_domain",
]

log = logging.getLogger("mailgate.greylist")

_SYMBOLS = {
    "new": "GREYLIST_NEW",
    "early": "GREYLIST_EARLY",
    "passed": "GREYLIST_PASSED",
    "allowlisted": "GREYLIST_AWL",
}


def spf_domain(ctx: Context) -> str | None:
    """The MAIL FROM domain SPF passed for, or None.

    Only the MAIL FROM identity counts: a passing HELO (the null sender's only
    identity) names the host, not the sender's organisation.
    """
    spf = ctx.results.get("spf")
    if spf is None or spf.result != "pass" or spf.data.get("identity") != "mailfrom":
        return None
    domain = str(spf.data.get("domain") or "")
    return domain.lower() or None


def score_so_far(ctx: Context) -> float:
    """The score so far as the verdict counts it (greylist's own result excluded).

    Through ``decide`` so that checks in monitor mode (scored 0), checks switched off
    for the recipient's domain and per-domain scores count here as they do there.
    """
    earlier = [r for r in ctx.results.values() if r.check != "greylist"]
    domain = ctx.recipient.address.rpartition("@")[2] if ctx.recipient else None
    return decide(earlier, ctx.policy, Stage.RCPT, domain).score


def refused_already(ctx: Context) -> str | None:
    """Why the recipient is refused anyway (a DNSBL reject, a block list), or None.

    Such a recipient never reaches the upstream, so a triplet for it would only fill
    the store, ``greylist stats`` and the metrics with botnet traffic. Judged as the
    verdict judges (monitor modes and domain overrides apply), and only when some
    earlier check demanded an outcome at all.
    """
    earlier = [r for r in ctx.results.values() if r.check != "greylist"]
    if not any(r.decision is not None for r in earlier):
        return None
    domain = ctx.recipient.address.rpartition("@")[2] if ctx.recipient else None
    verdict = decide(earlier, ctx.policy, Stage.RCPT, domain)
    if verdict.action in (Action.REJECT, Action.TEMPFAIL):
        return f"refused anyway ({verdict.action}: {verdict.reason})"
    return None


def exemption(ctx: Context, recipient: str) -> str | None:
    """Why this recipient of this message is not greylisted, or None when it is."""
    gl = ctx.policy.greylist
    client = ctx.client
    if gl.allow_clients and ip_in(client.ip, gl.allow_clients):
        return f"client {client.ip} is in greylist.allow_clients"
    if gl.allow_rdns and rdns_matches(client.hostname, gl.allow_rdns):
        return f"client name {client.hostname} is in greylist.allow_rdns"
    if gl.skip_recipients and recipient_matches(recipient, gl.skip_recipients):
        return f"recipient {recipient} is in greylist.skip_recipients"
    domain = spf_domain(ctx)
    if domain and gl.allow_sender_domains and domain_matches(domain, gl.allow_sender_domains):
        return f"sender domain {domain} passed SPF and is in greylist.allow_sender_domains"
    dnsbl = ctx.results.get("dnsbl")
    if dnsbl is not None and dnsbl.data.get("allowlisted") is True:
        return "client is listed on a DNS allowlist"
    lists = ctx.results.get("lists")
    rcpt_domain = recipient.rpartition("@")[2]
    lists_enforced = (
        ctx.policy.check_mode("lists", ctx.policy.override_for(rcpt_domain)) == "enforce"
    )
    if lists is not None and lists.data.get("allowlisted") is True and lists_enforced:
        return f"allow-listed: {lists.data.get('reason')}"
    if gl.apply == "score":
        score = score_so_far(ctx)
        threshold = ctx.policy.actions.greylist
        rcpt_domain = ctx.recipient.address.rpartition("@")[2] if ctx.recipient else ""
        override = ctx.policy.override_for(rcpt_domain)
        if override is not None and override.greylist is not None:
            threshold = override.greylist  # [domains."…"] greylist = …
        if score < threshold:
            return f"score {score:g} < actions.greylist {threshold:g}"
    return None


class GreylistCheck:
    """Triplet greylisting per recipient, state in the store."""

    name = "greylist"
    stage = Stage.RCPT
    needs: tuple[str, ...] = ("spf", "dnsbl", "lists", "lists_rcpt")
    # Only recipients the upstream accepted are greylisted (postgrey after Postfix's
    # reject_unlisted_recipient and reject_unauth_destination): an unknown user or a
    # relay attempt hears the upstream's 5xx at once instead of 451 now and 550 after
    # the retry, and dictionary attacks leave no triplets in the store.
    after_upstream = True

    async def run(self, ctx: Context) -> CheckResult:
        gl = ctx.policy.greylist
        if ctx.envelope is None or ctx.recipient is None:
            raise RuntimeError("greylist runs at RCPT and needs the envelope and recipient")
        if not gl.enabled:
            return CheckResult(
                "greylist", "none", (), None, {"outcome": "disabled", "reason": "disabled"}
            )
        rcpt_domain = ctx.recipient.address.rpartition("@")[2]
        if ctx.policy.check_mode("greylist", ctx.policy.override_for(rcpt_domain)) == "off":
            # [domains."…"] checks = { greylist = "off" }: the verdict would ignore the
            # result; writing a triplet for it would only fill the store and the counts.
            return CheckResult(
                "greylist", "none", (), None, {"outcome": "disabled", "reason": "off for domain"}
            )
        refused = refused_already(ctx)
        if refused is not None:  # not greylisted, not counted: it never gets through
            return CheckResult(
                "greylist", "none", (), None, {"outcome": "refused", "reason": refused}
            )
        recipient = normalise_recipient(ctx.recipient.address)
        why = exemption(ctx, recipient)
        store = ctx.store
        if why is not None:
            if store is not None:
                store.count_greylist("allowlisted")
            return CheckResult("greylist", "none", (), None, {"outcome": "exempt", "reason": why})
        network = client_network(ctx.client.ip, gl.ipv4_prefix, gl.ipv6_prefix)
        domain = spf_domain(ctx)
        origin = f"spf:{domain}" if gl.pool_aware and domain else network
        triplet = Triplet(origin, triplet_sender(ctx.envelope.mail_from), recipient)
        if store is None:
            return self._store_failed(ctx, triplet, "no store configured")
        try:
            outcome = await store.greylist(
                triplet,
                ctx.client.ip,
                network,
                domain,
                gl,
                ctx.clock(),
                write=not ctx.dry_run,
            )
        except StoreError as exc:
            store.count_greylist("error")
            return self._store_failed(ctx, triplet, str(exc))
        store.count_greylist(outcome.result)
        if outcome.result == "passed" and outcome.detail == "first" and not ctx.dry_run:
            store.observe_greylist_retry(outcome.waited)
        data: dict[str, object] = {
            "outcome": outcome.result,
            "triplet": str(triplet),
            "retry_after": outcome.retry_after,
        }
        symbol = _SYMBOLS.get(outcome.result)
        if symbol is None:  # a script newer than this code: never a silent pass
            return self._store_failed(ctx, triplet, f"unknown outcome {outcome.result!r}")
        if outcome.result in ("new", "early"):
            secs = replies.retry_seconds(outcome.retry_after)  # the reply's own rounding
            reason = f"greylisted ({outcome.result}): {triplet}, retry in {secs}s"
            data["reason"] = reason
            decision = Decision(Action.GREYLIST, replies.greylisted(outcome.retry_after), reason)
            sym = Symbol(symbol, ctx.policy.score(symbol), reason)
            return CheckResult("greylist", "policy", (sym,), decision, data)
        if outcome.result == "allowlisted":
            reason = _allow_reason(outcome.detail)
        else:
            reason = f"retry of {triplet} passed" if outcome.detail == "first" else "known triplet"
        data["reason"] = reason
        sym = Symbol(symbol, ctx.policy.score(symbol), reason)
        return CheckResult("greylist", "pass", (sym,), None, data)

    @staticmethod
    def _store_failed(ctx: Context, triplet: Triplet, detail: str) -> CheckResult:
        """``redis.on_error``: skip (counted, visible as a symbol) or tempfail."""
        log.warning(
            "check=greylist session=%s outcome=store_error on_error=%s detail=%s",
            ctx.client.session_id,
            ctx.policy.redis.on_error,
            detail,
        )
        reason = f"greylist store unavailable: {detail}"
        data: dict[str, object] = {"outcome": "error", "reason": reason, "triplet": str(triplet)}
        symbol = Symbol("GREYLIST_STORE_ERROR", ctx.policy.score("GREYLIST_STORE_ERROR"), reason)
        decision = None
        if ctx.policy.redis.on_error == "tempfail":
            decision = Decision(Action.TEMPFAIL, replies.STORE_TEMPFAIL, reason)
        return CheckResult("greylist", "temperror", (symbol,), decision, data)


def _allow_reason(detail: str) -> str:
    """Human text for the store's allowlist hit (``net:…``, ``domain:…``, ``awl:N``)."""
    kind, _, value = detail.partition(":")
    if kind == "awl":
        return f"client network auto-allowlisted after {value} passes"
    if kind == "net":
        return f"client network {value} allowed by `mailgate greylist allow`"
    if kind == "domain":
        return f"SPF-passing sender domain {value} allowed by `mailgate greylist allow`"
    return f"allowlisted ({detail})"
