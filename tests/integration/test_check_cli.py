"""``mailgate check FILE.eml`` as an admin runs it, and the CLI plumbing every command shares.

Every command runs as a real ``python -m filter`` subprocess against real Redis (the
test database, ``redis_url``) and the loopback DNS server (``dns_zone``); no test
reaches real DNS.
The parity tests also drive a live mailgate (``mailgate`` fixture) over SMTP and hold
the dry run's stage and reply against the live session's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import pytest
import redis

from filter import replies
from filter.dnsbl import ip_query_name
from tests.integration.conftest import StartMailgate
from tests.rig.cli import run_cli as cli
from tests.rig.client import smtp_client
from tests.rig.dkimkeys import rsa_dkim_key
from tests.rig.dnsserver import ZoneDNSServer, txt

REPO = Path(__file__).resolve().parents[2]
CLIENT = "192.0.2.10"  # SPF-permitted for example.test below
SENDER = "alice@example.test"
RCPT = "bob@example.org"
ZONE = "zen.bl.test"
PREFIX = f"mailgate-check-{os.getpid()}:"  # our keys alone, whatever else uses the test database

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <figures.1@example.test>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)

DNSBL_ZONE = f'[[dnsbl.zones]]\nzone = "{ZONE}"\nscore = 10.0\nreject = true\n\n'


def write_policy(
    path: Path, redis_url: str, dns: ZoneDNSServer, extra: str = "", dnsbl: str = ""
) -> Path:
    """A policy on the test Redis and DNS; DNSBL off unless ``dnsbl`` names test zones."""
    path.write_text(
        f'[server]\nhostname = "mx.mailgate.test"\n\n'
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{PREFIX}"\n\n'
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\n\n'
        + (f"[dnsbl]\nenabled = true\n{dnsbl}" if dnsbl else "[dnsbl]\nenabled = false\n\n")
        + extra
    )
    return path


def publish_sender(dns: ZoneDNSServer) -> bytes:
    """SPF, DMARC p=reject and a DKIM key for example.test; returns the private key (PEM)."""
    pem, record = rsa_dkim_key()
    dns.add("sel._domainkey.example.test", "TXT", txt(record))
    dns.add("example.test", "TXT", txt("v=spf1 ip4:192.0.2.0/24 -all"))
    dns.add("_dmarc.example.test", "TXT", txt("v=DMARC1; p=reject"))
    return pem


def signed_message(tmp_path: Path, pem: bytes) -> Path:
    """MESSAGE with a valid DKIM signature of example.test, written as an .eml file."""
    sig = dkim.sign(MESSAGE, b"sel", b"example.test", pem, include_headers=[b"from", b"subject"])
    path = tmp_path / "signed.eml"
    path.write_bytes(bytes(sig) + MESSAGE)
    return path


def list_client(dns: ZoneDNSServer, ip: str) -> None:
    """List ``ip`` in the test zone, with RFC 5782's test entry so the zone looks healthy."""
    dns.set_records(f"2.0.0.127.{ZONE}", "A", ["127.0.0.2"])
    dns.set_records(ip_query_name(ip, ZONE), "A", ["127.0.0.2"])


def check_json(*args: str) -> dict[str, Any]:
    r = cli("check", *args, "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


@pytest.fixture
def eml(tmp_path: Path) -> Path:
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))  # files on disk have LF line ends
    return path


# -- a refusal before DATA still explains every check -----------------------------------------
def test_greylisted_signed_message_explains_every_check(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, raw: redis.Redis
) -> None:
    pem = publish_sender(dns_zone)
    msg = signed_message(tmp_path, pem)
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)  # greylisting on (default)
    envelope = ("--ip", CLIENT, "--helo", "mail.example.test", "--mail-from", SENDER)
    data = check_json(str(msg), *envelope, "--rcpt", RCPT, "--config", str(config))
    assert data["action"] == "greylist"
    assert data["stage"] == "rcpt"
    assert data["smtp_reply"].startswith("451 4.7.1 Greylisted")
    # The checks after the refusal ran too, and say what they found (not "none").
    results = data["results"]
    assert (results["spf"], results["dkim"], results["dmarc"]) == ("pass", "pass", "pass")
    assert results["greylist"] == "policy"
    assert results["dnsbl"] == []  # disabled by policy: no listing, its own answer
    assert {"spf", "dkim", "dmarc", "arc", "greylist"} <= set(data["checks_run"])
    names = {s["name"] for s in data["symbols"]}
    assert {"SPF_PASS", "DKIM_PASS", "DMARC_PASS", "GREYLIST_NEW"} <= names
    assert data["score_after_data"] == round(sum(s["score"] for s in data["symbols"]), 4)
    ar = data["authentication_results"]
    assert ar.startswith("Authentication-Results: mx.mailgate.test;")
    for part in ("spf=pass", "dkim=pass header.d=example.test", "dmarc=pass", "arc=none"):
        assert part in ar
    assert data["envelope"] == {
        "ip": CLIENT,
        "helo": "mail.example.test",
        "mail_from": SENDER,
        "rcpts": [RCPT],
    }
    assert raw.keys(f"{PREFIX}*") == []  # a dry run: no triplet written

    text = cli("check", str(msg), *envelope, "--rcpt", RCPT, "--config", str(config))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "action:  greylist" in out and "stage: rcpt" in out
    assert "results: spf=pass dkim=pass dmarc=pass dnsbl=- " in out
    assert "Authentication-Results: mx.mailgate.test;" in out and "DKIM_PASS" in out


