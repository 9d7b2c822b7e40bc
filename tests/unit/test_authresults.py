"""Authentication-Results: built to RFC 8601 from check data; forged copies recognised."""

from __future__ import annotations

import authres
import pytest

from filter.authresults import build, claimed_authserv_id, is_forged
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
            "dmarc", "pass", data={"from_domain": "example.org", "policy": "reject"}
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
    assert "header.d=example.org header.s=sel" in text
    assert "policy.dmarc=reject header.from=example.org" in text


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
