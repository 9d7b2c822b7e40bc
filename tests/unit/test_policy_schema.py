"""Schema validation: typed values from TOML data, every problem reported with its dotted key."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from filter.policy.schema import (
    DEFAULT_POLICY,
    DEFAULT_SCORES,
    KIND,
    KNOWN_SYMBOLS,
    PIPELINE_CHECKS,
    DNSBLZone,
    Policy,
    policy_from_dict,
    schema_keys,
    to_toml_data,
)
from filter.units import Address


def _valid(data: dict[str, Any]) -> Policy:
    policy, problems = policy_from_dict(data)
    assert problems == []
    assert policy is not None
    return policy


def _problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    policy, problems = policy_from_dict(data)
    assert policy is None
    return problems


def test_empty_data_gives_the_defaults() -> None:
    assert _valid({}) == DEFAULT_POLICY == Policy()


def test_defaults_match_the_contract() -> None:
    p = DEFAULT_POLICY
    assert p.server.listen == (Address("0.0.0.0", 25), Address("::", 25))
    assert p.server.mode == "enforce"
    assert p.server.trusted_networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert p.server.max_message_size == 25 * 1024 * 1024
    assert p.server.command_timeout == 300.0
    assert p.server.shutdown_grace == 30.0
    assert p.server.workers == 1
    assert p.server.tls.cert_file == p.server.tls.key_file == ""
    assert p.upstream.address == Address("127.0.0.1", 10025)
    assert p.upstream.timeout == 120.0
    assert p.dns.nameservers == ()
    assert p.redis.on_error == "accept"
    assert p.metrics.listen == Address("127.0.0.1", 9464)
    assert (p.actions.reject, p.actions.add_header, p.actions.greylist) == (15.0, 6.0, 4.0)
    assert p.dnsbl.zones == (DNSBLZone("zen.spamhaus.org", 10.0, True),)
    assert p.greylist.delay == 300.0
    assert p.greylist.retry_window == 2 * 86400.0
    assert p.greylist.max_age == 35 * 86400.0
    assert (p.greylist.ipv4_prefix, p.greylist.ipv6_prefix) == (24, 64)
    # Contract: a pass is a small negative; SPF + DKIM + DMARC passing sum to >= -2.
    passes = [p.score(n) for n in ("SPF_PASS", "DKIM_PASS", "DMARC_PASS")]
    assert all(-2.0 <= x < 0 for x in passes) and sum(passes) >= -2.0
    assert p.score("SPF_FAIL") > 0 and p.score("DKIM_FAIL") > 0
    assert p.spf.reject_on_fail is False  # DMARC decides by default
    assert p.dmarc.honor_reject and p.dmarc.standard == "rfc9989"
    assert p.dmarc.on_temperror == "tempfail"


def test_every_field_declares_its_kind() -> None:
    def walk(cls: type[Any]) -> None:
        for f in dataclasses.fields(cls):
            assert KIND in f.metadata, f"{cls.__name__}.{f.name} has no kind"
            kind = f.metadata[KIND]
            if hasattr(kind, "cls"):
                walk(kind.cls)

    walk(Policy)


VALID: list[tuple[dict[str, Any], str, Any]] = [
    ({"server": {"listen": ["127.0.0.1:10024"]}}, "server.listen", (Address("127.0.0.1", 10024),)),
    ({"server": {"hostname": "mx.example.org"}}, "server.hostname", "mx.example.org"),
    ({"server": {"mode": "monitor"}}, "server.mode", "monitor"),
    ({"server": {"max_message_size": "10MB"}}, "server.max_message_size", 10_000_000),
    ({"server": {"max_message_size": 1000}}, "server.max_message_size", 1000),
    ({"server": {"command_timeout": 60}}, "server.command_timeout", 60.0),
    ({"server": {"greet_pause": "1s"}}, "server.greet_pause", 1.0),
    (
        {"server": {"xforward_hosts": ["127.0.0.1"]}},
        "server.xforward_hosts",
        (ipaddress.ip_network("127.0.0.1/32"),),
    ),
    ({"upstream": {"address": "localhost:10025"}}, "upstream.address", Address("localhost", 10025)),
    (
        {"dns": {"nameservers": ["192.0.2.53", "[2001:db8::53]:5353", "::1"]}},
        "dns.nameservers",
        (Address("192.0.2.53", 53), Address("2001:db8::53", 5353), Address("::1", 53)),
    ),
    ({"redis": {"url": "unix:///run/redis.sock"}}, "redis.url", "unix:///run/redis.sock"),
    ({"redis": {"url": "rediss://r.example:6380/1"}}, "redis.url", "rediss://r.example:6380/1"),
    (
        {"redis": {"url": "redis+sentinel://s1:26379/mymaster"}},
        "redis.url",
        "redis+sentinel://s1:26379/mymaster",
    ),
    ({"actions": {"reject": 20}}, "actions.reject", 20.0),
    ({"actions": {"greylist": 6, "add_header": 6, "reject": 6}}, "actions.add_header", 6.0),
    ({"dnsbl": {"zones": []}}, "dnsbl.zones", ()),
    (
        {"dnsbl": {"zones": [{"zone": "bl.example"}]}},
        "dnsbl.zones",
        (DNSBLZone("bl.example", 0.0, False),),
    ),
    ({"greylist": {"apply": "score"}}, "greylist.apply", "score"),
    ({"logging": {"format": "json", "level": "debug"}}, "logging.format", "json"),
    ({"auth": {"authserv_id": "mx.example.org"}}, "auth.authserv_id", "mx.example.org"),
]


@pytest.mark.parametrize(("data", "key", "expected"), VALID)
def test_valid_values(data: dict[str, Any], key: str, expected: Any) -> None:
    value: Any = _valid(data)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"server": {"listn": []}}, "server.listn", 'unknown key (did you mean "listen"?)'),
    ({"sever": {}}, "sever", 'unknown key (did you mean "server"?)'),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"server": 1}, "server", "expected a table, got 1"),
    ({"server": {"listen": "0.0.0.0:25"}}, "server.listen", 'expected an array, got "0.0.0.0:25"'),
    ({"server": {"listen": []}}, "server.listen", "needs at least 1 entry"),
    ({"server": {"listen": ["0.0.0.0"]}}, "server.listen[0]", "missing port"),
    (
        {"server": {"listen": ["[::]:25", "[::]:25"]}},
        "server.listen[1]",
        '"[::]:25" is listed twice',
    ),
    ({"server": {"hostname": "mx example"}}, "server.hostname", "expected a host name"),
    ({"server": {"mode": "enforcing"}}, "server.mode", '(did you mean "enforce"?)'),
    ({"server": {"mode": 1}}, "server.mode", 'expected one of "enforce", "monitor", got 1'),
    (
        {"server": {"trusted_networks": ["10.0.0.1/8"]}},
        "server.trusted_networks[0]",
        "did you mean",
    ),
    ({"server": {"max_message_size": "25M"}}, "server.max_message_size", "ambiguous"),
    ({"server": {"max_message_size": 0}}, "server.max_message_size", "must be at least 1, got 0"),
    ({"server": {"max_recipients": 0}}, "server.max_recipients", "must be at least 1, got 0"),
    ({"server": {"max_recipients": 1.0}}, "server.max_recipients", "expected an integer, got 1.0"),
    (
        {"server": {"max_recipients": True}},
        "server.max_recipients",
        "expected an integer, got true",
    ),
    ({"server": {"workers": 1000}}, "server.workers", "must be at most 256"),
    (
        {"server": {"command_timeout": True}},
        "server.command_timeout",
        'expected a duration like "90s"',
    ),
    ({"server": {"command_timeout": 0}}, "server.command_timeout", "must be at least 1s, got 0s"),
    ({"server": {"greet_pause": "2m"}}, "server.greet_pause", "must be at most 1m, got 2m"),
    (
        {"server": {"proxy_protocol": "yes"}},
        "server.proxy_protocol",
        'expected true or false, got "yes"',
    ),
    ({"server": {"tls": {"cert_file": "/c.pem"}}}, "server.tls.key_file", "must be set together"),
    ({"server": {"tls": {"key_file": "/k.pem"}}}, "server.tls.cert_file", "must be set together"),
    ({"server": {"tls": {"crt_file": "x"}}}, "server.tls.crt_file", "did you mean"),
    (
        {"server": {"command_timeout": "10m", "session_timeout": "5m"}},
        "server.session_timeout",
        "must be at least command_timeout",
    ),
    ({"upstream": {"address": "127.0.0.1"}}, "upstream.address", "missing port"),
    ({"dns": {"nameservers": ["ns.example.org"]}}, "dns.nameservers[0]", "expected an IP address"),
    ({"dns": {"timeout": "2m"}}, "dns.timeout", "must be at most 1m"),
    ({"redis": {"url": "http://x"}}, "redis.url", "expected a redis://"),
    ({"redis": {"url": ""}}, "redis.url", "must not be empty"),
    # Shapes redis-py takes but cannot use: serve crashed at start, or a reload left a
    # store that failed every call (greylisting silently off).
    ({"redis": {"url": "redis://127.0.0.1:99999/0"}}, "redis.url", "port out of range"),
    ({"redis": {"url": "redis://r:6379/0?sockettimeout=5"}}, "redis.url", "'sockettimeout'"),
    ({"redis": {"url": "redis://r:6379/xx"}}, "redis.url", "'xx' is not a number"),
    ({"redis": {"url": "redis+cluster://n1:7000?x=1"}}, "redis.url", "unknown option 'x'"),
    ({"redis": {"url": "redis+sentinel://s1/m/x"}}, "redis.url", "'x' is not a number"),
    ({"redis": {"on_error": "reject"}}, "redis.on_error", 'expected one of "accept", "tempfail"'),
    ({"auth": {"authserv_id": "a; b"}}, "auth.authserv_id", "expected a token"),
    ({"actions": {"reject": "high"}}, "actions.reject", 'expected a number, got "high"'),
    ({"actions": {"reject": 5.0}}, "actions", "greylist <= add_header <= reject"),
    ({"actions": {"greylist": 7.0}}, "actions", "greylist = 7.0"),
    ({"dmarc": {"honor_reject": 1}}, "dmarc.honor_reject", "expected true or false, got 1"),
    ({"dnsbl": {"zones": {"zone": "x"}}}, "dnsbl.zones", "expected an array of tables"),
    ({"dnsbl": {"zones": [{"score": 1.0}]}}, "dnsbl.zones[0].zone", "required key is missing"),
    ({"dnsbl": {"zones": [{"zone": "x", "scor": 1}]}}, "dnsbl.zones[0].scor", "did you mean"),
    ({"dnsbl": {"zones": [{"zone": "bl..x"}]}}, "dnsbl.zones[0].zone", "expected a DNS zone name"),
    (
        {"dnsbl": {"zones": [{"zone": "bl.x"}, {"zone": "BL.x"}]}},
        "dnsbl.zones[1].zone",
        "listed twice",
    ),
    ({"greylist": {"delay": "3d"}}, "greylist.delay", "shorter than retry_window"),
    ({"greylist": {"max_age": "1d"}}, "greylist.max_age", "at least retry_window"),
    ({"greylist": {"ipv4_prefix": 33}}, "greylist.ipv4_prefix", "must be at most 32"),
    ({"logging": {"level": "warn"}}, "logging.level", '(did you mean "warning"?)'),
    ({"scores": {"spf_pass": -1.0}}, "scores.spf_pass", "upper case"),
    ({"scores": {"SPF_PASS": "-1"}}, "scores.SPF_PASS", "expected a number"),
    ({"scores": []}, "scores", "expected a table"),
]


@pytest.mark.parametrize(("data", "key", "message"), INVALID)
def test_invalid_values(data: dict[str, Any], key: str, message: str) -> None:
    problems = _problems(data)
    assert [k for k, _ in problems] == [key], problems
    assert message in problems[0][1]


def test_all_problems_are_reported_not_just_the_first() -> None:
    problems = _problems(
        {
            "server": {"mode": "x", "workers": 0, "listn": []},
            "greylist": {"delay": "soon"},
            "nope": {},
        }
    )
    assert {k for k, _ in problems} == {
        "server.mode",
        "server.workers",
        "server.listn",
        "greylist.delay",
        "nope",
    }


def test_scores_lay_over_defaults_and_score_lookup() -> None:
    policy = _valid({"scores": {"SPF_FAIL": 3, "DNSBL_ZEN_SBL": 10.5}})
    assert dict(policy.scores) == {**DEFAULT_SCORES, "SPF_FAIL": 3.0, "DNSBL_ZEN_SBL": 10.5}
    assert policy.score("SPF_PASS") == DEFAULT_SCORES["SPF_PASS"]
    assert policy.score("SPF_FAIL") == 3.0
    assert policy.score("UNKNOWN") == 0.0
    assert policy.score("UNKNOWN", 1.5) == 1.5


def test_policy_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.server.mode = "monitor"  # type: ignore[misc]
    with pytest.raises(TypeError):
        DEFAULT_POLICY.scores["X"] = 1.0  # type: ignore[index]


def test_effective_hostname_and_authserv_id() -> None:
    policy = _valid({"server": {"hostname": "mx.example.org"}})
    assert policy.server.effective_hostname == "mx.example.org"
    assert policy.authserv_id == "mx.example.org"
    policy = _valid({"server": {"hostname": "mx.example.org"}, "auth": {"authserv_id": "ex.org"}})
    assert policy.authserv_id == "ex.org"
    assert DEFAULT_POLICY.server.effective_hostname  # the machine's FQDN, whatever it is


def test_to_toml_data_uses_human_units() -> None:
    data: Any = to_toml_data(DEFAULT_POLICY)
    assert data["server"]["max_message_size"] == "25MiB"
    assert data["server"]["command_timeout"] == "5m"
    assert data["server"]["listen"] == ["0.0.0.0:25", "[::]:25"]
    assert data["greylist"]["max_age"] == "35d"
    assert data["dnsbl"]["zones"] == [
        {
            "zone": "zen.spamhaus.org",
            "score": 10.0,
            "reject": True,
            "name": "",
            "type": "ip",
            "allow": False,
            "codes": {},
            "blocked_codes": [],
            "key": "",
        }
    ]


def test_schema_keys_lists_nested_tables() -> None:
    keys = schema_keys()
    assert "server.tls.cert_file" in keys
    assert "dnsbl.zones" in keys
    assert "scores" in keys
    assert len(keys) == len(set(keys))


def test_unknown_score_symbols_are_errors_with_a_suggestion() -> None:
    """A typo in [scores] would score nothing at all: it is refused, like any unknown key."""
    problems = _problems({"scores": {"SPF_PAS": -1.0, "TOTALLY_MADE_UP": 9.0}})
    assert ("scores.SPF_PAS", 'unknown symbol (did you mean "SPF_PASS"?)') in problems
    assert [k for k, m in problems if m.startswith("unknown symbol")] == [
        "scores.SPF_PAS",
        "scores.TOTALLY_MADE_UP",
    ]
    problems = _problems({"domains": {"example.com": {"scores": {"DMARC_PAS": 0.0}}}})
    assert any("DMARC_PAS" in k and "DMARC_PASS" in m for k, m in problems)


def test_zone_symbols_temperrors_and_result_words_may_be_scored() -> None:
    scores = {
        "DNSBL_ZEN_SBL": 12.0,  # a zone's symbols are the admin's own names
        "DNSWL_LOCAL": -2.0,
        "LISTS_TEMPERROR": 1.0,
        "DNSBL_DOMAIN_TEMPERROR": 0.5,
        "DKIM_PERMERROR": 1.0,
        "SPF_HELO_FAIL": 2.0,
    }
    assert {k: _valid({"scores": scores}).score(k) for k in scores} == scores


def test_every_check_can_score_its_temperror() -> None:
    """The pipeline names a check that timed out <NAME>_TEMPERROR: each is scorable."""
    import importlib
    import inspect
    import pkgutil

    import filter.checks

    names = set()
    for info in pkgutil.iter_modules(filter.checks.__path__):
        module = importlib.import_module(f"filter.checks.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            run = getattr(cls, "run", None)
            if isinstance(getattr(cls, "name", None), str) and inspect.iscoroutinefunction(run):
                names.add(cls.name)
    assert {"spf", "dkim", "dmarc", "arc", "greylist", "lists_rcpt"} <= names
    assert names <= set(PIPELINE_CHECKS)
    assert {f"{n.upper()}_TEMPERROR" for n in names} <= KNOWN_SYMBOLS


def test_zone_symbols_may_not_clash_through_code_labels() -> None:
    """ "ZEN" with code label "SBL" and a zone named "ZEN_SBL" both make DNSBL_ZEN_SBL;
    the check keeps one hit per symbol, so one zone's listing would vanish."""
    zen = {"zone": "zen.example", "codes": {"127.0.0.2": {"label": "SBL"}}}
    clash = {"zone": "other.example", "name": "ZEN_SBL", "reject": True}
    problems = _problems({"dnsbl": {"zones": [zen, clash]}})
    assert problems == [
        (
            "dnsbl.zones[1].name",
            "symbol DNSBL_ZEN_SBL is already used by zones[0]; set a distinct name",
        )
    ]
    # The other way round, and two codes of one zone sharing a label, are fine/caught.
    problems = _problems({"dnsbl": {"zones": [clash, zen]}})
    assert [key for key, _ in problems] == ["dnsbl.zones[1].name"]
    pbl = {"127.0.0.10": {"label": "PBL"}, "127.0.0.11": {"label": "PBL"}}
    _valid({"dnsbl": {"zones": [{"zone": "zen.example", "codes": pbl}]}})
    # An allowlist's symbols are DNSWL_…: no clash with a blocklist of the same tag.
    allow = {"zone": "list.dnswl.example", "name": "ZEN", "allow": True, "score": -1.0}
    _valid({"dnsbl": {"zones": [{"zone": "zen.example"}, allow]}})


