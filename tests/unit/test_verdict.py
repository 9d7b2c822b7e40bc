"""verdict.decide: hard decisions, score thresholds at DATA, monitor mode."""

from __future__ import annotations

from dataclasses import replace

import pytest

from filter import replies
from filter.model import Stage
from filter.policy.schema import DEFAULT_POLICY, Policy
from filter.results import Action, CheckResult, Decision, Symbol
from filter.verdict import Verdict, decide, total_score

MONITOR = replace(DEFAULT_POLICY, server=replace(DEFAULT_POLICY.server, mode="monitor"))
REJECT_AT_15 = DEFAULT_POLICY.actions.reject
ADD_HEADER_AT_6 = DEFAULT_POLICY.actions.add_header

REJECT = Decision(Action.REJECT, replies.REJECT_DNSBL, "listed in zen")
TEMPFAIL = Decision(Action.TEMPFAIL, replies.STORE_TEMPFAIL, "store down")
GREYLIST = Decision(Action.GREYLIST, replies.GREYLISTED, "first sighting")


def scored(*scores: float, check: str = "spf") -> CheckResult:
    symbols = tuple(Symbol(f"SYM_{i}", s, "why") for i, s in enumerate(scores))
    return CheckResult(check, "pass", symbols)


def hard(decision: Decision, check: str = "dnsbl", score: float = 0.0) -> CheckResult:
    return CheckResult(check, "fail", (Symbol(f"{check.upper()}_HIT", score),), decision)


def test_defaults_are_the_contracts() -> None:
    assert (REJECT_AT_15, ADD_HEADER_AT_6, DEFAULT_POLICY.actions.greylist) == (15.0, 6.0, 4.0)
    assert DEFAULT_POLICY.server.mode == "enforce"
    assert MONITOR.server.mode == "monitor"


@pytest.mark.parametrize("stage", list(Stage))
def test_nothing_accepts(stage: Stage) -> None:
    v = decide([], DEFAULT_POLICY, stage)
    assert v == Verdict(Action.ACCEPT, 0.0, (), None)
    assert not v.refuses
    assert v.would is None


# -- hard decisions --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("decisions", "winner"),
    [
        ([GREYLIST], GREYLIST),
        ([TEMPFAIL], TEMPFAIL),
        ([REJECT], REJECT),
        ([GREYLIST, TEMPFAIL], TEMPFAIL),
        ([TEMPFAIL, GREYLIST], TEMPFAIL),
        ([GREYLIST, REJECT, TEMPFAIL], REJECT),
        ([REJECT, GREYLIST, TEMPFAIL], REJECT),
        ([TEMPFAIL, GREYLIST, REJECT], REJECT),
    ],
)
@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.RCPT, Stage.DATA])
def test_hardest_decision_wins(decisions: list[Decision], winner: Decision, stage: Stage) -> None:
    results = [hard(d, check=f"c{i}") for i, d in enumerate(decisions)]
    results.insert(1, scored(-1.0, check="spf"))
    v = decide(results, DEFAULT_POLICY, stage)
    assert v.action is winner.action
    assert v.reply == winner.reply
    assert v.reason == winner.reason
    assert v.refuses
    assert v.would is None


def test_hard_reject_beats_a_low_score() -> None:
    v = decide([scored(-5.0), hard(REJECT)], DEFAULT_POLICY, Stage.DATA)
    assert v.action is Action.REJECT
    assert v.reply == replies.REJECT_DNSBL
    assert v.score == -5.0


def test_hard_reject_beats_score_reject() -> None:
    dmarc = Decision(Action.REJECT, replies.REJECT_DMARC, "p=reject")
    v = decide([scored(20.0), hard(dmarc, check="dmarc")], DEFAULT_POLICY, Stage.DATA)
    assert v.action is Action.REJECT
    assert v.reply == replies.REJECT_DMARC


