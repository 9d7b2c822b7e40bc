"""Black-box checks of /work/shared/CONTRACT.md promises the other tests left uncovered.

Each test drives the product as an external test would: ``python -m filter`` as a
subprocess, or ``mailgate serve`` over its sockets; nothing is imported from ``filter``.
"""

from __future__ import annotations

import re
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.cli import run_cli as cli
from tests.unit.test_metrics import CONTRACT

# --- policy units -------------------------------------------------------------------


@pytest.mark.parametrize("value", ['"90s"', '"5m"', '"2h"', '"35d"', "90", "1.5"])
def test_command_timeout_takes_every_contract_duration(tmp_path: Path, value: str) -> None:
    """Contract: durations accept seconds or "90s" "5m" "2h" "35d". ``command_timeout``
    alone used to be refused above 30m, for ``session_timeout``, a key never set."""
    config = tmp_path / "mailgate.toml"
    config.write_text(f"[server]\ncommand_timeout = {value}\n")
    checked = cli("policy", "check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shown = cli("policy", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    server = tomllib.loads(shown.stdout)["server"]
    seconds = {'"90s"': 90, '"5m"': 300, '"2h"': 7200, '"35d"': 35 * 86400, "90": 90}
    reread = tmp_path / "shown" / "mailgate.toml"
    reread.parent.mkdir()
    reread.write_text(shown.stdout)  # what `policy show` prints loads back unchanged
    assert cli("policy", "show", "--config", str(reread)).stdout == shown.stdout
    if value in seconds:
        # The whole-session cap follows, or the command timeout could never fire.
        assert _seconds(server["session_timeout"]) == max(1800, seconds[value])


def test_a_session_timeout_set_shorter_than_command_timeout_is_still_an_error(
    tmp_path: Path,
) -> None:
    """Only the default follows: an explicit contradiction is reported, as file: key: message."""
    config = tmp_path / "mailgate.toml"
    config.write_text('[server]\ncommand_timeout = "2h"\nsession_timeout = "1h"\n')
    result = cli("policy", "check", "--config", str(config))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{config}: server.session_timeout: must be at least command_timeout"
    ]


def _seconds(text: str) -> float:
    """A duration as `policy show` prints it, in seconds (just the units it uses)."""
    m = re.fullmatch(r"(\d+)(s|m|h|d)", text)
    assert m is not None, text
    return int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


# --- metrics --------------------------------------------------------------------------

#: The contract's "at least" list: name -> Prometheus type (one list for the suite).
CONTRACT_METRICS = CONTRACT


def test_metrics_with_several_workers_list_every_contract_metric(
    mailgate: StartMailgate,
) -> None:
    """``server.workers = 2`` serves the merged files of its workers; a labelled metric
    nothing has counted yet (no check runs here) must still be listed, as with one."""
    checks_off = {name: {"enabled": False} for name in ("rdns", "helo", "dnsbl", "lists")}
    mg = mailgate({**AUTH_CHECKS_OFF, **checks_off, "server": {"workers": 2}})
    with urllib.request.urlopen(mg.metrics_url + "/metrics", timeout=10) as resp:
        body = resp.read().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE))
    for name, kind in CONTRACT_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(name, types.get(family)) == kind, f"{name} missing or not a {kind}"
    # Label names the contract gives, on the series that exist before any mail.
    for series in (
        'mailgate_messages_total{action="accept"}',
        'mailgate_greylist_total{result="new"}',
        'mailgate_policy_reloads_total{outcome="error"}',
        'mailgate_build_info{version="',
    ):
        assert series in body, series
