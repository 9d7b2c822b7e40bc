"""DKIMCheck end to end: dkimpy signatures, keys in a real loopback DNS zone, our resolver.

Key material is generated per test run (never stored in the repository). Signatures
dkimpy refuses to make (no From in h=, an x= tag) are built with dkimpy's own header
generator, and a control case shows the same helper's signature passing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from filter.authresults import build
from filter.checks import Context
from filter.checks.dkim import DKIMCheck
from filter.dkimkeys import key_names
from filter.message import MessageBuffer
from filter.model import ClientInfo
from filter.policy.schema import DKIMPolicy, Policy
from filter.resolver import Resolver
from filter.results import CheckResult
from tests.rig.dnsserver import ZoneDNSServer

DOMAIN = b"example.test"

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <figures.1@example.test>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
    b"Regards, Alice\r\n"
)


# -- key material --------------------------------------------------------------------------
def _probable_prime(bits: int) -> int:
    """Miller-Rabin; only for the deliberately weak keys cryptography refuses to make."""
    while True:
        n = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if any(n % p == 0 for p in (3, 5, 7, 11, 13, 17, 19, 23)) or (n - 1) % 65537 == 0:
            continue
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(40):
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            return n


def weak_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key below cryptography's 1024-bit generation floor (it still loads one)."""
    p, q = _probable_prime(bits // 2), _probable_prime(bits // 2)
    e, n = 65537, p * q
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n)
    )
    return numbers.private_key()


class RSAKey:
    """A fresh RSA key: ``pem`` for dkimpy signing, ``record`` for the DNS TXT."""

    def __init__(self, bits: int = 2048) -> None:
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=bits)
            if bits >= 1024
            else weak_rsa_key(bits)
        )
        self.pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.p = base64.b64encode(der).decode()
        self.record = f"v=DKIM1; k=rsa; p={self.p}"


class EdKey:
    """A fresh ed25519 key in dkimpy's format (base64 seed) and RFC 8463 p=."""

    def __init__(self) -> None:
        sk = nacl.signing.SigningKey.generate()
        self.private = sk.encode(encoder=nacl.encoding.Base64Encoder)
        p = sk.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
        self.record = f"v=DKIM1; k=ed25519; p={p}"


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey(2048)


@pytest.fixture(scope="module")
def rsa_key_b() -> RSAKey:
    return RSAKey(1024)


def publish(zone: ZoneDNSServer, selector: str, record: str, domain: str = "example.test") -> None:
    zone.add(f"{selector}._domainkey.{domain}", "TXT", record)


def sign(msg: bytes, selector: bytes, pem: bytes, domain: bytes = DOMAIN, **kw: Any) -> bytes:
    return bytes(dkim.sign(msg, selector, domain, pem, **kw)) + msg


def sign_custom(
    msg: bytes,
    selector: bytes,
    pem: bytes,
    include: list[bytes],
    extra: Sequence[tuple[bytes, bytes]] = (),
    private: dict[str, int] | None = None,
) -> bytes:
    """An rsa-sha256 signature with exactly these h= and extra tags (dkimpy refuses some).

    ``private`` replaces the key parsed from ``pem`` (numbers no PEM can hold).
    """
    d = dkim.DKIM(msg)
    d.hasher = hashlib.sha256
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(d.body)).digest())
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", DOMAIN),
        (b"s", selector),
        *extra,
        (b"h", b" : ".join(include)),
        (b"bh", bh),
        (b"b", b"0" * 60),
    ]
    key = private if private is not None else parse_pem_private_key(pem)
    value = d.gen_header(fields, include, canon, b"DKIM-Signature", key)
    return b"DKIM-Signature: " + bytes(value) + msg


# -- running the check ---------------------------------------------------------------------
Run = Callable[..., Any]


