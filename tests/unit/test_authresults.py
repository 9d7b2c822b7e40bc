"""Authentication-Results: built to RFC 8601 from check data; forged copies recognised."""

from __future__ import annotations

import re

import authres
import pytest

from filter.authresults import build, claimed_authserv_id, is_forged, pvalue
from filter.results import CheckResult


def _parse(field: bytes) -> authres.AuthenticationResultsHeader:
    text = field.decode().replace("\r\n", "")
    return authres.AuthenticationResultsHeader.parse(text)


def test_full_header_parses_back_with_every_method() -> None:
    results = {
        "spf": CheckResult(
            "spf", "pass", data={"identity": "mailfrom", "smtp.mailfrom": "alice@example.org"}
        ),
        "dkim": CheckResult(
            "dkim",
            "pass",
            data={
                "signatures": [
                    {"result": "pass", "d": "example.org", "s": "sel", "b": "ab/c+=xy"},
                    {"result": "fail", "d": "evil.example", "s": "k1", "b": "zzzzzzzz"},
                ]
            },
        ),
        "dmarc": CheckResult(
            "dmarc",
            "pass",
            data={"from_domain": "example.org", "policy": "reject", "requested": "reject"},
        ),
        "arc": CheckResult("arc", "none"),
    }
    field = build(results, "mx.example.net")
    assert field.endswith(b"\r\n")
    assert all(len(line) <= 998 for line in field.split(b"\r\n"))
    parsed = _parse(field)
    assert parsed.authserv_id == "mx.example.net"
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    text = field.decode()
    assert "smtp.mailfrom=alice@example.org" in text
    assert 'header.b="ab/c+=xy"' in text  # "/" "+" "=" are tspecials: quoted
    # the contract's order: header.d and header.s first, header.from first
    assert "dkim=pass header.d=example.org header.s=sel header.b=" in text
    assert "dmarc=pass header.from=example.org policy.dmarc=reject" in text


def test_policy_dmarc_is_the_policy_applied_not_the_one_published() -> None:
    """RFC 7489 11.2: policy.dmarc is evaluated "after policy options including pct:
    and sp: have been processed" (t=y in RFC 9989); the check's ``requested``."""
    data = {"from_domain": "example.org", "policy": "reject", "requested": "quarantine"}
    field = build({"dmarc": CheckResult("dmarc", "fail", data=data)}, "mx")
    assert b"dmarc=fail header.from=example.org policy.dmarc=quarantine\r\n" in field
    no_record = {"from_domain": "example.org", "policy": "", "requested": ""}
    field = build({"dmarc": CheckResult("dmarc", "none", data=no_record)}, "mx")
    assert b"policy.dmarc" not in field


def test_dkim_signature_from_a_testing_key_is_marked() -> None:
    """RFC 6376 3.6.1: the check scores a t=y signature as unsigned; its clause stays
    (the signer is testing) with a comment saying why it did not count."""
    sigs = [
        {"result": "fail", "d": "example.org", "s": "trial", "testing": True},
        {"result": "pass", "d": "example.org", "s": "prod", "testing": False},
    ]
    field = build({"dkim": CheckResult("dkim", "pass", data={"signatures": sigs})}, "mx")
    text = field.decode()
    assert "dkim=fail (key in testing mode) header.d=example.org header.s=trial;" in text
    assert "dkim=pass header.d=example.org header.s=prod\r\n" in text
    parsed = _parse(field)
    assert [(r.method, r.result) for r in parsed.results] == [("dkim", "fail"), ("dkim", "pass")]


def test_helo_identity_and_missing_methods() -> None:
    field = build(
        {"spf": CheckResult("spf", "none", data={"identity": "helo", "smtp.helo": "[192.0.2.1]"})},
        "mx",
    )
    assert b'spf=none smtp.helo="[192.0.2.1]"' in field
    assert b"dkim" not in field and b"dmarc" not in field


