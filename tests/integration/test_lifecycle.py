"""Reload, graceful shutdown, metrics and health of a running mailgate."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import AUTH_CHECKS_OFF, BASE_POLICY, StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.mailgate import REPO, MailgateProcess, deep_merge
from tests.rig.ports import free_port
from tests.rig.redisserver import wait_until
from tests.rig.tlscerts import issue_certificate
from tests.rig.upstream import ScriptedUpstream
from tests.rig.workers import TEST_REDIS_URL


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metrics(mg: MailgateProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = _get(f"http://127.0.0.1:{mg.metrics_port}/metrics")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _idle_metrics(mg: MailgateProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The metrics once no session is open (and a moment for cancelled checks to settle)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _metrics(mg).get(("mailgate_active_sessions", ()), 1.0) == 0:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("sessions still open after 5 s")
    time.sleep(0.1)
    return _metrics(mg)


def _send_one(mg: MailgateProcess) -> tuple[int, bytes]:
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("a@example.org")
        c.rcpt("bob@example.test")
        return c.data(message())


def test_metrics_move_with_traffic(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate()
    before = _metrics(mg)
    assert _send_one(mg)[0] == 250
    upstream.refuse()
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        assert c.mail("a@example.org")[0] == 451
    after = _metrics(mg)
    key = ("mailgate_messages_total", (("action", "accept"),))
    assert after[key] == before[key] + 1
    conns = ("mailgate_connections_total", (("result", "accepted"),))
    assert after[conns] >= before[conns] + 2
    up_err = sum(v for (n, _), v in after.items() if n == "mailgate_upstream_errors_total")
    assert up_err >= 1
    assert after[("mailgate_build_info", (("version", "0.1.0"),))] == 1
    _, text = _get(f"http://127.0.0.1:{mg.metrics_port}/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in (
        ("mailgate_active_sessions", "gauge"),
        ("mailgate_policy_reloads", "counter"),
        ("mailgate_store_errors", "counter"),
        ("mailgate_dns_query_duration_seconds", "histogram"),
        ("mailgate_greylist", "counter"),
        ("mailgate_check_results", "counter"),
        ("mailgate_upstream_errors", "counter"),
        ("mailgate_messages", "counter"),
        ("mailgate_connections", "counter"),
    ):
        assert families.get(name) == kind, name


def test_health_and_readiness(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate({"redis": {"url": TEST_REDIS_URL}})
    assert _get(f"http://127.0.0.1:{mg.metrics_port}/healthz")[0] == 200
    assert _get(f"http://127.0.0.1:{mg.metrics_port}/readyz")[0] == 200
    upstream.refuse()
    status, body = _get(f"http://127.0.0.1:{mg.metrics_port}/readyz")
    assert status == 503 and "upstream" in body
    assert _get(f"http://127.0.0.1:{mg.metrics_port}/healthz")[0] == 200


def test_readiness_reports_a_dead_store(mailgate: StartMailgate) -> None:
    mg = mailgate({"redis": {"url": "redis://127.0.0.1:1/0"}})
    status, body = _get(f"http://127.0.0.1:{mg.metrics_port}/readyz")
    assert status == 503 and "store" in body


def test_sighup_applies_a_valid_policy_and_refuses_a_broken_one(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"max_recipients": 1}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO a.example")
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    assert r.cmd("RCPT TO:<carol@example.test>").code == 452
    r.close()
    mg.reload({"server": {"max_recipients": 5}})
    time.sleep(0.5)
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO a.example")
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    assert r.cmd("RCPT TO:<carol@example.test>").code == 250
    r.close()
    # A broken policy is refused; the running one stays.
    mg.config_path.write_text('[server]\nmax_recipients = "many"\n')
    mg.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "policy reload refused" in mg.logs()
    assert "server.max_recipients" in mg.logs()
    m = _metrics(mg)
    assert m[("mailgate_policy_reloads_total", (("outcome", "error"),))] == 1
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO a.example")
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    assert r.cmd("RCPT TO:<carol@example.test>").code == 250


def _inside_data(mg: MailgateProcess, first_part: bytes) -> RawSMTP:
    """A session whose message is half sent: after DATA's 354 and ``first_part``."""
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    assert r.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("DATA").code == 354
    r.send(first_part)
    return r


