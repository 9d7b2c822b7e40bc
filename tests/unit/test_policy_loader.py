"""Loading policy files: local.d merging, error origins, the shipped file, TOML output."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from filter.policy import (
    DEFAULT_POLICY,
    PolicyError,
    PolicyIssue,
    build_policy,
    default_config_path,
    load_policy,
    loader,
    render_toml,
)
from filter.policy.loader import merge_into, origin_of
from filter.policy.schema import DNSBLZone, schema_keys
from filter.units import Address

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "policies" / "mailgate.toml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _issues(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == "\n".join(str(i) for i in info.value.issues)
    return [str(i) for i in info.value.issues]


# --- the shipped file -----------------------------------------------------------


def test_shipped_policy_equals_the_schema_defaults() -> None:
    loaded = load_policy(SHIPPED)
    assert loaded.policy == DEFAULT_POLICY
    assert render_toml(loaded.policy, changed_only=True) == ""


def test_shipped_policy_mentions_every_schema_key() -> None:
    raw = tomllib.loads(SHIPPED.read_text())
    missing = []
    for key in schema_keys():
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert missing == []
    # Arrays of tables: the shipped entry shows every key an entry can have.
    assert set(raw["dnsbl"]["zones"][0]) == {f.name for f in dataclasses.fields(DNSBLZone)}


def test_shipped_drop_in_folder_has_no_policy_files() -> None:
    # The README must not be read as a drop-in, and nothing else may change the defaults.
    assert list((REPO / "policies" / "local.d").glob("*.toml")) == []
    assert (REPO / "policies" / "local.d" / "README").is_file()
    assert (REPO / "policies" / "lists" / "README").is_file()


# --- merging --------------------------------------------------------------------


def test_local_d_merges_in_name_order_tables_key_by_key(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", '[server]\nmode = "enforce"\nmax_recipients = 50\n')
    _write(tmp_path / "local.d" / "20-b.toml", "[server]\nmax_recipients = 30\n")
    _write(tmp_path / "local.d" / "10-a.toml", '[server]\nmax_recipients = 20\nmode = "monitor"\n')
    _write(tmp_path / "local.d" / "README", "not toml [")
    _write(tmp_path / "local.d" / ".10-a.toml.swp.toml", "not toml [")
    _write(tmp_path / "local.d" / "x.toml.disabled", "not toml [")
    loaded = load_policy(main)
    assert loaded.policy.server.mode == "monitor"
    assert loaded.policy.server.max_recipients == 30
    assert [p.name for p in loaded.files] == ["mailgate.toml", "10-a.toml", "20-b.toml"]
    assert loaded.merged["server"] == {"mode": "monitor", "max_recipients": 30}


def test_arrays_and_arrays_of_tables_replace(tmp_path: Path) -> None:
    main = _write(
        tmp_path / "mailgate.toml",
        '[server]\nlisten = ["0.0.0.0:25", "[::]:25"]\n'
        '[[dnsbl.zones]]\nzone = "a.example"\n[[dnsbl.zones]]\nzone = "b.example"\n',
    )
    _write(
        tmp_path / "local.d" / "site.toml",
        '[server]\nlisten = ["127.0.0.1:10024"]\n[[dnsbl.zones]]\nzone = "c.example"\nscore = 2\n',
    )
    policy = load_policy(main).policy
    assert policy.server.listen == (Address("127.0.0.1", 10024),)
    assert policy.dnsbl.zones == (DNSBLZone("c.example", 2.0, False),)


def test_local_d_files_are_read_in_byte_order_of_their_names(tmp_path: Path) -> None:
    # As `ls` in the C locale lists them. A name that is not UTF-8 (\xff) sorts after
    # every UTF-8 one in bytes, but before U+E000 as a Python str (surrogate escape).
    main = _write(tmp_path / "mailgate.toml", "")
    local = tmp_path / "local.d"
    _write(local / "\ue000.toml", "[server]\nmax_recipients = 20\n")
    (local / os.fsdecode(b"\xff.toml")).write_text("[server]\nmax_recipients = 30\n")
    _write(local / "Z.toml", "[server]\nmax_recipients = 10\n")
    loaded = load_policy(main)
    assert [os.fsencode(p.name) for p in loaded.files[1:]] == [
        b"Z.toml",
        "\ue000.toml".encode(),
        b"\xff.toml",
    ]
    assert loaded.policy.server.max_recipients == 30


def test_empty_and_symlinked_drop_ins(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "")
    target = _write(tmp_path / "shared" / "site.toml", "[server]\nmax_recipients = 7\n")
    _write(tmp_path / "local.d" / "10-empty.toml", "")
    (tmp_path / "local.d" / "20-site.toml").symlink_to(target)
    (tmp_path / "local.d" / "30-dir.toml").mkdir()  # not a file: not a drop-in
    loaded = load_policy(main)
    assert loaded.policy.server.max_recipients == 7
    assert [p.name for p in loaded.files] == ["mailgate.toml", "10-empty.toml", "20-site.toml"]


def test_a_dangling_drop_in_symlink_is_an_error_not_skipped(tmp_path: Path) -> None:
    # The admin's override would silently not apply (a moved target, a typo in ln -s).
    main = _write(tmp_path / "mailgate.toml", "")
    link = tmp_path / "local.d" / "50-site.toml"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "gone.toml")
    (issue,) = _issues(main)
    assert issue == f"{link}: -: cannot read: No such file or directory"


def test_an_unreadable_local_d_is_an_error_not_an_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Path.glob swallows PermissionError: mailgate started on the shipped defaults.
    main = _write(tmp_path / "mailgate.toml", "")
    local = tmp_path / "local.d"
    local.mkdir()
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path) == local:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(loader.os, "scandir", scandir)
    assert _issues(main) == [f"{local}: -: cannot read: Permission denied"]


def test_a_local_d_that_is_not_a_folder_is_an_error(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "")
    local = _write(tmp_path / "local.d", "[server]\n")
    assert _issues(main) == [f"{local}: -: not a directory (drop-ins go in {local}/*.toml)"]


def test_a_missing_local_d_is_no_drop_ins(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "")
    assert load_policy(main).files == (main,)


MERGES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
    ({"a": {"x": [1, 2]}}, {"a": {"x": [3]}}, {"a": {"x": [3]}}),
    ({"a": {"t": {"x": 1}}}, {"a": {"t": {"y": 2}}}, {"a": {"t": {"x": 1, "y": 2}}}),
    ({"a": {"x": 1}}, {"b": {"x": 2}}, {"a": {"x": 1}, "b": {"x": 2}}),
    ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
    ({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}),
]


@pytest.mark.parametrize(("base", "override", "expected"), MERGES)
def test_merge_into(base: dict[str, Any], override: dict[str, Any], expected: Any) -> None:
    origins: dict[str, str] = {}
    merge_into(base, override, "f", origins)
    assert base == expected


def test_merge_does_not_alias_the_override() -> None:
    base: dict[str, Any] = {}
    override: dict[str, Any] = {"a": {"x": [1]}}
    merge_into(base, override, "f", {})
    base["a"]["x"].append(2)
    assert override == {"a": {"x": [1]}}


ORIGINS = {"": "main", "server": "l1", "server.mode": "l2", "dnsbl.zones": "l3"}


@pytest.mark.parametrize(
    ("key", "file"),
    [
        ("server.mode", "l2"),
        ("server.workers", "l1"),
        ("server.tls.cert_file", "l1"),
        ("dnsbl.zones[0].score", "l3"),
        ("dnsbl.enabled", "main"),
        ("actions", "main"),
    ],
)
def test_origin_of(key: str, file: str) -> None:
    assert origin_of(key, ORIGINS) == file


# --- errors ----------------------------------------------------------------------


def test_error_is_reported_against_the_file_that_set_the_value(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "[server]\nworkers = 2\n")
    local = _write(tmp_path / "local.d" / "50-site.toml", "[server]\nlistn = []\nworkers = 0\n")
    assert _issues(main) == [
        f'{local}: server.listn: unknown key (did you mean "listen"?)',
        f"{local}: server.workers: must be at least 1, got 0",
    ]


def test_error_in_the_main_file_names_the_main_file(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "[greylist]\ndelay = true\n")
    _write(tmp_path / "local.d" / "50-site.toml", "[greylist]\nenabled = false\n")
    (issue,) = _issues(main)
    assert issue.startswith(f"{main}: greylist.delay: expected a duration like")
    assert issue.endswith("got true")


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "[greylst]\nenabled = false\n")
    assert _issues(main) == [f'{main}: greylst: unknown key (did you mean "greylist"?)']


def test_syntax_errors_in_every_file_are_reported(tmp_path: Path) -> None:
    main = _write(tmp_path / "mailgate.toml", "[server]\nmode = \n")
    local = _write(tmp_path / "local.d" / "a.toml", "[server\n")
    issues = _issues(main)
    assert len(issues) == 2
    assert issues[0].startswith(f"{main}: -: TOML syntax error: ")
    assert "line 2" in issues[0]
    assert issues[1].startswith(f"{local}: -: TOML syntax error: ")


@pytest.mark.parametrize("text", ["a = " + "[" * 5000 + "]" * 5000, "a" + ".a" * 5000 + " = 1"])
def test_absurd_nesting_is_an_issue_not_a_traceback(tmp_path: Path, text: str) -> None:
    main = _write(tmp_path / "mailgate.toml", "")
    local = _write(tmp_path / "local.d" / "deep.toml", text + "\n")
    assert _issues(main) == [f"{local}: -: tables or arrays nested too deeply"]


def test_missing_main_file(tmp_path: Path) -> None:
    main = tmp_path / "nope.toml"
    (issue,) = _issues(main)
    assert issue.startswith(f"{main}: -: cannot read: ")


def test_tls_files_must_be_readable(tmp_path: Path) -> None:
    cert = _write(tmp_path / "cert.pem", "x")
    main = _write(
        tmp_path / "mailgate.toml",
        f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{tmp_path}/missing.pem"\n',
    )
    (issue,) = _issues(main)
    assert issue.startswith(f"{main}: server.tls.key_file: cannot read {tmp_path}/missing.pem")
    _write(tmp_path / "missing.pem", "k")
    assert load_policy(main).policy.server.tls.cert_file == str(cert)


def test_build_policy_without_origins() -> None:
    assert build_policy({}) == DEFAULT_POLICY
    with pytest.raises(PolicyError) as info:
        build_policy({"server": {"mode": "x"}, "dns": {"timeout": -1}})
    files = {i.file for i in info.value.issues}
    assert files == {"-"}
    assert [i.key for i in info.value.issues] == ["server.mode", "dns.timeout"]


def test_policy_issue_str() -> None:
    issue = PolicyIssue("a.toml", "server.max_recipients", "must be at least 1, got 0")
    assert str(issue) == "a.toml: server.max_recipients: must be at least 1, got 0"


# --- where the main file is ----------------------------------------------------------


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_CONFIG", "/etc/mailgate/mailgate.toml")
    assert default_config_path() == Path("/etc/mailgate/mailgate.toml")
    monkeypatch.delenv("MAILGATE_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == SHIPPED
    _write(tmp_path / "policies" / "mailgate.toml", "")
    assert default_config_path() == Path("policies/mailgate.toml")


def test_default_config_path_of_an_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No checkout beside the package (a wheel in site-packages): the contract's
    relative path, and a missing file says how to name one."""
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loader, "_REPO_POLICY", tmp_path / "site-packages/policies/x.toml")
    assert default_config_path() == Path("policies/mailgate.toml")
    with pytest.raises(PolicyError) as info:
        load_policy(default_config_path())
    assert str(info.value).startswith("policies/mailgate.toml: -: cannot read: No such file")
    assert "--config FILE or set $MAILGATE_CONFIG" in str(info.value)


