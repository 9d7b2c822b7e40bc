"""DKIM keys and the DMARC record are looked up when the header block is in, not at the dot.

Driven through a real mailgate process with a raw client that sends the header block,
then waits before sending the body: the lookups must reach the DNS server during that
pause. A second message with the same header must cost no query at all (cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.client import RawSMTP
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.upstream import ScriptedUpstream

HEADER = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=prefetch.example.org; s=sel1;\r\n"
    b"\tc=relaxed/relaxed; h=from; bh=AAAA; b=AAAA\r\n"
    b"From: Alice <alice@prefetch.example.org>\r\n"
    b"To: <bob@example.test>\r\n"
    b"Subject: prefetch\r\n"
    b"\r\n"
)
KEY = "sel1._domainkey.prefetch.example.org"
DMARC = "_dmarc.prefetch.example.org"


def _wait_for(pred: Callable[[], object], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _send_in_two_parts(port: int, dns: ZoneDNSServer, wait: float = 2.0) -> tuple[int, int, int]:
    """(key queries, DMARC queries) seen before the body was sent, and the final code."""
    with RawSMTP("127.0.0.1", port) as c:
        assert c.banner().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        assert c.cmd("MAIL FROM:<alice@prefetch.example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        # The reader hands on whole lines, so the blank line is known once the next
        # line is in too: a client's write rarely ends exactly at the blank line.
        c.send(HEADER + b"first line\r\n")
        _wait_for(lambda: dns.count(KEY, "TXT") and dns.count(DMARC, "TXT"), wait)
        before = (dns.count(KEY, "TXT"), dns.count(DMARC, "TXT"))
        c.send(b"last line\r\n.\r\n")
        code = c.read_reply(timeout=10).code
    return before[0], before[1], code


def test_lookups_start_when_the_header_block_is_complete(
    mailgate: StartMailgate, upstream: ScriptedUpstream, dns_zone: ZoneDNSServer
) -> None:
    dns_zone.add(DMARC, "TXT", "v=DMARC1; p=none")
    mg = mailgate({"spf": {"enabled": False}})
    key_before_body, dmarc_before_body, code = _send_in_two_parts(mg.smtp_port, dns_zone)
    assert key_before_body == 1  # asked while the client was still sending
    assert dmarc_before_body == 1
    assert code == 250  # the made-up signature fails; p=none lets the message through
    # The same header again: both answers are cached, nothing is asked twice.
    key_again, dmarc_again, code = _send_in_two_parts(mg.smtp_port, dns_zone)
    assert (key_again, dmarc_again, code) == (1, 1, 250)
    assert len(upstream.wait_for_transactions(2)) == 2


def test_no_lookups_ahead_when_the_authentication_checks_are_off(
    mailgate: StartMailgate, upstream: ScriptedUpstream, dns_zone: ZoneDNSServer
) -> None:
    mg = mailgate(AUTH_CHECKS_OFF)
    key_before_body, dmarc_before_body, code = _send_in_two_parts(mg.smtp_port, dns_zone, 0.5)
    assert (key_before_body, dmarc_before_body, code) == (0, 0, 250)
    assert dns_zone.count(KEY) == 0 and dns_zone.count(DMARC) == 0
