"""ARCCheck and ARC sealing end to end: dkimpy chains, keys in the loopback DNS zone.

Chains are built with ``dkim.arc_sign`` as an intermediary would; keys are generated
at test time (ARC is RSA only).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import os
import re
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from filter.authresults import build
from filter.checks import Context
from filter.checks.arc import (
    ARCCheck,
    ARCSealDeclined,
    ARCSealError,
    arc_headers,
    seal,
    seal_key,
    seal_message,
    sign_set,
)
from filter.message import MessageBuffer
from filter.model import ClientInfo
from filter.policy.schema import ARCPolicy, DKIMPolicy, Policy
from filter.resolver import Resolver
from filter.results import CheckResult
from tests.rig.dnsserver import ZoneDNSServer

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: list@lists.example.org\r\n"
    b"Subject: meeting notes\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <notes.1@example.test>\r\n"
    b"\r\n"
    b"Notes attached.\r\n"
)

# What the first intermediary (a mailing list) concluded on receipt.
HOP1_AR = b"Authentication-Results: lists.example.org; dkim=pass header.d=example.test\r\n"


class RSAKey:
    def __init__(self, bits: int = 2048) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def list_key() -> RSAKey:
    return RSAKey()


@pytest.fixture(scope="module")
def our_key() -> RSAKey:
    return RSAKey()


def hop(msg: bytes, ar: bytes, selector: bytes, domain: bytes, pem: bytes) -> bytes:
    """What an intermediary relays: its ARC set + its A-R + the message."""
    srv_id = ar.split(b":", 1)[1].split(b";", 1)[0].strip()
    arc_set = dkim.arc_sign(ar + msg, selector, domain, pem, srv_id)
    assert arc_set, "dkimpy declined to seal"
    return b"".join(arc_set) + ar + msg


def _arc_sign_past_the_limit() -> Callable[..., list[bytes]]:
    """dkimpy's ``ARC.sign`` with its i=50 ceiling raised, for chains no sealer may make.

    dkimpy enforces RFC 8617 4.2.1 only when sealing; to see what the verifier does with
    a 51st set that is valid in every other respect, the test needs one. A copy of
    dkimpy's own method is compiled with the limit changed (dkimpy itself is untouched).
    """
    src = textwrap.dedent(inspect.getsource(dkim.ARC.sign))
    assert "INSTANCE_LIMIT = 50" in src, "dkimpy changed: rebuild this helper"
    namespace: dict[str, Any] = {}
    code = compile(src.replace("INSTANCE_LIMIT = 50", "INSTANCE_LIMIT = 99"), "arc_sign", "exec")
    exec(code, vars(dkim), namespace)
    return namespace["sign"]  # type: ignore[no-any-return]


def hops(msg: bytes, count: int, pem: bytes) -> bytes:
    """``count`` more valid ARC sets by lists.example.org, past i=50 if asked.

    Each hop's own A-R goes into its ARC set only: kept in the message, the next
    hop (same authserv-id) would find several arc= results and seal cv=fail.
    """
    sign = _arc_sign_past_the_limit()
    for _ in range(count):
        chained = b"\nARC-Seal:" in msg or msg.startswith(b"ARC-Seal:")
        ar = b"Authentication-Results: lists.example.org; arc=pass\r\n" if chained else HOP1_AR
        arc_set = sign(dkim.ARC(ar + msg), b"arc", b"lists.example.org", pem, b"lists.example.org")
        assert arc_set, "dkimpy declined to seal"
        msg = b"".join(arc_set) + msg
    return msg


@pytest.fixture(scope="module")
def fifty_sets(list_key: RSAKey) -> bytes:
    """MESSAGE after 50 hops: the longest chain RFC 8617 allows."""
    return hops(MESSAGE, 50, list_key.pem)


@pytest.fixture
def chain(dns_zone: ZoneDNSServer, list_key: RSAKey) -> bytes:
    """MESSAGE after one hop through lists.example.org (instance 1)."""
    dns_zone.add("arc._domainkey.lists.example.org", "TXT", list_key.record)
    return hop(MESSAGE, HOP1_AR, b"arc", b"lists.example.org", list_key.pem)


Run = Callable[..., Any]


@pytest.fixture
def run(resolver: Resolver) -> Run:
    async def run_check(
        msg: bytes,
        trusted: tuple[str, ...] = (),
        check: ARCCheck | None = None,
        min_key_bits: int = 1024,
    ) -> CheckResult:
        policy = dataclasses.replace(
            Policy(),
            arc=ARCPolicy(trusted_sealers=trusted),
            dkim=DKIMPolicy(min_key_bits=min_key_bits),
        )
        buf = MessageBuffer()
        buf.write(msg)
        ctx = Context(
            client=ClientInfo("192.0.2.1", 40000, "s1"),
            policy=policy,
            message=buf,
            resolver=resolver,
        )
        try:
            return await (check or ARCCheck()).run(ctx)
        finally:
            buf.close()

    return run_check


def our_policy(tmp_path: Path, key: RSAKey) -> ARCPolicy:
    path = tmp_path / "arc.pem"
    path.write_bytes(key.pem)
    return ARCPolicy(
        seal=True, seal_domain="mx.example.test", seal_selector="seal", seal_key_file=str(path)
    )


def dnsfunc_for(zone: dict[bytes, str]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        rec = zone.get(name.rstrip(b"."))
        return rec.encode() if rec else None

    return dnsfunc


# -- verification --------------------------------------------------------------------------
async def test_valid_chain_passes_and_names_the_sealer(chain: bytes, run: Run) -> None:
    res = await run(chain)
    assert res.result == "pass"
    assert res.data == {
        "cv": "pass",
        "sealer": "lists.example.org",
        "instance": 1,
        "trusted": False,
        "reason": "success",
        "remote_ip": "192.0.2.1",
        "oldest_pass": 0,
    }
    assert [s.name for s in res.symbols] == ["ARC_PASS"]


async def test_trusted_only_for_listed_sealers(chain: bytes, run: Run) -> None:
    assert (await run(chain, trusted=("LISTS.example.org.",))).data["trusted"] is True
    assert (await run(chain, trusted=("example.org", "other.test"))).data["trusted"] is False


async def test_tampered_after_sealing_fails_and_is_never_trusted(chain: bytes, run: Run) -> None:
    tampered = chain.replace(b"Notes attached.", b"Invoice attached.")
    res = await run(tampered, trusted=("lists.example.org",))
    assert res.result == "fail" and res.data["cv"] == "fail"
    assert res.data["trusted"] is False and res.data["sealer"] == "lists.example.org"
    assert [s.name for s in res.symbols] == ["ARC_FAIL"]


async def test_no_arc_headers_is_none(run: Run) -> None:
    res = await run(HOP1_AR + MESSAGE)
    assert res.result == "none"
    assert res.data == {
        "cv": "none",
        "sealer": "",
        "instance": 0,
        "trusted": False,
        "reason": "no ARC header fields",
        "remote_ip": "192.0.2.1",
        "oldest_pass": 0,
    }
    assert [s.name for s in res.symbols] == ["ARC_NONE"]


async def test_two_hop_chain_reports_the_latest_sealer(
    dns_zone: ZoneDNSServer, chain: bytes, run: Run, our_key: RSAKey
) -> None:
    dns_zone.add("fwd._domainkey.example.org", "TXT", our_key.record)
    ar2 = b"Authentication-Results: fwd.example.org; arc=pass\r\n"
    twice = hop(chain, ar2, b"fwd", b"example.org", our_key.pem)
    res = await run(twice, trusted=("example.org",))
    assert res.result == "pass"
    assert (res.data["sealer"], res.data["instance"], res.data["trusted"]) == (
        "example.org",
        2,
        True,
    )


async def test_missing_key_fails(run: Run, list_key: RSAKey) -> None:
    msg = hop(MESSAGE, HOP1_AR, b"nokey", b"lists.example.org", list_key.pem)
    assert (await run(msg)).result == "fail"


async def test_dkim_key_rules_apply_to_arc_keys(dns_zone: ZoneDNSServer, run: Run) -> None:
    key = RSAKey(1024)
    dns_zone.add("small._domainkey.lists.example.org", "TXT", key.record)
    dns_zone.add("sha1._domainkey.lists.example.org", "TXT", key.record + "; h=sha1")
    small = hop(MESSAGE, HOP1_AR, b"small", b"lists.example.org", key.pem)
    assert (await run(small)).result == "pass"  # 1024 is the RFC 8301 floor
    res = await run(small, min_key_bits=2048)  # the floor for ARC is [dkim] min_key_bits
    assert res.result == "fail" and "shorter than 2048" in res.data["reason"]
    sha1 = hop(MESSAGE, HOP1_AR, b"sha1", b"lists.example.org", key.pem)
    res = await run(sha1)
    assert res.result == "fail" and "h= does not allow sha256" in res.data["reason"]


async def test_dns_timeout_on_a_key_is_temperror(
    dns_zone: ZoneDNSServer, chain: bytes, run: Run
) -> None:
    dns_zone.set_name_mode("arc._domainkey.lists.example.org", "timeout")
    res = await run(chain, trusted=("lists.example.org",))
    assert res.result == "temperror"
    assert res.data["cv"] == "fail" and res.data["trusted"] is False
    assert [s.name for s in res.symbols] == ["ARC_TEMPERROR"]


async def test_fifty_sets_pass_a_fifty_first_fails_even_for_a_trusted_sealer(
    dns_zone: ZoneDNSServer, fifty_sets: bytes, list_key: RSAKey, run: Run
) -> None:
    """RFC 8617 4.2.1: i= is 1 to 50; 5.2: an invalid set fails the chain. dkimpy
    validated a 51st set, and a trusted sealer's 51-set chain overrode DMARC p=reject."""
    dns_zone.add("arc._domainkey.lists.example.org", "TXT", list_key.record)
    trusted = ("lists.example.org",)
    res = await run(fifty_sets, trusted=trusted)
    assert (res.result, res.data["instance"], res.data["trusted"]) == ("pass", 50, True)
    fifty_one = hops(fifty_sets, 1, list_key.pem)
    assert b"ARC-Seal: i=51;" in fifty_one
    res = await run(fifty_one, trusted=trusted)
    assert res.result == "fail" and res.data["cv"] == "fail"
    assert res.data["trusted"] is False  # so DMARC's trusted-sealer override cannot apply
    assert "i=51" in res.data["reason"] and "RFC 8617 4.2.1" in res.data["reason"]
    assert [s.name for s in res.symbols] == ["ARC_FAIL"]


