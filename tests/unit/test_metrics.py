"""Metric names and labels as the contract exposes them."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from filter import __version__
from filter.metrics import (
    CHECK_NAMES,
    CHECK_RESULT_WORDS,
    CHECK_RESULTS,
    CONNECTION_RESULTS,
    DNSBL_ERROR_REASONS,
    GREYLIST_RESULTS,
    MESSAGE_ACTIONS,
    MULTIPROC_ENV,
    UPSTREAM_STAGES,
    Metrics,
    bounded,
    code_class,
    exposition,
)

# The contract's minimum, as exposed sample names -> type.
CONTRACT = {
    "mailgate_connections_total": "counter",
    "mailgate_active_sessions": "gauge",
    "mailgate_messages_total": "counter",
    "mailgate_check_results_total": "counter",
    "mailgate_greylist_total": "counter",
    "mailgate_dns_query_duration_seconds": "histogram",
    "mailgate_upstream_errors_total": "counter",
    "mailgate_store_errors_total": "counter",
    "mailgate_policy_reloads_total": "counter",
    "mailgate_build_info": "gauge",
}
EXTRA = {
    "mailgate_smtp_replies_total": "counter",
    "mailgate_would_action_total": "counter",
    "mailgate_check_duration_seconds": "histogram",
    "mailgate_upstream_duration_seconds": "histogram",
    "mailgate_message_size_bytes": "histogram",
    "mailgate_session_duration_seconds": "histogram",
    "mailgate_policy_generation": "gauge",
}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def scrape(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels -> value}, via the Prometheus text parser."""
    body, ctype = exposition(m.registry)
    assert ctype.startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def types(m: Metrics) -> dict[str, str]:
    """Exposed base name (as the TYPE line says it) -> type."""
    body, _ = exposition(m.registry)
    found = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            found[name] = kind
    return found


def test_contract_names_and_types(metrics: Metrics) -> None:
    exposed = types(metrics)
    for name, kind in {**CONTRACT, **EXTRA}.items():
        assert exposed.get(name) == kind, name
    # Nothing outside our namespace, no "_info" suffix, no "_created" noise.
    assert all(n.startswith("mailgate_") for n in exposed)
    assert not any(n.endswith(("_info_info", "_created")) for n in exposed)


def test_contract_names_through_the_parser(metrics: Metrics) -> None:
    # Labelled histograms show no samples until observed.
    metrics.observe_dns("A", "ok", 0.01)
    metrics.count_check("spf", "pass", seconds=0.01)
    metrics.observe_upstream("rcpt", 0.01)
    families = {
        f.name: f for f in text_string_to_metric_families(exposition(metrics.registry)[0].decode())
    }
    for name, kind in {**CONTRACT, **EXTRA}.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert families[base].type == kind, name
        names = {s.name for s in families[base].samples}
        expected = f"{name}_bucket" if kind == "histogram" else name
        assert expected in names, (name, names)


def test_labels_preinitialised_to_zero(metrics: Metrics) -> None:
    samples = scrape(metrics)
    assert samples["mailgate_messages_total"] == {(("action", a),): 0.0 for a in MESSAGE_ACTIONS}
    assert samples["mailgate_connections_total"] == {
        (("result", r),): 0.0 for r in CONNECTION_RESULTS
    }
    assert set(samples["mailgate_greylist_total"]) == {(("result", r),) for r in GREYLIST_RESULTS}
    assert set(samples["mailgate_upstream_errors_total"]) == {
        (("stage", s),) for s in UPSTREAM_STAGES
    }
    assert set(samples["mailgate_policy_reloads_total"]) == {
        (("outcome", "ok"),),
        (("outcome", "error"),),
    }
    assert samples["mailgate_store_errors_total"] == {(): 0.0}
    assert samples["mailgate_active_sessions"] == {(): 0.0}
    assert (("code_class", "5xx"), ("stage", "rcpt")) in samples["mailgate_smtp_replies_total"]


def test_prepare_checks_creates_the_words_of_enabled_checks_only(metrics: Metrics) -> None:
    """Before the first message, an enabled check's result series read 0 (rate() sees
    them); a check not passed in (disabled) has none, and no word a check cannot give."""
    assert "mailgate_check_results_total" not in scrape(metrics)  # policy-dependent
    metrics.prepare_checks(["spf", "greylist", "evil.example"])
    samples = scrape(metrics)["mailgate_check_results_total"]
    spf = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
    expected = {(("check", "spf"), ("result", w)): 0.0 for w in spf}
    expected |= {
        (("check", "greylist"), ("result", w)): 0.0 for w in ("pass", "none", "policy", "temperror")
    }
    assert samples == expected
    # Preparing again (a reload) keeps counts; a newly enabled check gets its series.
    metrics.count_check("spf", "pass")
    metrics.prepare_checks(["spf", "greylist", "dkim"])
    samples = scrape(metrics)["mailgate_check_results_total"]
    assert samples[(("check", "spf"), ("result", "pass"))] == 1.0
    assert samples[(("check", "dkim"), ("result", "permerror"))] == 0.0
    assert (("check", "dkim"), ("result", "softfail")) not in samples  # not a DKIM word


