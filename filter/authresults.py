"""The Authentication-Results header (RFC 8601): build ours, recognise forged ones (L1).

Built with authres from the checks' ``data`` (keys documented in each check module),
so quoting follows RFC 8601's grammar. The field is pure ASCII: domain names in
A-labels (see :func:`ascii_domain`), so it parses everywhere, survives a downgrade
of an SMTPUTF8 message and can be sealed (ARC copies it into a signed field).
Incoming fields that claim our authserv-id (in any letter case) are forgeries from
outside our trust boundary and are removed before ours is added (RFC 8601 section 5).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from email.header import decode_header, make_header
from typing import Any

from authres import (
    AuthenticationResultProperty,
    AuthenticationResultsHeader,
    DKIMAuthenticationResult,
    NoneAuthenticationResult,
    SPFAuthenticationResult,
)
from authres.arc import ARCAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from filter.domains import to_a_label
from filter.headers import field_value
from filter.results import CheckResult

_COMMENT = re.compile(r"\([^()]*\)")
_QUOTED_ID = re.compile(r'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def build(results: Mapping[str, CheckResult], authserv_id: str) -> bytes:
    """The whole header field (CRLF-terminated), one result per method that ran."""
    out: list[Any] = []
    spf = results.get("spf")
    if spf is not None:
        d = spf.data
        if d.get("identity") == "helo":
            helo = _p(d, "smtp.helo", ascii_domain)
            out.append(SPFAuthenticationResult(result=spf.result, smtp_helo=helo))
        else:
            mailfrom = _p(d, "smtp.mailfrom", ascii_mailbox)
            out.append(SPFAuthenticationResult(result=spf.result, smtp_mailfrom=mailfrom))
    dkim = results.get("dkim")
    if dkim is not None:
        sigs = dkim.data.get("signatures") or []
        if not sigs:
            out.append(DKIMAuthenticationResult(result=dkim.result))
        for sig in sigs:  # type: ignore[attr-defined]
            # Properties in the contract's order (header.d, header.s), then header.b.
            props = [
                AuthenticationResultProperty("header", tag, _p(sig, tag, ascii_domain))
                for tag in ("d", "s")
                if sig.get(tag)
            ]
            if sig.get("b"):
                props.append(AuthenticationResultProperty("header", "b", _p(sig, "b")))
            # A key in testing mode (t=y) keeps its clause for the signer's tracking, but
            # the check scored it as unsigned (RFC 6376 3.6.1); the comment says why.
            comment = "key in testing mode" if sig.get("testing") is True else None
            out.append(
                DKIMAuthenticationResult(
                    result=sig.get("result", dkim.result),
                    result_comment=comment,
                    properties=props,
                )
            )
    dmarc = results.get("dmarc")
    if dmarc is not None:
        d = dmarc.data
        props = []  # header.from first, as the contract shows it
        if d.get("from_domain"):
            from_domain = _p(d, "from_domain", ascii_domain)
            props.append(AuthenticationResultProperty("header", "from", from_domain))
        # policy.dmarc is the policy applied after sp/np and t=y or pct (RFC 7489 11.2:
        # "after policy options including pct: and sp: have been processed"): the
        # check's "requested", not the published "policy".
        applied = d.get("requested")
        if applied:
            props.append(AuthenticationResultProperty("policy", "dmarc", _p(d, "requested")))
        out.append(DMARCAuthenticationResult(result=dmarc.result, properties=props))
    arc = results.get("arc")
    if arc is not None:
        out.append(_arc_result(arc))
    if not out:
        out.append(NoneAuthenticationResult())
    # One result per line: folded here between the clauses authres renders, never
    # inside one (a quoted value may itself contain "; ").
    name = AuthenticationResultsHeader.HEADER_FIELD_NAME
    clauses = ";\r\n\t".join(str(r) for r in out)
    return f"{name}: {authserv_id.lower()};\r\n\t{clauses}\r\n".encode()


def _arc_result(arc: CheckResult) -> ARCAuthenticationResult:
    """The arc= clause, with RFC 8617's registered properties where they apply.

    The word: RFC 8617 registers only none, pass and fail for arc= (and the contract
    fixes ``arc=pass|fail|none``), so a chain that could not be validated because of
    DNS trouble is written ``fail``, as its cv= would be; the check's ``temperror``
    stays in its data and log line. Such a message gets no ARC set of ours: a
    cv=fail seal would end a chain that may validate for every later hop (the
    session declines to seal it, see ``Session._arc_seal``).

    ``smtp.remote-ip`` (the client that handed us the chain) whenever there was a
    chain to judge, and ``header.oldest-pass`` when the chain passes though not every
    ARC-Message-Signature validates (0, all of them, is left out).
    """
    word = arc.result if arc.result in ("none", "pass", "fail") else "fail"
    d = arc.data
    props = []
    oldest = d.get("oldest_pass")
    if word == "pass" and isinstance(oldest, int) and oldest > 0:
        props.append(AuthenticationResultProperty("header", "oldest-pass", str(oldest)))
    # Last: an IPv6 address is quoted, and authres's parser (dkimpy's too) keeps a
    # quoted value only at the end of its clause.
    if word != "none" and d.get("remote_ip"):
        props.append(AuthenticationResultProperty("smtp", "remote-ip", _p(d, "remote_ip")))
    return ARCAuthenticationResult(result=word, properties=props)


def _p(data: Mapping[str, object], key: str, form: Callable[[str], str] | None = None) -> str:
    """``data[key]`` as a pvalue, first put in its ASCII ``form`` ('' when empty)."""
    value = data.get(key)
    if not value:
        return ""
    text = str(value)
    return pvalue(form(text) if form is not None else _ascii(text))


def _ascii(text: str) -> str:
    """``text`` with each non-ASCII character as "?": a value nothing better fits.

    "?" is an RFC 2045 tspecial, so the value is then always written quoted.
    """
    return text if text.isascii() else "".join(c if c.isascii() else "?" for c in text)


def ascii_domain(name: str) -> str:
    """A domain value (header.d, header.from, smtp.helo) in A-labels (IDNA 2008).

    A U-label made authres's parser fail on our own field (RFC 8601's grammar is
    ASCII; UTF-8 values exist only under RFC 6532), which skipped the ARC seal. An
    ASCII value is left alone (address literals, HELO text that is no domain);
    non-ASCII text that IDNA refuses gets "?" for each such character.
    """
    if name.isascii():
        return name
    a_label = to_a_label(name)
    return a_label if a_label is not None else _ascii(name)


def ascii_mailbox(address: str) -> str:
    """smtp.mailfrom in ASCII: the domain as an A-label, the local part kept if ASCII.

    A non-ASCII (SMTPUTF8) local part has no ASCII form. RFC 8601 would take it only
    as UTF-8 in a quoted-string under RFC 6532: valid in this SMTPUTF8 message, but
    it breaks parsers and any downgrade, and ARC signs it in for good. The safe
    choice is to leave it out: ``@<a-label domain>``, which RFC 8601's pvalue
    (``[ [ local-part ] "@" ] domain-name``) allows; SPF and DMARC judge the domain.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return ascii_domain(address)
    return f"{local if local.isascii() else ''}@{ascii_domain(domain)}"