def test_nothing_ran_gives_none() -> None:
    assert build({}, "mx.example.net") == b"Authentication-Results: mx.example.net;\r\n\tnone\r\n"


def test_dkim_without_signatures() -> None:
    field = build({"dkim": CheckResult("dkim", "none", data={"signatures": []})}, "mx")
    assert b"dkim=none" in field


@pytest.mark.parametrize(
    ("raw", "claimed"),
    [
        (b"Authentication-Results: mx.example.net; spf=pass\r\n", "mx.example.net"),
        (b"Authentication-Results: MX.Example.NET; spf=pass\r\n", "mx.example.net"),
        (b"Authentication-Results: mx.example.net 1; spf=pass\r\n", "mx.example.net"),
        (b"Authentication-Results: (hi) mx.example.net; none\r\n", "mx.example.net"),
        (b"Authentication-Results:\r\n\tmx.example.net;\r\n\tdkim=pass\r\n", "mx.example.net"),
        (b"Authentication-Results: mx.example.net\r\n", "mx.example.net"),  # malformed still ours
        (b"Authentication-Results: other.example; spf=fail\r\n", "other.example"),
        (b"Authentication-Results: \r\n", ""),
        # RFC 8601: authserv-id is a value, so a quoted-string claims the same id
        (b'Authentication-Results: "mx.example.net"; spf=pass\r\n', "mx.example.net"),
        (b'Authentication-Results: "MX.example.net" 1; spf=pass\r\n', "mx.example.net"),
        (b'Authentication-Results: "mx.exa\\mple.net"; spf=pass\r\n', "mx.example.net"),
        (b"Authentication-Results: mx.example.net.; spf=pass\r\n", "mx.example.net"),
        (b"Authentication-Results: (a (nested) c) mx.example.net; none\r\n", "mx.example.net"),
        (b'Authentication-Results: "unterminated; spf=pass\r\n', "unterminated; spf=pass"),
    ],
)
def test_claimed_authserv_id(raw: bytes, claimed: str) -> None:
    assert claimed_authserv_id(raw) == claimed


def test_is_forged_only_for_our_id_and_the_right_field() -> None:
    ours = b"Authentication-Results: MX.EXAMPLE.NET; dmarc=pass\r\n"
    assert is_forged(b"authentication-results", ours, "mx.example.net")
    assert not is_forged(b"authentication-results", ours, "mx.other.net")
    assert not is_forged(b"x-authentication-results", ours, "mx.example.net")
    # A look-alike with our id as a suffix is not ours (and not removed).
    assert not is_forged(
        b"authentication-results",
        b"Authentication-Results: evil-mx.example.net; spf=pass\r\n",
        "mx.example.net",
    )


@pytest.mark.parametrize(
    "mail_from",
    [
        "x;dmarc=pass@evil.example",
        "a(b)@pass.test",
        'a"b@pass.test',
        "a,b@pass.test",
        "a[b]@pass.test",
        "a b@pass.test",
        "x@evil.example; dmarc=pass",
        "x@y@z",
        "@pass.test",
        "a..b@pass.test",
        "a@pass..test",
        "a\\b@pass.test",
        "a\tb@pass.test",
    ],
)
def test_sender_text_cannot_inject_into_our_header(mail_from: str) -> None:
    """Whatever a lenient MAIL FROM carries, our header parses back to exactly one SPF
    result whose smtp.mailfrom is the whole address, and no other method appears."""
    data = {"identity": "mailfrom", "smtp.mailfrom": mail_from}
    field = build({"spf": CheckResult("spf", "fail", data=data)}, "mx.example.net")
    parsed = _parse(field)
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "fail")]
    (prop,) = parsed.results[0].properties
    assert (prop.type, prop.name) == ("smtp", "mailfrom")
    assert _unquote(prop.value) == mail_from


def _unquote(value: str) -> str:
    """authres keeps quoted-pairs escaped in the values it parses."""
    return re.sub(r"\\(.)", r"\1", value)


