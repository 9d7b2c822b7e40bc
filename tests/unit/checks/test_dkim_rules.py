"""The DKIM/ARC rules mailgate enforces itself, because dkimpy does not (pure parts).

Key records, signature tags, the overall result and the ``dnsfunc`` seam are tested
without DNS or crypto; tests/integration/test_check_dkim.py runs them end to end.
"""

from __future__ import annotations

import base64
import random
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from filter.checks.arc import ARCSealError, authserv_id, seal
from filter.checks.dkim import (
    SignatureResult,
    _b_value,
    _body_if_crlf,
    _describe,
    b_prefixes,
    check_key,
    check_signature_tags,
    overall_result,
    parse_header,
    signature_fields,
)
from filter.dkimkeys import (
    DKIMPY_EVALUATE_PK,
    DKIMPY_PARSE_TAG_VALUE,
    DKIMPY_RE_BTAG,
    DKIMPY_RELAXED_HEADERS,
    DKIMPY_RFC822_PARSE,
    DKIMPY_SELECT_HEADERS,
    RE_BTAG,
    KeyLookup,
    KeyRecordError,
    KeyTempError,
    TagListError,
    field_name,
    key_name,
    make_dnsfunc,
    parse_key_record,
    parse_tags,
    relaxed_headers,
    rfc822_parse,
    select_headers,
    select_record,
)
from filter.policy.schema import ARCPolicy

NOW = 1_700_000_000


