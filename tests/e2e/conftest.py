"""End-to-end fixtures: client -> mailgate -> real Postfix -> Maildir, in both topologies."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.rig.client import smtp_client
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
    mg = filter_mailgate(tmp_path / "mg-filter", postfix_filter, dns_server)
    mg.start()
    yield mg
    mg.stop()


def filter_mailgate(
    workdir: Path,
    postfix_filter: PostfixInstance,
    dns_server: ZoneDNSServer,
    overrides: dict[str, Any] | None = None,
) -> MailgateProcess:
    """A mailgate (not started) on the filter Postfix's proxy port, relaying to its
    after-filter smtpd; ``overrides`` are merged over the policy."""
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
    return MailgateProcess(
        workdir,
        deep_merge(policy, overrides or {}),
        smtp_port=postfix_filter.proxy_filter_port,
    )


def message(subject: str, body: str = "hello\r\n", msgid: str | None = None) -> bytes:
    mid = msgid or subject.replace(" ", ".")
    return (
        f"From: <alice@example.org>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@example.org>\r\n\r\n{body}"
    ).encode()


# -- a worker killed under load ------------------------------------------------------------
def worker_pids(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (mailgate's supervisor: its workers)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def wait_for_workers(pid: int, n: int, other_than: set[int], within: float = 15.0) -> set[int]:
    """``pid``'s ``n`` workers once none of ``other_than`` is among them."""
    deadline = time.monotonic() + within
    while True:
        now = worker_pids(pid)
        if len(now) == n and not now & other_than:
            return now
        assert time.monotonic() < deadline, f"workers of {pid}: {now}"
        time.sleep(0.05)


@dataclass
class KillLoad:
    """What the senders heard: 250, another reply, or a connection cut off."""

    told_250: set[str] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    cut_off: list[str] = field(default_factory=list)


def load_while_killing_a_worker(mg: MailgateProcess, port: int, senders: int = 8) -> KillLoad:
    """Eight senders send one message per connection to ``port`` without pause; half a
    second in, one of mailgate's two workers is SIGKILLed; half a second after the
    supervisor replaced it, the senders stop. Message-IDs are <k{sender}x{n}@...>, and
    every body ends with "end of <id>", so a message cut short can be told."""
    assert mg.proc is not None
    first = wait_for_workers(mg.proc.pid, 2, set())
    load = KillLoad()
    stop = threading.Event()

    def sender(t: int) -> None:
        n = 0
        while not stop.is_set():
            mid = f"k{t}x{n}"
            n += 1
            body = "".join(f"line {i} of {mid}\r\n" for i in range(40)) + f"end of {mid}\r\n"
            try:
                with smtp_client("127.0.0.1", port, source_ip=f"127.0.2.{t + 1}", timeout=30) as c:
                    c.ehlo(f"host{t}.sender.example")
                    c.mail(f"sender{t}@example.org")
                    c.rcpt("bob@example.test")
                    code, _ = c.data(message(f"kill {mid}", body=body, msgid=mid))
            except (OSError, smtplib.SMTPException):
                load.cut_off.append(mid)
                continue
            (load.told_250.add if code == 250 else load.refused.append)(mid)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(senders)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.5)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for_workers(mg.proc.pid, 2, {victim})  # restarted; the other one served on
        time.sleep(0.5)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    return load


def wait_for_delivery(
    postfix: PostfixInstance, mailbox: str, expected: set[str], within: float = 60.0
) -> dict[str, bytes]:
    """The delivered kill-load messages by Message-ID, once all of ``expected`` are in
    (assertion error naming the missing ones otherwise); each must be whole."""
    deadline = time.monotonic() + within
    while True:
        delivered = {
            m.group(1).decode(): msg
            for msg in postfix.messages(mailbox)
            if (m := re.search(rb"Message-ID: <(k\d+x\d+)@", msg))
        }
        missing = expected - set(delivered)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, f"told 250 but not delivered: {sorted(missing)[:10]}"
    for mid, msg in delivered.items():
        assert f"end of {mid}".encode() in msg, f"{mid} delivered cut short"
    return delivered
