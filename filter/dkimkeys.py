"""DKIM/ARC public keys through mailgate's resolver, and the dkimpy ``dnsfunc`` seam (L2).

dkimpy fetches keys itself, synchronously, inside its verify calls. mailgate instead
fetches every key a message names *before* any crypto runs, concurrently and through
the shared cached resolver, then hands dkimpy a ``dnsfunc`` that only reads those
answers. That keeps DNS off the worker thread that does the hashing of big messages,
and lets a DNS timeout be told apart from a bad signature: dkimpy turns its own DNS
errors into a plain ``False``, so the seam raises :class:`KeyTempError` (deliberately
not a ``DKIMException``), which dkimpy lets through.

Key records are also parsed here (RFC 6376 3.6.1) because dkimpy ignores the key's
``h=`` and ``t=s`` tags, misreads an ``s=`` list and does not report RSA key sizes;
both DKIM and ARC apply the same key rules (RFC 8301 minimum size, sha256 only), and
dkimpy's own key evaluation is rebuilt on the same parser (``evaluate_pk``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.canonicalization
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import InvalidTagValueList

from filter.headers import split_fields
from filter.resolver import DNSTempError, Resolver

# -- faster crypto behind dkimpy -----------------------------------------------------------
# Why: profiling showed dkimpy re-parsing the same DER key (pure-Python ASN.1) and
# doing RSA with Python integers on every message, about a third of a millisecond
# per signature. Both are pure functions, so they are swapped once, process-wide, for
# memoised parsing and OpenSSL's PKCS#1 v1.5 verification (same inputs, same
# True/False). dkimpy looks both names up in its module globals at call time.
_dkimpy_rsa_verify = dkim.RSASSA_PKCS1_v1_5_verify
_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


@functools.lru_cache(maxsize=4096)
def _rsa_public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _rsa_verify(hasher: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    algorithm = _HASHES.get(getattr(hasher, "name", ""))
    try:
        key = _rsa_public_key(public_key["modulus"], public_key["publicExponent"])
    except ValueError:
        # Numbers OpenSSL refuses (e=1, even e, e >= n) are no RSA key; dkimpy's own
        # arithmetic would "verify" forged signatures with some of them (e=1).
        # ``parse_key_record`` refuses such keys first; this is the backstop.
        return False
    if algorithm is None:
        return bool(_dkimpy_rsa_verify(hasher, signature, public_key))
    try:
        key.verify(signature, hasher.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    return True


_parse_public_key = functools.lru_cache(maxsize=4096)(parse_public_key)
dkim.parse_public_key = _parse_public_key
dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify


#: dkimpy's pattern for blanking the b= value before hashing a signature field,
#: ``[;\s]b FWS = (FWS base64char)* (CRLF end)?``, with FWS spelled
#: ``(?:(?:\s*\r?\n)?\s+)?``. That FWS matches exactly the runs of zero or more
#: whitespace characters, so the same language is ``[;\s]b\s*=`` followed by the
#: longest run of whitespace and base64 characters that ends in a base64 character;
#: written so, the nested quantifiers go and one substitution takes ~5 µs instead of
#: ~40 µs per signature (a randomised comparison in tests/unit/checks keeps the two
#: equal). dkimpy reads ``RE_BTAG`` from its module globals at call time.
DKIMPY_RE_BTAG = dkim.RE_BTAG
RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sA-Za-z0-9+/=]*[A-Za-z0-9+/=])?(?:\r?\n\Z)?")
dkim.RE_BTAG = RE_BTAG

#: dkimpy's relaxed header canonicalisation (RFC 6376 3.4.2) runs two regex
#: substitutions per header field per signature; the same steps with bytes methods
#: and one precompiled pattern take about half the time (a randomised comparison in
#: tests/unit/checks keeps them equal). Unfolding ``\r?\n`` is removing every CRLF,
#: then every remaining LF.
_RELAXED_WSP = re.compile(rb"[\t ]+")
DKIMPY_RELAXED_HEADERS = dkim.canonicalization.Relaxed.canonicalize_headers


def relaxed_headers(headers: Iterable[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    wsp = _RELAXED_WSP.sub
    out = []
    for h in headers:
        unfolded = h[1].replace(b"\r\n", b"").replace(b"\n", b"")
        if b"\t" in unfolded or b"  " in unfolded:  # else every WSP run is one SP already
            unfolded = wsp(b" ", unfolded)
        out.append((h[0].lower().rstrip(), unfolded.strip() + b"\r\n"))
    return out


dkim.canonicalization.Relaxed.canonicalize_headers = staticmethod(relaxed_headers)

#: dkimpy's tag-list parser (run on every signature field and key record) looks its
#: tag-name pattern up in the ``re`` cache once per tag; the same steps with the
#: pattern compiled once (a randomised comparison in tests/unit/checks keeps the two
#: equal). Not memoised: every signature field is new, only the bench repeats one.
DKIMPY_PARSE_TAG_VALUE = dkim.parse_tag_value
_TAG_NAME = re.compile(rb"^[a-zA-Z](\w)*")


def parse_tag_list(tag_list: bytes) -> dict[bytes, bytes]:
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:  # a trailing semicolon is valid
        specs.pop()
    name_ok = _TAG_NAME.match
    for spec in specs:
        try:
            key, value = (x.strip() for x in spec.split(b"=", 1))
        except ValueError:
            raise dkim.util.InvalidTagSpec(spec) from None
        if name_ok(key) is None:
            raise dkim.util.InvalidTagSpec(spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value
    return tags


dkim.parse_tag_value = parse_tag_list

#: dkimpy's key evaluation; replaced by ``evaluate_pk`` below (after the key parser).
DKIMPY_EVALUATE_PK = dkim.evaluate_pk

#: dkimpy's header parser with its two patterns compiled once instead of looked up
#: in the ``re`` cache per line; the same steps otherwise (a randomised comparison in
#: tests/unit/checks keeps the two equal), except that:
#:
#: - a message starting with a continuation line is a ``MessageFormatError`` here,
#:   not an ``IndexError``;
#: - a field with whitespace between its name and the colon (``X-Legacy : 1``, RFC
#:   5322 4.1 obs-optional, which receivers must accept) is a field here. dkimpy
#:   refused the whole header, so every signature of such a message was a permerror.
#:   The name is kept *with* that whitespace: simple header canonicalisation (RFC
#:   6376 3.4.1) hashes the field unchanged; relaxed (3.4.2) strips it from the
#:   name; ``select_headers`` below matches names without it.
DKIMPY_RFC822_PARSE = dkim.rfc822_parse
_LINE_BREAK = re.compile(b"\r?\n")
# dkimpy's pattern (the shortest run of printable characters before a colon) with
# the obsolete WSP before the colon allowed.
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?[ \t]*):")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    headers: list[list[bytes]] = []
    lines = _LINE_BREAK.split(message)
    name = _FIELD_NAME.match
    body_start = len(lines)
    for i, line in enumerate(lines):
        if not line:
            body_start = i + 1
            break
        if line[0] in (0x09, 0x20):
            if not headers:
                raise dkim.MessageFormatError("header starts with a continuation line")
            headers[-1][1] += line + b"\r\n"
            continue
        m = name(line)
        if m is not None:
            headers.append([m.group(1), line[m.end(0) :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, b"\r\n".join(lines[body_start:])


dkim.rfc822_parse = rfc822_parse


def header_fields(
    header_block: bytes, fields: Iterable[tuple[bytes, bytes]] | None = None
) -> list[list[bytes]]:
    """``rfc822_parse(header_block + CRLF)``'s header list, taken from ``fields``
    (``split_fields(header_block)``, which the session has already made) when that is
    certainly the same; raises ``dkim.MessageFormatError`` as ``rfc822_parse`` does.

    Why: the header block was split into lines and matched line by line a second time
    for dkimpy, ~14 µs on a small message. When every line break is CRLF and the block
    ends in one (a complete header block), a split field is the first line plus its
    continuation lines, each with its CRLF, which is exactly the value
    ``rfc822_parse`` rebuilds after the name it matches on the first line; anything
    else (bare LF, a folded first line, a line that is no field) is parsed by
    ``rfc822_parse`` itself. A randomised test compares the two.
    """
    if (
        fields is not None
        and header_block.endswith(b"\r\n")
        and header_block.count(b"\n") == header_block.count(b"\r\n")
    ):
        name = _FIELD_NAME.match
        headers: list[list[bytes]] = []
        for _, raw in fields:
            m = name(raw)
            if m is None:
                break
            headers.append([m.group(1), raw[m.end(0) :]])
        else:
            return headers
    return rfc822_parse(header_block + b"\r\n")[0]


def field_name(name: bytes) -> bytes:
    """A parsed field's name as it is compared: lower case, without the whitespace
    obsolete syntax allows before the colon (see ``rfc822_parse``)."""
    return bytes(name).rstrip(b" \t").lower()


DKIMPY_SELECT_HEADERS = dkim.select_headers


def select_headers(
    headers: Sequence[Sequence[bytes]], include_headers: Iterable[bytes]
) -> list[Sequence[bytes]]:
    """dkimpy's choice of the fields h= signs (RFC 6376 5.4.2: the last instance of a
    name first), comparing names as ``field_name`` does.

    dkimpy compared the raw name, so under simple canonicalisation ``From : x`` was
    no From field: a signature whose h= lists from hashed no From at all, and still
    verified with that field added. dkimpy looks this name up at call time.
    """
    names = [field_name(h[0]) for h in headers]
    signed: list[Sequence[bytes]] = []
    last: dict[bytes, int] = {}
    for want in include_headers:
        i = last.get(want, len(headers))
        while i > 0:
            i -= 1
            if names[i] == want:
                signed.append(headers[i])
                break
        last[want] = i
    return signed


dkim.select_headers = select_headers

__all__ = [
    "DKIMPY_LOG",
    "KeyLookup",
    "KeyRecord",
    "KeyRecordError",
    "KeyTempError",
    "TagListError",
    "fetch_keys",
    "field_name",
    "header_fields",
    "key_name",
    "key_names",
    "make_dnsfunc",
    "parse_key_record",
    "parse_signature_tags",
    "parse_tags",
    "select_record",
]

_WSP = re.compile(rb"\s+")

#: Logger handed to dkimpy: it logs every failed signature at ERROR, which mailgate
#: reports as check results instead, so its lines go nowhere.
DKIMPY_LOG = logging.getLogger("mailgate.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False

DNSFunc = Callable[..., bytes | None]


class KeyTempError(Exception):
    """A key lookup failed temporarily (timeout, SERVFAIL): the result is temperror.

    Not a ``dkim.DKIMException`` on purpose: dkimpy catches those (and its own DNS
    timeout) and reports a failed signature; this one propagates out of
    ``DKIM.verify`` and ``arc_verify`` so the caller can say temperror.
    """


class TagListError(ValueError):
    """A tag=value list (signature or key record) that does not parse."""


class KeyRecordError(ValueError):
    """A key record that is not a usable DKIM key; ``str()`` is the reason."""


@dataclass(frozen=True)
class KeyRecord:
    """One parsed DKIM key record (RFC 6376 3.6.1); ``public`` is empty when revoked."""

    key_type: str  # "rsa" | "ed25519"
    public: bytes  # decoded p= (DER for rsa, 32 raw bytes for ed25519)
    bits: int  # RSA modulus size; 256 for ed25519; 0 when revoked
    hashes: tuple[str, ...] | None  # h=, None when absent (every hash allowed)
    services: tuple[str, ...]  # s=, ("*",) by default
    flags: frozenset[str]  # t=, e.g. {"y", "s"}

    @property
    def revoked(self) -> bool:
        """RFC 6376 3.6.1: an empty p= means the key has been revoked."""
        return not self.public

    @property
    def testing(self) -> bool:
        return "y" in self.flags

    @property
    def strict_identity(self) -> bool:
        """t=s: the i= domain must equal d= exactly, no subdomains."""
        return "s" in self.flags

    def allows_hash(self, hash_name: str) -> bool:
        return self.hashes is None or hash_name in self.hashes

    @property
    def for_email(self) -> bool:
        return "*" in self.services or "email" in self.services


def parse_tags(value: bytes) -> dict[str, bytes]:
    """A tag=value list (RFC 6376 3.2) with folding removed; ``TagListError`` if bad.

    Tag names are case-sensitive (3.2), values keep their case; only the CRLFs of
    folded header fields are dropped so that values can be compared directly.
    Each call returns a dict of its own.
    """
    return dict(_parsed_tags(value)[0])


def parse_signature_tags(value: bytes) -> tuple[dict[str, bytes], dict[bytes, bytes] | None]:
    """``parse_tags(value)``, and dkimpy's own parse of the same field value (what
    ``DKIM.verify`` would compute from it: bytes names, folded values), or None.

    Why: the check parses a signature for its own rules and dkimpy parsed it again
    inside ``verify``; with both from one parse, the verifier is handed the second
    (see ``filter.checks.dkim._Verifier``). Fresh dicts on every call.
    """
    tags, folded = _parsed_tags(value)
    return dict(tags), (None if folded is None else dict(folded))


def _unfold(value: bytes) -> bytes:
    """``parse_tags``' unfolding: every CRLF, then every remaining LF, removed."""
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


