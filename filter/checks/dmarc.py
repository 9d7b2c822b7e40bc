"""The DMARC check (L3): policy discovery over the shared resolver, then the pure rules.

All DMARC logic lives in ``filter.dmarc``; this module only asks the DNS what that
module says to ask (``_dmarc`` TXT records along the tree walk, the Author Domain's
existence for ``np``) and turns the evaluation into a ``CheckResult``. It reads the
SPF, DKIM and ARC results of this message from ``ctx.results``; any of them may be
missing when that check is disabled, which simply means fewer Authenticated
Identifiers.

DNS failures: a temporary error anywhere that could change the outcome makes the
result ``temperror`` (RFC 9989 §5.3.6: the policy cannot be applied), which the
policy turns into a 4xx or an accept, never into a reject.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from filter import dmarc, replies
from filter.checks import Context
from filter.model import Stage
from filter.resolver import DNSTempError, Resolver
from filter.results import Action, CheckResult, Decision, Symbol

_ACTIONS = {
    "reject": (Action.REJECT, replies.REJECT_DMARC),
    "quarantine": (Action.ADD_HEADER, None),
    "tempfail": (Action.TEMPFAIL, replies.CHECK_TEMPFAIL),
}


@dataclass
class Evaluation:
    """Everything one message's DMARC evaluation found, before local policy."""

    result: str
    from_domain: str = ""
    org_domain: str = ""
    record_domain: str = ""
    record: dmarc.DMARCRecord | None = None
    choice: dmarc.PolicyChoice | None = None
    aligned_spf: bool = False
    aligned_dkim: list[str] = field(default_factory=list)
    reason: str = ""
    from_domains: tuple[str, ...] = ()


def _severity(ev: Evaluation) -> int:
    """How hard an evaluation would hit the message: what several authors compare."""
    requested = ev.choice.requested if ev.choice else ""
    if ev.result == "fail":
        return {"reject": 4, "quarantine": 3}.get(requested, 1)
    return 2 if ev.result == "temperror" else 0


