"""Pure DMARC rules (filter.dmarc): record syntax, tree walk, alignment, policy choice."""

from __future__ import annotations

import random

import pytest

from filter import dmarc
from filter.dmarc import DMARCRecord, parse_record


def rec(text: str) -> DMARCRecord:
    r = parse_record(text)
    assert r is not None, text
    return r


# -- record syntax (RFC 9989 §4.7, §4.8) --------------------------------------------------


def test_parse_full_record() -> None:
    r = rec(
        "v=DMARC1; p=reject; sp=quarantine; np=reject; adkim=s; aspf=r; t=y; psd=n; "
        "rua=mailto:a@example.test, mailto:b@example.test; fo=1"
    )
    assert (r.p, r.sp, r.np, r.adkim, r.aspf, r.t, r.psd) == (
        "reject",
        "quarantine",
        "reject",
        "s",
        "r",
        True,
        "n",
    )
    assert r.rua == ("mailto:a@example.test", "mailto:b@example.test")
    assert r.invalid == () and r.unknown == ()


def test_defaults_and_whitespace() -> None:
    r = rec("  v = DMARC1 ;P = Reject ;  ")
    assert r.p == "reject" and r.sp is None and r.np is None
    assert (r.adkim, r.aspf, r.t, r.psd, r.pct) == ("r", "r", False, "u", 100)


def test_unknown_tags_are_ignored() -> None:
    r = rec("v=DMARC1; p=quarantine; foo=bar; x=; zz=1")
    assert r.p == "quarantine"
    assert r.unknown == ("foo", "x", "zz")
    assert dmarc.usable_record(r) == r


@pytest.mark.parametrize(
    "text",
    [
        "p=reject; v=DMARC1",  # v not first
        "v=dmarc1; p=reject",  # value is case-sensitive
        "v=DMARC2; p=reject",
        "v=spf1 -all",
        "v=DMARC1p=reject",  # not the v tag followed by p
        "",
        "p=reject",
    ],
)
def test_not_a_dmarc_record(text: str) -> None:
    assert parse_record(text) is None


def test_bad_values_fall_back_to_defaults() -> None:
    r = rec("v=DMARC1; p=none; adkim=x; aspf=relaxed; t=maybe; psd=q; pct=150")
    assert (r.adkim, r.aspf, r.t, r.psd, r.pct) == ("r", "r", False, "u", 100)
    assert set(r.invalid) == {"adkim", "aspf", "t", "psd", "pct"}
    assert r.policy_tags_valid()


def test_duplicate_tag_first_wins() -> None:
    assert rec("v=DMARC1; p=reject; p=none").p == "reject"


def test_absent_p_means_none() -> None:
    r = rec("v=DMARC1; rua=mailto:d@example.test")
    assert r.p is None
    usable = dmarc.usable_record(r)
    assert usable is not None and usable.p == "none"


@pytest.mark.parametrize("mode", ["rfc9989", "rfc7489"])
def test_absent_p_with_valid_rua_drops_sp_and_np(mode: dmarc.Mode) -> None:
    """RFC 9989 §4.10.1, RFC 7489 §6.6.3 step 6: no valid p, a valid rua: as if p=none."""
    r = rec("v=DMARC1; sp=reject; np=reject; rua=mailto:d@example.test")
    usable = dmarc.usable_record(r, mode)
    assert usable is not None and (usable.p, usable.sp, usable.np) == ("none", None, None)


@pytest.mark.parametrize("mode", ["rfc9989", "rfc7489"])
@pytest.mark.parametrize(
    "text", ["v=DMARC1; sp=reject", "v=DMARC1; np=reject; adkim=s", "v=DMARC1; rua=not a uri"]
)
def test_absent_p_without_valid_rua_means_no_dmarc_processing(text: str, mode: dmarc.Mode) -> None:
    """Not a syntax error (the result is none, not permerror), but no policy either."""
    r = rec(text)
    assert dmarc.usable_record(r, mode) is None
    assert dmarc.unusable_result(r, mode) == "none"