def rsa_p(bits: int) -> bytes:
    """base64 SubjectPublicKeyInfo of a fresh RSA key, as a key record's p= carries it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der)


@pytest.fixture(scope="module")
def p1024() -> bytes:
    return rsa_p(1024)


def sig_tags(**over: bytes) -> dict[str, bytes]:
    tags = {
        "v": b"1",
        "a": b"rsa-sha256",
        "d": b"example.test",
        "s": b"sel",
        "h": b"from : to : subject",
        "bh": b"AAAA",
        "b": b"AAAA",
    }
    tags.update(over)
    return {k: v for k, v in tags.items() if v != b"<del>"}


# -- key records ---------------------------------------------------------------------------
def test_rsa_key_record_bits_and_defaults(p1024: bytes) -> None:
    key = parse_key_record(b"v=DKIM1; k=rsa; p=" + p1024)
    assert (key.key_type, key.bits, key.revoked, key.testing) == ("rsa", 1024, False, False)
    assert key.hashes is None and key.allows_hash("sha256") and key.for_email


def test_rsa_key_with_whitespace_in_p_and_no_k(p1024: bytes) -> None:
    spaced = b" ".join(p1024[i : i + 60] for i in range(0, len(p1024), 60))
    key = parse_key_record(b"p=" + spaced)
    assert key.key_type == "rsa" and key.bits == 1024


def test_bare_rsapublickey_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    assert parse_key_record(b"p=" + base64.b64encode(der)).bits == 1024


def test_ed25519_key_record() -> None:
    key = parse_key_record(b"v=DKIM1; k=ed25519; p=" + base64.b64encode(b"\x01" * 32))
    assert (key.key_type, key.bits) == ("ed25519", 256)


def test_revoked_key_parses_as_revoked() -> None:
    key = parse_key_record(b"v=DKIM1; k=rsa; p=")
    assert key.revoked and key.bits == 0


def test_key_tags_h_s_t(p1024: bytes) -> None:
    key = parse_key_record(b"h=sha1; s=tlsrpt; t=y:s; p=" + p1024)
    assert not key.allows_hash("sha256") and not key.for_email
    assert key.testing and key.strict_identity
    assert parse_key_record(b"h=sha1:SHA256; s=email:*; p=" + p1024).allows_hash("sha256")


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        (b"v=DKIM2; p=AAAA", "DKIM1"),
        (b"v=DKIM1; k=rsa", "no p="),
        (b"k=dsa; p=AAAA", "unknown key type"),
        (b"p=!!!notbase64", "base64"),
        (b"p=" + base64.b64encode(b"not a key"), "does not parse"),
        (b"k=ed25519; p=" + base64.b64encode(b"short"), "not 32"),
        (b"p=AAAA; p=BBBB", "syntax"),
        (b"=x", "syntax"),
    ],
)
def test_bad_key_records(record: bytes, needle: str) -> None:
    with pytest.raises(KeyRecordError, match=needle):
        parse_key_record(record)


def test_select_record_skips_stray_txt(p1024: bytes) -> None:
    good = b"v=DKIM1; p=" + p1024
    assert select_record([b"google-site-verification=x", good]) == good
    assert select_record([b"junk"]) == b"junk"  # its error is then reported
    assert select_record([]) is None


def test_parse_tags_unfolds_and_rejects_garbage() -> None:
    assert parse_tags(b" v=1;\r\n\td=example.test ; s=sel;") == {
        "v": b"1",
        "d": b"example.test",
        "s": b"sel",
    }
    with pytest.raises(TagListError):
        parse_tags(b"v=1; v=1")


# -- signature tags ------------------------------------------------------------------------
def test_acceptable_signature_has_no_problem() -> None:
    assert check_signature_tags(sig_tags(), NOW) is None
    for q in (b"dns/txt", b"dns/txt:x-future", b"x-future : dns/txt"):
        assert check_signature_tags(sig_tags(q=q), NOW) is None
    assert check_signature_tags(sig_tags(i=b"@example.test"), NOW) is None
    assert (
        check_signature_tags(sig_tags(a=b"ed25519-sha256", i=b"u@mail.example.test"), NOW) is None
    )


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"a": b"rsa-sha1"}, "rsa-sha1"),
        ({"a": b"rsa-sha512"}, "unknown signature algorithm"),
        ({"h": b"to : subject"}, "From"),
        ({"bh": b"<del>"}, "no bh="),
        ({"v": b"2"}, "v="),
        ({"i": b"user@example.org"}, "i= domain"),
        ({"i": b"user@badexample.test"}, "i= domain"),
        ({"x": str(NOW - 1).encode()}, "expired"),
        ({"t": str(NOW).encode(), "x": str(NOW - 5).encode()}, "not later than t="),
        ({"t": str(NOW + 9).encode(), "x": str(NOW + 9).encode()}, "not later than t="),
        ({"x": b"soon"}, "decimal"),
        # RFC 6376 3.5: i= is [local-part] "@" domain; dkimpy raised IndexError.
        ({"i": b"example.test"}, '"@"'),
        ({"i": b"test"}, '"@"'),
        # q= is a colon-separated list that must hold dns/txt (case-sensitive, 3.2).
        ({"q": b"x-future"}, "dns/txt"),
        ({"q": b"DNS/TXT"}, "dns/txt"),
        ({"l": b"-1"}, "l="),
        # RFC 6376 3.5's digit limits; 5,000 digits made int() raise (a temperror).
        ({"l": b"9" * 77}, "at most 76 digits"),
        ({"l": b"9" * 5000}, "at most 76 digits"),
        ({"x": b"9" * 13}, "at most 12 digits"),
        ({"t": b"1" * 5000}, "at most 12 digits"),
    ],
)
def test_signature_problems(over: dict[str, bytes], needle: str) -> None:
    why = check_signature_tags(sig_tags(**over), NOW)
    assert why is not None and needle in why


def test_expiry_uses_the_given_clock_without_grace() -> None:
    tags = sig_tags(x=str(NOW + 10).encode())
    assert check_signature_tags(tags, NOW) is None
    assert check_signature_tags(tags, NOW + 11) is not None  # no 10 h slop as in dkimpy


# -- key versus signature ------------------------------------------------------------------
def test_check_key_rules(p1024: bytes) -> None:
    key = parse_key_record(b"p=" + p1024)
    assert check_key(sig_tags(), key, 1024) is None
    assert "shorter than 2048" in (check_key(sig_tags(), key, 2048) or "")
    assert "does not match" in (check_key(sig_tags(a=b"ed25519-sha256"), key, 1024) or "")
    revoked = parse_key_record(b"p=")
    assert "revoked" in (check_key(sig_tags(), revoked, 1024) or "")
    sha1_only = parse_key_record(b"h=sha1; p=" + p1024)
    assert "sha256" in (check_key(sig_tags(), sha1_only, 1024) or "")
    not_email = parse_key_record(b"s=tlsrpt; p=" + p1024)
    assert "email" in (check_key(sig_tags(), not_email, 1024) or "")


def test_check_key_strict_identity(p1024: bytes) -> None:
    strict = parse_key_record(b"t=s; p=" + p1024)
    assert check_key(sig_tags(i=b"@example.test"), strict, 1024) is None
    assert check_key(sig_tags(), strict, 1024) is None  # no i=: it defaults to @d=
    why = check_key(sig_tags(i=b"news@sub.example.test"), strict, 1024)
    assert why is not None and "t=s" in why
    loose = parse_key_record(b"p=" + p1024)
    assert check_key(sig_tags(i=b"news@sub.example.test"), loose, 1024) is None


# -- overall -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([], "none"),
        (["fail", "pass"], "pass"),
        (["permerror", "temperror", "fail"], "temperror"),
        (["permerror", "fail"], "fail"),
        (["permerror"], "permerror"),
    ],
)
def test_overall_result(words: list[str], expected: str) -> None:
    assert overall_result([SignatureResult(w) for w in words]) == expected


def test_overall_result_leaves_testing_mode_signatures_out() -> None:
    """RFC 6376 3.6.1: a key with t=y counts as no signature, verified or not."""
    trial_pass, trial_fail = (
        SignatureResult("pass", testing=True),
        SignatureResult("fail", testing=True),
    )
    assert overall_result([trial_pass]) == "none"
    assert overall_result([trial_fail]) == "none"
    assert overall_result([trial_pass, SignatureResult("fail")]) == "fail"
    assert overall_result([trial_fail, SignatureResult("pass")]) == "pass"


def test_signature_fields_are_in_dkimpy_index_order() -> None:
    block = (
        b"DKIM-Signature: v=1; d=a.test;\r\n\ts=one\r\n"
        b"From: a@a.test\r\n"
        b"dkim-signature: v=1; d=b.test; s=two\r\n"
    )
    values = signature_fields(block)
    assert [parse_tags(v)["d"] for v in values] == [b"a.test", b"b.test"]
    with pytest.raises(dkim.MessageFormatError):
        signature_fields(b"no colon on this line\r\n")


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@a.test\r\nSubject: x\r\n\r\nbody\r\n",
        b"From: a@a.test\r\n\r\nbody\r\n\r\n\r\n",  # trailing empty lines
        b"From: a@a.test\r\n\r\n",  # empty body
        b"From: a@a.test\r\n\r\nno final CRLF",
        b"From: a@a.test\r\nSubject: folded\r\n  line\r\n\r\n\r\nleading blank\r\n",
    ],
)
def test_header_and_body_reused_equal_dkimpys_own_parse(message: bytes) -> None:
    """The single-parse path hands dkimpy exactly what ``DKIM(message)`` would parse."""
    block = message[: message.index(b"\r\n\r\n") + 2]
    headers, body = dkim.rfc822_parse(message)
    assert parse_header(block) == headers
    assert _body_if_crlf(message, block) == body


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@a.test\r\n\r\nbare\nLF in the body\r\n",  # e.g. a replayed file
        b"From: a@a.test\r\nSubject: x\r\n",  # no blank line: the block is not followed by one
    ],
)
def test_body_is_not_guessed_unless_every_line_ends_in_crlf(message: bytes) -> None:
    block = message if b"\r\n\r\n" not in message else message[: message.index(b"\r\n\r\n") + 2]
    assert _body_if_crlf(message, block) is None


def test_faster_b_tag_pattern_blanks_exactly_what_dkimpys_own_does() -> None:
    """Random strings over the characters that matter, plus real signature fields."""
    rnd = random.Random(20261127)
    alphabet = [b";", b" ", b"\t", b"\r", b"\n", b"\r\n", b"b", b"=", b"a", b"Z", b"9"]
    alphabet += [b"+", b"/", b"h", b"x", b"-", b":", b"b="]
    samples = [
        b" v=1; a=rsa-sha256; d=a.test; s=s;\r\n bh=abc=; b=AbC+/\r\n\t dEf==\r\n",
        b"v=1; b= ; bh=x; b=\r\n",
        b"v=1; z=From:a b=c; b=QUJD",
    ]
    samples += [
        b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40))) for _ in range(30000)
    ]
    assert RE_BTAG is not DKIMPY_RE_BTAG and dkim.RE_BTAG is RE_BTAG
    for value in samples:
        assert RE_BTAG.sub(b"\\1", value) == DKIMPY_RE_BTAG.sub(b"\\1", value), value


def test_faster_relaxed_header_canonicalisation_equals_dkimpys_own() -> None:
    rnd = random.Random(2026_11_27)
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n ", b"a", b"B", b";", b"=", b"\x0b"]
    names = [b"From", b"SUBJECT ", b"x-Test\t", b"DKIM-Signature"]
    for _ in range(5000):
        headers = [
            [rnd.choice(names), b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 25)))]
            for _ in range(rnd.randint(0, 4))
        ]
        assert relaxed_headers(headers) == DKIMPY_RELAXED_HEADERS(headers), headers
    from dkim.canonicalization import Relaxed

    assert Relaxed.canonicalize_headers is relaxed_headers  # dkimpy uses ours


# The field name as dkimpy matches it, then the WSP it does not allow before the colon.
_OBS_LINE = re.compile(rb"([\x21-\x7e]+?)([ \t]*):")


def _dkimpy_parse_with_obsolete_names(sample: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's parser, plus RFC 5322 obs-optional names (WSP before the colon).

    The reference for ``rfc822_parse``: in header lines (up to the first empty line)
    the WSP before the colon is spelled ``~s``/``~t`` so dkimpy's pattern takes the
    field, then spelled back in the names. No fuzz piece contains "~".
    """
    lines = re.split(rb"(\r?\n)", sample)
    for k in range(0, len(lines), 2):
        if not lines[k]:
            break
        m = _OBS_LINE.match(lines[k])
        if m is not None and m.group(2):
            wsp = m.group(2).replace(b" ", b"~s").replace(b"\t", b"~t")
            lines[k] = m.group(1) + wsp + lines[k][m.end(2) :]
    headers, body = DKIMPY_RFC822_PARSE(b"".join(lines))
    for h in headers:
        h[0] = h[0].replace(b"~s", b" ").replace(b"~t", b"\t")
    return headers, body