@pytest.mark.parametrize(
    "value",
    ["alice@example.org", "a.b+tag@example.org", '"a;b"@example.org', "bo\u00fc@b\u00fccher.test"],
)
def test_valid_addresses_stay_bare(value: str) -> None:
    assert pvalue(value) == value


def test_helo_and_dkim_values_are_quoted_when_needed() -> None:
    """Signature tags and the HELO name are the sender's text too. (One property per
    clause here: authres's parser only takes a quoted value at the end of a clause.)"""
    helo = {"identity": "helo", "smtp.helo": "x@y z;dmarc=pass"}
    sigs = [{"result": "fail", "d": "a(b)@c"}, {"result": "fail", "s": "s;1"}]
    sigs.append({"result": "fail", "b": "ab@(x)"})
    field = build(
        {
            "spf": CheckResult("spf", "none", data=helo),
            "dkim": CheckResult("dkim", "fail", data={"signatures": sigs}),
        },
        "mx",
    )
    parsed = _parse(field)
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "none")] + [
        ("dkim", "fail")
    ] * 3
    values = [(p.type, p.name, p.value) for r in parsed.results for p in r.properties]
    assert values == [
        ("smtp", "helo", "x@y z;dmarc=pass"),
        ("header", "d", "a(b)@c"),
        ("header", "s", "s;1"),
        ("header", "b", "ab@(x)"),
    ]
    assert b'header.d="a(b)@c"' in field and b"dmarc=pass" not in field.replace(b"z;dmarc", b"")


@pytest.mark.parametrize(
    "raw",
    [
        b"Authentication-Results: =?utf-8?q?mx.example.net?=; dkim=pass\r\n",
        b"Authentication-Results: =?utf-8?b?bXguZXhhbXBsZS5uZXQ=?=; dkim=pass\r\n",
        b"Authentication-Results: mx.example.net\x00; dkim=pass\r\n",
        b"Authentication-Results: (x mx.example.net; dkim=pass\r\n",
        b'Authentication-Results: "x mx.example.net; dkim=pass\r\n',
    ],
)
def test_lenient_readings_of_a_malformed_id_count_as_ours(raw: bytes) -> None:
    """Encoded words, control characters and unbalanced comments or quotes: some
    parser reads our id there, so the field is removed."""
    assert is_forged(b"authentication-results", raw, "mx.example.net")


def test_a_foreign_field_that_mentions_our_id_in_a_comment_is_kept() -> None:
    raw = b"Authentication-Results: other.example (relayed by mx.example.net); spf=pass\r\n"
    assert not is_forged(b"authentication-results", raw, "mx.example.net")


# -- arc= (RFC 8617) -----------------------------------------------------------------------
def test_an_arc_temperror_is_written_fail_with_the_client() -> None:
    """RFC 8617 registers only none/pass/fail for arc= (the contract's words too): a
    chain whose keys could not be fetched is written fail. Not sealing it is the
    session's job (tests/integration/test_arc_seal_edges.py)."""
    arc = CheckResult("arc", "temperror", data={"cv": "fail", "remote_ip": "192.0.2.1"})
    field = build({"arc": arc}, "mx.example.net")
    assert b"arc=fail smtp.remote-ip=192.0.2.1\r\n" in field
    assert b"temperror" not in field
    assert [(r.method, r.result) for r in _parse(field).results] == [("arc", "fail")]


