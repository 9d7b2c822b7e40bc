"""The DNS layer and the checks on top of it against malformed and hostile DNS replies.

Every reply comes from ``tests/rig/hostiledns.py``, a raw UDP+TCP responder on
loopback that sends exactly the bytes a test builds. The properties asserted are
mailgate's, whatever dnspython does underneath: a reply that is not a sound answer
to the question is a temporary error (``DNSTempError``, check word "temperror"),
never "no such record", "not listed", fail or permerror; it is never cached (the
next lookup asks again); it costs at most the lookup's budget; and no exception but
``DNSTempError`` leaves the resolver.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import time
from collections.abc import Callable, Iterator

import dkim
import pytest

from filter.checks import Context
from filter.checks.dkim import DKIMCheck
from filter.checks.dnsbl import DNSBLCheck, ZoneHealth
from filter.checks.rdns import RDNSCheck, xclient_name
from filter.checks.spf import SPFCheck
from filter.dnsbl import ip_query_name
from filter.message import MessageBuffer
from filter.model import ClientInfo, Envelope
from filter.policy.schema import DEFAULT_POLICY, DNSBLPolicy, DNSBLZone, DNSPolicy, Policy
from filter.resolver import DNSResult, DNSTempError, Resolver, reverse_name
from filter.units import Address
from tests.rig.dkimkeys import rsa_dkim_key
from tests.rig.hostiledns import (
    CLOSE,
    HostileDNSServer,
    Msg,
    Query,
    Raw,
    Reply,
    encode_name,
    rr,
    soa_rdata,
    txt_rdata,
)

NAME = "x.hostile.test"
GOOD_IP = "192.0.2.1"


def a(ip: str) -> bytes:
    return bytes(int(x) for x in ip.split("."))


def good(q: Query) -> bytes:
    """The sound answer every ``bad then good`` case ends with."""
    if q.type_name == "TXT":
        return q.reply(answer=[rr(q.name, "TXT", txt_rdata(b"v=spf1 -all"))]).wire()
    return q.reply(answer=[rr(q.name, "A", a(GOOD_IP))]).wire()


def nxdomain(q: Query, **kw: object) -> bytes:
    soa = rr("hostile.test", "SOA", soa_rdata("hostile.test"), ttl=300)
    return q.reply(rcode=3, authority=[soa], **kw).wire()


def over_tcp(tcp_reply: Callable[[Query], Reply]) -> Callable[[Query], Reply]:
    """UDP says "truncated" (TC, question kept); the TCP retry gets ``tcp_reply``."""

    def respond(q: Query) -> Reply:
        return q.reply(tc=True).wire() if q.protocol == "udp" else tcp_reply(q)

    return respond


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Query], Reply]], HostileDNSServer]]:
    """``serve(responder)``: a started HostileDNSServer, stopped after the test."""
    servers: list[HostileDNSServer] = []

    def start(responder: Callable[[Query], Reply]) -> HostileDNSServer:
        srv = HostileDNSServer(responder).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    assert [e for srv in servers for e in srv.errors] == [], "a responder raised"


def resolver_for(srv: HostileDNSServer, timeout: float = 1.0) -> Resolver:
    return Resolver([Address(srv.host, srv.port)], timeout=timeout)


async def temp_error(r: Resolver, name: str = NAME, rtype: str = "A") -> DNSTempError:
    """The DNSTempError a lookup raises (and nothing else: any other exception fails)."""
    with pytest.raises(DNSTempError) as ei:
        await r.resolve(name, rtype)
    return ei.value


async def assert_not_cached(srv: HostileDNSServer, r: Resolver, rtype: str = "A") -> None:
    """The failed lookup left nothing behind: the next one goes to the server again."""
    assert len(r.cache) == 0
    before = srv.count()
    with pytest.raises(DNSTempError):
        await r.resolve(NAME, rtype)
    assert srv.count() > before


# -- replies that are no reply to the query (UDP) --------------------------------------------

# Each builds one bad datagram for a query; dnspython must neither take it as the answer
# nor give up on the real one that may follow.
UDP_BAD: dict[str, tuple[str, Callable[[Query], bytes]]] = {
    "garbage": ("A", lambda q: b"\xde\xad\xbe\xef" * 8),
    "empty datagram": ("A", lambda q: b""),
    "truncated header": ("A", lambda q: q.reply().wire()[:7]),
    "header only": ("A", lambda q: Msg(id=q.id).wire()),
    "wrong id": (
        "A",
        lambda q: q.reply(id=q.id ^ 0x5A5A, answer=[rr(q.name, "A", a("10.6.6.6"))]).wire(),
    ),
    "question names another name": (
        "A",
        lambda q: Msg(
            id=q.id,
            question=encode_name("victim.test") + struct.pack("!HH", 1, 1),
            answer=[rr("victim.test", "A", a("10.6.6.6"))],
        ).wire(),
    ),
    "question of another type": (
        "A",
        lambda q: Msg(
            id=q.id,
            question=encode_name(q.name) + struct.pack("!HH", 28, 1),
            answer=[rr(q.name, "AAAA", bytes(15) + b"\x01")],
        ).wire(),
    ),
    "QR bit clear": (
        "A",
        lambda q: q.reply(qr=False, answer=[rr(q.name, "A", a("10.6.6.6"))]).wire(),
    ),
    "opcode STATUS": (
        "A",
        lambda q: q.reply(opcode=2, answer=[rr(q.name, "A", a("10.6.6.6"))]).wire(),
    ),
    "A rdata of 3 octets": (
        "A",
        lambda q: q.reply(answer=[rr(q.name, "A", b"\x0a\x06\x06")]).wire(),
    ),
    "A rdata of 5 octets": (
        "A",
        lambda q: q.reply(answer=[rr(q.name, "A", b"\x0a\x06\x06\x06\x06")]).wire(),
    ),
    "TXT length byte past the rdata": (
        "TXT",
        lambda q: q.reply(answer=[rr(q.name, "TXT", b"\x40v=spf1 +all")]).wire(),
    ),
    "compression pointer loop": (
        # the owner name is a pointer to itself (offset 12 + question length)
        "A",
        lambda q: q.reply(
            answer=[rr(struct.pack("!H", 0xC000 | (12 + len(q.question))), "A", a("10.6.6.6"))]
        ).wire(),
    ),
    "compression pointer past the end": (
        "A",
        lambda q: q.reply(answer=[rr(b"\xc3\xff", "A", a("10.6.6.6"))]).wire(),
    ),
    "answer count larger than the records": (
        "A",
        lambda q: q.reply(answer=[rr(q.name, "A", a("10.6.6.6"))], ancount=5).wire(),
    ),
    "bytes after the message": (
        "A",
        lambda q: q.reply(answer=[rr(q.name, "A", a("10.6.6.6"))]).wire() + b"\x00\x00",
    ),
}


@pytest.mark.parametrize("case", list(UDP_BAD))
async def test_bad_udp_reply_alone_is_a_bounded_temp_error_and_not_cached(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], case: str
) -> None:
    rtype, bad = UDP_BAD[case]
    srv = serve(bad)
    r = resolver_for(srv, timeout=0.2)
    t0 = time.monotonic()
    err = await temp_error(r, rtype=rtype)
    assert time.monotonic() - t0 < 0.2 + 0.25  # the budget, not more
    assert err.reason == "timeout"  # the bad reply was dropped: nothing else came
    assert (err.name, err.rtype) == (NAME, rtype)
    assert srv.count() >= 1  # asked, and answered only badly
    assert len(r.cache) == 0 and r.peek(NAME, rtype) is None


@pytest.mark.parametrize("case", list(UDP_BAD))
async def test_bad_udp_reply_does_not_hide_the_real_answer_after_it(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], case: str
) -> None:
    """A forged or broken datagram first (an off-path attacker racing the resolver):
    the lookup neither fails on it nor takes its data, and gets the real answer."""
    rtype, bad = UDP_BAD[case]
    srv = serve(lambda q: [bad(q), good(q)])
    r = resolver_for(srv)
    res = await r.resolve(NAME, rtype)
    assert res.outcome == "ok"
    assert res.data == (((b"v=spf1 -all",),) if rtype == "TXT" else (GOOD_IP,))
    assert srv.count() == 1  # one query, answered: no retry was needed


@pytest.mark.parametrize(
    ("rcode", "reason"), [(1, "formerr"), (4, "notimp"), (11, "dsotypeni"), (15, "15")]
)
async def test_error_rcodes_are_temp_errors(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], rcode: int, reason: str
) -> None:
    srv = serve(lambda q: q.reply(rcode=rcode).wire())
    r = resolver_for(srv)
    assert (await temp_error(r)).reason == reason
    await assert_not_cached(srv, r)


# -- TCP after truncation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "tcp_reply", "reason"),
    [
        ("garbage", lambda q: b"\xff" * 40, "malformed answer"),
        ("one byte", lambda q: b"g", "malformed answer"),
        ("closed at once", lambda q: CLOSE, "network: connection closed"),
        (
            "length prefix larger than the message, then closed",
            lambda q: Raw(struct.pack("!H", 4000) + good(q), close=True),
            "network: connection closed",
        ),
        # dnspython takes a TCP reply as it comes: an empty one with TC read as NODATA
        (
            "truncated again",
            lambda q: q.reply(tc=True).wire(),
            "malformed answer: truncated reply over TCP",
        ),
        (
            "wrong id",
            lambda q: q.reply(id=q.id ^ 1, answer=[rr(q.name, "A", a("10.6.6.6"))]).wire(),
            "malformed answer",
        ),
        (
            "question names another name",
            lambda q: Msg(
                id=q.id,
                question=encode_name("victim.test") + struct.pack("!HH", 1, 1),
                answer=[rr("victim.test", "A", a("10.6.6.6"))],
            ).wire(),
            "malformed answer",
        ),
        (
            "A rdata of 5 octets",
            lambda q: q.reply(answer=[rr(q.name, "A", b"12345")]).wire(),
            "malformed answer",
        ),
    ],
)
async def test_tc_then_a_broken_tcp_answer_is_a_clear_temp_error(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    case: str,
    tcp_reply: Callable[[Query], Reply],
    reason: str,
) -> None:
    srv = serve(over_tcp(tcp_reply))
    r = resolver_for(srv)
    t0 = time.monotonic()
    err = await temp_error(r)
    assert time.monotonic() - t0 < 0.5  # TCP failures are not waited out
    # The log line says what went wrong over TCP, not the UDP truncation that led there,
    # and not a bare "network: ".
    assert err.reason.startswith(reason), err.reason
    assert not err.reason.endswith(": ")
    assert [p for _n, _t, p in srv.log] == ["udp", "tcp"]
    await assert_not_cached(srv, r)


async def test_tcp_length_prefix_promising_more_than_ever_comes_times_out(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    srv = serve(over_tcp(lambda q: Raw(struct.pack("!H", 4000) + good(q))))  # held open
    r = resolver_for(srv, timeout=0.3)
    t0 = time.monotonic()
    assert (await temp_error(r)).reason == "timeout"
    assert time.monotonic() - t0 < 0.3 + 0.25
    assert len(r.cache) == 0


# -- answers that do not answer the question -----------------------------------------------


@pytest.mark.parametrize(
    ("case", "rtype", "reply"),
    [
        (
            "A record of another owner",
            "A",
            lambda q: q.reply(answer=[rr("victim.test", "A", a("10.6.6.6"))]).wire(),
        ),
        (
            "AAAA record for an A query",
            "A",
            lambda q: q.reply(answer=[rr(q.name, "AAAA", bytes(15) + b"\x01")]).wire(),
        ),
        (
            "A record for a TXT query",
            "TXT",
            lambda q: q.reply(answer=[rr(q.name, "A", a("127.0.0.2"))]).wire(),
        ),
        (
            "TXT record of another owner",
            "TXT",
            lambda q: q.reply(answer=[rr("victim.test", "TXT", txt_rdata(b"v=spf1 +all"))]).wire(),
        ),
        (
            "CNAME chain ending in a record of another owner",
            "A",
            lambda q: q.reply(
                answer=[
                    rr(q.name, "CNAME", encode_name("next.hostile.test")),
                    rr("victim.test", "A", a("10.6.6.6")),
                ]
            ).wire(),
        ),
        (
            "CNAME of another owner",
            "A",
            lambda q: q.reply(answer=[rr("victim.test", "CNAME", encode_name(q.name))]).wire(),
        ),
        (
            "NXDOMAIN with a record of another owner",
            "A",
            lambda q: nxdomain(q, answer=[rr("victim.test", "A", a("10.6.6.6"))]),
        ),
        (
            "NXDOMAIN with an answer for the name",
            "A",
            lambda q: nxdomain(q, answer=[rr(q.name, "A", a("10.6.6.6"))]),
        ),
    ],
)
async def test_records_that_do_not_answer_the_question_are_a_temp_error_not_nodata(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    case: str,
    rtype: str,
    reply: Callable[[Query], Reply],
) -> None:
    """dnspython read these as NODATA (or NXDOMAIN): a false "no such record", cached
    for a minute, which SPF takes for "none" and a DNSBL for "not listed"."""
    srv = serve(reply)
    r = resolver_for(srv)
    err = await temp_error(r, rtype=rtype)
    assert err.reason.startswith("malformed answer"), err.reason
    await assert_not_cached(srv, r, rtype)


async def test_a_cname_chain_to_nothing_is_still_nodata(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    """The control for the rule above: records the chain explains are no stray."""
    soa = rr("hostile.test", "SOA", soa_rdata("hostile.test", minimum=30), ttl=300)
    srv = serve(
        lambda q: q.reply(
            answer=[
                rr(q.name, "CNAME", encode_name("mid.hostile.test")),
                rr("mid.hostile.test", "CNAME", encode_name("end.hostile.test")),
            ],
            authority=[soa],
        ).wire()
    )
    r = resolver_for(srv)
    assert await r.resolve(NAME, "A") == DNSResult(NAME, "A", "nodata", (), 30)


async def test_extra_records_never_enter_the_cache_for_their_own_names(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    """Records for other names beside a real answer (answer and additional sections)
    are ignored: the next lookup of such a name asks the server (no cache poisoning)."""

    def respond(q: Query) -> Reply:
        if q.name == "victim.test":
            return q.reply(answer=[rr(q.name, "A", a("198.51.100.7"))]).wire()
        forged = rr("victim.test", "A", a("10.6.6.6"), ttl=86400)
        return q.reply(answer=[rr(q.name, "A", a(GOOD_IP)), forged], additional=[forged]).wire()

    srv = serve(respond)
    r = resolver_for(srv)
    assert (await r.resolve(NAME, "A")).data == (GOOD_IP,)
    assert r.peek("victim.test", "A") is None
    assert (await r.resolve("victim.test", "A")).data == ("198.51.100.7",)
    assert [n for n, _t, _p in srv.log] == [NAME, "victim.test"]


@pytest.mark.parametrize("length", [2, 17, 40])
async def test_cname_loops_and_overlong_chains_are_temp_errors(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], length: int
) -> None:
    """c0 -> c1 -> ... -> c<length-1> -> c0 (2: a loop; 17, 40: past any sane chain)."""
    names = [NAME] + [f"c{i}.hostile.test" for i in range(1, length)]
    links = [rr(n, "CNAME", encode_name(names[(i + 1) % length])) for i, n in enumerate(names)]
    srv = serve(lambda q: q.reply(answer=links).wire())
    r = resolver_for(srv)
    err = await temp_error(r)
    assert err.reason.startswith("malformed answer"), err.reason
    await assert_not_cached(srv, r)


async def test_a_long_but_finite_cname_chain_answers(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    names = [NAME] + [f"c{i}.hostile.test" for i in range(1, 10)]
    links = [rr(n, "CNAME", encode_name(m), ttl=600) for n, m in itertools.pairwise(names)]
    srv = serve(lambda q: q.reply(answer=[*links, rr(names[-1], "A", a(GOOD_IP), ttl=45)]).wire())
    res = await resolver_for(srv).resolve(NAME, "A")
    assert (res.outcome, res.data, res.name, res.ttl) == ("ok", (GOOD_IP,), NAME, 45)


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strings", "size"),
    [(500, 100), (254, 255)],  # 500 character-strings; a 65 KB message, near the TCP limit
)
async def test_huge_txt_answers_over_tcp(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], strings: int, size: int
) -> None:
    parts = [bytes([65 + i % 26]) * size for i in range(strings)]
    answer = rr(NAME, "TXT", txt_rdata(*parts))
    srv = serve(over_tcp(lambda q: q.reply(answer=[answer]).wire()))
    assert len(Msg(answer=[answer]).wire()) > (60_000 if size == 255 else 50_000)
    r = resolver_for(srv)
    assert await r.txt(NAME) == [b"".join(parts)]
    (record,) = (await r.resolve(NAME, "TXT")).data
    assert isinstance(record, tuple) and len(record) == strings
    assert [p for _n, _t, p in srv.log] == ["udp", "tcp"]  # the second was a cache hit


async def test_many_records_in_one_answer(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    records = [rr(NAME, "A", bytes([10, 0, i // 256, i % 256])) for i in range(2000)]
    srv = serve(over_tcp(lambda q: q.reply(answer=records).wire()))
    res = await resolver_for(srv).resolve(NAME, "A")
    assert len(res.data) == 2000
    assert (res.data[0], res.data[-1]) == ("10.0.0.0", "10.0.7.207")


# -- TTLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, 2**31, 2**32 - 1])
async def test_ttl_zero_and_ttls_with_the_top_bit_set_are_not_cached(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], ttl: int
) -> None:
    """RFC 2181 8: a TTL of 2^31 or more is treated as zero, so it is not kept a day."""
    srv = serve(lambda q: q.reply(answer=[rr(q.name, "A", a(GOOD_IP), ttl=ttl)]).wire())
    r = resolver_for(srv)
    res = await r.resolve(NAME, "A")
    assert (res.outcome, res.data, res.ttl) == ("ok", (GOOD_IP,), 0)
    await r.resolve(NAME, "A")
    assert srv.count() == 2
    assert len(r.cache) == 0


async def test_negative_answer_whose_soa_minimum_has_the_top_bit_set_is_not_cached(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
) -> None:
    """The SOA MINIMUM is the negative TTL (RFC 2308): 2^32-1 there is 0, not 300 s."""
    soa = rr("hostile.test", "SOA", soa_rdata("hostile.test", minimum=2**32 - 1), ttl=300)
    srv = serve(lambda q: q.reply(rcode=3, authority=[soa]).wire())
    r = resolver_for(srv)
    res = await r.resolve(NAME, "A")
    assert (res.outcome, res.ttl) == ("nxdomain", 0)
    await r.resolve(NAME, "A")
    assert srv.count() == 2


@pytest.mark.parametrize(("rcode", "outcome"), [(3, "nxdomain"), (0, "nodata")])
async def test_negative_answer_without_soa_is_negative_for_a_minute(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer], rcode: int, outcome: str
) -> None:
    """Not malformed, only unhelpful: the documented 60 s default, not a temp error."""
    srv = serve(lambda q: q.reply(rcode=rcode).wire())
    r = resolver_for(srv)
    assert await r.resolve(NAME, "TXT") == DNSResult(NAME, "TXT", outcome, (), 60)


# -- the checks on top ---------------------------------------------------------------------


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged with an exception attached (a traceback in the log)."""
    assert [r for r in caplog.records if r.exc_info] == []


