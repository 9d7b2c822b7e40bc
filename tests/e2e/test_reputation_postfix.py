"""DNSBL and greylisting end to end: client -> mailgate -> real Postfix -> Maildir.

A listed client is refused at RCPT (554 5.7.1, envelope logged); an unknown triplet
is greylisted (451 4.7.1 with the retry time) and delivered after the delay; Redis
down follows redis.on_error.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e.conftest import StartMailgate, message
from tests.rig.client import smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.postfix import REJECTED_REVERSE_NAME, PostfixInstance

ZONE = "bl.mailgate.test"


@pytest.fixture
def rep_front(
    tmp_path: Path, mailbox_reset: PostfixInstance, dns_zone: ZoneDNSServer, redis_url: str
) -> Iterator[StartMailgate]:
    # RFC 5782 test entries so the zone counts as healthy, and one listed client.
    dns_zone.add(f"2.0.0.127.{ZONE}", "A", "127.0.0.2")
    dns_zone.add(f"33.0.0.127.{ZONE}", "A", "127.0.0.4")
    started: list[MailgateProcess] = []

    def start(overrides: dict[str, Any] | None = None) -> MailgateProcess:
        policy = deep_merge(
            {
                "upstream": {"address": f"127.0.0.1:{mailbox_reset.listen_port}"},
                "dns": {"nameservers": [dns_zone.nameserver], "timeout": "1s"},
                "redis": {"url": redis_url},
                "dnsbl": {
                    "zones": [
                        {
                            "zone": ZONE,
                            "score": 10.0,
                            "reject": True,
                            "codes": {"127.0.0.4": {"label": "XBL", "score": 10.0}},
                        }
                    ]
                },
                "greylist": {"enabled": False},
            },
            overrides or {},
        )
        mg = MailgateProcess(tmp_path / f"mg{len(started)}", policy)
        started.append(mg)
        return mg.start()

    yield start
    for mg in started:
        mg.stop()


def test_listed_client_is_refused_at_rcpt_and_logged(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = rep_front()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.33") as c:
        c.ehlo("bot.example")
        assert c.mail("spam@example.org")[0] == 250
        code, text = c.rcpt("bob@example.test")
    assert (code, text[:5]) == (554, b"5.7.1")
    assert ZONE.encode() not in text  # the reply names no list (nor any access key)
    logs = mg.logs()
    assert "event=rcpt_refused" in logs and "rcpt=bob@example.test" in logs
    assert "DNSBL_BL_XBL" in logs
    assert mailbox_reset.messages("bob") == []


def test_unlisted_client_is_delivered(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = rep_front()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.34") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        assert c.data(message("clean client"))[0] == 250
    assert len(mailbox_reset.wait_for_messages("bob", 1)) == 1


def test_postfix_judges_the_clients_unconfirmed_ptr_name(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance, dns_zone: ZoneDNSServer
) -> None:
    """A PTR name that does not lead back is still Postfix's reverse client name
    (check_reverse_client_hostname_access, reject_unknown_reverse_client_hostname).
    Without XCLIENT REVERSE_NAME, Postfix judged the reverse name of mailgate's own
    connection instead, and this client was delivered."""
    dns_zone.add("46.0.0.127.in-addr.arpa", "PTR", f"{REJECTED_REVERSE_NAME}.")
    mg = rep_front()
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.46") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        code, text = c.rcpt("bob@example.test")
    assert (code, text[:5]) == (554, b"5.7.1"), text  # Postfix's own refusal
    assert REJECTED_REVERSE_NAME.encode() in text
    assert mailbox_reset.messages("bob") == []


def test_greylisting_defers_then_delivers(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = rep_front({"greylist": {"enabled": True, "delay": "2s"}})

    def attempt(rcpts: list[str]) -> dict[str, int]:
        out = {}
        with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.40") as c:
            c.ehlo("mail.example.org")
            c.mail("alice@example.org")
            for r in rcpts:
                code, text = c.rcpt(r)
                out[r] = code
                if code == 451:
                    assert text.startswith(b"4.7.1") and b"seconds" in text
            if any(code == 250 for code in out.values()):
                assert c.data(message(f"greylisted {len(out)}"))[0] == 250
        return out

    assert attempt(["bob@example.test"]) == {"bob@example.test": 451}
    assert attempt(["bob@example.test"]) == {"bob@example.test": 451}  # too early
    time.sleep(2.5)
    # After the delay bob's triplet passes; carol's is new: per-recipient answers.
    assert attempt(["bob@example.test", "carol@example.test"]) == {
        "bob@example.test": 250,
        "carol@example.test": 451,
    }
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"greylisted 2" in msg
    # Postfix had accepted carol before greylisting answered 451 for her: the
    # transaction was replayed without her, so she gets nothing until her retry.
    assert "event=upstream_replay" in mg.logs()
    assert mailbox_reset.messages("carol") == []


def test_unknown_user_hears_postfix_550_before_any_greylisting(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance, redis_url: str
) -> None:
    mg = rep_front({"greylist": {"enabled": True}})
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.42") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        code, text = c.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1"), text  # Postfix's own answer
        assert b"nobody@example.test" in text
        assert c.rcpt("bob@example.test")[0] == 451
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        stored = sorted(str(raw.hget(k, "rcpt")) for k in raw.scan_iter("mailgate:gl:t:*"))
    finally:
        raw.close()
    assert stored == ["bob@example.test"]  # no triplet for the address that does not exist


@pytest.mark.parametrize(("on_error", "expect"), [("accept", 250), ("tempfail", 451)])
def test_redis_down_follows_on_error(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance, on_error: str, expect: int
) -> None:
    mg = rep_front(
        {
            "greylist": {"enabled": True},
            "redis": {"url": "redis://127.0.0.1:1/0", "on_error": on_error},
        }
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.41") as c:
        c.ehlo("mail.example.org")
        c.mail("alice@example.org")
        code, text = c.rcpt("bob@example.test")
    assert code == expect
    if expect == 451:
        assert text.startswith(b"4.3.0")
    url = f"http://127.0.0.1:{mg.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    store_errors = [
        line for line in body.splitlines() if line.startswith("mailgate_store_errors_total")
    ]
    assert store_errors and float(store_errors[0].split()[-1]) >= 1


def _deliver_from_listed(mg: MailgateProcess, subject: str) -> tuple[int, bytes]:
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.33") as c:
        c.ehlo("bot.example")
        c.mail("spam@example.org")
        code, text = c.rcpt("bob@example.test")
        if code != 250:
            return code, text
        return c.data(message(subject))


def test_domain_override_switches_dnsbl_off_for_that_domain(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = rep_front({"domains": {"example.test": {"checks": {"dnsbl": "off"}}}})
    code, _ = _deliver_from_listed(mg, "override off")
    assert code == 250
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"DNSBL_" not in msg  # an "off" check leaves no trace in the verdict
    # Another domain keeps the global policy: the relay-denied domain is refused by
    # mailgate first (554 5.7.1 at RCPT), before Postfix would be asked.
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.33") as c:
        c.ehlo("bot.example")
        c.mail("spam@example.org")
        code, text = c.rcpt("someone@other.example")
    assert (code, text[:5]) == (554, b"5.7.1")


def test_dnsbl_in_monitor_mode_delivers_and_counts_would_reject(
    rep_front: StartMailgate, mailbox_reset: PostfixInstance
) -> None:
    mg = rep_front({"dnsbl": {"mode": "monitor"}})
    code, _ = _deliver_from_listed(mg, "monitored")
    assert code == 250
    [msg] = mailbox_reset.wait_for_messages("bob", 1)
    assert b"DNSBL_BL_XBL" in msg  # listed, shown, but scored 0
    assert "would=reject" in mg.logs()
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{mg.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    would = [
        line
        for line in body.splitlines()
        if line.startswith('mailgate_would_action_total{action="reject"}')
    ]
    assert would and float(would[0].split()[-1]) >= 1
