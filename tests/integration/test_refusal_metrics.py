"""mailgate_refusals_total: why mail is being refused, by stage, cause and action.

A real mailgate process, its metrics scraped over HTTP; each refusal is provoked
with a real SMTP client from its own loopback address.
"""

from __future__ import annotations

import urllib.request

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import RawSMTP
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import ScriptedUpstream


def _samples(mg: MailgateProcess, name: str) -> dict[str, float]:
    """Label set (as written) -> value of every sample of ``name``."""
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, labels = series.partition("{")
        if metric == name:
            out[labels.rstrip("}")] = float(value)
    return out


def _labels(stage: str, cause: str, action: str) -> str:
    return f'action="{action}",cause="{cause}",stage="{stage}"'


def test_each_refusal_is_counted_with_what_decided_it(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate(
        {
            **AUTH_CHECKS_OFF,
            "dnsbl": {"enabled": False},
            "redis": {"url": redis_url},
            "greylist": {"enabled": True, "skip_recipients": ["carol@example.test"]},
            # No PTR for the loopback clients in the test zones: RDNS_NONE alone rejects.
            "scores": {"RDNS_NONE": 20.0},
        }
    )
    before = _samples(mg, "mailgate_refusals_total")
    # Every combination is listed at 0 before the first refusal (rate() sees it).
    assert before[_labels("rcpt", "greylist", "greylist")] == 0.0
    assert before[_labels("data", "score", "reject")] == 0.0
    assert set(before.values()) == {0.0}

    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.81") as c:
        c.banner()
        c.cmd("EHLO client.example.org")
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 451  # a new triplet
        assert c.cmd("RCPT TO:<carol@example.test>").code == 250  # greylisting skips her
        assert c.cmd("DATA").code == 354
        c.send(message() + b".\r\n")
        reply = c.read_reply()
        assert (reply.code, reply.text[:5]) == (550, "5.7.1")  # the score's reject
        # The message itself: a bare LF (RFC 5321 2.3.8) is refused before any check.
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<carol@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
        assert c.read_reply().code == 550

    after = _samples(mg, "mailgate_refusals_total")
    counted = {k: v for k, v in after.items() if v}
    assert counted == {
        _labels("rcpt", "greylist", "greylist"): 1.0,
        _labels("data", "score", "reject"): 1.0,
        _labels("data", "message", "reject"): 1.0,
    }, counted
    # The same refusals as mailgate_messages_total counts them by action alone.
    messages = _samples(mg, "mailgate_messages_total")
    assert messages['action="greylist"'] == 1.0
    assert messages['action="reject"'] == 2.0
    assert not any(c.startswith(b"DATA") for c in upstream.commands())  # nothing relayed