def zone(
    answers: dict[tuple[str, str], Callable[[Query], Reply]],
) -> Callable[[Query], Reply]:
    """A responder: the function for (name, type), else NXDOMAIN with a SOA."""

    def respond(q: Query) -> Reply:
        fn = answers.get((q.name, q.type_name))
        return fn(q) if fn is not None else nxdomain(q)

    return respond


def stray_a(q: Query) -> bytes:
    """An A record 127.0.0.2 for another owner: a listing, but not of what was asked."""
    return q.reply(answer=[rr("victim.test", "A", a("127.0.0.2"))]).wire()


def aaaa_for_a(q: Query) -> bytes:
    return q.reply(answer=[rr(q.name, "AAAA", bytes(15) + b"\x02")]).wire()


def tcp_garbage(q: Query) -> Reply:
    return over_tcp(lambda _q: b"\x00" * 11)(q)


ZEN = DNSBLZone("zen.bl.test", 10.0, True)
CLIENT = "192.0.2.10"


def dnsbl_policy() -> Policy:
    return dataclasses.replace(
        DEFAULT_POLICY, dnsbl=DNSBLPolicy(zones=(ZEN,)), dns=DNSPolicy(timeout=1.0)
    )


@pytest.mark.parametrize(
    ("case", "reply", "word"),
    [
        (
            "listed (control)",
            lambda q: q.reply(answer=[rr(q.name, "A", a("127.0.0.2"))]).wire(),
            "fail",
        ),
        ("A of another owner", stray_a, "temperror"),
        ("AAAA for the A query", aaaa_for_a, "temperror"),
        ("garbage over TCP", tcp_garbage, "temperror"),
        (
            # not malformed DNS but a resolver that rewrites NXDOMAIN (filter.dnsbl.classify):
            # no listing, and the zone is disabled until its test entries answer right
            "answer outside 127/8",
            lambda q: q.reply(answer=[rr(q.name, "A", a("10.0.0.1"))]).wire(),
            "none",
        ),
    ],
)
async def test_dnsbl_check_malformed_answer_is_temperror_not_not_listed(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    caplog: pytest.LogCaptureFixture,
    case: str,
    reply: Callable[[Query], Reply],
    word: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = serve(zone({(ip_query_name(CLIENT, ZEN.zone), "A"): reply}))
    health = ZoneHealth()
    ctx = Context(
        client=ClientInfo(ip=CLIENT, port=25000, session_id="S1"),
        policy=dnsbl_policy(),
        resolver=resolver_for(srv),
        dry_run=True,  # no background re-test of a disabled zone outliving the test
    )
    res = await DNSBLCheck(health).run(ctx)
    assert res.result == word
    if word == "temperror":
        assert [s.name for s in res.symbols] == ["DNSBL_TEMPERROR"]
        assert (res.decision, res.data["listed"], res.data["errors"]) == (None, [], [ZEN.zone])
        assert health.healthy(ZEN)  # a broken answer says nothing about the list
    if word == "none":
        assert (res.decision, res.data["listed"], res.data["blocked"]) == (None, [], [ZEN.zone])
        assert not health.healthy(ZEN)
    no_tracebacks(caplog)


SPF_DOMAIN = "s.hostile.test"


def spf_txt(record: bytes) -> Callable[[Query], Reply]:
    return lambda q: q.reply(answer=[rr(q.name, "TXT", txt_rdata(record))]).wire()


@pytest.mark.parametrize(
    ("case", "answers", "word"),
    [
        ("pass (control)", {(SPF_DOMAIN, "TXT"): spf_txt(b"v=spf1 ip4:192.0.2.0/24 -all")}, "pass"),
        (
            "TXT of another owner",
            {
                (SPF_DOMAIN, "TXT"): lambda q: q.reply(
                    answer=[rr("victim.test", "TXT", txt_rdata(b"v=spf1 -all"))]
                ).wire()
            },
            "temperror",
        ),
        ("A record for the TXT query", {(SPF_DOMAIN, "TXT"): stray_a}, "temperror"),
        ("garbage over TCP", {(SPF_DOMAIN, "TXT"): tcp_garbage}, "temperror"),
        (
            # an include whose target "has no record" is permerror (RFC 7208 5.2):
            # a malformed answer there must not be read as one
            "include answered with a stray record",
            {
                (SPF_DOMAIN, "TXT"): spf_txt(b"v=spf1 include:inc.hostile.test -all"),
                ("inc.hostile.test", "TXT"): stray_a,
            },
            "temperror",
        ),
        (
            "a: mechanism answered with AAAA",
            {
                (SPF_DOMAIN, "TXT"): spf_txt(b"v=spf1 a:h.hostile.test -all"),
                ("h.hostile.test", "A"): aaaa_for_a,
            },
            "temperror",
        ),
    ],
)
async def test_spf_check_malformed_answer_is_temperror_not_none_or_permerror(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    caplog: pytest.LogCaptureFixture,
    case: str,
    answers: dict[tuple[str, str], Callable[[Query], Reply]],
    word: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = serve(zone(answers))
    ctx = Context(
        client=ClientInfo(ip="192.0.2.7", port=25000, session_id="S1", helo=None),
        policy=dataclasses.replace(DEFAULT_POLICY, dns=DNSPolicy(timeout=1.0)),
        envelope=Envelope(mail_from=f"alice@{SPF_DOMAIN}"),
        resolver=resolver_for(srv),
    )
    res = await SPFCheck().run(ctx)
    assert res.result == word, res.data["reason"]
    assert res.decision is None
    no_tracebacks(caplog)


RDNS_IP = "192.0.2.25"
RDNS_HOST = "mx.hostile.test"


def ptr_to(host: str) -> Callable[[Query], Reply]:
    return lambda q: q.reply(answer=[rr(q.name, "PTR", encode_name(host))]).wire()


def a_record(ip: str) -> Callable[[Query], Reply]:
    return lambda q: q.reply(answer=[rr(q.name, "A", a(ip))]).wire()


@pytest.mark.parametrize(
    ("case", "answers", "word"),
    [
        (
            "confirmed (control)",
            {
                (reverse_name(RDNS_IP), "PTR"): ptr_to(RDNS_HOST),
                (RDNS_HOST, "A"): a_record(RDNS_IP),
            },
            "pass",
        ),
        (
            "PTR of another owner",
            {
                (reverse_name(RDNS_IP), "PTR"): lambda q: q.reply(
                    answer=[rr(reverse_name("192.0.2.26"), "PTR", encode_name(RDNS_HOST))]
                ).wire()
            },
            "temperror",
        ),
        (
            "forward lookup answered with AAAA",
            {(reverse_name(RDNS_IP), "PTR"): ptr_to(RDNS_HOST), (RDNS_HOST, "A"): aaaa_for_a},
            "temperror",
        ),
        ("PTR garbage over TCP", {(reverse_name(RDNS_IP), "PTR"): tcp_garbage}, "temperror"),
    ],
)
async def test_rdns_check_malformed_answer_is_temperror_not_fail(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    caplog: pytest.LogCaptureFixture,
    case: str,
    answers: dict[tuple[str, str], Callable[[Query], Reply]],
    word: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = serve(zone(answers))
    ctx = Context(
        client=ClientInfo(ip=RDNS_IP, port=4000, session_id="S1"),
        policy=DEFAULT_POLICY,
        resolver=resolver_for(srv),
    )
    res = await RDNSCheck().run(ctx)
    assert res.result == word, res.data["reason"]
    if word == "temperror":
        # Postfix behind us defers instead of rejecting an unknown client
        assert xclient_name(res) == "[TEMPUNAVAIL]"
        assert str(res.data["error"]).startswith("malformed answer")
    no_tracebacks(caplog)


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    """(private PEM, TXT record) of a fresh RSA key."""
    pem, record = rsa_dkim_key(1024)
    return pem, record.encode()


DKIM_MESSAGE = (
    b"From: Alice <alice@d.hostile.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: figures\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <figures.1@d.hostile.test>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)
KEY_NAME = "sel._domainkey.d.hostile.test"


def key_txt(record: bytes, owner: str | None = None) -> Callable[[Query], Reply]:
    chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
    return lambda q: q.reply(answer=[rr(owner or q.name, "TXT", txt_rdata(*chunks))]).wire()


@pytest.mark.parametrize(
    "case", ["pass (control)", "key of another owner", "A for the TXT query", "garbage over TCP"]
)
async def test_dkim_check_malformed_key_answer_is_temperror_not_fail(
    serve: Callable[[Callable[[Query], Reply]], HostileDNSServer],
    caplog: pytest.LogCaptureFixture,
    dkim_key: tuple[bytes, bytes],
    case: str,
) -> None:
    pem, record = dkim_key
    reply = {
        "pass (control)": key_txt(record),
        "key of another owner": key_txt(record, owner="sel._domainkey.victim.test"),
        "A for the TXT query": stray_a,
        "garbage over TCP": tcp_garbage,
    }[case]
    caplog.set_level(logging.DEBUG)
    srv = serve(zone({(KEY_NAME, "TXT"): reply}))
    signed = bytes(dkim.sign(DKIM_MESSAGE, b"sel", b"d.hostile.test", pem)) + DKIM_MESSAGE
    buf = MessageBuffer()
    buf.write(signed)
    try:
        ctx = Context(
            client=ClientInfo("192.0.2.1", 40000, "s1"),
            policy=Policy(),
            message=buf,
            resolver=resolver_for(srv),
        )
        res = await DKIMCheck().run(ctx)
    finally:
        buf.close()
    expected = "pass" if case == "pass (control)" else "temperror"
    assert res.result == expected
    assert [s["result"] for s in res.data["signatures"]] == [expected]  # type: ignore[union-attr]
    no_tracebacks(caplog)
