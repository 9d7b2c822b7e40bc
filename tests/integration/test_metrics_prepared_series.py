"""Series known from the policy are on /metrics at 0 from the start, and after a reload.

Prometheus sees a labelled series only once it exists: without this, rate() and the
dashboard read "no data" after a start or restart, and the first count was lost to
rate(). A real mailgate process, its /metrics scraped over HTTP, no mail sent.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import StartMailgate
from tests.rig.mailgate import MailgateProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

ZONE = "bl.mailgate.test"
#: No probes: the zone's health series then comes from the start alone, and no probe
#: of a zone the test DNS does not serve disables it.
DNSBL_ON: dict[str, Any] = {
    "enabled": True,
    "probe_interval": 0,
    "zones": [{"zone": ZONE, "score": 5.0, "codes": {"127.0.0.2": {"label": "SBL"}}}],
}


def _samples(mg: MailgateProcess) -> Samples:
    with urllib.request.urlopen(f"{mg.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _check(check: str, result: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("mailgate_check_results_total", (("check", check), ("result", result)))


def _checks_shown(samples: Samples) -> set[str]:
    return {
        dict(labels)["check"] for name, labels in samples if name == "mailgate_check_results_total"
    }


def _zone(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted({**labels, "zone": ZONE}.items())))


def _wait_for(mg: MailgateProcess, *keys: tuple[str, Any], timeout: float = 10.0) -> Samples:
    """The samples once all ``keys`` are among them.

    A reload reaches workers a moment after the supervisor, and a worker's new metric
    file (its first gauge of a kind) may miss a scrape that began just before it.
    """
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(mg)
        if all(k in samples for k in keys) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_enabled_checks_and_zones_show_zero_before_any_mail(
    mailgate: StartMailgate, workers: int
) -> None:
    mg = mailgate(
        {
            "server": {"workers": workers},
            "spf": {"enabled": True},
            "dkim": {"enabled": False},
            "dnsbl": DNSBL_ON,
        }
    )
    # SPF runs at MAIL FROM: no session got that far (the rig's start only read the banner).
    samples = _wait_for(
        mg, _check("spf", "pass"), _zone("mailgate_dnsbl_zone_healthy"), _check("dnsbl", "fail")
    )
    assert samples[_check("spf", "pass")] == 0.0
    assert samples[_check("spf", "softfail")] == 0.0
    assert samples[_check("dmarc", "fail")] == 0.0
    assert _check("spf", "policy") not in samples  # no word SPF cannot give
    assert _check("spf", "skipped") not in samples
    shown = _checks_shown(samples)
    assert "dkim" not in shown  # disabled: no series, not a misleading 0
    assert "greylist" not in shown  # off in the test policy
    assert "dnsbl_domain" not in shown  # no domain zone configured
    assert {"spf", "dmarc", "arc", "dnsbl", "rdns", "helo"} <= shown
    # The zone's counters, by its code labels, and its health as a process starts it.
    assert samples[_zone("mailgate_dnsbl_hits_total", label="SBL")] == 0.0
    assert samples[_zone("mailgate_dnsbl_hits_total", label="LISTED")] == 0.0
    for reason in ("blocked", "timeout", "servfail", "error"):
        assert _zone("mailgate_dnsbl_errors_total", reason=reason) in samples
    assert samples[_zone("mailgate_dnsbl_zone_healthy")] == 1.0
    # The fixed sets, as before.
    assert samples[("mailgate_messages_total", (("action", "accept"),))] == 0.0
    assert samples[("mailgate_policy_reloads_total", (("outcome", "error"),))] == 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_gives_new_checks_and_zones_their_series(
    mailgate: StartMailgate, workers: int
) -> None:
    mg = mailgate(
        {"server": {"workers": workers}, "dkim": {"enabled": False}, "dnsbl": {"enabled": False}}
    )
    before = _wait_for(mg, _check("spf", "pass"))
    assert not {"dkim", "dnsbl"} & _checks_shown(before)
    assert not any(name.startswith("mailgate_dnsbl_") for name, _ in before)

    mg.reload({"dkim": {"enabled": True}, "dnsbl": DNSBL_ON})
    after = _wait_for(
        mg,
        _zone("mailgate_dnsbl_hits_total", label="SBL"),
        _zone("mailgate_dnsbl_zone_healthy"),
        _check("dkim", "pass"),
    )
    assert after[("mailgate_policy_reloads_total", (("outcome", "ok"),))] == 1.0
    assert after[_check("dkim", "pass")] == 0.0
    assert after[_check("dnsbl", "fail")] == 0.0
    assert after[_zone("mailgate_dnsbl_hits_total", label="SBL")] == 0.0
    assert after[_zone("mailgate_dnsbl_errors_total", reason="timeout")] == 0.0
    assert after[_zone("mailgate_dnsbl_zone_healthy")] == 1.0