_Parsed = tuple[tuple[tuple[str, bytes], ...], tuple[tuple[bytes, bytes], ...] | None]


@functools.lru_cache(maxsize=256)
def _parsed_tags(value: bytes) -> _Parsed:
    """(``parse_tags``' tags, dkimpy's tags) of one tag list; ``TagListError`` if bad.

    Memoised: one signature field is parsed by the prefetch, then by its check (whose
    verifier is handed the folded half), and key records repeat message after message.

    The folded value is parsed once, as dkimpy does, and the unfolded tags derived
    from it. That equals parsing the unfolded value: unfolding removes only CR and LF,
    which are whitespace, so it keeps every ";" and "=", commutes with ``strip``, and
    keeps the first character of a name, the only one the name pattern tests. Names
    with a line break (two could become equal, a duplicate, only once unfolded) and
    every error take the unfolded parse itself, for its exact error message. A
    randomised test in tests/unit/checks compares this with the plain unfolded parse.
    """
    try:
        folded: dict[bytes, bytes] | None = parse_tag_list(value)
    except InvalidTagValueList:
        folded = None
    if folded is not None and b"\n" not in b"".join(folded):  # names unchanged: no duplicate
        tags = tuple((k.decode("ascii", "replace"), _unfold(v)) for k, v in folded.items())
        return tags, tuple(folded.items())
    try:
        raw = parse_tag_list(_unfold(value))
    except InvalidTagValueList as e:
        raise TagListError(f"tag list syntax error: {e!s:.80}") from None
    tags = tuple((k.decode("ascii", "replace"), v) for k, v in raw.items())
    return tags, (None if folded is None else tuple(folded.items()))