def test_faster_header_parser_equals_dkimpys_own() -> None:
    """Random header blocks over the characters the parser decides on; dkimpy's own
    parser fails with IndexError on a leading continuation line, ours says why, and
    ours takes fields with whitespace before the colon (obsolete syntax), which
    dkimpy refuses."""
    rnd = random.Random(20261127)
    pieces = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"a", b"X-Y", b"\x7f", b"\xc3\xa9"]
    pieces += [b"From ", b"\r\n\r\n", b"Subject: s", b"\r\n ", b"=", b";"]
    pieces += [b" :", b"\t:", b"From :", b"X-Y \t :"]
    samples = [b"From: a@a.test\r\nSubject: x\r\n\r\nbody\r\n", b"", b"\r\n", b"a:b"]
    samples += [
        b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30))) for _ in range(20000)
    ]
    assert not any(b"~" in x for x in pieces)
    for sample in samples:
        try:
            expected: object = _dkimpy_parse_with_obsolete_names(sample)
        except IndexError:
            with pytest.raises(dkim.MessageFormatError, match="continuation"):
                rfc822_parse(sample)
            continue
        except dkim.MessageFormatError as e:
            expected = e
        try:
            got: object = rfc822_parse(sample)
        except dkim.MessageFormatError as e:
            got = e
        if isinstance(expected, Exception):
            assert isinstance(got, dkim.MessageFormatError), sample
            assert str(got) == str(expected)
        else:
            assert got == expected, sample
    assert dkim.rfc822_parse is rfc822_parse  # dkimpy uses ours


