"""The DKIM check's work done once instead of twice, and dkimpy steps fed what the check
already has; each shortcut beside the slower path it replaces, compared on many inputs.

- A signature's tag list is parsed once (folded, as dkimpy parses it); the unfolded
  tags mailgate's rules read are derived from it (``parse_signature_tags``), and the
  verifier gets the folded parse instead of parsing the field again.
- dkimpy's header list taken from the session's ``split_fields`` (``header_fields``).
"""

from __future__ import annotations

import random

import dkim
import pytest

from filter.checks.dkim import _b_value, _describe, _Verifier, _verify_all, signature_fields
from filter.dkimkeys import (
    DKIMPY_LOG,
    DKIMPY_PARSE_TAG_VALUE,
    KeyLookup,
    TagListError,
    _parsed_tags,
    header_fields,
    make_dnsfunc,
    parse_signature_tags,
    parse_tag_list,
    parse_tags,
    rfc822_parse,
)
from filter.headers import split_fields
from tests.rig.dkimkeys import rsa_dkim_key


def _reference_parse_tags(value: bytes) -> dict[str, bytes]:
    """``parse_tags`` as it was: unfold the whole value, then parse it."""
    try:
        raw = parse_tag_list(value.replace(b"\r\n", b"").replace(b"\n", b""))
    except dkim.util.InvalidTagValueList as e:
        raise TagListError(f"tag list syntax error: {e!s:.80}") from None
    return {k.decode("ascii", "replace"): v for k, v in raw.items()}


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except Exception as e:
        return (type(e), str(e))


# -- one tag-list parse --------------------------------------------------------------------
def test_unfolded_tags_derived_from_the_folded_parse_equal_parsing_unfolded() -> None:
    """Random tag lists over the characters that matter (line breaks anywhere, in names
    too); both halves of ``parse_signature_tags`` against the two parses they replace:
    mailgate's unfolded one (same tags, same error text) and dkimpy's own."""
    rnd = random.Random(2026_11_29)
    pieces = [b"v", b"=", b";", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\n", b"\r", b"\r\n"]
    pieces += [b"a", b"b", b"Z", b"9", b"_", b"-", b"b=QU\r\n JD", b"h=from :\r\n to", b"; "]
    pieces += [b"\xc3\xa9", b"\xff", b"d=a.test", b"=\r\n", b"a b", b"a\r\n b"]
    samples = [
        b" v=1; a=rsa-sha256; d=a.test; s=s;\r\n h=from:to; bh=AAAA;\r\n\tb=BB\r\n BB;",
        b"a\r\n b=1; a b=2",  # distinct names folded, duplicates once unfolded
        b"a\n b=1; a b=2",
        b"x=1;\r\n;y=2",  # an empty spec: the error names it as the unfolded parse does
        b"",
        b";",
    ]
    samples += [
        b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 24))) for _ in range(30000)
    ]
    derived = 0
    for sample in samples:
        _parsed_tags.cache_clear()
        expected = _outcome(_reference_parse_tags, sample)
        assert _outcome(parse_tags, sample) == expected, sample
        got = _outcome(parse_signature_tags, sample)
        if isinstance(expected, dict):
            assert isinstance(got, tuple), sample
            tags, folded = got
            assert tags == expected, sample
            dkimpys = _outcome(DKIMPY_PARSE_TAG_VALUE, sample)
            assert folded == (dkimpys if isinstance(dkimpys, dict) else None), sample
            derived += folded is not None
        else:
            assert got == expected, sample
    assert derived > 1000  # the derivation itself was exercised, not only the fallback
    with pytest.raises(TagListError, match="a b"):  # DuplicateTag names the tag
        parse_signature_tags(b"a\r\n b=1; a b=2")


def test_tags_are_fresh_dicts_on_every_call() -> None:
    value = b"v=1; d=a.test;\r\n s=s"
    tags, folded = parse_signature_tags(value)
    assert folded is not None
    tags["d"] = folded[b"d"] = b"changed"
    assert parse_signature_tags(value) == (
        {"v": b"1", "d": b"a.test", "s": b"s"},
        {
            b"v": b"1",
            b"d": b"a.test",
            b"s": b"s",
        },
    )


