"""``mailgate explain``, ``check --replay`` and ``domain`` as an admin runs them.

Real Redis (the test database, ``redis_url``), the loopback DNS server (``dns_zone``) and every
command as a real ``python -m filter`` subprocess. No test reaches real DNS: each
policy points ``dns.nameservers`` at the test server.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from filter import replies, verdictlog
from filter.results import Action, Symbol
from filter.store import Store
from filter.verdict import Verdict
from tests.rig.cli import run_cli as mailgate
from tests.rig.dnsserver import MX, A, ZoneDNSServer, txt

REPO = Path(__file__).resolve().parents[2]
SESSION = "0A1B2C3D4E5F"


def write_policy(path: Path, redis_url: str, dns: ZoneDNSServer, extra: str = "") -> Path:
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\n\n'
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\n\n'
        # The default zone lives on the Internet; the test server answers for test zones.
        "[dnsbl]\nenabled = false\n\n" + extra
    )
    return path


@pytest.fixture
def config(tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer) -> Path:
    return write_policy(tmp_path / "mailgate.toml", redis_url, dns_zone)


# -- explain -----------------------------------------------------------------------------------
def message_fields(n: int, action: str = "reject") -> dict[str, object]:
    """What Session._log_message logs for a message (the record's input)."""
    return {
        "event": "message",
        "id": f"{SESSION}.{n}",
        "session": SESSION,
        "client": "198.51.100.7",
        "client_name": None,
        "helo": "spammer.example",
        "from": "alice@example.org",
        "rcpts": ["bob@example.test"],
        "size": 1234,
        "action": action,
        "score": 16.5,
        "symbols": ["SPF_FAIL", "RDNS_NONE"],
        "outcome": "refused",
        "reply": "550 5.7.1 Message rejected as spam",
        "queue_id": None,
    }


SPAM = Verdict(
    Action.REJECT,
    16.5,
    (
        Symbol("SPF_FAIL", 15.0, "198.51.100.7 is not permitted by example.org"),
        Symbol("RDNS_NONE", 1.5, "no PTR record"),
    ),
    replies.REJECT_SPAM,
    "score 16.5 >= reject 15",
)


async def seed(store: Store, ttl: float = 3600) -> None:
    refusal = {
        "event": "rcpt_refused",
        "session": SESSION,
        "client": "198.51.100.7",
        "helo": "spammer.example",
        "from": "alice@example.org",
        "rcpt": "carol@example.test",
        "action": "greylist",
        "reply": "451 4.7.1 Greylisted, try again later",
    }
    grey = Verdict(
        Action.GREYLIST,
        0.0,
        (Symbol("GREYLIST_NEW", 0.0, "first attempt"),),
        replies.greylisted(300),
        "new triplet",
    )
    t = 1_700_000_000.0
    assert await verdictlog.record(
        store, f"{SESSION}.1", verdictlog.build_record(refusal, grey, t), ttl
    )
    assert await verdictlog.record(
        store, f"{SESSION}.1", verdictlog.build_record(message_fields(1), SPAM, t + 1), ttl
    )
    accepted = {**message_fields(2, "accept"), "queue_id": "4XyZ12", "outcome": "relayed"}
    ok = Verdict(Action.ACCEPT, 0.0, (), None)
    assert await verdictlog.record(
        store, f"{SESSION}.2", verdictlog.build_record(accepted, ok, t + 2), ttl
    )


async def test_explain_message_prints_the_kept_verdict(
    store: Store, config: Path, raw: redis.Redis
) -> None:
    await seed(store)
    r = await asyncio.to_thread(mailgate, "explain", f"{SESSION}.1", "--config", str(config))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # The RCPT refusal first, then the message verdict.
    assert out.index("refused at RCPT") < out.index("score: 16.5")
    assert "client:   198.51.100.7" in out and "helo: spammer.example" in out
    assert "envelope: <alice@example.org> -> <bob@example.test>" in out
    assert "action:   reject   score: 16.5" in out
    assert "reply:    550 5.7.1 Message rejected as spam" in out
    assert "reason:   score 16.5 >= reject 15" in out
    assert "SPF_FAIL" in out and "15.00  198.51.100.7 is not permitted by example.org" in out
    assert "<carol@example.test>" in out
    # Both keys carry a TTL no longer than explain.keep.
    for key in (f"mailgate:v:{SESSION}.1", f"mailgate:vs:{SESSION}"):
        assert 0 < raw.ttl(key) <= 3600


async def test_explain_json_and_session_lookup(store: Store, config: Path) -> None:
    await seed(store)
    r = await asyncio.to_thread(mailgate, "explain", SESSION, "--json", "--config", str(config))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["session"] == SESSION
    assert data["messages"] == [f"{SESSION}.1", f"{SESSION}.2"]
    assert [rec["action"] for rec in data["records"]] == ["greylist", "reject", "accept"]
    assert data["records"][1]["symbols"][0] == {
        "name": "SPF_FAIL",
        "score": 15.0,
        "detail": "198.51.100.7 is not permitted by example.org",
    }
    assert data["records"][2]["queue_id"] == "4XyZ12"
    text = await asyncio.to_thread(mailgate, "explain", SESSION, "--config", str(config))
    assert text.returncode == 0 and "queue id: 4XyZ12" in text.stdout


async def test_explain_escapes_what_a_client_sent(store: Store, config: Path) -> None:
    """A kept HELO, address or symbol detail reaches the admin's terminal: a terminal
    escape (OSC title, C1 CSI), a line separator or a lone surrogate must not act or
    crash the command, in the text output or in --json."""
    hostile = {
        **message_fields(1),
        "helo": "x\x1b]0;owned\x07",
        "from": "a\u2028fake line@example.org",
        "rcpts": ["bob\udcff@example.test"],
        "reply": "550 5.7.1 \x9b2J",
    }
    verdict = Verdict(
        Action.REJECT, 16.5, (Symbol("SPF_FAIL", 15.0, "d=\u202eevil \x1b[31m"),), None, "r\x85s"
    )
    rec = verdictlog.build_record(hostile, verdict, 1_700_000_000.0)
    assert await verdictlog.record(store, f"{SESSION}.1", rec, 3600)
    r = await asyncio.to_thread(mailgate, "explain", f"{SESSION}.1", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert all(line.isprintable() for line in r.stdout.split("\n")), repr(r.stdout)
    assert "helo: x\\x1b]0;owned\\x07" in r.stdout
    assert "<a\\u2028fake line@example.org> -> <bob\\udcff@example.test>" in r.stdout
    assert "d=\\u202eevil \\x1b[31m" in r.stdout and "reason:   r\\x85s" in r.stdout
    j = await asyncio.to_thread(
        mailgate, "explain", f"{SESSION}.1", "--json", "--config", str(config)
    )
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["records"][0]["helo"] == "x\x1b]0;owned\x07"


async def test_explain_survives_records_it_did_not_write(
    store: Store, config: Path, raw: redis.Redis
) -> None:
    """The verdict keys live in a shared Redis: a value written by something else (a
    time that is no number, fields of the wrong type) must not make explain fail, and
    must not hide the good record beside it."""
    await seed(store)
    key = f"mailgate:v:{SESSION}.1"
    for odd in (
        {"time": "yesterday", "action": 7, "symbols": "SPF_FAIL", "score": "high"},
        {"time": [1], "event": None, "rcpts": {"a": 1}, "reply": 550},
        {"time": "nan", "symbols": [{"name": None}, 3]},
        {"time": True},
    ):
        raw.rpush(key, json.dumps(odd))
    for args in (("--json",), ()):
        r = await asyncio.to_thread(
            mailgate, "explain", f"{SESSION}.1", *args, "--config", str(config)
        )
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert "score: 16.5" in r.stdout or '"score": 16.5' in r.stdout


async def test_explain_not_found_bad_id_and_store_down(
    config: Path, tmp_path: Path, dns_zone: ZoneDNSServer, free_port: Any
) -> None:
    r = await asyncio.to_thread(mailgate, "explain", "FFFFFFFFFFFF.9", "--config", str(config))
    assert r.returncode == 1
    assert "no verdict kept for FFFFFFFFFFFF.9" in r.stderr and "7d" in r.stderr
    r = await asyncio.to_thread(mailgate, "explain", "mailgate:*", "--config", str(config))
    assert r.returncode == 2 and "not a session id" in r.stderr
    down = write_policy(tmp_path / "down.toml", f"redis://127.0.0.1:{free_port()}/9", dns_zone)
    r = await asyncio.to_thread(mailgate, "explain", f"{SESSION}.1", "--config", str(down))
    assert r.returncode == 1 and "store error" in r.stderr


async def test_keep_zero_keeps_nothing_and_a_down_store_never_raises(
    store: Store, raw: redis.Redis, free_port: Any
) -> None:
    rec = verdictlog.build_record(message_fields(1), SPAM)
    assert not await verdictlog.record(store, f"{SESSION}.1", rec, 0)
    assert raw.dbsize() == 0
    dead = Store(f"redis://127.0.0.1:{free_port()}/9")
    try:
        assert not await verdictlog.record(dead, f"{SESSION}.1", rec, 60)
    finally:
        await dead.aclose()


async def test_record_soon_writes_in_the_background(store: Store, raw: redis.Redis) -> None:
    rec = verdictlog.build_record(message_fields(3), SPAM)
    verdictlog.record_soon(store, f"{SESSION}.3", rec, 60)
    verdictlog.record_soon(None, f"{SESSION}.4", rec, 60)  # no store: nothing to do
    # Nothing is written before the batch interval: the SMTP reply never waits.
    assert await verdictlog.fetch(store, f"{SESSION}.3") is None
    await asyncio.sleep(verdictlog.FLUSH_DELAY * 4)
    found = await verdictlog.fetch(store, f"{SESSION}.3")
    assert found is not None and found["records"][0]["score"] == 16.5
    assert await verdictlog.fetch(store, f"{SESSION}.4") is None


async def test_a_burst_of_records_is_written_in_one_batch(store: Store, raw: redis.Redis) -> None:
    rec = verdictlog.build_record(message_fields(1), SPAM)
    for n in range(1, 51):
        verdictlog.record_soon(store, f"{SESSION}.{n}", rec, 60)
    await asyncio.sleep(verdictlog.FLUSH_DELAY * 4)
    found = await verdictlog.fetch(store, SESSION)
    assert found is not None and len(found["messages"]) == 50
    assert 0 < raw.pttl(f"mailgate:v:{SESSION}.50") <= 60_000


async def test_records_per_transaction_are_capped(store: Store, raw: redis.Redis) -> None:
    rec = verdictlog.build_record(message_fields(1), SPAM)
    for _ in range(verdictlog.MAX_RECORDS + 5):
        await verdictlog.record(store, f"{SESSION}.1", rec, 60)
    assert raw.llen(f"mailgate:v:{SESSION}.1") == verdictlog.MAX_RECORDS


# -- replay ------------------------------------------------------------------------------------
def eml(sender: str, client_ip: str | None, n: int) -> bytes:
    received = (
        f"Received: from mail{n}.example.org (mail{n}.example.org [{client_ip}])\n"
        f"\tby mx.example.test (Postfix) with ESMTP id Q{n}\n"
        f"\tfor <bob@example.test>; Mon, 1 Jan 2024 00:00:00 +0000\n"
        if client_ip
        else ""
    )
    return (
        f"Return-Path: <{sender}>\nX-Original-To: bob@example.test\n"
        f"Delivered-To: bob@example.test\n{received}"
        f"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom={sender}\n"
        f"From: <{sender}>\nTo: <bob@example.test>\nSubject: message {n}\n"
        f"Message-ID: <m{n}@example.org>\n\nhello {n}\n"
    ).encode()


@pytest.fixture
def maildir(tmp_path: Path, dns_zone: ZoneDNSServer) -> Path:
    """A Maildir: SPF passes for 2 messages, fails for 2 (one via a sidecar), 1 unusable."""
    dns_zone.add("example.org", "TXT", txt("v=spf1 ip4:192.0.2.0/24 -all"))
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1.M1.host:2,S").write_bytes(eml("alice@example.org", "192.0.2.10", 1))
    (md / "cur" / "2.M2.host:2,S").write_bytes(eml("alice@example.org", "198.51.100.7", 2))
    (md / "new" / "3.M3.host").write_bytes(eml("alice@example.org", "192.0.2.11", 3))
    (md / "new" / "4.M4.host").write_bytes(eml("alice@example.org", None, 4))
    (md / "new" / "4.M4.host.env.json").write_text(
        json.dumps({"ip": "203.0.113.9", "helo": "bad.example", "rcpts": ["bob@example.test"]})
    )
    (md / "new" / "5.M5.host").write_bytes(eml("alice@example.org", None, 5))
    return md


@pytest.fixture
def policies(tmp_path: Path, redis_url: str, dns_zone: ZoneDNSServer) -> tuple[Path, Path]:
    # Greylisting stays on (the default) in both: replay must switch it off itself.
    old = write_policy(tmp_path / "old.toml", redis_url, dns_zone)
    new = write_policy(tmp_path / "new.toml", redis_url, dns_zone, "[scores]\nSPF_FAIL = 20.0\n")
    return new, old


def test_replay_reports_how_verdicts_change(
    maildir: Path, policies: tuple[Path, Path], raw: redis.Redis
) -> None:
    new, old = policies
    r = mailgate("check", "--replay", str(maildir), "--policy", str(new), "--policy", str(old))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "replayed 4 of 5 messages" in out
    assert "changed: 2 actions, 0 scores only" in out
    assert "new/5.M5.host: no client IP in Received fields; add 5.M5.host.env.json" in out
    assert "cur/2.M2.host" in out and "new/4.M4.host" in out
    assert raw.dbsize() == 0  # nothing written: no greylist triplet, no rate counter

    j = mailgate(
        "check", "--replay", str(maildir), "--policy", str(new), "--policy", str(old), "--json"
    )
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)
    assert (data["files"], data["judged"]) == (5, 4)
    assert data["actions"]["old"]["accept"] == 4
    assert data["actions"]["new"]["accept"] == 2 and data["actions"]["new"]["reject"] == 2
    assert data["transitions"]["accept"]["reject"] == 2
    assert data["transitions"]["accept"]["accept"] == 2
    changed = {c["file"]: c for c in data["changed"]}
    assert set(changed) == {"cur/2.M2.host:2,S", "new/4.M4.host"}
    two = changed["cur/2.M2.host:2,S"]
    assert two["old"]["action"] == "accept" and two["new"]["action"] == "reject"
    assert two["new"]["reply"].startswith("550 5.7.1")
    assert two["delta"] == 18.0  # SPF_FAIL: 2.0 -> 20.0
    assert two["envelope"]["ip"] == "198.51.100.7" and two["envelope"]["source"] == "headers"
    four = changed["new/4.M4.host"]["envelope"]
    assert four["source"] == "sidecar" and four["helo"] == "bad.example"
    assert four["mail_from"] == "alice@example.org"  # from Return-Path: the sidecar has none
    assert [s["file"] for s in data["skipped"]] == ["new/5.M5.host"]
    assert data["not_replayed"] == ["greylist", "ratelimit"]
    assert raw.dbsize() == 0


def test_replay_old_defaults_to_config_and_progress_on_long_runs(
    tmp_path: Path, policies: tuple[Path, Path], dns_zone: ZoneDNSServer
) -> None:
    dns_zone.add("example.org", "TXT", txt("v=spf1 ip4:192.0.2.0/24 -all"))
    folder = tmp_path / "eml"
    folder.mkdir()
    for n in range(55):
        ip = "192.0.2.20" if n % 5 else "198.51.100.20"
        (folder / f"m{n:02}.eml").write_bytes(eml("alice@example.org", ip, n))
    new, old = policies
    r = mailgate(
        "check", "--replay", str(folder), "--policy", str(new), "--config", str(old), "--json"
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["policies"] == {"new": str(new), "old": str(old)}
    assert data["judged"] == 55
    assert data["transitions"]["accept"]["reject"] == 11
    # Not a terminal but more than 50 files: a progress line per 10%.
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("replay: ")]
    assert lines and lines[-1].startswith("replay: 55/55 100%")


def test_replay_bad_input(tmp_path: Path, policies: tuple[Path, Path]) -> None:
    new, old = policies
    r = mailgate("check", "--replay", str(tmp_path / "nope"), "--policy", str(new))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = mailgate("check", "--replay", str(tmp_path))
    assert r.returncode == 2 and "--policy NEW" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[actions]\nreject = 'x'\n")
    r = mailgate("check", "--replay", str(tmp_path), "--policy", str(bad), "--policy", str(old))
    assert r.returncode == 2 and "actions.reject" in r.stderr


# -- domain ------------------------------------------------------------------------------------
def test_domain_clean_setup(config: Path, dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("good.test", "TXT", txt("v=spf1 mx -all"))
    dns_zone.add("good.test", "MX", MX("mail.good.test", 10))
    dns_zone.add("mail.good.test", "A", A("127.0.0.5"))
    dns_zone.add("_dmarc.good.test", "TXT", txt("v=DMARC1; p=reject; rua=mailto:d@good.test"))
    r = mailgate("domain", "good.test", "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SPF     v=spf1 mx -all" in r.stdout
    assert "DMARC   v=DMARC1; p=reject" in r.stdout
    assert "MX      10 mail.good.test  127.0.0.5" in r.stdout
    assert "no problems found" in r.stdout
    assert dns_zone.count("good.test", "TXT") > 0  # the audit asked the test server


def test_domain_problems_come_with_advice(config: Path, dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("bad.test", "TXT", txt("v=spf1 +all"))
    dns_zone.add("bad.test", "A", A("127.0.0.6"))
    dns_zone.add("_dmarc.bad.test", "TXT", txt("v=DMARC1; p=none; pct=50"))
    r = mailgate("domain", "bad.test", "--json", "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr  # errors found
    data = json.loads(r.stdout)
    found = {(p["area"], p["problem"].split(":")[0]) for p in data["problems"]}
    assert ("spf", "the record ends in +all") in found
    assert ("dmarc", "p=none") in found
    assert ("dmarc", "no rua") in found
    assert ("dmarc", "pct= is no longer part of DMARC (RFC 9989); receivers ignore it") in found
    assert ("mx", "no MX record") in found
    assert all(p["advice"] for p in data["problems"])
    assert data["dmarc"]["tags"]["p"] == "none" and data["dmarc"]["tags"]["np"] == "none"
    assert data["errors"] == 2 and data["warnings"] == 3
    text = mailgate("domain", "bad.test", "--config", str(config))
    assert text.returncode == 1
    assert "error    spf    the record ends in +all" in text.stdout
    assert "advice: end the record with -all" in text.stdout


def test_domain_missing_records_and_too_many_lookups(config: Path, dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("bare.test", "A", A("127.0.0.7"))
    r = mailgate("domain", "bare.test", "--json", "--config", str(config))
    data = json.loads(r.stdout)
    assert r.returncode == 1
    areas = sorted(p["area"] for p in data["problems"])
    assert areas == ["dmarc", "mx", "spf"]
    assert data["spf"]["record"] is None and data["dmarc"]["record"] is None

    includes = " ".join(f"include:i{n}.many.test" for n in range(11))
    dns_zone.add("many.test", "TXT", txt(f"v=spf1 {includes} -all"))
    for n in range(11):
        dns_zone.add(f"i{n}.many.test", "TXT", txt("v=spf1 ip4:192.0.2.1 -all"))
    r = mailgate("domain", "many.test", "--json", "--config", str(config))
    data = json.loads(r.stdout)
    assert data["spf"]["dns_lookups"] == 11
    assert any(p["problem"].startswith("too many DNS lookups: 11 > 10") for p in data["problems"])


def test_domain_dns_failure_is_not_a_missing_record(config: Path, dns_zone: ZoneDNSServer) -> None:
    """A SERVFAIL is a failed lookup, not "no SPF record" with advice to publish one."""
    dns_zone.add("flaky.test", "TXT", txt("v=spf1 mx -all"))
    dns_zone.add("_dmarc.flaky.test", "TXT", txt("v=DMARC1; p=reject"))
    dns_zone.set_name_mode("flaky.test", "servfail")
    dns_zone.set_name_mode("_dmarc.flaky.test", "servfail")
    r = mailgate("domain", "flaky.test", "--json", "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr
    data = json.loads(r.stdout)
    by_area = {p["area"]: p for p in data["problems"]}
    assert by_area["spf"]["problem"].startswith("SPF lookup failed: ")
    assert by_area["dmarc"]["problem"].startswith("DMARC lookup failed: ")
    assert by_area["mx"]["problem"].startswith("MX lookup failed: ")
    assert not any("publish" in p["advice"] for p in data["problems"]), data["problems"]
    assert all("name servers answer" in p["advice"] for p in data["problems"])


def test_domain_several_dmarc_records_show_what_receivers_use(
    config: Path, dns_zone: ZoneDNSServer
) -> None:
    """Receivers discard every record at a name with several (RFC 9989 §4.10 steps 2
    and 6) and walk on to the organizational domain's; checkdmarc stopped at them, so
    the audit said "no DMARC record" and advised publishing one."""
    dns_zone.add("news.corp.test", "TXT", txt("v=spf1 mx -all"))
    dns_zone.add("news.corp.test", "MX", MX("mail.corp.test", 10))
    dns_zone.add("mail.corp.test", "A", A("127.0.0.5"))
    dns_zone.add("_dmarc.news.corp.test", "TXT", txt("v=DMARC1; p=none"))
    dns_zone.add("_dmarc.news.corp.test", "TXT", txt("v=DMARC1; p=quarantine"))
    dns_zone.add("_dmarc.corp.test", "TXT", txt("v=DMARC1; p=reject; rua=mailto:d@corp.test"))
    r = mailgate("domain", "news.corp.test", "--json", "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr  # the duplicates are an error
    data = json.loads(r.stdout)
    dmarc = data["dmarc"]
    assert dmarc["record"] == "v=DMARC1; p=reject; rua=mailto:d@corp.test"
    assert (dmarc["location"], dmarc["inherited"], dmarc["valid"]) == ("corp.test", True, True)
    assert dmarc["tags"]["p"] == "reject"
    assert dmarc["duplicates"] == [{"name": "news.corp.test", "records": 2}]
    problems = [p for p in data["problems"] if p["area"] == "dmarc"]
    assert [p["severity"] for p in problems] == ["error"]
    assert problems[0]["problem"].startswith(
        "2 DMARC records at _dmarc.news.corp.test: receivers ignore all of them"
    )
    assert "_dmarc.corp.test" in problems[0]["problem"]
    assert "keep exactly one" in problems[0]["advice"]
    assert not any("no DMARC record" in p["problem"] for p in data["problems"])
    text = mailgate("domain", "news.corp.test", "--config", str(config))
    assert text.returncode == 1
    assert "DMARC   v=DMARC1; p=reject; rua=mailto:d@corp.test   (at _dmarc.corp.test)" in (
        text.stdout
    )
    assert "error    dmarc  2 DMARC records at _dmarc.news.corp.test" in text.stdout

    # Nothing to fall back on: still no advice to publish a record beside the two.
    dns_zone.add("_dmarc.lone.test", "TXT", txt("v=DMARC1; p=none"))
    dns_zone.add("_dmarc.lone.test", "TXT", txt("v=DMARC1; p=reject"))
    data = json.loads(mailgate("domain", "lone.test", "--json", "--config", str(config)).stdout)
    problems = [p for p in data["problems"] if p["area"] == "dmarc"]
    assert len(problems) == 1 and "no DMARC policy" in problems[0]["problem"]
    assert data["dmarc"]["record"] is None


def test_domain_bad_input_and_nonexistent(config: Path) -> None:
    r = mailgate("domain", "not a domain", "--config", str(config))
    assert r.returncode == 2 and "not a domain name" in r.stderr
    r = mailgate("domain", "nosuch.test", "--json", "--config", str(config))
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["problems"][0]["area"] == "domain"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bad..domain", "an empty label"),
        (f"{'a' * 70}.test", "longer than 63 characters"),
        ("exa_mple!.test", "characters other than letters, digits and inner hyphens"),
        ("1.2.3.4", "it is an IP address"),
        ("[192.0.2.1]", "it is an IP address"),
        ("user@pass.test", "it is an e-mail address"),
        ("localhost", "a single label"),
        ("example.123", "the top-level label is numeric"),
        ("bad-.test", "inner hyphens"),
    ],
)
def test_domain_malformed_names_are_bad_input(
    config: Path, dns_zone: ZoneDNSServer, name: str, why: str
) -> None:
    for json_flag in ((), ("--json",)):
        r = mailgate("domain", name, *json_flag, "--config", str(config))
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout == ""
        assert r.stderr.startswith(f"mailgate domain: {name!r} is not a domain name: ")
        assert r.stderr.count("\n") == 1 and why in r.stderr
    assert dns_zone.count() == 0  # refused before any lookup


def test_domain_accepts_a_trailing_dot_and_idn(config: Path, dns_zone: ZoneDNSServer) -> None:
    r = mailgate("domain", "Bücher.example.test.", "--json", "--config", str(config))
    assert r.returncode == 1, r.stderr  # a real audit: no records, so errors
    assert json.loads(r.stdout)["domain"] == "xn--bcher-kva.example.test"


def test_domain_dmarc_record_beside_other_txt_records_is_the_one_receivers_use(
    config: Path, dns_zone: ZoneDNSServer
) -> None:
    """checkdmarc stops at a DMARC record sharing its name with other TXT records;
    receivers skip those (RFC 9989 §4.10 step 2): the audit shows the record and warns."""
    dns_zone.add("mixed.test", "TXT", txt("v=spf1 -all"))
    dns_zone.add("_dmarc.mixed.test", "TXT", txt("v=DMARC1; p=reject; rua=mailto:d@mixed.test"))
    dns_zone.add("_dmarc.mixed.test", "TXT", txt("google-site-verification=abc"))
    data = json.loads(mailgate("domain", "mixed.test", "--json", "--config", str(config)).stdout)
    dmarc = data["dmarc"]
    assert (dmarc["record"], dmarc["location"], dmarc["valid"]) == (
        "v=DMARC1; p=reject; rua=mailto:d@mixed.test",
        "mixed.test",
        True,
    )
    problems = [p for p in data["problems"] if p["area"] == "dmarc"]
    assert [p["severity"] for p in problems] == ["warning"]
    assert problems[0]["problem"].startswith("TXT records other than DMARC at _dmarc.mixed.test")
    assert not any("no DMARC record" in p["problem"] for p in data["problems"])
