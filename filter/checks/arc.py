"""ARC (RFC 8617): verify an incoming chain, name its sealer, optionally seal our own.

Verification is dkimpy's ``arc_verify`` with its keys prefetched through the shared
resolver (``filter.dkimkeys``) and served by a ``dnsfunc`` that never touches DNS;
keys that mailgate's DKIM key rules refuse (revoked, not RSA, h= without sha256, s=
without email, shorter than ``[dkim] min_key_bits``) are withheld from dkimpy, so
the set they sign does not validate. Results:

- ``none``: no ARC header fields at all.
- ``pass``: dkimpy validated every set and the chain's cv= values.
- ``fail``: anything else, including a chain an earlier sealer already marked
  cv=fail (dkimpy returns "no result" for that; RFC 8617 5.2 makes it fail) and
  any ARC field whose instance is missing or outside 1..50 (RFC 8617 4.2.1; dkimpy
  enforces the limit only when sealing, and skips fields without a usable i=).
- ``temperror``: a key lookup timed out or failed temporarily. ``data["cv"]`` is
  then "fail" (the chain could not be validated) but the word says it may validate
  later; do not seal such a message (see ``seal``).

``data["trusted"]`` is True only when the chain passes and its latest sealer (d= of
the highest-instance ARC-Seal) is in ``[arc] trusted_sealers``: DMARC reads it to
let that sealer's chain override a reject or quarantine (RFC 7489 7.2 local policy).

Sealing: ``seal()`` wraps ``dkim.arc_sign`` (RSA only; see its docstring for the
exact input), ``seal_key()`` loads the configured key once per file version.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import authres
import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from filter.checks import Context
from filter.dkimkeys import (
    DKIMPY_LOG,
    KeyLookup,
    KeyRecordError,
    KeyTempError,
    TagListError,
    fetch_keys,
    key_name,
    make_dnsfunc,
    parse_key_record,
    parse_tags,
)
from filter.model import Stage
from filter.policy.schema import ARCPolicy
from filter.results import CheckResult, Symbol

__all__ = [
    "OFFLOAD_BYTES",
    "ARCCheck",
    "ARCSealError",
    "arc_headers",
    "authserv_id",
    "seal",
    "seal_key",
    "seal_message",
]

#: Messages larger than this are verified (and sealed by ``seal_message``) in a thread.
OFFLOAD_BYTES = 256 * 1024

_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_ARC_NAMES = {
    b"arc-seal": "ARC-Seal",
    b"arc-message-signature": "ARC-Message-Signature",
    b"arc-authentication-results": "ARC-Authentication-Results",
}

#: RFC 8617 4.2.1: instance tags run from 1 to 50.
MAX_INSTANCE = 50


class ARCSealError(Exception):
    """The message cannot be sealed (bad key, A-R header or chain state); relay unsealed."""


# -- verification ------------------------------------------------------------------------
_ARC_LINE = re.compile(rb"(?:^|\n)arc-", re.IGNORECASE)
# RFC 8617 4.1.1: an ARC-Authentication-Results value starts "i=<instance>;", then an
# A-R payload that is no tag-list. The value runs to the ";" or a comment.
_AAR_INSTANCE = re.compile(rb"\s*i\s*=([^;(]*)")


def arc_headers(header_block: bytes) -> list[tuple[bytes, dict[str, bytes]]]:
    """(lower-case name, tags) of every ARC field; unparsable ones get empty tags.

    An ARC-Authentication-Results field gets only its ``i`` tag: the rest of it is an
    Authentication-Results payload, not a tag-list.
    """
    if _ARC_LINE.search(header_block) is None:
        return []  # most mail has no ARC set: no line starts with "ARC-", nothing to parse
    headers, _ = dkim.rfc822_parse(header_block + b"\r\n")
    out: list[tuple[bytes, dict[str, bytes]]] = []
    for name, value in headers:
        lname = bytes(name).lower()
        if lname not in _ARC_FIELDS:
            continue
        tags: dict[str, bytes]
        if lname == b"arc-authentication-results":
            m = _AAR_INSTANCE.match(bytes(value))
            tags = {"i": m.group(1).strip()} if m else {}
        else:
            try:
                tags = parse_tags(bytes(value))
            except TagListError:
                tags = {}
        out.append((lname, tags))
    return out


def _instance(tags: Mapping[str, bytes]) -> int | None:
    """The field's i= if it is a valid instance (RFC 8617 4.2.1: 1 to 50), else None."""
    value = tags.get("i", b"").strip()
    digits = value.lstrip(b"0")
    if not value.isdigit() or len(digits) > 2:  # also keeps int() off huge numbers
        return None
    i = int(digits or b"0")
    return i if 1 <= i <= MAX_INSTANCE else None


