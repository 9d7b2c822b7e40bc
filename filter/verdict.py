"""symbols -> score -> action: the one place where results turn into an outcome. Pure (L1).

Hard decisions first (the hardest wins), then, once the message is in, the score
against the ``[actions]`` thresholds. Greylisting is never decided by the score alone:
it needs state, so the greylist check makes that decision (and reads the score when
``greylist.apply = "score"``). Monitor mode turns anything that would refuse mail into
acceptance and remembers what would have happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from filter import replies
from filter.model import Stage
from filter.policy.schema import Policy
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

    @property
    def refuses(self) -> bool:
        return self.action in REFUSING


def total_score(symbols: Iterable[Symbol]) -> float:
    return round(float(sum(s.score for s in symbols)), 4)


def decide(results: Iterable[CheckResult], policy: Policy, stage: Stage) -> Verdict:
    """Turn the results gathered so far into the action for ``stage``."""
    results = list(results)
    symbols = tuple(s for r in results for s in r.symbols)
    score = total_score(symbols)
    hard = _hardest(r.decision for r in results if r.decision is not None)
    action: Action = Action.ACCEPT
    reply: Reply | None = None
    reason = ""
    if stage is Stage.DATA:
        thresholds = policy.actions
        if score >= thresholds.reject:
            action, reply = Action.REJECT, replies.REJECT_SPAM
            reason = f"score {score:g} >= reject {thresholds.reject:g}"
        elif score >= thresholds.add_header:
            action = Action.ADD_HEADER
            reason = f"score {score:g} >= add_header {thresholds.add_header:g}"
    if hard is not None and (hard.action.severity >= action.severity):
        # A check's own decision wins unless the score asks for something harder.
        action, reply, reason = hard.action, hard.reply, hard.reason
    if action in REFUSING and policy.server.mode == "monitor":
        mild = Action.ADD_HEADER if score >= policy.actions.add_header else Action.ACCEPT
        return Verdict(
            mild, score, symbols, None, f"monitor mode: would {action}: {reason}", action
        )
    return Verdict(action, score, symbols, reply, reason)


def _hardest(decisions: Iterable[Decision]) -> Decision | None:
    best: Decision | None = None
    for d in decisions:
        if best is None or d.action.severity > best.action.severity:
            best = d
    return best
