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
  later; such a message is not sealed (see ``seal``).

``data["remote_ip"]`` is the SMTP client's address and ``data["oldest_pass"]`` the
instance of the oldest ARC-Message-Signature from which every newer one validates
(0 when all do, or when the chain does not pass): Authentication-Results reports
them as ``smtp.remote-ip`` and ``header.oldest-pass`` (RFC 8617 registry entries).

``data["trusted"]`` is True only when the chain passes and its latest sealer (d= of
the highest-instance ARC-Seal) is in ``[arc] trusted_sealers``: DMARC reads it to
let that sealer's chain override a reject or quarantine (RFC 7489 7.2 local policy).

Sealing: ``seal()`` decides whether RFC 8617 lets us add a set and signs it with
dkimpy's primitives (RSA only; see its docstring for the exact input); the
ARC-Authentication-Results it signs is our Authentication-Results payload byte for
byte. ``seal_key()`` loads the configured key once per file version.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
    "ARCSealDeclined",
    "ARCSealError",
    "arc_headers",
    "authserv_id",
    "seal",
    "seal_key",
    "seal_message",
    "sign_set",
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

    #: True for ``ARCSealDeclined``: callers log it at info, not as a fault.
    declined: bool = False


class ARCSealDeclined(ARCSealError):
    """RFC 8617 says not to add a set to this message; an expected outcome, not a fault.

    The chain state is unknown (arc=temperror), the chain is already dead (the newest
    ARC-Seal says cv=fail) or full (i=50). A separate class so the session can log it
    at info while a real sealing error stays a warning.
    """

    declined = True


# -- verification ------------------------------------------------------------------------
_ARC_LINE = re.compile(rb"(?:^|\n)arc-", re.IGNORECASE)


def _aar_instance(value: bytes) -> bytes | None:
    """The i= value of an ARC-Authentication-Results field, comments skipped.

    RFC 8617 4.1.1: the value starts with the instance, then ";" and an A-R payload
    that is no tag-list. CFWS may surround the instance ("(via list) i=1;"), and
    comments nest (RFC 5322 3.2.2), so a regular expression anchored at "i=" failed
    such a chain. Everything outside comments up to the first ";" must be
    ``i = <value>``; None if it is not, or if a comment is left open.
    """
    head = bytearray()
    depth = 0
    escaped = False
    for byte in value:
        if depth:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash: quoted-pair inside a comment
                escaped = True
            elif byte == 0x28:
                depth += 1
            elif byte == 0x29:
                depth -= 1
            continue
        if byte == 0x28:  # "(" opens a comment; it separates like whitespace
            depth = 1
            head += b" "
        elif byte == 0x3B:  # ";" ends the instance
            break
        else:
            head.append(byte)
    if depth:
        return None
    name, eq, rest = bytes(head).partition(b"=")
    if not eq or name.strip() != b"i":
        return None
    return rest.strip()


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
            instance = _aar_instance(bytes(value))
            tags = {"i": instance} if instance is not None else {}
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


def _oldest_pass(sets: list[dict[str, Any]]) -> int:
    """RFC 8617 header.oldest-pass for a passing chain: 0 when every AMS validates.

    Else the lowest instance from which every newer ARC-Message-Signature validates
    (the walk from the newest down stops at the first one that does not): how far
    back the message is still what that sealer signed. dkimpy reports ``ams-valid``
    for every instance it checked.
    """
    valid = {int(s["instance"]): bool(s.get("ams-valid")) for s in sets if "instance" in s}
    if not valid:
        return 0
    oldest = max(valid)
    if not valid[oldest]:
        return 0  # the newest AMS fails: the chain fails, nothing to report
    while valid.get(oldest - 1):
        oldest -= 1
    return 0 if oldest == 1 else oldest