def _renumber(msg: bytes, field: bytes, new: bytes) -> bytes:
    """``field``'s (or every ARC field's, for b"ARC-") ``i=1;`` replaced by ``new``."""
    pattern = re.escape(field) + rb"[A-Za-z-]*: )i=1;"
    return re.sub(b"(" + pattern, rb"\g<1>" + new, msg)


@pytest.mark.parametrize(
    ("field", "new", "shown"),
    [
        (b"ARC-", b"i=0;", "i=0"),  # was "none": dkimpy skips fields it cannot number
        (b"ARC-Seal", b"i=x;", "i=x"),
        (b"ARC-Message-Signature", b"", "no i= tag"),
        (b"ARC-Authentication-Results", b"i=51;", "i=51"),
        (b"ARC-", b"i=99999;", "i=99999"),
    ],
)
async def test_a_field_without_an_instance_from_1_to_50_fails(
    chain: bytes, run: Run, field: bytes, new: bytes, shown: str
) -> None:
    """RFC 8617 4.2.1 / 5.2: ARC fields are present, so the result is never "none"; a
    field whose i= is missing, not a number or outside 1..50 makes the chain fail,
    decided before any key is looked up."""
    bad = _renumber(chain, field, new)
    assert bad != chain
    res = await run(bad, trusted=("lists.example.org",))
    assert res.result == "fail" and res.data["cv"] == "fail" and res.data["trusted"] is False
    assert shown in res.data["reason"] and "RFC 8617 4.2.1" in res.data["reason"]
    assert [s.name for s in res.symbols] == ["ARC_FAIL"]