@pytest.mark.parametrize("text", ["v=DMARC1; p=bogus", "v=DMARC1; sp=maybe", "v=DMARC1; p="])
def test_invalid_policy_tag_without_rua_is_permerror(text: str) -> None:
    assert dmarc.usable_record(rec(text)) is None
    assert dmarc.unusable_result(rec(text)) == "permerror"


def test_invalid_p_with_valid_rua_acts_as_none() -> None:
    r = rec("v=DMARC1; p=bogus; sp=reject; rua=mailto:d@example.test")
    assert not r.policy_tags_valid()
    usable = dmarc.usable_record(r)
    assert usable is not None and (usable.p, usable.sp, usable.np) == ("none", None, None)


@pytest.mark.parametrize(
    "text",
    ["v=DMARC1; p=bogus", "v=DMARC1; p=reject; sp=maybe", "v=DMARC1; p=; rua=not a uri"],
)
def test_invalid_policy_without_rua_is_unusable(text: str) -> None:
    assert dmarc.usable_record(rec(text)) is None


def test_invalid_np_only_matters_in_rfc9989() -> None:
    r = rec("v=DMARC1; p=reject; np=wat")
    assert dmarc.usable_record(r, "rfc9989") is None
    assert dmarc.usable_record(r, "rfc7489") is not None


def test_select_record_discards_multiple_and_foreign() -> None:
    one = dmarc.select_record(["v=spf1 -all", "v=DMARC1; p=reject", "hello"])
    assert one.record is not None and one.record.p == "reject" and one.candidates == 1
    two = dmarc.select_record(["v=DMARC1; p=reject", "v=DMARC1; p=none"])
    assert two.record is None and two.candidates == 2
    assert dmarc.select_record([]).record is None


# -- names and the tree walk (RFC 9989 §4.10) ----------------------------------------------


def test_walk_targets_short_name() -> None:
    assert dmarc.walk_targets("a.mail.example.com") == [
        "a.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    assert dmarc.walk_targets("com") == ["com"]


def test_walk_targets_long_name_is_capped_at_eight_queries() -> None:
    # The RFC's own example.
    assert dmarc.walk_targets("a.b.c.d.e.f.g.h.i.j.mail.example.com") == [
        "a.b.c.d.e.f.g.h.i.j.mail.example.com",
        "g.h.i.j.mail.example.com",
        "h.i.j.mail.example.com",
        "i.j.mail.example.com",
        "j.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    eight = "a.b.c.d.e.f.example.com"
    assert len(eight.split(".")) == 8
    targets = dmarc.walk_targets(eight)
    assert targets[1] == "b.c.d.e.f.example.com" and len(targets) == 8
    for n in range(1, 40):
        assert len(dmarc.walk_targets(".".join(["x"] * n))) <= 8


def test_walk_stops_on_psd_flag() -> None:
    assert dmarc.walk_stops(rec("v=DMARC1; psd=y"))
    assert dmarc.walk_stops(rec("v=DMARC1; psd=n"))
    assert not dmarc.walk_stops(rec("v=DMARC1; psd=u"))
    assert not dmarc.walk_stops(None)


def test_org_domain_fewest_labels() -> None:
    found = [("mail.example.com", rec("v=DMARC1")), ("example.com", rec("v=DMARC1"))]
    assert dmarc.organizational_domain("a.mail.example.com", found) == "example.com"


def test_org_domain_psd_n() -> None:
    found = [("mail.example.com", rec("v=DMARC1; psd=n"))]
    assert dmarc.organizational_domain("a.mail.example.com", found) == "mail.example.com"


def test_org_domain_psd_y_is_one_below() -> None:
    found = [("com", rec("v=DMARC1; psd=y"))]
    assert dmarc.organizational_domain("a.mail.example.com", found) == "example.com"
    # psd=y on the starting name itself does not count (rule 2 excludes it).
    assert dmarc.organizational_domain("com", found) == "com"


def test_org_domain_without_records_is_the_start() -> None:
    assert dmarc.organizational_domain("a.mail.example.com", []) == "a.mail.example.com"


def test_policy_record_prefers_author_then_org_then_psd() -> None:
    own = rec("v=DMARC1; p=none")
    org = rec("v=DMARC1; p=reject")
    psd = rec("v=DMARC1; p=quarantine; psd=y")
    author = "a.mail.example.com"
    assert dmarc.policy_record(author, [(author, own)]) == (author, own)
    walked: list[tuple[str, DMARCRecord | None]] = [
        (author, None),
        ("mail.example.com", rec("v=DMARC1; p=none")),  # between author and org: ignored
        ("example.com", org),
        ("com", psd),
    ]
    assert dmarc.policy_record(author, walked) == ("example.com", org)
    walked = [(author, None), ("mail.example.com", None), ("example.com", None), ("com", psd)]
    assert dmarc.policy_record(author, walked) == ("com", psd)
    assert dmarc.policy_record(author, [(author, None), ("com", None)]) is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Example.TEST", "example.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test", "xn--bcher-kva.test"),
        ("example.test.", "example.test"),
        ("[192.0.2.1]", None),
        ("", None),
        ("a..b", None),
        ("-bad.test", None),
        ("x" * 64 + ".test", None),
    ],
)
def test_normalize_domain(raw: str, want: str | None) -> None:
    assert dmarc.normalize_domain(raw) == want