@pytest.fixture
def run(resolver: Resolver) -> Run:
    async def run_check(
        msg: bytes,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
        check: DKIMCheck | None = None,
    ) -> CheckResult:
        buf = MessageBuffer()
        buf.write(msg)
        ctx = Context(
            client=ClientInfo("192.0.2.1", 40000, "s1"),
            policy=policy or Policy(),
            message=buf,
            resolver=resolver,
            clock=clock,
        )
        try:
            return await (check or DKIMCheck()).run(ctx)
        finally:
            buf.close()

    return run_check


def sigs(res: CheckResult) -> list[dict[str, Any]]:
    return res.data["signatures"]  # type: ignore[return-value]


def symbol_names(res: CheckResult) -> list[str]:
    return [s.name for s in res.symbols]


# -- pass ----------------------------------------------------------------------------------
async def test_rsa_sha256_pass(dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem)
    res = await run(signed)
    assert res.result == "pass"
    (sig,) = sigs(res)
    b_tag = dkim.util.parse_tag_value(dkim.rfc822_parse(signed)[0][0][1])[b"b"]
    assert sig["result"] == "pass" and sig["d"] == "example.test" and sig["s"] == "sel"
    assert sig["a"] == "rsa-sha256" and sig["i"] == "@example.test" and sig["l"] is None
    assert sig["b"] == b"".join(b_tag.split())[:8].decode() and len(sig["b"]) == 8
    assert sig["key_bits"] == 2048
    (symbol,) = res.symbols
    assert symbol.name == "DKIM_PASS" and symbol.score == -0.5
    assert symbol.detail == "d=example.test"
    assert res.data["offloaded"] is False


async def test_ed25519_sha256_pass(dns_zone: ZoneDNSServer, run: Run) -> None:
    key = EdKey()
    publish(dns_zone, "ed", key.record)
    signed = sign(MESSAGE, b"ed", key.private, signature_algorithm=b"ed25519-sha256")
    res = await run(signed)
    assert res.result == "pass"
    assert sigs(res)[0]["a"] == "ed25519-sha256" and sigs(res)[0]["key_bits"] == 256