def test_header_parser_takes_whitespace_before_the_colon() -> None:
    """RFC 5322 4.1 obs-optional: ``X-Legacy : 1`` is a field; dkimpy refused the
    header (every signature a permerror). The name keeps the WSP for simple
    canonicalisation; ``field_name`` is the name compared."""
    block = b"X-Legacy : 1\r\nFrom\t: a@a.test\r\nSubject: s\r\n\r\nbody\r\n"
    with pytest.raises(dkim.MessageFormatError):
        DKIMPY_RFC822_PARSE(block)
    headers, body = rfc822_parse(block)
    assert headers == [
        [b"X-Legacy ", b" 1\r\n"],
        [b"From\t", b" a@a.test\r\n"],
        [b"Subject", b" s\r\n"],
    ]
    assert body == b"body\r\n"
    assert [field_name(h[0]) for h in headers] == [b"x-legacy", b"from", b"subject"]
    # Still no field: WSP inside a name, or no colon.
    for bad in (b"X Legacy: 1\r\n", b"X-Legacy \r\n", b"X-Legacy \t\r\n"):
        with pytest.raises(dkim.MessageFormatError):
            rfc822_parse(b"From: a@a.test\r\n" + bad)


def test_select_headers_ignores_whitespace_before_the_colon() -> None:
    """h= lists "from": ``From : x`` is the From it covers (dkimpy skipped it, so a
    signature over an absent From verified with this one added)."""
    headers = [[b"From ", b" a\r\n"], [b"Subject", b" s\r\n"], [b"FROM\t", b" b\r\n"]]
    assert select_headers(headers, [b"from", b"subject", b"from", b"from"]) == [
        headers[2],
        headers[1],
        headers[0],
    ]
    assert DKIMPY_SELECT_HEADERS(headers, [b"from"]) == []
    assert dkim.select_headers is select_headers  # dkimpy uses ours


