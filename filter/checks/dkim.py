"""DKIM verification (RFC 6376, RFC 8301, RFC 8463) of every signature up to a limit.

dkimpy does the canonicalisation and the crypto. Everything it gets wrong or leaves
open is decided here, before it runs, from the parsed signature and key record:

- algorithms: only rsa-sha256 and ed25519-sha256. rsa-sha1 is a permerror (RFC 8301
  3.1: "MUST NOT consider signatures using RSA-SHA-1 to pass"); dkimpy accepts it.
- RSA keys under ``[dkim] min_key_bits`` (never below 1024, RFC 8301 3.2): permerror.
- key tags dkimpy ignores: ``h=`` without sha256, ``t=s`` with an i= subdomain, ``s=``
  without email, a key type that does not match ``a=``: permerror.
- From not in ``h=`` (RFC 6376 5.4 / 6.1.1 "From field not signed"): permerror.
- ``i=`` without "@" (RFC 6376 3.5: ``[ Local-part ] "@" domain-name``): permerror.
- ``q=`` (a colon-separated list, 3.5) without "dns/txt", the only method: permerror.
- ``x=`` in the past: permerror "signature expired" (RFC 6376 6.1.1 lists it with the
  other PERMFAIL reasons found before any crypto; a signature the signer declared
  dead is not a *bad* signature, so not "fail"). Checked against ``ctx.clock``
  without dkimpy's 10 hour grace. ``x=`` not later than ``t=``: permerror (3.5).
- ``l=`` larger than the canonicalised body: permerror (RFC 6376 3.5 "MUST NOT be
  larger"; dkimpy hashes the whole body then). Measured only for signatures with l=.
- no key (NXDOMAIN/NODATA), a revoked key (empty p=) or a key record that is no
  usable key (syntax, unknown or upper-case k=, bad p=): permerror (RFC 6376 6.1.2).
  Keys are judged before dkimpy runs, and dkimpy's own key errors are permerrors too:
  its ``verify`` turns them into a plain False, which read as "fail".
- a DNS timeout or SERVFAIL on the key: temperror, never "fail".
- bad signature or body hash mismatch: fail; nothing else is.

Header fields with whitespace before the colon (RFC 5322 obsolete syntax) are fields
like any other: ``From : x`` is the From field that h= must cover (see
``filter.dkimkeys.rfc822_parse``). ``header.b`` (RFC 6008) is the shortest prefix of
b=, at least 8 characters, that no other signature of the message shares.

Keys are fetched first, concurrently, through the shared resolver (``filter.dkimkeys``);
the crypto then runs without DNS, on the event loop for small messages and in a
worker thread above ``OFFLOAD_BYTES`` (body canonicalisation is pure Python and a
1 MB body costs tens of milliseconds per signature).

The overall word: pass if any signature passes, else temperror if any, else fail if
any, else permerror; none without signatures. Signatures whose key is in testing
mode (``t=y``) do not count: RFC 6376 3.6.1 says to treat such mail like unsigned
mail, "even should the signature fail to verify", so they leave the word and the
symbol alone (``none`` when they are all there is). ``data["signatures"]`` lists every
verified signature, testing ones marked ``testing``, for the Authentication-Results
header and for DMARC alignment (which skips testing ones too).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from filter.checks import Context
from filter.dkimkeys import (
    DKIMPY_LOG,
    KeyLookup,
    KeyRecord,
    KeyRecordError,
    KeyTempError,
    TagListError,
    fetch_keys,
    field_name,
    header_fields,
    key_name,
    make_dnsfunc,
    parse_key_record,
    parse_signature_tags,
)
from filter.headers import split_fields
from filter.model import Stage
from filter.results import CheckResult, Symbol

__all__ = [
    "OFFLOAD_BYTES",
    "DKIMCheck",
    "SignatureResult",
    "b_prefixes",
    "check_key",
    "check_signature_tags",
    "overall_result",
    "signature_fields",
]

#: Messages larger than this are verified in a worker thread.
OFFLOAD_BYTES = 256 * 1024

#: Signature algorithm -> the key type (k=) it needs. Nothing else can pass.
ALGORITHMS: Mapping[str, str] = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}

_REQUIRED_TAGS = ("v", "a", "b", "bh", "d", "h", "s")


@dataclass
class SignatureResult:
    """One signature's outcome, in the shape ``data["signatures"]`` promises."""

    result: str
    d: str = ""
    s: str = ""
    a: str = ""
    b: str = ""
    i: str = ""
    l: int | None = None  # noqa: E741 - the RFC's tag name
    reason: str = ""
    key_bits: int | None = None
    testing: bool = False
    # internal: tags for the crypto step, absent once a result is known
    tags: dict[str, bytes] | None = field(default=None, repr=False)
    index: int = 0
    # internal: the whole b= without whitespace (``_b_value``'s answer), for b_prefixes
    b_value: bytes = field(default=b"", repr=False, compare=False)
    # internal: (field value, dkimpy's parse of it) for the verifier, see _Verifier
    dkimpy_tags: tuple[bytes, dict[bytes, bytes]] | None = field(
        default=None, repr=False, compare=False
    )

    def as_data(self) -> dict[str, object]:
        return {
            "result": self.result,
            "d": self.d,
            "s": self.s,
            "a": self.a,
            "b": self.b,
            "i": self.i,
            "l": self.l,
            "reason": self.reason,
            "key_bits": self.key_bits,
            "testing": self.testing,
        }


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace").strip()


