"""SMTP command semantics of the front end (RFC 5321, 1870) where mailgate got them wrong.

Each test drives a real mailgate process with a raw client in front of a scripted
upstream, and names the reply Postfix's smtpd gives in the same case.
"""

from __future__ import annotations

import time

from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP
from tests.rig.upstream import ScriptedUpstream


def _session(port: int) -> RawSMTP:
    r = RawSMTP("127.0.0.1", port, source_ip="127.0.0.1").connect()
    assert r.banner().code == 220
    assert r.cmd("EHLO client.example.org").code == 250
    return r


def test_size_with_non_ascii_digits_is_a_syntax_error(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 1870: size-value = 1*20DIGIT, ASCII digits. str.isdigit() also says yes to
    "²" (int() then raised: 421 internal error, session gone) and to Arabic-Indic
    digits (int() reads them: the check passed and the raw value went upstream).
    Postfix answers both "501 5.5.4 Bad message size syntax"."""
    mg = mailgate()
    r = _session(mg.smtp_port)
    for value in ("\u00b2", "\u0661\u0662", "1\u00b2"):
        reply = r.cmd(f"MAIL FROM:<a@example.org> SIZE={value}".encode())
        assert (reply.code, reply.text.split()[0]) == (501, "5.5.4"), (value, reply)
    assert r.cmd("NOOP").code == 250  # the session goes on
    assert r.cmd("MAIL FROM:<a@example.org> SIZE=100").code == 250
    r.cmd("QUIT")
    time.sleep(0.2)
    sent = [c.rstrip() for c in upstream.commands() if c.upper().startswith(b"MAIL")]
    assert sent == [b"MAIL FROM:<a@example.org> SIZE=100"], sent
    assert "internal error" not in mg.logs()


def test_rset_with_an_argument_is_a_syntax_error_and_resets_nothing(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 5321 4.1.1.5: ``rset = "RSET" CRLF``. Postfix answers "RSET x" with
    "501 5.5.4 Syntax: RSET" and keeps the transaction; so does mailgate now (it
    reset the transaction and said 250)."""
    mg = mailgate()
    r = _session(mg.smtp_port)
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    reply = r.cmd("RSET now")
    assert (reply.code, reply.text) == (501, "5.5.4 Syntax: RSET"), reply
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250  # still in the transaction
    assert r.cmd("RSET").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 503  # now it is gone
    r.cmd("QUIT")


def test_overlong_command_lines_count_toward_the_error_limit(mailgate: StartMailgate) -> None:
    """Each over-long line is an error (500), and the error limit must end the session
    as for any other error (Postfix: smtpd_hard_error_limit). The limit was only
    checked after a line that parsed, so a client sending nothing but over-long lines
    was never disconnected for its errors."""
    mg = mailgate({"server": {"max_errors": 3}})
    r = _session(mg.smtp_port)
    codes = [r.cmd(b"NOOP " + b"x" * 3000).code for _ in range(3)]
    assert codes == [500, 500, 500]
    reply = r.read_reply(timeout=3)
    assert (reply.code, reply.text.split()[0]) == (421, "4.7.0")
    assert r.is_closed()


def test_an_upstream_failure_is_one_error_not_two(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A MAIL or RCPT that fails because the upstream broke is one error against the
    error limit. It was counted where the upstream failed and again by the command,
    so a client retrying through an upstream outage reached smtpd_hard_error_limit's
    equivalent at half the configured number of replies."""
    upstream.refuse()
    mg = mailgate({"server": {"max_errors": 3}})
    r = _session(mg.smtp_port)
    codes = [r.cmd("MAIL FROM:<a@example.org>").code for _ in range(3)]
    assert codes == [451, 451, 451]
    reply = r.read_reply(timeout=3)
    assert (reply.code, reply.text.split()[0]) == (421, "4.7.0")


def test_quit_inside_a_transaction_completes_nothing_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 5321 4.1.1.10: QUIT ends an unfinished transaction; the upstream, which holds
    the MAIL and RCPT, must not deliver anything (its connection is dropped)."""
    mg = mailgate()
    r = _session(mg.smtp_port)
    assert r.cmd("MAIL FROM:<a@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    reply = r.cmd("QUIT")
    assert (reply.code, reply.text.split()[0]) == (221, "2.0.0")
    assert r.is_closed()
    sessions = upstream.wait_until_closed(5)  # not left open
    assert not any(t.accepted for t in upstream.transactions)
    assert "DATA" not in {v for s in sessions for v in s.verbs()}


def test_body_without_a_value_is_named_as_sent(mailgate: StartMailgate) -> None:
    """Postfix: "555 5.5.4 Unsupported option: BODY"; mailgate said "BODY=None"."""
    mg = mailgate()
    r = _session(mg.smtp_port)
    reply = r.cmd("MAIL FROM:<a@example.org> BODY")
    assert (reply.code, reply.text) == (555, "5.5.4 Unsupported option: BODY")
    reply = r.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")
    assert (reply.code, reply.text) == (555, "5.5.4 Unsupported option: BODY=BINARYMIME")


def test_commands_that_move_no_mail_count_as_errors_past_the_junk_limit(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Postfix's smtpd_junk_command_limit (100): a client looping on NOOP, RSET or
    EHLO held its session until session_timeout (each EHLO re-running the HELO
    checks); past the limit each one is an error, and max_errors ends the session."""
    mg = mailgate({"server": {"max_errors": 3}})
    r = _session(mg.smtp_port)
    verbs = ["NOOP", "RSET", "EHLO client.example.org"]
    # _session's EHLO was the first; the first 100 are free, as in Postfix.
    replies = [r.cmd(verbs[i % 3]).code for i in range(99)]
    assert set(replies) == {250}
    assert [r.cmd("NOOP").code for _ in range(3)] == [250, 250, 250]
    reply = r.read_reply(timeout=3)
    assert (reply.code, reply.text.split()[0]) == (421, "4.7.0")
    assert r.is_closed()


def test_a_delivered_message_starts_the_junk_count_afresh(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"max_errors": 1}})
    r = _session(mg.smtp_port)
    for _ in range(2):
        assert {r.cmd("NOOP").code for _ in range(99)} == {250}
        assert r.cmd("MAIL FROM:<a@example.org>").code == 250
        assert r.cmd("RCPT TO:<bob@example.test>").code == 250
        assert r.cmd("DATA").code == 354
        r.send(message() + b".\r\n")
        assert r.read_reply().code == 250
    assert r.cmd("QUIT").code == 221
