"""Sender authentication end to end: client -> mailgate (SPF, DKIM, DMARC, ARC) -> Postfix.

A real loopback DNS server publishes the sender domains; keys are made at test time.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator

import dkim
import pytest

from tests.e2e.conftest import StartMailgate
from tests.rig.client import smtp_client
from tests.rig.dkimkeys import rsa_dkim_key
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.postfix import PostfixInstance


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {}


@pytest.fixture
def zone(dns_zone: ZoneDNSServer, keys: dict[str, bytes]) -> Iterator[ZoneDNSServer]:
    """Sender domains: good.test (passes), strict.test (p=reject, sends from 192.0.2/24),
    quarantine.test (p=quarantine), slow.test (DMARC lookups time out), and the list
    server lists.forwarder.test that ARC-seals."""
    z = dns_zone
    for domain in ("good.test", "strict.test", "quarantine.test", "slow.test", "forwarder.test"):
        z.add(domain, "A", "192.0.2.10")
    z.add("lists.forwarder.test", "A", "192.0.2.20")
    z.add("good.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    z.add("slow.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    z.add("strict.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    z.add("quarantine.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    z.add("lists.forwarder.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    z.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject")
    z.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject")
    z.add("_dmarc.quarantine.test", "TXT", "v=DMARC1; p=quarantine")
    z.add("_dmarc.slow.test", "TXT", "v=DMARC1; p=reject")
    z.set_name_mode("_dmarc.slow.test", "timeout")
    for name in ("good", "strict", "forwarder"):
        if name not in keys:
            pem, record = rsa_dkim_key()
            keys[name], keys[name + ".dns"] = pem, record.encode()
    z.add("sel._domainkey.good.test", "TXT", keys["good.dns"].decode())
    z.add("sel._domainkey.strict.test", "TXT", keys["strict.dns"].decode())
    z.add("arc._domainkey.lists.forwarder.test", "TXT", keys["forwarder.dns"].decode())
    yield z


@pytest.fixture
def auth_front(front: StartMailgate, zone: ZoneDNSServer) -> StartMailgate:
    """The front-mode mailgate (tests/e2e/conftest.py) with the sender zones published,
    DNSBL off and the list server trusted as an ARC sealer."""

    def start(overrides: dict[str, object] | None = None) -> MailgateProcess:
        base = {"dnsbl": {"enabled": False}, "arc": {"trusted_sealers": ["lists.forwarder.test"]}}
        return front(deep_merge(base, overrides or {}))

    return start


def _message(sender: str, subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n"
        f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@x>\r\n"
        "\r\nHello Bob,\r\nthis is a test.\r\n"
    ).encode()


def _sign(msg: bytes, domain: str, key: bytes) -> bytes:
    sig = dkim.sign(
        msg, b"sel", domain.encode(), key, include_headers=[b"from", b"to", b"subject", b"date"]
    )
    return sig + msg


def _send(mg: MailgateProcess, mail_from: str, msg: bytes) -> tuple[int, bytes]:
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.9") as c:
        c.ehlo("mail.sender.example")
        assert c.mail(mail_from)[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        return c.data(msg)


def test_aligned_pass_is_delivered_with_one_trustworthy_header(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance, keys: dict[str, bytes]
) -> None:
    mg = auth_front()
    forged = b"Authentication-Results: mx.mailgate.test; dmarc=pass header.from=paypal.test\r\n"
    msg = forged + _sign(_message("alice@good.test", "all pass"), "good.test", keys["good"])
    code, _ = _send(mg, "alice@good.test", msg)
    assert code == 250
    [delivered] = mailbox_reset.wait_for_messages("bob", 1)
    head = delivered.split(b"\n\n", 1)[0].replace(b"\n\t", b" ")
    ours = [ln for ln in head.split(b"\n") if ln.startswith(b"Authentication-Results:")]
    assert len(ours) == 1 and b"paypal.test" not in head
    assert b"spf=pass smtp.mailfrom=alice@good.test" in ours[0]
    assert b"dkim=pass" in ours[0] and b"header.d=good.test" in ours[0]
    assert b"dmarc=pass" in ours[0] and b"header.from=good.test" in ours[0]
    assert b"arc=none" in ours[0]
    assert b"X-Spam-Status: No" in head
    # The contract's form, read as a mail reader unfolds it (CRLFs removed, nothing else)
    status = email.message_from_bytes(delivered, policy=email.policy.default)["X-Spam-Status"]
    assert re.fullmatch(r"No, score=-?[0-9.]+ required=6(\.0)? tests=[A-Z_,]+", status), status


def test_spoofed_p_reject_domain_is_refused_after_data(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = auth_front()
    code, text = _send(mg, "ceo@strict.test", _message("ceo@strict.test", "spoof"))
    assert (code, text[:5]) == (550, b"5.7.1")
    assert mailbox_reset.messages("bob") == []
    assert "DMARC_REJECT" in mg.logs()


def test_p_quarantine_failure_is_flagged(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = auth_front()
    code, _ = _send(mg, "news@quarantine.test", _message("news@quarantine.test", "quarantined"))
    assert code == 250
    [delivered] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"X-Spam-Flag: YES" in delivered
    assert b"dmarc=fail" in delivered


def test_dns_trouble_defers_instead_of_rejecting(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = auth_front()
    code, text = _send(mg, "alice@slow.test", _message("alice@slow.test", "slow dns"))
    assert (code, text[:5]) == (451, b"4.7.1")
    assert mailbox_reset.messages("bob") == []


def test_monitor_mode_delivers_what_it_would_reject(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = auth_front({"server": {"mode": "monitor"}})
    code, _ = _send(mg, "ceo@strict.test", _message("ceo@strict.test", "monitored spoof"))
    assert code == 250
    assert len(mailbox_reset.wait_for_messages("bob", 1)) == 1
    assert "would=reject" in mg.logs()


def test_trusted_arc_sealer_overrides_dmarc_reject(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance, keys: dict[str, bytes]
) -> None:
    mg = auth_front()
    original = _sign(_message("author@strict.test", "list post"), "strict.test", keys["strict"])
    # The list rewrites the subject (breaking the author's DKIM), records what it saw,
    # and seals the result.
    listed = original.replace(b"Subject: list post", b"Subject: [list] list post")
    ar = (
        b"Authentication-Results: lists.forwarder.test; dkim=pass header.d=strict.test;"
        b" spf=pass smtp.mailfrom=author@strict.test; dmarc=pass header.from=strict.test\r\n"
    )
    sealed = ar + listed
    arc_set = dkim.arc_sign(
        sealed, b"arc", b"lists.forwarder.test", keys["forwarder"], b"lists.forwarder.test"
    )
    code, _ = _send(mg, "bounces@lists.forwarder.test", b"".join(arc_set) + sealed)
    assert code == 250
    [delivered] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"arc=pass" in delivered and b"dmarc=fail" in delivered
    assert "ARC_TRUSTED_OVERRIDE" in mg.logs()


def test_untrusted_arc_sealer_does_not_override(
    auth_front: StartMailgate, mailbox_reset: PostfixInstance, keys: dict[str, bytes]
) -> None:
    mg = auth_front({"arc": {"trusted_sealers": []}})
    original = _sign(_message("author@strict.test", "list post"), "strict.test", keys["strict"])
    listed = original.replace(b"Subject: list post", b"Subject: [list] list post")
    ar = b"Authentication-Results: lists.forwarder.test; dkim=pass header.d=strict.test\r\n"
    sealed = ar + listed
    arc_set = dkim.arc_sign(
        sealed, b"arc", b"lists.forwarder.test", keys["forwarder"], b"lists.forwarder.test"
    )
    code, _ = _send(mg, "bounces@lists.forwarder.test", b"".join(arc_set) + sealed)
    assert code == 550
