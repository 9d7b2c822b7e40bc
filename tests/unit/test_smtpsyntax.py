"""SMTP command lines and MAIL/RCPT paths (RFC 5321 4.1)."""

from __future__ import annotations

import time

import pytest

from filter.smtpsyntax import (
    MAX_DOMAIN,
    MAX_PATH,
    Command,
    PathArg,
    SyntaxProblem,
    dsn_problem,
    is_domain_or_literal,
    parse_command,
    parse_path,
)


# -- parse_command ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "verb", "arg"),
    [
        (b"NOOP\r\n", "NOOP", ""),
        (b"noop\r\n", "NOOP", ""),
        (b"mail FROM:<a@example.org>\r\n", "MAIL", "FROM:<a@example.org>"),
        (b"Rcpt To:<b@example.org> NOTIFY=NEVER\r\n", "RCPT", "To:<b@example.org> NOTIFY=NEVER"),
        (b"EHLO   client.example.org  \r\n", "EHLO", "client.example.org"),
        (b"  helo x\r\n", "HELO", "x"),
        (b"QUIT\n", "QUIT", ""),  # a bare LF line ending is tolerated here
        (b"QUIT", "QUIT", ""),
        (b"HELO a\tb\r\n", "HELO", "a\tb"),  # HTAB is not a control character for this
        ("MAIL FROM:<jörg@exämple.org>\r\n".encode(), "MAIL", "FROM:<jörg@exämple.org>"),
        (b"\r\n", "", ""),
    ],
)
def test_parse_command(line: bytes, verb: str, arg: str) -> None:
    assert parse_command(line) == Command(verb, arg)


@pytest.mark.parametrize(
    "line",
    [
        b"NOOP\x00\r\n",
        b"MAIL FROM:<a\x00b@example.org>\r\n",
        b"HELO a\rb\r\n",  # bare CR inside the line
        b"HELO a\nb\r\n",
        b"NOOP\x7f\r\n",
        b"NOOP\x1b[31m\r\n",
        b"RSET\r\r\n",
    ],
)
def test_parse_command_refuses_control_characters(line: bytes) -> None:
    with pytest.raises(SyntaxProblem, match="control"):
        parse_command(line)


@pytest.mark.parametrize("line", [b"HELO \xff\r\n", b"MAIL FROM:<\xc3@x.org>\r\n", b"\x80\r\n"])
def test_parse_command_refuses_non_utf8(line: bytes) -> None:
    with pytest.raises(SyntaxProblem, match="UTF-8"):
        parse_command(line)


def test_syntax_problem_is_a_value_error() -> None:
    assert issubclass(SyntaxProblem, ValueError)


# -- parse_path ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arg", "keyword", "address", "params"),
    [
        ("FROM:<>", "FROM", "", {}),
        ("FROM:<a@example.org>", "FROM", "a@example.org", {}),
        ("from:<a@example.org>", "FROM", "a@example.org", {}),
        ("FROM: <a@example.org>", "FROM", "a@example.org", {}),  # space after the colon
        ("FROM:  <a@example.org>", "FROM", "a@example.org", {}),
        ("TO:<b@example.org>", "TO", "b@example.org", {}),
        ("TO:<postmaster>", "TO", "postmaster", {}),
        ("TO:<Postmaster@example.org>", "TO", "Postmaster@example.org", {}),
        ("FROM:a@example.org", "FROM", "a@example.org", {}),  # bare address, as Postfix
        ("FROM:a@example.org SIZE=10", "FROM", "a@example.org", {"SIZE": "10"}),
        ("FROM:<> BODY=8BITMIME", "FROM", "", {"BODY": "8BITMIME"}),
        (
            "FROM:<a@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8",
            "FROM",
            "a@example.org",
            {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None},
        ),
        ("FROM:<a@example.org>  size=5  ", "FROM", "a@example.org", {"SIZE": "5"}),
        (
            "TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.org",
            "TO",
            "b@example.org",
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b+40example.org"},
        ),
        ("TO:<@r1.example,@r2.example:c@example.org>", "TO", "c@example.org", {}),
        ("TO:<@r1.example:c@example.org>", "TO", "c@example.org", {}),
        ('FROM:<"john.doe."@example.org>', "FROM", '"john.doe."@example.org', {}),
        ('FROM:<"a@b"@example.org>', "FROM", '"a@b"@example.org', {}),
        ("FROM:<a@[192.0.2.1]>", "FROM", "a@[192.0.2.1]", {}),
        ("FROM:<a@[IPv6:2001:db8::1]>", "FROM", "a@[IPv6:2001:db8::1]", {}),
        ("FROM:<jörg@exämple.org> SMTPUTF8", "FROM", "jörg@exämple.org", {"SMTPUTF8": None}),
        ("FROM:<a@example.org.>", "FROM", "a@example.org.", {}),
    ],
)
def test_parse_path(arg: str, keyword: str, address: str, params: dict[str, str | None]) -> None:
    parsed = parse_path(arg, keyword)
    assert parsed.address == address
    assert parsed.params == params
    assert isinstance(parsed, PathArg)


