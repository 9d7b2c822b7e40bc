"""The Authentication-Results header (RFC 8601): build ours, recognise forged ones (L1).

Built with authres from the checks' ``data`` (keys documented in each check module),
so quoting follows RFC 8601's grammar. Incoming fields that claim our authserv-id
(in any letter case) are forgeries from outside our trust boundary and are removed
before ours is added (RFC 8601 section 5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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

from filter.headers import field_value
from filter.results import CheckResult

_COMMENT = re.compile(r"\([^()]*\)")


def build(results: Mapping[str, CheckResult], authserv_id: str) -> bytes:
    """The whole header field (CRLF-terminated), one result per method that ran."""
    out: list[Any] = []
    spf = results.get("spf")
    if spf is not None:
        d = spf.data
        if d.get("identity") == "helo":
            out.append(SPFAuthenticationResult(result=spf.result, smtp_helo=_s(d, "smtp.helo")))
        else:
            out.append(
                SPFAuthenticationResult(result=spf.result, smtp_mailfrom=_s(d, "smtp.mailfrom"))
            )
    dkim = results.get("dkim")
    if dkim is not None:
        sigs = dkim.data.get("signatures") or []
        if not sigs:
            out.append(DKIMAuthenticationResult(result=dkim.result))
        for sig in sigs:  # type: ignore[attr-defined]
            props = [AuthenticationResultProperty("header", "b", sig["b"])] if sig.get("b") else []
            out.append(
                DKIMAuthenticationResult(
                    result=sig.get("result", dkim.result),
                    header_d=sig.get("d") or None,
                    header_s=sig.get("s") or None,
                    properties=props,
                )
            )
    dmarc = results.get("dmarc")
    if dmarc is not None:
        d = dmarc.data
        props = []
        if d.get("policy"):
            props.append(AuthenticationResultProperty("policy", "dmarc", str(d["policy"])))
        out.append(
            DMARCAuthenticationResult(
                result=dmarc.result,
                header_from=_s(d, "from_domain") or None,
                properties=props,
            )
        )
    arc = results.get("arc")
    if arc is not None:
        # RFC 8617 registers only none/pass/fail for arc=; a chain that could not be
        # validated (DNS trouble) is reported as fail, as its cv would be.
        word = arc.result if arc.result in ("none", "pass", "fail") else "fail"
        out.append(ARCAuthenticationResult(result=word))
    if not out:
        out.append(NoneAuthenticationResult())
    header = AuthenticationResultsHeader(authserv_id=authserv_id, results=out)
    return _fold(str(header))


def _s(data: Mapping[str, object], key: str) -> str:
    value = data.get(key)
    return str(value) if value else ""


def _fold(text: str) -> bytes:
    """Fold between results (after each ';') so lines stay short."""
    name, _, value = text.partition(": ")
    parts = value.split("; ")
    return (name + ": " + ";\r\n\t".join(parts) + "\r\n").encode("utf-8")


def claimed_authserv_id(raw_field: bytes) -> str:
    """The authserv-id an incoming A-R field claims, lower-cased ('' if none found).

    Parsed leniently by hand: a forged header need not be valid to be dangerous.
    """
    value = _COMMENT.sub(" ", field_value(raw_field))
    first = value.split(";", 1)[0].strip()
    return first.split()[0].lower() if first else ""


def is_forged(name: bytes, raw_field: bytes, authserv_id: str) -> bool:
    """True for an Authentication-Results field that claims to be ours."""
    return name == b"authentication-results" and claimed_authserv_id(raw_field) == (
        authserv_id.lower()
    )