# -- score thresholds ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("score", "action", "reply"),
    [
        (-3.0, Action.ACCEPT, None),
        (0.0, Action.ACCEPT, None),
        (4.0, Action.ACCEPT, None),  # greylisting is never decided by the score alone
        (5.99, Action.ACCEPT, None),
        (6.0, Action.ADD_HEADER, None),
        (14.99, Action.ADD_HEADER, None),
        (15.0, Action.REJECT, replies.REJECT_SPAM),
        (100.0, Action.REJECT, replies.REJECT_SPAM),
    ],
)
def test_score_thresholds_at_data(
    score: float, action: Action, reply: replies.Reply | None
) -> None:
    v = decide([scored(score)], DEFAULT_POLICY, Stage.DATA)
    assert (v.action, v.reply, v.score) == (action, reply, score)
    if action is not Action.ACCEPT:
        assert "score" in v.reason


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.DATA])
@pytest.mark.parametrize("score", [6.0, 15.0, 100.0])
def test_score_alone_decides_nothing_before_data(stage: Stage, score: float) -> None:
    v = decide([scored(score)], DEFAULT_POLICY, stage)
    assert v.action is Action.ACCEPT
    assert v.reply is None
    assert v.score == score


def test_custom_thresholds() -> None:
    policy = replace(
        DEFAULT_POLICY,
        actions=replace(DEFAULT_POLICY.actions, reject=5.0, add_header=2.0, greylist=1.0),
    )
    assert decide([scored(1.9)], policy, Stage.DATA).action is Action.ACCEPT
    assert decide([scored(2.0)], policy, Stage.DATA).action is Action.ADD_HEADER
    assert decide([scored(4.9)], policy, Stage.DATA).action is Action.ADD_HEADER
    v = decide([scored(5.0)], policy, Stage.DATA)
    assert (v.action, v.reply) == (Action.REJECT, replies.REJECT_SPAM)


# -- monitor mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("decision", [REJECT, TEMPFAIL, GREYLIST])
def test_monitor_turns_hard_decisions_into_accept(decision: Decision) -> None:
    v = decide([hard(decision)], MONITOR, Stage.RCPT)
    assert v.action is Action.ACCEPT
    assert v.reply is None
    assert v.would is decision.action
    assert not v.refuses
    assert "monitor" in v.reason and decision.reason in v.reason


def test_monitor_score_reject_becomes_add_header() -> None:
    v = decide([scored(20.0)], MONITOR, Stage.DATA)
    assert (v.action, v.reply, v.would) == (Action.ADD_HEADER, None, Action.REJECT)


def test_monitor_hard_reject_with_high_score_adds_headers() -> None:
    v = decide([scored(7.0), hard(REJECT)], MONITOR, Stage.DATA)
    assert (v.action, v.reply, v.would) == (Action.ADD_HEADER, None, Action.REJECT)


@pytest.mark.parametrize(("score", "action"), [(1.0, Action.ACCEPT), (7.0, Action.ADD_HEADER)])
def test_monitor_leaves_non_refusals_alone(score: float, action: Action) -> None:
    v = decide([scored(score)], MONITOR, Stage.DATA)
    assert (v.action, v.would) == (action, None)


def test_enforce_has_no_would() -> None:
    assert decide([hard(REJECT)], DEFAULT_POLICY, Stage.RCPT).would is None


# -- symbols and score -----------------------------------------------------------------------------
def test_symbols_kept_in_order_and_summed() -> None:
    results = [
        scored(0.1, 0.2, check="spf"),
        CheckResult("dkim", "none"),
        hard(GREYLIST, check="greylist", score=0.0),
        scored(-1.5, check="dmarc"),
    ]
    v = decide(results, DEFAULT_POLICY, Stage.DATA)
    assert [s.score for s in v.symbols] == [0.1, 0.2, 0.0, -1.5]
    assert v.symbols == tuple(s for r in results for s in r.symbols)
    assert v.score == pytest.approx(-1.2)
    assert v.score == total_score(v.symbols) == -1.2  # rounded: no 0.30000000000000004


def test_results_may_be_an_iterator() -> None:
    v = decide(iter([scored(10.0), scored(5.0)]), DEFAULT_POLICY, Stage.DATA)
    assert v.score == 15.0
    assert v.action is Action.REJECT


def test_policy_type() -> None:
    assert isinstance(MONITOR, Policy)