def test_dnsbl_listing_is_refused_at_rcpt_after_spf(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, eml: Path
) -> None:
    publish_sender(dns_zone)
    list_client(dns_zone, CLIENT)
    config = write_policy(
        tmp_path / "p.toml", redis_url, dns_zone, "[greylist]\nenabled = false\n", DNSBL_ZONE
    )
    base = (str(eml), "--ip", CLIENT, "--mail-from", SENDER, "--config", str(config))
    for rcpts in (("--rcpt", RCPT), ()):  # with or without a recipient: refused at RCPT
        data = check_json(*base, *rcpts)
        assert (data["action"], data["stage"]) == ("reject", "rcpt")
        assert data["smtp_reply"] == str(replies.REJECT_DNSBL)
        assert data["results"]["spf"] == "pass"  # MAIL FROM came before the refusal
        assert data["results"]["dnsbl"] == ["DNSBL_ZEN"]
        assert data["results"]["dkim"] == "none"  # ran after the refusal: really unsigned
        assert "dkim" in data["checks_run"] and "dmarc" in data["checks_run"]
        assert "spf=pass smtp.mailfrom=alice@example.test" in data["authentication_results"]


def test_trusted_client_is_accepted_and_its_checks_still_explained(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, raw: redis.Redis
) -> None:
    """A live session runs no check for a trusted client and accepts; the dry run gives
    that verdict, and still shows what the checks say (RFC 8601 words, never null)."""
    pem = publish_sender(dns_zone)
    msg = signed_message(tmp_path, pem)
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)  # 127.0.0.1 is trusted
    args = (str(msg), "--ip", "127.0.0.1", "--mail-from", SENDER, "--rcpt", RCPT)
    data = check_json(*args, "--config", str(config))
    assert (data["action"], data["stage"], data["trusted"]) == ("accept", "data", True)
    assert data["reason"] == "trusted client" and data["score"] == 0.0
    assert data["smtp_reply"].startswith("250 ")
    results = data["results"]
    assert results["dkim"] == "pass" and results["dnsbl"] == []  # DNSBL disabled here
    assert results["spf"] in ("fail", "softfail", "neutral", "none")  # 127.0.0.1 is no MX
    assert {"spf", "dkim", "dmarc", "greylist"} <= set(data["checks_run"])
    assert "DKIM_PASS" in {s["name"] for s in data["symbols"]}
    assert data["authentication_results"].startswith("Authentication-Results: mx.mailgate.test;")
    assert "dkim=pass header.d=example.test" in data["authentication_results"]
    assert raw.keys(f"{PREFIX}*") == []  # greylisting asked, but nothing written
    text = cli("check", *args, "--config", str(config)).stdout
    assert "action:  accept" in text and "dkim=pass" in text
    assert "a live session runs no checks and adds no header" in text