# --- durations and numbers at their edges ------------------------------------------


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("command_timeout", "server"),
        ("max_recipients", "server"),
        ("reject", "actions"),
    ],
)
def test_a_number_too_large_for_a_float_is_a_problem_not_a_crash(key: str, field: str) -> None:
    # TOML integers are unbounded for tomllib; float(10**400) raises OverflowError,
    # which the walker does not catch: `policy check` printed a traceback and a
    # SIGHUP with such a value escaped the reload handler.
    problems = _problems({field: {key: 10**400}})
    assert [k for k, _ in problems] == [f"{field}.{key}"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("9ms", 0.009), ("13ms", 0.013), ("2.3d", 198720.0), ("0.1s", 0.1), ("1.15s", 1.15)],
)
def test_durations_with_units_are_exact(text: str, seconds: float) -> None:
    # float("9") * 0.001 is 0.009000000000000001: `policy show` then printed
    # "0.009000000000000001s" and "2.3d" became "198719.99999999997s".
    policy = _valid({"explain": {"keep": text}})
    assert policy.explain.keep == seconds
    assert "e" not in str(to_toml_data(policy.explain)["keep"]).rstrip("s")


@pytest.mark.parametrize("seconds", [1e-5, 1e-7, 0.009, 0.0015, 123456.789, 5e-324])
def test_every_duration_is_shown_as_a_duration_that_reads_back(seconds: float) -> None:
    from filter.units import format_duration, parse_duration

    shown = format_duration(seconds)
    assert "e" not in shown.rstrip("s"), shown  # "1e-05s" is not a duration mailgate reads
    assert parse_duration(shown) == seconds


def test_allow_senders_that_could_never_match_are_an_error() -> None:
    """With SPF off the check is not built, so allow_senders needing an SPF pass was a
    list that silently never matched."""
    data = {"spf": {"enabled": False}, "lists": {"allow_senders": "allow-senders.txt"}}
    problems = _problems(data)
    assert [key for key, _ in problems] == ["lists.allow_senders"]
    assert "allow_senders_require_spf = false" in problems[0][1]
    _valid({**data, "lists": {**data["lists"], "allow_senders_require_spf": False}})
    _valid({"lists": {"allow_senders": "allow-senders.txt"}})  # SPF on: fine
