"""Per-check enforce/monitor/off switches and per-recipient-domain overrides."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from filter import replies
from filter.model import Recipient, Stage
from filter.policy import render_toml
from filter.policy.loader import build_policy
from filter.policy.schema import DEFAULT_POLICY, Policy
from filter.results import Action, CheckResult, Decision, Symbol
from filter.session import common_override_domain
from filter.verdict import decide, decide_after_data

DNSBL_HIT = CheckResult(
    "dnsbl",
    "fail",
    (Symbol("DNSBL_ZEN_SBL", 10.0, "listed"),),
    Decision(Action.REJECT, replies.REJECT_DNSBL, "listed in zen"),
)
SPF_FAIL = CheckResult("spf", "fail", (Symbol("SPF_FAIL", 2.0, "-all"),))


def policy(data: dict[str, Any]) -> Policy:
    return build_policy(data)


def test_enforced_check_refuses() -> None:
    v = decide([DNSBL_HIT], DEFAULT_POLICY, Stage.RCPT)
    assert v.action is Action.REJECT and v.reply == replies.REJECT_DNSBL


def test_check_in_monitor_mode_would_refuse_and_scores_zero() -> None:
    p = policy({"dnsbl": {"mode": "monitor"}})
    v = decide([DNSBL_HIT, SPF_FAIL], p, Stage.DATA)
    assert v.action is Action.ACCEPT and v.reply is None
    assert v.would is Action.REJECT
    assert v.score == 2.0  # only SPF_FAIL counts
    assert [s.score for s in v.symbols if s.name == "DNSBL_ZEN_SBL"] == [0.0]


def test_domain_override_switches_a_check_off_for_its_recipients_only() -> None:
    p = policy({"domains": {"partner.example": {"checks": {"dnsbl": "off"}}}})
    off = decide([DNSBL_HIT], p, Stage.RCPT, "partner.example")
    assert off.action is Action.ACCEPT and off.would is None
    assert not off.symbols  # an "off" check leaves no trace in the verdict
    sub = decide([DNSBL_HIT], p, Stage.RCPT, "mx.partner.example")  # subdomains too
    assert sub.action is Action.ACCEPT
    other = decide([DNSBL_HIT], p, Stage.RCPT, "example.org")
    assert other.action is Action.REJECT


def test_domain_monitor_mode_and_thresholds_and_scores() -> None:
    p = policy(
        {
            "domains": {
                "lab.example": {"mode": "monitor"},
                "strict.example": {"reject": 2.0, "add_header": 1.0},
                "lax.example": {"scores": {"SPF_FAIL": 0.0}},
            }
        }
    )
    lab = decide([DNSBL_HIT], p, Stage.RCPT, "lab.example")
    # Domain-wide monitor: never refused; flagged, since 10 >= add_header.
    assert lab.action is Action.ADD_HEADER and lab.reply is None and lab.would is Action.REJECT
    strict = decide([SPF_FAIL], p, Stage.DATA, "strict.example")
    assert strict.action is Action.REJECT  # 2.0 >= 2.0 there, not at the global 15
    assert decide([SPF_FAIL], p, Stage.DATA).action is Action.ACCEPT
    assert decide([SPF_FAIL], p, Stage.DATA, "lax.example").score == 0.0


def test_most_specific_domain_entry_wins() -> None:
    p = policy(
        {
            "domains": {
                "example.com": {"checks": {"dnsbl": "off"}},
                "hr.example.com": {"checks": {"dnsbl": "enforce"}},
            }
        }
    )
    assert decide([DNSBL_HIT], p, Stage.RCPT, "a.example.com").action is Action.ACCEPT
    assert decide([DNSBL_HIT], p, Stage.RCPT, "hr.example.com").action is Action.REJECT


def test_after_data_an_override_applies_only_if_all_recipients_share_it() -> None:
    p = policy({"domains": {"lab.example": {"mode": "monitor"}}})
    same = [Recipient("a@lab.example"), Recipient("b@x.lab.example")]
    mixed = [Recipient("a@lab.example"), Recipient("b@example.org")]
    assert common_override_domain(p, same) == "lab.example"
    assert common_override_domain(p, mixed) is None


def test_domains_with_equal_overrides_share_them_after_data() -> None:
    # Two domains onboarded alike, each with its own table: after DATA their message
    # is judged in monitor mode too, not refused by the global policy.
    p = policy({"domains": {"a.example": {"mode": "monitor"}, "b.example": {"mode": "monitor"}}})
    both = [Recipient("x@a.example"), Recipient("y@b.example")]
    assert common_override_domain(p, both) == "a.example"
    stricter = policy({"domains": {"a.example": {"mode": "monitor"}, "b.example": {"reject": 9}}})
    assert common_override_domain(stricter, both) is None


def test_after_data_the_refusals_judged_at_rcpt_are_not_enforced_again() -> None:
    """Each recipient's RCPT applied DNSBL_HIT under its override; mixed overrides then
    leave the global policy to judge after DATA, which must not refuse what every
    accepted recipient's domain let in; a content check's refusal still counts."""
    p = policy(
        {"domains": {"a.example": {"mode": "monitor"}, "b.example": {"checks": {"dnsbl": "off"}}}}
    )
    assert not decide([DNSBL_HIT], p, Stage.RCPT, "a.example").refuses
    assert not decide([DNSBL_HIT], p, Stage.RCPT, "b.example").refuses
    v = decide_after_data([DNSBL_HIT, SPF_FAIL], p, None, {"dnsbl", "spf"})
    assert (v.action, v.score, v.would) == (Action.ADD_HEADER, 12.0, None)
    # Under the monitor domain's override the would-have is still noted.
    v = decide_after_data([DNSBL_HIT], p, "a.example", {"dnsbl"})
    assert (v.action, v.would) == (Action.ADD_HEADER, Action.REJECT)
    dmarc = CheckResult(
        "dmarc", "fail", (), Decision(Action.REJECT, replies.REJECT_DMARC, "p=reject")
    )
    v = decide_after_data([DNSBL_HIT, dmarc], p, None, {"dnsbl"})
    assert (v.action, v.reply) == (Action.REJECT, replies.REJECT_DMARC)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (
            {"domains": {"x.example": {"checks": {"spff": "off"}}}},
            'domains."x.example".checks.spff',
        ),
        (
            {"domains": {"x.example": {"checks": {"spf": "maybe"}}}},
            'domains."x.example".checks.spf',
        ),
        ({"domains": {"x.example": {"reject": "high"}}}, 'domains."x.example".reject'),
        ({"domains": {"not a domain": {}}}, 'domains."not a domain"'),
        ({"spf": {"mode": "off"}}, "spf.mode"),  # "off" is enabled = false globally
        # A single label would never apply (override_for stops above the TLD).
        ({"domains": {"localhost": {"mode": "monitor"}}}, 'domains."localhost"'),
        # Two spellings of one domain: the later table replaced the earlier one whole.
        (
            {"domains": {"Example.COM.": {"reject": 9.0}, "example.com": {"add_header": 3.0}}},
            'domains."example.com"',
        ),
    ],
)
def test_invalid_overrides_are_reported_by_key(data: dict[str, Any], key: str) -> None:
    from filter.policy import PolicyError

    with pytest.raises(PolicyError) as err:
        build_policy(data, {"": "local.d/50.toml"})
    assert any(i.key == key for i in err.value.issues), [str(i) for i in err.value.issues]


def test_idn_domains_match_in_either_spelling() -> None:
    # An SMTPUTF8 recipient's domain arrives as a U-label; the table may be written
    # either way (before, a U-label key was refused and an A-label key never matched).
    p = policy({"domains": {"bücher.example": {"mode": "monitor"}, "xn--dmin-5qa.example": {}}})
    assert list(p.domains) == ["xn--bcher-kva.example", "xn--dmin-5qa.example"]
    for domain in ("bücher.example", "mx.BÜCHER.example", "xn--bcher-kva.example"):
        assert p.override_for(domain) is p.domains["xn--bcher-kva.example"], domain
    assert p.override_for("dömin.example") is p.domains["xn--dmin-5qa.example"]
    assert p.override_for("[192.0.2.1]") is None and p.override_for("") is None


def test_domains_round_trip_through_policy_show() -> None:
    p = policy(
        {
            "domains": {
                "example.com": {
                    "mode": "monitor",
                    "checks": {"greylist": "off"},
                    "reject": 20.0,
                    "scores": {"SPF_FAIL": 5.0},
                }
            }
        }
    )
    text = render_toml(p, changed_only=True)
    again = build_policy(tomllib.loads(text))
    assert again.domains == p.domains
    assert render_toml(DEFAULT_POLICY, changed_only=True) == ""


def test_an_allow_listed_client_overrides_other_refusals() -> None:
    allow = CheckResult(
        "lists",
        "pass",
        (Symbol("LIST_ALLOW_CLIENT", -10.0, "partner"),),
        None,
        {"allowlisted": True, "reason": "client 192.0.2.7 in allow-clients.txt"},
    )
    v = decide([DNSBL_HIT, allow], DEFAULT_POLICY, Stage.RCPT)
    assert v.action is Action.ACCEPT and v.score == 0.0
    # In monitor mode the list does not override anything.
    p = policy({"lists": {"mode": "monitor"}})
    assert decide([DNSBL_HIT, allow], p, Stage.RCPT).action is Action.REJECT


def test_domain_thresholds_must_keep_their_order() -> None:
    from filter.policy import PolicyError

    with pytest.raises(PolicyError) as err:
        build_policy({"domains": {"a.example": {"add_header": 9.0, "reject": 3.0}}})
    assert "greylist <= add_header <= reject" in str(err.value)
    assert policy({"domains": {"a.example": {"add_header": 0.0, "reject": 3.0}}})


async def test_greylist_score_counts_as_the_verdict_counts() -> None:
    """apply = "score": a check in monitor mode cannot tip a message into greylisting."""
    from filter.checks import Context
    from filter.checks.greylist import score_so_far
    from filter.model import ClientInfo

    p = policy({"dnsbl": {"mode": "monitor"}})
    ctx = Context(
        client=ClientInfo("192.0.2.1", 1, "S"),
        policy=p,
        results={"dnsbl": DNSBL_HIT, "spf": SPF_FAIL},
        recipient=Recipient("bob@example.org"),
    )
    assert score_so_far(ctx) == 2.0  # DNSBL's 10 is monitored: 0


def _summed_dnsbl() -> CheckResult:
    """Two listings that only reject together (threshold 10), as the DNSBL check reports."""
    return CheckResult(
        "dnsbl",
        "fail",
        (Symbol("DNSBL_SOFT", 4.0, "listed"), Symbol("DNSBL_ZEN_CSS", 6.0, "listed")),
        Decision(
            Action.REJECT,
            replies.REJECT_DNSBL,
            "DNSBL score 10 >= threshold 10",
            ("DNSBL_SOFT", "DNSBL_ZEN_CSS"),
            10.0,
        ),
    )


def test_a_domain_score_rejudges_the_dnsbl_sum() -> None:
    """The DNSBL sum is made at connect, before any recipient is known; a recipient
    domain that scores one of its symbols lower is judged with that score."""
    p = policy({"domains": {"css0.test": {"scores": {"DNSBL_ZEN_CSS": 0.0}}}})
    mild = decide([_summed_dnsbl()], p, Stage.RCPT, "css0.test")
    assert mild.action is Action.ACCEPT and mild.reply is None
    assert decide([_summed_dnsbl()], p, Stage.RCPT, "other.test").action is Action.REJECT
    # An override of an unrelated symbol, or one that keeps the sum, changes nothing.
    keep = policy({"domains": {"x.test": {"scores": {"SPF_FAIL": 0.0, "DNSBL_SOFT": 5.0}}}})
    assert decide([_summed_dnsbl()], keep, Stage.RCPT, "x.test").action is Action.REJECT


def test_a_reject_zone_is_not_rescored() -> None:
    """A listing on a ``reject = true`` zone rejects by itself, whatever its score."""
    p = policy({"domains": {"css0.test": {"scores": {"DNSBL_ZEN_SBL": 0.0}}}})
    assert decide([DNSBL_HIT], p, Stage.RCPT, "css0.test").action is Action.REJECT


def test_the_reason_names_the_action_taken_and_what_monitor_would_have_done() -> None:
    p = policy({"dnsbl": {"mode": "monitor"}})
    grey = CheckResult(
        "greylist", "policy", (), Decision(Action.GREYLIST, replies.greylisted(300), "new triplet")
    )
    v = decide([DNSBL_HIT, grey], p, Stage.RCPT)
    assert (v.action, v.would) == (Action.GREYLIST, Action.REJECT)
    assert v.reason.startswith("new triplet; check in monitor mode: would reject")


def test_the_verdict_names_what_decided_it() -> None:
    """``decided_by`` feeds mailgate_refusals_total{cause}: the check whose own
    decision it was, "score" for the thresholds, "" when nothing decided."""
    assert decide([DNSBL_HIT], DEFAULT_POLICY, Stage.RCPT).decided_by == "dnsbl"
    assert decide([SPF_FAIL], DEFAULT_POLICY, Stage.RCPT).decided_by == ""
    spam = CheckResult("spf", "fail", (Symbol("SPF_FAIL", 16.0, "-all"),))
    v = decide([spam], DEFAULT_POLICY, Stage.DATA)
    assert (v.action, v.decided_by) == (Action.REJECT, "score")
    # A check's decision at least as hard as the score's wins, and names itself.
    v = decide([spam, DNSBL_HIT], DEFAULT_POLICY, Stage.DATA)
    assert (v.action, v.reply, v.decided_by) == (Action.REJECT, replies.REJECT_DNSBL, "dnsbl")
    # Monitor mode refuses nothing; the would-be refusal is not a cause.
    v = decide([DNSBL_HIT], policy({"dnsbl": {"mode": "monitor"}}), Stage.RCPT)
    assert (v.action, v.would, v.decided_by) == (Action.ACCEPT, Action.REJECT, "")