def test_every_check_has_its_result_words() -> None:
    """The table ``prepare_checks`` reads covers every check name with real words;
    "temperror" for all, since the pipeline reports a timed-out or crashed check so."""
    from filter.checks.arc import ARCCheck
    from filter.checks.dkim import DKIMCheck
    from filter.checks.dmarc import DMARCCheck
    from filter.checks.dnsbl import DNSBLCheck, DNSBLDomainCheck
    from filter.checks.greylist import GreylistCheck
    from filter.checks.helo import HeloCheck
    from filter.checks.lists import ListsCheck, RecipientListsCheck
    from filter.checks.ratelimit import RateLimitCheck, RateLimitConnectCheck
    from filter.checks.rdns import RDNSCheck
    from filter.checks.spf import SPF_WORDS, SPFCheck

    classes = (ARCCheck, DKIMCheck, DMARCCheck, DNSBLCheck, DNSBLDomainCheck, GreylistCheck)
    classes += (HeloCheck, ListsCheck, RecipientListsCheck, RateLimitCheck)
    classes += (RateLimitConnectCheck, RDNSCheck, SPFCheck)
    assert {c.name for c in classes} == set(CHECK_NAMES) == set(CHECK_RESULT_WORDS)
    for name, words in CHECK_RESULT_WORDS.items():
        assert "temperror" in words, name
        assert set(words) <= set(CHECK_RESULTS), name
        assert len(set(words)) == len(words), name
    assert set(CHECK_RESULT_WORDS["spf"]) == set(SPF_WORDS)


def test_prepare_dnsbl_zones_creates_each_zones_counters(metrics: Metrics) -> None:
    metrics.prepare_dnsbl_zones({"zen.spamhaus.org": ["SBL", "PBL", "PBL"], "***.dbl.test": []})
    s = scrape(metrics)
    assert s["mailgate_dnsbl_errors_total"] == {
        (("reason", r), ("zone", z)): 0.0
        for r in DNSBL_ERROR_REASONS
        for z in ("zen.spamhaus.org", "***.dbl.test")
    }
    assert s["mailgate_dnsbl_hits_total"] == {
        (("label", "LISTED"), ("zone", "zen.spamhaus.org")): 0.0,
        (("label", "PBL"), ("zone", "zen.spamhaus.org")): 0.0,
        (("label", "SBL"), ("zone", "zen.spamhaus.org")): 0.0,
        (("label", "LISTED"), ("zone", "***.dbl.test")): 0.0,
    }
    # The health gauge is left alone: 0 would read as "zone disabled".
    assert "mailgate_dnsbl_zone_healthy" not in s
    metrics.count_dnsbl_hit("zen.spamhaus.org", "")  # no label: LISTED, the same series
    hits = scrape(metrics)["mailgate_dnsbl_hits_total"]
    assert hits[(("label", "LISTED"), ("zone", "zen.spamhaus.org"))] == 1.0


def test_build_info_is_one_with_version(metrics: Metrics) -> None:
    assert scrape(metrics)["mailgate_build_info"] == {(("version", __version__),): 1.0}


def test_helpers_count_and_clamp(metrics: Metrics) -> None:
    metrics.count_message("reject")
    metrics.count_message("192.0.2.1")  # never a free-text label value
    metrics.count_connection("accepted")
    metrics.count_check("spf", "pass", seconds=0.01)
    metrics.count_check("evil.example", "whatever")
    metrics.observe_dns("txt", "ok", 0.02)
    metrics.observe_dns("HINFO", "weird", 0.02)
    metrics.count_reply("ehlo", 250)
    metrics.count_reply("rcpt", 554)
    metrics.count_reply("nonsense", 999)
    metrics.count_upstream_error("rcpt")
    metrics.count_greylist("new")
    metrics.count_would_action("reject")
    metrics.count_reload(True, generation=3)
    metrics.count_reload(False)
    metrics.store_errors.inc()
    metrics.active_sessions.inc()
    s = scrape(metrics)
    assert s["mailgate_messages_total"][(("action", "reject"),)] == 1
    assert s["mailgate_messages_total"][(("action", "other"),)] == 1
    assert s["mailgate_connections_total"][(("result", "accepted"),)] == 1
    assert s["mailgate_check_results_total"] == {
        (("check", "spf"), ("result", "pass")): 1,
        (("check", "other"), ("result", "other")): 1,
    }
    assert s["mailgate_check_duration_seconds_count"] == {(("check", "spf"),): 1}
    assert s["mailgate_dns_query_duration_seconds_count"] == {
        (("outcome", "ok"), ("rtype", "TXT")): 1,
        (("outcome", "other"), ("rtype", "other")): 1,
    }
    replies = s["mailgate_smtp_replies_total"]
    assert replies[(("code_class", "2xx"), ("stage", "helo"))] == 1
    assert replies[(("code_class", "5xx"), ("stage", "rcpt"))] == 1
    assert replies[(("code_class", "other"), ("stage", "other"))] == 1
    assert s["mailgate_upstream_errors_total"][(("stage", "rcpt"),)] == 1
    assert s["mailgate_greylist_total"][(("result", "new"),)] == 1
    assert s["mailgate_would_action_total"][(("action", "reject"),)] == 1
    assert s["mailgate_policy_reloads_total"] == {
        (("outcome", "ok"),): 1,
        (("outcome", "error"),): 1,
    }
    assert s["mailgate_policy_generation"] == {(): 3}
    assert s["mailgate_store_errors_total"] == {(): 1}
    assert s["mailgate_active_sessions"] == {(): 1}