@pytest.mark.parametrize(
    ("value", "instance"),
    [
        (b" (forwarded by the list) i=1; lists.example.org; arc=none", b"1"),
        (b" (a (nested) \\) comment)i = 2 (two); mx.example; arc=pass", b"2"),
        (b"\r\n\t(folded)\r\n\ti=3;\r\n\tmx.example; arc=pass", b"3"),
        (b" (i=9; a comment is no instance) i=4; mx.example; arc=pass", b"4"),
    ],
)
def test_a_comment_around_the_aar_instance_is_cfws(value: bytes, instance: bytes) -> None:
    """RFC 8617 4.1.1 allows CFWS around the AAR's i=; the old pattern, anchored at
    "i=", read "(comment) i=1;" as a field without an instance: the chain failed."""
    fields = arc_headers(b"ARC-Authentication-Results:" + value + b"\r\n")
    assert fields == [(b"arc-authentication-results", {"i": instance})]


def test_an_unclosed_comment_before_the_aar_instance_is_no_instance() -> None:
    fields = arc_headers(b"ARC-Authentication-Results: (open i=1; mx.example; arc=none\r\n")
    assert fields == [(b"arc-authentication-results", {})]


async def test_a_chain_whose_aar_starts_with_a_comment_passes(
    dns_zone: ZoneDNSServer, list_key: RSAKey, run: Run
) -> None:
    dns_zone.add("arc._domainkey.lists.example.org", "TXT", list_key.record)
    aar = b" (forwarded by the list) i=1; lists.example.org; dkim=pass header.d=example.test"
    arc_set = sign_set(
        dkim.ARC(MESSAGE), 1, b"none", aar, b"arc", b"lists.example.org", list_key.pem
    )
    msg = b"".join(arc_set) + MESSAGE
    zone = {b"arc._domainkey.lists.example.org": list_key.record}
    assert dkim.arc_verify(msg, dnsfunc=dnsfunc_for(zone))[0] == b"pass"  # as dkimpy reads it
    res = await run(msg)
    assert (res.result, res.data["instance"], res.data["reason"]) == ("pass", 1, "success")