def test_select_headers_equals_dkimpys_own_for_ordinary_names() -> None:
    rnd = random.Random(2026_11_28)
    names = [b"From", b"from", b"To", b"Subject", b"DKIM-Signature", b"X-A"]
    for _ in range(3000):
        headers = [[rnd.choice(names), b" v\r\n"] for _ in range(rnd.randint(0, 6))]
        want = [rnd.choice(names).lower() for _ in range(rnd.randint(0, 6))]
        assert select_headers(headers, want) == DKIMPY_SELECT_HEADERS(headers, want)


def test_faster_tag_list_parser_equals_dkimpys_own() -> None:
    rnd = random.Random(2026_11_27_3)
    pieces = [b"v", b"=", b";", b" ", b"\t", b"\r\n ", b"a", b"Z", b"9", b"_", b"-", b"1"]
    pieces += [b"b=QUJD", b"h=from:to", b"; ", b"==", b"\xc3\xa9", b"d=a.test"]
    samples = [b"v=1; a=rsa-sha256; d=a.test; s=s; h=from; bh=AAAA; b=BBBB;", b"", b";"]
    samples += [
        b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 24))) for _ in range(20000)
    ]
    for sample in samples:
        try:
            expected: object = DKIMPY_PARSE_TAG_VALUE(sample)
        except dkim.util.InvalidTagValueList as e:
            expected = (type(e), e.args)
        try:
            got: object = dkim.parse_tag_value(sample)
        except dkim.util.InvalidTagValueList as e:
            got = (type(e), e.args)
        assert got == expected, sample
    assert dkim.parse_tag_value is not DKIMPY_PARSE_TAG_VALUE  # dkimpy uses ours


