"""Edges of greylisting after the upstream's RCPT and of the replay at the final dot.

Real mailgate process, scripted upstream, real Redis. The invariants under test: a
recipient told 451 never receives the message; a message is never relayed without the
client hearing 250; a failed replay is 451 4.3.0 and the session goes on; metrics and
logs count each recipient once. Source addresses 127.0.0.150-199 are this file's own.
"""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import pytest
import redis

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.ports import free_port
from tests.rig.upstream import ScriptedUpstream

UNKNOWN = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
DELAY = 1.1  # past greylist.delay = "1s"


def _policy(**extra: Any) -> dict[str, Any]:
    return deep_merge(
        AUTH_CHECKS_OFF,
        deep_merge(
            {"dnsbl": {"enabled": False}, "greylist": {"enabled": True, "delay": "1s"}}, extra
        ),
    )


def _metric(mg: MailgateProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for ln in text.splitlines():
        series, _, value = ln.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric == name and want <= set(rest.rstrip("}").split(",")):
            total += float(value)
    return total


def _triplet_rcpts(redis_url: str) -> list[str]:
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(str(raw.hget(k, "rcpt")) for k in raw.scan_iter("mailgate:gl:t:*"))
    finally:
        raw.close()


def _verbs(upstream: ScriptedUpstream) -> list[str]:
    """Every upstream command verb, once mailgate has ended its upstream sessions."""
    return [v for s in upstream.wait_until_closed() for v in s.verbs()]


def _seed(mg: MailgateProcess, ip: str, *rcpts: str, sender: str = "alice@example.org") -> None:
    """Greylist each recipient once from ``ip`` (the caller waits DELAY before retrying)."""
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        c.ehlo("mail.example.org")
        assert c.mail(sender)[0] == 250
        for r in rcpts:
            assert c.rcpt(r)[0] == 451, r


# -- PIPELINING -------------------------------------------------------------------------
def test_pipelined_envelope_and_data_in_one_write(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    upstream.script(rcpt={"nobody@example.test": UNKNOWN})
    mg = mailgate(_policy())
    ip = "127.0.0.150"
    _seed(mg, ip, "bob@example.test", "erin@example.test")
    time.sleep(DELAY)
    upstream.clear_records()
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        assert c.banner().code == 220
        ehlo = c.cmd("EHLO mail.example.org")
        assert "PIPELINING" in ehlo.text
        c.send(
            "MAIL FROM:<alice@example.org>\r\n"
            "RCPT TO:<bob@example.test>\r\n"
            "RCPT TO:<carol@example.test>\r\n"
            "RCPT TO:<nobody@example.test>\r\n"
            "RCPT TO:<erin@example.test>\r\n"
            "RCPT TO:<dave@example.test>\r\n"
            "DATA\r\n"
        )
        got = [r.code for r in c.read_replies(7)]
        assert got == [250, 250, 451, 550, 250, 451, 354]
        c.send(message("pipelined") + b".\r\nQUIT\r\n")
        final = c.read_reply()
        assert final.code == 250, final
        assert c.read_reply().code == 221
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test", "erin@example.test"]
    assert b"Subject: pipelined" in tx.message
    assert _verbs(upstream) == [
        "EHLO", "XCLIENT", "EHLO", "XFORWARD", "MAIL", "RCPT", "RCPT", "RCPT", "RCPT", "RCPT",
        "RSET", "XFORWARD", "MAIL", "RCPT", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    assert _triplet_rcpts(redis_url) == [
        "bob@example.test", "carol@example.test", "dave@example.test", "erin@example.test"
    ]  # fmt: skip


def test_pipelined_all_greylisted_then_data_and_rset(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy())
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.151") as c:
        assert c.banner().code == 220
        assert c.cmd("EHLO mail.example.org").code == 250
        c.send(
            "MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
            "RCPT TO:<carol@example.test>\r\nDATA\r\nRSET\r\n"
            "MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\nQUIT\r\n"
        )
        got = [r.code for r in c.read_replies(8)]
        assert got == [250, 451, 451, 554, 250, 250, 451, 221]
    assert upstream.transactions == []


# -- upstream keep-alive ------------------------------------------------------------------
def _mixed_transaction(c: RawSMTP, passed: str, greylisted: str) -> None:
    assert c.banner().code == 220
    assert c.cmd("EHLO mail.example.org").code == 250
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert c.cmd(f"RCPT TO:<{passed}>").code == 250
    assert c.cmd(f"RCPT TO:<{greylisted}>").code == 451


def test_keepalive_noops_while_the_client_is_slow_then_the_replay(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy(upstream={"keepalive": "200ms"}))
    ip = "127.0.0.152"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    upstream.clear_records()
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        _mixed_transaction(c, "bob@example.test", "carol@example.test")
        time.sleep(0.5)  # slow client between RCPT and DATA
        assert c.cmd("DATA").code == 354
        body = message("slow")
        c.send(body[:20])
        time.sleep(0.5)  # and slow in the body
        c.send(body[20:] + b".\r\n")
        assert c.read_reply().code == 250
        assert c.cmd("QUIT").code == 221
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"]
    verbs = _verbs(upstream)
    assert verbs.count("NOOP") >= 2
    tail = [v for v in verbs[verbs.index("MAIL") :] if v != "NOOP"]
    assert tail == ["MAIL", "RCPT", "RCPT", "RSET", "XFORWARD", "MAIL", "RCPT", "DATA", "QUIT"]


def test_keepalive_due_while_the_replay_rset_is_answered_slowly(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """The keep-alive timer is still armed at the dot; the replay's RSET must not share
    the wire with a NOOP (two commands awaiting one reply each, out of lockstep)."""
    mg = mailgate(_policy(upstream={"keepalive": "200ms"}))
    ip = "127.0.0.153"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    upstream.clear_records()
    upstream.script(delay={"rset": 0.6})
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        _mixed_transaction(c, "bob@example.test", "carol@example.test")
        time.sleep(0.3)  # a NOOP goes out; the timer is armed again for later
        assert c.cmd("DATA").code == 354
        c.send(message("slow rset") + b".\r\n")
        reply = c.read_reply()
        assert reply.code == 250, (reply, mg.logs())
        assert c.cmd("QUIT").code == 221
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"]
    tail = [v for v in _verbs(upstream) if v != "NOOP"]
    assert tail[tail.index("RSET") :] == ["RSET", "XFORWARD", "MAIL", "RCPT", "DATA", "QUIT"]
    assert "upstream failure" not in mg.logs()


def test_keepalive_failing_before_the_replay_relays_nothing(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy(upstream={"keepalive": "200ms"}))
    ip = "127.0.0.164"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        _mixed_transaction(c, "bob@example.test", "carol@example.test")
        upstream.script(drop=["noop"])
        time.sleep(0.5)  # the NOOP goes out and the upstream hangs up
        reply = c.cmd("DATA")
        assert (reply.code, reply.text[:5]) == (451, "4.3.0")
        upstream.reset_script()
        assert c.cmd("RSET").code == 250
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd(message("after the drop") + b".").code == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"] and b"after the drop" in tx.message
    assert "event=upstream_replay" not in mg.logs()


# -- the upstream failing during the replay -----------------------------------------------
REPLAY_FAULTS = [
    pytest.param("rset", {"drop": ["rset"]}, id="rset-dropped"),
    pytest.param("rset", {"replies": {"rset": "421 4.3.2 going down"}}, id="rset-421"),
    pytest.param("rset", {"replies": {"rset": "451 4.3.0 oops"}}, id="rset-451"),
    pytest.param("rset", {"delay": {"rset": 1.6}}, id="rset-timeout"),
    pytest.param("mail", {"drop": ["mail"]}, id="mail-dropped"),
    pytest.param("mail", {"replies": {"mail": "421 4.3.2 going down"}}, id="mail-421"),
    pytest.param("mail", {"replies": {"mail": "452 4.3.1 no space"}}, id="mail-452"),
    pytest.param("mail", {"delay": {"mail": 1.6}}, id="mail-timeout"),
    pytest.param("rcpt", {"drop": ["rcpt"]}, id="rcpt-dropped"),
    pytest.param("rcpt", {"replies": {"rcpt": "421 4.3.2 going down"}}, id="rcpt-421"),
    pytest.param("rcpt", {"replies": {"rcpt": "550 5.1.1 gone"}}, id="rcpt-550"),
    pytest.param("rcpt", {"delay": {"rcpt": 1.6}}, id="rcpt-timeout"),
]


@pytest.mark.parametrize(("stage", "fault"), REPLAY_FAULTS)
def test_upstream_failing_during_the_replay_is_451_and_the_session_goes_on(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    redis_url: str,
    stage: str,
    fault: dict[str, Any],
) -> None:
    mg = mailgate(_policy(upstream={"timeout": "1s"}))
    ip = "127.0.0.154"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        upstream.script(**fault)  # from now on: only the replay meets it
        code, text = c.data(message("replay fails"))
        assert (code, text[:5]) == (451, b"4.3.0")
        # Nothing was relayed, to anyone.
        assert upstream.transactions == []
        # The session goes on; the next transaction gets a fresh upstream connection.
        upstream.reset_script()
        assert c.rset()[0] == 250
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(message("again"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"] and b"Subject: again" in tx.message
    logs = mg.logs()
    assert logs.count("event=upstream_replay") == 1
    assert logs.count("outcome=upstream_refused") == 1
    assert _metric(mg, "mailgate_messages_total", action="accept") == 1


# -- several transactions per session ------------------------------------------------------
def test_rset_after_greylisted_recipients_and_several_messages_with_phantoms(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy())
    ip = "127.0.0.155"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    upstream.clear_records()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        c.ehlo("mail.example.org")
        # 1: a phantom, then the client gives up on the transaction.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        assert c.rset()[0] == 250
        # 2: no phantom: no replay.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(message("two"))[0] == 250
        # 3: a phantom after the passed recipient.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("dave@example.test")[0] == 451
        assert c.data(message("three"))[0] == 250
        # 4: phantoms before and after it, from another sender.
        assert c.mail("zoe@example.org")[0] == 250
        assert c.rcpt("erin@example.test")[0] == 451
        assert c.rcpt("bob@example.test")[0] == 451  # zoe's triplet for bob is new
        code, _ = c.docmd("DATA")
        assert code == 554
        assert c.rset()[0] == 250
        # 5: alice again, phantoms on both sides of bob.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("frank@example.test")[0] == 451
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("gina@example.test")[0] == 451
        assert c.data(message("five"))[0] == 250
    txs = upstream.wait_for_transactions(3)
    assert [(tx.rcpts, tx.rejected_rcpts) for tx in txs] == [(["bob@example.test"], [])] * 3
    subjects = [re.search(rb"Subject: (\w+)", tx.message).group(1) for tx in txs]  # type: ignore[union-attr]
    assert subjects == [b"two", b"three", b"five"]
    # Postfix forgets XFORWARD after each transaction and RSET: each one was reintroduced.
    assert all(tx.xforward.get("ADDR") and tx.xforward.get("HELO") for tx in txs), txs
    assert len(upstream.sessions) == 1  # one upstream connection carried them all
    verbs = _verbs(upstream)
    assert verbs[verbs.index("MAIL") :] == [
        "MAIL", "RCPT", "RCPT", "RSET",                                                 # 1
        "XFORWARD", "MAIL", "RCPT", "DATA",                                             # 2
        "XFORWARD", "MAIL", "RCPT", "RCPT", "RSET", "XFORWARD", "MAIL", "RCPT", "DATA", # 3
        "XFORWARD", "MAIL", "RCPT", "RCPT", "RSET",                                     # 4
        "XFORWARD", "MAIL", "RCPT", "RCPT", "RCPT", "RSET", "XFORWARD", "MAIL", "RCPT", "DATA",  # 5
        "QUIT",
    ]  # fmt: skip
    logs = mg.logs()
    assert logs.count("event=upstream_replay") == 2
    assert re.findall(r"event=upstream_replay id=\S+ dropped=(\d+) kept=(\d+)", logs) == [
        ("1", "1"),
        ("2", "1"),
    ]


def test_same_recipient_twice_in_one_transaction(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy())
    ip = "127.0.0.156"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    upstream.clear_records()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        c.ehlo("mail.example.org")
        # Twice greylisted beside a passed recipient.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        assert c.rcpt("Carol@Example.Test")[0] == 451
        assert c.data(message("twice greylisted"))[0] == 250
        # Greylisted, then (after the delay, same transaction) passing: told 250 at last,
        # so the message goes to carol, once.
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("dave@example.test")[0] == 451
        time.sleep(DELAY)
        assert c.rcpt("dave@example.test")[0] == 250
        assert c.data(message("then passed"))[0] == 250
    first, second = upstream.wait_for_transactions(2)
    assert first.rcpts == ["bob@example.test"]
    assert second.rcpts == ["dave@example.test"]
    assert _metric(mg, "mailgate_greylist_total", result="new") == 3  # bob (seed), carol, dave
    assert _metric(mg, "mailgate_greylist_total", result="early") == 1  # Carol again


# -- modes and overrides: which of them make phantoms ----------------------------------------
MONITORS = [
    pytest.param({"greylist": {"mode": "monitor"}}, id="greylist-monitor"),
    pytest.param({"server": {"mode": "monitor"}}, id="server-monitor"),
    pytest.param({"domains": {"example.test": {"mode": "monitor"}}}, id="domain-monitor"),
]


@pytest.mark.parametrize("monitor", MONITORS)
def test_monitor_modes_make_no_phantoms_and_count_each_recipient_once(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str, monitor: dict[str, Any]
) -> None:
    upstream.script(rcpt={"nobody@example.test": UNKNOWN})
    mg = mailgate(_policy(**monitor))
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.157") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250  # would be greylisted
        assert c.rcpt("nobody@example.test")[0] == 550  # the upstream's, at once
        assert c.rcpt("carol@example.test")[0] == 250  # would be greylisted
        assert c.data(message("monitored"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test", "carol@example.test"]
    assert "RSET" not in _verbs(upstream)
    logs = mg.logs()
    assert "event=upstream_replay" not in logs and "event=rcpt_refused" not in logs
    assert _metric(mg, "mailgate_greylist_total", result="new") == 2
    # One would-greylist per greylisted recipient at RCPT (nobody was never greylisted),
    # and one for the message after DATA (README, "Monitor mode").
    assert _metric(mg, "mailgate_would_action_total", action="greylist") == 2 + 1
    assert _metric(mg, "mailgate_messages_total", action="greylist") == 0
    assert _triplet_rcpts(redis_url) == ["bob@example.test", "carol@example.test"]


PARTNER_OFF = {"domains": {"partner.example": {"checks": {"greylist": "off"}}}}


def test_domain_with_greylisting_off_lends_no_greylisting_to_later_recipients(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """carol's domain has greylisting off: she is told 250 although her triplet is new.
    That result must not judge the recipients after her: the unknown user hears the
    upstream's 550, and bob's own greylisting runs (his triplet is written)."""
    upstream.script(rcpt={"nobody@example.test": UNKNOWN})
    mg = mailgate(_policy(**PARTNER_OFF))
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.158") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("carol@partner.example")[0] == 250
        assert c.rcpt("nobody@example.test") == (550, UNKNOWN[4:].encode())
        assert c.rcpt("bob@example.test")[0] == 451
        assert c.data(message("partner"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["carol@partner.example"]
    assert "bob@example.test" in _triplet_rcpts(redis_url)
    assert "nobody@example.test" not in _triplet_rcpts(redis_url)
    logs = mg.logs()
    assert logs.count("event=rcpt_refused") == 1 and "rcpt=bob@example.test" in logs
    assert "event=upstream_replay" in logs


def test_domain_with_greylisting_off_makes_no_phantom(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(_policy(**PARTNER_OFF))
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.160") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 451
        assert c.rcpt("carol@partner.example")[0] == 250
        assert c.rcpt("dave@partner.example")[0] == 250
        assert c.data(message("partner only"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["carol@partner.example", "dave@partner.example"]
    assert "dropped=1 kept=2" in mg.logs()


def test_a_new_triplet_of_a_greylisting_off_domain_does_not_refuse_the_message_after_data(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """carol (greylisting off for her domain) comes first with a new triplet, bob's has
    passed. Her greylist result is kept for the verdict after DATA, which, with two
    domains, is the global policy's: it used to apply her 451 to the whole message."""
    mg = mailgate(_policy(**PARTNER_OFF))
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.161") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
        c.rset()
    time.sleep(1.2)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.161") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("carol@partner.example")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        code, text = c.data(message("two domains"))
        assert code == 250, text
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["carol@partner.example", "bob@example.test"]
    assert b"Subject: two domains" in tx.message


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
def test_store_down_tempfail_makes_phantoms_accept_does_not(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str, on_error: str
) -> None:
    upstream.script(rcpt={"nobody@example.test": UNKNOWN})
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    mg = mailgate(
        _policy(
            redis={"url": down, "on_error": on_error, "timeout": "200ms"},
            greylist={"skip_recipients": ["postmaster@example.test"]},
        )
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.161") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("postmaster@example.test")[0] == 250  # exempt: no store needed
        assert c.rcpt("nobody@example.test")[0] == 550  # the upstream's, before the store
        code, text = c.rcpt("bob@example.test")
        assert c.data(message("store down"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    logs = mg.logs()
    if on_error == "tempfail":
        assert (code, text) == (451, b"4.3.0 Temporary local problem, try again later")
        assert tx.rcpts == ["postmaster@example.test"]  # bob was told 451: not his
        assert "dropped=1 kept=1" in logs
        assert logs.count("event=rcpt_refused") == 1
    else:
        assert code == 250
        assert tx.rcpts == ["postmaster@example.test", "bob@example.test"]
        assert "event=upstream_replay" not in logs and "event=rcpt_refused" not in logs
    assert _metric(mg, "mailgate_greylist_total", result="error") == 1  # bob only


# -- metrics and logs -----------------------------------------------------------------------
def test_metrics_and_logs_count_each_greylisted_recipient_once(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    upstream.script(rcpt={"nobody@example.test": UNKNOWN})
    mg = mailgate(_policy())
    ip = "127.0.0.162"
    _seed(mg, ip, "bob@example.test")
    time.sleep(DELAY)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip=ip) as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        assert c.rcpt("nobody@example.test")[0] == 550
        assert c.rcpt("dave@example.test")[0] == 451
        assert c.data(message("counted"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"]
    assert _metric(mg, "mailgate_greylist_total", result="new") == 1 + 2  # seed, carol, dave
    assert _metric(mg, "mailgate_greylist_total", result="passed") == 1  # bob
    assert _metric(mg, "mailgate_greylist_total") == 4  # nobody was never greylisted
    assert _metric(mg, "mailgate_messages_total", action="greylist") == 1 + 2
    assert _metric(mg, "mailgate_messages_total", action="accept") == 1
    assert _metric(mg, "mailgate_would_action_total") == 0
    logs = mg.logs()
    refused = [ln for ln in logs.splitlines() if "event=rcpt_refused" in ln]
    rcpts = [re.search(r" rcpt=(\S+)", ln).group(1) for ln in refused]  # type: ignore[union-attr]
    assert rcpts == ["bob@example.test", "carol@example.test", "dave@example.test"]
    # Each refusal names its own recipient's greylisting, not bob's pass before it.
    for ln in refused:
        assert "GREYLIST_NEW" in ln and "GREYLIST_PASSED" not in ln, ln
    [done] = [ln for ln in logs.splitlines() if "event=message" in ln]
    assert "outcome=relayed" in done and "rcpts=bob@example.test " in done
    assert logs.count("event=upstream_replay") == 1 and "dropped=2 kept=1" in logs