# -- alignment (RFC 9989 §4.4, §4.10.2) -----------------------------------------------------


def test_quick_alignment() -> None:
    assert dmarc.quick_alignment("example.test", "example.test", strict=True) is True
    assert dmarc.quick_alignment("sub.example.test", "example.test", strict=True) is False
    assert dmarc.quick_alignment("sub.example.test", "example.test", strict=False) is None
    assert dmarc.quick_alignment("example.test", "example.org", strict=False) is False


def test_relaxed_alignment_by_org_domain() -> None:
    walk_from = [("example.test", rec("v=DMARC1; p=reject"))]
    org_from = dmarc.organizational_domain("news.example.test", walk_from)
    org_d = dmarc.organizational_domain("example.test", walk_from)
    assert dmarc.relaxed_aligned(org_from, org_d)
    assert not dmarc.relaxed_aligned(org_from, "example.org")


def test_psl_org_domain_for_rfc7489() -> None:
    assert dmarc.psl_organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert dmarc.psl_organizational_domain("sub.example.test") == "example.test"
    assert dmarc.psl_organizational_domain("co.uk") == "co.uk"


def test_identifiers_from_other_checks() -> None:
    ids = dmarc.identifiers(
        "pass",
        {"identity": "mailfrom", "domain": "Bounce.Example.TEST"},
        {
            "signatures": [
                {"result": "pass", "d": "example.test"},
                {"result": "fail", "d": "evil.test"},
                {"result": "pass", "d": "EXAMPLE.test"},  # duplicate after normalising
                {"result": "temperror", "d": "other.test"},
                {"result": "pass", "d": ""},
                {"result": "pass", "d": "testing.test", "testing": True},
                "junk",
            ]
        },
    )
    assert ids.spf_pass == "bounce.example.test"
    assert ids.dkim_pass == ("example.test",)
    assert ids.dkim_temperror == ("other.test",)
    helo = dmarc.identifiers("pass", {"identity": "helo", "domain": "example.test"}, {})
    assert helo.spf_pass == ""
    null = {"identity": "helo", "domain": "mx.example.test", "smtp.mailfrom": "postmaster@mx"}
    assert dmarc.identifiers("pass", null, {}).spf_pass == "mx.example.test"
    temp = dmarc.identifiers("temperror", {"identity": "mailfrom", "domain": "x.test"}, {})
    assert temp.spf_temperror == "x.test" and temp.spf_pass == ""


