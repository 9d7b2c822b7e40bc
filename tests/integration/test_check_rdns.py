"""FCrDNS (iprev) and the HELO check against the real loopback DNS server.

Each test publishes its own records in the session ``dns_zone`` (restored
afterwards) and builds a fresh Resolver, so no answer is cached across tests.
Reverse names live in the server's ``in-addr.arpa`` / ``ip6.arpa`` zones, host
names under ``rdns.test`` (inside the ``test`` zone, so NXDOMAIN comes with a SOA).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import dns.reversename
import pytest

from filter.checks import Context
from filter.checks.helo import HeloCheck
from filter.checks.rdns import MAX_PTR_NAMES, RDNSCheck, xclient_name, xclient_reverse_name
from filter.model import ClientInfo, Stage
from filter.policy.schema import DEFAULT_POLICY, Policy, RDNSPolicy, ServerPolicy
from filter.resolver import Resolver
from filter.results import CheckResult
from filter.units import Address, parse_address
from tests.rig.dnsserver import ZoneDNSServer

IP4 = "192.0.2.25"
IP6 = "2001:db8:5::25"


def reverse(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text(omit_final_dot=True)


def resolver_for(server: ZoneDNSServer) -> Resolver:
    return Resolver([Address(server.host, server.port)], timeout=1.0)


def policy(**changes: Any) -> Policy:
    server = ServerPolicy(hostname="mx.example.org", listen=(parse_address("198.51.100.1:25"),))
    return dataclasses.replace(DEFAULT_POLICY, server=server, **changes)


async def rdns(
    server: ZoneDNSServer,
    ip: str,
    *,
    hostname: str | None = None,
    source: str = "socket",
    pol: Policy | None = None,
) -> CheckResult:
    client = ClientInfo(ip=ip, port=4000, session_id="S1", hostname=hostname, source=source)
    ctx = Context(client=client, policy=pol or policy(), resolver=resolver_for(server))
    return await RDNSCheck().run(ctx)


async def helo(server: ZoneDNSServer, name: str, ip: str = IP4) -> CheckResult:
    client = ClientInfo(ip=ip, port=4000, session_id="S1", helo=name)
    return await HeloCheck().run(
        Context(client=client, policy=policy(), resolver=resolver_for(server))
    )


def symbols(result: CheckResult) -> dict[str, float]:
    return {s.name: s.score for s in result.symbols}


# -- FCrDNS -------------------------------------------------------------------------------


async def test_confirmed_name_passes_with_the_verified_name(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(reverse(IP4), "PTR", "mail.rdns.test")
    dns_zone.add("mail.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    check = RDNSCheck()
    assert (check.name, check.stage, check.needs) == ("rdns", Stage.CONNECT, ())
    assert r.result == "pass"
    assert symbols(r) == {"RDNS_PASS": 0.0}
    assert r.decision is None
    assert r.data["verified_name"] == "mail.rdns.test"
    assert r.data["ptr_names"] == ["mail.rdns.test"]
    assert xclient_name(r) == "mail.rdns.test"


async def test_ptr_not_leading_back_is_a_mismatch(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(reverse(IP4), "PTR", "other.rdns.test")
    dns_zone.add("other.rdns.test", "A", "192.0.2.99")
    dns_zone.add(reverse("192.0.2.26"), "PTR", "gone.rdns.test")  # name does not exist
    r = await rdns(dns_zone, IP4)
    assert (r.result, symbols(r)) == ("fail", {"RDNS_MISMATCH": 0.5})
    assert r.data["verified_name"] == ""
    assert r.data["ptr_names"] == ["other.rdns.test"]
    assert xclient_name(r) == "[UNAVAILABLE]"
    r = await rdns(dns_zone, "192.0.2.26")
    assert (r.result, symbols(r)) == ("fail", {"RDNS_MISMATCH": 0.5})


async def test_no_ptr_record_at_all(dns_zone: ZoneDNSServer) -> None:
    r = await rdns(dns_zone, "192.0.2.77")
    assert (r.result, symbols(r)) == ("permerror", {"RDNS_NONE": 1.5})  # RFC 8601 3
    assert r.data["ptr_names"] == []
    assert "no PTR" in str(r.data["reason"])
    assert xclient_name(r) == "[UNAVAILABLE]"


async def test_ipv6_client_confirmed_through_aaaa(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(reverse(IP6), "PTR", "v6.rdns.test")
    dns_zone.add("v6.rdns.test", "A", IP4)  # an A record cannot confirm an IPv6 client
    dns_zone.add("v6.rdns.test", "AAAA", "2001:DB8:5:0::25")
    r = await rdns(dns_zone, IP6)
    assert (r.result, r.data["verified_name"]) == ("pass", "v6.rdns.test")
    assert dns_zone.count("v6.rdns.test", "AAAA") == 1
    assert dns_zone.count("v6.rdns.test", "A") == 0


async def test_ipv4_mapped_client_is_looked_up_as_ipv4(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(reverse(IP4), "PTR", "mail.rdns.test")
    dns_zone.add("mail.rdns.test", "A", IP4)
    r = await rdns(dns_zone, f"::ffff:{IP4}")
    assert (r.result, r.data["verified_name"]) == ("pass", "mail.rdns.test")


async def test_one_confirming_name_among_several_wins(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_records(reverse(IP4), "PTR", ["b.rdns.test", "a.rdns.test", "c.rdns.test"])
    dns_zone.add("a.rdns.test", "A", "192.0.2.1")
    dns_zone.add("b.rdns.test", "A", IP4)
    dns_zone.add("c.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    # Sorted, first confirming: the same name every time, whatever the answer order.
    assert (r.result, r.data["verified_name"]) == ("pass", "b.rdns.test")
    assert r.data["ptr_names"] == ["a.rdns.test", "b.rdns.test", "c.rdns.test"]


async def test_at_most_ten_names_are_tried(dns_zone: ZoneDNSServer) -> None:
    names = [f"h{i:02d}.rdns.test" for i in range(12)]
    dns_zone.set_records(reverse(IP4), "PTR", names)
    for name in names:
        dns_zone.add(name, "A", "192.0.2.1")
    dns_zone.add(names[-1], "A", IP4)  # only the 12th would confirm
    r = await rdns(dns_zone, IP4)
    assert (r.result, symbols(r)) == ("fail", {"RDNS_MISMATCH": 0.5})
    assert sum(dns_zone.count(n, "A") for n in names) == MAX_PTR_NAMES
    assert len(r.data["ptr_names"]) == 12  # type: ignore[arg-type]


async def test_ptr_timeout_is_temperror_with_a_zero_score(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_name_mode(reverse(IP4), "timeout")
    t0 = time.monotonic()
    r = await rdns(dns_zone, IP4)
    assert time.monotonic() - t0 < 3.0  # the resolver's lifetime, not forever
    assert (r.result, symbols(r)) == ("temperror", {"RDNS_TEMPERROR": 0.0})
    assert r.data["error"] == "timeout"
    assert xclient_name(r) == "[TEMPUNAVAIL]"


async def test_forward_failure_without_confirmation_is_temperror(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_records(reverse(IP4), "PTR", ["a.rdns.test", "b.rdns.test"])
    dns_zone.add("a.rdns.test", "A", "192.0.2.1")
    dns_zone.set_name_mode("b.rdns.test", "servfail")
    r = await rdns(dns_zone, IP4)
    assert (r.result, symbols(r)) == ("temperror", {"RDNS_TEMPERROR": 0.0})
    assert r.data["error"] == "servfail"


async def test_forward_failure_does_not_hide_a_confirming_name(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_records(reverse(IP4), "PTR", ["a.rdns.test", "b.rdns.test"])
    dns_zone.set_name_mode("a.rdns.test", "servfail")
    dns_zone.add("b.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    assert (r.result, r.data["verified_name"]) == ("pass", "b.rdns.test")


async def test_ptr_target_that_is_an_address_is_not_tried(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(reverse(IP4), "PTR", "192.0.2.25")
    r = await rdns(dns_zone, IP4)
    assert (r.result, symbols(r)) == ("fail", {"RDNS_MISMATCH": 0.5})
    assert dns_zone.count("192.0.2.25", "A") == 0


@pytest.mark.parametrize(
    "name", ["mail+1.rdns.test", "-mail.rdns.test", "mail-.rdns.test", "1.2.3.4.5"]
)
async def test_ptr_name_postfix_would_refuse_is_not_verified(
    dns_zone: ZoneDNSServer, name: str
) -> None:
    # It leads back, but Postfix's valid_hostname() refuses it: Postfix itself calls
    # such a client "unknown", and answers XCLIENT NAME=<it> with "501 Bad NAME
    # syntax", so the upstream connection failed and every MAIL of the client got 451.
    dns_zone.add(reverse(IP4), "PTR", name)
    dns_zone.add(name, "A", IP4)
    r = await rdns(dns_zone, IP4)
    assert (r.result, symbols(r)) == ("fail", {"RDNS_MISMATCH": 0.5})
    assert r.data["ptr_names"] == [name]
    assert xclient_name(r) == "[UNAVAILABLE]"
    assert dns_zone.count(name, "A") == 0


async def test_underscore_and_case_and_trailing_dot_in_ptr_names(dns_zone: ZoneDNSServer) -> None:
    # Postfix allows "_" in host names; PTR data comes back lower case, no final dot.
    dns_zone.add(reverse(IP4), "PTR", "Mail_1.RDNS.test.")
    dns_zone.add("mail_1.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    assert (r.result, xclient_name(r)) == ("pass", "mail_1.rdns.test")


async def test_reverse_name_for_xclient_is_the_ptr_name_confirmed_or_not(
    dns_zone: ZoneDNSServer,
) -> None:
    """Postfix's reverse client name is the PTR name even when it does not lead back;
    XCLIENT NAME=[UNAVAILABLE] alone left the upstream with mailgate's own."""
    dns_zone.add(reverse(IP4), "PTR", "-bad.rdns.test.")  # no host name: skipped
    dns_zone.add(reverse(IP4), "PTR", "dyn-25.rdns.test.")  # leads nowhere
    r = await rdns(dns_zone, IP4)
    assert r.result == "fail"
    assert (xclient_name(r), xclient_reverse_name(r)) == ("[UNAVAILABLE]", "dyn-25.rdns.test")
    dns_zone.add("dyn-25.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    assert (xclient_name(r), xclient_reverse_name(r)) == ("dyn-25.rdns.test",) * 2


async def test_reverse_name_when_there_is_none_or_the_lookup_failed(
    dns_zone: ZoneDNSServer,
) -> None:
    r = await rdns(dns_zone, IP4)  # no PTR at all
    assert (r.result, xclient_reverse_name(r)) == ("permerror", "[UNAVAILABLE]")
    dns_zone.set_name_mode(reverse(IP4), "servfail")
    r = await rdns(dns_zone, IP4)
    assert (r.result, xclient_reverse_name(r)) == ("temperror", "[TEMPUNAVAIL]")
    # The PTR answered but its forward lookup failed: the reverse name is known.
    dns_zone.set_name_mode(reverse(IP4), None)
    dns_zone.add(reverse(IP4), "PTR", "slow.rdns.test.")
    dns_zone.set_name_mode("slow.rdns.test", "servfail")
    r = await rdns(dns_zone, IP4)
    assert (r.result, xclient_name(r)) == ("temperror", "[TEMPUNAVAIL]")
    assert xclient_reverse_name(r) == "slow.rdns.test"
    assert xclient_reverse_name(None) == "[UNAVAILABLE]"


async def test_cname_in_the_forward_lookup_and_classless_reverse(dns_zone: ZoneDNSServer) -> None:
    # RFC 2317: the PTR name is a CNAME into the customer's zone; the host name a CNAME too.
    dns_zone.add(reverse(IP4), "CNAME", "25.0-63.2.0.192.in-addr.arpa")
    dns_zone.add("25.0-63.2.0.192.in-addr.arpa", "PTR", "alias.rdns.test")
    dns_zone.add("alias.rdns.test", "CNAME", "real.rdns.test")
    dns_zone.add("real.rdns.test", "A", IP4)
    r = await rdns(dns_zone, IP4)
    assert (r.result, r.data["verified_name"]) == ("pass", "alias.rdns.test")


async def test_xforward_name_is_honoured_without_lookups(dns_zone: ZoneDNSServer) -> None:
    r = await rdns(dns_zone, IP4, hostname="Relay.Example.ORG.", source="xforward")
    assert (r.result, symbols(r)) == ("pass", {"RDNS_PASS": 0.0})
    assert r.data["verified_name"] == "relay.example.org"
    assert dns_zone.count() == 0


async def test_xforward_without_name_and_other_sources_look_up(dns_zone: ZoneDNSServer) -> None:
    r = await rdns(dns_zone, "192.0.2.77", source="xforward")
    assert symbols(r) == {"RDNS_NONE": 1.5}
    # A name from anywhere but Postfix's XFORWARD is not taken on trust.
    r = await rdns(dns_zone, "192.0.2.77", hostname="claimed.example.org", source="proxy")
    assert symbols(r) == {"RDNS_NONE": 1.5}
    assert dns_zone.count(reverse("192.0.2.77"), "PTR") == 2


async def test_disabled_or_without_resolver(dns_zone: ZoneDNSServer) -> None:
    r = await rdns(dns_zone, IP4, pol=policy(rdns=RDNSPolicy(enabled=False)))
    assert (r.result, r.symbols) == ("none", ())
    assert dns_zone.count() == 0
    ctx = Context(client=ClientInfo(IP4, 4000, "S1"), policy=policy())
    r = await RDNSCheck().run(ctx)
    assert (r.result, symbols(r)) == ("temperror", {"RDNS_TEMPERROR": 0.0})


# -- HELO with DNS ------------------------------------------------------------------------


async def test_helo_existing_name_is_clean(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("mail.rdns.test", "A", IP4)
    r = await helo(dns_zone, "Mail.RDNS.test")
    assert (r.result, r.symbols, r.data["lookup"]) == ("pass", (), "ok")


async def test_helo_name_with_only_other_records_is_clean(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("v6only.rdns.test", "AAAA", IP6)
    r = await helo(dns_zone, "v6only.rdns.test")
    assert (r.result, r.symbols, r.data["lookup"]) == ("pass", (), "nodata")


async def test_helo_nonexistent_name(dns_zone: ZoneDNSServer) -> None:
    r = await helo(dns_zone, "nothing.rdns.test")
    assert (r.result, symbols(r)) == ("fail", {"HELO_NXDOMAIN": 0.5})
    assert r.data["lookup"] == "nxdomain"


async def test_helo_dns_failure_raises_no_symbol(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_name_mode("slow.rdns.test", "timeout")
    r = await helo(dns_zone, "slow.rdns.test")
    assert (r.result, r.symbols, r.data["lookup"]) == ("pass", (), "temperror")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mx.example.org", {"HELO_OURS": 4.0}),
        ("[198.51.100.1]", {"HELO_OURS": 4.0}),
        ("198.51.100.1", {"HELO_BARE_IP": 1.5, "HELO_OURS": 4.0}),
        (IP4, {"HELO_BARE_IP": 1.5}),
        ("[192.0.2.99]", {"HELO_LITERAL_MISMATCH": 1.0}),
        (f"[{IP4}]", {}),
        ("localhost", {"HELO_NOT_FQDN": 1.0}),
        ("bad_name.rdns.test", {"HELO_INVALID": 1.5}),
        ("fe80::1%eth0", {"HELO_INVALID": 1.5}),  # raised: the check logged a traceback
        ("[IPv6:::ffff:198.51.100.1]", {"HELO_OURS": 4.0}),
    ],
)
async def test_helo_syntax_rules_send_no_query(
    dns_zone: ZoneDNSServer, name: str, expected: dict[str, float]
) -> None:
    r = await helo(dns_zone, name)
    assert symbols(r) == expected
    assert r.result == ("fail" if expected else "pass")
    assert dns_zone.count() == 0


async def test_helo_name_idna_refuses_is_invalid(dns_zone: ZoneDNSServer) -> None:
    r = await helo(dns_zone, "a\u200db.rdns.test")  # ZWJ outside its allowed context
    assert symbols(r) == {"HELO_INVALID": 1.5}
