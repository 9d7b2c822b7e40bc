"""A transaction's upstream connection outlives Postfix's smtpd_timeout.

mailgate holds the MAIL and RCPTs on its Postfix connection while the client sends the
body and the checks run; that connection is silent meanwhile. Postfix drops a silent
client after smtpd_timeout (300 s, 10 s under stress). Before the keep-alive, a slow
upload ended with the client hearing Postfix's "503 need RCPT" from a fresh connection:
a permanent failure for a message nobody refused. These tests run a Postfix with a
2-second smtpd_timeout and a client slower than that.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _need_postfix, _private_dir
from tests.e2e.conftest import message
from tests.rig.client import RawSMTP
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess
from tests.rig.ports import free_port
from tests.rig.postfix import PostfixInstance
from tests.rig.workers import TEST_REDIS_URL

SMTPD_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def impatient_postfix() -> Iterator[PostfixInstance]:
    _need_postfix()
    base = _private_dir("mailgate-postfix-impatient-")
    pf = PostfixInstance(base, free_port(), extra_main={"smtpd_timeout": f"{SMTPD_TIMEOUT:g}s"})
    pf.start()
    yield pf
    pf.stop(wait=False)
    shutil.rmtree(base, ignore_errors=True)


def _mailgate(
    tmp_path: Path, postfix: PostfixInstance, dns: ZoneDNSServer, keepalive: str
) -> MailgateProcess:
    return MailgateProcess(
        tmp_path / f"mg-{keepalive}",
        {
            "upstream": {"address": f"127.0.0.1:{postfix.listen_port}", "keepalive": keepalive},
            "dns": {"nameservers": [dns.nameserver], "timeout": "1s"},
            "greylist": {"enabled": False},
            "redis": {"url": TEST_REDIS_URL},
        },
    ).start()


def _start_transaction(mg: MailgateProcess) -> RawSMTP:
    c = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.7")
    assert c.banner().code == 220
    assert c.cmd("EHLO slow.sender.example").code == 250
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert c.cmd("RCPT TO:<bob@example.test>").code == 250
    return c


@pytest.fixture
def kept_alive(
    tmp_path: Path, impatient_postfix: PostfixInstance, dns_server: ZoneDNSServer
) -> Iterator[MailgateProcess]:
    """mailgate with a keep-alive well inside Postfix's 2 s timeout; Maildirs emptied."""
    impatient_postfix.clear_mail()
    mg = _mailgate(tmp_path, impatient_postfix, dns_server, "500ms")
    yield mg
    mg.stop()


def test_slow_body_upload_is_delivered(
    kept_alive: MailgateProcess, impatient_postfix: PostfixInstance
) -> None:
    with _start_transaction(kept_alive) as c:
        assert c.cmd("DATA").code == 354
        body = message("slow upload").split(b"\r\n")
        deadline = time.monotonic() + 2.5 * SMTPD_TIMEOUT
        for line in body:  # the body, a line at a time, over five seconds
            c.send(line + b"\r\n")
            time.sleep(max(0.0, (deadline - time.monotonic()) / len(body)))
        c.send(b".\r\n")
        reply = c.read_reply(timeout=10)
        assert reply.code == 250 and re.search(r"queued as [A-Z0-9]+", reply.text), reply
    [msg] = impatient_postfix.wait_for_messages("bob", 1)
    assert b"Subject: slow upload" in msg


def test_pause_between_commands_keeps_the_transaction(
    kept_alive: MailgateProcess, impatient_postfix: PostfixInstance
) -> None:
    with _start_transaction(kept_alive) as c:
        time.sleep(2 * SMTPD_TIMEOUT)
        assert c.cmd("RCPT TO:<carol@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("after a pause") + b"\r\n.\r\n")
        assert c.read_reply(timeout=10).code == 250
    assert len(impatient_postfix.wait_for_messages("carol", 1)) == 1


def test_lost_connection_is_a_temporary_failure(
    tmp_path: Path, impatient_postfix: PostfixInstance, dns_server: ZoneDNSServer
) -> None:
    """Keep-alive off: Postfix drops the idle connection. The client hears 451 4.3.0,
    never the 503 of a fresh connection that holds no MAIL."""
    mg = _mailgate(tmp_path, impatient_postfix, dns_server, "0s")
    try:
        with _start_transaction(mg) as c:
            time.sleep(2 * SMTPD_TIMEOUT)
            reply = c.cmd("RCPT TO:<carol@example.test>")
            assert (reply.code, reply.text.split()[0]) == (451, "4.3.0"), reply
            reply = c.cmd("DATA")
            assert reply.code == 451, reply
            # The session goes on: a new transaction gets a new connection.
            assert c.cmd("RSET").code == 250
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert "connection lost in the middle of the transaction" in mg.logs()
    finally:
        mg.stop()