# -- policy choice (RFC 9989 §4.7, §4.10.1; RFC 7489 §6.6.4) -------------------------------


def test_p_applies_to_the_record_domain() -> None:
    r = rec("v=DMARC1; p=reject; sp=none; np=quarantine")
    c = dmarc.choose_policy(r, "example.test", "example.test", author_exists=False)
    assert (c.policy, c.source, c.requested) == ("reject", "p", "reject")


def test_sp_for_existing_subdomain() -> None:
    r = rec("v=DMARC1; p=reject; sp=quarantine; np=none")
    c = dmarc.choose_policy(r, "example.test", "sub.example.test", author_exists=True)
    assert (c.policy, c.source) == ("quarantine", "sp")
    # unknown existence counts as existing
    c = dmarc.choose_policy(r, "example.test", "sub.example.test")
    assert c.source == "sp"


def test_np_for_non_existent_subdomain_with_fallbacks() -> None:
    r = rec("v=DMARC1; p=none; sp=quarantine; np=reject")
    c = dmarc.choose_policy(r, "example.test", "nx.example.test", author_exists=False)
    assert (c.policy, c.source) == ("reject", "np")
    r = rec("v=DMARC1; p=none; sp=quarantine")
    c = dmarc.choose_policy(r, "example.test", "nx.example.test", author_exists=False)
    assert (c.policy, c.source) == ("quarantine", "sp")
    r = rec("v=DMARC1; p=reject")
    c = dmarc.choose_policy(r, "example.test", "nx.example.test", author_exists=False)
    assert (c.policy, c.source) == ("reject", "p")


def test_np_is_ignored_in_rfc7489_mode() -> None:
    r = rec("v=DMARC1; p=none; np=reject")
    c = dmarc.choose_policy(
        r, "example.test", "nx.example.test", author_exists=False, mode="rfc7489"
    )
    assert (c.policy, c.source) == ("none", "p")


def test_needs_existence_check_only_when_np_changes_things() -> None:
    r = rec("v=DMARC1; p=none; np=reject")
    assert dmarc.needs_existence_check(r, "example.test", "x.example.test")
    assert not dmarc.needs_existence_check(r, "example.test", "example.test")
    assert not dmarc.needs_existence_check(r, "example.test", "x.example.test", "rfc7489")
    same = rec("v=DMARC1; p=reject; np=reject")
    assert not dmarc.needs_existence_check(same, "example.test", "x.example.test")
    assert not dmarc.needs_existence_check(rec("v=DMARC1; p=reject"), "e.test", "x.e.test")


@pytest.mark.parametrize(
    ("policy", "lowered"), [("reject", "quarantine"), ("quarantine", "none"), ("none", "none")]
)
def test_testing_mode_lowers_one_level(policy: str, lowered: str) -> None:
    r = rec(f"v=DMARC1; p={policy}; t=y")
    c = dmarc.choose_policy(r, "example.test", "example.test")
    assert (c.policy, c.requested) == (policy, lowered)
    assert c.testing is (policy != "none")
    # t is not an RFC 7489 tag
    c7 = dmarc.choose_policy(r, "example.test", "example.test", mode="rfc7489")
    assert c7.requested == policy


def test_pct_is_ignored_in_rfc9989_mode() -> None:
    r = rec("v=DMARC1; p=reject; pct=0")
    assert dmarc.choose_policy(r, "e.test", "e.test", pct_draw=0.99).requested == "reject"


def test_pct_sampling_with_seeded_rng() -> None:
    r = rec("v=DMARC1; p=reject; pct=30")
    rng = random.Random(1234)
    outcomes = [
        dmarc.choose_policy(r, "e.test", "e.test", mode="rfc7489", pct_draw=rng.random())
        for _ in range(2000)
    ]
    applied = sum(c.requested == "reject" for c in outcomes)
    lowered = [c for c in outcomes if c.requested != "reject"]
    assert all(c.requested == "quarantine" and c.sampled_out for c in lowered)
    assert 500 < applied < 700  # about 30 % of 2000
    # Same seed, same decisions.
    rng2 = random.Random(1234)
    again = [
        dmarc.choose_policy(r, "e.test", "e.test", mode="rfc7489", pct_draw=rng2.random())
        for _ in range(2000)
    ]
    assert [c.requested for c in again] == [c.requested for c in outcomes]


