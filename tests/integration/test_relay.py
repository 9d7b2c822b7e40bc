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

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import DEFAULT_EXTENSIONS, Raw, ScriptedUpstream


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


def test_an_extension_the_upstream_withdrew_is_refused_not_sent(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """EHLO is answered from what the upstream offered last time; when its connection,
    opened at MAIL, no longer offers SMTPUTF8 or DSN, the parameter is refused here as
    the upstream would, never sent to it. The next session advertises neither."""
    mg = mailgate()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        assert c.ehlo("client.example.org")[0] == 250  # the capabilities are learnt
        assert c.mail("alice@example.org")[0] == 250
    upstream.script(extensions=[e for e in DEFAULT_EXTENSIONS if e not in ("SMTPUTF8", "DSN")])
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    assert "SMTPUTF8" in r.cmd("EHLO client.example.org").text  # still the old answer
    refused = r.cmd("MAIL FROM:<a@b\u00fccher.example> SMTPUTF8")
    assert (refused.code, refused.text.split()[0]) == (555, "5.5.4")
    refused = r.cmd("MAIL FROM:<a@example.org> RET=HDRS")
    assert (refused.code, refused.text.split()[0]) == (555, "5.5.4")
    assert r.cmd("MAIL FROM:<a@example.org>").code == 250  # the session goes on
    r.cmd("QUIT")
    assert not any(b"SMTPUTF8" in c or b"RET=" in c for c in upstream.commands())
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    ehlo = r.cmd("EHLO client.example.org").text
    assert "SMTPUTF8" not in ehlo and "DSN" not in ehlo
    r.cmd("QUIT")


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


# RFC 5321 4.2.1: every line of a reply has the same code; which would these mean?
MIXED_250_550 = Raw("250-2.0.0 first line ok\r\n550 5.7.1 last line rejects\r\n")
MIXED_550_250 = Raw("550-5.7.1 first line rejects\r\n250 2.0.0 last line ok\r\n")


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
        # Protocol errors: answers no command may have, more than one reply to a command.
        ({"data": "250 2.0.0 Ok (DATA answered 250 instead of 354)"}, "data"),
        ({"data": "334 go on"}, "data"),
        ({"data": Raw("199 go on\r\n")}, "data"),
        ({"mail": "354 go ahead"}, "mail"),
        ({"data_end": "354 send more"}, "data_end"),
        ({"replies": {"rcpt": MIXED_250_550}}, "rcpt"),
        ({"data_end": MIXED_250_550}, "data_end"),
        ({"data_end": MIXED_550_250}, "data_end"),
        ({"unsolicited": {"mail": "250 2.1.0 Ok"}}, "mail"),
        ({"unsolicited": {"rcpt": "250 2.1.5 Ok"}}, "rcpt"),
        ({"unsolicited": {"data": "250 2.0.0 EARLY"}}, "data"),
        ({"unsolicited": {"data_end": "250 2.0.0 Ok: once more"}}, "data_end"),
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
        "250-to-DATA",
        "334-to-DATA",
        "1xx-to-DATA",
        "354-to-MAIL",
        "354-to-dot",
        "mixed-codes-at-RCPT",
        "mixed-codes-250-550-at-dot",
        "mixed-codes-550-250-at-dot",
        "doubled-MAIL-reply",
        "doubled-RCPT-reply",
        "reply-with-the-354",
        "doubled-dot-reply",
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
        "keepalive",
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


def _raw_session(mg: MailgateProcess) -> RawSMTP:
    r = RawSMTP("127.0.0.1", mg.smtp_port, timeout=15).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    return r


def _wait_closed(up: ScriptedUpstream, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not all(s.closed for s in up.sessions):
        assert time.monotonic() < deadline, "mailgate kept an upstream connection open"
        time.sleep(0.02)


def test_250_to_data_is_an_upstream_error_not_a_relayed_message(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 5321 4.3.2: DATA gets 354 or an error. A 250 there means the upstream has not
    taken the body; passing it on told the client its message was queued (lost mail)."""
    upstream.script(data="250 2.0.0 Ok (DATA answered 250 instead of 354)")
    mg = mailgate()
    before = _upstream_errors(mg)
    r = _raw_session(mg)
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(message() + b".\r\n")
    reply = r.read_reply()
    assert reply.code == 451 and reply.text.startswith("4.3.0"), reply
    _wait_closed(upstream)  # the connection that spoke nonsense is not reused
    assert upstream.transactions == []
    after = _upstream_errors(mg)
    assert after["data"] - before["data"] == 1
    logs = mg.logs()
    assert 'upstream failure stage=data detail="DATA answered 250' in logs
    assert "outcome=relayed" not in logs
    # The session goes on: the next message opens a fresh upstream connection.
    upstream.reset_script()
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(message() + b".\r\n")
    reply = r.read_reply()
    [txn] = upstream.wait_for_transactions(1)
    assert reply.code == 250 and txn.queue_id and txn.queue_id in reply.text
    r.close()


def test_doubled_reply_to_the_dot_shifts_no_later_reply(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """An extra reply after the dot, pipelining client: no reply is ever taken for the
    next command's. The message gets 451 (its reply is ambiguous: a duplicate at worst)."""
    upstream.script(
        unsolicited={"data_end": "250 2.0.0 Ok: said twice"},
        rcpt={"nobody@example.test": "550 5.1.1 <nobody@example.test>: unknown user"},
    )
    mg = mailgate()
    r = _raw_session(mg)
    r.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + message("one")
        + b".\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<nobody@example.test>\r\n"
        + b"RCPT TO:<carol@example.test>\r\n"
    )
    replies = r.read_replies(7)
    assert [x.code for x in replies] == [250, 250, 354, 451, 250, 550, 250], replies
    assert replies[3].text.startswith("4.3.0")
    assert "unknown user" in replies[5].text  # the upstream's own refusal, in its place
    # The second message, on a well-behaved upstream: its 250 is its own.
    upstream.reset_script()
    assert r.cmd("DATA").code == 354
    r.send(message("two") + b".\r\n")
    reply = r.read_reply()
    first, second = upstream.wait_for_transactions(2)
    assert first.accepted  # kept upstream: the client's retry may duplicate it, not lose it
    assert second.rcpts == ["carol@example.test"] and b"Subject: two" in second.message
    assert reply.code == 250 and second.queue_id and second.queue_id in reply.text
    assert 'upstream failure stage=data_end detail="unsolicited input after the reply' in mg.logs()
    r.close()


def test_late_unsolicited_reply_is_refused_before_the_next_command(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A reply to nothing that arrives between commands is noticed before the next one
    is sent (in the read buffer, no extra syscall), never read as that command's reply."""
    upstream.script(
        unsolicited={"data_end": "250 2.0.0 Ok: said twice"},
        unsolicited_delay={"data_end": 0.2},
        rcpt={"nobody@example.test": "550 5.1.1 <nobody@example.test>: unknown user"},
    )
    mg = mailgate()
    before = _upstream_errors(mg)
    r = _raw_session(mg)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message("one") + b".\r\n")
    reply = r.read_reply()
    [first] = upstream.wait_for_transactions(1)
    assert reply.code == 250 and first.queue_id and first.queue_id in reply.text
    time.sleep(0.6)  # the stray reply is in by now
    reply = r.cmd("MAIL FROM:<b@example.org>")
    assert reply.code == 451 and reply.text.startswith("4.3.0"), reply
    assert _upstream_errors(mg)["mail"] - before["mail"] == 1
    assert 'upstream failure stage=mail detail="unsolicited input before MAIL' in mg.logs()
    _wait_closed(upstream)
    assert r.cmd("MAIL FROM:<b@example.org>").code == 250  # a fresh connection
    assert r.cmd("RCPT TO:<nobody@example.test>").code == 550
    assert r.cmd("RCPT TO:<carol@example.test>").code == 250
    r.cmd("DATA")
    r.send(message("two") + b".\r\n")
    reply = r.read_reply()
    _, second = upstream.wait_for_transactions(2)
    assert second.rcpts == ["carol@example.test"]
    assert reply.code == 250 and second.queue_id and second.queue_id in reply.text
    r.close()


def test_early_reply_with_the_354_leaves_nothing_queued(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A reply that comes before the body is not the message's: the dot is never sent
    (nothing queued), the client gets 451, and the upstream's later answer cannot land
    on the client's next command."""
    upstream.script(unsolicited={"data": "250 2.0.0 EARLY"}, data_end="554 5.7.1 the real answer")
    mg = mailgate()
    r = _raw_session(mg)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message("one") + b".\r\n")
    reply = r.read_reply()
    assert reply.code == 451 and "EARLY" not in reply.text, reply
    _wait_closed(upstream)
    assert upstream.transactions == []
    upstream.reset_script()
    assert r.cmd("MAIL FROM:<b@example.org>").code == 250
    r.close()


def test_early_reply_while_a_large_body_streams_stops_before_the_dot(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """The upstream answers after the first body line and stops reading: mailgate sees
    the reply when its send buffer drains and never sends the dot."""
    upstream.script(
        unsolicited={"data_mid": "250 2.0.0 EARLY"},
        stall={"data_mid": 1.0},
        rcvbuf=64 * 1024,
    )
    mg = mailgate(AUTH_CHECKS_OFF)
    before = _upstream_errors(mg)
    body = ("x" * 78 + "\r\n") * (8 * 1024 * 1024 // 80)  # 8 MiB: more than the socket buffers
    r = _raw_session(mg)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message("big", body) + b".\r\n")
    reply = r.read_reply(timeout=30)
    assert reply.code == 451 and "EARLY" not in reply.text, reply
    _wait_closed(upstream)
    assert upstream.transactions == []
    assert _upstream_errors(mg)["data"] - before["data"] == 1
    assert 'upstream failure stage=data detail="unsolicited input' in mg.logs()
    r.close()


def test_upstream_reply_text_is_made_safe_for_the_client(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """The client gets the upstream's own text, without control characters and in
    lines of at most 512 octets (RFC 5321 4.5.3.1.5)."""
    upstream.script(
        mail="250 2.1.0 \x1b[31mred\x07\x00nul\rcr\x7fdel\u009bcsi\ttab",
        rcpt={
            "long@example.test": "550 5.1.1 " + "x" * 1000,
            "multi@example.test": "452-4.2.2 " + "é" * 600 + "\n452 4.2.2 " + "y" * 700,
        },
    )
    mg = mailgate()
    r = _raw_session(mg)
    reply = r.cmd("MAIL FROM:<a@example.org>")
    assert reply.raw == b"250 2.1.0 ?[31mred??nul?cr?del?csi\ttab\r\n"
    reply = r.cmd("RCPT TO:<long@example.test>")
    assert reply.raw == b"550 5.1.1 " + b"x" * 500 + b"\r\n"
    reply = r.cmd("RCPT TO:<multi@example.test>")
    assert reply.code == 452
    lines = reply.raw.split(b"\r\n")[:-1]
    assert len(lines) == 2 and all(len(line) + 2 <= 512 for line in lines), lines
    assert lines[0] == ("452-4.2.2 " + "é" * 250).encode()  # cut between characters
    assert lines[1] == b"452 4.2.2 " + b"y" * 500
    r.close()


def test_long_and_quoted_local_parts_reach_the_upstream_verbatim(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A quoted local part holding ">" (RFC 5321 4.1.2 qtextSMTP) and an 80-octet VERP
    local part (4.5.3.1: 64 is a minimum) pass the checks and reach the upstream byte
    for byte, parameters included: both were refused with 501 before."""
    verp = "bounces+" + "a1b2c3d4" * 9 + "@example.test"
    mg = mailgate()
    r = _raw_session(mg)
    assert r.cmd('MAIL FROM:<"a>b"@example.org> SIZE=100').code == 250
    assert r.cmd(f"RCPT TO:<{verp}>").code == 250
    assert r.cmd('RCPT TO:<"x\\">y"@example.test> NOTIFY=NEVER').code == 250
    assert r.cmd("DATA").code == 354
    r.send(message() + b".\r\n")
    assert r.read_reply().code == 250
    r.cmd("QUIT")
    upstream.wait_for_transactions(1)
    # The raw lines, not the rig's parsed fields: its helper ends a path at the first ">".
    sent = upstream.commands()
    assert b'MAIL FROM:<"a>b"@example.org> SIZE=100\r\n' in sent
    assert f"RCPT TO:<{verp}>\r\n".encode() in sent
    assert b'RCPT TO:<"x\\">y"@example.test> NOTIFY=NEVER\r\n' in sent