def test_memoised_key_evaluation_gives_dkimpys_answer(p1024: bytes) -> None:
    name = b"s._domainkey.a.test."
    ed = b"k=ed25519; p=" + base64.b64encode(b"\x01" * 32)
    for record in (b"v=DKIM1; k=rsa; p=" + p1024, b"s=email; p=" + p1024, b"s=tlsrpt; p=" + p1024):
        assert dkim.evaluate_pk(name, record) == DKIMPY_EVALUATE_PK(name, record)
    assert dkim.evaluate_pk(name, ed)[1:] == DKIMPY_EVALUATE_PK(name, ed)[1:]
    assert dkim.evaluate_pk is not DKIMPY_EVALUATE_PK
    for bad in (b"v=DKIM1; k=rsa; p=AAAA", b"p=", b"", b"k=RSA; p=" + p1024):
        with pytest.raises(dkim.KeyFormatError):
            dkim.evaluate_pk(name, bad)


def test_key_evaluation_reads_s_as_a_list(p1024: bytes) -> None:
    """RFC 6376 3.6.1: s= is a colon-separated list; "*" or "email" in it serves
    email. dkimpy compared the whole value, so s=email:tlsrpt gave no key."""
    name = b"s._domainkey.a.test."
    assert DKIMPY_EVALUATE_PK(name, b"s=email:tlsrpt; p=" + p1024)[0] is None
    for services in (b"email:tlsrpt", b"tlsrpt : email", b"*:tlsrpt", b"email:x-future"):
        pk, bits, ktag, tlsrpt_only = dkim.evaluate_pk(name, b"s=" + services + b"; p=" + p1024)
        assert pk is not None and (bits, ktag, tlsrpt_only) == (1024, b"rsa", False), services
        assert parse_key_record(b"s=" + services + b"; p=" + p1024).for_email
    assert dkim.evaluate_pk(name, b"s=tlsrpt:x-future; p=" + p1024)[3] is True
    with pytest.raises(dkim.KeyFormatError, match="neither email nor tlsrpt"):
        dkim.evaluate_pk(name, b"s=x-future; p=" + p1024)
    assert not parse_key_record(b"s=tlsrpt; p=" + p1024).for_email