def test_session_limits_are_answered_as_the_session_would(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer
) -> None:
    """max_recipients and max_message_size: the extra recipient gets 452 4.5.3 before
    any check, an oversized message 552 5.3.4; the checks still run, for the record."""
    publish_sender(dns_zone)
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone, "[greylist]\nenabled = false\n")
    (tmp_path / "local.d").mkdir()
    limits = '[server]\nmax_recipients = 2\nmax_message_size = "4KiB"\n'
    (tmp_path / "local.d" / "10-limits.toml").write_text(limits)
    base = ("--ip", CLIENT, "--mail-from", SENDER, "--config", str(config))
    small = tmp_path / "small.eml"
    small.write_bytes(MESSAGE)
    big = tmp_path / "big.eml"
    big.write_bytes(MESSAGE + b"x" * 70 + (b"\r\n" + b"x" * 70) * 80 + b"\r\n")

    data = check_json(str(small), *base, "--rcpt", "a@example.org", "b@example.org")
    assert (data["action"], data["stage"]) == ("accept", "data")
    data = check_json(str(small), *base, "--rcpt", "a@example.org", "b@example.org", "c@x.org")
    assert (data["action"], data["stage"]) == ("tempfail", "rcpt")
    assert data["smtp_reply"] == str(replies.TOO_MANY_RECIPIENTS)
    assert "max_recipients (2)" in data["reason"]
    assert data["results"]["spf"] == "pass"  # every check still ran
    data = check_json(str(big), *base, "--rcpt", "a@example.org")
    assert (data["action"], data["stage"]) == ("reject", "data")
    assert data["smtp_reply"] == str(replies.MESSAGE_TOO_BIG)
    assert "dkim" in data["checks_run"]
    long_line = tmp_path / "long.eml"
    long_line.write_bytes(MESSAGE + b"y" * 1200 + b"\r\n")
    data = check_json(str(long_line), *base, "--rcpt", "a@example.org")
    assert data["smtp_reply"] == str(replies.DATA_LINE_TOO_LONG)


def test_disabled_checks_report_their_own_none(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, eml: Path
) -> None:
    off = "".join(f"[{c}]\nenabled = false\n" for c in ("spf", "dkim", "dmarc", "greylist"))
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone, off)
    data = check_json(str(eml), "--ip", CLIENT, "--rcpt", RCPT, "--config", str(config))
    assert [data["results"][k] for k in ("spf", "dkim", "dmarc")] == ["none"] * 3
    assert data["results"]["dnsbl"] == []
    assert not {"spf", "dkim", "dmarc", "dnsbl"} & set(data["checks_run"])
    assert data["authentication_results"].endswith("arc=none")


# -- the dry run answers as the live session does -----------------------------------------------
def live_replies(port: int, source_ip: str, sender: str, rcpt: str) -> tuple[str, str]:
    """MAIL and RCPT replies of a live session, as "code text"."""
    with smtp_client("127.0.0.1", port, source_ip=source_ip) as c:
        c.ehlo()
        mail = c.mail(sender)
        got = c.rcpt(rcpt)
        c.rset()
    return f"{mail[0]} {mail[1].decode()}", f"{got[0]} {got[1].decode()}"


@pytest.mark.parametrize("case", ["dnsbl", "greylist"])
def test_dry_run_stage_and_reply_match_a_live_session(
    case: str,
    mailgate: StartMailgate,
    dns_zone: ZoneDNSServer,
    redis_url: str,
    eml: Path,
) -> None:
    client = "127.0.0.5"
    if case == "dnsbl":
        list_client(dns_zone, client)
        policy: dict[str, Any] = {
            "dnsbl": {"enabled": True, "zones": [{"zone": ZONE, "score": 10.0, "reject": True}]}
        }
    else:
        policy = {"greylist": {"enabled": True}}
    mg = mailgate(policy)
    dry = check_json(
        str(eml), "--ip", client, "--helo", "client.example.test", "--mail-from", SENDER,
        "--rcpt", RCPT, "--config", str(mg.config_path),
    )  # fmt: skip
    mail, rcpt = live_replies(mg.smtp_port, client, SENDER, RCPT)
    assert mail.startswith("250")  # nothing is refused before RCPT
    assert dry["stage"] == "rcpt"
    assert dry["smtp_reply"] == rcpt
    assert dry["action"] == case.replace("dnsbl", "reject")


# -- bad input ---------------------------------------------------------------------------------
def test_envelope_addresses_are_parsed_like_smtp_commands(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, eml: Path
) -> None:
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)
    base = (str(eml), "--ip", "127.0.0.1", "--config", str(config))
    for bad, why in (
        (("--mail-from", "not an address"), "--mail-from 'not an address': invalid characters"),
        (("--rcpt", ""), "--rcpt '': a recipient cannot be the null address"),
        (("--rcpt", "<>"), "--rcpt '<>': a recipient cannot be the null address"),
        (("--rcpt", "bob@exa mple.org"), "invalid characters"),
        (("--rcpt", "bob@example.org>x"), "garbage after the address"),
        (("--mail-from", "a@-bad-.example"), "invalid domain"),
    ):
        r = cli("check", *base, *bad)
        assert r.returncode == 2, (bad, r.stdout)
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    for sender in ("", "<>", "<alice@example.test>"):  # the null sender, brackets optional
        data = check_json(*base, "--mail-from", sender)
        assert data["envelope"]["mail_from"] == sender.strip("<>")