async def test_oldest_pass_names_the_oldest_signature_still_valid(
    dns_zone: ZoneDNSServer, chain: bytes, run: Run, our_key: RSAKey
) -> None:
    """RFC 8617 header.oldest-pass: a list tagged the Subject after hop 1 signed it;
    hop 2 sealed that. The chain passes (seals are intact), AMS 1 no longer
    validates, AMS 2 does: oldest-pass=2. Without the edit every AMS passes: 0."""
    dns_zone.add("fwd._domainkey.example.org", "TXT", our_key.record)
    ar2 = b"Authentication-Results: fwd.example.org; arc=pass\r\n"
    edited = chain.replace(b"Subject: meeting notes", b"Subject: [list] meeting notes")
    assert edited != chain
    res = await run(hop(edited, ar2, b"fwd", b"example.org", our_key.pem))
    assert (res.result, res.data["instance"], res.data["oldest_pass"]) == ("pass", 2, 2)
    field = build({"arc": res}, "mx.example.test")
    assert field.endswith(b"\tarc=pass header.oldest-pass=2 smtp.remote-ip=192.0.2.1\r\n")
    res = await run(hop(chain, ar2, b"fwd", b"example.org", our_key.pem))
    assert (res.result, res.data["oldest_pass"]) == ("pass", 0)
    assert build({"arc": res}, "mx").endswith(b"\tarc=pass smtp.remote-ip=192.0.2.1\r\n")