def _colon_list(value: bytes) -> tuple[str, ...]:
    return tuple(
        p.strip().lower() for p in value.decode("ascii", "replace").split(":") if p.strip()
    )


@functools.lru_cache(maxsize=4096)
def parse_key_record(raw: bytes) -> KeyRecord:
    """Parse a key TXT record; raise ``KeyRecordError`` for anything not a DKIM key.

    A revoked key (empty p=) parses: revocation is a verification outcome with its own
    reason, not a syntax error.
    """
    try:
        tags = parse_tags(raw)
    except TagListError as e:
        raise KeyRecordError(f"key record {e}") from None
    version = tags.get("v")
    if version is not None and version != b"DKIM1":
        raise KeyRecordError(f"key record v= is not DKIM1 ({version!r:.40})")
    if "p" not in tags:
        raise KeyRecordError("key record has no p= tag")
    # Case-sensitive: RFC 6376 3.2 makes values case-sensitive unless the tag says
    # otherwise, and k= does not; "k=RSA" is an unknown type, whose record 3.6.1 says
    # to ignore (6.1.2: a permerror). dkimpy refuses it too.
    key_type = tags.get("k", b"rsa").strip().decode("ascii", "replace")
    if key_type not in ("rsa", "ed25519"):
        raise KeyRecordError(f"unknown key type k={key_type:.20} (key types are case-sensitive)")
    hashes = _colon_list(tags["h"]) if "h" in tags else None
    services = _colon_list(tags["s"]) if "s" in tags else ("*",)
    flags = frozenset(_colon_list(tags.get("t", b"")))
    b64 = _WSP.sub(b"", tags["p"])
    if not b64:
        return KeyRecord(key_type, b"", 0, hashes, services, flags)
    try:
        public = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRecordError("key p= is not valid base64") from None
    if key_type == "ed25519":
        if len(public) != 32:
            raise KeyRecordError(f"ed25519 key is {len(public)} bytes, not 32")
        bits = 256
    else:
        try:
            # dkimpy's own parser: accepts exactly what its verifier will accept
            # (SubjectPublicKeyInfo or a bare RSAPublicKey).
            numbers = _parse_public_key(public)
            modulus, exponent = int(numbers["modulus"]), int(numbers["publicExponent"])
        except (UnparsableKeyError, IndexError, KeyError, TypeError, ValueError):
            raise KeyRecordError("RSA key p= does not parse") from None
        try:
            # Numbers that are no RSA public key (RFC 8017 3.1: e odd, 3 <= e < n; with
            # e=1 the padded digest itself is a valid "signature"): the key cannot be
            # used. OpenSSL checks these; before, dkimpy's own arithmetic judged them.
            _rsa_public_key(modulus, exponent)
        except ValueError as e:
            raise KeyRecordError(f"RSA key p= is not a usable RSA public key: {e!s:.80}") from None
        bits = modulus.bit_length()
    return KeyRecord(key_type, public, bits, hashes, services, flags)


