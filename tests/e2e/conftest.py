"""End-to-end fixtures: client -> mailgate -> real Postfix -> Maildir, in both topologies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.postfix import PostfixInstance
from tests.rig.workers import TEST_REDIS_URL

StartMailgate = Callable[..., MailgateProcess]


@pytest.fixture
def front(
    tmp_path: Path, mailbox_reset: PostfixInstance, dns_server: ZoneDNSServer
) -> Iterator[StartMailgate]:
    """Front mode: mailgate listens, Postfix is its XCLIENT upstream; DNS is loopback."""
    started: list[MailgateProcess] = []

    def start(overrides: dict[str, Any] | None = None) -> MailgateProcess:
        policy = deep_merge(
            {
                "upstream": {"address": f"127.0.0.1:{mailbox_reset.listen_port}", "xclient": True},
                "dns": {"nameservers": [dns_server.nameserver], "timeout": "1s"},
                "greylist": {"enabled": False},
                "redis": {"url": TEST_REDIS_URL},
            },
            overrides or {},
        )
        mg = MailgateProcess(tmp_path / f"mg{len(started)}", policy)
        started.append(mg)
        return mg.start()

    yield start
    for mg in started:
        mg.stop()


@pytest.fixture
def filter_mode(
    tmp_path: Path, postfix_filter: PostfixInstance, dns_server: ZoneDNSServer
) -> Iterator[MailgateProcess]:
    """Filter mode: Postfix :listen_port -> smtpd_proxy_filter -> mailgate -> after-filter smtpd."""
    postfix_filter.clear_mail()
    assert postfix_filter.proxy_filter_port and postfix_filter.after_filter_port
    policy = {
        "server": {
            "listen": [f"127.0.0.1:{postfix_filter.proxy_filter_port}"],
            "xforward_hosts": ["127.0.0.1/32"],
            "trusted_networks": [],
        },
        "upstream": {"address": f"127.0.0.1:{postfix_filter.after_filter_port}", "xclient": True},
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "1s"},
        "greylist": {"enabled": False},
        "redis": {"url": TEST_REDIS_URL},
    }
    mg = MailgateProcess(tmp_path / "mg-filter", policy, smtp_port=postfix_filter.proxy_filter_port)
    mg.start()
    yield mg
    mg.stop()


def message(subject: str, body: str = "hello\r\n", msgid: str | None = None) -> bytes:
    mid = msgid or subject.replace(" ", ".")
    return (
        f"From: <alice@example.org>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@example.org>\r\n\r\n{body}"
    ).encode()