# -- sealing -------------------------------------------------------------------------------
async def test_seal_output_verifies(
    tmp_path: Path, our_key: RSAKey, run: Run, dns_zone: ZoneDNSServer
) -> None:
    policy = our_policy(tmp_path, our_key)
    ar = b"Authentication-Results: mx.example.test; dkim=none; arc=none\r\n"
    arc_set = seal(MESSAGE, ar, policy, seal_key(policy))
    names = [h.split(b":", 1)[0] for h in arc_set]
    assert names == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    assert all(h.endswith(b"\r\n") for h in arc_set)
    sealed = b"".join(arc_set) + ar + MESSAGE
    zone = {b"seal._domainkey.mx.example.test": our_key.record}
    cv, _, why = dkim.arc_verify(sealed, dnsfunc=dnsfunc_for(zone))
    assert (cv, why) == (b"pass", "success")
    dns_zone.add("seal._domainkey.mx.example.test", "TXT", our_key.record)
    res = await run(sealed)
    assert (res.result, res.data["sealer"], res.data["instance"]) == ("pass", "mx.example.test", 1)


async def test_seal_extends_an_incoming_chain(
    tmp_path: Path, chain: bytes, our_key: RSAKey, list_key: RSAKey
) -> None:
    policy = our_policy(tmp_path, our_key)
    ar = b"authentication-results: mx.example.test; arc=pass\r\n"  # any case of the name
    arc_set = seal(chain, ar, policy, seal_key(policy))
    assert b" i=2;" in arc_set[0]
    zone = {
        b"seal._domainkey.mx.example.test": our_key.record,
        b"arc._domainkey.lists.example.org": list_key.record,
    }
    cv, results, _ = dkim.arc_verify(b"".join(arc_set) + ar + chain, dnsfunc=dnsfunc_for(zone))
    assert cv == b"pass" and len(results) == 2


def test_seal_without_arc_result_on_a_chain_is_declined(
    tmp_path: Path, chain: bytes, our_key: RSAKey
) -> None:
    policy = our_policy(tmp_path, our_key)
    ar = b"Authentication-Results: mx.example.test; dkim=pass header.d=example.test\r\n"
    with pytest.raises(ARCSealDeclined, match="no arc= result"):  # documented contract
        seal(chain, ar, policy, seal_key(policy))


def test_seal_declines_a_chain_it_could_not_validate(
    tmp_path: Path, chain: bytes, our_key: RSAKey
) -> None:
    """RFC 8617: a sealer must not record a chain state it could not determine. Our
    A-R said arc=fail for a DNS temperror and the seal said cv=fail, which ends the
    chain for every later hop; now arc=temperror is declined (logged at info)."""
    policy = our_policy(tmp_path, our_key)
    ar = b"Authentication-Results: mx.example.test; arc=temperror smtp.remote-ip=192.0.2.1\r\n"
    with pytest.raises(ARCSealDeclined, match="temperror") as caught:
        seal(chain, ar, policy, seal_key(policy))
    assert caught.value.declined is True


def test_seal_adds_no_set_after_a_seal_that_said_cv_fail(
    tmp_path: Path, chain: bytes, our_key: RSAKey
) -> None:
    """RFC 8617 5.1: once the newest ARC-Seal says cv=fail the chain has ended; no
    further sets. A chain that is merely broken (no cv=fail yet) is still sealed
    cv=fail, over our own set only (5.1.2)."""
    policy = our_policy(tmp_path, our_key)
    failed_ar = b"Authentication-Results: fwd.example.org; arc=fail\r\n"
    dead = hop(chain, failed_ar, b"fwd", b"example.org", our_key.pem)
    assert b"ARC-Seal: i=2; cv=fail;" in dead
    ar = b"Authentication-Results: mx.example.test; arc=fail\r\n"
    with pytest.raises(ARCSealDeclined, match=r"i=2\) already says cv=fail"):
        seal(dead, ar, policy, seal_key(policy))
    broken = chain.replace(b"Notes attached.", b"Invoice attached.")
    arc_set = seal(broken, ar, policy, seal_key(policy))
    assert arc_set[0].startswith(b"ARC-Seal: i=2; cv=fail;")