@functools.lru_cache(maxsize=1024)
def evaluate_pk(name: bytes, record: bytes | str | None) -> tuple[Any, int, bytes, bool]:
    """dkimpy's ``evaluate_pk(name, record)`` (key object, bits, k= tag, tlsrpt-only),
    built on ``parse_key_record`` so that dkimpy accepts exactly the keys mailgate does.

    dkimpy compared the whole s= with "*", "email" and "tlsrpt", but s= is a colon-
    separated list (RFC 6376 3.6.1): a key with ``s=email:tlsrpt`` got no key object
    and the signature a permerror. A key for tlsrpt only is flagged, as dkimpy does,
    so that it refuses the key for ordinary mail; a key for neither is a
    ``KeyFormatError`` (dkimpy returned no key object, which failed later as "unknown
    key type None"). Memoised: a pure function of its inputs, and the same key signs
    message after message.
    """
    if not record:
        raise dkim.KeyFormatError(f"missing public key: {name!r:.120}")
    raw = record.encode("ascii") if isinstance(record, str) else record
    try:
        key = parse_key_record(raw)
    except KeyRecordError as e:
        raise dkim.KeyFormatError(str(e)) from None
    if key.revoked:
        raise dkim.KeyFormatError("key revoked (empty p=)")
    pk: Any
    if key.key_type == "ed25519":
        try:
            pk = nacl.signing.VerifyKey(key.public)
        except nacl.exceptions.ValueError as e:  # parse_key_record checked the length
            raise dkim.KeyFormatError(f"ed25519 key p= is not usable: {e}") from None
        ktag = b"ed25519"
    else:
        pk = _parse_public_key(key.public)
        ktag = b"rsa"
    if key.for_email:
        return pk, key.bits, ktag, False
    if "tlsrpt" in key.services:
        return pk, key.bits, ktag, True
    raise dkim.KeyFormatError("key s= lists neither email nor tlsrpt")