class _Discovery:
    """DMARC DNS lookups for one message, each name asked at most once.

    The From domain's walk and the walks for DKIM/SPF identifiers usually share
    their upper names; the resolver caches too, but memoising here also saves the
    awaits and keeps each walk's answers consistent within one evaluation.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._records: dict[str, dmarc.Lookup] = {}
        self._walks: dict[str, list[tuple[str, dmarc.DMARCRecord | None]]] = {}

    async def lookup(self, name: str) -> dmarc.Lookup:
        """The DMARC record at ``_dmarc.<name>`` (temporary errors are not remembered)."""
        found = self._records.get(name)
        if found is None:
            try:
                txts = await self._resolver.txt(f"_dmarc.{name}")
            except ValueError:  # a name the DNS cannot hold has no record
                txts = []
            found = dmarc.select_record(t.decode("utf-8", "replace") for t in txts)
            self._records[name] = found
        return found

    async def walk(self, domain: str) -> list[tuple[str, dmarc.DMARCRecord | None]]:
        """RFC 9989 §4.10 from ``domain``: (name, record) per query, in order."""
        done = self._walks.get(domain)
        if done is not None:
            return done
        out: list[tuple[str, dmarc.DMARCRecord | None]] = []
        for name in dmarc.walk_targets(domain):
            record = (await self.lookup(name)).record
            out.append((name, record))
            if dmarc.walk_stops(record):
                break
        self._walks[domain] = out
        return out

    async def org_domain(self, domain: str) -> str:
        walked = await self.walk(domain)
        return dmarc.organizational_domain(domain, [(n, r) for n, r in walked if r is not None])

    async def exists(self, domain: str) -> bool:
        """False only if an A query says NXDOMAIN (RFC 9989 §3.2.13, RFC 8020).

        RFC 8020: an NXDOMAIN means the name and everything under it does not exist,
        whatever the type asked, so one query decides; data or NODATA means the name
        exists. A temporary error raises ``DNSTempError``: existence stays unknown.
        """
        try:
            answer = await self._resolver.resolve(domain, "A")
        except ValueError:
            return True  # not a name the DNS can hold: do not guess "non-existent"
        return answer.outcome != "nxdomain"


class DMARCCheck:
    """RFC 9989 DMARC (RFC 7489 on request) for the message's RFC5322.From domain.

    ``rng`` draws the RFC 7489 ``pct`` sample (uniform in [0, 1)); tests inject a
    seeded one so sampling is reproducible.
    """

    name = "dmarc"
    stage = Stage.DATA
    needs: tuple[str, ...] = ("spf", "dkim", "arc")

    def __init__(self, rng: Callable[[], float] | None = None) -> None:
        self._rng = rng or random.random

    async def run(self, ctx: Context) -> CheckResult:
        started = time.monotonic()
        cfg = ctx.policy.dmarc
        mode: dmarc.Mode = "rfc7489" if cfg.standard == "rfc7489" else "rfc9989"
        if not cfg.enabled:
            ev = Evaluation("none", reason="DMARC disabled by policy")
        elif ctx.message is None:
            ev = Evaluation("none", reason="no message to evaluate")
        else:
            author = dmarc.author_domain(ctx.message.headers())
            if author.error and author.domains and ctx.resolver is not None:
                ev = await self._strictest(ctx, author, ctx.resolver, mode)
            elif author.error:
                ev = Evaluation("permerror", reason=author.error, from_domains=author.domains)
            elif ctx.resolver is None:
                ev = Evaluation("temperror", from_domain=author.domain, reason="no DNS resolver")
            else:
                ev = await self._evaluate(ctx, author.domain, ctx.resolver, mode)
        return self._report(ctx, ev, mode, time.monotonic() - started)

    def failure_result(self, ctx: Context, detail: str) -> CheckResult:
        """What the pipeline reports when this check times out or crashes.

        The same as a DNS temperror during evaluation, so ``[dmarc] on_temperror``
        decides (a tempfail by default), never a silent pass.
        """
        mode: dmarc.Mode = "rfc7489" if ctx.policy.dmarc.standard == "rfc7489" else "rfc9989"
        return self._report(ctx, Evaluation("temperror", reason=detail), mode, 0.0)

    # -- evaluation ------------------------------------------------------------------------

    async def _strictest(
        self, ctx: Context, author: dmarc.AuthorDomain, resolver: Resolver, mode: dmarc.Mode
    ) -> Evaluation:
        """Several From fields, or one with several domains: no single Author Domain.

        RFC 9989 leaves this to the receiver, and its security considerations call such
        messages an evasion attempt: a second From must not wash out a p=reject. So
        every domain is evaluated (§5.3.1 allows it) and the message is held to the
        strictest failure among them; if none fails, the result stays permerror.
        """
        evaluated = author.domains[: dmarc.MAX_AUTHOR_DOMAINS]
        evaluations = [await self._evaluate(ctx, d, resolver, mode) for d in evaluated]
        worst = max(evaluations, key=_severity)
        skipped = len(author.domains) - len(evaluated)
        domains = ", ".join(evaluated)
        if skipped:
            # RFC 9989 §11.5: a From naming hundreds of domains must not cost
            # hundreds of tree walks.
            domains += f"; {skipped} more not evaluated (limit {dmarc.MAX_AUTHOR_DOMAINS})"
        if _severity(worst) == 0:
            reason = f"{author.error} ({domains})" if skipped else author.error
            return Evaluation("permerror", reason=reason, from_domains=author.domains)
        worst.reason = f"{author.error} ({domains}); strictest: {worst.reason}".strip()
        worst.from_domains = author.domains
        return worst

    async def _evaluate(
        self, ctx: Context, author: str, resolver: Resolver, mode: dmarc.Mode
    ) -> Evaluation:
        disc = _Discovery(resolver)
        try:
            return await self._evaluate_with(ctx, author, disc, mode)
        except DNSTempError as e:
            return Evaluation("temperror", from_domain=author, reason=f"DNS error: {e}")

    async def _evaluate_with(
        self, ctx: Context, author: str, disc: _Discovery, mode: dmarc.Mode
    ) -> Evaluation:
        ev = Evaluation("none", from_domain=author)
        # 1. Policy discovery: RFC 9989 §4.10.1, or RFC 7489 §6.6.3 in compatibility mode.
        found: tuple[str, dmarc.DMARCRecord] | None
        if mode == "rfc9989":
            first = await disc.lookup(author)
            if first.record is not None:
                found = (author, first.record)
            else:
                walked = await disc.walk(author)
                found = dmarc.policy_record(author, walked)
                real = [(n, r) for n, r in walked if r is not None]
                ev.org_domain = dmarc.organizational_domain(author, real)
        else:
            ev.org_domain = dmarc.psl_organizational_domain(author)
            first = await disc.lookup(author)
            found = (author, first.record) if first.record is not None else None
            if found is None and ev.org_domain != author:
                org_lookup = await disc.lookup(ev.org_domain)
                if org_lookup.record is not None:
                    found = (ev.org_domain, org_lookup.record)
        if found is None:
            ev.reason = f"no DMARC policy record for {author}"
            if first.candidates > 1:
                ev.reason += f" (_dmarc.{author} has {first.candidates} records, all ignored)"
            return ev
        ev.record_domain, raw_record = found
        record = dmarc.usable_record(raw_record, mode)
        if record is None:
            ev.result = dmarc.unusable_result(raw_record, mode)
            ev.reason = _unusable_reason(ev.record_domain, raw_record, ev.result)
            return ev
        ev.record = record

        # 2. Identifier alignment, RFC 9989 §4.10.2 / §5.3.4.
        ids = dmarc.identifiers(*_spf(ctx), _data(ctx, "dkim"))
        if mode == "rfc9989" and record.psd == "n" and ev.record_domain == author:
            ev.org_domain = author
        spf_ok, spf_err = await self._aligned(disc, ev, author, ids.spf_pass, record.aspf, mode)
        dkim = [
            (d, *await self._aligned(disc, ev, author, d, record.adkim, mode))
            for d in ids.dkim_pass
        ]
        ev.aligned_spf = spf_ok
        ev.aligned_dkim = [d for d, ok, _ in dkim if ok]
        if ev.aligned_spf or ev.aligned_dkim:
            return await self._passed(disc, ev, record, author, mode)

        # 3. No aligned pass. A temporary error on an identifier that would have aligned
        #    leaves the result open (RFC 9989 §5.3.6): temperror, not fail.
        errors = [e for e in (spf_err, *(err for _, _, err in dkim)) if e]
        pending = [(ids.spf_temperror, record.aspf)] if ids.spf_temperror else []
        pending += [(d, record.adkim) for d in ids.dkim_temperror]
        for temp, mode_char in pending:
            would, err = await self._aligned(disc, ev, author, temp, mode_char, mode)
            if would:
                errors.append(f"temporary error for aligned identifier {temp}")
            elif err:
                errors.append(err)
        if errors:
            ev.result = "temperror"
            ev.reason = "; ".join(errors)
            return ev

        # 4. Fail: pick p/sp/np (np needs to know whether the From domain exists).
        exists: bool | None = None
        if dmarc.needs_existence_check(record, ev.record_domain, author, mode):
            exists = await disc.exists(author)
        ev.result = "fail"
        ev.choice = dmarc.choose_policy(
            record,
            ev.record_domain,
            author,
            author_exists=exists,
            mode=mode,
            pct_draw=self._rng() if mode == "rfc7489" and record.pct < 100 else 0.0,
        )
        ev.reason = "no aligned SPF or DKIM pass"
        if exists is False:
            ev.reason += f"; {author} does not exist"
        return ev

    @staticmethod
    async def _passed(
        disc: _Discovery, ev: Evaluation, record: dmarc.DMARCRecord, author: str, mode: dmarc.Mode
    ) -> Evaluation:
        """An aligned pass, with the policy it reports.

        A pass still names its policy (Authentication-Results' ``policy.dmarc``), and
        for a non-existent subdomain that is ``np`` (RFC 9989 §4.10.1), so existence is
        asked here too when ``np`` can matter. DNS trouble in that query leaves the pass
        a pass: existence stays unknown, which ``choose_policy`` reads as ``sp``/``p``.
        """
        ev.result = "pass"
        if not ev.org_domain and ev.record_domain == author:
            # Only identical identifiers were needed: RFC 9989 §4.10.2 treats the
            # common domain with its own record as the Organizational Domain.
            ev.org_domain = author
        via = (["spf"] if ev.aligned_spf else []) + [f"dkim d={d}" for d in ev.aligned_dkim]
        ev.reason = f"aligned {', '.join(via)}"
        exists: bool | None = None
        if dmarc.needs_existence_check(record, ev.record_domain, author, mode):
            try:
                exists = await disc.exists(author)
            except DNSTempError as e:
                ev.reason += f"; existence of {author} unknown (DNS error: {e}), np not applied"
        if exists is False:
            ev.reason += f"; {author} does not exist"
        ev.choice = dmarc.choose_policy(
            record, ev.record_domain, author, author_exists=exists, mode=mode
        )
        return ev

    async def _aligned(
        self,
        disc: _Discovery,
        ev: Evaluation,
        author: str,
        identifier: str,
        mode_char: str,
        mode: dmarc.Mode,
    ) -> tuple[bool, str]:
        """(aligned, error text) for one identifier; DNS trouble gives (False, text)."""
        if not identifier:
            return False, ""
        quick = dmarc.quick_alignment(author, identifier, mode_char == "s")
        if quick is not None:
            return quick, ""
        try:
            if mode == "rfc7489":
                ident_org = dmarc.psl_organizational_domain(identifier)
            else:
                if not ev.org_domain:
                    ev.org_domain = await disc.org_domain(author)
                ident_org = await disc.org_domain(identifier)
        except DNSTempError as e:
            return False, f"DNS error finding the organizational domain of {identifier}: {e}"
        return dmarc.relaxed_aligned(ev.org_domain, ident_org), ""

    # -- reporting -------------------------------------------------------------------------

    def _report(
        self, ctx: Context, ev: Evaluation, mode: dmarc.Mode, elapsed: float
    ) -> CheckResult:
        cfg = ctx.policy.dmarc
        choice = ev.choice
        requested = choice.requested if choice else ""
        outcome = dmarc.plan(
            ev.result,
            requested,
            honor_reject=cfg.honor_reject,
            honor_quarantine=cfg.honor_quarantine,
            tempfail_on_temperror=cfg.on_temperror == "tempfail",
            trusted_arc=_trusted_arc(ctx),
            sampled_out=bool(choice and choice.sampled_out),
        )
        reason = self._reason(ev, outcome)
        symbols: tuple[Symbol, ...] = ()
        if cfg.enabled:
            symbols = (Symbol(outcome.symbol, ctx.policy.score(outcome.symbol), reason),)
        decision = None
        if outcome.action:
            action, reply = _ACTIONS[outcome.action]
            decision = Decision(action, reply, reason)
        data: dict[str, object] = {
            "from_domain": ev.from_domain,
            "org_domain": ev.org_domain,
            "policy": choice.policy if choice else "",  # published: p=, sp= or np=
            # Applied after t=y or pct: Authentication-Results' policy.dmarc (RFC 7489
            # 11.2), and what the disposition follows unless local policy overrides.
            "requested": requested,
            "record_domain": ev.record_domain,
            "disposition": outcome.disposition,
            "aligned_spf": ev.aligned_spf,
            "aligned_dkim": list(ev.aligned_dkim),
            "override": outcome.override,
            "reason": reason,
            # Extras for logs and aggregate reports.
            "mode": mode,
            "policy_source": choice.source if choice else "",
            "testing": bool(choice and choice.testing),
            "record": ev.record.raw if ev.record else "",
        }
        if ev.record is not None:
            data["adkim"] = ev.record.adkim
            data["aspf"] = ev.record.aspf
            if mode == "rfc7489":
                data["pct"] = ev.record.pct
        if ev.from_domains and (not ev.from_domain or len(ev.from_domains) > 1):
            data["from_domains"] = list(ev.from_domains)
        return CheckResult(
            check=self.name,
            result=ev.result,
            symbols=symbols,
            decision=decision,
            data=data,
            elapsed=elapsed,
        )

    @staticmethod
    def _reason(ev: Evaluation, outcome: dmarc.Outcome) -> str:
        """One human line: what was found and what it led to."""
        parts = [f"dmarc={ev.result}"]
        if ev.from_domain:
            parts.append(f"header.from={ev.from_domain}")
        if ev.choice:
            c = ev.choice
            pol = f"policy {c.source}={c.policy} of {ev.record_domain}"
            if c.requested != c.policy:
                pol += f" applied as {c.requested} ({'t=y' if c.testing else 'pct'})"
            parts.append(pol)
        if ev.reason:
            parts.append(ev.reason)
        if outcome.override:
            parts.append(f"override {outcome.override}")
        return "; ".join(parts)


def _unusable_reason(record_domain: str, record: dmarc.DMARCRecord, result: str) -> str:
    """Why a record found gave no DMARC processing (RFC 9989 §4.10.1)."""
    where = f"_dmarc.{record_domain}"
    if result == "none":
        return f"record at {where} has no p tag and no valid rua: no DMARC processing"
    bad = "/".join(t for t in record.invalid if t in ("p", "sp", "np"))
    return f"DMARC record at {where} has an invalid {bad} and no valid rua"


def _data(ctx: Context, check: str) -> Mapping[str, object]:
    res = ctx.results.get(check)
    return res.data if res is not None else {}


def _spf(ctx: Context) -> tuple[str, Mapping[str, object]]:
    res = ctx.results.get("spf")
    return (res.result, res.data) if res is not None else ("none", {})


def _trusted_arc(ctx: Context) -> bool:
    """A valid ARC chain (cv=pass) whose sealer the ARC check found in trusted_sealers."""
    res = ctx.results.get("arc")
    if res is None:
        return False
    cv = res.data.get("cv", res.result)
    return cv == "pass" and res.data.get("trusted") is True
