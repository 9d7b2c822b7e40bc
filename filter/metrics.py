"""Prometheus metrics: every metric mailgate exposes is declared here, once.

One place so that names match the contract, and so that every label has a
closed set of values: a label fed an address, domain or reply text would make
one time series per sender and exhaust the Prometheus server. Helpers below
clamp anything outside a label's set to ``"other"`` instead of trusting the
caller.

Multiprocess (``server.workers > 1``): prometheus_client switches to mmap'd
per-process files when ``PROMETHEUS_MULTIPROC_DIR`` is set *before* it is
imported, so the app must set it before importing this module and clear the
directory at start. ``exposition()`` then merges the files of all workers.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.registry import Collector

from filter import __version__

log = logging.getLogger("mailgate.metrics")

__all__ = [
    "CHECK_RESULTS",
    "CHECK_RESULT_WORDS",
    "CONNECTION_RESULTS",
    "DNSBL_ERROR_REASONS",
    "DNSBL_UNLABELLED",
    "DNS_OUTCOMES",
    "DNS_RTYPES",
    "GREYLIST_RESULTS",
    "MESSAGE_ACTIONS",
    "MULTIPROC_ENV",
    "OTHER",
    "RELOAD_OUTCOMES",
    "REPLY_STAGES",
    "UPSTREAM_STAGES",
    "WOULD_ACTIONS",
    "Metrics",
    "bounded",
    "code_class",
    "default_metrics",
    "exposition",
    "mark_process_dead",
    "multiprocess_enabled",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"

# Closed label value sets. Dashboards and alerts may rely on these words.
CONNECTION_RESULTS = ("accepted", "refused_limit", "refused_per_ip", "pregreet", "proxy_error")
MESSAGE_ACTIONS = ("accept", "add_header", "greylist", "tempfail", "reject")
WOULD_ACTIONS = ("greylist", "tempfail", "reject")
# RFC 8601 result words: the checks report nothing else (a check that did not run
# reports no result at all).
CHECK_RESULTS = (
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
    "policy",
)
# new: first sighting, tempfailed; early: retried before the delay;
# passed: retried in the window; allowlisted: exempt; error: store failed.
GREYLIST_RESULTS = ("new", "early", "passed", "allowlisted", "error")
RATELIMIT_LIMITS = (
    "connections_per_network",
    "messages_per_network",
    "recipients_per_network",
    "messages_per_sender_domain",
    "recipients_per_sender_domain",
)
RATELIMIT_RESULTS = ("under", "over")
DNS_RTYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "NS", "SOA")
DNS_OUTCOMES = ("ok", "nxdomain", "nodata", "servfail", "timeout", "error")
# Where a conversation with the upstream failed (filter.relay's stage names): a
# timeout, a dropped connection, a malformed or 421 reply counts once, at its stage;
# "data" is the DATA command and the message body, "data_end" the reply to the dot.
UPSTREAM_STAGES = (
    "connect",
    "greeting",
    "ehlo",
    "xclient",
    "xforward",
    "mail",
    "rcpt",
    "data",
    "data_end",
    "keepalive",  # the NOOP that keeps a transaction's connection alive (filter.session)
)
REPLY_STAGES = ("connect", "helo", "mail", "rcpt", "data", "other")
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
RELOAD_OUTCOMES = ("ok", "error")
# DNSBL lookups that gave no usable answer: a "query refused" answer, a timeout,
# SERVFAIL, anything else (REFUSED, network). Zone labels come from the policy
# (bounded by configuration, access keys masked), hit labels from its codes.
DNSBL_ERROR_REASONS = ("blocked", "timeout", "servfail", "error")
# Check names come from code, not input, but a plug-in with a new name must
# not be able to add series without a code change here.
CHECK_NAMES = (
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "dnsbl",
    "dnsbl_domain",
    "greylist",
    "rdns",
    "helo",
    "lists",
    "lists_rcpt",
    "ratelimit",
    "ratelimit_connect",
)

# The result words each check can report (read off filter/checks/*.py), so that the
# series created at 0 for an enabled check (Metrics.prepare_checks) are the ones it can
# move, not every word for every check. "temperror" for all: the pipeline reports a
# check that timed out or raised as one. Keep in step when a check learns a new word.
_DNSBL_WORDS = ("pass", "fail", "none", "temperror")  # pass: allowlist hits only
_RATELIMIT_WORDS = ("pass", "none", "policy", "temperror")  # policy: over a limit
CHECK_RESULT_WORDS: dict[str, tuple[str, ...]] = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"),
    "dkim": ("pass", "fail", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
    "arc": ("pass", "fail", "none", "temperror"),
    "dnsbl": _DNSBL_WORDS,
    "dnsbl_domain": _DNSBL_WORDS,
    "greylist": ("pass", "none", "policy", "temperror"),  # policy: greylisted
    "rdns": ("pass", "fail", "temperror", "permerror"),  # "none" only when disabled
    "helo": ("pass", "fail", "none", "temperror"),
    "lists": ("pass", "fail", "none", "temperror"),
    "lists_rcpt": ("fail", "none", "temperror"),
    "ratelimit": _RATELIMIT_WORDS,
    "ratelimit_connect": _RATELIMIT_WORDS,
}
# A code's label in mailgate_dnsbl_hits_total for a listing without a configured label.
DNSBL_UNLABELLED = "LISTED"

# Why mail was refused: the check whose own decision it was, "score" (the reject
# threshold), or "message" (the message itself: a header block past the limit, a
# line too long, ...), at the stage the client heard it (pre-DATA refusals are all
# given at RCPT, README "Checks").
REFUSAL_STAGES = ("rcpt", "data")
REFUSAL_CAUSES = (*CHECK_NAMES, "score", "message")
REFUSAL_ACTIONS = WOULD_ACTIONS

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_SIZE_BUCKETS = tuple(float(1024 * 4**i) for i in range(9))  # 1 KiB .. 64 MiB
_SESSION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def bounded(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"``."""
    return value if value in allowed else OTHER