def _identity_domain(i: bytes) -> bytes:
    return i.rpartition(b"@")[2].lower().rstrip(b".")


def parse_header(
    header_block: bytes, fields: Iterable[tuple[bytes, bytes]] | None = None
) -> list[list[bytes]]:
    """The header fields as dkimpy's parser sees them: [name, value] pairs.

    ``fields`` is ``split_fields(header_block)`` when the caller has it (the message's
    ``headers()``); it is reused when that is certainly the same (``header_fields``).
    Raises ``dkim.MessageFormatError`` when dkimpy could not parse the header at all.
    """
    return header_fields(header_block, fields)


def signature_fields(header_block: bytes, headers: list[list[bytes]] | None = None) -> list[bytes]:
    """Values of the DKIM-Signature fields, top first: dkimpy's ``idx`` order.

    Parsed with dkimpy's own header parser (or taken from ``headers``, its result) so
    that index i here is the signature ``DKIM.verify(idx=i)`` checks; raises
    ``dkim.MessageFormatError`` when dkimpy could not parse the header at all.
    """
    if headers is None:
        headers = parse_header(header_block)
    return [bytes(v) for n, v in headers if field_name(n) == b"dkim-signature"]


def _body_if_crlf(content: bytes, header_block: bytes) -> bytes | None:
    """The body as dkimpy's parser would return it, or None when that is not certain.

    Why: ``dkim.DKIM(message)`` splits the whole message into lines and joins the
    body again, a quarter of dkimpy's time on a 4 KB message. When every line ends
    in CRLF (always so for SMTP DATA, which refuses bare LF) its result is simply
    the bytes after the blank line, so the header parsed once is reused instead.
    """
    start = len(header_block)
    if content[start : start + 2] != b"\r\n" or content.count(b"\n") != content.count(b"\r\n"):
        return None
    return content[start + 2 :]


#: RFC 6008 4: header.b carries at least this many characters of b=.
B_PREFIX_MIN = 8


def _b_value(value: bytes) -> bytes:
    """The b= of a signature field without its whitespace; cheap and lenient (no
    tag-list parse), for every signature of a message, even those past the limit."""
    for spec in value.split(b";"):
        name, eq, tag_value = spec.partition(b"=")
        if eq and name.strip() == b"b":
            return b"".join(tag_value.split())
    return b""


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def b_prefixes(values: Sequence[bytes], minimum: int = B_PREFIX_MIN) -> list[str]:
    """For each b= value, the header.b that names it: its shortest prefix of at least
    ``minimum`` characters that no *other* value starts with (RFC 6008 4).

    Why: two signatures whose b= share the first 8 characters (a forged copy of a good
    signature's start is enough) got the same header.b, so a reader of the
    Authentication-Results could not tell which one passed. Identical values (a
    repeated field) cannot be told apart by any length and are not compared. Sorted,
    the longest prefix a value shares is with a neighbour, so this is n log n even for
    a hostile number of signatures.
    """
    if len(values) == 1:  # the usual case; the loop below would say the same
        return [values[0][:minimum].decode("ascii", "replace")]
    distinct = sorted(set(values))
    named: dict[bytes, bytes] = {}
    for k, value in enumerate(distinct):
        length = minimum
        for j in (k - 1, k + 1):
            if 0 <= j < len(distinct):
                length = max(length, _common_prefix(value, distinct[j]) + 1)
        named[value] = value[:length]
    return [named[v].decode("ascii", "replace") for v in values]


