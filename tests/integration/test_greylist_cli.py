"""``mailgate greylist stats|show|allow|forget`` as an admin runs them, against real Redis.

Each command is a real ``python -m filter`` subprocess with a policy whose
``redis.url`` points at the tests' database (``tests.rig.workers``); state is seeded
and checked through the same Store and check the mail path uses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from filter.checks import Context
from filter.checks.greylist import GreylistCheck
from filter.model import ClientInfo, Envelope, Recipient
from filter.policy.schema import Policy, policy_from_dict
from filter.results import CheckResult
from filter.store import Store

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def write_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[redis]\nurl = "{url}"\n\n[greylist]\nawl_count = 1\n')
    return config


def mailgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filter", "greylist", *args, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> Path:
    return write_config(tmp_path, redis_url)


@pytest.fixture
def policy(redis_url: str) -> Policy:
    p, problems = policy_from_dict({"redis": {"url": redis_url}, "greylist": {"awl_count": 1}})
    assert p is not None, problems
    return p


async def rcpt(
    store: Store,
    policy: Policy,
    ip: str,
    rcpt: str = "bob@example.test",
    now: float = T0,
    spf_domain: str | None = None,
) -> CheckResult:
    results = {}
    if spf_domain:
        data = {"identity": "mailfrom", "domain": spf_domain}
        results["spf"] = CheckResult("spf", "pass", (), None, data)
    ctx = Context(
        client=ClientInfo(ip=ip, port=1, session_id="S"),
        policy=policy,
        results=results,
        envelope=Envelope(mail_from=f"alice@{spf_domain or 'example.org'}"),
        recipient=Recipient(rcpt),
        clock=lambda: now,
        store=store,
    )
    return await GreylistCheck().run(ctx)


async def test_stats_and_show_on_an_empty_store(config: Path) -> None:
    out = mailgate(config, "stats")
    assert out.returncode == 0, out.stderr
    assert "triplets:            0 (0 waiting, 0 passed)" in out.stdout
    show = mailgate(config, "show")
    assert show.returncode == 0 and "(no triplets)" in show.stdout


async def test_stats_and_show_count_what_the_check_stored(
    config: Path, store: Store, policy: Policy
) -> None:
    await rcpt(store, policy, "192.0.2.1", "a@example.test")
    await rcpt(store, policy, "192.0.2.1", "b@example.test")
    await rcpt(store, policy, "192.0.2.1", "a@example.test", now=T0 + 400)  # passes
    await rcpt(store, policy, "2001:db8::5", "c@example.test")
    out = mailgate(config, "stats")
    assert out.returncode == 0, out.stderr
    assert "triplets:            3 (2 waiting, 1 passed)" in out.stdout
    assert "auto-allowlist:      1 networks (1 allowlisted)" in out.stdout
    show = mailgate(config, "show", "--limit", "10")
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert any(
        ln.startswith("passed") and "192.0.2.0/24 <alice@example.org> -> <a@example.test>" in ln
        for ln in lines
    )
    assert any(ln.startswith("waiting") and "2001:db8::/64" in ln for ln in lines)
    assert any("192.0.2.0/24" in ln and ln.split()[0] == "1" for ln in lines)  # AWL row
    limited = mailgate(config, "show", "--limit", "1")
    rows = [ln for ln in limited.stdout.splitlines() if ln.startswith(("passed", "waiting"))]
    assert len(rows) == 1


async def test_allow_network_is_honoured_by_the_check(
    config: Path, store: Store, policy: Policy, raw: redis.Redis
) -> None:
    out = mailgate(config, "allow", "198.51.100.0/24", "--ttl", "2h")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("allowed 198.51.100.0/24 for 2h")
    r = await rcpt(store, policy, "198.51.100.77", now=time.time())
    assert r.decision is None and r.data["outcome"] == "allowlisted"
    assert 7100 < raw.pttl("mailgate:gl:allow") / 1000 <= 7200
    show = mailgate(config, "show")
    assert "net:198.51.100.0/24" in show.stdout
    stats = mailgate(config, "stats")
    assert "allow entries:       1 networks, 0 domains" in stats.stdout


async def test_allow_domain_counts_only_with_spf_pass(
    config: Path, store: Store, policy: Policy
) -> None:
    assert mailgate(config, "allow", "Example.NET").returncode == 0
    now = time.time()
    ok = await rcpt(store, policy, "203.0.113.9", now=now, spf_domain="example.net")
    assert ok.decision is None
    unauthenticated = await rcpt(store, policy, "203.0.113.9", "z@example.test", now=now)
    assert unauthenticated.decision is not None


async def test_forget_deletes_triplets_awl_and_allow_entries_of_a_network(
    config: Path, store: Store, policy: Policy, raw: redis.Redis
) -> None:
    await rcpt(store, policy, "192.0.2.1", "a@example.test")
    await rcpt(store, policy, "192.0.2.1", "b@example.test")
    await rcpt(store, policy, "192.0.2.1", "a@example.test", now=T0 + 400)  # AWL entry
    await rcpt(store, policy, "198.51.100.1", "a@example.test")
    assert mailgate(config, "allow", "192.0.2.128/25").returncode == 0
    out = mailgate(config, "forget", "192.0.2.7")
    assert out.returncode == 0, out.stderr
    assert "forgot 192.0.2.7/32: 2 triplets, 1 auto-allowlist entries, 0 allow" in out.stdout
    remaining = [raw.hget(k, "net") for k in raw.scan_iter("mailgate:gl:t:*")]
    assert remaining == ["198.51.100.0/24"]
    assert not raw.exists("mailgate:gl:awl:192.0.2.0/24")
    wide = mailgate(config, "forget", "192.0.0.0/16")
    assert "0 triplets, 0 auto-allowlist entries, 1 allow entries" in wide.stdout
    # Forgotten: the next message from there is greylisted again.
    r = await rcpt(store, policy, "192.0.2.1", "a@example.test", now=T0 + 500)
    assert r.data["outcome"] == "new"


async def test_forget_a_host_keeps_a_wider_allow_entry_and_says_so(
    config: Path, raw: redis.Redis
) -> None:
    """``allow 192.0.2.0/24`` was made for 256 hosts: forgetting one of them keeps it
    (and names it), forgetting the /24 itself or a wider network removes it."""
    assert mailgate(config, "allow", "192.0.2.0/24").returncode == 0
    assert mailgate(config, "allow", "192.0.2.7").returncode == 0
    out = mailgate(config, "forget", "192.0.2.7")
    assert out.returncode == 0, out.stderr
    assert "1 allow entries" in out.stdout
    assert "still allowed by the wider entry 192.0.2.0/24" in out.stdout
    assert raw.hkeys("mailgate:gl:allow") == ["net:192.0.2.0/24"]
    out = mailgate(config, "forget", "192.0.2.0/24")
    assert "1 allow entries" in out.stdout and "still allowed" not in out.stdout
    assert raw.hkeys("mailgate:gl:allow") == []


async def test_forget_a_domain_removes_its_pool_triplets_and_allow_entry(
    config: Path, store: Store, policy: Policy, raw: redis.Redis
) -> None:
    await rcpt(store, policy, "192.0.2.1", spf_domain="example.net")
    assert mailgate(config, "allow", "example.net").returncode == 0
    out = mailgate(config, "forget", "example.net")
    assert out.returncode == 0, out.stderr
    assert "1 triplets, 0 auto-allowlist entries, 1 allow entries" in out.stdout
    assert raw.dbsize() == 0


async def test_forget_a_domain_covers_its_subdomains_as_allow_does(
    config: Path, store: Store, policy: Policy, raw: redis.Redis
) -> None:
    """``allow example.net`` spares mail.example.net too; ``forget example.net`` must
    clear what mail.example.net left behind as well, and nothing of the parent or of
    look-alike names."""
    await rcpt(store, policy, "192.0.2.1", spf_domain="mail.example.net")
    await rcpt(store, policy, "192.0.2.2", spf_domain="badexample.net")
    await rcpt(store, policy, "192.0.2.3", spf_domain="net.example.org")
    for name in ("mail.example.net", "badexample.net"):
        assert mailgate(config, "allow", name).returncode == 0
    out = mailgate(config, "forget", "example.net")
    assert out.returncode == 0, out.stderr
    assert "1 triplets, 0 auto-allowlist entries, 1 allow entries" in out.stdout
    assert sorted(e.field for e in await store.allow_entries()) == ["domain:badexample.net"]
    assert len(await store.triplets()) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("allow", "not an address!"), "not an IP address"),
        (("allow", "192.0.2.1/24"), "did you mean 192.0.2.0/24"),
        (("allow", "0.0.0.0/4"), "wider than /8"),
        (("allow", "192.0.2.1", "--ttl", "soon"), "duration"),
        (("allow", "192.0.2.1", "--ttl", "0"), "positive"),
        (("forget", "10.0.0.1/8"), "host bits"),
        (("show", "--limit", "0"), "at least 1"),
    ],
)
def test_bad_input_exits_2(config: Path, args: tuple[str, ...], needle: str) -> None:
    out = mailgate(config, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr


def test_bad_policy_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[redis]\nurl = "memcached://x"\n')
    out = mailgate(config, "stats")
    assert out.returncode == 2 and "redis.url" in out.stderr


@pytest.mark.parametrize(
    "args", [("stats",), ("show",), ("allow", "192.0.2.1"), ("forget", "192.0.2.1")]
)
def test_store_down_exits_1_with_a_message(tmp_path: Path, args: tuple[str, ...]) -> None:
    config = write_config(tmp_path, "redis://127.0.0.1:1/0")
    out = mailgate(config, *args)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "store error" in out.stderr and "Traceback" not in out.stderr