def code_class(code: int) -> str:
    """Map an SMTP reply code to ``"2xx"``..``"5xx"`` (``"other"`` if invalid)."""
    if 200 <= code <= 599:
        return f"{code // 100}xx"
    return OTHER


def multiprocess_enabled() -> bool:
    """Whether metrics live in per-process files (``server.workers > 1``)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The metric objects, registered on one registry.

    Tests pass a fresh ``CollectorRegistry``; production uses
    ``default_metrics()``. Attributes are plain prometheus_client metrics;
    prefer the helper methods where a label value is computed at run time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._reply_children: dict[tuple[str, int], Any] = {}
        # The per-series "*_created" gauges would double the series count and
        # nothing reads them from the 0.0.4 text format; the switch is
        # process-wide, which is fine since mailgate owns its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # Counter names omit "_total": prometheus_client appends it.
        self.connections = Counter(
            "mailgate_connections",
            "SMTP connections by what happened at connect.",
            ["result"],
            registry=reg,
        )
        self.active_sessions = Gauge(
            "mailgate_active_sessions",
            "SMTP sessions currently open.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.messages = Counter(
            "mailgate_messages",
            "Messages by final action (after monitor mode).",
            ["action"],
            registry=reg,
        )
        self.would_action = Counter(
            "mailgate_would_action",
            "Monitor mode: actions that would have been taken in enforce mode.",
            ["action"],
            registry=reg,
        )
        self.refusals = Counter(
            "mailgate_refusals",
            "Refusals given to clients by stage, cause (the deciding check, score or "
            "message) and action: why mail is being rejected.",
            ["stage", "cause", "action"],
            registry=reg,
        )
        self.check_results = Counter(
            "mailgate_check_results",
            "Check outcomes by check and RFC 8601 result word.",
            ["check", "result"],
            registry=reg,
        )
        self.check_duration = Histogram(
            "mailgate_check_duration_seconds",
            "Time a check took, including its DNS and store lookups.",
            ["check"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.greylist = Counter(
            "mailgate_greylist",
            "Greylist decisions.",
            ["result"],
            registry=reg,
        )
        self.greylist_retry_delay = Histogram(
            "mailgate_greylist_retry_delay_seconds",
            "Time from a triplet's first attempt to the retry that passed greylisting.",
            buckets=(60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0),
            registry=reg,
        )
        self.ratelimit = Counter(
            "mailgate_ratelimit",
            "Rate-limited events by limit ([ratelimit] setting) and result.",
            ["limit", "result"],
            registry=reg,
        )
        self.dns_query_duration = Histogram(
            "mailgate_dns_query_duration_seconds",
            "DNS queries that went to the network (cache misses).",
            ["rtype", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_errors = Counter(
            "mailgate_upstream_errors",
            "Failures talking to the downstream MTA (unreachable, timeout, connection "
            "lost, malformed or 421 reply) by the stage they happened at.",
            ["stage"],
            registry=reg,
        )
        self.upstream_duration = Histogram(
            "mailgate_upstream_duration_seconds",
            "Downstream MTA reply latency by stage.",
            ["stage"],
            buckets=_UPSTREAM_BUCKETS,
            registry=reg,
        )
        self.store_errors = Counter(
            "mailgate_store_errors",
            "Failed store (Redis) operations.",
            registry=reg,
        )
        self.policy_reloads = Counter(
            "mailgate_policy_reloads",
            "Policy reloads (SIGHUP) by outcome; the policy loaded at start is not counted.",
            ["outcome"],
            registry=reg,
        )
        self.policy_generation = Gauge(
            "mailgate_policy_generation",
            "Generation number of the loaded policy (increments per good reload).",
            registry=reg,
            multiprocess_mode="max",
        )
        self.smtp_replies = Counter(
            "mailgate_smtp_replies",
            "Replies sent to SMTP clients by stage and code class.",
            ["stage", "code_class"],
            registry=reg,
        )
        self.message_size = Histogram(
            "mailgate_message_size_bytes",
            "Size of received message data.",
            buckets=_SIZE_BUCKETS,
            registry=reg,
        )
        self.session_duration = Histogram(
            "mailgate_session_duration_seconds",
            "SMTP session length from connect to close.",
            buckets=_SESSION_BUCKETS,
            registry=reg,
        )
        self.dnsbl_zone_healthy = Gauge(
            "mailgate_dnsbl_zone_healthy",
            "1 while a DNSBL zone answers its RFC 5782 test entries, 0 while disabled.",
            ["zone"],
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.dnsbl_hits = Counter(
            "mailgate_dnsbl_hits",
            "DNSBL/DNSWL listings by zone and code label (LISTED without a label).",
            ["zone", "label"],
            registry=reg,
        )
        self.dnsbl_errors = Counter(
            "mailgate_dnsbl_errors",
            "DNSBL lookups without a usable answer, by zone and reason.",
            ["zone", "reason"],
            registry=reg,
        )
        # A Gauge, not an Info: Info would expose "mailgate_build_info_info".
        self.build_info = Gauge(
            "mailgate_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.build_info.labels(version=__version__).set(1)
        self._preinitialise()

    def _preinitialise(self) -> None:
        """Create the fixed label combinations at 0, so rate() and alerts see
        them before the first event instead of a missing series."""
        for result in CONNECTION_RESULTS:
            self.connections.labels(result=result)
        for action in MESSAGE_ACTIONS:
            self.messages.labels(action=action)
        for action in WOULD_ACTIONS:
            self.would_action.labels(action=action)
        for stage in REFUSAL_STAGES:
            for cause in REFUSAL_CAUSES:
                for action in REFUSAL_ACTIONS:
                    self.refusals.labels(stage=stage, cause=cause, action=action)
        for result in GREYLIST_RESULTS:
            self.greylist.labels(result=result)
        for limit in RATELIMIT_LIMITS:
            for result in RATELIMIT_RESULTS:
                self.ratelimit.labels(limit=limit, result=result)
        for stage in UPSTREAM_STAGES:
            self.upstream_errors.labels(stage=stage)
        for outcome in RELOAD_OUTCOMES:
            self.policy_reloads.labels(outcome=outcome)
        for stage in REPLY_STAGES:
            for cls in CODE_CLASSES:
                self.smtp_replies.labels(stage=stage, code_class=cls)

    def prepare_checks(self, checks: Iterable[str]) -> None:
        """Create at 0 each result series the enabled ``checks`` can move.

        Why: a labelled series exists only once touched, so after a start or restart
        rate() and the dashboard saw no data instead of 0 and lost the first count.
        Only enabled checks (the live pipeline's), so a disabled one shows no series;
        call again after a reload, a check it enables gets its series then.
        """
        for name in checks:
            if name not in CHECK_NAMES:  # count_check files these under "other"
                continue
            for word in CHECK_RESULT_WORDS.get(name, ()):
                self._child(self.check_results, name, word)

    def prepare_dnsbl_zones(self, zones: Mapping[str, Iterable[str]]) -> None:
        """Create at 0 the per-zone counters of the configured zones, as ``prepare_checks``.

        ``zones``: masked zone name (``filter.dnsbl.mask_zone``) -> the labels of its
        ``codes``; each zone gets its error reasons, its labels and ``LISTED``. The
        health gauge is not set here: 0 would say "disabled" (``filter.checks.dnsbl``).
        """
        for zone, labels in zones.items():
            for reason in DNSBL_ERROR_REASONS:
                self._child(self.dnsbl_errors, zone, reason)
            for label in sorted({*labels, DNSBL_UNLABELLED}):
                self._child(self.dnsbl_hits, zone, label)

    # Helpers for labels computed at run time: clamp, never trust.

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: ``labels()`` locks and hashes per call,
        which showed up in profiles at several calls per message."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def count_connection(self, result: str) -> None:
        self._child(self.connections, bounded(result, CONNECTION_RESULTS)).inc()

    def count_message(self, action: str) -> None:
        self._child(self.messages, bounded(action, MESSAGE_ACTIONS)).inc()

    def count_refusal(self, stage: str, cause: str, action: str) -> None:
        """One refusal the client heard, and what decided it (``Verdict.decided_by``)."""
        labels = (
            bounded(stage, REFUSAL_STAGES),
            bounded(cause, REFUSAL_CAUSES),
            bounded(action, REFUSAL_ACTIONS),
        )
        self._child(self.refusals, *labels).inc()

    def count_would_action(self, action: str) -> None:
        self._child(self.would_action, bounded(action, WOULD_ACTIONS)).inc()

    def count_check(self, check: str, result: str, seconds: float | None = None) -> None:
        name = bounded(check, CHECK_NAMES)
        self._child(self.check_results, name, bounded(result, CHECK_RESULTS)).inc()
        if seconds is not None:
            self._child(self.check_duration, name).observe(seconds)

    def count_greylist(self, result: str) -> None:
        self._child(self.greylist, bounded(result, GREYLIST_RESULTS)).inc()

    def count_ratelimit(self, limit: str, result: str) -> None:
        limit = bounded(limit, RATELIMIT_LIMITS)
        self._child(self.ratelimit, limit, bounded(result, RATELIMIT_RESULTS)).inc()

    def observe_dns(self, rtype: str, outcome: str, seconds: float) -> None:
        self._child(
            self.dns_query_duration,
            bounded(rtype.upper(), DNS_RTYPES),
            bounded(outcome, DNS_OUTCOMES),
        ).observe(seconds)

    def count_upstream_error(self, stage: str) -> None:
        self._child(self.upstream_errors, bounded(stage, UPSTREAM_STAGES)).inc()

    def observe_upstream(self, stage: str, seconds: float) -> None:
        self._child(self.upstream_duration, bounded(stage, UPSTREAM_STAGES)).observe(seconds)

    def count_reply(self, stage: str, code: int) -> None:
        child = self._reply_children.get((stage, code))
        if child is None:  # several replies per message: the labels are worked out once
            label = bounded("helo" if stage == "ehlo" else stage, REPLY_STAGES)
            child = self._child(self.smtp_replies, label, code_class(code))
            if len(self._reply_children) < 4096:  # stage and code come from our own code
                self._reply_children[(stage, code)] = child
        child.inc()

    def set_dnsbl_zone_health(self, zone: str, healthy: bool) -> None:
        """``zone`` must already be masked (``filter.dnsbl.mask_zone``)."""
        self._child(self.dnsbl_zone_healthy, zone).set(1 if healthy else 0)

    def forget_dnsbl_zone(self, zone: str) -> None:
        """Drop a zone's health series once the policy no longer has it.

        With workers (multiprocess mode) it cannot go: prometheus_client keeps every
        series in the workers' files and its remove() only warns (a Python warning on
        stderr at each reload). There the series keeps its last value until a restart.
        """
        self._children.pop((id(self.dnsbl_zone_healthy), (zone,)), None)
        if multiprocess_enabled():
            return
        if (zone,) in self.dnsbl_zone_healthy._metrics:  # remove() raises for an unknown one
            self.dnsbl_zone_healthy.remove(zone)

    def count_dnsbl_hit(self, zone: str, label: str) -> None:
        self._child(self.dnsbl_hits, zone, label or DNSBL_UNLABELLED).inc()

    def count_dnsbl_error(self, zone: str, reason: str) -> None:
        self._child(self.dnsbl_errors, zone, bounded(reason, DNSBL_ERROR_REASONS)).inc()

    def count_reload(self, ok: bool, generation: int | None = None) -> None:
        self.policy_reloads.labels(outcome="ok" if ok else "error").inc()
        if ok and generation is not None:
            self.policy_generation.set(generation)


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide Metrics on prometheus_client's global registry.

    Lazy, so importing this module registers nothing (tests build their own),
    and a singleton, since registering the same names twice is an error.
    """
    global _default
    if _default is None:
        _default = Metrics()
    return _default