async def test_dual_rsa_and_ed25519_both_pass(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    key = EdKey()
    publish(dns_zone, "ed", key.record)
    publish(dns_zone, "sel", rsa_key.record)
    once = sign(MESSAGE, b"ed", key.private, signature_algorithm=b"ed25519-sha256")
    twice = sign(once, b"sel", rsa_key.pem)
    res = await run(twice)
    assert [s["result"] for s in sigs(res)] == ["pass", "pass"]
    assert [s["a"] for s in sigs(res)] == ["rsa-sha256", "ed25519-sha256"]  # top first


# -- fail ----------------------------------------------------------------------------------
async def test_tampered_body_fails(dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem).replace(b"numbers are in", b"numbers are up")
    res = await run(signed)
    assert res.result == "fail"
    assert sigs(res)[0]["reason"] == "body hash mismatch"
    assert symbol_names(res) == ["DKIM_FAIL"]


async def test_tampered_signed_header_fails(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem).replace(b"quarterly figures", b"wire money now")
    res = await run(signed)
    assert res.result == "fail"
    assert sigs(res)[0]["reason"] == "signature did not verify"


async def test_signature_made_with_another_key_fails(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, rsa_key_b: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key_b.record)
    res = await run(sign(MESSAGE, b"sel", rsa_key.pem))
    assert res.result == "fail"


# -- permerror: mailgate's own rules -------------------------------------------------------
async def test_512_bit_key_is_permerror(dns_zone: ZoneDNSServer, run: Run) -> None:
    weak = RSAKey(512)
    publish(dns_zone, "weak", weak.record)
    res = await run(sign(MESSAGE, b"weak", weak.pem))
    assert res.result == "permerror"
    assert "512 bits" in sigs(res)[0]["reason"] and sigs(res)[0]["key_bits"] == 512
    assert symbol_names(res) == ["DKIM_PERMERROR"]


async def test_policy_minimum_above_1024(
    dns_zone: ZoneDNSServer, run: Run, rsa_key_b: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key_b.record)
    signed = sign(MESSAGE, b"sel", rsa_key_b.pem)
    assert (await run(signed)).result == "pass"  # 1024 is the RFC 8301 floor
    strict = dataclasses.replace(Policy(), dkim=DKIMPolicy(min_key_bits=2048))
    res = await run(signed, policy=strict)
    assert res.result == "permerror" and "shorter than 2048" in sigs(res)[0]["reason"]


async def test_rsa_sha1_is_permerror_without_a_key_lookup(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem, signature_algorithm=b"rsa-sha1")
    assert dkim.verify(signed, dnsfunc=lambda n, timeout=5: rsa_key.record.encode())  # dkimpy: ok
    res = await run(signed)
    assert res.result == "permerror"
    assert sigs(res)[0]["a"] == "rsa-sha1" and "RFC 8301" in sigs(res)[0]["reason"]
    assert dns_zone.count("sel._domainkey.example.test") == 0


async def test_expired_signature_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    now = int(time.time())
    headers = [b"from", b"to", b"subject"]
    live = sign_custom(MESSAGE, b"sel", rsa_key.pem, headers, [(b"x", str(now + 60).encode())])
    assert (await run(live)).result == "pass"  # the helper's signatures are sound
    later = await run(live, clock=lambda: now + 61.0)  # our clock, no dkimpy grace period
    assert later.result == "permerror" and "expired" in sigs(later)[0]["reason"]
    dead = sign_custom(MESSAGE, b"sel", rsa_key.pem, headers, [(b"x", str(now - 3600).encode())])
    assert (await run(dead)).result == "permerror"


async def test_x_not_later_than_t_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """RFC 6376 3.5: x= MUST be greater than t=; equal was accepted."""
    publish(dns_zone, "sel", rsa_key.record)
    now = int(time.time())
    headers = [b"from", b"to", b"subject"]

    def with_t_x(t: int, x: int) -> bytes:
        extra = [(b"t", str(t).encode()), (b"x", str(x).encode())]
        return sign_custom(MESSAGE, b"sel", rsa_key.pem, headers, extra)

    def clock() -> float:  # "now" stays put however slow the run is
        return float(now)

    assert (await run(with_t_x(now + 60, now + 61), clock=clock)).result == "pass"
    res = await run(with_t_x(now + 60, now + 60), clock=clock)
    assert res.result == "permerror"
    assert sigs(res)[0]["reason"] == "x= is not later than t="
    assert symbol_names(res) == ["DKIM_PERMERROR"]


async def test_from_not_signed_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign_custom(MESSAGE, b"sel", rsa_key.pem, [b"to", b"subject"])
    assert dkim.verify(signed, dnsfunc=lambda n, timeout=5: rsa_key.record.encode())  # dkimpy: ok
    res = await run(signed)
    assert res.result == "permerror" and "From" in sigs(res)[0]["reason"]


async def test_no_key_record_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    res = await run(sign(MESSAGE, b"nokey", rsa_key.pem))
    assert res.result == "permerror" and "no key record" in sigs(res)[0]["reason"]


async def test_revoked_key_is_permerror(dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey) -> None:
    publish(dns_zone, "old", "v=DKIM1; k=rsa; p=")
    res = await run(sign(MESSAGE, b"old", rsa_key.pem))
    assert res.result == "permerror" and "revoked" in sigs(res)[0]["reason"]


async def test_key_h_tag_without_sha256_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "sel", f"v=DKIM1; h=sha1; p={rsa_key.p}")
    res = await run(sign(MESSAGE, b"sel", rsa_key.pem))
    assert res.result == "permerror" and "h=" in sigs(res)[0]["reason"]


async def test_key_t_s_forbids_subdomain_identity(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "strict", f"v=DKIM1; t=s; p={rsa_key.p}")
    sub = sign(MESSAGE, b"strict", rsa_key.pem, identity=b"news@mail.example.test")
    res = await run(sub)
    assert res.result == "permerror" and "t=s" in sigs(res)[0]["reason"]
    assert sigs(res)[0]["i"] == "news@mail.example.test"
    same = sign(MESSAGE, b"strict", rsa_key.pem, identity=b"news@example.test")
    assert (await run(same)).result == "pass"