def test_sigterm_drains_a_transaction_in_flight(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    upstream.script(delay={"data_end": 1.5})
    mg = mailgate({"server": {"shutdown_grace": "10s"}})
    idle = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    idle.banner()
    idle.cmd("EHLO idle.example")
    result: dict[str, object] = {}

    def send() -> None:
        with smtp_client("127.0.0.1", mg.smtp_port) as c:
            c.ehlo("client.example.org")
            c.mail("a@example.org")
            c.rcpt("bob@example.test")
            result["reply"] = c.data(message())
            result["quit"] = c.docmd("QUIT")

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.7)  # the message is now waiting for the slow upstream
    mg.send_signal(signal.SIGTERM)
    reply = idle.read_reply(timeout=5)
    assert (reply.code, reply.text.split()[0]) == (421, "4.3.2")
    t.join(10)
    assert result["reply"][0] == 250  # type: ignore[index]
    assert result["quit"][0] == 221  # type: ignore[index]
    assert mg.wait(timeout=10) == 0
    assert len(upstream.transactions) == 1
    assert "event=stopped sessions_cut=0 " in mg.logs()


def test_a_session_still_open_when_the_grace_runs_out_gets_421(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Past shutdown_grace a session is ended with 421 (the client retries later), its
    half-received message is never relayed, and the last log line says so."""
    mg = mailgate({"server": {"shutdown_grace": "1s"}})
    r = _inside_data(mg, b"Subject: cut\r\n\r\nhalf a message\r\n")
    mg.send_signal(signal.SIGTERM)
    reply = r.read_reply(timeout=5)
    assert (reply.code, reply.text.split()[0]) == (421, "4.3.2")
    r.close()
    assert mg.wait(timeout=10) == 0
    assert upstream.transactions == []
    stopped = _events(mg, "stopped")
    assert [(e["level"], e["sessions_cut"]) for e in stopped] == [("warning", "1")]


def test_two_workers_share_the_port_and_the_metrics(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    import os

    mg = mailgate({"server": {"workers": 2}})
    for _ in range(6):
        assert _send_one(mg)[0] == 250
    m = _metrics(mg)
    # Counted in two processes, summed by the parent (prometheus multiprocess mode).
    assert m[("mailgate_messages_total", (("action", "accept"),))] == 6
    assert len(upstream.wait_for_transactions(6)) == 6
    assert mg.proc is not None
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == mg.proc.pid]
    assert len(children) == 2
    mg.send_signal(signal.SIGTERM)
    assert mg.wait(timeout=15) == 0
    time.sleep(0.3)
    assert not any(os.path.exists(f"/proc/{pid}") and _ppid(pid) != 1 for pid in children)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["smtp", "metrics"])
def test_a_taken_port_is_one_clear_line_and_exit_1(
    tmp_path: Path, upstream: ScriptedUpstream, taken: str, workers: int
) -> None:
    mg = MailgateProcess(
        tmp_path, {"upstream": {"address": upstream.address}, "server": {"workers": workers}}
    )
    mg.write_policy()
    port = mg.smtp_port if taken == "smtp" else mg.metrics_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        done = subprocess.run(
            mg.command(), cwd=mg.dir, capture_output=True, timeout=30, check=False
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    expected = "cannot listen: " if taken == "smtp" else "cannot listen for metrics"
    assert expected in err and f"127.0.0.1:{port}" in err
    assert "Traceback" not in err


def _refused(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # The connect landed in the backlog of a listener closing just then: it is
        # going, not gone; the caller polls again.
        return False
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_health_api_stays_up_while_a_session_drains(
    mailgate: StartMailgate, upstream: ScriptedUpstream, workers: int
) -> None:
    """SIGTERM closes the SMTP listener at once, but /healthz, /readyz and /metrics
    answer until the last session is done: the process still serves, and a balancer
    must read "shutting down" rather than a refused connection."""
    mg = mailgate({"server": {"shutdown_grace": "10s", "workers": workers}})
    r = _inside_data(mg, b"Subject: draining\r\n\r\nfirst half\r\n")  # the session is busy
    mg.send_signal(signal.SIGTERM)
    # no new SMTP sessions (polled: with two workers the signal passes the supervisor)
    wait_until(lambda: _refused(mg.smtp_port), "the SMTP listener to close", timeout=5)
    assert _get(f"{mg.metrics_url}/healthz") == (200, "ok\n")
    status, body = _get(f"{mg.metrics_url}/readyz")
    assert status == 503 and "shutting down" in body
    assert _metrics(mg)[("mailgate_active_sessions", ())] == 1
    assert mg.returncode is None
    r.send(b"second half\r\n.\r\n")
    assert r.read_reply().code == 250  # the upstream's own 250, after the signal
    assert r.cmd("QUIT").code == 221
    r.close()
    assert mg.wait(timeout=15) == 0
    assert _refused(mg.metrics_port)  # closed once nothing was left to serve
    [txn] = upstream.wait_for_transactions(1)
    assert txn.message.endswith(b"first half\r\nsecond half\r\n")


def _events(mg: MailgateProcess, name: str) -> list[dict[str, str]]:
    """The ``event=<name>`` lines of mailgate's key=value log, as dicts."""
    found = []
    for line in mg.logs().splitlines():
        try:
            fields = dict(part.split("=", 1) for part in shlex.split(line))
        except ValueError:  # not a key=value line (the rig's own labels)
            continue
        if fields.get("event") == name:
            found.append(fields)
    return found


def _wait_for_events(mg: MailgateProcess, name: str, count: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while len(_events(mg, name)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} events\n{mg.logs()}"
        time.sleep(0.1)


def test_policy_reloads_count_sighups_only(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """The start is no reload: a dashboard of reloads by outcome shows SIGHUPs, and
    mailgate_policy_generation says which policy is loaded."""
    mg = mailgate()
    ok = ("mailgate_policy_reloads_total", (("outcome", "ok"),))
    error = ("mailgate_policy_reloads_total", (("outcome", "error"),))
    generation = ("mailgate_policy_generation", ())
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (0, 0, 1)
    mg.reload({"server": {"max_recipients": 5}})
    time.sleep(0.5)
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (1, 0, 2)
    mg.config_path.write_text('[server]\nmax_recipients = "many"\n')
    mg.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (1, 1, 2)
    _, text = _get(f"{mg.metrics_url}/metrics")
    assert "start is not counted" in text  # the HELP line says so too


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_reload_is_a_key_value_event(
    mailgate: StartMailgate, upstream: ScriptedUpstream, workers: int
) -> None:
    """Each problem is one ``event=policy_reload outcome=error issue=…`` line, from the
    supervisor (no worker field) and from every worker (worker=N)."""
    mg = mailgate({"server": {"workers": workers}})
    _wait_for_events(mg, "started", workers)  # a worker takes SIGHUP once it runs
    mg.config_path.write_text('[server]\nmax_recipients = "many"\nmode = "monitr"\n')
    mg.send_signal(signal.SIGHUP)
    time.sleep(0.8)
    refused = [e for e in _events(mg, "policy_reload") if e.get("outcome") == "error"]
    processes = [None] if workers == 1 else [None, "0", "1"]
    assert sorted(e.get("worker", "") for e in refused) == sorted(
        (p or "") for p in processes for _ in range(2)
    )
    for e in refused:
        assert e["level"] == "error" and e["msg"] == "policy reload refused"
    issues = {e["issue"] for e in refused}
    assert len(issues) == 2
    assert any("server.max_recipients" in i for i in issues)
    assert any("server.mode" in i and "monitr" in i for i in issues)
    assert not any("policy reload refused:" in line for line in mg.logs().splitlines())
    m = _metrics(mg)
    # One SIGHUP is one reload, however many workers (the supervisor counts it).
    assert m[("mailgate_policy_reloads_total", (("outcome", "error"),))] == 1


def test_one_sighup_counts_one_reload_with_several_workers(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """With two workers a good SIGHUP is ok=1 and generation 2, a refused one error=1;
    a worker restarted after them starts at the supervisor's generation and counts
    nothing, so the figures stay those of a single process."""
    mg = mailgate({"server": {"workers": 2}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    ok = ("mailgate_policy_reloads_total", (("outcome", "ok"),))
    error = ("mailgate_policy_reloads_total", (("outcome", "error"),))
    generation = ("mailgate_policy_generation", ())
    mg.reload({"server": {"workers": 2, "max_recipients": 5}})
    _wait_for_events(mg, "policy_reload", 2)
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (1, 0, 2)
    good = mg.config_path.read_text()
    mg.config_path.write_text('[server]\nmax_recipients = "many"\n')
    mg.send_signal(signal.SIGHUP)
    _wait_for_events(mg, "policy_reload", 5)  # the supervisor's and two workers' errors
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (1, 1, 2)
    mg.config_path.write_text(good)
    os.kill(_children(mg.proc.pid)[0], signal.SIGKILL)
    _wait_for_events(mg, "started", 3)
    assert _events(mg, "started")[-1]["generation"] == "2"
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (1, 1, 2)
    mg.send_signal(signal.SIGHUP)  # both workers, the restarted one too, reach 3
    _wait_for_events(mg, "policy_reload", 7)
    assert [e["generation"] for e in _events(mg, "policy_reload")[-2:]] == ["3", "3"]
    m = _metrics(mg)
    assert (m[ok], m[error], m[generation]) == (2, 1, 3)


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid]


def _rcpt_limit_reply(mg: MailgateProcess) -> int:
    """The reply to a second RCPT: 452 under max_recipients = 1, 250 above."""
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO a.example")
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    code = r.cmd("RCPT TO:<carol@example.test>").code
    r.close()
    return code


def test_a_restarted_worker_runs_the_reloaded_policy(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A worker that crashed comes back with the policy of the last good reload, not
    the one mailgate started with."""
    mg = mailgate({"server": {"workers": 2, "max_recipients": 1}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    mg.reload({"server": {"workers": 2, "max_recipients": 5}})
    _wait_for_events(mg, "policy_reload", 2)
    os.kill(_children(mg.proc.pid)[0], signal.SIGKILL)
    _wait_for_events(mg, "started", 3)
    assert len(_children(mg.proc.pid)) == 2
    # SO_REUSEPORT spreads connections over both workers: all see the reloaded limit.
    assert [_rcpt_limit_reply(mg) for _ in range(12)] == [250] * 12


def test_a_restarted_worker_keeps_the_listeners_the_others_serve(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """server.listen changes take effect after a restart of mailgate, not of one worker:
    a worker restarted after a reload that moved the port listened on the new port
    alone, so the old port lost a worker and the new one half worked."""
    mg = mailgate({"server": {"workers": 2}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    old_port, new_port = mg.smtp_port, free_port()
    mg.reload({"server": {"workers": 2, "listen": [f"127.0.0.1:{new_port}"]}})
    _wait_for_events(mg, "policy_reload", 2)
    assert "server.listen changed: takes effect after a restart" in mg.logs()
    os.kill(_children(mg.proc.pid)[0], signal.SIGKILL)
    _wait_for_events(mg, "started", 3)
    assert _events(mg, "started")[-1]["listen"] == f"127.0.0.1:{old_port}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", new_port), timeout=2).close()


def test_a_killed_workers_connections_stop_counting(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """The connection limits are counted for all workers together; the connections of a
    worker that was killed outright (no chance to count them out) are forgotten when
    the supervisor restarts it, so the client is not held below its limit for good."""
    mg = mailgate({"server": {"workers": 2, "max_connections_per_ip": 4}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    held = [RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.41").connect() for _ in range(4)]
    assert [s.banner().code for s in held] == [220] * 4
    for pid in _children(mg.proc.pid):  # both: whichever holds the connections
        os.kill(pid, signal.SIGKILL)
    _wait_for_events(mg, "started", 4)
    for s in held:
        s.close()
    again = [RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.41").connect() for _ in range(5)]
    codes = [s.banner().code for s in again]
    for s in again:
        s.close()
    assert sorted(codes) == [220, 220, 220, 220, 421]  # the workers accept in parallel


def test_sighups_while_a_worker_restarts_are_reloads_not_its_death(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """SIGHUPs sent throughout a worker's restart: none may hit the new worker before
    its handler (SIGHUP stays blocked until then), so it is restarted exactly once.
    The window is a few milliseconds, so this guards the race rather than forcing it."""
    mg = mailgate({"server": {"workers": 2}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    os.kill(_children(mg.proc.pid)[0], signal.SIGKILL)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        mg.send_signal(signal.SIGHUP)
        time.sleep(0.005)
    _wait_for_events(mg, "started", 3)
    time.sleep(0.5)
    assert mg.logs().count("died; restarting it") == 1, mg.logs()
    assert len(_children(mg.proc.pid)) == 2
    assert _send_one(mg)[0] == 250


def test_a_worker_that_cannot_start_is_restarted_less_and_less_often(
    tmp_path: Path, mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A worker that dies young again and again (here: its TLS certificate was moved
    away after the policy naming it loaded) is restarted after 1, 2, 4 … s, not five
    times a second; the other worker serves meanwhile, /readyz says when none runs, and
    both are back once the file is."""
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    mg = mailgate({"server": {"workers": 2, "tls": tls}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    first, second = _children(mg.proc.pid)
    hidden = cert.with_name("moved-away.pem")
    cert.rename(hidden)
    os.kill(first, signal.SIGKILL)
    time.sleep(4.5)
    crashes = mg.logs().count("crashed")
    assert 1 <= crashes <= 3, mg.logs()  # unthrottled: a crash every ~0.5 s
    assert "died; restarting it in 2s (2 death(s) in a row" in mg.logs()
    assert _send_one(mg)[0] == 250  # the other worker
    assert _get(f"{mg.metrics_url}/readyz")[0] == 200
    os.kill(second, signal.SIGKILL)
    wait_until(
        lambda: _get(f"{mg.metrics_url}/readyz") == (503, "no worker running\n"),
        "/readyz to report that no worker runs",
        timeout=8,
    )
    hidden.rename(cert)
    wait_until(lambda: len(_children(mg.proc.pid)) == 2, "both workers back", timeout=20)  # type: ignore[union-attr]
    _wait_for_events(mg, "started", 4, within=10)
    assert _send_one(mg)[0] == 250
    assert mg.returncode is None


def _gone(pids: list[int]) -> bool:
    """True when none of pids is alive (a zombie of a dead parent is reaped by init)."""
    return not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def _kill_leftovers(mg: MailgateProcess, pids: list[int]) -> None:
    """SIGKILL those of pids that still run mg's mailgate (a failed test leaves no
    orphans behind; the cmdline check guards against a reused pid)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if str(mg.dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A supervisor killed outright (OOM killer, SIGKILL) cannot forward anything. Its
    workers must not serve on as orphans that nobody reloads, stops or restarts, and
    that keep the port from a new mailgate: they finish what is in flight and exit."""
    mg = mailgate({"server": {"workers": 2, "shutdown_grace": "10s"}})
    _wait_for_events(mg, "started", 2)
    assert mg.proc is not None
    workers = _children(mg.proc.pid)
    assert len(workers) == 2
    r = _inside_data(mg, b"Subject: orphaned\r\n\r\nfirst half\r\n")
    mg.proc.kill()
    mg.proc.wait(5)
    try:
        wait_until(lambda: _refused(mg.smtp_port), "the workers to close the SMTP listener", 5)
        r.send(b"second half\r\n.\r\n")
        assert r.read_reply().code == 250  # drained, not cut off
        r.close()
        wait_until(lambda: _gone(workers), "the orphaned workers to exit", 10)
    finally:
        _kill_leftovers(mg, workers)
    assert mg.logs().count("event=supervisor_gone") == 2, mg.logs()
    [txn] = upstream.wait_for_transactions(1)
    assert txn.message.endswith(b"first half\r\nsecond half\r\n")


def test_sigterm_while_the_supervisor_starts_stops_every_process(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """SIGTERM as soon as the first worker is forked, while the supervisor is still
    starting: it must not die of the signal's default action and orphan its workers.
    The signals start as soon as a child exists, three times over."""
    for attempt in range(3):
        mg = MailgateProcess(
            tmp_path / f"mg{attempt}",
            deep_merge(
                BASE_POLICY, {"upstream": {"address": upstream.address}, "server": {"workers": 2}}
            ),
        )
        mg.write_policy()
        with open(mg.stderr_path, "wb") as err:  # a file: orphans would hold a pipe open
            proc = subprocess.Popen(mg.command(), cwd=REPO, stderr=err)
        children: list[int] = []
        try:
            # /proc/PID/task/PID/children is one small read: the poll spins fast enough
            # to signal within the milliseconds between the fork and the handlers.
            listing = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            deadline = time.monotonic() + 15
            while not children and time.monotonic() < deadline and proc.poll() is None:
                children = [int(c) for c in listing.read_text().split()]
            assert children, "no worker was forked"
            # SIGTERM again and again through the supervisor's start: a dozen signals
            # are one stop, and none may land before the handler and kill it.
            until = time.monotonic() + 0.3
            while time.monotonic() < until and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.001)
            proc.wait(15)
            assert proc.returncode == 0, mg.stderr()
            time.sleep(0.3)
            assert _gone(children), f"attempt {attempt}: workers {children} outlived the supervisor"
            assert _refused(mg.smtp_port)
        finally:
            if proc.poll() is None:
                proc.kill()
            _kill_leftovers(mg, children)


def test_connect_checks_run_once_per_session(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """rdns and the DNSBL start at connect; EHLO waits for them and must not run them
    again (doubled DNS queries, metrics and EHLO latency before this was fixed)."""
    mg = mailgate(
        {
            **AUTH_CHECKS_OFF,
            "rdns": {"enabled": True},
            "helo": {"enabled": True},
            "dnsbl": {"enabled": True, "zones": [{"zone": "bl.lifecycle.test", "score": 1.0}]},
        }
    )
    # The rig's readiness probe (banner, QUIT) is a session too: its connect checks may
    # or may not finish before it ends, so count from after it is gone.
    before = _idle_metrics(mg)
    for _ in range(2):
        assert _send_one(mg)[0] == 250
    after = _idle_metrics(mg)

    def runs(check: str) -> float:
        return sum(
            v - before.get((name, labels), 0.0)
            for (name, labels), v in after.items()
            if name == "mailgate_check_results_total" and ("check", check) in labels
        )

    assert (runs("rdns"), runs("dnsbl"), runs("helo")) == (2, 2, 2)


def _nofile_after_raise(soft: int, hard: int, max_connections: int) -> tuple[str, str]:
    """Run raise_open_files_limit in a child whose limits are (soft, hard)."""
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(stream=sys.stderr, format='%(message)s')\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from filter.app import raise_open_files_limit\n"
        f"print(raise_open_files_limit({max_connections}))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """Debian's soft limit (1024) is below what 1000 sessions need; out of descriptors,
    connections were accepted and dropped with no reply and no log line."""
    out, err = _nofile_after_raise(256, 8192, 1000)
    assert out.split() == ["8192", "8192"]
    assert "open files limit" not in err


def test_too_low_a_hard_limit_is_a_warning() -> None:
    out, err = _nofile_after_raise(300, 300, 1000)
    assert out.split() == ["300", "300"]
    assert "open files limit 300 is below the 3064 that server.max_connections = 1000" in err
