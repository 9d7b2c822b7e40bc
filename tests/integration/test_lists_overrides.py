"""List decisions under per-recipient-domain overrides, live and in ``mailgate check``.

A message to several recipients is judged at each RCPT under that recipient's
``[domains]`` override, then once after DATA. These tests drive a real mailgate
process (``mailgate`` fixture, ScriptedUpstream behind it) and ``mailgate check`` as a
subprocess on the same policy, and hold the dry run's answer against the live one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dns.reversename

from filter.checks.lists import list_checks
from filter.checks.rdns import RDNSCheck
from filter.dryrun import evaluate
from filter.lists import clear_cache
from filter.pipeline import Pipeline
from filter.policy import load_policy
from filter.resolver import Resolver
from filter.units import Address
from tests.integration.conftest import StartMailgate, message
from tests.rig.cli import run_cli
from tests.rig.client import smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.upstream import ScriptedUpstream

# Nothing but the lists may refuse these test messages.
QUIET: dict[str, Any] = {
    name: {"enabled": False} for name in ("rdns", "helo", "dnsbl", "spf", "dkim", "dmarc", "arc")
}


def lists_policy(root: Path, files: dict[str, str], **extra: Any) -> dict[str, Any]:
    """A policy whose [lists] name ``files`` (key -> content), written under ``root``."""
    (root / "lists").mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {}
    for key, text in files.items():
        (root / "lists" / f"{key}.txt").write_text(text)
        table[key] = f"lists/{key}.txt"
    return {"lists": table, **QUIET, **extra}


def check(config: Path, eml: Path, *rcpts: str) -> dict[str, Any]:
    """``mailgate check`` for a client at 127.0.0.1, as the live tests connect."""
    args = ["--ip", "127.0.0.1", "--helo", "client.example.org", "--mail-from", "a@example.org"]
    for rcpt in rcpts:
        args += ["--rcpt", rcpt]
    r = run_cli("check", str(eml), *args, "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def message_action(logs: str) -> str:
    """The ``action=`` of the one ``event=message`` log line."""
    (line,) = [x for x in logs.splitlines() if "event=message " in x]
    return line.split(" action=", 1)[1].split(" ", 1)[0]


def write_eml(tmp_path: Path) -> Path:
    path = tmp_path / "m.eml"
    path.write_bytes(message())
    return path


def test_recipients_let_in_by_their_overrides_are_not_refused_after_data(
    tmp_path: Path, mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    # A blocked client writes to a domain in monitor mode and to one with lists off:
    # each RCPT lets its recipient in; the overrides differ, so the global policy
    # judges after DATA, and it must not refuse for both what neither domain enforces.
    domains = {"a.example": {"mode": "monitor"}, "b.example": {"checks": {"lists": "off"}}}
    policy = lists_policy(tmp_path / "mg0", {"block_clients": "127.0.0.1\n"}, domains=domains)
    mg = mailgate(policy)
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("a@example.org")
        assert c.rcpt("x@a.example")[0] == 250
        assert c.rcpt("y@b.example")[0] == 250
        assert c.rcpt("z@c.example") == (550, b"5.7.1 Access denied")  # no override: enforced
        assert c.data(message())[0] == 250
    # Judged by the global policy: the score (LIST_BLOCK_CLIENT 10) adds the spam flag.
    assert message_action(mg.logs()) == "add_header"

    dry = check(mg.config_path, write_eml(tmp_path), "x@a.example", "y@b.example")
    assert (dry["stage"], dry["action"], dry["smtp_reply"][:3]) == ("data", "add_header", "250")


def test_a_recipient_is_not_judged_by_an_earlier_recipients_list_entry(
    tmp_path: Path, mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    # gone@a.example is block-listed, but a.example only monitors its lists: it gets
    # in, and bob@b.example (lists enforced, on no list) must not inherit its entry.
    domains = {"a.example": {"checks": {"lists": "monitor"}}}
    files = {"block_recipients": "gone@a.example\n"}
    mg = mailgate(lists_policy(tmp_path / "mg0", files, domains=domains))
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("a@example.org")
        assert c.rcpt("gone@a.example")[0] == 250
        assert c.rcpt("bob@b.example")[0] == 250
        assert c.data(message())[0] == 250
    live = message_action(mg.logs())

    dry = check(mg.config_path, write_eml(tmp_path), "gone@a.example", "bob@b.example")
    assert (dry["stage"], dry["action"], dry["smtp_reply"][:3]) == ("data", live, "250"), dry


async def test_the_dry_run_matches_reverse_names_as_a_session_does(
    tmp_path: Path, dns_zone: ZoneDNSServer
) -> None:
    # A session takes the rdns check's verified name as the client's name, and the
    # client lists match rDNS suffixes against it; the dry run must too.
    clear_cache()
    ip = "192.0.2.55"
    dns_zone.add(
        dns.reversename.from_address(ip).to_text(omit_final_dot=True), "PTR", "mx.dyn.rdns.test"
    )
    dns_zone.add("mx.dyn.rdns.test", "A", ip)
    (tmp_path / "block.txt").write_text(".dyn.rdns.test\n")
    (tmp_path / "mailgate.toml").write_text('[lists]\nblock_clients = "block.txt"\n')
    policy = load_policy(tmp_path / "mailgate.toml").policy
    pipeline = Pipeline([RDNSCheck(), *list_checks(policy)], timeout=5.0)
    resolver = Resolver([Address(dns_zone.host, dns_zone.port)], timeout=1.0)
    found = await evaluate(
        policy, pipeline, message(), ip, "mx.dyn.rdns.test", "a@example.org", ["b@b.example"],
        resolver=resolver,
    )  # fmt: skip
    assert (found.stage.label, str(found.reply)) == ("rcpt", "550 5.7.1 Access denied")
    assert "block.txt:1 (.dyn.rdns.test)" in found.verdict.reason
    clear_cache()