def test_seal_signs_our_authentication_results_verbatim(
    tmp_path: Path, chain: bytes, our_key: RSAKey, list_key: RSAKey
) -> None:
    """The AAR is our A-R payload byte for byte after "i=N; ". dkimpy's arc_sign
    re-rendered it through authres, which writes a quoted value holding "@" bare:
    a null sender's HELO ``x;dmarc=pass@evil.example`` turned into a dmarc=pass
    clause in the signed AAR, and comments were dropped."""
    policy = our_policy(tmp_path, our_key)
    helo = "x;dmarc=pass@evil.example"
    spf = {"identity": "helo", "smtp.helo": helo, "smtp.mailfrom": f"postmaster@{helo}"}
    sigs = [{"result": "fail", "d": "example.test", "s": "sel", "testing": True}]
    results = {
        "spf": CheckResult("spf", "none", data=spf),
        "dkim": CheckResult("dkim", "none", data={"signatures": sigs}),
        "arc": CheckResult("arc", "pass", data={"remote_ip": "2001:db8::25"}),
    }
    ar = build(results, "mx.example.test")
    assert f'smtp.helo="{helo}"'.encode() in ar and b"(key in testing mode)" in ar
    payload = ar.split(b":", 1)[1].lstrip(b" ")
    arc_set = seal(chain, ar, policy, seal_key(policy))
    assert arc_set[2] == b"ARC-Authentication-Results: i=2; " + payload
    zone = {
        b"seal._domainkey.mx.example.test": our_key.record,
        b"arc._domainkey.lists.example.org": list_key.record,
    }
    cv, sets, why = dkim.arc_verify(b"".join(arc_set) + ar + chain, dnsfunc=dnsfunc_for(zone))
    assert (cv, why, len(sets)) == (b"pass", "success", 2)
    aar = arc_set[2].decode().replace("\r\n", "").split(";", 1)[1]
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results:" + aar)
    assert [r.method for r in parsed.results] == ["spf", "dkim", "arc"]  # no dmarc clause
    assert parsed.results[0].properties[0].value == helo


def test_seal_key_is_cached_until_the_file_changes(tmp_path: Path, our_key: RSAKey) -> None:
    policy = our_policy(tmp_path, our_key)
    first = seal_key(policy)
    assert seal_key(policy) is first
    other = RSAKey()
    path = Path(policy.seal_key_file)
    path.write_bytes(other.pem)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert seal_key(policy) == other.pem


def test_seal_key_errors(tmp_path: Path) -> None:
    missing = ARCPolicy(seal_key_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ARCSealError, match=r"nope\.pem"):
        seal_key(missing)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(ARCSealError, match="not a PEM RSA private key"):
        seal_key(ARCPolicy(seal_key_file=str(junk)))


# -- big messages --------------------------------------------------------------------------
class TracingExecutor(ThreadPoolExecutor):
    """The loop's default executor, recording which functions ran on which thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.ran: list[tuple[str, str]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        inner = getattr(fn, "args", (None,))  # to_thread: partial(context.run, func, ...)
        label = getattr(inner[0] if inner else None, "__name__", repr(fn))

        def traced(*a: Any, **k: Any) -> Any:
            self.ran.append((label, threading.current_thread().name))
            return fn(*a, **k)

        return super().submit(traced, *args, **kwargs)


async def test_big_message_is_verified_and_sealed_in_a_worker_thread(
    dns_zone: ZoneDNSServer, tmp_path: Path, list_key: RSAKey, our_key: RSAKey, run: Run
) -> None:
    ex = TracingExecutor()
    asyncio.get_running_loop().set_default_executor(ex)
    try:
        dns_zone.add("arc._domainkey.lists.example.org", "TXT", list_key.record)
        big = MESSAGE + (b"y" * 998 + b"\r\n") * 600
        chained = hop(big, HOP1_AR, b"arc", b"lists.example.org", list_key.pem)
        started = time.perf_counter()
        res = await run(chained)
        assert res.result == "pass", res.data
        policy = our_policy(tmp_path, our_key)
        ar = b"Authentication-Results: mx.example.test; arc=pass\r\n"
        arc_set = await seal_message(chained, ar, policy)
        assert len(arc_set) == 3
        assert time.perf_counter() - started < 30
    finally:
        ex.shutdown(wait=True)
    main = threading.main_thread().name
    labels = {label for label, thread in ex.ran if thread != main}
    assert {"_verify", "seal"} <= labels