async def test_ed25519_signature_with_rsa_key_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "mixed", rsa_key.record)
    signed = sign(MESSAGE, b"mixed", EdKey().private, signature_algorithm=b"ed25519-sha256")
    res = await run(signed)
    assert res.result == "permerror" and "does not match" in sigs(res)[0]["reason"]


async def test_garbage_signature_is_permerror(run: Run) -> None:
    res = await run(b"DKIM-Signature: v=1; v=2; what\r\n" + MESSAGE)
    assert res.result == "permerror" and "syntax" in sigs(res)[0]["reason"]


# -- several signatures --------------------------------------------------------------------
async def test_one_good_one_bad_is_pass_with_both_listed(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, rsa_key_b: RSAKey
) -> None:
    publish(dns_zone, "good", rsa_key.record)
    publish(dns_zone, "bad", rsa_key_b.record)
    # "bad" signs with a key other than the published one: a broken signature.
    once = sign(MESSAGE, b"bad", rsa_key.pem)
    twice = sign(once, b"good", rsa_key.pem)
    res = await run(twice)
    assert res.result == "pass"
    assert [(s["s"], s["result"]) for s in sigs(res)] == [("good", "pass"), ("bad", "fail")]
    assert symbol_names(res) == ["DKIM_PASS"]


async def test_keys_are_fetched_once_each(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "a", rsa_key.record)
    publish(dns_zone, "a", rsa_key.record, domain="example.org")
    msg = sign(MESSAGE, b"a", rsa_key.pem)
    msg = sign(msg, b"a", rsa_key.pem, domain=b"example.org")
    msg = sign(msg, b"a", rsa_key.pem)  # same key name as the first: one lookup
    res = await run(msg)
    assert [s["result"] for s in sigs(res)] == ["pass"] * 3
    assert dns_zone.count("a._domainkey.example.test", "TXT") == 1
    assert dns_zone.count("a._domainkey.example.org", "TXT") == 1


async def test_prefetch_at_end_of_header_warms_the_cache(
    dns_zone: ZoneDNSServer, run: Run, resolver: Resolver, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "a", rsa_key.record)
    msg = sign(sign(MESSAGE, b"a", rsa_key.pem), b"nokey", rsa_key.pem)
    header = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    names = key_names(header)  # what the session looks up when the header block is in
    assert len(names) == 2
    await resolver.resolve_many([(n.decode(), "TXT") for n in names])
    assert [s["result"] for s in sigs(await run(msg))] == ["permerror", "pass"]
    assert dns_zone.count("a._domainkey.example.test", "TXT") == 1
    assert dns_zone.count("nokey._domainkey.example.test", "TXT") == 1