def test_pct_edges() -> None:
    assert not dmarc.pct_selected(0, 0.0)
    assert dmarc.pct_selected(100, 0.999999)
    assert dmarc.pct_selected(50, 0.49) and not dmarc.pct_selected(50, 0.5)
    r = rec("v=DMARC1; p=quarantine; pct=0")
    c = dmarc.choose_policy(r, "e.test", "e.test", mode="rfc7489", pct_draw=0.0)
    assert c.requested == "none" and c.sampled_out


# -- outcome mapping -------------------------------------------------------------------------


def _plan(result: str, requested: str = "", **kw: bool) -> dmarc.Outcome:
    args = {
        "honor_reject": True,
        "honor_quarantine": True,
        "tempfail_on_temperror": True,
        "trusted_arc": False,
    }
    args.update(kw)
    return dmarc.plan(result, requested, **args)


def test_plan() -> None:
    assert _plan("pass", "reject") == dmarc.Outcome("DMARC_PASS", "", "none", "")
    assert _plan("none").symbol == "DMARC_NONE"
    assert _plan("permerror").symbol == "DMARC_PERMERROR"
    assert _plan("fail", "reject") == dmarc.Outcome("DMARC_REJECT", "reject", "reject", "")
    assert _plan("fail", "quarantine").action == "quarantine"
    assert _plan("fail", "none") == dmarc.Outcome("DMARC_POLICY_NONE", "", "none", "")
    assert _plan("fail", "reject", honor_reject=False).override == "local_policy"
    assert _plan("fail", "reject", honor_reject=False).action == ""
    assert _plan("fail", "quarantine", honor_quarantine=False).action == ""
    assert _plan("temperror").action == "tempfail"
    assert _plan("temperror", tempfail_on_temperror=False).action == ""
    over = _plan("fail", "reject", trusted_arc=True)
    assert over == dmarc.Outcome("ARC_TRUSTED_OVERRIDE", "", "none", "trusted_forwarder")
    assert _plan("fail", "none", trusted_arc=True).symbol == "DMARC_POLICY_NONE"
    sampled = dmarc.plan(
        "fail",
        "none",
        honor_reject=True,
        honor_quarantine=True,
        tempfail_on_temperror=True,
        trusted_arc=False,
        sampled_out=True,
    )
    assert sampled.override == "sampled_out"


# -- From header rules (RFC 9989 §5.3.1) -----------------------------------------------------


def _hdrs(*froms: str) -> list[tuple[bytes, bytes]]:
    out = [(b"to", b"To: bob@example.org\r\n")]
    out += [(b"from", f"From: {v}\r\n".encode()) for v in froms]
    return out


def test_one_from_one_address() -> None:
    a = dmarc.author_domain(_hdrs('"Alice" <alice@Sub.Example.TEST>'))
    assert (a.domain, a.error) == ("sub.example.test", "")


def test_display_name_that_looks_like_an_address_is_not_the_domain() -> None:
    a = dmarc.author_domain(_hdrs('"ceo@bank.test" <x@evil.test>'))
    assert a.domain == "evil.test"


def test_folded_from_and_unicode_domain() -> None:
    a = dmarc.author_domain([(b"from", "From: Alice\r\n <a@bücher.test>\r\n".encode())])
    assert a.domain == "xn--bcher-kva.test"


def test_several_addresses_same_domain_is_one_author_domain() -> None:
    a = dmarc.author_domain(_hdrs("a@example.test, B <b@EXAMPLE.test>"))
    assert a.domain == "example.test" and not a.error