def test_odd_message_files_and_addresses_are_judged_or_refused_never_a_traceback(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer
) -> None:
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)
    files = {
        "empty.eml": b"",
        "lf.eml": MESSAGE.replace(b"\r\n", b"\n"),
        "binary.eml": bytes(range(256)) * 4,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        data = check_json(str(tmp_path / name), "--ip", CLIENT, "--config", str(config))
        assert data["action"] in ("accept", "add_header", "greylist", "tempfail", "reject"), name
    for spelt in (f" {CLIENT} ", f"::ffff:{CLIENT}"):
        data = check_json(str(tmp_path / "lf.eml"), "--ip", spelt, "--config", str(config))
        assert data["envelope"]["ip"] == CLIENT  # as the live session sees and logs it
    for ip in ("999.1.1.1", "fe80::1%eth0", "example.org"):
        r = cli("check", str(tmp_path / "lf.eml"), "--ip", ip, "--config", str(config))
        assert r.returncode == 2 and r.stdout == "", ip
        assert r.stderr == f"mailgate check: --ip {ip!r} is not an IP address\n"
    for missing in (tmp_path / "nope.eml", tmp_path):
        r = cli("check", str(missing), "--ip", CLIENT, "--config", str(config))
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
        assert r.stderr.startswith("mailgate check: ") and r.stderr.count("\n") == 1


def test_rcpt_takes_several_addresses_in_any_order(
    tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, eml: Path
) -> None:
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)
    opts = ("--ip", "127.0.0.1", "--config", str(config))
    two = ["a@example.org", "b@example.org"]
    for argv in (
        (str(eml), "--rcpt", *two, *opts),  # FILE first, as the contract writes it
        ("--rcpt", *two, str(eml), *opts),  # FILE after the addresses
        (*opts, "--rcpt", two[0], "--rcpt", two[1], str(eml)),  # repeated --rcpt
    ):
        assert check_json(*argv)["envelope"]["rcpts"] == two, argv
    r = cli("check", "--rcpt", *two, *opts)
    assert r.returncode == 2 and "FILE.eml and --ip are required" in r.stderr


# -- errors on stderr, a closed stdout -----------------------------------------------------------
def test_policy_errors_go_to_stderr_except_for_policy_check(tmp_path: Path, eml: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[actions]\nreject = 'x'\n")
    message = f'{bad}: actions.reject: expected a number, got "x"'
    show = cli("policy", "show", "--config", str(bad))
    assert show.returncode == 1 and show.stdout == "" and message in show.stderr
    check = cli("policy", "check", "--config", str(bad))
    assert check.returncode == 1 and message in check.stdout  # printing them is its job
    for argv in (
        ("check", str(eml), "--ip", CLIENT, "--json"),
        ("domain", "example.test", "--json"),
        ("greylist", "stats"),
        ("explain", "0A1B2C3D4E5F"),
    ):
        r = cli(*argv, "--config", str(bad))
        assert r.returncode == 2 and r.stdout == "" and message in r.stderr, argv


def run_into_closed_pipe(*args: str, buffered: bool) -> subprocess.CompletedProcess[bytes]:
    """The command with a stdout whose reader is already gone (``… | head`` after head quit).

    ``buffered``: stdout as Python sets it up for a pipe, so the failure comes at the
    final flush; otherwise (PYTHONUNBUFFERED) at the first write.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "filter", *args],
            cwd=REPO,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_closed_stdout_ends_quietly(
    buffered: bool, tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer, eml: Path
) -> None:
    config = write_policy(tmp_path / "p.toml", redis_url, dns_zone)
    for argv in (
        ("check", str(eml), "--ip", "127.0.0.1", "--json", "--config", str(config)),
        ("check", str(eml), "--ip", "127.0.0.1", "--config", str(config)),
        ("policy", "show", "--config", str(config)),
    ):
        r = run_into_closed_pipe(*argv, buffered=buffered)
        assert r.stderr == b"", (argv, r.stderr.decode())
        assert r.returncode == 128 + signal.SIGPIPE, argv
    # argparse prints --help itself (and drops a failed write): quiet, whatever the code.
    assert run_into_closed_pipe("--help", buffered=buffered).stderr == b""