def _bad_instance(fields: list[tuple[bytes, dict[str, bytes]]]) -> str | None:
    """Why the chain fails before any crypto: a field without a valid instance.

    RFC 8617 4.2.1 limits i= to 1..50 and 5.2 makes an invalid ARC set a failed
    chain. dkimpy checks the limit only when sealing, and silently skips fields
    whose i= it cannot read (so i=0 everywhere read as "not ARC signed", none).
    """
    for name, tags in fields:
        if _instance(tags) is None:
            shown = tags.get("i", b"").strip()[:12].decode("ascii", "replace")
            what = f"i={shown}" if "i" in tags else "no i= tag"
            return (
                f"{_ARC_NAMES[name]} has {what}; instances are 1 to {MAX_INSTANCE} (RFC 8617 4.2.1)"
            )
    return None


def _key_veto(min_bits: int, refused: list[str]) -> Callable[[bytes, bytes], str | None]:
    """Withhold keys the DKIM key rules refuse; the reason is kept for the report."""

    def veto(name: bytes, record: bytes) -> str | None:
        try:
            key = parse_key_record(record)
        except KeyRecordError as e:
            why: str | None = str(e)
        else:
            why = None
            if key.revoked:
                why = "key revoked"
            elif key.key_type != "rsa":  # ARC is rsa-sha256 only (RFC 8617 3.1)
                why = f"key type {key.key_type}"
            elif not key.allows_hash("sha256"):
                why = "key h= does not allow sha256"
            elif not key.for_email:
                why = "key s= does not include email"
            elif key.bits < min_bits:
                why = f"RSA key of {key.bits} bits is shorter than {min_bits}"
        if why is not None:
            refused.append(f"{name.decode('utf-8', 'replace')}: {why}")
        return why

    return veto


def _verify(message: bytes, keys: Mapping[bytes, KeyLookup], min_bits: int) -> tuple[str, str]:
    """(result word, reason) from dkimpy; runs without DNS, possibly in a thread."""
    refused: list[str] = []
    dnsfunc = make_dnsfunc(keys, _key_veto(min_bits, refused))
    try:
        cv, _sets, why = dkim.arc_verify(
            message, logger=DKIMPY_LOG, dnsfunc=dnsfunc, minkey=min_bits
        )
    except KeyTempError as e:
        return "temperror", str(e)
    except Exception as e:  # dkimpy trips over some malformed sets; that is a fail
        return "fail", f"{type(e).__name__}: {e!s:.160}"
    reason = str(why)
    if refused:
        reason += " (" + "; ".join(refused) + ")"
    if cv == dkim.CV_Pass:
        return "pass", reason
    if cv == dkim.CV_None:
        return "none", reason
    return "fail", reason