dkim.evaluate_pk = evaluate_pk


def select_record(records: Iterable[bytes]) -> bytes | None:
    """The record to use when a key name holds several TXT records.

    RFC 6376 3.6.2.2 leaves several records undefined; publishers sometimes leave a
    stray TXT next to the key, so the first one that parses as a key wins, else the
    first (whose error is then reported).
    """
    recs = list(records)
    for rec in recs:
        try:
            parse_key_record(rec)
        except KeyRecordError:
            continue
        return rec
    return recs[0] if recs else None


def key_name(selector: bytes, domain: bytes) -> bytes:
    """The lookup key used both for prefetching and for dkimpy's ``dnsfunc`` name."""
    return (selector + b"._domainkey." + domain).rstrip(b".").lower()


@dataclass(frozen=True)
class KeyLookup:
    """What the prefetch found for one key name.

    ``status``: "ok" (``record`` set), "missing" (NXDOMAIN/NODATA), "temp" (timeout,
    SERVFAIL...) or "bad" (a name the resolver refuses, e.g. a malformed selector).
    """

    status: str
    record: bytes | None = None
    reason: str = ""


async def _lookup(resolver: Resolver, name: bytes) -> KeyLookup:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return KeyLookup("bad", reason="key name is not UTF-8")
    try:
        records = await resolver.txt(text)
    except DNSTempError as e:
        return KeyLookup("temp", reason=f"key lookup {text}: {e.reason}")
    except ValueError as e:  # malformed name: the signature's fault, not DNS's
        return KeyLookup("bad", reason=f"invalid key name: {e!s:.100}")
    record = select_record(records)
    if record is None:
        return KeyLookup("missing", reason=f"no key record at {text}")
    return KeyLookup("ok", record)