def _describe(index: int, value: bytes) -> SignatureResult:
    """The reportable fields of one signature, or a permerror if its tags do not parse.

    ``b`` is the whole b= here; ``DKIMCheck.run`` shortens it with ``b_prefixes``.
    """
    try:
        tags, folded = parse_signature_tags(value)
    except TagListError as e:
        return SignatureResult("permerror", reason=f"signature {e}", index=index)
    b = b"".join(tags.get("b", b"").split())
    res = SignatureResult(
        "none",
        d=_text(tags.get("d")).lower(),
        s=_text(tags.get("s")),
        a=_text(tags.get("a")).lower(),
        b=b.decode("ascii", "replace"),
        b_value=b,
        i=_text(tags.get("i")),
        tags=tags,
        index=index,
        dkimpy_tags=None if folded is None else (value, folded),
    )
    if _decimal(tags.get("l", b""), _MAX_DIGITS["l"]):  # a bad l= is check_signature_tags'
        res.l = int(tags["l"])
    return res


# RFC 6376 3.5: l= is 1*76DIGIT, t= and x= 1*12DIGIT. Longer values are malformed, and
# int() refuses over 4,300 digits (a ValueError that made the whole check a temperror).
_MAX_DIGITS = {"l": 76, "t": 12, "x": 12}


def _decimal(value: bytes, max_digits: int) -> bool:
    digits = value.strip()
    return digits.isdigit() and len(digits) <= max_digits


def check_signature_tags(tags: Mapping[str, bytes], now: float) -> str | None:
    """Why a signature is a permerror before any key or crypto, or None if it may pass."""
    for tag in _REQUIRED_TAGS:
        if tag not in tags:
            return f"signature has no {tag}= tag"
    if tags["v"].strip() != b"1":
        return "signature v= is not 1"
    alg = _text(tags["a"]).lower()
    if alg == "rsa-sha1":
        return "rsa-sha1 signatures are not acceptable (RFC 8301)"
    if alg not in ALGORITHMS:
        return f"unknown signature algorithm a={alg:.30}"
    d = tags["d"].strip().lower().rstrip(b".")
    if not d or not tags["s"].strip():
        return "empty d= or s="
    signed = {h.strip().lower() for h in tags["h"].split(b":")}
    if b"from" not in signed:
        return "From header field not signed (h= lacks from)"
    if "q" in tags:
        methods = [m.strip() for m in tags["q"].split(b":")]
        if b"dns/txt" not in methods:  # case-sensitive, as RFC 6376 3.2 makes values
            return "q= does not list dns/txt, the only key query method (RFC 6376 3.5)"
    if "i" in tags:
        if b"@" not in tags["i"]:
            return 'i= has no "@" (RFC 6376 3.5: i= is [local-part] "@" domain)'
        idom = _identity_domain(tags["i"])
        if not (idom == d or idom.endswith(b"." + d)):
            return "i= domain is not d= or a subdomain of it"
    for tag in ("l", "t", "x"):
        if tag in tags and not _decimal(tags[tag], _MAX_DIGITS[tag]):
            return f"{tag}= is not a decimal number of at most {_MAX_DIGITS[tag]} digits"
    if "x" in tags:
        expires = int(tags["x"])
        if "t" in tags and expires <= int(tags["t"]):  # RFC 6376 3.5: x= MUST be greater
            return "x= is not later than t="
        if expires < now:
            return "signature expired (x= is past)"
    return None