@dataclass
class ARCCheck:
    """The ``arc`` check; ``offload_bytes`` is settable for tests and tuning."""

    name: str = "arc"
    stage: Stage = Stage.DATA
    needs: tuple[str, ...] = ()
    offload_bytes: int = OFFLOAD_BYTES

    def settled(self, ctx: Context) -> CheckResult | None:
        """The result without waiting when there is no chain to verify (most mail)."""
        start = time.perf_counter()
        msg = ctx.message
        if msg is None:
            return self._result(ctx, "none", "", 0, "no message", start)
        if _ARC_LINE.search(msg.header_block) is None:
            return self._result(ctx, "none", "", 0, "no ARC header fields", start)
        return None

    async def run(self, ctx: Context) -> CheckResult:
        quick = self.settled(ctx)
        if quick is not None:
            return quick
        start = time.perf_counter()
        msg = ctx.message
        assert msg is not None  # settled() answers when there is none
        try:
            fields = arc_headers(msg.header_block)
        except dkim.DKIMException as e:
            return self._result(ctx, "fail", "", 0, f"header does not parse: {e!s:.100}", start)
        if not fields:
            return self._result(ctx, "none", "", 0, "no ARC header fields", start)
        bad = _bad_instance(fields)
        if bad is not None:  # RFC 8617 5.2: the chain fails; no DNS, no crypto needed
            return self._result(ctx, "fail", "", 0, bad, start)
        seals = [tags for name, tags in fields if name == b"arc-seal"]
        instance, sealer = 0, ""
        for tags in seals:
            i = _instance(tags) or 0
            if i > instance:
                instance = i
                sealer = tags.get("d", b"").decode("utf-8", "replace").strip().lower()
        names = [
            key_name(tags["s"].strip(), tags["d"].strip())
            for name, tags in fields
            if name != b"arc-authentication-results" and "s" in tags and "d" in tags
        ]
        keys: dict[bytes, KeyLookup]
        if ctx.resolver is None:
            keys = {n: KeyLookup("temp", reason="no DNS resolver") for n in names}
        else:
            keys = await fetch_keys(ctx.resolver, names)
        content = msg.content()
        min_bits = ctx.policy.dkim.min_key_bits
        if msg.size > self.offload_bytes:
            word, reason = await asyncio.to_thread(_verify, content, keys, min_bits)
        else:
            word, reason = _verify(content, keys, min_bits)
        return self._result(ctx, word, sealer, instance, reason, start)

    def _result(
        self, ctx: Context, word: str, sealer: str, instance: int, reason: str, start: float
    ) -> CheckResult:
        cv = word if word in ("pass", "none") else "fail"
        trusted_names = {t.lower().rstrip(".") for t in ctx.policy.arc.trusted_sealers}
        trusted = cv == "pass" and sealer.rstrip(".") in trusted_names
        symbol = f"ARC_{word.upper()}"
        detail = f"i={instance} d={sealer}: {reason}" if instance else reason
        return CheckResult(
            self.name,
            word,
            symbols=(Symbol(symbol, ctx.policy.score(symbol), detail[:300]),),
            data={
                "cv": cv,
                "sealer": sealer,
                "instance": instance,
                "trusted": trusted,
                "reason": reason,
            },
            elapsed=time.perf_counter() - start,
        )


# -- sealing -----------------------------------------------------------------------------
_KEYS: dict[str, tuple[tuple[int, int], bytes]] = {}
_KEYS_LOCK = threading.Lock()