def test_arc_clause_names_the_client_and_the_oldest_passing_signature() -> None:
    """RFC 8617's registered arc properties: smtp.remote-ip (quoted when IPv6: ":" is
    no token character) and header.oldest-pass, left out when 0 (every AMS passes)."""
    data = {"remote_ip": "2001:db8::25", "oldest_pass": 2}
    field = build({"arc": CheckResult("arc", "pass", data=data)}, "mx.example.net")
    assert b'arc=pass header.oldest-pass=2 smtp.remote-ip="2001:db8::25"\r\n' in field
    (result,) = _parse(field).results
    props = {(p.type, p.name): p.value for p in result.properties}
    assert props == {("smtp", "remote-ip"): "2001:db8::25", ("header", "oldest-pass"): "2"}

    data = {"remote_ip": "192.0.2.1", "oldest_pass": 0}
    field = build({"arc": CheckResult("arc", "pass", data=data)}, "mx.example.net")
    assert field.endswith(b"\tarc=pass smtp.remote-ip=192.0.2.1\r\n")
    data = {"remote_ip": "192.0.2.1", "oldest_pass": 3}  # only a passing chain has one
    field = build({"arc": CheckResult("arc", "fail", data=data)}, "mx.example.net")
    assert field.endswith(b"\tarc=fail smtp.remote-ip=192.0.2.1\r\n")
    # No chain, no connection it arrived over: arc=none stays bare (as the contract shows).
    field = build({"arc": CheckResult("arc", "none", data=data)}, "mx.example.net")
    assert field.endswith(b"\tarc=none\r\n")


def test_internationalised_domains_are_written_as_a_labels() -> None:
    """U-labels (SMTPUTF8 mail) made authres's parser fail on our own field, and the
    ARC seal was skipped. Domains become A-labels; a non-ASCII local part, which has
    no ASCII form, is left out ("@domain" is an RFC 8601 pvalue)."""
    spf = {"identity": "mailfrom", "smtp.mailfrom": "alice@b\u00fccher.test"}
    sigs = [{"result": "pass", "d": "B\u00fccher.test", "s": "s\u00e9l"}]
    dmarc = {"from_domain": "b\u00fccher.test", "requested": "none"}
    field = build(
        {
            "spf": CheckResult("spf", "pass", data=spf),
            "dkim": CheckResult("dkim", "pass", data={"signatures": sigs}),
            "dmarc": CheckResult("dmarc", "pass", data=dmarc),
        },
        "mx.example.net",
    )
    assert field.isascii()
    text = field.decode()
    assert "spf=pass smtp.mailfrom=alice@xn--bcher-kva.test;" in text
    assert "dkim=pass header.d=xn--bcher-kva.test header.s=xn--sl-bja;" in text
    assert "dmarc=pass header.from=xn--bcher-kva.test policy.dmarc=none" in text
    assert [r.method for r in _parse(field).results] == ["spf", "dkim", "dmarc"]

    utf8_local = {
        "identity": "mailfrom",
        "smtp.mailfrom": "\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.test",
    }
    field = build({"spf": CheckResult("spf", "none", data=utf8_local)}, "mx")
    assert b"spf=none smtp.mailfrom=@xn--e1afmkfd.test\r\n" in field
    assert _parse(field).results[0].properties[0].value == "@xn--e1afmkfd.test"

    helo = {"identity": "helo", "smtp.helo": "mail.b\u00fccher.test"}
    field = build({"spf": CheckResult("spf", "none", data=helo)}, "mx")
    assert b"spf=none smtp.helo=mail.xn--bcher-kva.test\r\n" in field
    # Text IDNA refuses still cannot carry raw UTF-8: each such character is a "?".
    helo = {"identity": "helo", "smtp.helo": "\u00fc\u00fc..x"}
    field = build({"spf": CheckResult("spf", "none", data=helo)}, "mx")
    assert field.isascii() and b'smtp.helo="??..x"' in field


# -- the character classes written as ASCII complements (cheap to compile) ----------------
@pytest.mark.parametrize(
    ("name", "spelled_out"),
    [
        ("_ATEXT", r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"),
        ("_LETDIG", r"[A-Za-z0-9\x80-\U0010ffff]"),
        ("_LETDIG_DOT_HYPHEN", r"[A-Za-z0-9\x80-\U0010ffff.-]"),
    ],
)
def test_complement_classes_match_the_same_characters(name: str, spelled_out: str) -> None:
    from filter import authresults

    every_character = "".join(map(chr, range(0x110000)))
    written = getattr(authresults, name)
    assert re.sub(written, "", every_character) == re.sub(spelled_out, "", every_character)