def check_key(tags: Mapping[str, bytes], key: KeyRecord, min_bits: int) -> str | None:
    """Why this key cannot verify this signature under mailgate's rules, or None."""
    if key.revoked:
        return "key revoked (empty p=)"
    alg = _text(tags.get("a")).lower()
    if ALGORITHMS.get(alg) != key.key_type:
        return f"key type {key.key_type} does not match a={alg}"
    if not key.allows_hash("sha256"):
        return "key h= does not allow sha256"
    if not key.for_email:
        return "key s= does not include email"
    if key.key_type == "rsa" and key.bits < min_bits:
        return f"RSA key of {key.bits} bits is shorter than {min_bits} (RFC 8301)"
    if key.strict_identity and "i" in tags:
        d = tags.get("d", b"").strip().lower().rstrip(b".")
        if _identity_domain(tags["i"]) != d:
            return "key t=s forbids an i= subdomain of d="
    return None


def overall_result(results: Sequence[SignatureResult]) -> str:
    """pass > temperror > fail > permerror; none without signatures (see module doc).

    Testing-mode signatures are left out: RFC 6376 3.6.1 forbids treating their mail
    differently from unsigned mail, whether they verify or not.
    """
    words = {r.result for r in results if not r.testing}
    for word in ("pass", "temperror", "fail", "permerror"):
        if word in words:
            return word
    return "none"


