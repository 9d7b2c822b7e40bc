"""Filter mode: Postfix keeps :25 and hands each transaction to mailgate (smtpd_proxy_filter).

client -> Postfix smtpd -> XFORWARD -> mailgate -> XCLIENT -> after-filter smtpd -> Maildir
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.e2e.conftest import (
    filter_mailgate,
    load_while_killing_a_worker,
    message,
    wait_for_delivery,
)
from tests.rig.client import smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess
from tests.rig.postfix import PostfixInstance


def test_delivery_through_the_proxy_filter(
    filter_mode: MailgateProcess, postfix_filter: PostfixInstance
) -> None:
    with smtp_client("127.0.0.1", postfix_filter.listen_port, source_ip="127.0.0.8") as c:
        c.ehlo("mail.sender.example")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        code, text = c.data(message("filter delivery"))
    assert code == 250 and re.search(rb"queued as [A-Z0-9]+", text)
    [msg] = postfix_filter.wait_for_messages("bob", 1)
    assert b"Subject: filter delivery" in msg
    # mailgate judged the real client (from XFORWARD), not Postfix on loopback:
    assert b"X-Spam-Status: No" in msg
    logs = filter_mode.logs()
    assert "event=message" in logs and "client=127.0.0.8" in logs
    assert "helo=mail.sender.example" in logs


def test_unknown_user_is_refused_by_the_after_filter_postfix(
    filter_mode: MailgateProcess, postfix_filter: PostfixInstance
) -> None:
    with smtp_client("127.0.0.1", postfix_filter.listen_port) as c:
        c.ehlo("mail.sender.example")
        c.mail("alice@example.org")
        code, text = c.rcpt("nobody@example.test")
    assert code == 550 and b"5.1.1" in text


def test_mailgate_refusal_reaches_the_client_through_postfix(
    tmp_path: object, filter_mode: MailgateProcess, postfix_filter: PostfixInstance
) -> None:
    """A content refusal by mailgate is what the client hears from Postfix.

    (A bare LF would not do: the before-filter Postfix already normalises it to CRLF.
    A 1200-octet line passes Postfix's line_length_limit of 2048 and mailgate refuses it.)
    """
    from tests.rig.client import RawSMTP

    r = RawSMTP("127.0.0.1", postfix_filter.listen_port)
    assert r.banner().code == 220
    r.cmd("EHLO mail.sender.example")
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(b"Subject: long\r\n\r\n" + b"w" * 1200 + b"\r\n.\r\n")
    reply = r.read_reply(timeout=15)
    assert reply.code == 550 and "5.5.6" in reply.text, reply
    assert postfix_filter.messages("bob") == []


def test_mailgate_down_gives_a_temporary_error_not_a_loss(
    filter_mode: MailgateProcess, postfix_filter: PostfixInstance
) -> None:
    filter_mode.stop()
    with smtp_client("127.0.0.1", postfix_filter.listen_port) as c:
        c.ehlo("mail.sender.example")
        code, _ = c.mail("alice@example.org")
        if code == 250:
            code, _ = c.rcpt("bob@example.test")
    assert 400 <= code < 500


def test_greylisting_through_the_proxy_filter_delivers_only_to_recipients_told_250(
    tmp_path: Path, postfix_filter: PostfixInstance, dns_server: ZoneDNSServer, redis_url: str
) -> None:
    """Postfix -> mailgate -> Postfix with greylisting: the after-filter Postfix accepts
    carol before mailgate greylists her, so the final dot replays the transaction to it
    without her; the client hears each recipient's own answer from the front Postfix."""
    postfix_filter.clear_mail()
    assert postfix_filter.proxy_filter_port and postfix_filter.after_filter_port
    policy = {
        "server": {
            "listen": [f"127.0.0.1:{postfix_filter.proxy_filter_port}"],
            "xforward_hosts": ["127.0.0.1/32"],
            "trusted_networks": [],
        },
        "upstream": {"address": f"127.0.0.1:{postfix_filter.after_filter_port}", "xclient": True},
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "1s"},
        "greylist": {"enabled": True, "delay": "1s"},
        "redis": {"url": redis_url},
    }
    mg = MailgateProcess(tmp_path / "mg-gl", policy, smtp_port=postfix_filter.proxy_filter_port)
    mg.start()
    try:

        def attempt(rcpts: list[str], subject: str) -> dict[str, int]:
            got = {}
            port = postfix_filter.listen_port
            with smtp_client("127.0.0.1", port, source_ip="127.0.0.9") as c:
                c.ehlo("mail.sender.example")
                c.mail("alice@example.org")
                for r in rcpts:
                    got[r] = c.rcpt(r)[0]
                if 250 in got.values():
                    assert c.data(message(subject))[0] == 250
            return got

        assert attempt(["bob@example.test"], "first") == {"bob@example.test": 451}
        time.sleep(1.3)
        got = attempt(["bob@example.test", "carol@example.test", "nobody@example.test"], "mixed")
        assert got == {
            "bob@example.test": 250,
            "carol@example.test": 451,
            "nobody@example.test": 550,
        }
        [msg] = postfix_filter.wait_for_messages("bob", 1)
        assert b"Subject: mixed" in msg
        time.sleep(0.5)  # anything for carol would have been delivered with bob's copy
        assert postfix_filter.messages("carol") == []
        assert "event=upstream_replay" in mg.logs()
    finally:
        mg.stop()


def test_a_worker_killed_under_load_behind_postfix_loses_no_message_told_250(
    tmp_path: Path,
    postfix_filter: PostfixInstance,
    dns_server: ZoneDNSServer,
) -> None:
    """Filter mode, SIGKILL of one of two workers under load: Postfix turns the sessions
    it lost into 4xx (its before-queue proxy never queues on its own), and every message
    a client was told 250 for is delivered, whole. A message the after-filter smtpd
    queued just before the kill may arrive although its client heard 451: that is the
    before-queue duplicate window, and the sender's retry makes at most one copy more."""
    postfix_filter.clear_mail()
    mg = filter_mailgate(
        tmp_path / "mg-kill",
        postfix_filter,
        dns_server,
        {"server": {"workers": 2, "max_connections_per_ip": 200}},
    )
    mg.start()
    try:
        load = load_while_killing_a_worker(mg, postfix_filter.listen_port)
    finally:
        mg.stop()
    assert load.refused or load.cut_off, "the kill interrupted no session: nothing was tested"
    assert len(load.told_250) > 20
    delivered = wait_for_delivery(postfix_filter, "bob", load.told_250)
    unannounced = set(delivered) - load.told_250
    assert unannounced <= set(load.refused) | set(load.cut_off)
