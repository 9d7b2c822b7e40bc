"""The list checks with real files, loaded through the policy loader like a reload does.

Each test writes a main policy and its list files under ``tmp_path``; relative paths
in ``[lists]`` resolve against the main file's directory, never the working directory.
The last tests run a real mailgate process: 550 at RCPT, and SIGHUP picking up (or
refusing) a changed list file.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from filter import replies
from filter.checks import Context
from filter.checks.lists import ListsCheck, RecipientListsCheck, list_checks
from filter.lists import clear_cache
from filter.model import ClientInfo, Envelope, Recipient, Stage
from filter.pipeline import Pipeline
from filter.policy import PolicyError, load_policy
from filter.policy.schema import Policy
from filter.results import Action, CheckResult, Symbol
from filter.verdict import decide
from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.upstream import ScriptedUpstream

LISTS = {
    "allow-clients.txt": "192.0.2.10   # the exception in the blocked /24\nfriend.example\n",
    "block-clients.txt": "192.0.2.0/24\n2001:db8:bad::/48\n.dyn.example.net\n",
    "allow-senders.txt": "boss@partner.example\n",
    "block-senders.txt": "@spam.example\npartner.example  # all of it, but boss@ above\n",
    "block-recipients.txt": "old-sales@example.test\n",
}
TABLE = """
[lists]
allow_clients = "lists/allow-clients.txt"
block_clients = "lists/block-clients.txt"
allow_senders = "lists/allow-senders.txt"
block_senders = "lists/block-senders.txt"
block_recipients = "lists/block-recipients.txt"
"""


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def write_policy(root: Path, table: str = TABLE, lists: dict[str, str] | None = None) -> Path:
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for name, text in (LISTS if lists is None else lists).items():
        (root / "lists" / name).write_text(text)
    main = root / "mailgate.toml"
    main.write_text(table)
    return main


def spf(result: str, domain: str) -> CheckResult:
    return CheckResult(
        "spf",
        result,
        (Symbol(f"SPF_{result.upper()}", 0.0),),
        None,
        {"identity": "mailfrom", "domain": domain},
    )


def ctx(
    policy: Policy,
    ip: str = "198.51.100.1",
    mail_from: str = "someone@example.org",
    hostname: str | None = None,
    rcpt: str | None = None,
    results: dict[str, CheckResult] | None = None,
) -> Context:
    return Context(
        client=ClientInfo(ip=ip, port=4000, session_id="S1", hostname=hostname),
        policy=policy,
        results=dict(results or {}),
        envelope=Envelope(mail_from=mail_from),
        recipient=Recipient(rcpt) if rcpt else None,
    )


def checks_of(policy: Policy) -> tuple[ListsCheck, RecipientListsCheck]:
    found = list_checks(policy)
    assert [c.name for c in found] == ["lists", "lists_rcpt"]
    assert isinstance(found[0], ListsCheck) and isinstance(found[1], RecipientListsCheck)
    return found[0], found[1]


def names(result: CheckResult) -> dict[str, float]:
    return {s.name: s.score for s in result.symbols}


# --- loading ----------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_policy_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = write_policy(tmp_path / "etc")
    monkeypatch.chdir(tmp_path)  # not the policy's directory: must not matter
    policy = load_policy(Path("etc") / "mailgate.toml").policy
    assert policy.lists.block_clients == str(tmp_path / "etc" / "lists" / "block-clients.txt")
    assert all(Path(p).is_absolute() for _, p in policy.lists.files())
    # An absolute path stays as written; a drop-in's relative path still means the main dir.
    (tmp_path / "etc" / "local.d").mkdir()
    (tmp_path / "etc" / "local.d" / "10-lists.toml").write_text(
        f'[lists]\nallow_clients = "{tmp_path / "etc" / "lists" / "allow-clients.txt"}"\n'
        'block_recipients = "lists/block-recipients.txt"\n'
    )
    again = load_policy(main).policy
    assert again.lists.allow_clients == str(tmp_path / "etc" / "lists" / "allow-clients.txt")
    assert again.lists.block_recipients == str(tmp_path / "etc" / "lists" / "block-recipients.txt")


def test_a_broken_list_file_refuses_the_policy_with_file_and_line(tmp_path: Path) -> None:
    lists = dict(LISTS)
    lists["block-clients.txt"] = "# fine\n192.0.2.0/24\n198.51.100.1/24   # typo\n"
    lists["allow-senders.txt"] = "boss@partner.example\n<>\n"
    main = write_policy(tmp_path, lists=lists)
    with pytest.raises(PolicyError) as info:
        load_policy(main)
    issues = [str(i) for i in info.value.issues]
    block = tmp_path / "lists" / "block-clients.txt"
    allow = tmp_path / "lists" / "allow-senders.txt"
    assert issues == [
        f"{main}: lists.block_clients: {block}:3: 198.51.100.1/24 has host bits set; "
        "did you mean 198.51.100.0/24?",
        f"{main}: lists.allow_senders: {allow}:2: the null sender <> cannot be listed",
    ]


def test_a_missing_list_file_refuses_the_policy(tmp_path: Path) -> None:
    main = write_policy(tmp_path, lists={})
    (tmp_path / "local.d").mkdir()
    dropin = tmp_path / "local.d" / "50-x.toml"
    dropin.write_text('[lists]\nblock_senders = "nowhere.txt"\n')
    with pytest.raises(PolicyError) as info:
        load_policy(main)
    issues = [str(i) for i in info.value.issues]
    assert len(issues) == 5
    # Each issue names the file that set the key.
    assert f"{dropin}: lists.block_senders: cannot read {tmp_path / 'nowhere.txt'}" in issues[3]
    assert issues[0].startswith(f"{main}: lists.allow_clients: cannot read ")


def test_disabled_lists_are_neither_read_nor_checked(tmp_path: Path) -> None:
    main = write_policy(tmp_path, TABLE + "enabled = false\n", lists={})
    policy = load_policy(main).policy
    assert list_checks(policy) == []
    # No files named, or only empty ones: no checks either.
    assert list_checks(load_policy(write_policy(tmp_path / "none", "")).policy) == []
    empty = {name: "# nothing yet\n" for name in LISTS}
    assert list_checks(load_policy(write_policy(tmp_path / "empty", lists=empty)).policy) == []


# --- decisions --------------------------------------------------------------------------


async def test_block_and_allow_decisions(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path)).policy
    check, _ = checks_of(policy)
    assert (check.stage, check.needs) == (Stage.MAIL, ("spf",))

    r = await check.run(ctx(policy, ip="192.0.2.77"))
    assert (r.result, names(r)) == ("fail", {"LIST_BLOCK_CLIENT": 10.0})
    assert r.decision is not None
    assert r.decision.action is Action.REJECT and r.decision.reply == replies.ACCESS_DENIED
    assert str(replies.ACCESS_DENIED) == "550 5.7.1 Access denied"
    assert "block-clients.txt:1 (192.0.2.0/24)" in r.decision.reason
    assert r.data["allowlisted"] is False

    # The allow entry is an exception to the wider block of the same pair.
    r = await check.run(ctx(policy, ip="192.0.2.10"))
    assert (r.result, names(r), r.decision) == ("pass", {"LIST_ALLOW_CLIENT": -10.0}, None)
    assert r.data["allowlisted"] is True
    assert set(r.data["matched"]) == {"allow_clients", "block_clients"}  # type: ignore[call-overload]

    r = await check.run(ctx(policy, ip="2001:db8:bad:1::9"))
    assert names(r) == {"LIST_BLOCK_CLIENT": 10.0}
    r = await check.run(ctx(policy, hostname="pool-7.dyn.example.net"))
    assert names(r) == {"LIST_BLOCK_CLIENT": 10.0}
    assert "(pool-7.dyn.example.net)" in str(r.data["reason"])
    r = await check.run(ctx(policy, hostname="mx.friend.example"))
    assert (r.result, names(r)) == ("pass", {"LIST_ALLOW_CLIENT": -10.0})
    r = await check.run(ctx(policy, hostname="evil-friend.example"))
    assert (r.result, names(r), r.data["allowlisted"]) == ("none", {}, False)

    r = await check.run(ctx(policy, mail_from="Offers+X@SPAM.example"))
    assert (r.result, names(r)) == ("fail", {"LIST_BLOCK_SENDER": 10.0})
    # Across pairs a block wins, and no allow symbol softens it.
    r = await check.run(ctx(policy, ip="192.0.2.10", mail_from="x@spam.example"))
    assert (r.result, names(r)) == ("fail", {"LIST_BLOCK_SENDER": 10.0})
    r = await check.run(ctx(policy, ip="192.0.2.99", mail_from="boss@partner.example"))
    assert names(r) == {"LIST_BLOCK_CLIENT": 10.0}

    # The null sender is on no list.
    r = await check.run(ctx(policy, mail_from=""))
    assert (r.result, r.decision) == ("none", None)


async def test_sender_allow_needs_spf_for_the_sender_domain(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path)).policy
    check, _ = checks_of(policy)
    boss = "boss@partner.example"
    # Without SPF the allow entry does not count, so partner.example's block applies.
    for results in ({}, {"spf": spf("softfail", "partner.example")}):
        r = await check.run(ctx(policy, mail_from=boss, results=results))
        assert names(r) == {"LIST_BLOCK_SENDER": 10.0}
    r = await check.run(
        ctx(policy, mail_from=boss, results={"spf": spf("pass", "partner.example")})
    )
    assert (r.result, names(r)) == ("pass", {"LIST_ALLOW_SENDER": -10.0})
    assert r.data["allowlisted"] is True
    # An SRS address unwraps to boss@, but SPF vouched for the forwarder only.
    srs = "SRS0=abcd=TT=partner.example=boss@forwarder.test"
    r = await check.run(ctx(policy, mail_from=srs, results={"spf": spf("pass", "forwarder.test")}))
    assert (r.result, names(r)) == ("fail", {"LIST_BLOCK_SENDER": 10.0})

    # Only the allow list: a match without SPF says why it did not count.
    main = write_policy(
        tmp_path / "only",
        '[lists]\nallow_senders = "lists/allow-senders.txt"\n',
    )
    only = load_policy(main).policy
    (check,) = list_checks(only)  # type: ignore[assignment]
    r = await check.run(ctx(only, mail_from=boss))
    assert (r.result, names(r), r.data["allowlisted"]) == ("none", {}, False)
    assert "SPF did not pass" in str(r.data["reason"])

    # Switched off, the MAIL FROM is trusted as written and SPF is not waited for.
    lax = write_policy(
        tmp_path / "lax",
        '[lists]\nallow_senders = "lists/allow-senders.txt"\nallow_senders_require_spf = false\n',
    )
    lax_policy = load_policy(lax).policy
    (check,) = list_checks(lax_policy)  # type: ignore[assignment]
    assert check.needs == ()
    r = await check.run(ctx(lax_policy, mail_from=boss))
    assert names(r) == {"LIST_ALLOW_SENDER": -10.0}


async def test_recipients_are_refused_one_by_one(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path)).policy
    _, check = checks_of(policy)
    assert (check.stage, check.needs) == (Stage.RCPT, ())
    r = await check.run(ctx(policy, rcpt="Old-Sales+x@Example.test"))
    assert (r.result, names(r)) == ("fail", {"LIST_BLOCK_RECIPIENT": 10.0})
    assert r.decision is not None and r.decision.reply == replies.ACCESS_DENIED
    verdict = decide([r], policy, Stage.RCPT)
    assert (verdict.action, verdict.reply) == (Action.REJECT, replies.ACCESS_DENIED)
    r = await check.run(ctx(policy, rcpt="sales@example.test"))
    assert (r.result, r.decision) == ("none", None)
    assert decide([r], policy, Stage.RCPT).action is Action.ACCEPT


async def test_pipeline_waits_for_spf_and_monitor_mode_only_logs(tmp_path: Path) -> None:
    main = write_policy(tmp_path)
    policy = load_policy(main).policy
    check, rcpt = checks_of(policy)

    class FakeSPF:
        name = "spf"
        stage = Stage.MAIL
        needs: tuple[str, ...] = ()

        async def run(self, ctx: Context) -> CheckResult:
            return spf("pass", "partner.example")

    pipeline = Pipeline([check, rcpt, FakeSPF()], timeout=5.0)
    c = ctx(policy, mail_from="boss@partner.example")
    results = await pipeline.run(Stage.MAIL, c)
    assert [r.check for r in results] == ["spf", "lists"]
    assert names(results[1]) == {"LIST_ALLOW_SENDER": -10.0}

    with main.open("a") as fh:
        fh.write('mode = "monitor"\n')
    monitor = load_policy(main).policy
    blocked = await check.run(ctx(monitor, ip="192.0.2.1"))
    verdict = decide([blocked], monitor, Stage.RCPT)
    assert verdict.action is Action.ACCEPT and verdict.would is Action.REJECT


async def test_reload_reads_a_changed_file_and_old_checks_keep_theirs(tmp_path: Path) -> None:
    main = write_policy(tmp_path)
    old_check, _ = checks_of(load_policy(main).policy)
    path = tmp_path / "lists" / "block-clients.txt"
    path.write_text("203.0.113.0/24\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    policy = load_policy(main).policy
    new_check, _ = checks_of(policy)
    assert names(await new_check.run(ctx(policy, ip="203.0.113.5"))) == {"LIST_BLOCK_CLIENT": 10.0}
    assert names(await new_check.run(ctx(policy, ip="192.0.2.77"))) == {}
    # A session that started before the reload keeps the lists it started with.
    assert names(await old_check.run(ctx(policy, ip="192.0.2.77"))) == {"LIST_BLOCK_CLIENT": 10.0}
    # Unchanged files are not parsed again.
    assert new_check.lists.allow_clients is old_check.lists.allow_clients


# --- a real mailgate process -------------------------------------------------------------


def _lists_policy(root: Path) -> dict[str, object]:
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "lists" / "block-senders.txt").write_text("@spam.example\n")
    (root / "lists" / "block-recipients.txt").write_text("gone@example.test\n")
    return {
        "lists": {
            "block_senders": "lists/block-senders.txt",
            "block_recipients": "lists/block-recipients.txt",
        },
        # Nothing else may refuse these test messages.
        "rdns": {"enabled": False},
        "helo": {"enabled": False},
        "dnsbl": {"enabled": False},
        "spf": {"enabled": False},
    }


def test_smtp_refusals_and_sighup_reload(
    tmp_path: Path, mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    # The rig writes the policy into <tmp_path>/mg0; the lists live next to it.
    mg = mailgate(_lists_policy(tmp_path / "mg0"))
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("a@example.org")
        assert c.rcpt("gone@example.test") == (550, b"5.7.1 Access denied")
        assert c.rcpt("bob@example.test")[0] == 250  # the other recipient goes on
        assert c.data(message())[0] == 250
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    assert r.cmd("MAIL FROM:<x@spam.example>").code == 250  # refused at RCPT, logged
    reply = r.cmd("RCPT TO:<bob@example.test>")
    assert (reply.code, reply.text) == (550, "5.7.1 Access denied")
    r.close()
    logs = mg.logs()
    assert "block-senders.txt:1 (@spam.example)" in logs
    assert "block-recipients.txt:1 (gone@example.test)" in logs

    # A changed file is read on SIGHUP.
    lists = tmp_path / "mg0" / "lists" / "block-senders.txt"
    lists.write_text("@other.example\n")
    mg.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("x@spam.example")
        assert c.rcpt("bob@example.test")[0] == 250
        c.rset()
        c.mail("x@other.example")
        assert c.rcpt("bob@example.test")[0] == 550

    # A broken file refuses the reload with file:line; the lists in force stay.
    lists.write_text("@other.example\nnot an entry\n")
    mg.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    logs = mg.logs()
    assert "policy reload refused" in logs
    assert f"{lists}:2: one entry per line" in logs
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("x@other.example")
        assert c.rcpt("bob@example.test")[0] == 550