def _length_beyond_body(body: bytes, sig: SignatureResult, lengths: dict[str, int]) -> str | None:
    """Why the signature's l= makes it a permerror, or None.

    RFC 6376 3.5: l= "MUST NOT be larger than the actual number of octets in the
    canonicalized message body"; dkimpy then simply hashes the whole body. Called only
    for signatures with l=, so other mail pays nothing; the canonicalised length is
    measured once per body algorithm (``lengths``) for all signatures of a message.
    """
    assert sig.tags is not None and sig.l is not None
    try:
        canon = CanonicalizationPolicy.from_c_value(sig.tags.get("c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return None  # dkimpy reports the bad c= itself
    algorithm = canon.body_algorithm
    size = lengths.get(algorithm.name)
    if size is None:
        size = lengths[algorithm.name] = len(canon.canonicalize_body(body))
    if sig.l > size:
        return f"l={sig.l} is larger than the canonicalized body ({size} octets)"
    return None


class _Verifier(dkim.DKIM):  # type: ignore[misc]  # dkimpy is untyped
    """dkimpy's verifier, with three steps done the way mailgate's own checks do them.

    - Signature fields are found by ``field_name``, as ``signature_fields`` finds them,
      so a ``DKIM-Signature :`` field (obsolete syntax) has the same index on both
      sides, and an index dkimpy cannot find is an error, not a quiet False ("fail").
    - A q= list that ``check_signature_tags`` accepted (it lists dns/txt) is not
      refused again: dkimpy wanted q= to be exactly "dns/txt".
    - Key errors propagate: dkimpy's ``verify_sig`` turned every ``KeyFormatError``
      (and a bad p= base64) into a plain False, reported as "fail" although RFC 8601
      2.7.1 keeps fail for signatures that did not verify. As a ``DKIMException``
      it is a permerror.
    """

    #: (field value, dkimpy's parse of it) for the next ``verify`` call, set by
    #: ``_verify_all`` from ``SignatureResult.dkimpy_tags``; used once, and only if
    #: the value is that of the signature ``verify`` is asked about.
    prepared: tuple[bytes, dict[bytes, bytes]] | None = None

    def verify_headerprep(
        self, idx: int = 0
    ) -> tuple[dict[bytes, bytes], list[bytes], list[tuple[bytes, bytes]]]:
        sigheaders = [(n, v) for n, v in self.headers if field_name(n) == b"dkim-signature"]
        if idx >= len(sigheaders):
            raise dkim.MessageFormatError(f"no DKIM-Signature number {idx + 1}")
        prepared, self.prepared = self.prepared, None
        if prepared is not None and prepared[0] == sigheaders[idx][1]:
            # The check parsed this field already (``parse_signature_tags``): the
            # same dict dkimpy's ``parse_tag_value`` gives, without parsing again.
            sig = prepared[1]
        else:
            try:
                sig = dkim.parse_tag_value(sigheaders[idx][1])
            except dkim.util.InvalidTagValueList as e:
                raise dkim.MessageFormatError(e) from None
        self.signature_fields = sig
        checked = dict(sig)
        if b"q" in sig and b"dns/txt" in (m.strip() for m in sig[b"q"].split(b":")):
            checked[b"q"] = b"dns/txt"
        dkim.validate_signature_fields(checked)
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        include_headers = [x.lower() for x in _H_SPLIT.split(sig[b"h"])]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders

    def verify_sig(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: tuple[bytes, bytes],
        dnsfunc: Callable[..., bytes | None],
    ) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = dkim.load_pk_from_dns(
            name, dnsfunc, timeout=self.timeout
        )
        return bool(self.verify_sig_process(sig, include_headers, sig_header, dnsfunc))


#: dkimpy's split of h= into field names.
_H_SPLIT = re.compile(rb"\s*:\s*")


def _verify_all(
    message: bytes,
    sigs: list[SignatureResult],
    keys: Mapping[bytes, KeyLookup],
    min_bits: int,
    parsed: tuple[list[list[bytes]], bytes] | None = None,
) -> None:
    """The crypto step: fills in ``result``/``reason`` of every undecided signature.

    Runs without DNS (``keys`` holds every answer) and possibly in a worker thread;
    one ``dkim.DKIM`` serves all signatures. ``parsed`` is (header fields, body) as
    ``dkim.rfc822_parse`` gives them for ``message``, when the caller has them.
    """
    pending = [s for s in sigs if s.tags is not None]
    if not pending:
        return
    try:
        if parsed is None:
            verifier = _Verifier(message, logger=DKIMPY_LOG, minkey=min_bits)
        else:
            verifier = _Verifier(None, logger=DKIMPY_LOG, minkey=min_bits)
            verifier.headers, verifier.body = parsed
    except dkim.DKIMException as e:
        for sig in pending:
            sig.result, sig.reason, sig.tags = "permerror", f"message does not parse: {e}", None
        return
    dnsfunc = make_dnsfunc(keys)
    body_lengths: dict[str, int] = {}
    for sig in pending:
        if sig.l is not None:
            why = _length_beyond_body(verifier.body, sig, body_lengths)
            if why is not None:
                sig.result, sig.reason, sig.tags = "permerror", why, None
                continue
        verifier.prepared = sig.dkimpy_tags
        try:
            ok = verifier.verify(idx=sig.index, dnsfunc=dnsfunc)
        except KeyTempError as e:
            sig.result, sig.reason = "temperror", str(e)
        except dkim.ValidationError as e:
            # dkimpy tells a body hash mismatch from its other ValidationErrors only by
            # the message; the others were ruled out by check_signature_tags anyway.
            if "body hash" in str(e):
                sig.result, sig.reason = "fail", "body hash mismatch"
            else:
                sig.result, sig.reason = "permerror", f"{e!s:.200}"
        except dkim.DKIMException as e:  # key and syntax problems (RFC 8601 2.7.1)
            sig.result, sig.reason = "permerror", f"{e!s:.200}"
        except Exception as e:  # hostile input must cost one signature, not the check
            sig.result, sig.reason = "permerror", f"{type(e).__name__}: {e!s:.160}"
        else:
            sig.result = "pass" if ok else "fail"
            sig.reason = "signature verified" if ok else "signature did not verify"
        sig.tags = sig.dkimpy_tags = None


@dataclass
class DKIMCheck:
    """The ``dkim`` check; ``offload_bytes`` is settable for tests and tuning."""

    name: str = "dkim"
    stage: Stage = Stage.DATA
    needs: tuple[str, ...] = ()
    offload_bytes: int = OFFLOAD_BYTES

    async def run(self, ctx: Context) -> CheckResult:
        start = time.perf_counter()
        msg = ctx.message
        if msg is None:
            return self._result(ctx, [], 0, False, start, "no message")
        header_block = msg.header_block
        try:
            fields = msg.headers() if msg.header_complete else None
            headers = parse_header(header_block, fields)
            values = signature_fields(header_block, headers)
        except dkim.DKIMException as e:
            values = [
                raw for name, raw in split_fields(msg.header_block) if name == b"dkim-signature"
            ]
            sigs = [
                SignatureResult("permerror", reason=f"header does not parse: {e!s:.100}")
                for _ in values[: ctx.policy.dkim.max_signatures]
            ]
            return self._result(ctx, sigs, max(0, len(values) - len(sigs)), False, start)
        limit = ctx.policy.dkim.max_signatures
        sigs = [_describe(i, v) for i, v in enumerate(values[:limit])]
        if sigs:
            # Unique among all the message's signatures, even those past the limit.
            # A parsed signature's b= is _b_value's answer (a test keeps them equal).
            b_values = [
                sigs[i].b_value if i < len(sigs) and sigs[i].tags is not None else _b_value(v)
                for i, v in enumerate(values)
            ]
            named = b_prefixes(b_values)
            for sig in sigs:
                if sig.b:
                    sig.b = named[sig.index]
        ignored = max(0, len(values) - limit)
        now = ctx.clock()
        for sig in sigs:
            if sig.tags is None:
                continue
            why = check_signature_tags(sig.tags, now)
            if why is not None:
                sig.result, sig.reason, sig.tags = "permerror", why, None
        keys = await self._fetch(ctx, sigs)
        self._judge_keys(sigs, keys, ctx.policy.dkim.min_key_bits)
        offloaded = False
        if any(s.tags is not None for s in sigs):
            content = msg.content()
            body = _body_if_crlf(content, header_block) if msg.header_complete else None
            parsed = None if body is None else (headers, body)
            args = (content, sigs, keys, ctx.policy.dkim.min_key_bits, parsed)
            if msg.size > self.offload_bytes:
                offloaded = True
                await asyncio.to_thread(_verify_all, *args)
            else:
                _verify_all(*args)
        return self._result(ctx, sigs, ignored, offloaded, start)

    @staticmethod
    async def _fetch(ctx: Context, sigs: list[SignatureResult]) -> dict[bytes, KeyLookup]:
        names = [
            key_name(s.tags["s"].strip(), s.tags["d"].strip()) for s in sigs if s.tags is not None
        ]
        if not names:
            return {}
        if ctx.resolver is None:
            return {n: KeyLookup("temp", reason="no DNS resolver") for n in names}
        return await fetch_keys(ctx.resolver, names)

    @staticmethod
    def _judge_keys(
        sigs: list[SignatureResult], keys: Mapping[bytes, KeyLookup], min_bits: int
    ) -> None:
        """Decide every signature whose key alone settles it (missing, temp, refused)."""
        for sig in sigs:
            if sig.tags is None:
                continue
            found = keys[key_name(sig.tags["s"].strip(), sig.tags["d"].strip())]
            why: str | None
            if found.status == "temp":
                sig.result, sig.reason, sig.tags = "temperror", found.reason, None
                continue
            if found.status != "ok" or found.record is None:
                sig.result, sig.reason, sig.tags = "permerror", found.reason or "no key", None
                continue
            try:
                key = parse_key_record(found.record)
            except KeyRecordError as e:
                sig.result, sig.reason, sig.tags = "permerror", str(e), None
                continue
            sig.key_bits = key.bits or None
            sig.testing = key.testing
            why = check_key(sig.tags, key, min_bits)
            if why is not None:
                sig.result, sig.reason, sig.tags = "permerror", why, None

    def _result(
        self,
        ctx: Context,
        sigs: list[SignatureResult],
        ignored: int,
        offloaded: bool,
        start: float,
        reason: str = "",
    ) -> CheckResult:
        word = overall_result(sigs)
        counted = [s for s in sigs if not s.testing]  # RFC 6376 3.6.1, see overall_result
        if word == "pass":
            domains = sorted({s.d for s in counted if s.result == "pass"})
            detail = "d=" + ",".join(domains)
        elif word == "none" and sigs and not reason:
            detail = "only signatures by keys in testing mode (t=y): treated as unsigned"
        elif word == "none":
            detail = reason or "no DKIM-Signature"
        else:
            detail = "; ".join(f"d={s.d or '?'} s={s.s or '?'}: {s.reason}" for s in counted)
        symbol = f"DKIM_{word.upper()}"
        return CheckResult(
            self.name,
            word,
            symbols=(Symbol(symbol, ctx.policy.score(symbol), detail[:300]),),
            data={
                "signatures": [s.as_data() for s in sigs],
                "ignored": ignored,
                "offloaded": offloaded,
            },
            elapsed=time.perf_counter() - start,
        )
