"""The pure helpers of the benchmark harness (tests/perf/bench.py)."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "perf" / "bench.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailgate_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_proc_stat_with_awkward_command_name() -> None:
    # comm may hold spaces and ")"; fields 14-17 are utime, stime, cutime, cstime
    line = (
        "4242 (py (worker) 1) S 4200 4242 4242 0 -1 4194560 100 0 0 0 "
        "150 25 7 3 20 0 3 0 12345 1000000 500 18446744073709551615\n"
    )
    assert bench.parse_proc_stat(line) == (4200, 150 + 25 + 7 + 3)


def test_descendants_follow_the_whole_tree_only() -> None:
    parent_of = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20}
    assert bench.descendants(10, parent_of) == {10, 11, 12, 13}
    assert bench.descendants(13, parent_of) == {13}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), ("sink:1", ("sink", 1))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert bench.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":25", "host:0", "host:port", "host:70000"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        bench.parse_hostport(text)


def test_loadgen_output_is_the_last_json_line() -> None:
    out = 'noise\n{"messages": 3, "errors": 1, "elapsed_s": 1.0, "msgs_per_s": 3.0, "lat_us": {}}\n'
    assert bench.parse_loadgen_output(out)["errors"] == 1
    with pytest.raises(ValueError):
        bench.parse_loadgen_output('{"messages": 3}\n')


def test_policy_with_checks_none_disables_every_check() -> None:
    text = bench.policy_toml(
        listen="127.0.0.1:2525",
        upstream="127.0.0.1:2526",
        metrics="127.0.0.1:2527",
        workers=2,
        checks="none",
        nameservers=[],
        redis_url="redis://127.0.0.1:6379/0",
        xclient=True,
    )
    policy = tomllib.loads(text)
    assert policy["server"]["trusted_networks"] == []
    assert policy["server"]["workers"] == 2
    assert policy["upstream"]["address"] == "127.0.0.1:2526"
    for check in ("spf", "dkim", "dmarc", "arc", "dnsbl", "greylist"):
        assert policy[check]["enabled"] is False


def test_summary_ratio_is_the_median_of_per_round_ratios() -> None:
    def run(rate: float, p50: int) -> dict[str, object]:
        return {"msgs_per_s": rate, "lat_us": {"p50": p50, "p99": 2 * p50}, "errors": 0}

    rounds = [
        {"direct": run(1000, 100), "proxy": run(100, 1100)},
        {"direct": run(2000, 100), "proxy": run(100, 1300)},
        {"direct": run(1000, 100), "proxy": run(300, 900)},
    ]
    summary = bench.summarize(bench.Scenario(20, 10, 4096, 4.0), rounds)
    assert summary["ratios"] == [0.1, 0.05, 0.3]
    assert summary["ratio_median"] == 0.1
    assert summary["added_p50_us"] == 1000
    assert summary["proxy_errors"] == 0


# ------------------------------------------------------------------ several configurations


def test_checks_takes_a_comma_list_in_order() -> None:
    assert bench.parse_checks_list("none") == ["none"]
    assert bench.parse_checks_list(" none , all ") == ["none", "all"]
    assert bench.parse_checks_list("all,none,auth") == ["all", "none", "auth"]


@pytest.mark.parametrize("text", ["", " , ", "none,bogus", "none,all,none"])
def test_checks_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        bench.parse_checks_list(text)


def test_parse_args_single_configuration_is_as_before() -> None:
    a = bench.parse_args(["--checks", "auth"])
    assert a.configs == ["auth"]
    assert a.checks == "auth"
    assert a.mail_from == bench.AUTH_SENDER
    assert bench.parse_args([]).mail_from == f"sender@{bench.SENDER_DOMAIN}"


def test_parse_args_several_configurations_keep_their_own_senders() -> None:
    a = bench.parse_args(["--checks", "none, all", "--without", "rdns,helo"])
    assert a.configs == ["none", "all"]
    assert a.checks == "none,all"
    assert a.mail_from is None
    assert bench.sender_for(a, "none") == f"sender@{bench.SENDER_DOMAIN}"
    assert bench.sender_for(a, "all") == bench.AUTH_SENDER
    # --without prices checks out of every configuration that has any
    assert bench.without_for(a, "none") == frozenset()
    assert bench.config_label("all", bench.without_for(a, "all")) == "all-helo-rdns"
    given = bench.parse_args(["--checks", "none,auth", "--mail-from", "x@sender.test"])
    assert bench.sender_for(given, "none") == bench.sender_for(given, "auth") == "x@sender.test"


@pytest.mark.parametrize(
    "argv",
    [
        ["--checks", "none,all", "--proxy", "127.0.0.1:2525", "--sink", "127.0.0.1:2526"],
        ["--checks", "none,bogus"],
        ["--checks", "all,all"],
        ["--checks", "none,auth", "--mail-from", "x@elsewhere.test"],
    ],
)
def test_parse_args_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def _rounds(*pairs: tuple[float, float | None]) -> list[dict[str, dict[str, object]]]:
    """(direct msgs/s, proxy msgs/s or None for a failed run) per round."""

    def run(rate: float) -> dict[str, object]:
        return {"msgs_per_s": rate, "lat_us": {"p50": 100, "p99": 200}, "errors": 0}

    return [
        {"direct": run(d), "proxy": run(p) if p is not None else {"failed": "timeout"}}
        for d, p in pairs
    ]


def test_compare_divides_ratios_per_round_and_raw_rates_separately() -> None:
    sc = bench.Scenario(20, 10, 4096, 3.0)
    # the machine slows down between the halves of round 2: the direct runs see it
    first_rounds = _rounds((10000, 1000), (10000, 1000), (10000, 1000))
    other_rounds = _rounds((10000, 500), (5000, 250), (10000, 400))
    first, other = bench.summarize(sc, first_rounds), bench.summarize(sc, other_rounds)
    first["mailgate_cpu_ms_per_msg"], other["mailgate_cpu_ms_per_msg"] = 0.5, 1.25
    comp = bench.compare_configs(first_rounds, first, other_rounds, other)
    assert comp["throughput_per_round"] == pytest.approx([0.5, 0.5, 0.4])
    assert comp["throughput"] == pytest.approx(0.5)
    assert comp["raw_throughput_per_round"] == pytest.approx([0.5, 0.25, 0.4])
    assert comp["raw_throughput"] == pytest.approx(0.4)
    assert comp["cpu_quotient"] == pytest.approx(2.5)
    assert comp["rounds"] == 3
    line = bench.comparison_line("none", "all", comp)
    assert line == (
        "all / none: throughput 0.50 (per round 0.50 0.50 0.40; raw msgs/s 0.40), "
        "cpu ms/msg 1.25 vs 0.50 (2.50x), p99 0.20 vs 0.20 ms"
    )
    assert bench.comparison_summary_line(sc, "none", "all", comp).startswith(
        "compare=all/none scenario=20x10 throughput=0.500 raw_throughput=0.400 "
    )


def test_compare_skips_rounds_where_either_side_failed() -> None:
    sc = bench.Scenario(1, 10, 4096, 3.0)
    first_rounds = _rounds((10000, 1000), (10000, None))
    other_rounds = _rounds((10000, None), (10000, 600))
    first, other = bench.summarize(sc, first_rounds), bench.summarize(sc, other_rounds)
    comp = bench.compare_configs(first_rounds, first, other_rounds, other)
    assert comp["throughput_per_round"] == [None, None]
    assert comp["throughput"] is None
    assert comp["raw_throughput"] is None
    assert "throughput - (per round - -; raw msgs/s -)" in bench.comparison_line("a", "b", comp)


def test_summary_line_of_one_configuration_keeps_its_format() -> None:
    sc = bench.Scenario(20, 10, 4096, 4.0)
    rounds = _rounds((10000, 2000))
    summary = bench.summarize(sc, rounds)
    summary["mailgate_cpu_ms_per_msg"] = 0.5
    b = bench.Bench(bench.parse_args([]), Path("loadgen"), "sink", "proxy", None, None, 0.0)
    b.checks, b.label = "all", "all-helo-rdns"
    assert bench.summary_line(b, summary) == (
        "scenario=20x10 checks=all-helo-rdns ratio=0.200 p99_added_ms=0.00 mg_cpu_ms=0.500 "
        "p50_ms=0.10 p99_ms=0.20 proxy_per_s=2000 direct_per_s=10000 proxy_errors=0 rounds=1 "
        "dns_queries=0"
    )