def test_a_missing_file_named_by_the_environment_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "etc" / "mailgate.toml"
    monkeypatch.setenv("MAILGATE_CONFIG", str(missing))
    (issue,) = _issues(default_config_path())
    assert issue == (
        f"{missing}: -: cannot read: No such file or directory (the path $MAILGATE_CONFIG names)"
    )


# --- rendering ----------------------------------------------------------------------


def test_render_round_trips_the_defaults(tmp_path: Path) -> None:
    text = render_toml(DEFAULT_POLICY)
    assert 'max_message_size = "25MiB"' in text
    assert 'max_age = "35d"' in text
    assert "[[dnsbl.zones]]" in text
    main = _write(tmp_path / "mailgate.toml", text)
    assert load_policy(main).policy == DEFAULT_POLICY


CHANGES = """
[server]
listen = ["127.0.0.1:10024"]
hostname = "mx.example.org"
mode = "monitor"
max_message_size = "10MB"
command_timeout = 90
greet_pause = 0.25
xforward_hosts = ["127.0.0.1"]

[server.tls]
cert_file = "CERT"
key_file = "CERT"

[dns]
nameservers = ["192.0.2.53", "[2001:db8::53]:5353"]

[redis]
key_prefix = "mg:\\"quoted\\"\\\\:"

[actions]
reject = 12.5

[dnsbl]
zones = []

[greylist]
retry_window = "36h"

[scores]
SPF_FAIL = 3
DNSBL_ZEN_SBL = -0.5
"""


