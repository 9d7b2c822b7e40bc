"""The DMARC check against the loopback DNS server through the real resolver.

SPF, DKIM and ARC results are plain CheckResults built here (they are data the check
reads, not behaviour to mock); every DMARC lookup goes over real UDP to
tests/rig/dnsserver.py, so the tree walk and its query budget are observed on the wire.
"""

from __future__ import annotations

import dataclasses
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from filter import replies
from filter.authresults import build
from filter.checks import Context
from filter.checks.dmarc import DMARCCheck
from filter.message import MessageBuffer
from filter.model import ClientInfo, Stage
from filter.policy.schema import DMARCPolicy, Policy
from filter.resolver import Resolver
from filter.results import Action, CheckResult
from filter.units import Address
from tests.rig.dnsserver import ZoneDNSServer

REQUIRED_KEYS = {
    "from_domain",
    "org_domain",
    "policy",
    "record_domain",
    "disposition",
    "aligned_spf",
    "aligned_dkim",
    "override",
    "reason",
}


def spf(domain: str, result: str = "pass", identity: str = "mailfrom") -> CheckResult:
    return CheckResult("spf", result, data={"identity": identity, "domain": domain})


def dkim(*sigs: tuple[str, str]) -> CheckResult:
    """``dkim(("pass", "example.test"), ...)``: one entry per signature."""
    signatures = [{"result": r, "d": d, "s": "sel"} for r, d in sigs]
    overall = "pass" if any(r == "pass" for r, _ in sigs) else (sigs[0][0] if sigs else "none")
    return CheckResult("dkim", overall, data={"signatures": signatures})


def arc(trusted: bool, cv: str = "pass") -> CheckResult:
    return CheckResult(
        "arc", cv, data={"cv": cv, "sealer": "forwarder.example.org", "trusted": trusted}
    )


def message(*froms: str) -> MessageBuffer:
    buf = MessageBuffer()
    head = "".join(f"From: {f}\r\n" for f in froms)
    buf.write(f"{head}To: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n".encode())
    return buf


async def run(
    zone: ZoneDNSServer,
    *froms: str,
    results: tuple[CheckResult, ...] = (),
    rng: Any = None,
    **dmarc_policy: Any,
) -> CheckResult:
    policy = dataclasses.replace(Policy(), dmarc=DMARCPolicy(**dmarc_policy))
    resolver = Resolver([Address(zone.host, zone.port)], timeout=1.0)
    ctx = Context(
        client=ClientInfo("192.0.2.1", 40000, "S1"),
        policy=policy,
        results={r.check: r for r in results},
        message=message(*froms),
        resolver=resolver,
    )
    check = DMARCCheck(rng=rng)
    assert check.stage is Stage.DATA and check.needs == ("spf", "dkim", "arc")
    try:
        res = await check.run(ctx)
    finally:
        assert ctx.message is not None
        ctx.message.close()
    assert set(res.data) >= REQUIRED_KEYS, res.data
    return res


def symbols(res: CheckResult) -> list[str]:
    return [s.name for s in res.symbols]


def publish(zone: ZoneDNSServer, name: str, record: str) -> None:
    zone.add(f"_dmarc.{name}", "TXT", record)


# -- pass ------------------------------------------------------------------------------------


