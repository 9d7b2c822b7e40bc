"""A refused PROXY protocol header is logged with the reason, whatever went wrong.

Real mailgate process with ``server.proxy_protocol``; each refusal comes from its own
loopback source address, so its log line can be told apart.
"""

from __future__ import annotations

import shlex
import time
import urllib.request

from tests.integration.conftest import StartMailgate
from tests.rig.client import RawSMTP
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import ScriptedUpstream

PROXY_TIMEOUT = 10.0  # filter.frontend.PROXY_TIMEOUT: a silent balancer is cut after it


def _refusals(mg: MailgateProcess) -> dict[str, str]:
    """client -> reason of every ``event=proxy_refused`` log line."""
    found = {}
    for line in mg.logs().splitlines():
        if "event=proxy_refused" in line:
            fields = dict(part.split("=", 1) for part in shlex.split(line))
            found[fields["client"]] = fields["reason"]
    return found


def test_every_proxy_refusal_says_why(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate({"server": {"proxy_protocol": True}})
    sent = {
        "127.0.0.71": b"",  # connects and closes: a TCP health check
        "127.0.0.72": b"EHLO client.example.org\r\n",  # speaks SMTP first
        "127.0.0.73": b"PROXY TCP4 192.0.2.1\r\n",
        "127.0.0.74": b"PROXY TCP4 ",  # then silence
        "127.0.0.75": b"PROXY ",  # then closes
    }
    clients = {ip: RawSMTP("127.0.0.1", mg.smtp_port, source_ip=ip) for ip in sent}
    for ip, data in sent.items():
        if data:
            clients[ip].send(data)
    time.sleep(0.3)
    for ip in ("127.0.0.71", "127.0.0.75"):
        clients[ip].close()
    assert clients["127.0.0.72"].is_closed(timeout=3)
    assert clients["127.0.0.73"].is_closed(timeout=3)
    assert clients["127.0.0.74"].is_closed(timeout=PROXY_TIMEOUT + 3)
    for c in clients.values():
        c.close()
    reasons = _refusals(mg)
    assert reasons == {
        "127.0.0.71": "connection closed before a complete header (0 bytes received)",
        "127.0.0.72": "no PROXY protocol signature",
        "127.0.0.73": "v1 line needs exactly 4 fields after the protocol",
        "127.0.0.74": "no complete header within 10s (11 bytes received)",
        "127.0.0.75": "connection closed before a complete header (6 bytes received)",
    }, mg.logs()
    assert all("level=warning" in ln for ln in mg.logs().splitlines() if "proxy_refused" in ln)
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'mailgate_connections_total{result="proxy_error"} 5.0' in text
    assert not any(c.startswith(b"MAIL") for c in upstream.commands())


def test_only_the_listed_balancers_may_send_a_proxy_header(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    # 127.0.0.1: the rig probes readiness with a header of its own.
    balancers = ["127.0.0.76/32", "127.0.0.1/32"]
    mg = mailgate({"server": {"proxy_protocol": True, "proxy_hosts": balancers}})
    header = b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 25\r\n"
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.77") as stranger:
        stranger.send(header)
        assert stranger.is_closed(timeout=3)
        assert stranger.pending() == b""  # not one byte: no banner for a forged client
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.76") as balancer:
        balancer.send(header)
        assert balancer.banner().code == 220
        assert balancer.cmd("EHLO client.example.org").code == 250
    assert _refusals(mg) == {"127.0.0.77": "peer is not in server.proxy_hosts"}
    logs = mg.logs()
    assert "client=192.0.2.9" in logs  # the listed balancer's header was believed