def test_key_type_is_case_sensitive(p1024: bytes) -> None:
    """RFC 6376 3.2: values are case-sensitive unless the tag says otherwise; k= does
    not, so "RSA" is an unknown key type (dkimpy refuses it as well). mailgate used
    to accept it, and dkimpy's refusal then read as a failed signature."""
    with pytest.raises(KeyRecordError, match="unknown key type k=RSA"):
        parse_key_record(b"k=RSA; p=" + p1024)
    with pytest.raises(dkim.KeyFormatError):
        DKIMPY_EVALUATE_PK(b"s._domainkey.a.test.", b"k=RSA; p=" + p1024)


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)])
    if n >= 128:
        length += n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _rsa_public_key_der(modulus: int, exponent: int) -> bytes:
    """A bare RSAPublicKey (which p= may carry), with numbers cryptography refuses."""
    ints = [_der(0x02, x.to_bytes(x.bit_length() // 8 + 1, "big")) for x in (modulus, exponent)]
    return _der(0x30, b"".join(ints))


def test_rsa_numbers_that_are_no_public_key_are_refused() -> None:
    """e=1 makes the padded digest itself a valid "signature"; an even exponent or
    one not below the modulus is no RSA key either (RFC 8017 3.1)."""
    n = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    modulus = n.public_numbers().n
    for m, e in ((modulus, 1), (modulus, 65536), (modulus, modulus + 2)):
        record = b"p=" + base64.b64encode(_rsa_public_key_der(m, e))
        with pytest.raises(KeyRecordError, match="not a usable RSA public key"):
            parse_key_record(record)
    assert (
        parse_key_record(b"p=" + base64.b64encode(_rsa_public_key_der(modulus, 65537))).bits == 1024
    )


# -- the dnsfunc seam ----------------------------------------------------------------------
def test_dnsfunc_answers_only_from_prefetched_keys() -> None:
    keys = {
        key_name(b"ok", b"Example.TEST"): KeyLookup("ok", b"p=AAAA"),
        key_name(b"gone", b"example.test"): KeyLookup("missing", reason="nx"),
        key_name(b"slow", b"example.test"): KeyLookup("temp", reason="timeout"),
    }
    fn = make_dnsfunc(keys)
    assert fn(b"ok._domainkey.example.test.", timeout=5) == b"p=AAAA"
    assert fn(b"gone._domainkey.example.test.") is None
    assert fn(b"never._domainkey.example.test.") is None
    with pytest.raises(KeyTempError, match="timeout"):
        fn(b"slow._domainkey.example.test.")
    assert not issubclass(KeyTempError, dkim.DKIMException)  # dkimpy must not swallow it
    vetoed = make_dnsfunc(keys, lambda name, rec: "refused")
    assert vetoed(b"ok._domainkey.example.test.") is None


# -- ARC sealing input ---------------------------------------------------------------------
def test_authserv_id_and_results() -> None:
    sid, results = authserv_id(
        b"Authentication-Results: mx.example.test;\r\n dkim=pass header.d=example.org; arc=none\r\n"
    )
    assert sid == "mx.example.test"
    assert results == [("dkim", "pass"), ("arc", "none")]
    with pytest.raises(ARCSealError):
        authserv_id(b"Authentication-Results: ;;;\r\n")


def test_seal_refuses_a_transient_arc_result() -> None:
    policy = ARCPolicy(
        seal=True, seal_domain="example.test", seal_selector="arc", seal_key_file="k"
    )
    ar = b"Authentication-Results: mx.example.test; arc=temperror\r\n"
    with pytest.raises(ARCSealError, match="pass, fail or none"):
        seal(b"From: a@example.org\r\n\r\nhi\r\n", ar, policy, b"unused")
    with pytest.raises(ARCSealError, match="required"):
        seal(b"From: a@example.org\r\n\r\nhi\r\n", ar, ARCPolicy(), b"unused")


def test_huge_length_is_described_not_raised() -> None:
    """A 5,000-digit l= raised ValueError in int(), turning DKIM into a temperror."""
    value = b"v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AA; b=AA; l=" + b"9" * 5000
    described = _describe(0, value)
    assert described.l is None
    why = check_signature_tags(described.tags, NOW)
    assert why is not None and "l=" in why


# -- header.b (RFC 6008) -------------------------------------------------------------------
def test_b_prefixes_are_unique_and_at_least_eight_characters() -> None:
    """RFC 6008 4: header.b is long enough to tell the message's signatures apart."""
    a = b"ABCDEFGHijklmnop"
    b = b"ABCDEFGHijkXmnop"
    c = b"ZZZZZZZZZZZZZZZZ"
    assert b_prefixes([a, b, c]) == ["ABCDEFGHijkl", "ABCDEFGHijkX", "ZZZZZZZZ"]
    assert b_prefixes([a]) == ["ABCDEFGH"]
    assert b_prefixes([a, b, a]) == ["ABCDEFGHijkl", "ABCDEFGHijkX", "ABCDEFGHijkl"]
    assert b_prefixes([a, a]) == ["ABCDEFGH", "ABCDEFGH"]  # a repeated field: no length helps
    assert b_prefixes([b"short", b"short+more"]) == ["short", "short+mo"]
    assert b_prefixes([]) == []


def test_b_prefixes_match_a_quadratic_reference() -> None:
    rnd = random.Random(6008)
    for _ in range(2000):
        values = [
            "".join(rnd.choice("ab") for _ in range(rnd.randint(0, 14))).encode()
            for _ in range(rnd.randint(1, 6))
        ]
        got = b_prefixes(values)
        for v, p in zip(values, got, strict=True):
            others = [o for o in values if o != v]
            n = 8
            while n < len(v) and any(o.startswith(v[:n]) for o in others):
                n += 1
            assert p == v[:n].decode(), (values, got)


def test_b_value_is_read_like_the_tag_list() -> None:
    value = b" v=1; bh=AAAA;\r\n b=ab/c\r\n +d=; d=x"
    assert _b_value(value) == parse_tags(value)["b"].replace(b"\r\n", b"").replace(b" ", b"")
    assert _b_value(b"v=1; bh=AAAA") == b""