def test_b_value_kept_by_describe_is_b_value() -> None:
    """``run`` names signatures by ``SignatureResult.b_value`` instead of ``_b_value``."""
    rnd = random.Random(6008_2)
    pieces = [b"b=", b"b =", b" b=", b"QU", b"\r\n ", b"+/", b"=", b";", b" ", b"bh=AA", b"x"]
    for _ in range(20000):
        value = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 16)))
        sig = _describe(0, value)
        if sig.tags is not None:
            assert sig.b_value == _b_value(value), value
            assert sig.b == _b_value(value).decode("ascii", "replace")


# -- the verifier gets the check's parse ---------------------------------------------------
_MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: figures\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)


@pytest.fixture(scope="module")
def signed() -> tuple[bytes, dict[bytes, KeyLookup]]:
    pem, text_record = rsa_dkim_key(1024)
    record = text_record.encode()
    message = bytes(dkim.sign(_MESSAGE, b"sel", b"example.test", pem)) + _MESSAGE
    return message, {b"sel._domainkey.example.test": KeyLookup("ok", record)}


def test_verifier_uses_the_checks_parse_and_dkimpys_result_is_unchanged(
    signed: tuple[bytes, dict[bytes, KeyLookup]], monkeypatch: pytest.MonkeyPatch
) -> None:
    message, keys = signed
    block = message[: message.index(b"\r\n\r\n") + 2]
    (value,) = signature_fields(block)
    sig = _describe(0, value)
    assert sig.dkimpy_tags is not None and sig.dkimpy_tags[0] is value
    assert sig.dkimpy_tags[1] == DKIMPY_PARSE_TAG_VALUE(value)

    def no_parse(_: bytes) -> None:
        raise AssertionError("dkimpy parsed the signature again")

    monkeypatch.setattr(dkim, "parse_tag_value", no_parse)
    _verify_all(message, [sig], keys, 1024)
    assert (sig.result, sig.reason) == ("pass", "signature verified")
    assert sig.dkimpy_tags is None and sig.tags is None


def test_verifier_parses_itself_when_not_given_this_fields_parse(
    signed: tuple[bytes, dict[bytes, KeyLookup]],
) -> None:
    """A prepared parse of another value is not used (and is used only once)."""
    message, keys = signed
    verifier = _Verifier(message, logger=DKIMPY_LOG, minkey=1024)
    bogus = {b"v": b"1", b"a": b"rsa-sha256", b"d": b"x.test", b"s": b"x", b"h": b"from"}
    verifier.prepared = (b" v=1; d=x.test", dict(bogus, bh=b"AAAA", b=b"AAAA"))
    assert verifier.verify(idx=0, dnsfunc=make_dnsfunc(keys)) is True
    assert verifier.prepared is None and verifier.domain == b"example.test"


def test_header_fields_from_split_fields_equal_rfc822_parse() -> None:
    """Random header blocks; the reuse of ``split_fields`` must give ``rfc822_parse``'s
    list (or its error) exactly, and must be the path taken for ordinary blocks."""
    rnd = random.Random(5322_41)
    lines = [b"From: a@a.test", b"Subject: s", b" folded", b"\tfolded", b"X-Y :v", b"a:b"]
    lines += [b"no colon", b"From x", b"::", b"", b"DKIM-Signature: v=1;", b"Fr\xc3\xa9: x"]
    breaks = [b"\r\n"] * 8 + [b"\n", b"\r", b""]
    samples = [b"", b"From: a@a.test\r\n", b"From: a\r\n b\r\nTo: c\r\n"]
    for _ in range(20000):
        k = rnd.randint(0, 6)
        samples.append(b"".join(rnd.choice(lines) + rnd.choice(breaks) for _ in range(k)))
    fast = 0
    for block in samples:
        expected = _outcome(lambda b: rfc822_parse(b + b"\r\n")[0], block)
        got = _outcome(header_fields, block, list(split_fields(block)))
        assert got == expected, block
        assert _outcome(header_fields, block) == expected, block
        if block.endswith(b"\r\n") and block.count(b"\n") == block.count(b"\r\n"):
            fast += isinstance(expected, list)
    assert fast > 2000


def test_header_fields_take_the_split_without_parsing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = b"From : a@a.test\r\nDKIM-Signature: v=1;\r\n\td=a.test\r\nSubject: s\r\n"
    fields = list(split_fields(block))
    expected = rfc822_parse(block + b"\r\n")[0]
    monkeypatch.setattr("filter.dkimkeys.rfc822_parse", None)  # would raise if called
    assert header_fields(block, fields) == expected
    assert expected[0] == [b"From ", b" a@a.test\r\n"]