def exposition(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """Render metrics as Prometheus text: ``(body, content_type)``.

    In multiprocess mode the in-memory registry holds only this process's
    view, so a fresh registry with a MultiProcessCollector reads every
    worker's files instead. The 0.0.4 text format is chosen because all our
    names are legacy-valid and every Prometheus version understands it.
    """
    reg = REGISTRY if registry is None else registry
    if multiprocess_enabled():
        merged = CollectorRegistry()
        merged.register(_Families(_multiprocess_families(reg)))
        return generate_latest(merged), CONTENT_TYPE_PLAIN_0_0_4
    return generate_latest(reg), CONTENT_TYPE_PLAIN_0_0_4


class _Families(Collector):
    """A fixed list of metric families, as one collector."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _multiprocess_families(declared: CollectorRegistry) -> list[Metric]:
    """Every worker's samples, plus an empty family for each metric without any yet.

    The workers' files hold only series that have a sample, so a labelled metric no
    worker has touched (``mailgate_check_results_total`` before the first check ran)
    would be missing from /metrics altogether; with one worker it is listed (HELP and
    TYPE, no samples). Both modes list the same metrics.
    """
    families = merge_worker_files(os.environ[MULTIPROC_ENV])
    seen = {f.name for f in families}
    for family in declared.collect():
        if family.name.startswith("mailgate_") and family.name not in seen:
            families.append(Metric(family.name, family.documentation, family.type))
    return families


def merge_worker_files(directory: str) -> list[Metric]:
    """The workers' samples from their files in ``directory``, skipping unreadable ones.

    prometheus_client merges all files in one go and one bad file fails the whole
    scrape (client_python #1199): a worker creates its file empty and sizes it a moment
    later, so a scrape in that window got no answer at all, and a worker killed in it
    leaves the empty file behind for good, failing every scrape after. Empty files
    hold nothing yet and are skipped; a file that still does not parse is left out
    with a warning, so one worker's file never hides every other worker's metrics.
    """
    files = [f for f in glob.glob(os.path.join(directory, "*.db")) if _nonempty(f)]
    try:
        return list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
    except Exception:  # any parse failure of any file: find which below
        good = []
        for f in files:
            try:
                list(MmapedDict.read_all_values_from_file(f))  # type: ignore[no-untyped-call]
            except Exception as exc:  # struct, unicode, json, size errors
                log.warning("metrics: left out unreadable worker file %s: %s", f, exc)
            else:
                good.append(f)
        return list(MultiProcessCollector.merge(good, accumulate=True))  # type: ignore[no-untyped-call]


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # removed meanwhile (mark_process_dead)
        return False


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (call from the parent on child exit)."""
    if multiprocess_enabled():
        _mark_process_dead(pid)  # type: ignore[no-untyped-call]