def test_raw_params_keep_their_spelling() -> None:
    parsed = parse_path("FROM:<a@example.org> size=10 Body=7BIT X-Foo", "FROM")
    assert parsed.raw_params == ("size=10", "Body=7BIT", "X-Foo")
    assert parsed.params == {"SIZE": "10", "BODY": "7BIT", "X-FOO": None}


def _domain(length: int) -> str:
    """A syntactically valid domain of exactly ``length`` characters."""
    labels = []
    remaining = length
    while remaining > 0:
        n = min(63, remaining)
        if remaining - n == 1:  # avoid leaving a lone dot
            n -= 2
        labels.append("d" * n)
        remaining -= n + 1
    domain = ".".join(labels)
    assert len(domain) == length
    return domain


@pytest.mark.parametrize(
    ("arg", "keyword", "match"),
    [
        ("TO:<a@example.org>", "FROM", "FROM:"),
        ("FROM <a@example.org>", "FROM", "FROM:"),
        ("FROM:", "FROM", "enclosed"),
        ("FROM:a@example.org>", "FROM", "enclosed"),
        ("FROM:<a@example.org", "FROM", "missing >"),
        ("FROM:<a@example.org>x", "FROM", "garbage"),
        ("FROM:<a@example.org>SIZE=1", "FROM", "garbage"),
        ("FROM:<a@example.org>> SIZE=1", "FROM", "garbage"),
        ("FROM:<a b@example.org>", "FROM", "invalid characters"),
        ("FROM:<a\x01b@example.org>", "FROM", "invalid characters"),
        ("FROM:<a@example.org\r\nRSET>", "FROM", "invalid characters"),
        ("FROM:<a@exa_mple.org>", "FROM", "invalid domain"),
        ("FROM:<a@-example.org>", "FROM", "invalid domain"),
        ("FROM:<a@example..org>", "FROM", "invalid domain"),
        ("FROM:<a@[192.0.2.1>", "FROM", "invalid domain"),
        ('FROM:<"unterminated@example.org>', "FROM", "quoted"),
        ('FROM:<"a"b@example.org>', "FROM", "quoted"),
        ("FROM:<a@example.org> SIZE=1 SIZE=2", "FROM", "duplicate"),
        ("FROM:<a@example.org> SIZE=1 size=2", "FROM", "duplicate"),
        ("FROM:<a@example.org> SIZE=", "FROM", "malformed"),
        ("FROM:<a@example.org> =1", "FROM", "malformed"),
        ("FROM:<a@example.org> -X=1", "FROM", "malformed"),
        ("FROM:<a@example.org> X_Y=1", "FROM", "malformed"),
        ("FROM:<a@example.org> A=b=c", "FROM", "malformed"),
        ("FROM:<a@example.org> A=b\x00", "FROM", "malformed"),
        ("FROM:<a@example.org> A=\x7f", "FROM", "malformed"),
    ],
)
def test_parse_path_refuses(arg: str, keyword: str, match: str) -> None:
    with pytest.raises(SyntaxProblem, match=match):
        parse_path(arg, keyword)


# A VERP/SRS-style return path with an 80-octet local part (the audit's F4 example).
VERP_LOCAL = "bounces+" + "a1b2c3d4" * 9


@pytest.mark.parametrize("keyword", ["FROM", "TO"])
@pytest.mark.parametrize(
    "local",
    [
        VERP_LOCAL,
        "l" * 65,
        "l" * 200,
        '"' + "q" * 100 + '"',
        "é" * 33,  # 66 octets
        "SRS0=HHH=TT=example.com=" + "u" * 60,
    ],
)
def test_local_part_has_no_limit_of_its_own(keyword: str, local: str) -> None:
    """RFC 5321 4.5.3.1: 64 octets is a minimum to accept, not a maximum; real VERP, SRS
    and BATV return paths are longer, and Postfix takes them (was 501 "too long")."""
    assert len(VERP_LOCAL) == 80
    address = f"{local}@example.org"
    assert parse_path(f"{keyword}:<{address}>", keyword).address == address
    assert parse_path(f"{keyword}:{address}", keyword).address == address  # bare, as Postfix