# The classes below reach U+10FFFF, so they are written as their ASCII complements:
# the same characters, but compiled in microseconds instead of milliseconds at every
# start (tests/unit/test_authresults.py compares them with the spelled-out sets).
# RFC 5322 atext, plus any non-ASCII character (RFC 6532: UTF-8 in SMTPUTF8 mail):
# [A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff].
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[\t\x20-\x7e])*"')
_LETDIG = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"  # [A-Za-z0-9\x80-\U0010ffff]
_LETDIG_DOT_HYPHEN = r"[^\x00-\x2c\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"  # and "." and "-"
_DOMAIN = re.compile(rf"{_LETDIG}(?:{_LETDIG_DOT_HYPHEN}*{_LETDIG})?")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def pvalue(text: str) -> str:
    """``text`` as an RFC 8601 pvalue that cannot break out of its property.

    Why by hand: authres quotes a value that is not a token, except any value with
    an "@", which it writes as it is, assuming a valid address. A MAIL FROM such as
    ``<x;dmarc=pass@evil.example>`` (which lenient parsers accept) would then inject
    a result into our own trusted header. So a value with an "@" stays bare only when
    it is ``[local-part] "@" domain-name`` with a dot-atom or quoted-string local part;
    anything else becomes one quoted-string (which authres also leaves alone, it
    contains an "@"). Values without "@" are left to authres's own quoting.
    """
    if "@" not in text:
        return text
    local, _, domain = text.rpartition("@")
    # RFC 8601's pvalue is [ [ local-part ] "@" ] domain-name: "@domain" is one too.
    local_ok = not local or _DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)
    if local_ok and _DOMAIN.fullmatch(domain) and ".." not in domain:
        return text
    escaped = _CONTROL.sub("?", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def claimed_authserv_id(raw_field: bytes) -> str:
    """The authserv-id an incoming A-R field claims, normalised ('' if none found).

    Parsed leniently by hand: a forged header need not be valid to be dangerous.
    RFC 8601's authserv-id is a ``value``, so a quoted-string (``"mx.example.net"``)
    claims the same id as the bare token; a trailing dot names the same host too.
    Normalised: unquoted, lower-cased, trailing dots removed.
    """
    value = field_value(raw_field)
    while True:  # comments nest (RFC 5322 3.2.2): strip the innermost until none is left
        value, found = _COMMENT.subn(" ", value)
        if not found:
            break
    value = value.strip()
    if value.startswith('"'):
        m = _QUOTED_ID.match(value)
        claimed = _QUOTED_PAIR.sub(r"\1", m.group(1)) if m else value[1:].split('"')[0]
    else:
        first = value.split(";", 1)[0].strip()
        claimed = first.split()[0] if first else ""
    return claimed.strip().lower().rstrip(".")


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded (not allowed in an authserv-id, RFC 2047 5, but
    some parsers decode them anyway, so ``=?utf-8?q?mx.example.net?=`` claims our id)."""

    def one(m: re.Match[str]) -> str:
        try:
            return str(make_header(decode_header(m.group(0))))
        except (ValueError, LookupError):  # a malformed word: leave it as it is
            return m.group(0)

    return _ENCODED_WORD.sub(one, text)


def claimed_ids(raw_field: bytes) -> set[str]:
    """Every authserv-id a lenient reader could take an incoming A-R field to claim.

    The strict reading (:func:`claimed_authserv_id`), of the field with encoded words
    decoded and control characters as spaces; when the part before the first ";" is
    malformed (an unbalanced parenthesis or quote), also every word in it, since
    parsers disagree on where such a comment or string ends.
    """
    value = _CONTROL_CHARS.sub(" ", _decode_words(field_value(raw_field)))
    ids = {claimed_authserv_id(b"x:" + value.encode("utf-8", "replace"))}
    head = value.split(";", 1)[0]
    if head.count("(") != head.count(")") or head.count('"') % 2:
        words = re.split(r'[\s()"\\]+', head)
        ids.update(w.lower().rstrip(".") for w in words if w)
    ids.discard("")
    return ids


def is_forged(name: bytes, raw_field: bytes, authserv_id: str) -> bool:
    """True for an Authentication-Results field that claims to be ours."""
    if name != b"authentication-results":
        return False
    return authserv_id.lower().rstrip(".") in claimed_ids(raw_field)