def test_render_round_trips_changes(tmp_path: Path) -> None:
    cert = _write(tmp_path / "cert.pem", "x")
    main = _write(tmp_path / "mailgate.toml", CHANGES.replace("CERT", str(cert)))
    policy = load_policy(main).policy
    assert policy.redis.key_prefix == 'mg:"quoted"\\:'
    for changed_only in (False, True):
        again = _write(
            tmp_path / f"again{changed_only}" / "m.toml", render_toml(policy, changed_only)
        )
        assert load_policy(again).policy == policy


def test_render_changed_only_is_like_postconf_n(tmp_path: Path) -> None:
    cert = _write(tmp_path / "cert.pem", "x")
    main = _write(tmp_path / "mailgate.toml", CHANGES.replace("CERT", str(cert)))
    text = render_toml(load_policy(main).policy, changed_only=True)
    assert tomllib.loads(text) == {
        "server": {
            "listen": ["127.0.0.1:10024"],
            "hostname": "mx.example.org",
            "mode": "monitor",
            "max_message_size": "10MB",
            "command_timeout": "90s",
            "greet_pause": "0.25s",
            "xforward_hosts": ["127.0.0.1/32"],
            "tls": {"cert_file": str(cert), "key_file": str(cert)},
        },
        "dns": {"nameservers": ["192.0.2.53", "[2001:db8::53]:5353"]},
        "redis": {"key_prefix": 'mg:"quoted"\\:'},
        "actions": {"reject": 12.5},
        "dnsbl": {"zones": []},
        "greylist": {"retry_window": "36h"},
        "scores": {"SPF_FAIL": 3.0, "DNSBL_ZEN_SBL": -0.5},
    }
    assert "[upstream]" not in text
    assert "[spf]" not in text


def test_render_only_a_subtable_changed() -> None:
    policy = build_policy({"server": {"tls": {"cert_file": "/dev/null", "key_file": "/dev/null"}}})
    text = render_toml(policy, changed_only=True)
    assert text.startswith("[server.tls]\n")
    assert "\n[server]\n" not in text
    assert tomllib.loads(text)["server"]["tls"]["key_file"] == "/dev/null"


@pytest.mark.parametrize(
    "text", ["plain", 'q"uote', "back\\slash", "tab\there", "nl\nx", "\x01\x7f", "é ü"]
)
def test_rendered_strings_read_back(text: str) -> None:
    from filter.policy.render import _string

    assert tomllib.loads(f"v = {_string(text)}")["v"] == text
