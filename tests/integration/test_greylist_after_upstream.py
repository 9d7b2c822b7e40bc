"""Greylisting runs after the upstream accepted the RCPT, as postgrey after Postfix's
``reject_unlisted_recipient``: real mailgate process, scripted upstream, real Redis.

An unknown user hears the upstream's 550 at once (not 451 now and 550 after the
retry) and leaves no triplet behind. A recipient the upstream accepted and greylisting
then refused is taken out upstream before the message goes: the final dot replays
MAIL and the accepted RCPTs, so the message reaches only the recipients told 250.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import redis

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import smtp_client
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.upstream import ScriptedUpstream

UNKNOWN = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
RELAY = "554 5.7.1 <x@elsewhere.example>: Relay access denied"


def _start(mailgate: StartMailgate, **greylist: Any) -> MailgateProcess:
    """Greylisting on with a 1 s delay; tests take ``redis_url`` for a flushed store."""
    policy = deep_merge(
        AUTH_CHECKS_OFF,
        {"dnsbl": {"enabled": False}, "greylist": {"enabled": True, "delay": "1s", **greylist}},
    )
    return mailgate(policy)


def _greylist_count(mg: MailgateProcess, result: str) -> float:
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = f'mailgate_greylist_total{{result="{result}"}} '
    values = [float(ln[len(prefix) :]) for ln in text.splitlines() if ln.startswith(prefix)]
    return values[0] if values else 0.0


def _triplet_rcpts(redis_url: str) -> list[str]:
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(str(raw.hget(k, "rcpt")) for k in raw.scan_iter("mailgate:gl:t:*"))
    finally:
        raw.close()


def _session_verbs(upstream: ScriptedUpstream) -> list[bytes]:
    """Every upstream command verb, once mailgate has ended its upstream sessions."""
    upstream.wait_until_closed()
    return [c.split(b" ", 1)[0].split(b":", 1)[0].strip().upper() for c in upstream.commands()]


def test_unknown_user_and_relay_attempt_hear_the_upstream_refusal_at_once(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    upstream.script(rcpt={"nobody@example.test": UNKNOWN, "x@elsewhere.example": RELAY})
    mg = _start(mailgate)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.90") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        code, text = c.rcpt("nobody@example.test")
        assert (code, text) == (550, UNKNOWN[4:].encode())
        code, text = c.rcpt("x@elsewhere.example")
        assert (code, text) == (554, RELAY[4:].encode())
        code, text = c.rcpt("bob@example.test")
        assert code == 451 and text.startswith(b"4.7.1")
    # Only the recipient the upstream accepted was greylisted, and only it is stored.
    assert _triplet_rcpts(redis_url) == ["bob@example.test"]
    assert _greylist_count(mg, "new") == 1


def test_mixed_transaction_reaches_only_the_recipients_told_250(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = _start(mailgate)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.91") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
    time.sleep(1.2)  # bob's triplet passes now; carol's is new
    upstream.clear_records()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.91") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org", ["SIZE=300"])
        assert c.rcpt("bob@example.test", ["NOTIFY=FAILURE"])[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        code, _ = c.data(message("mixed"))
        assert code == 250
    [tx] = upstream.wait_for_transactions(1)
    assert tx.rcpts == ["bob@example.test"] and tx.rejected_rcpts == []
    assert tx.rcpt_params == [["NOTIFY=FAILURE"]] and tx.mail_params == ["SIZE=300"]
    assert b"Subject: mixed" in tx.message
    # carol went upstream (it accepted her), so the transaction was started again.
    verbs = _session_verbs(upstream)
    assert verbs[verbs.index(b"MAIL") :] == [
        b"MAIL", b"RCPT", b"RCPT", b"RSET", b"XFORWARD", b"MAIL", b"RCPT", b"DATA", b"QUIT"
    ]  # fmt: skip
    assert "event=upstream_replay" in mg.logs() and "dropped=1 kept=1" in mg.logs()


def test_a_refused_replay_is_451_after_the_dot_and_relays_nothing(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = _start(mailgate)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.92") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
    time.sleep(1.2)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.92") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        # bob is refused when the transaction is replayed (say, his mailbox was just
        # removed): the client must not hear 250 for a message that went nowhere.
        upstream.script(rcpt={"bob@example.test": "450 4.2.1 mailbox busy"})
        code, text = c.data(message("replay refused"))
        assert (code, text[:5]) == (451, b"4.3.0")
        # The session goes on: a new transaction starts clean.
        upstream.reset_script()
        assert c.rset()[0] == 250
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(message("second try"))[0] == 250
    [tx] = upstream.wait_for_transactions(1)
    assert b"Subject: second try" in tx.message and tx.rcpts == ["bob@example.test"]
    assert "upstream refused the replayed transaction" in mg.logs()


def test_all_recipients_greylisted_then_data_is_no_valid_recipients(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = _start(mailgate)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.93") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
        assert c.rcpt("carol@example.test")[0] == 451
        code, _ = c.docmd("DATA")
        assert code == 554
        assert c.rset()[0] == 250
    assert upstream.transactions == []
    assert b"RSET" in _session_verbs(upstream)  # the upstream's recipients went with it


def test_trusted_clients_are_not_greylisted_and_need_no_replay(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = _start(mailgate)
    mg_trusted = mailgate(
        deep_merge(
            AUTH_CHECKS_OFF,
            {"greylist": {"enabled": True}, "server": {"trusted_networks": ["127.0.0.94/32"]}},
        )
    )
    with smtp_client("127.0.0.1", mg_trusted.smtp_port, source_ip="127.0.0.94") as c:
        c.ehlo("submit.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(message("trusted"))[0] == 250
    assert b"RSET" not in _session_verbs(upstream)
    assert _greylist_count(mg, "new") == 0


def test_every_transaction_on_a_reused_connection_is_introduced_again(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """Postfix forgets XFORWARD at the end of each transaction (and at RSET): the
    second message of a session, and a replayed one, must carry it again."""
    mg = _start(mailgate)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.95") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
        c.rset()
        time.sleep(1.2)
        for subject in ("one", "two"):
            c.mail("alice@example.org")
            assert c.rcpt("bob@example.test")[0] == 250
            if subject == "two":
                assert c.rcpt("carol@example.test")[0] == 451  # replayed
            assert c.data(message(subject))[0] == 250
    txs = upstream.wait_for_transactions(2)
    assert [t.rcpts for t in txs] == [["bob@example.test"], ["bob@example.test"]]
    for tx in txs:
        assert tx.xforward.get("ADDR") == "127.0.0.95", tx.xforward
        assert tx.xforward.get("SOURCE") == "REMOTE", tx.xforward
    # One connection for the whole session, XFORWARD before each MAIL but the first.
    carrying = [s for s in upstream.sessions if any(c.startswith(b"MAIL") for c in s.commands)]
    assert len(carrying) == 1  # (the other session is mailgate's start-up probe)
    verbs = _session_verbs(upstream)
    mails = [i for i, v in enumerate(verbs) if v == b"MAIL"]
    assert all(verbs[i - 1] == b"XFORWARD" for i in mails), verbs