async def test_pass_via_aligned_spf(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; rua=mailto:d@example.test")
    res = await run(dns_zone, "Alice <alice@example.test>", results=(spf("bounces.example.test"),))
    assert res.result == "pass"
    assert symbols(res) == ["DMARC_PASS"]
    assert res.symbols[0].score == Policy().score("DMARC_PASS")
    assert res.decision is None
    d = res.data
    assert d["aligned_spf"] is True and d["aligned_dkim"] == []
    assert (d["from_domain"], d["org_domain"], d["record_domain"]) == ("example.test",) * 3
    assert (d["policy"], d["disposition"], d["override"]) == ("reject", "none", "")


async def test_pass_via_aligned_dkim_relaxed(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; sp=quarantine")
    dns_zone.add("sub.example.test", "A", "192.0.2.10")
    res = await run(
        dns_zone,
        "a@sub.example.test",
        results=(dkim(("fail", "sub.example.test"), ("pass", "example.test")), spf("x.org")),
    )
    assert res.result == "pass"
    assert res.data["aligned_dkim"] == ["example.test"]
    assert res.data["aligned_spf"] is False
    assert res.data["org_domain"] == "example.test"
    assert res.data["record_domain"] == "example.test"
    assert res.data["policy"] == "quarantine"  # sp: the From domain is a subdomain


async def test_identical_domains_need_no_walk(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", results=(dkim(("pass", "EXAMPLE.test")),))
    assert res.result == "pass"
    assert res.data["org_domain"] == "example.test"
    assert [q for q, _, _ in dns_zone.query_log()] == ["_dmarc.example.test"]


async def test_every_aligned_dkim_signature_is_listed(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(
        dns_zone,
        "a@example.test",
        results=(dkim(("pass", "example.test"), ("pass", "mail.example.test"), ("pass", "o.org")),),
    )
    assert res.result == "pass"
    assert res.data["aligned_dkim"] == ["example.test", "mail.example.test"]


async def test_spf_helo_identity_does_not_count(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=none")
    res = await run(dns_zone, "a@example.test", results=(spf("example.test", identity="helo"),))
    assert res.result == "fail"
    assert symbols(res) == ["DMARC_POLICY_NONE"]


# -- fail and policies ------------------------------------------------------------------------


async def test_strict_alignment_fails(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; adkim=s; aspf=s")
    dns_zone.add("sub.example.test", "A", "192.0.2.10")
    res = await run(
        dns_zone,
        "a@sub.example.test",
        results=(dkim(("pass", "example.test")), spf("example.test")),
    )
    assert res.result == "fail"
    assert res.data["aligned_dkim"] == [] and res.data["aligned_spf"] is False
    assert res.decision is not None and res.decision.action is Action.REJECT
    # each _dmarc name asked once: the identifiers' walks reuse the From domain's
    assert all(n == 1 for n in dns_zone.resolver.queries.values())


async def test_strict_alignment_needs_no_walk(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=quarantine; adkim=s; aspf=s")
    res = await run(
        dns_zone,
        "a@example.test",
        results=(dkim(("pass", "mail.example.test")), spf("bounces.example.test")),
    )
    assert res.result == "fail"
    assert res.decision is not None and res.decision.action is Action.ADD_HEADER
    # a string comparison (RFC 9989 §4.10.2): no Organizational Domain walks at all
    assert [q for q, t, _ in dns_zone.query_log()] == ["_dmarc.example.test"]


@pytest.mark.parametrize(
    ("p", "symbol", "action", "reply"),
    [
        ("none", "DMARC_POLICY_NONE", None, None),
        ("quarantine", "DMARC_QUARANTINE", Action.ADD_HEADER, None),
        ("reject", "DMARC_REJECT", Action.REJECT, replies.REJECT_DMARC),
    ],
)
async def test_policies(
    dns_zone: ZoneDNSServer, p: str, symbol: str, action: Action | None, reply: Any
) -> None:
    publish(dns_zone, "example.test", f"v=DMARC1; p={p}")
    res = await run(dns_zone, "a@example.test", results=(spf("evil.org"),))
    assert res.result == "fail"
    assert symbols(res) == [symbol]
    assert res.symbols[0].score == Policy().score(symbol)
    assert res.data["policy"] == p
    assert res.data["disposition"] == {"none": "none"}.get(p, p)
    if action is None:
        assert res.decision is None
    else:
        assert res.decision is not None
        assert res.decision.action is action and res.decision.reply == reply
        assert "example.test" in res.decision.reason


async def test_reject_not_honoured_by_policy(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", honor_reject=False)
    assert res.result == "fail"
    assert res.decision is None
    assert symbols(res) == ["DMARC_REJECT"]
    assert (res.data["disposition"], res.data["override"]) == ("none", "local_policy")


async def test_sp_for_existing_subdomain(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; sp=none; np=quarantine")
    dns_zone.add("sub.example.test", "MX", "10 mail.example.test")
    res = await run(dns_zone, "a@sub.example.test")
    assert res.result == "fail"
    assert (res.data["policy"], res.data["policy_source"]) == ("none", "sp")
    assert res.decision is None
    # the existence check ran (np differs from sp) and found the name
    assert dns_zone.count("sub.example.test", "A") == 1


async def test_np_for_non_existent_subdomain(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=none; sp=none; np=reject")
    res = await run(dns_zone, "spoof@nx.example.test")
    assert res.result == "fail"
    assert (res.data["policy"], res.data["policy_source"]) == ("reject", "np")
    assert res.decision is not None and res.decision.action is Action.REJECT
    assert "does not exist" in res.data["reason"]  # type: ignore[operator]


async def test_np_skipped_when_it_cannot_matter(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "spoof@nx.example.test")
    assert res.data["policy"] == "reject"
    assert dns_zone.count("nx.example.test") == 0  # no A/AAAA/MX queries spent


async def test_existence_is_one_a_query(dns_zone: ZoneDNSServer) -> None:
    """RFC 8020 (RFC 9989 §3.2.13): one NXDOMAIN says the name does not exist."""
    publish(dns_zone, "example.test", "v=DMARC1; p=none; np=reject")
    res = await run(dns_zone, "spoof@nx.example.test")
    assert (res.data["policy"], res.data["policy_source"]) == ("reject", "np")
    assert dns_zone.count("nx.example.test", "A") == 1
    assert dns_zone.count("nx.example.test", "AAAA") == 0
    assert dns_zone.count("nx.example.test", "MX") == 0


async def test_a_name_with_other_records_only_exists(dns_zone: ZoneDNSServer) -> None:
    """NODATA for A is not NXDOMAIN: the name exists (here it has only TXT)."""
    publish(dns_zone, "example.test", "v=DMARC1; p=none; np=reject")
    dns_zone.add("txtonly.example.test", "TXT", "hello")
    res = await run(dns_zone, "a@txtonly.example.test")
    assert (res.data["policy"], res.data["policy_source"]) == ("none", "p")
    assert res.decision is None


async def test_pass_reports_np_for_a_non_existent_subdomain(dns_zone: ZoneDNSServer) -> None:
    """policy.dmarc on a pass names the policy that applies, np included."""
    publish(dns_zone, "example.test", "v=DMARC1; p=none; sp=none; np=reject")
    res = await run(dns_zone, "a@nx.example.test", results=(dkim(("pass", "example.test")),))
    assert res.result == "pass" and res.decision is None
    assert (res.data["policy"], res.data["policy_source"]) == ("reject", "np")
    assert "does not exist" in str(res.data["reason"])
    header = build({"dmarc": res}, "mx.example.net").decode()
    assert "dmarc=pass header.from=nx.example.test policy.dmarc=reject\r\n" in header


async def test_pass_stays_pass_when_existence_is_unknown(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=none; sp=none; np=reject")
    dns_zone.set_name_mode("nx.example.test", "servfail")
    res = await run(dns_zone, "a@nx.example.test", results=(dkim(("pass", "example.test")),))
    assert (res.result, symbols(res), res.decision) == ("pass", ["DMARC_PASS"], None)
    assert (res.data["policy"], res.data["policy_source"]) == ("none", "sp")
    assert "existence of nx.example.test unknown" in str(res.data["reason"])


async def test_p_none_does_not_change_handling(dns_zone: ZoneDNSServer) -> None:
    """RFC 9989 §5.4: p=none MUST NOT modify mail handling, so it scores nothing by
    default."""
    publish(dns_zone, "example.test", "v=DMARC1; p=none")
    res = await run(dns_zone, "a@example.test", results=(spf("evil.org"),))
    assert (res.result, symbols(res), res.decision) == ("fail", ["DMARC_POLICY_NONE"], None)
    assert res.symbols[0].score == 0.0


def test_shipped_policy_scores_p_none_zero() -> None:
    shipped = Path(__file__).resolve().parents[2] / "policies" / "mailgate.toml"
    assert tomllib.loads(shipped.read_text())["scores"]["DMARC_POLICY_NONE"] == 0.0


async def test_testing_mode_applies_one_level_lower(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; t=y")
    res = await run(dns_zone, "a@example.test")
    assert res.result == "fail"
    assert res.data["policy"] == "reject"
    assert res.data["requested"] == "quarantine" and res.data["testing"] is True
    assert res.decision is not None and res.decision.action is Action.ADD_HEADER
    assert res.data["disposition"] == "quarantine"
    assert symbols(res) == ["DMARC_QUARANTINE"]


async def test_unknown_tags_and_removed_pct_are_ignored(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; pct=0; future=1")
    res = await run(dns_zone, "a@example.test")
    assert res.decision is not None and res.decision.action is Action.REJECT


# -- discovery --------------------------------------------------------------------------------


async def test_none_without_record(dns_zone: ZoneDNSServer) -> None:
    res = await run(dns_zone, "a@nodmarc.example.org", results=(spf("nodmarc.example.org"),))
    assert res.result == "none"
    assert symbols(res) == ["DMARC_NONE"]
    assert res.decision is None
    assert res.data["policy"] == "" and res.data["record_domain"] == ""
    # walked up to the TLD, one query per level
    for name in ("nodmarc.example.org", "example.org", "org"):
        assert dns_zone.count(f"_dmarc.{name}", "TXT") == 1


async def test_tree_walk_finds_org_record(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; sp=quarantine")
    dns_zone.add("a.b.c.sub.example.test", "A", "192.0.2.11")
    res = await run(dns_zone, "x@a.b.c.sub.example.test")
    assert res.result == "fail"
    assert res.data["record_domain"] == "example.test"
    assert res.data["org_domain"] == "example.test"
    assert res.data["policy"] == "quarantine"
    walked = [q for q, t, _ in dns_zone.query_log() if t == "TXT"]
    assert walked == [
        "_dmarc.a.b.c.sub.example.test",
        "_dmarc.b.c.sub.example.test",
        "_dmarc.c.sub.example.test",
        "_dmarc.sub.example.test",
        "_dmarc.example.test",
        "_dmarc.test",
    ]


async def test_tree_walk_query_budget_for_long_names(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=none")
    long = ".".join(f"l{i}" for i in range(20)) + ".example.test"
    res = await run(dns_zone, f"x@{long}")
    assert res.data["record_domain"] == "example.test"
    txt = [q for q, t, _ in dns_zone.query_log() if t == "TXT"]
    assert len(txt) == 8
    assert txt[1] == "_dmarc.l15.l16.l17.l18.l19.example.test"  # jumped to seven labels


async def test_multiple_records_at_a_name_are_ignored(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "sub.example.test", "v=DMARC1; p=none")
    publish(dns_zone, "sub.example.test", "v=DMARC1; p=quarantine")
    dns_zone.add("_dmarc.sub.example.test", "TXT", "unrelated text")
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    dns_zone.add("sub.example.test", "A", "192.0.2.10")
    res = await run(dns_zone, "a@sub.example.test")
    assert res.data["record_domain"] == "example.test"
    assert res.data["policy"] == "reject"


async def test_psd_record_at_a_public_suffix_like_level(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "psd.test", "v=DMARC1; p=reject; sp=quarantine; np=reject; psd=y")
    dns_zone.add("shop.psd.test", "A", "192.0.2.20")
    # d=other.psd.test shares only the PSD: different Organizational Domains.
    res = await run(dns_zone, "a@shop.psd.test", results=(dkim(("pass", "other.psd.test")),))
    assert res.result == "fail"
    assert res.data["org_domain"] == "shop.psd.test"
    assert res.data["record_domain"] == "psd.test"
    assert (res.data["policy"], res.data["policy_source"]) == ("quarantine", "sp")
    assert dns_zone.count("_dmarc.test") == 0  # psd=y stops the walk


async def test_psd_np_for_unregistered_name(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "psd.test", "v=DMARC1; p=none; np=reject; psd=y")
    res = await run(dns_zone, "a@unregistered.psd.test")
    assert (res.data["policy"], res.data["policy_source"]) == ("reject", "np")
    assert res.decision is not None and res.decision.action is Action.REJECT


async def test_org_record_beats_psd_record(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "psd.test", "v=DMARC1; p=reject; psd=y")
    publish(dns_zone, "bank.psd.test", "v=DMARC1; p=none")
    dns_zone.add("www.bank.psd.test", "A", "192.0.2.21")
    res = await run(dns_zone, "a@www.bank.psd.test", results=(spf("bank.psd.test"),))
    assert res.result == "pass"  # relaxed: both have org bank.psd.test
    assert res.data["record_domain"] == "bank.psd.test"
    assert res.data["org_domain"] == "bank.psd.test"


async def test_psd_n_makes_a_department_its_own_org(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    publish(dns_zone, "dept.example.test", "v=DMARC1; p=quarantine; psd=n")
    dns_zone.add("a.dept.example.test", "A", "192.0.2.22")
    res = await run(dns_zone, "x@a.dept.example.test", results=(dkim(("pass", "example.test")),))
    assert res.result == "fail"  # org dept.example.test != example.test
    assert res.data["org_domain"] == "dept.example.test"
    assert res.data["record_domain"] == "dept.example.test"
    assert res.data["policy"] == "quarantine"


@pytest.mark.parametrize(
    ("record", "standard", "applied"),
    [
        ("v=DMARC1; p=reject", "rfc9989", "reject"),
        ("v=DMARC1; p=reject; t=y", "rfc9989", "quarantine"),
        ("v=DMARC1; p=quarantine; t=y", "rfc9989", "none"),
        ("v=DMARC1; p=reject; pct=0", "rfc7489", "quarantine"),
        ("v=DMARC1; p=reject; pct=100", "rfc7489", "reject"),
    ],
)
async def test_authentication_results_name_the_policy_applied(
    dns_zone: ZoneDNSServer, record: str, standard: str, applied: str
) -> None:
    """RFC 7489 11.2 registers policy.dmarc as the policy "applied/to be applied after
    policy options including pct: and sp: have been processed"; RFC 9989's t=y is such
    an option. The header showed the published p=reject while quarantine was applied."""
    publish(dns_zone, "example.test", record)
    res = await run(dns_zone, "a@example.test", standard=standard)
    assert res.result == "fail" and res.data["policy"] == record.split("p=")[1].split(";")[0]
    assert res.data["requested"] == applied
    header = build({"dmarc": res}, "mx.example.net").decode()
    assert f"dmarc=fail header.from=example.test policy.dmarc={applied}\r\n" in header


async def test_invalid_policy_without_rua_is_permerror(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=bogus")
    res = await run(dns_zone, "a@example.test")
    assert res.result == "permerror"
    assert symbols(res) == ["DMARC_PERMERROR"]
    assert res.decision is None


@pytest.mark.parametrize("standard", ["rfc9989", "rfc7489"])
async def test_record_without_p_or_rua_means_no_dmarc_processing(
    dns_zone: ZoneDNSServer, standard: str
) -> None:
    """RFC 9989 §4.10.1, RFC 7489 §6.6.3: no valid p and no valid rua, no DMARC at all;
    its sp=reject must not reject mail from a subdomain."""
    publish(dns_zone, "example.test", "v=DMARC1; sp=reject")
    dns_zone.add("sub.example.test", "A", "192.0.2.10")
    res = await run(dns_zone, "a@sub.example.test", standard=standard)
    assert (res.result, symbols(res), res.decision) == ("none", ["DMARC_NONE"], None)
    assert res.data["policy"] == "" and res.data["record_domain"] == "example.test"
    assert (
        "record at _dmarc.example.test has no p tag and no valid rua: no DMARC processing"
        in str(res.data["reason"])
    )


@pytest.mark.parametrize("standard", ["rfc9989", "rfc7489"])
async def test_record_without_p_but_with_rua_acts_as_p_none(
    dns_zone: ZoneDNSServer, standard: str
) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; sp=reject; rua=mailto:d@example.test")
    dns_zone.add("sub.example.test", "A", "192.0.2.10")
    res = await run(dns_zone, "a@sub.example.test", standard=standard)
    assert (res.result, symbols(res), res.decision) == ("fail", ["DMARC_POLICY_NONE"], None)
    assert (res.data["policy"], res.data["policy_source"]) == ("none", "p")


# -- RFC 7489 compatibility -----------------------------------------------------------------


async def test_rfc7489_pct_0_lowers_reject(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; pct=0")
    res = await run(dns_zone, "a@example.test", standard="rfc7489")
    assert res.result == "fail"
    assert (res.data["policy"], res.data["requested"]) == ("reject", "quarantine")
    assert res.data["override"] == ""
    assert res.decision is not None and res.decision.action is Action.ADD_HEADER


async def test_rfc7489_pct_100_rejects(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; pct=100")
    res = await run(dns_zone, "a@example.test", standard="rfc7489")
    assert res.decision is not None and res.decision.action is Action.REJECT


async def test_rfc7489_pct_uses_the_injected_rng(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=quarantine; pct=50")
    hit = await run(dns_zone, "a@example.test", standard="rfc7489", rng=lambda: 0.10)
    assert hit.data["requested"] == "quarantine"
    assert hit.decision is not None and hit.decision.action is Action.ADD_HEADER
    miss = await run(dns_zone, "a@example.test", standard="rfc7489", rng=lambda: 0.99)
    assert miss.data["requested"] == "none" and miss.decision is None
    assert miss.data["override"] == "sampled_out"
    # a seeded generator gives a reproducible sequence of decisions
    seq = [
        (await run(dns_zone, "a@example.test", standard="rfc7489", rng=rng.random)).data[
            "requested"
        ]
        for rng in [random.Random(7)] * 6
    ]
    ref = random.Random(7)
    assert seq == ["quarantine" if ref.random() < 0.5 else "none" for _ in range(6)]


async def test_rfc7489_uses_the_psl_not_a_walk(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject; sp=none")
    dns_zone.add("a.b.sub.example.test", "A", "192.0.2.12")
    res = await run(dns_zone, "x@a.b.sub.example.test", standard="rfc7489")
    assert res.data["record_domain"] == "example.test"
    assert res.data["policy"] == "none"
    assert [q for q, t, _ in dns_zone.query_log() if t == "TXT"] == [
        "_dmarc.a.b.sub.example.test",
        "_dmarc.example.test",
    ]


# -- From header rules ------------------------------------------------------------------------


async def test_a_second_from_field_cannot_wash_out_p_reject(dns_zone: ZoneDNSServer) -> None:
    """Several From fields are invalid (RFC 5322 3.6) and name no single Author Domain;
    the message is held to the strictest policy among their domains."""
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", "b@example.test")
    assert (res.result, symbols(res)) == ("fail", ["DMARC_REJECT"])
    assert res.decision is not None and res.decision.action is Action.REJECT
    assert "2 From header fields" in str(res.data["reason"])
    res = await run(dns_zone, "ceo@example.test", "me@harmless.test")
    assert res.decision is not None and res.decision.action is Action.REJECT
    assert res.data["from_domains"] == ["example.test", "harmless.test"]


async def test_several_authors_that_all_pass_stay_permerror(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", "b@example.test", results=(spf("example.test"),))
    assert (res.result, symbols(res), res.decision) == ("permerror", ["DMARC_PERMERROR"], None)


async def test_several_domains_in_one_from_is_held_to_the_strictest(
    dns_zone: ZoneDNSServer,
) -> None:
    res = await run(dns_zone, "a@example.test, b@evil.test")
    assert res.result == "permerror"  # neither publishes a policy: nothing fails
    assert res.data["from_domains"] == ["example.test", "evil.test"]
    publish(dns_zone, "evil.test", "v=DMARC1; p=quarantine")
    res = await run(dns_zone, "a@example.test, b@evil.test")
    assert (res.result, symbols(res)) == ("fail", ["DMARC_QUARANTINE"])


@pytest.mark.parametrize(
    "value",
    [
        "a@example.org <ceo@example.test>",
        "a@example.org;ceo@example.test",
        "a@example.org ceo@example.test",
        "Boss <a@example.org>ceo@example.test",
    ],
)
async def test_malformed_from_is_held_to_the_real_authors_policy(
    dns_zone: ZoneDNSServer, value: str
) -> None:
    """RFC 9989 §4.4: a malformed From has no Author Domain. The stdlib parser returned
    a@example.org alone, SPF passed for it, and ceo@example.test's p=reject was never
    asked: dmarc=pass for a spoof."""
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, value, results=(spf("example.org"),))
    assert (res.result, symbols(res)) == ("fail", ["DMARC_REJECT"])
    assert res.decision is not None and res.decision.action is Action.REJECT
    assert res.decision.reply == replies.REJECT_DMARC
    assert str(res.decision.reply).startswith("550 5.7.1")
    assert res.data["from_domains"] == ["example.org", "example.test"]
    assert "malformed From header field" in str(res.data["reason"])


async def test_malformed_from_whose_only_domain_passes_is_permerror(
    dns_zone: ZoneDNSServer,
) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    for value in ("foo <a@example.test>bar", "j@@example.test"):
        res = await run(dns_zone, value, results=(spf("example.test"),))
        assert (res.result, symbols(res), res.decision) == ("permerror", ["DMARC_PERMERROR"], None)
        assert res.data["from_domains"] == ["example.test"]


async def test_obsolete_from_syntax_is_evaluated_normally(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.org", "v=DMARC1; p=reject")
    res = await run(dns_zone, "J. Doe (x) <j@example.org>", results=(spf("example.org"),))
    assert (res.result, res.data["from_domain"]) == ("pass", "example.org")


async def test_only_the_first_author_domains_are_evaluated(dns_zone: ZoneDNSServer) -> None:
    """RFC 9989 §11.5: a From naming 25 domains costs the walks of 10, not 25."""
    names = [f"d{i}.test" for i in range(25)]
    res = await run(dns_zone, ", ".join(f"x@{n}" for n in names))
    assert res.result == "permerror"
    asked = {q for q, t, _ in dns_zone.query_log() if t == "TXT"}
    assert {f"_dmarc.{n}" for n in names[:10]} <= asked
    assert not any(f"_dmarc.{n}" in asked for n in names[10:])
    assert "15 more not evaluated (limit 10)" in str(res.data["reason"])
    assert res.data["from_domains"] == names  # still reported in full
    publish(dns_zone, "d3.test", "v=DMARC1; p=reject")
    publish(dns_zone, "d20.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, ", ".join(f"x@{n}" for n in names))
    assert (res.result, symbols(res)) == ("fail", ["DMARC_REJECT"])
    assert "15 more not evaluated" in str(res.data["reason"])


# -- DNS trouble -------------------------------------------------------------------------------


async def test_dns_timeout_is_temperror_and_tempfail(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_name_mode("_dmarc.example.test", "timeout")
    res = await run(dns_zone, "a@example.test")
    assert res.result == "temperror"
    assert symbols(res) == ["DMARC_TEMPERROR"]
    assert res.decision is not None
    assert res.decision.action is Action.TEMPFAIL
    assert res.decision.reply == replies.CHECK_TEMPFAIL


async def test_dns_timeout_accepted_by_policy(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_name_mode("_dmarc.example.test", "servfail")
    res = await run(dns_zone, "a@example.test", on_temperror="accept")
    assert res.result == "temperror"
    assert res.decision is None


async def test_timeout_in_the_existence_check(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=none; np=reject")
    dns_zone.set_name_mode("nx.example.test", "servfail")
    res = await run(dns_zone, "a@nx.example.test")
    assert res.result == "temperror"
    assert res.decision is not None and res.decision.action is Action.TEMPFAIL


async def test_dkim_temperror_on_aligned_domain_is_temperror(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(
        dns_zone, "a@example.test", results=(dkim(("temperror", "example.test")), spf("o.org"))
    )
    assert res.result == "temperror"  # not a false reject
    assert res.decision is not None and res.decision.action is Action.TEMPFAIL


async def test_unaligned_temperror_does_not_block_fail(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", results=(dkim(("temperror", "other.org")),))
    assert res.result == "fail"


async def test_aligned_pass_wins_over_a_dns_error_elsewhere(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    dns_zone.set_name_mode("_dmarc.mail.other.test", "timeout")
    res = await run(
        dns_zone,
        "a@example.test",
        results=(dkim(("pass", "example.test"), ("pass", "mail.other.test")),),
    )
    assert res.result == "pass"


# -- ARC override ------------------------------------------------------------------------------


async def test_trusted_arc_overrides_reject(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    res = await run(dns_zone, "a@example.test", results=(spf("list.example.org"), arc(True)))
    assert res.result == "fail"
    assert res.decision is None
    assert symbols(res) == ["ARC_TRUSTED_OVERRIDE"]
    assert res.data["override"] == "trusted_forwarder"
    assert res.data["disposition"] == "none"
    assert res.data["policy"] == "reject"


async def test_untrusted_or_broken_arc_does_not_override(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, "example.test", "v=DMARC1; p=reject")
    for a in (arc(False), arc(True, cv="fail")):
        res = await run(dns_zone, "a@example.test", results=(a,))
        assert res.decision is not None and res.decision.action is Action.REJECT