def test_long_local_part_still_within_the_path_limit() -> None:
    # Without a local-part limit the path bound is what keeps the address short.
    domain = "example.org"
    local = "l" * (MAX_PATH - len(domain) - 3)
    assert len(f"<{local}@{domain}>") == MAX_PATH
    assert parse_path(f"FROM:<{local}@{domain}>", "FROM").address == f"{local}@{domain}"
    for path in (f"<{local}l@{domain}>", f'<"{local[1:]}"@{domain}>'):
        assert len(path) == MAX_PATH + 1
        with pytest.raises(SyntaxProblem, match="address too long"):
            parse_path(f"FROM:{path}", "FROM")


# -- quoted local parts: ">" is qtextSMTP (RFC 5321 4.1.2) ------------------------------------
@pytest.mark.parametrize(
    ("arg", "keyword", "address", "params"),
    [
        ('FROM:<"a>b"@example.org>', "FROM", '"a>b"@example.org', {}),
        ('TO:<"a>b"@example.org>', "TO", '"a>b"@example.org', {}),
        ('FROM:<"a>b"@example.org> SIZE=10', "FROM", '"a>b"@example.org', {"SIZE": "10"}),
        ('FROM: <"a>b"@example.org>  SIZE=10 ', "FROM", '"a>b"@example.org', {"SIZE": "10"}),
        ('FROM:<">"@example.org>', "FROM", '">"@example.org', {}),
        (
            'FROM:<">>>"@example.org> BODY=8BITMIME',
            "FROM",
            '">>>"@example.org',
            {"BODY": "8BITMIME"},
        ),
        ('FROM:<"john >doe"@example.org>', "FROM", '"john >doe"@example.org', {}),
        # quoted-pairSMTP: an escaped quote does not end the string, an escaped "\" does.
        ('FROM:<"a\\">b"@example.org>', "FROM", '"a\\">b"@example.org', {}),
        ('FROM:<"a\\\\"@example.org>', "FROM", '"a\\\\"@example.org', {}),
        ('FROM:<"a\\>b"@example.org>', "FROM", '"a\\>b"@example.org', {}),
        ('TO:<"a>b">', "TO", '"a>b"', {}),  # no domain, like <postmaster>
        ('TO:<@r1.example,@r2.example:"a>b"@example.org>', "TO", '"a>b"@example.org', {}),
        ('FROM:<"jö>rg"@exämple.org> SMTPUTF8', "FROM", '"jö>rg"@exämple.org', {"SMTPUTF8": None}),
        ('FROM:<"a"."b"@example.org>', "FROM", '"a"."b"@example.org', {}),  # as before
        ('FROM:<"a<b"@example.org>', "FROM", '"a<b"@example.org', {}),  # as before
    ],
)
def test_quoted_local_part_may_hold_gt(
    arg: str, keyword: str, address: str, params: dict[str, str | None]
) -> None:
    """The closing ">" is found outside quoted strings; the address is kept verbatim
    (quotes and escapes included) because it goes to the upstream as it came."""
    parsed = parse_path(arg, keyword)
    assert parsed.address == address
    assert parsed.params == params


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ('FROM:<"unterminated@example.org>', "unterminated quoted string"),
        ('FROM:<"unterminated@example.org> SIZE=1', "unterminated quoted string"),
        ('FROM:<"a>b@example.org>', "unterminated quoted string"),
        ('FROM:<"a\\">b@example.org>', "unterminated quoted string"),  # \" is data
        ('FROM:<"a\\"@example.org>', "unterminated quoted string"),
        ('FROM:<"a\\', "unterminated quoted string"),
        ('FROM:<"', "unterminated quoted string"),
        ('FROM:<a"b@example.org>', "unterminated quoted string"),
        ('FROM:<"a"b"@example.org>', "unterminated quoted string"),
        ('TO:<@r1.example:"a>b@example.org>', "unterminated quoted string"),
        # The string ends at the first unescaped quote; what follows must fit the path.
        ('FROM:<"a\\\\">b"@example.org>', "garbage"),
        ('FROM:<"a>b"@example.org>x', "garbage"),
        ('FROM:<"a>b"@example.org>SIZE=1', "garbage"),
        ('FROM:<"a>b"c@example.org>', "quoted"),
        ('FROM:<"a>b" c@example.org>', "invalid characters"),
        ('FROM:<"a>b"@exa>mple.org>', "garbage"),
    ],
)
def test_quoted_local_part_refusals(arg: str, match: str) -> None:
    with pytest.raises(SyntaxProblem, match=match):
        parse_path(arg, arg.partition(":")[0])