def seal_key(policy: ARCPolicy) -> bytes:
    """The PEM RSA key of ``seal_key_file``, read again only when the file changes.

    Checked on load (PKCS#1 or PKCS#8 RSA, at least 1024 bits) so that a bad key
    shows up as one clear ``ARCSealError`` rather than as a dkimpy error per message.
    """
    path = policy.seal_key_file
    if not path:
        raise ARCSealError("[arc] seal_key_file is not set")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ARCSealError(f"seal key {path}: {e.strerror}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _KEYS_LOCK:
        cached = _KEYS.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ARCSealError(f"seal key {path}: {e.strerror}") from None
    try:
        bits = int(parse_pem_private_key(data)["modulus"]).bit_length()
    except (UnparsableKeyError, IndexError, TypeError, ValueError):
        raise ARCSealError(f"seal key {path} is not a PEM RSA private key") from None
    if bits < 1024:
        raise ARCSealError(f"seal key {path} has {bits} bits; verifiers need >= 1024")
    with _KEYS_LOCK:
        _KEYS[path] = (stamp, data)
    return data


def authserv_id(ar_header: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(authserv-id, [(method, result)...]) of one Authentication-Results field."""
    _, colon, value = ar_header.partition(b":")
    if not colon:
        raise ARCSealError("not a header field")
    try:
        parsed = authres.AuthenticationResultsHeader.parse(
            "Authentication-Results: " + value.strip().decode("utf-8")
        )
    except (authres.core.AuthResError, UnicodeDecodeError, ValueError) as e:
        raise ARCSealError(f"Authentication-Results does not parse: {e!s:.100}") from None
    results = [(str(r.method).lower(), str(r.result).lower()) for r in parsed.results]
    return str(parsed.authserv_id), results


def seal(message: bytes, ar_header: bytes, policy: ARCPolicy, key: bytes) -> list[bytes]:
    """The next ARC set for ``message``: [ARC-Seal, ARC-Message-Signature, ARC-A-R].

    Input contract (what ``dkim.arc_sign`` needs):

    - ``message``: the message as it will be relayed, CRLF line ends, *without*
      ``ar_header`` and without any Authentication-Results field carrying our
      authserv-id (strip forged ones first: dkimpy would merge them into the seal).
    - ``ar_header``: mailgate's own complete Authentication-Results field
      (``Authentication-Results: <authserv-id>; dkim=pass ...; arc=<result>``, CRLF at
      the end optional). Its authserv-id becomes the ARC srv_id. When the message
      arrived with an ARC chain it MUST contain ``arc=pass`` or ``arc=fail`` (the
      ARCCheck result), else dkimpy ends the chain and nothing is returned; without
      a chain it must contain no arc= result or ``arc=none``. An ``arc=temperror`` is
      refused: sealing a transient as cv=fail would break the chain for good.
    - ``key``: a PEM RSA private key (``seal_key(policy)``); ARC is RSA-only.

    The caller prepends the returned lines (each ends in CRLF) and ``ar_header``
    to the message, in any order relative to each other. Returns [] when dkimpy
    declines to seal (no matching A-R, chain already terminated). Pure CPU work
    proportional to the body: use ``seal_message`` from async code.
    """
    if not (policy.seal_domain and policy.seal_selector):
        raise ARCSealError("[arc] seal_domain and seal_selector are required to seal")
    srv_id, results = authserv_id(ar_header)
    arc = [res for method, res in results if method == "arc"]
    if len(arc) > 1 or any(res not in ("pass", "fail", "none") for res in arc):
        raise ARCSealError(f"Authentication-Results arc= must be pass, fail or none, not {arc}")
    # dkimpy finds the A-R by this exact spelling; the field name is case-insensitive.
    value = ar_header.partition(b":")[2].rstrip(b"\r\n")
    ar = b"Authentication-Results:" + value + b"\r\n"
    try:
        sealed = dkim.arc_sign(
            ar + message,
            policy.seal_selector.encode("ascii"),
            policy.seal_domain.encode("ascii"),
            key,
            srv_id.encode("utf-8"),
            logger=DKIMPY_LOG,
        )
    except dkim.DKIMException as e:
        raise ARCSealError(f"{type(e).__name__}: {e!s:.200}") from None
    return [bytes(h) for h in sealed]


async def seal_message(
    message: bytes, ar_header: bytes, policy: ARCPolicy, offload_bytes: int = OFFLOAD_BYTES
) -> list[bytes]:
    """``seal`` with the configured key, in a worker thread for big messages."""
    key = seal_key(policy)
    if len(message) > offload_bytes:
        return await asyncio.to_thread(seal, message, ar_header, policy, key)
    return seal(message, ar_header, policy, key)
