"""Front mode against the real Postfix: what lands in the Maildir is what the client was told."""

from __future__ import annotations

import concurrent.futures
import re

from tests.e2e.conftest import (
    StartMailgate,
    load_while_killing_a_worker,
    message,
    wait_for_delivery,
)
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.postfix import PostfixInstance


def test_delivery_with_postfix_queue_id_and_real_client(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = front()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.5") as c:
        c.ehlo("mail.sender.example")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        code, text = c.data(message("front delivery"))
    assert code == 250
    queue_id = re.search(rb"queued as ([A-Z0-9]+)", text)
    assert queue_id, text  # Postfix's own reply reached the client
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"Subject: front delivery" in msg
    assert b"X-Spam-Status: No" in msg
    # XCLIENT: Postfix logged the real client and HELO, not mailgate's address.
    log = mailbox_reset.maillog()
    assert f"{queue_id.group(1).decode()}: client=unknown[127.0.0.5]" in log
    # Postfix's Received: header names the client's HELO and address, not mailgate's.
    assert b"from mail.sender.example (unknown [127.0.0.5])" in msg


def test_unknown_user_and_relay_denied_come_from_postfix(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = front()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("mail.sender.example")
        c.mail("alice@example.org")
        code, text = c.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in text
        code, text = c.rcpt("someone@elsewhere.example")
        assert code == 554 and b"Relay access denied" in text
        assert c.rcpt("carol@example.test")[0] == 250
        assert c.data(message("mixed recipients"))[0] == 250
    assert len(mailbox_reset.wait_for_messages("carol", 1)) == 1


def test_postfix_client_restrictions_see_the_xclient_address(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    """The test Postfix rejects 127.0.0.66: proof the real address is what Postfix judges."""
    mg = front()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.66") as c:
        c.ehlo("mail.sender.example")
        code, _ = c.mail("alice@example.org")
        if code == 250:
            code, _ = c.rcpt("bob@example.test")
    assert code == 554


def test_oversized_message_is_refused_before_postfix(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = front({"server": {"max_message_size": 20000}})
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("mail.sender.example")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        code, text = c.data(
            message("big", body="z" * 76 + "\r\n") * 1 + b"z" * 76 * 0 + b"y\r\n" * 12000
        )
    assert (code, text[:5]) == (552, b"5.3.4")
    assert mailbox_reset.messages("bob") == []


def test_hundred_concurrent_sessions_nothing_lost_or_duplicated(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = front({"server": {"max_connections_per_ip": 200}})

    def send(i: int) -> int:
        with smtp_client(
            "127.0.0.1", mg.smtp_port, source_ip=f"127.0.1.{i % 250 + 1}", timeout=60
        ) as c:
            c.ehlo(f"host{i}.sender.example")
            c.mail(f"sender{i}@example.org")
            c.rcpt("bob@example.test")
            return c.data(message(f"concurrent {i}", msgid=f"c{i}"))[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        codes = list(pool.map(send, range(100)))
    assert codes == [250] * 100
    msgs = mailbox_reset.wait_for_messages("bob", 100, timeout=60)
    ids = sorted(int(re.search(rb"Message-ID: <c(\d+)@", m).group(1)) for m in msgs)  # type: ignore[union-attr]
    assert ids == list(range(100))


def test_a_worker_killed_under_load_loses_no_message_it_answered_250(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    """SIGKILL of a worker in the middle of load: its sessions die without a 250 (their
    senders send again later), the supervisor starts another worker, and every message
    a client was told 250 for is in the mailbox, whole. Nothing half-received reaches
    Postfix: it queues only at the final dot, which mailgate sends last."""
    mg = front({"server": {"workers": 2, "max_connections_per_ip": 200}})
    load = load_while_killing_a_worker(mg, mg.smtp_port)
    assert load.cut_off, "the kill interrupted no session: nothing was tested"
    assert len(load.told_250) > 20
    delivered = wait_for_delivery(mailbox_reset, "bob", load.told_250)
    # Delivered without a 250 only when the worker died between Postfix's 250 and ours.
    assert not set(load.refused) & set(delivered)
    assert set(delivered) <= load.told_250 | set(load.cut_off)


def test_upstream_down_never_250(front: StartMailgate, mailbox_reset: PostfixInstance) -> None:
    mg = front({"upstream": {"address": "127.0.0.1:1"}})
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("mail.sender.example")
        code, text = c.mail("alice@example.org")
    assert (code, text[:5]) == (451, b"4.3.0")


def test_smtputf8_passes_through_when_postfix_offers_it(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = front()
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.banner()
    ehlo = r.cmd("EHLO mail.sender.example")
    if "SMTPUTF8" not in ehlo.text:
        # mailgate only offers what the upstream honours; learn it from a first session.
        r.cmd("MAIL FROM:<a@example.org>")
        r.cmd("RSET")
        ehlo = r.cmd("EHLO mail.sender.example")
    assert "SMTPUTF8" in ehlo.text
    assert r.cmd("MAIL FROM:<jöran@example.org> SMTPUTF8").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send("From: jöran@example.org\r\nSubject: utf8\r\n\r\nhej\r\n.\r\n".encode())
    assert r.read_reply().code == 250
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert "jöran".encode() in msg


def test_non_ascii_sender_without_smtputf8_is_refused(front: StartMailgate) -> None:
    mg = front()
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.banner()
    r.cmd("EHLO mail.sender.example")
    reply = r.cmd("MAIL FROM:<jöran@example.org>")
    assert (reply.code, reply.text.split()[0]) == (553, "5.6.7")


def test_postfix_sees_the_forward_confirmed_client_name(
    front: StartMailgate, mailbox_reset: PostfixInstance, dns_zone: ZoneDNSServer
) -> None:
    """XCLIENT NAME is the verified reverse name, as Postfix itself would log it."""
    dns_zone.add("6.0.0.127.in-addr.arpa", "PTR", "relay.sender.example")
    dns_zone.add("relay.sender.example", "A", "127.0.0.6")
    dns_zone.add("7.0.0.127.in-addr.arpa", "PTR", "liar.sender.example")  # not confirming
    mg = front()
    for ip, subject in (("127.0.0.6", "named"), ("127.0.0.7", "unnamed")):
        with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
            c.ehlo("relay.sender.example")
            c.mail("alice@example.org")
            c.rcpt("bob@example.test")
            assert c.data(message(subject))[0] == 250
    msgs = mailbox_reset.wait_for_messages("bob", 2)
    named = next(m for m in msgs if b"Subject: named" in m)
    unnamed = next(m for m in msgs if b"Subject: unnamed" in m)
    assert b"(relay.sender.example [127.0.0.6])" in named
    assert b"(unknown [127.0.0.7])" in unnamed
    assert "client=relay.sender.example[127.0.0.6]" in mailbox_reset.maillog()


def test_a_failed_ptr_lookup_is_not_a_failed_session(
    front: StartMailgate, mailbox_reset: PostfixInstance, dns_zone: ZoneDNSServer
) -> None:
    """A SERVFAIL for the client's PTR: XCLIENT says NAME=[TEMPUNAVAIL], XFORWARD (which
    knows no such word; Postfix refused it with 501) says [UNAVAILABLE]. Before, every
    MAIL of such a client got 451 4.3.0."""
    dns_zone.set_name_mode("20.0.0.127.in-addr.arpa", "servfail")
    mg = front({"rdns": {"enabled": True}})
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.20") as c:
        c.ehlo("lame.sender.example")
        assert c.mail("alice@example.org")[0] == 250
        c.rcpt("bob@example.test")
        assert c.data(message("lame reverse zone"))[0] == 250
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"Subject: lame reverse zone" in msg and b"RDNS_TEMPERROR" in msg
    assert "upstream failure" not in mg.logs()


def test_every_message_of_a_session_carries_its_xforward_into_the_postfix_log(
    front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    """Postfix forgets XFORWARD at the end of a transaction: without it again before
    the next MAIL, the second message's log line lost orig_queue_id (mailgate's id)
    and, with upstream.xclient off, the real client's address."""
    mg = front({"upstream": {"xclient": False}, "server": {"trusted_networks": []}})
    queue_ids = []
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.56") as c:
        c.ehlo("mail.example.org")
        for i in range(3):
            c.mail("alice@example.org")
            c.rcpt("bob@example.test")
            code, text = c.data(message(f"xforward {i}"))
            assert code == 250
            found = re.search(rb"queued as ([A-Z0-9]+)", text)
            assert found is not None
            queue_ids.append(found.group(1).decode())
    mailbox_reset.wait_for_messages("bob", 3)
    log = mailbox_reset.maillog()
    for qid in queue_ids:
        [line] = [ln for ln in log.splitlines() if f"{qid}: client=" in ln]
        assert "orig_client=unknown[127.0.0.56]" in line, line
        assert re.search(r"orig_queue_id=[0-9A-F]{12}\b", line), line