def _verify(message: bytes, keys: Mapping[bytes, KeyLookup], min_bits: int) -> tuple[str, str, int]:
    """(result word, reason, oldest-pass) from dkimpy; no DNS, possibly in a thread."""
    refused: list[str] = []
    dnsfunc = make_dnsfunc(keys, _key_veto(min_bits, refused))
    try:
        cv, sets, why = dkim.arc_verify(
            message, logger=DKIMPY_LOG, dnsfunc=dnsfunc, minkey=min_bits
        )
    except KeyTempError as e:
        return "temperror", str(e), 0
    except Exception as e:  # dkimpy trips over some malformed sets; that is a fail
        return "fail", f"{type(e).__name__}: {e!s:.160}", 0
    reason = str(why)
    if refused:
        reason += " (" + "; ".join(refused) + ")"
    if cv == dkim.CV_Pass:
        return "pass", reason, _oldest_pass(list(sets or []))
    if cv == dkim.CV_None:
        return "none", reason, 0
    return "fail", reason, 0


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
            word, reason, oldest = await asyncio.to_thread(_verify, content, keys, min_bits)
        else:
            word, reason, oldest = _verify(content, keys, min_bits)
        return self._result(ctx, word, sealer, instance, reason, start, oldest)

    def _result(
        self,
        ctx: Context,
        word: str,
        sealer: str,
        instance: int,
        reason: str,
        start: float,
        oldest_pass: int = 0,
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
                "remote_ip": ctx.client.ip,
                "oldest_pass": oldest_pass,
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


#: What our Authentication-Results may say for arc= when we seal (RFC 8617 registers
#: none, pass and fail; temperror is ours and means "do not seal").
_SEALABLE = ("pass", "fail", "none")


def seal(message: bytes, ar_header: bytes, policy: ARCPolicy, key: bytes) -> list[bytes]:
    """The next ARC set for ``message``: [ARC-Seal, ARC-Message-Signature, ARC-A-R].

    Input contract:

    - ``message``: the message as it will be relayed, CRLF line ends, *without*
      ``ar_header``. Other Authentication-Results fields are neither read nor signed
      (only ``ar_header`` says what we concluded).
    - ``ar_header``: mailgate's own complete Authentication-Results field
      (``Authentication-Results: <authserv-id>; dkim=pass ...; arc=<result>``, CRLF at
      the end optional). It must parse (RFC 8601). Its payload, everything after the
      field name's colon and leading whitespace, becomes the ARC-Authentication-Results
      value after ``i=N; `` byte for byte: dkimpy's ``arc_sign`` re-rendered it through
      authres, which drops comments and writes a quoted value holding "@" bare, so a
      HELO of ``x;dmarc=pass@evil.example`` became a ``dmarc=pass`` in the signed AAR.
      Its arc= result is the new ARC-Seal's cv=: ``pass`` or ``fail`` when the message
      arrived with a chain, none (or no arc= at all) without one.
    - ``key``: a PEM RSA private key (``seal_key(policy)``); ARC is RSA-only.

    Raises ``ARCSealDeclined`` (nothing to add, by RFC 8617) when arc= is temperror
    (the chain state is unknown: a cv=fail would kill a chain that may be valid for
    every later hop), when the newest incoming ARC-Seal already says cv=fail (RFC
    8617 5.1: the chain has ended, no further sets), when the chain already has 50
    sets (4.2.1), or when a chain is present but arc= is missing. ``ARCSealError``
    for anything else. The caller prepends the returned lines (each ends in CRLF)
    and ``ar_header`` to the message, in any order relative to each other. Pure CPU
    work proportional to the body: use ``seal_message`` from async code.
    """
    if not (policy.seal_domain and policy.seal_selector):
        raise ARCSealError("[arc] seal_domain and seal_selector are required to seal")
    _, results = authserv_id(ar_header)
    arc = [res for method, res in results if method == "arc"]
    if arc == ["temperror"]:
        raise ARCSealDeclined(
            "arc=temperror: the chain could not be validated now, and a set with cv=fail "
            "would end it for every later hop; seal only when arc= is pass, fail or none"
        )
    if len(arc) > 1 or any(res not in _SEALABLE for res in arc):
        raise ARCSealError(f"Authentication-Results arc= must be pass, fail or none, not {arc}")
    cv = arc[0].encode("ascii") if arc else dkim.CV_None
    payload = ar_header.partition(b":")[2].lstrip(b" \t").rstrip(b"\r\n")
    try:
        signer = dkim.ARC(message, logger=DKIMPY_LOG, signature_algorithm=b"rsa-sha256")
        newest, fields = signer.sorted_arc_headers()
    except dkim.DKIMException as e:
        raise ARCSealError(f"{type(e).__name__}: {e!s:.200}") from None
    why = _no_new_set(newest, fields, cv)
    if why is not None:
        raise ARCSealDeclined(why)
    instance = newest + 1
    aar_value = b" i=%d; " % instance + payload + b"\r\n"
    return sign_set(
        signer,
        instance,
        cv,
        aar_value,
        policy.seal_selector.encode("ascii"),
        policy.seal_domain.encode("ascii"),
        key,
    )


def _no_new_set(
    newest: int, fields: list[tuple[int, tuple[bytes, bytes]]], cv: bytes
) -> str | None:
    """Why RFC 8617 forbids adding instance ``newest + 1`` with ``cv``, or None.

    ``fields`` is dkimpy's ``sorted_arc_headers`` list, the numbering every verifier
    downstream of us (dkimpy-based or not) reads the chain with.
    """
    if newest == 0:
        if cv != dkim.CV_None:  # instance 1 always says cv=none; no numbered set to fail
            return f"arc={cv.decode()} but the message has no numbered ARC set to seal over"
        return None
    for i, (name, value) in fields:
        if i != newest or name.lower() != b"arc-seal":
            continue
        try:
            said = parse_tags(value).get("cv", b"").strip().lower()
        except TagListError:
            continue  # a seal that does not parse failed verification: we seal cv=fail
        if said == dkim.CV_Fail:
            return (
                f"the newest ARC-Seal (i={newest}) already says cv=fail: the chain has ended "
                "and no further sets are added (RFC 8617 5.1)"
            )
    if newest >= MAX_INSTANCE:
        return f"the chain already has {newest} sets, the most RFC 8617 4.2.1 allows"
    if cv == dkim.CV_None:
        return "the message has an ARC chain but our Authentication-Results has no arc= result"
    return None


def sign_set(
    signer: Any,
    instance: int,
    cv: bytes,
    aar_value: bytes,
    selector: bytes,
    domain: bytes,
    key: bytes,
    timestamp: int | None = None,
) -> list[bytes]:
    """Sign ARC set ``instance`` over ``signer`` (a ``dkim.ARC`` of the message, used up:
    its header list is changed).

    ``aar_value`` is the whole ARC-Authentication-Results value after the colon,
    written as given (``seal`` passes `` i=N; <our A-R payload>``). No chain rules
    are applied here, which lets tests build unusual but valid chains too.

    Why not ``dkim.arc_sign``: it builds the AAR itself from authres's re-rendering
    of the A-R fields (see ``seal``). This is its algorithm with the AAR given,
    made of dkimpy's own primitives, so the result verifies as dkimpy's would:
    AMS over the message's default header set (relaxed/relaxed, rsa-sha256), then
    AS over every ARC field bottom-up, or only the new set when ``cv`` is fail
    (RFC 8617 5.1.2). Returns [ARC-Seal, ARC-Message-Signature, ARC-A-R], CRLF-ended.
    """
    try:
        pk = parse_pem_private_key(key)
    except UnparsableKeyError as e:
        raise ARCSealError(f"seal key: {e}") from None
    if not aar_value.endswith(b"\r\n"):
        aar_value += b"\r\n"
    try:
        include = tuple(h.lower() for h in signer.default_sign_headers())
        if b"from" not in include:
            raise ARCSealError("the message has no From field (an AMS must sign it)")
        canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        _, numbered = signer.sorted_arc_headers()
        # Newest first, as dkimpy keeps them; a failed chain's earlier sets stay out.
        chain = [] if cv == dkim.CV_Fail else [field for _, field in numbered]
        chain.insert(0, (b"ARC-Authentication-Results", aar_value))
        signer.headers = canon.canonicalize_headers(chain[:1]) + signer.headers

        signer.hasher = dkim.HASH_ALGORITHMS[signer.signature_algorithm]
        body_hash = dkim.HashThrough(signer.hasher(), signer.debug_content)
        body_hash.update(canon.canonicalize_body(signer.body))
        stamp = str(timestamp or int(time.time())).encode("ascii")
        number = str(instance).encode("ascii")
        ams_fields = [
            (b"i", number),
            (b"a", signer.signature_algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(body_hash.digest())),
            (b"b", b"0" * 60),  # b= on a line of its own: folding it later moves nothing
        ]
        ams = signer.gen_header(ams_fields, include, canon, b"ARC-Message-Signature", pk)
        chain.insert(0, (b"ARC-Message-Signature", ams))
        signer.headers = canon.canonicalize_headers(chain[:1]) + signer.headers

        as_fields = [
            (b"i", number),
            (b"cv", cv),
            (b"a", signer.signature_algorithm),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"b", b"0" * 60),
        ]
        as_include = [name.lower() for name, _ in reversed(chain)]
        if cv == dkim.CV_Fail:
            # Header selection takes the last instance of each name: reversed, those
            # are the new set's, as if it were the only set (RFC 8617 5.1.2).
            signer.headers.reverse()
        seal_value = signer.gen_header(as_fields, as_include, canon, b"ARC-Seal", pk)
    except dkim.DKIMException as e:
        raise ARCSealError(f"{type(e).__name__}: {e!s:.200}") from None
    return [
        b"ARC-Seal: " + bytes(seal_value),
        b"ARC-Message-Signature: " + bytes(ams),
        b"ARC-Authentication-Results:" + aar_value,
    ]


async def seal_message(
    message: bytes, ar_header: bytes, policy: ARCPolicy, offload_bytes: int = OFFLOAD_BYTES
) -> list[bytes]:
    """``seal`` with the configured key, in a worker thread for big messages."""
    key = seal_key(policy)
    if len(message) > offload_bytes:
        return await asyncio.to_thread(seal, message, ar_header, policy, key)
    return seal(message, ar_header, policy, key)
