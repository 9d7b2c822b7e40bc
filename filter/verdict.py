"""symbols -> score -> action: the one place where results turn into an outcome. Pure (L1).

Hard decisions first (the hardest wins), then, once the message is in, the score
against the ``[actions]`` thresholds. Greylisting is never decided by the score alone:
it needs state, so the greylist check makes that decision (and reads the score when
``greylist.apply = "score"``). Monitor mode turns anything that would refuse mail into
acceptance and remembers what would have happened: globally (``server.mode``), per
recipient domain (``[domains]``) or per check (each check's ``mode``, where its symbols
also score 0 so that trying a check out cannot tip the score).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

from filter import replies
from filter.model import Stage
from filter.policy.schema import DomainOverride, Policy
from filter.replies import Reply
from filter.results import Action, CheckResult, Decision, Symbol

REFUSING = (Action.GREYLIST, Action.TEMPFAIL, Action.REJECT)


@dataclass(frozen=True)
class Verdict:
    action: Action
    score: float
    symbols: tuple[Symbol, ...]
    reply: Reply | None  # None: let the transaction go on / relay the upstream's answer
    reason: str = ""
    would: Action | None = None  # monitor mode: the refusal that was not applied
    # What decided the action: a check's name (its own decision), "score" (the
    # thresholds), "" (nothing did). mailgate_refusals_total{cause} is this.
    decided_by: str = ""

    @property
    def refuses(self) -> bool:
        return self.action in REFUSING


def total_score(symbols: Iterable[Symbol]) -> float:
    return round(float(sum(s.score for s in symbols)), 4)


def decide(
    results: Iterable[CheckResult], policy: Policy, stage: Stage, domain: str | None = None
) -> Verdict:
    """Turn the results gathered so far into the action for ``stage``.

    ``domain`` is the recipient domain whose ``[domains]`` override applies (per
    recipient at RCPT; after DATA only when every recipient shares it).
    """
    override = policy.override_for(domain)
    symbols: list[Symbol] = []
    decisions: list[Decision] = []
    decider: dict[int, str] = {}  # id(decision) -> the check that made it
    would_checks: list[Decision] = []
    results = list(results)
    allow_listed = any(
        r.check == "lists"
        and r.data.get("allowlisted") is True
        and policy.check_mode(r.check, override) == "enforce"
        for r in results
    )
    scored: dict[str, float] | None = None  # symbol -> score, for score-based decisions
    for r in results:
        mode = policy.check_mode(r.check, override)
        if mode == "off":
            continue
        for sym in r.symbols:
            if mode == "monitor":
                symbols.append(Symbol(sym.name, 0.0, f"{sym.detail} (monitor)".strip()))
            elif override is not None and sym.name in override.scores:
                symbols.append(Symbol(sym.name, override.scores[sym.name], sym.detail))
            else:
                symbols.append(sym)
        if r.decision is not None:
            if allow_listed and not r.check.startswith("lists"):
                # An allow-list entry is Postfix's OK: other checks' refusals are moot.
                continue
            if r.decision.sum_of and override is not None and override.scores:
                if scored is None:
                    scored = {s.name: s.score for x in results for s in x.symbols}
                if not _still_holds(r.decision, scored, override):
                    continue
            (would_checks if mode == "monitor" else decisions).append(r.decision)
            decider[id(r.decision)] = r.check
    score = total_score(symbols)
    reject_at, add_header_at = _thresholds(policy, override)
    hard = _hardest(decisions)
    action: Action = Action.ACCEPT
    reply: Reply | None = None
    reason = ""
    decided_by = ""
    if stage is Stage.DATA:
        if score >= reject_at:
            action, reply = Action.REJECT, replies.REJECT_SPAM
            reason = f"score {score:g} >= reject {reject_at:g}"
            decided_by = "score"
        elif score >= add_header_at:
            action = Action.ADD_HEADER
            reason = f"score {score:g} >= add_header {add_header_at:g}"
            decided_by = "score"
    if hard is not None and (hard.action.severity >= action.severity):
        # A check's own decision wins unless the score asks for something harder.
        action, reply, reason = hard.action, hard.reply, hard.reason
        decided_by = decider.get(id(hard), "")
    global_mode = policy.server.mode
    if override is not None and override.mode != "inherit":
        global_mode = override.mode
    if action in REFUSING and global_mode == "monitor":
        mild = Action.ADD_HEADER if score >= add_header_at else Action.ACCEPT
        return Verdict(
            mild, score, tuple(symbols), None, f"monitor mode: would {action}: {reason}", action
        )
    would = _hardest(d for d in would_checks if d.action in REFUSING)
    if would is not None and would.action.severity > action.severity:
        # A check in monitor mode would have refused: remember it, change nothing.
        note = f"check in monitor mode: would {would.action}: {would.reason}"
        reason = f"{reason}; {note}" if reason else note
        return Verdict(action, score, tuple(symbols), reply, reason, would.action, decided_by)
    return Verdict(action, score, tuple(symbols), reply, reason, decided_by=decided_by)


def decide_after_data(
    results: Iterable[CheckResult], policy: Policy, domain: str | None, judged: Collection[str]
) -> Verdict:
    """The verdict after DATA, without enforcing again the refusals each RCPT judged.

    ``judged`` names the checks that run before DATA (connect to RCPT). Every accepted
    recipient was judged at its RCPT, on those checks' results, under its own domain's
    override, so a refusal among them that let it in was not meant for it (monitor,
    ``off``, an allow entry). Enforced again after DATA, under the global policy when
    the recipients' overrides differ, it refused mail for a domain in monitor mode,
    and a greylist 451 of a domain with greylisting off refused the message for all.
    After DATA the content checks' decisions and the score decide; what an earlier
    refusal would have done in monitor mode is still noted (README, "Monitor mode").
    """
    results = list(results)

    def judged_refusal(r: CheckResult) -> bool:
        return r.check in judged and r.decision is not None and r.decision.action in REFUSING

    if not any(judged_refusal(r) for r in results):
        return decide(results, policy, Stage.DATA, domain)
    message_wide = [replace(r, decision=None) if judged_refusal(r) else r for r in results]
    verdict = decide(message_wide, policy, Stage.DATA, domain)
    if verdict.would is None and not verdict.refuses:
        seen = decide(results, policy, Stage.DATA, domain)
        if seen.would is not None:
            note = seen.reason if not verdict.reason else f"{verdict.reason}; {seen.reason}"
            verdict = replace(verdict, would=seen.would, reason=note)
    return verdict


def _still_holds(decision: Decision, scored: dict[str, float], override: DomainOverride) -> bool:
    """A score-based decision under the recipient domain's scores (see ``Decision``)."""
    if not any(name in override.scores for name in decision.sum_of):
        return True
    total = sum(override.scores.get(name, scored.get(name, 0.0)) for name in decision.sum_of)
    return round(total, 4) >= decision.threshold


def _thresholds(policy: Policy, override: DomainOverride | None) -> tuple[float, float]:
    reject_at, add_header_at = policy.actions.reject, policy.actions.add_header
    if override is not None:
        if override.reject is not None:
            reject_at = override.reject
        if override.add_header is not None:
            add_header_at = override.add_header
    return reject_at, add_header_at


def _hardest(decisions: Iterable[Decision]) -> Decision | None:
    best: Decision | None = None
    for d in decisions:
        if best is None or d.action.severity > best.action.severity:
            best = d
    return best
