"""The lockstep relay: what the client hears is what the upstream said, in step.

Client -> real mailgate process -> scripted upstream (fault injection per stage).
"""

from __future__ import annotations

import re
import smtplib
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import ScriptedUpstream


def test_message_is_relayed_with_the_upstreams_own_reply(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.7") as c:
        c.ehlo("client.example.org")
        code, text = c.mail("alice@example.org")
        assert code == 250
        c.rcpt("bob@example.test")
        code, text = c.data(message())
    assert code == 250
    [txn] = upstream.wait_for_transactions(1)
    # The client saw the upstream's queue id: the 250 is the upstream's, not ours.
    assert txn.queue_id and txn.queue_id.encode() in text
    assert txn.mail_from == "alice@example.org" and txn.rcpts == ["bob@example.test"]
    # XCLIENT told the upstream who the real client is.
    assert txn.xclient["ADDR"] == "127.0.0.7"
    assert txn.xclient["HELO"] == "client.example.org"
    body = txn.message
    assert body.endswith(b"hello\r\n")
    assert b"X-Spam-Status: No, score=" in body  # judged: our verdict header is there
    # The message id of mailgate's log line travels with the message.
    logged = re.search(r"event=message id=(\S+)", mg.logs())
    assert logged and f"X-Mailgate-ID: {logged.group(1)}\r\n".encode() in body


def test_per_recipient_answers_pass_through(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    upstream.script(rcpt={"nobody@example.test": "550 5.1.1 <nobody@example.test>: unknown user"})
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        code, text = c.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in text and b"unknown user" in text
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(message())[0] == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.rcpts == ["bob@example.test"]


def test_mail_and_rcpt_parameters_reach_the_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    ehlo = r.cmd("EHLO client.example.org")
    assert "DSN" in ehlo.text and "SIZE" in ehlo.text and "PIPELINING" in ehlo.text
    assert (
        r.cmd("MAIL FROM:<alice@example.org> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x1").code == 250
    )
    assert (
        r.cmd(
            "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.test"
        ).code
        == 250
    )
    assert r.cmd("DATA").code == 354
    r.send(message() + b".\r\n")
    assert r.read_reply().code == 250
    r.cmd("QUIT")
    [txn] = upstream.wait_for_transactions(1)
    assert txn.mail_params == ["SIZE=100", "BODY=8BITMIME", "RET=HDRS", "ENVID=x1"]
    assert txn.rcpt_params == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.test"]]


def test_pipelined_transactions_and_dot_stuffing(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    body = b"Subject: dots\r\n\r\n..leading dot\r\n.\r\n"  # wire form of ".leading dot" and "" ...
    r.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + body
        + b"MAIL FROM:<b@example.org>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n"
        + b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
    )
    codes = [r.read_reply().code for _ in range(9)]
    assert codes == [250, 250, 354, 250, 250, 250, 354, 250, 221]
    txns = upstream.wait_for_transactions(2)
    assert txns[0].message.endswith(b".leading dot\r\n")
    assert txns[0].data.endswith(b"..leading dot\r\n")  # re-stuffed on the way out
    assert txns[1].rcpts == ["carol@example.test"]


def test_upstream_unreachable_gives_451_never_250(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    upstream.refuse()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        code, text = c.mail("alice@example.org")
    assert code == 451 and text.startswith(b"4.3.0")
    assert "upstream failure stage=connect" in mg.logs()


@pytest.mark.parametrize(
    ("script", "expect_code"),
    [
        ({"data_end": "451 4.3.0 queue file write error"}, 451),
        ({"data_end": "554 5.7.1 content rejected downstream"}, 554),
        ({"drop": ["data_end"]}, 451),
        ({"delay": {"data_end": 5.0}}, 451),  # beyond upstream.timeout = 3s
        ({"data": "554 5.5.1 no valid recipients"}, 554),
    ],
    ids=[
        "upstream-451",
        "upstream-554",
        "upstream-drops",
        "upstream-slow",
        "upstream-refuses-DATA",
    ],
)
def test_upstream_failure_at_data_never_becomes_250(
    mailgate: StartMailgate, upstream: ScriptedUpstream, script: dict, expect_code: int
) -> None:
    upstream.script(**script)
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port, timeout=20) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        try:
            code, _ = c.data(message())  # the final reply is returned, not raised
        except smtplib.SMTPDataError as err:  # raised when DATA itself is refused
            code = err.smtp_code
    assert code == expect_code
    if "delay" not in script:
        assert not any(t.accepted for t in upstream.transactions)
    # With a slow upstream the message may still be queued after mailgate gave up
    # (RFC 1047): the client retries and a duplicate is possible, a loss is not.


def test_upstream_closing_at_mail_gives_451(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    upstream.script(mail="421 4.3.2 shutting down")
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        code, _ = c.mail("alice@example.org")
        assert code == 451
        upstream.reset_script()
        # The next transaction opens a fresh upstream session and goes through.
        c.rset()
        assert c.mail("alice@example.org")[0] == 250
        c.rcpt("bob@example.test")
        assert c.data(message())[0] == 250


def test_client_gone_mid_data_leaves_nothing_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    r.cmd("MAIL FROM:<alice@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    assert r.cmd("DATA").code == 354
    r.send(b"Subject: half\r\n\r\nthe client dies here")
    r.close()
    time.sleep(0.5)
    verbs = [v for s in upstream.sessions for v in s.verbs()]
    assert "MAIL" in verbs and "DATA" not in verbs
    assert upstream.transactions == []


def test_rset_aborts_the_upstream_transaction(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        c.rset()
    time.sleep(0.2)
    verbs = [v for s in upstream.sessions for v in s.verbs()]
    assert "RSET" in verbs and "DATA" not in verbs


def _upstream_errors(mg: MailgateProcess) -> dict[str, float]:
    """stage -> mailgate_upstream_errors_total, read from the running process."""
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.labels["stage"]: s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "mailgate_upstream_errors"
        for s in fam.samples
        if s.name == "mailgate_upstream_errors_total"
    }


@pytest.mark.parametrize(
    ("script", "stage"),
    [
        ({"data": "421 4.3.2 shutting down"}, "data"),
        ({"drop": ["data"]}, "data"),
        ({"delay": {"data": 2.5}}, "data"),  # beyond upstream.timeout = 1s
        ({"data_end": "421 4.3.2 shutting down"}, "data_end"),
        ({"drop": ["data_end"]}, "data_end"),
        ({"delay": {"data_end": 2.5}}, "data_end"),
        ({"mail": "421 4.3.2 shutting down"}, "mail"),
        ({"delay": {"rcpt": 2.5}}, "rcpt"),
        ({"data_end": "451 4.3.0 queue file write error"}, None),  # its own answer: passed on
    ],
    ids=[
        "421-at-DATA",
        "drop-at-DATA",
        "timeout-at-DATA",
        "421-at-dot",
        "drop-at-dot",
        "timeout-at-dot",
        "421-at-MAIL",
        "timeout-at-RCPT",
        "451-at-dot",
    ],
)
def test_each_upstream_failure_is_counted_once_at_its_stage(
    mailgate: StartMailgate, upstream: ScriptedUpstream, script: dict, stage: str | None
) -> None:
    """The client gets a 4xx; mailgate_upstream_errors_total gains exactly one, under
    the stage the log line names. A reply the upstream chose (451 to the dot) reaches
    the client as is and is no failure of the conversation."""
    mg = mailgate({"upstream": {"timeout": "1s"}})
    before = _upstream_errors(mg)
    assert set(before) == {
        "connect",
        "greeting",
        "ehlo",
        "xclient",
        "xforward",
        "mail",
        "rcpt",
        "data",
        "data_end",
    }
    upstream.script(**script)
    r = RawSMTP("127.0.0.1", mg.smtp_port, timeout=15).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    replies = [r.cmd("MAIL FROM:<alice@example.org>"), r.cmd("RCPT TO:<bob@example.test>")]
    replies.append(r.cmd("DATA"))
    if replies[-1].code == 354:
        r.send(message() + b".\r\n")
        replies.append(r.read_reply())
    r.cmd("QUIT")
    r.close()
    failed = [x for x in replies if x.code >= 400]
    assert failed and failed[0].code == 451, replies
    after = _upstream_errors(mg)
    grown = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    if stage is None:
        assert grown == {}
        assert failed[0].text == "4.3.0 queue file write error"
        return
    assert grown == {stage: 1}
    assert failed[0].text.startswith("4.3.0 Service temporarily unavailable")
    assert f"upstream failure stage={stage} " in mg.logs()