async def fetch_keys(resolver: Resolver, names: Iterable[bytes]) -> dict[bytes, KeyLookup]:
    """Look up every key name concurrently (each name once), keyed by ``key_name``."""
    unique = list(dict.fromkeys(names))
    if len(unique) == 1:  # the usual case: no Task for gather to make
        return {unique[0]: await _lookup(resolver, unique[0])}
    found = await asyncio.gather(*(_lookup(resolver, n) for n in unique))
    return dict(zip(unique, found, strict=True))


def make_dnsfunc(
    keys: Mapping[bytes, KeyLookup],
    veto: Callable[[bytes, bytes], str | None] | None = None,
) -> DNSFunc:
    """A dkimpy ``dnsfunc(name, timeout=5)`` that answers only from ``keys``.

    A lookup that failed temporarily raises ``KeyTempError`` (never a silent "bad
    signature"). A name that was not prefetched answers "no key": it can only come
    from a tag value dkimpy reads differently from mailgate, i.e. a malformed
    signature, and no DNS may happen inside the crypto. ``veto(name, record)`` may
    return a reason to withhold a key that mailgate's rules refuse (dkimpy then
    reports the signature invalid).
    """

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        key = name.rstrip(b".").lower()
        found = keys.get(key)
        if found is None:
            return None
        if found.status == "temp":
            raise KeyTempError(found.reason)
        if found.status != "ok" or found.record is None:
            return None
        if veto is not None and veto(key, found.record) is not None:
            return None
        return found.record

    return dnsfunc


_SIGNATURE_FIELDS = (b"dkim-signature", b"arc-seal", b"arc-message-signature")


def key_names(
    header_block: bytes,
    limit: int = 50,
    fields: Iterable[tuple[bytes, bytes]] | None = None,
) -> list[bytes]:
    """Key names named by the DKIM-Signature (first ``limit``) and ARC signature fields.

    ``fields`` is ``split_fields(header_block)`` when the caller has it already.
    Lenient by design: a field that does not parse is skipped here and judged by the
    check itself.
    """
    names: list[bytes] = []
    dkim_seen = 0
    for name, raw in split_fields(header_block) if fields is None else fields:
        if name not in _SIGNATURE_FIELDS:
            continue
        if name == b"dkim-signature":
            dkim_seen += 1
            if dkim_seen > limit:
                continue
        try:
            tags = parse_tags(raw.partition(b":")[2])
        except TagListError:
            continue
        if tags.get("s", b"").strip() and tags.get("d", b"").strip():
            names.append(key_name(tags["s"].strip(), tags["d"].strip()))
    return list(dict.fromkeys(names))
