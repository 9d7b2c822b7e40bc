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