@pytest.mark.parametrize(
    ("froms", "error"),
    [
        ((), "no From"),
        (("a@example.test", "b@example.test"), "2 From header fields"),
        (("a@example.test, b@other.test",), "2 domains"),
        (("undisclosed-recipients:;",), "no address"),
        (("alice",), "malformed From header field"),  # the parser flags the missing @
        (("a@[192.0.2.1]",), "no valid domain"),
    ],
)
def test_from_problems(froms: tuple[str, ...], error: str) -> None:
    a = dmarc.author_domain(_hdrs(*froms))
    assert a.domain == ""
    assert error in a.error


@pytest.mark.parametrize(
    ("value", "domains"),
    [
        ("a@example.org <ceo@example.test>", ("example.org", "example.test")),
        ("a@example.org;ceo@example.test", ("example.org", "example.test")),
        ("a@x.org b@y.org", ("x.org", "y.org")),
        ("foo <a@b.org>bar", ("b.org",)),
        ("j@@example.org", ("example.org",)),
        ("Name <a@x.test> <b@Y.test>", ("x.test", "y.test")),
        ("a@X.test x <b@x.TEST>", ("x.test",)),
        ("a@ example.org <b@c.org>", ("example.org", "c.org")),
    ],
)
def test_malformed_from_has_no_author_domain_but_lists_every_domain(
    value: str, domains: tuple[str, ...]
) -> None:
    """RFC 9989 §4.4: no alignment with a malformed From. The stdlib parser would hand
    back the first address (a@example.org) and drop the real author (ceo@example.test)."""
    a = dmarc.author_domain(_hdrs(value))
    assert (a.domain, a.error, a.domains) == ("", "malformed From header field", domains)


@pytest.mark.parametrize(
    ("value", "domain"),
    [("J. Doe (x) <j@example.org>", "example.org"), ("J. Doe <j@Example.org>", "example.org")],
)
def test_obsolete_syntax_is_not_malformed(value: str, domain: str) -> None:
    """An ObsoleteHeaderDefect (a period in the phrase) is legal RFC 5322 obs- syntax."""
    a = dmarc.author_domain(_hdrs(value))
    assert (a.domain, a.error) == (domain, "")


def test_malformed_field_among_several_from_fields_lists_its_domains() -> None:
    a = dmarc.author_domain(_hdrs("a@x.test", "b@y.test <c@z.test>"))
    assert a.error == "2 From header fields"
    assert a.domains == ("x.test", "y.test", "z.test")


def test_author_domain_cap_is_ten() -> None:
    """RFC 9989 §11.5: limit the Author Domains processed (the check applies it)."""
    assert dmarc.MAX_AUTHOR_DOMAINS == 10


def test_several_domains_are_listed() -> None:
    a = dmarc.author_domain(_hdrs("a@example.test, b@other.test"))
    assert a.domains == ("example.test", "other.test")


@pytest.mark.parametrize(
    "value",
    [
        "a@Example.ORG",
        "Bench User <bench@sender.test>",
        '"Doe, John" <j@x.test>',
        "=?utf-8?q?J=C3=B6?= <j@ex.test>",
        "j@x.test (comment)",
        "a@x.test, b@y.test",
        "<j@sub.example.test>",
        "Name <a@x.test> <b@y.test>",
        "undisclosed-recipients:;",
    ],
)
def test_author_domain_fast_path_agrees_with_the_stdlib_parser(value: str) -> None:
    """The regex shortcut must never change the answer the full parser gives."""
    import email.policy

    from filter.dmarc import _SIMPLE_FROM

    got = dmarc.author_domain([(b"from", f"From: {value}\r\n".encode())])
    try:
        parsed = email.policy.default.header_factory("From", value)
        domains = sorted({a.domain.lower() for a in parsed.addresses if a.domain})
    except Exception:
        domains = []
    if _SIMPLE_FROM.match(value):
        assert got.domain  # the shortcut only takes forms with one clear domain
    if got.domain:
        assert [got.domain] == domains