@pytest.mark.parametrize(
    "arg",
    [
        'FROM:<a"x>y"@example.org>',
        'FROM:<"a"b">"@example.org>',
        'FROM:<"a".">"@example.org>',
        # Postfix would end this path at the first ">" and read ENVID="@d> as a parameter:
        # mailgate must not judge the sender by a different (domain "d") address.
        'FROM:<"x"\\"> ENVID="@d>',
        'FROM:<"a"x"@z> ENVID=">',
    ],
)
def test_gt_only_inside_a_quoted_local_part(arg: str) -> None:
    """Elsewhere a ">" is where another parser would end the path (RFC 5321 4.1.2)."""
    with pytest.raises(SyntaxProblem, match=r"invalid characters|unterminated"):
        parse_path(arg, "FROM")


@pytest.mark.parametrize(
    "path",
    [
        '"' * 2030,
        '"' + "\\" * 2030,
        '"' + '\\"' * 1015,
        '""' * 1015,
        '""' * 1010 + '"abc',
        '"' + ">" * 2030,
        '">' * 1015,
        '"' + "\\>" * 600 + '"@x> ' + "A=1 " * 100,
    ],
)
def test_path_scan_is_linear(path: str) -> None:
    """Command lines full of quotes and backslashes cost one pass, not one per quote."""
    t0 = time.perf_counter()
    with pytest.raises(SyntaxProblem):
        parse_path(f"FROM:<{path}>", "FROM")  # a 2 KB command line at most
    with pytest.raises(SyntaxProblem):
        parse_path(f"FROM:<{path * 25}>", "FROM")  # 50 KB: quadratic would take seconds
    assert time.perf_counter() - t0 < 0.25


def test_domain_length() -> None:
    # Without brackets there is no path limit, so the domain limit shows on its own.
    assert parse_path(f"TO:a@{_domain(MAX_DOMAIN)}", "TO").address.endswith(_domain(MAX_DOMAIN))
    with pytest.raises(SyntaxProblem, match="invalid domain"):
        parse_path(f"TO:a@{_domain(MAX_DOMAIN + 1)}", "TO")


def test_path_length() -> None:
    # "<" + local + "@" + domain + ">" is the path, MAX_PATH octets at most.
    local = "l" * 60
    ok_domain = _domain(MAX_PATH - len(local) - 3)
    assert len(f"<{local}@{ok_domain}>") == MAX_PATH
    assert parse_path(f"TO:<{local}@{ok_domain}>", "TO").address == f"{local}@{ok_domain}"
    long_domain = _domain(MAX_PATH - len(local) - 2)
    with pytest.raises(SyntaxProblem, match="too long"):
        parse_path(f"TO:<{local}@{long_domain}>", "TO")


def test_source_route_stripped_before_checks() -> None:
    with pytest.raises(SyntaxProblem):
        parse_path("TO:<@r1.example:bad address@example.org>", "TO")


# -- is_domain_or_literal ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.org", True),
        ("localhost", True),
        ("example.org.", True),
        ("a-b.example", True),
        ("xn--bcher-kva.example", True),
        ("bücher.example", True),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("[IPv6:::1]", True),
        (_domain(MAX_DOMAIN), True),
        ("", False),
        (_domain(MAX_DOMAIN + 1), False),
        ("a b", False),
        ("under_score.example", False),
        ("-leading.example", False),
        ("trailing-.example", False),
        ("double..dot", False),
        (".leading.dot", False),
        ("[192.0.2.1", False),
        ("192.0.2.1]", False),
        ("[bogus]", False),
        ("host\x00.example", False),
        ("host\r\n.example", False),
        ("example.org\n", False),  # "$" would match before a trailing newline
        ("[192.0.2.1]\n", False),
    ],
)
def test_is_domain_or_literal(name: str, ok: bool) -> None:
    assert is_domain_or_literal(name) is ok