def test_bounded_and_code_class() -> None:
    assert bounded("a", ("a", "b")) == "a"
    assert bounded("c", ("a", "b")) == "other"
    assert [code_class(c) for c in (220, 354, 451, 550, 199, 600)] == [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "other",
        "other",
    ]


def test_two_registries_do_not_clash() -> None:
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())


MULTIPROC_SCRIPT = """
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from filter.metrics import Metrics, exposition
m = Metrics(CollectorRegistry())
m.active_sessions.inc(2)
m.count_message("accept")
body, _ = exposition(m.registry)
for fam in text_string_to_metric_families(body.decode()):
    for s in fam.samples:
        if s.name in ("mailgate_active_sessions", "mailgate_build_info") or (
            s.name == "mailgate_messages_total" and s.labels.get("action") == "accept"
        ):
            print(s.name, s.value)
"""


def run_multiprocess(directory: Path, script: str, *python_args: str) -> CompletedProcess[str]:
    """``script`` in a fresh interpreter with ``directory`` as the workers' metrics
    directory: prometheus_client picks its value store at import."""
    return subprocess.run(
        [sys.executable, *python_args, "-c", script],
        env={**os.environ, MULTIPROC_ENV: str(directory)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_multiprocess_exposition(tmp_path: Path) -> None:
    done = run_multiprocess(tmp_path, MULTIPROC_SCRIPT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert sorted(out.split("\n")) == sorted(
        [
            "mailgate_active_sessions 2.0",
            "mailgate_messages_total 1.0",
            "mailgate_build_info 1.0",
            "",
        ]
    )
    assert list(tmp_path.iterdir())  # values went to the shared directory


PREPARED_SCRIPT = """
from prometheus_client import CollectorRegistry
from filter.metrics import Metrics, exposition
m = Metrics(CollectorRegistry())
m.prepare_checks(["spf"])
m.prepare_dnsbl_zones({"bl.example": ["SBL"]})
print(exposition(m.registry)[0].decode())
"""


def test_multiprocess_exposition_lists_prepared_series(tmp_path: Path) -> None:
    """With workers, series created without a count reach the merged /metrics too
    (each worker's file holds them at 0)."""
    done = run_multiprocess(tmp_path, PREPARED_SCRIPT)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert 'mailgate_check_results_total{check="spf",result="pass"} 0.0' in out
    assert 'mailgate_dnsbl_hits_total{label="SBL",zone="bl.example"} 0.0' in out
    assert 'mailgate_dnsbl_errors_total{reason="timeout",zone="bl.example"} 0.0' in out


def test_forgetting_a_zone_with_workers_warns_nothing(tmp_path: Path) -> None:
    """prometheus_client cannot remove a series in multiprocess mode and says so with
    a UserWarning; a reload that drops a zone must not print one to the log (here an
    error, as -W makes it)."""
    script = (
        "from prometheus_client import CollectorRegistry\n"
        "from filter.metrics import Metrics\n"
        "m = Metrics(CollectorRegistry())\n"
        "m.set_dnsbl_zone_health('bl.example', True)\n"
        "m.forget_dnsbl_zone('bl.example')\n"
        "m.forget_dnsbl_zone('never.example')\n"
    )
    done = run_multiprocess(tmp_path, script, "-W", "error::UserWarning")
    assert done.returncode == 0, done.stderr


def test_multiprocess_exposition_survives_empty_and_broken_worker_files(tmp_path: Path) -> None:
    """A worker killed between creating its file and sizing it leaves an empty file
    for good (client_python #1199), and a torn file may not parse: either used to
    fail every scrape. The other workers' metrics must still be served."""
    (tmp_path / "counter_99999.db").write_bytes(b"")
    # a header claiming 1000 bytes used in a 16-byte file: "read beyond file size"
    (tmp_path / "gauge_livesum_99998.db").write_bytes(struct.pack("i", 1000) + bytes(12))
    done = run_multiprocess(tmp_path, MULTIPROC_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert "mailgate_messages_total 1.0" in done.stdout.split("\n")
    assert "mailgate_active_sessions 2.0" in done.stdout.split("\n")
    assert "gauge_livesum_99998.db" in done.stderr  # the left-out file is named