async def test_signatures_beyond_the_limit_are_ignored(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    for sel in ("s1", "s2", "s3"):
        publish(dns_zone, sel, rsa_key.record)
    msg = MESSAGE
    for selector in (b"s3", b"s2", b"s1"):
        msg = sign(msg, selector, rsa_key.pem)
    policy = dataclasses.replace(Policy(), dkim=DKIMPolicy(max_signatures=2))
    res = await run(msg, policy=policy)
    assert [s["s"] for s in sigs(res)] == ["s1", "s2"]
    assert res.data["ignored"] == 1
    assert dns_zone.count("s3._domainkey.example.test") == 0


async def test_no_signature_is_none(run: Run) -> None:
    res = await run(MESSAGE)
    assert res.result == "none" and sigs(res) == [] and symbol_names(res) == ["DKIM_NONE"]


# -- keys in testing mode ------------------------------------------------------------------
async def test_testing_mode_key_is_scored_like_an_unsigned_message(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """RFC 6376 3.6.1 (key t=y): verifiers "MUST NOT treat messages from Signers in
    testing mode differently from unsigned email, even should the signature fail to
    verify". A broken one scored DKIM_FAIL, a good one DKIM_PASS."""
    publish(dns_zone, "trial", f"{rsa_key.record}; t=y")
    good = sign(MESSAGE, b"trial", rsa_key.pem)
    broken = good.replace(b"numbers are in", b"numbers are up")
    for msg, verified in ((good, "pass"), (broken, "fail")):
        res = await run(msg)
        assert res.result == "none"
        assert symbol_names(res) == ["DKIM_NONE"] and res.symbols[0].score == 0
        assert "testing mode" in res.symbols[0].detail
        (sig,) = sigs(res)  # still listed, for Authentication-Results and tracking
        assert (sig["result"], sig["testing"]) == (verified, True)
        header = build({"dkim": res}, "mx.example.net").decode()
        assert f"dkim={verified} (key in testing mode) header.d=example.test" in header


async def test_testing_mode_signature_beside_others_does_not_count(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, rsa_key_b: RSAKey
) -> None:
    publish(dns_zone, "trial", f"{rsa_key.record}; t=y")
    publish(dns_zone, "prod", rsa_key_b.record)
    # A verified testing signature does not lift a broken production one to pass...
    msg = sign(sign(MESSAGE, b"prod", rsa_key.pem), b"trial", rsa_key.pem)
    res = await run(msg)
    assert [(s["s"], s["result"]) for s in sigs(res)] == [("trial", "pass"), ("prod", "fail")]
    assert res.result == "fail" and symbol_names(res) == ["DKIM_FAIL"]
    assert "trial" not in res.symbols[0].detail
    # ...and a broken testing signature does not spoil a good production one.
    msg = sign(sign(MESSAGE, b"trial", rsa_key_b.pem), b"prod", rsa_key_b.pem)
    res = await run(msg)
    assert [(s["s"], s["result"]) for s in sigs(res)] == [("prod", "pass"), ("trial", "fail")]
    assert res.result == "pass" and res.symbols[0].detail == "d=example.test"


# -- DNS trouble ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["timeout", "servfail"])
async def test_dns_failure_on_key_is_temperror_not_fail(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, mode: str
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    dns_zone.set_name_mode("sel._domainkey.example.test", mode)  # type: ignore[arg-type]
    res = await run(sign(MESSAGE, b"sel", rsa_key.pem))
    assert res.result == "temperror"
    assert sigs(res)[0]["result"] == "temperror"
    assert symbol_names(res) == ["DKIM_TEMPERROR"]


async def test_temperror_on_one_key_does_not_hide_a_pass(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "up", rsa_key.record)
    publish(dns_zone, "down", rsa_key.record)
    dns_zone.set_name_mode("down._domainkey.example.test", "timeout")
    msg = sign(sign(MESSAGE, b"down", rsa_key.pem), b"up", rsa_key.pem)
    res = await run(msg)
    assert res.result == "pass"
    assert [s["result"] for s in sigs(res)] == ["pass", "temperror"]


# -- l= ------------------------------------------------------------------------------------
async def test_body_length_is_noted(dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem, length=True)
    res = await run(signed + b"Appended by a list: unsubscribe here\r\n")
    assert res.result == "pass"  # l= covers only the first bytes: RFC 6376 8.2 risk, noted
    body = MESSAGE.split(b"\r\n\r\n", 1)[1]
    assert sigs(res)[0]["l"] == len(body)


@pytest.mark.parametrize(
    ("body", "extra"),
    [
        (b"The numbers are in.\r\n", 50),
        # Trailing empty lines are not part of the canonicalized body (RFC 6376 3.4.3/
        # 3.4.4): an l= of the raw length is already too large.
        (b"The numbers are in.\r\n\r\n\r\n", 0),
    ],
    ids=["50-octets-over", "raw-length-over-trailing-empty-lines"],
)
async def test_body_length_beyond_the_body_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, body: bytes, extra: int
) -> None:
    """RFC 6376 3.5: l= MUST NOT be larger than the canonicalized body. dkimpy hashed
    the whole body then and the signature passed."""
    publish(dns_zone, "sel", rsa_key.record)
    msg = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + body
    exact = sign(msg, b"sel", rsa_key.pem, length=True)  # dkimpy's l=: the canonical length
    assert (await run(exact)).result == "pass"
    length = str(len(body) + extra).encode()
    signed = sign_custom(msg, b"sel", rsa_key.pem, [b"from", b"to"], [(b"l", length)])
    res = await run(signed)
    assert res.result == "permerror" and symbol_names(res) == ["DKIM_PERMERROR"]
    assert "larger than the canonicalized body" in sigs(res)[0]["reason"]
    assert sigs(res)[0]["l"] == len(body) + extra


# -- big messages --------------------------------------------------------------------------
class TracingExecutor(ThreadPoolExecutor):
    """The loop's default executor, recording which functions ran on which thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.ran: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        # asyncio.to_thread submits functools.partial(contextvars_ctx.run, func, ...).
        inner = getattr(fn, "args", (None, None))
        label = getattr(inner[0] if inner else None, "__name__", repr(fn))

        def traced(*a: Any, **k: Any) -> Any:
            with self._lock:
                self.ran.append((label, threading.current_thread().name))
            return fn(*a, **k)

        return super().submit(traced, *args, **kwargs)


@pytest.fixture
async def tracing() -> AsyncIterator[TracingExecutor]:
    ex = TracingExecutor()
    asyncio.get_running_loop().set_default_executor(ex)
    yield ex
    ex.shutdown(wait=True)


async def test_one_megabyte_message_verifies_in_a_worker_thread(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, tracing: TracingExecutor
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    line = b"x" * 998 + b"\r\n"
    big = MESSAGE + line * (1024 * 1024 // len(line) + 1)
    assert len(big) > 1024 * 1024
    res = await run(sign(big, b"sel", rsa_key.pem))
    assert res.result == "pass" and res.data["offloaded"] is True
    main = threading.main_thread().name
    work = [thread for label, thread in tracing.ran if label == "_verify_all"]
    assert work and all(t != main for t in work)


async def test_small_message_verifies_on_the_loop(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, tracing: TracingExecutor
) -> None:
    publish(dns_zone, "sel", rsa_key.record)
    res = await run(sign(MESSAGE, b"sel", rsa_key.pem))
    assert res.result == "pass" and res.data["offloaded"] is False
    assert not [label for label, _ in tracing.ran if label == "_verify_all"]


# -- audit fixes: obsolete header syntax (RFC 5322 4.1, RFC 6376 3.4) ----------------------
LEGACY = MESSAGE.replace(b"Subject:", b"X-Legacy: 1\r\nSubject:")


async def test_whitespace_before_colon_verifies_under_relaxed(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """Relaxed header canonicalisation deletes WSP before the colon (RFC 6376 3.4.2),
    so adding it after signing keeps the signature. dkimpy's parser refused such a
    field: every signature of the message was a permerror. The signature is made on
    the message without the obsolete syntax, so the signer does not share our parser."""
    publish(dns_zone, "sel", rsa_key.record)
    include = [b"from", b"x-legacy", b"subject", b"to"]
    signed = sign(
        LEGACY, b"sel", rsa_key.pem, canonicalize=(b"relaxed", b"relaxed"), include_headers=include
    )
    obsolete = signed.replace(b"X-Legacy:", b"X-Legacy :").replace(b"\nFrom:", b"\nFrom\t:")
    assert obsolete != signed
    res = await run(obsolete)
    assert res.result == "pass", sigs(res)
    # The covered fields are still covered: a changed From : value breaks it.
    changed = obsolete.replace(b"From\t: Alice <alice@", b"From\t: Alice <mallory@")
    assert (await run(changed)).result == "fail"


async def test_whitespace_before_colon_is_hashed_under_simple(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """Simple header canonicalisation hashes a field unchanged (RFC 6376 3.4.1): the
    WSP before the colon is signed, and removing it breaks the signature."""
    publish(dns_zone, "sel", rsa_key.record)
    msg = LEGACY.replace(b"X-Legacy:", b"X-Legacy :").replace(b"From:", b"From :")
    include = [b"from", b"x-legacy", b"subject", b"to"]
    signed = sign(
        msg, b"sel", rsa_key.pem, canonicalize=(b"simple", b"simple"), include_headers=include
    )
    res = await run(signed)
    assert res.result == "pass", sigs(res)
    assert (await run(signed.replace(b"X-Legacy :", b"X-Legacy:"))).result == "fail"
    assert (await run(signed.replace(b"From :", b"From:"))).result == "fail"


@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
async def test_from_with_whitespace_before_colon_counts_for_h(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, canon: bytes
) -> None:
    """h= lists from, so the From field is covered, however its name is spelled. A
    signature over a message without From must not verify once ``From : x`` is added:
    dkimpy matched the raw name, so under simple canonicalisation it hashed no From
    and the added one rode along unsigned."""
    publish(dns_zone, "sel", rsa_key.record)
    no_from = MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b"")
    signed = sign(
        no_from,
        b"sel",
        rsa_key.pem,
        canonicalize=(canon, canon),
        include_headers=[b"from", b"to", b"subject"],
    )
    assert (await run(signed)).result == "pass"  # signed as it is: no From
    forged = signed.replace(b"To:", b"From : Mallory <ceo@example.test>\r\nTo:")
    res = await run(forged)
    assert res.result == "fail" and sigs(res)[0]["result"] == "fail", sigs(res)


async def test_signature_field_with_whitespace_before_colon_is_verified(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """A ``DKIM-Signature :`` field is a signature like any other (relaxed: the WSP
    is not part of the hashed name); it is found at the same index by mailgate and
    by dkimpy, beside an ordinary one."""
    publish(dns_zone, "sel", rsa_key.record)
    publish(dns_zone, "other", rsa_key.record)
    once = sign(MESSAGE, b"sel", rsa_key.pem, canonicalize=(b"relaxed", b"relaxed"))
    once = once.replace(b"DKIM-Signature:", b"DKIM-Signature :", 1)
    twice = sign(once, b"other", rsa_key.pem)
    res = await run(twice)
    assert [(s["s"], s["result"]) for s in sigs(res)] == [("other", "pass"), ("sel", "pass")]


# -- audit fixes: key records (RFC 6376 3.6.1, RFC 8601 2.7.1) -----------------------------
@pytest.mark.parametrize("services", ["email:tlsrpt", "tlsrpt:email", "tlsrpt : *", "email"])
async def test_key_service_list_with_email_passes(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey, services: str
) -> None:
    """s= is a colon-separated list; dkimpy compared the whole value with "email"
    and gave no key for s=email:tlsrpt (a permerror)."""
    publish(dns_zone, "svc", f"v=DKIM1; k=rsa; s={services}; p={rsa_key.p}")
    res = await run(sign(MESSAGE, b"svc", rsa_key.pem))
    assert res.result == "pass", sigs(res)


async def test_key_for_tlsrpt_only_is_permerror(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    publish(dns_zone, "svc", f"v=DKIM1; k=rsa; s=tlsrpt; p={rsa_key.p}")
    res = await run(sign(MESSAGE, b"svc", rsa_key.pem))
    assert res.result == "permerror" and "s= does not include email" in sigs(res)[0]["reason"]


async def test_upper_case_key_type_is_permerror_not_fail(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """RFC 6376 3.2: values are case-sensitive unless the tag says otherwise, and k=
    does not: "RSA" is an unknown key type, a key record to ignore (permerror, 6.1.2).
    mailgate accepted it, dkimpy refused it inside ``verify`` and returned False,
    which read as "fail" (RFC 8601 2.7.1 keeps fail for signatures that did not
    verify)."""
    publish(dns_zone, "upper", f"v=DKIM1; k=RSA; p={rsa_key.p}")
    res = await run(sign(MESSAGE, b"upper", rsa_key.pem))
    assert res.result == "permerror", sigs(res)
    assert "unknown key type k=RSA" in sigs(res)[0]["reason"]


async def test_rsa_key_with_exponent_one_is_permerror_not_a_forgery(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """With e=1 the padded digest itself is a valid "signature": anyone could sign for
    the domain. OpenSSL refuses such a key and the verification fell back to dkimpy's
    arithmetic, which passed the forgery. RFC 8017 3.1 (3 <= e): no RSA key at all."""
    real = serialization.load_pem_private_key(rsa_key.pem, None)
    assert isinstance(real, rsa.RSAPrivateKey)
    nums = real.private_numbers()
    n, p, q = nums.public_numbers.n, nums.p, nums.q
    # A bare RSAPublicKey (n, 1); cryptography will not encode e=1 itself.
    ints = b"".join(_der(0x02, x.to_bytes(x.bit_length() // 8 + 1, "big")) for x in (n, 1))
    publish(dns_zone, "e1", "v=DKIM1; k=rsa; p=" + base64.b64encode(_der(0x30, ints)).decode())
    # "Signing" with exponent 1 (dkimpy signs by CRT): the signature is the encoding.
    identity = {"modulus": n, "prime1": p, "prime2": q, "exponent1": 1, "exponent2": 1}
    identity["coefficient"] = pow(q, -1, p)
    forged = sign_custom(MESSAGE, b"e1", b"", [b"from", b"to", b"subject"], private=identity)
    res = await run(forged)
    assert res.result == "permerror", sigs(res)
    assert "not a usable RSA public key" in sigs(res)[0]["reason"]


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 128:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


# -- audit fixes: signature tags (RFC 6376 3.5) --------------------------------------------
async def test_identity_without_at_is_permerror_with_a_reason(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """i= is [local-part] "@" domain; without "@" dkimpy raised IndexError, which
    became the reason."""
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign_custom(MESSAGE, b"sel", rsa_key.pem, [b"from", b"to"], [(b"i", DOMAIN)])
    res = await run(signed)
    assert res.result == "permerror"
    reason = sigs(res)[0]["reason"]
    assert 'i= has no "@"' in reason and "IndexError" not in reason


async def test_query_method_list_with_dns_txt_passes(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """q= is a colon-separated list (RFC 6376 3.5); dkimpy wanted exactly "dns/txt"."""
    publish(dns_zone, "sel", rsa_key.record)
    ok = sign_custom(MESSAGE, b"sel", rsa_key.pem, [b"from", b"to"], [(b"q", b"dns/txt:x-new")])
    assert (await run(ok)).result == "pass"
    bad = sign_custom(MESSAGE, b"sel", rsa_key.pem, [b"from", b"to"], [(b"q", b"x-new")])
    res = await run(bad)
    assert res.result == "permerror" and "dns/txt" in sigs(res)[0]["reason"]


# -- audit fixes: header.b (RFC 6008 4) ----------------------------------------------------
async def test_header_b_tells_signatures_with_a_common_prefix_apart(
    dns_zone: ZoneDNSServer, run: Run, rsa_key: RSAKey
) -> None:
    """A forged field copying the first characters of a good signature's b= got the
    same header.b (b[:8]), so the Authentication-Results could not say which passed."""
    publish(dns_zone, "sel", rsa_key.record)
    signed = sign(MESSAGE, b"sel", rsa_key.pem)
    field = signed.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:", 1)[0] + b"\r\n"
    good_b = b"".join(dkim.util.parse_tag_value(field.partition(b":")[2])[b"b"].split())
    flipped = b"A" if good_b[12:13] != b"A" else b"B"
    fake_b = good_b[:12] + flipped + good_b[13:]
    head, _, _ = field.partition(b" b=")
    forged = head + b" b=" + fake_b + b"\r\n" + signed
    res = await run(forged)
    assert [s["result"] for s in sigs(res)] == ["fail", "pass"]
    fake, good = (s["b"] for s in sigs(res))
    assert fake != good and len(fake) == len(good) == 13
    assert fake_b.decode().startswith(fake) and good_b.decode().startswith(good)
    header = build({"dkim": res}, "mx.example.net").decode()
    for value in (fake, good):
        assert f"header.b={value}" in header or f'header.b="{value}"' in header