@pytest.mark.parametrize(
    "name",
    ["a" * 250 + "_", "a-" * 120 + "_", "a" + "-" * 250 + "_", "a." * 120 + "_", "é" * 250 + "!"],
)
def test_domain_regex_is_linear(name: str) -> None:
    # An ambiguous pattern took seconds (doubling per character) on ~25-character
    # non-matching HELO names, blocking the event loop: a one-line DoS.
    t0 = time.perf_counter()
    assert not is_domain_or_literal(name)
    with pytest.raises(SyntaxProblem):
        parse_path(f"FROM:a@{name}", "FROM")
    assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a(b@x.example> ENVID=)>",  # Postfix: a comment, queued as a@<its domain>
        'FROM:<a"b"c@example.org>',
        "FROM:<a\\b@example.org>",
        "FROM:<a,b@example.org>",
        "FROM:<a;b@example.org>",
        "FROM:<a[b]@example.org>",
    ],
)
def test_rfc822_specials_in_an_unquoted_local_part_are_refused(arg: str) -> None:
    """Not atext (RFC 5321 4.1.2); Postfix would read another envelope than the checks."""
    with pytest.raises(SyntaxProblem, match="local part"):
        parse_path(arg, "FROM")


@pytest.mark.parametrize(
    "arg",
    [
        'FROM:<"a(b),c;d"@example.org>',
        "FROM:<o'brien+x=y@example.org>",
        "FROM:<a{b}|~!#$%&*=?^`@x.org>",
    ],
)
def test_atext_and_quoted_specials_still_pass(arg: str) -> None:
    assert parse_path(arg, "FROM").address == arg[6:-1]


@pytest.mark.parametrize(
    ("key", "value", "smtputf8"),
    [
        ("RET", "FULL", False),
        ("RET", "hdrs", False),
        ("ENVID", "QQ314159+2B1", False),
        ("ENVID", "a+2bb", False),  # lower-case hex: lenient, as the meaning is the same
        ("NOTIFY", "NEVER", False),
        ("NOTIFY", "success,failure,DELAY", False),
        ("ORCPT", "rfc822;bob@example.test", False),
        ("ORCPT", "rfc822;b+2Bx@example.test", False),
        ("ORCPT", "utf-8;jos\u00e9@example.test", True),  # RFC 6533 with SMTPUTF8
    ],
)
def test_well_formed_dsn_parameters(key: str, value: str, smtputf8: bool) -> None:
    assert dsn_problem(key, value, smtputf8) is None


@pytest.mark.parametrize(
    ("key", "value", "smtputf8"),
    [
        ("RET", "ALL", False),
        ("ENVID", "caf\u00e9", False),  # 8-bit: not xtext
        ("ENVID", "a+2", False),  # a cut escape
        ("ENVID", "a=b", False),  # "=" must be encoded
        ("ENVID", "x" * 101, False),
        ("NOTIFY", "NEVER,SUCCESS", False),  # NEVER stands alone
        ("NOTIFY", "SOMETIMES", False),
        ("NOTIFY", "", False),
        ("ORCPT", "bob@example.test", False),  # no addr-type
        ("ORCPT", "rfc822;", False),
        ("ORCPT", "rfc822;jos\u00e9@example.test", False),  # UTF-8 without SMTPUTF8
    ],
)
def test_malformed_dsn_parameters_are_named(key: str, value: str, smtputf8: bool) -> None:
    problem = dsn_problem(key, value, smtputf8)
    assert problem is not None and key in problem


# -- the character classes written as complements (cheap to compile) ----------------------------
@pytest.mark.parametrize(
    ("name", "spelled_out"),
    [
        ("_LETDIG", r"[A-Za-z0-9\u0080-\U0010ffff]"),
        ("_LETDIG_HYPHEN", r"[A-Za-z0-9\u0080-\U0010ffff-]"),
        ("_VALUE", r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]"),
    ],
)
def test_complement_classes_match_the_same_characters(name: str, spelled_out: str) -> None:
    import re

    from filter import smtpsyntax

    value = getattr(smtpsyntax, name)
    cls = value.pattern[1:-2] if isinstance(value, re.Pattern) else value  # ^[...]+$
    every_character = "".join(map(chr, range(0x110000)))
    assert re.sub(cls, "", every_character) == re.sub(spelled_out, "", every_character)
