"""SMTP smuggling against the real Postfix upstream (whose own defence is off, as by default).

Each probe ends DATA the way some MTAs would (bare LF/CR variants) and then carries a
second, forged transaction. mailgate must refuse the message; at most one message may
land in any mailbox, and the forged one never.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import StartMailgate
from tests.rig.client import RawSMTP
from tests.rig.postfix import PostfixInstance

SMUGGLED = (
    b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n"
    b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)

PROBES = {
    "lf-dot-lf": b"\n.\n",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-crlf": b"\r.\r\n",
}


def test_the_rig_postfix_alone_can_be_smuggled(mailbox_reset: PostfixInstance) -> None:
    """Control: without mailgate, the test Postfix accepts a smuggled second message."""
    r = RawSMTP("127.0.0.1", mailbox_reset.listen_port)
    r.banner()
    r.cmd("EHLO attacker.example")
    r.cmd("MAIL FROM:<alice@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(b"Subject: outer\r\n\r\nhello\n.\n" + SMUGGLED + b"\r\n.\r\n")
    time.sleep(1)
    r.close()
    assert mailbox_reset.wait_for_messages("carol", 1, timeout=10)


@pytest.mark.parametrize("probe", list(PROBES.values()), ids=list(PROBES))
def test_smuggling_probe_is_refused(
    front: StartMailgate, mailbox_reset: PostfixInstance, probe: bytes
) -> None:
    mg = front()
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.banner()
    r.cmd("EHLO attacker.example")
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(b"Subject: outer\r\n\r\nhello" + probe + SMUGGLED + b"\r\n.\r\n")
    reply = r.read_reply(timeout=10)
    assert reply.code == 550 and "bare" in reply.text
    # The session is still in sync: a clean message goes through afterwards.
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<alice@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(b"Subject: clean\r\n\r\nfine\r\n.\r\n")
    assert r.read_reply(timeout=10).code == 250
    r.cmd("QUIT")
    assert len(mailbox_reset.wait_for_messages("alice", 1)) == 1
    time.sleep(0.5)
    assert mailbox_reset.messages("carol") == []
    assert mailbox_reset.messages("bob") == []
