"""mailgate benchmark: the same SMTP load straight at a sink and through mailgate.

Run by ``make bench`` as ``.venv/bin/python tests/perf/bench.py``. Starts
``smtp-sink`` (Postfix's test sink) and ``python -m filter serve`` with a
generated policy, then for every scenario runs the C load generator
(``tests/perf/loadgen.c``, built on demand) alternately against the sink
(direct) and mailgate (proxy): direct, proxy, direct, proxy, ... One table per
scenario: msgs/s, proxy/direct ratio, latency, added latency, CPU per message.

``--checks auth`` turns SPF, DKIM, DMARC and ARC on: the harness serves the
sender's DNS itself (an in-process ``tests.rig.dnsserver.ZoneDNSServer``), sends
one DKIM-signed message for every transaction (direct and proxy alike), and
refuses to measure unless the warm-up messages came out of mailgate with
SPF_PASS, DKIM_PASS and DMARC_PASS.

``--checks none,all`` (a comma list) measures several configurations in one
sitting: one mailgate per configuration (own policy, port, metrics port and log;
all relaying to the one sink; the DNS server and the signed message shared), and
every round runs, per configuration in turn, a direct run and then that
configuration's proxy run: direct, none, direct, all, direct, none, ... Each
configuration gets its table as above; then, per scenario, each configuration
after the first is compared with the first: throughput relative to it (the
median over rounds of ratio / first's ratio, and of the raw msgs/s quotient),
CPU per message and p99 of both. Runs minutes apart on this machine differ by
+-25 %; runs seconds apart, in the same rounds, do not share that drift.

``--proxy HOST:PORT --sink HOST:PORT`` benchmarks a relay that is already
running (relaying to that sink) instead of starting mailgate (one configuration
only). See tests/perf/README.md for the columns and the caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN_BIN = HERE / "loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --checks auth/all: the sender the harness publishes DNS for and signs as
SENDER_DOMAIN = "sender.test"
DKIM_SELECTOR = "bench"
AUTH_SENDER = f"bench@{SENDER_DOMAIN}"
AUTH_SYMBOLS = ("SPF_PASS", "DKIM_PASS", "DMARC_PASS")
DNS_TTL = 3600  # longer than any run: the cache stays warm once it is warm
DNSBL_ZONE = "bl.bench.test"  # --checks all: nothing is listed in it
CONFIGURATIONS = ("none", "auth", "all")  # the values --checks takes, alone or as a list
CHECK_NAMES = ("spf", "dkim", "dmarc", "arc", "rdns", "helo", "dnsbl", "greylist")

# ------------------------------------------------------------------ pure helpers


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:25' -> ('127.0.0.1', 25); '[::1]:25' -> ('::1', 25)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_proc_stat(text: str) -> tuple[int, int]:
    """Parse /proc/<pid>/stat: return (ppid, CPU clock ticks).

    The ticks are utime + stime of the process (all its threads) plus cutime +
    cstime (children it has already reaped), so that a tree's total does not
    drop when a child exits. The command name may contain spaces and
    parentheses, hence the split after the last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime..cstime are 14..17
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, utime + stime + cutime + cstime


def descendants(root: int, parent_of: Mapping[int, int]) -> set[int]:
    """The root and every process below it, given a pid -> ppid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def median(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def parse_loadgen_output(stdout: str) -> dict[str, Any]:
    """The last line of loadgen's stdout is one JSON object."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("loadgen printed nothing")
    result: dict[str, Any] = json.loads(lines[-1])
    for key in ("messages", "errors", "elapsed_s", "msgs_per_s", "lat_us"):
        if key not in result:
            raise ValueError(f"loadgen output lacks {key!r}")
    return result


def parse_checks_list(text: str) -> list[str]:
    """'none,all' -> ['none', 'all']: the configurations to measure in one sitting.

    The first one is the baseline the others are compared with, so order matters.
    A name given twice is refused: both would share one label in the tables, the
    summary lines and the JSON, and nobody could tell them apart.
    """
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ValueError(f"--checks takes one or more of {', '.join(CONFIGURATIONS)}")
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        raise ValueError(
            f"--checks: unknown configuration {', '.join(unknown)} "
            f"(choose from {', '.join(CONFIGURATIONS)})"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--checks: {', '.join(repeated)} given more than once")
    return names


def default_sender(checks: str) -> str:
    """The envelope sender without --mail-from: with checks the one the harness
    publishes SPF for and signs as; without, the address every run used before."""
    return AUTH_SENDER if checks != "none" else f"sender@{SENDER_DOMAIN}"


def config_label(checks: str, without: frozenset[str] = frozenset()) -> str:
    """'all' with --without rdns,helo -> 'all-helo-rdns': the name a configuration
    goes by in the summary lines, so that a priced-out check shows in a grep."""
    return checks + (f"-{'-'.join(sorted(without))}" if without else "")


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(toml_str(v) for v in values) + "]"


def policy_toml(
    *,
    listen: str,
    upstream: str,
    metrics: str,
    workers: int,
    checks: str,
    nameservers: list[str],
    redis_url: str,
    xclient: bool,
    without: frozenset[str] = frozenset(),
) -> str:
    """The policy mailgate runs under during the benchmark (keys per CONTRACT.md).

    ``without`` names checks to leave off, to price one check by difference.
    """
    auth = checks in ("auth", "all")
    rest = checks == "all"
    on = {True: "true", False: "false"}
    parts = [
        "# Generated by tests/perf/bench.py for one benchmark run; not a deployment policy.",
        "[server]",
        f"listen = {toml_list([listen])}",
        'hostname = "mailgate-bench.test"',
        'mode = "enforce"',
        "trusted_networks = []  # 127.0.0.1 is a client like any other: the checks run",
        'max_message_size = "64MiB"',
        "max_recipients = 100",
        "max_connections = 10000",
        "max_connections_per_ip = 10000  # all load comes from one address",
        'command_timeout = "1m"',
        'shutdown_grace = "2s"',
        f"workers = {workers}",
        "",
        "[upstream]",
        f"address = {toml_str(upstream)}",
        f"xclient = {on[xclient]}",
        'timeout = "30s"',
        "",
        "[dns]",
        f"nameservers = {toml_list(nameservers)}",
        'timeout = "2s"',
        "",
        "[redis]",
        f"url = {toml_str(redis_url)}",
        'key_prefix = "mailgate-bench:"',
        'on_error = "accept"',
        "",
        "[metrics]",
        f"listen = {toml_str(metrics)}",
        "",
    ]
    for name, enabled in (("spf", auth), ("dkim", auth), ("dmarc", auth), ("arc", auth)):
        parts += [f"[{name}]", f"enabled = {on[enabled and name not in without]}", ""]
    # FCrDNS and HELO sanity come with the reputation checks ("all"), not with "auth".
    for name in ("rdns", "helo"):
        parts += [f"[{name}]", f"enabled = {on[rest and name not in without]}", ""]
    dnsbl = rest and "dnsbl" not in without
    parts += ["[dnsbl]", f"enabled = {on[dnsbl]}", ""]
    if dnsbl:
        parts += ["[[dnsbl.zones]]", f"zone = {toml_str(DNSBL_ZONE)}", "score = 10.0"]
        parts += ["reject = true", ""]
    greylist = rest and "greylist" not in without
    parts += ["[greylist]", f"enabled = {on[greylist]}"]
    if greylist:
        parts += ['apply = "always"', 'delay = "1s"', 'retry_window = "1h"']
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ --checks auth fixtures


def body_lines(nbytes: int) -> bytes:
    """CRLF lines of 76 characters (the last one shorter), nbytes in total, none
    starting with a dot; at least one short line."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    out = bytearray()
    line = 0
    nbytes = max(nbytes, 3)
    while len(out) < nbytes:
        rem = nbytes - len(out)
        chars = 76
        if rem < 76 + 2:
            chars = rem - 2
        elif rem < 76 + 2 + 3:
            chars = rem - 2 - 3  # leave room for a last line of at least one character
        chars = max(chars, 1)
        out += bytes(alphabet[(line + i) % len(alphabet)] for i in range(chars)) + b"\r\n"
        line += 1
    return bytes(out)


def signed_message(size: int, mail_from: str, rcpt_to: str, privkey_pem: bytes) -> bytes:
    """One DKIM-signed message of ``size`` bytes in total (signature included) when
    possible: From, To, Subject, Date, Message-ID, then 76-character body lines."""
    import email.utils

    import dkim

    domain = mail_from.rpartition("@")[2]
    header = (
        f"From: {mail_from}\r\n"
        f"To: {rcpt_to}\r\n"
        f"Subject: mailgate bench, DKIM-signed\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-ID: <{os.getpid()}.{int(time.time())}.bench@{domain}>\r\n"
        "\r\n"
    ).encode()
    sig_len = 0
    message = b""
    for _ in range(4):  # the signature's length settles after one pass
        body = body_lines(size - len(header) - sig_len)
        unsigned = header + body
        sig = dkim.sign(
            unsigned,
            DKIM_SELECTOR.encode(),
            domain.encode(),
            privkey_pem,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        message = sig + unsigned
        if len(sig) == sig_len:
            break
        sig_len = len(sig)
    return message


def auth_records(key_record: str, helo: str) -> list[tuple[str, str, Any]]:
    """The zone data --checks auth/all needs: SPF, DMARC and the DKIM key record of the
    sender, SPF and A for the HELO name, PTR for 127.0.0.1, an empty DNSBL zone."""
    from tests.rig.dnsserver import soa

    d = SENDER_DOMAIN
    spf = "v=spf1 ip4:127.0.0.0/8 -all"
    records: list[tuple[str, str, Any]] = [
        soa(d, minimum=DNS_TTL),  # negative answers are cached for an hour too
        (d, "TXT", spf),
        (d, "A", "127.0.0.1"),
        (f"_dmarc.{d}", "TXT", "v=DMARC1; p=reject"),
        (f"{DKIM_SELECTOR}._domainkey.{d}", "TXT", key_record),
        ("1.0.0.127.in-addr.arpa", "PTR", helo),
        soa("in-addr.arpa", minimum=DNS_TTL),
        soa(DNSBL_ZONE, minimum=DNS_TTL),
    ]
    if helo.lower().rstrip(".").endswith("." + d):
        records += [(helo, "TXT", spf), (helo, "A", "127.0.0.1")]
    return records


@dataclass
class AuthFixture:
    dns: Any  # tests.rig.dnsserver.ZoneDNSServer
    message_file: Path
    message_size: int


def start_auth_fixture(a: argparse.Namespace, workdir: Path, mail_from: str) -> AuthFixture:
    """Start the DNS server, write the signed message, and check the signature
    verifies against the published key (before mailgate ever sees it).

    One fixture serves every configuration with checks: they read the same zone
    and send the same message, so they differ in their policy alone."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import dkim

    from tests.rig.dkimkeys import rsa_dkim_key
    from tests.rig.dnsserver import ZoneDNSServer

    pem, key_record = rsa_dkim_key()
    dns_server = ZoneDNSServer(auth_records(key_record, a.helo), ttl=DNS_TTL).start()
    message = signed_message(a.size, mail_from, a.rcpt_to, pem)
    key_name = f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}."

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key_record.encode() if name.decode() == key_name else None

    if not dkim.verify(message, dnsfunc=dnsfunc):
        dns_server.stop()
        raise SetupError("the benchmark message does not verify against its own DKIM key")
    path = workdir / "message.eml"
    path.write_bytes(message)
    return AuthFixture(dns_server, path, len(message))


_KV_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def message_events(text: str) -> list[dict[str, str]]:
    """The ``event=message`` lines of a mailgate log (kv or JSON), as str fields;
    list fields (symbols, rcpts) come back comma-joined, as the kv format writes them."""
    events = []
    for line in text.splitlines():
        if "message" not in line:
            continue
        fields: dict[str, str] = {}
        if line.lstrip().startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                for k, v in data.items():
                    fields[k] = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        else:
            for key, value in _KV_FIELD.findall(line):
                if value.startswith('"'):
                    value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                fields[key] = value
        if fields.get("event") == "message":
            events.append(fields)
    return events


def missing_auth_symbols(
    event: Mapping[str, str], without: frozenset[str] = frozenset()
) -> list[str]:
    symbols = set(event.get("symbols", "").split(","))
    wanted = [s for s in AUTH_SYMBOLS if s.partition("_")[0].lower() not in without]
    return [s for s in wanted if s not in symbols]


# ------------------------------------------------------------------ /proc accounting


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks) for every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            text = _read(f"/proc/{entry}/stat")
            if text:
                with contextlib.suppress(ValueError, IndexError):
                    table[int(entry)] = parse_proc_stat(text)
    return table


def tree_cpu_seconds(root: int | None, table: Mapping[int, tuple[int, int]]) -> float | None:
    """CPU seconds used so far by root and all its descendants (None if no root)."""
    if root is None or root not in table:
        return None
    pids = descendants(root, {pid: ppid for pid, (ppid, _) in table.items()})
    return sum(table[p][1] for p in pids if p in table) / CLK_TCK


def system_ticks() -> tuple[int, int]:
    """(total, idle) jiffies from the first line of /proc/stat."""
    text = _read("/proc/stat") or "cpu 0 0 0 0 0"
    values = [int(x) for x in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


# ------------------------------------------------------------------ processes


class SetupError(Exception):
    pass


def free_port() -> int:
    """A listening port below the ephemeral range (the test rig's allocator): the
    load generator's own connections cannot take it between pick and bind."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.rig.ports import free_port as rig_free_port

    return rig_free_port()


def smtp_banner(host: str, port: int, timeout: float = 2.0) -> str | None:
    """The 220 banner of an SMTP server, or None if nothing answers properly."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data or data.splitlines()[-1][3:4] == b"-":
                chunk = s.recv(1024)
                if not chunk:
                    return None
                data += chunk
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
                s.recv(1024)
            text = data.decode(errors="replace").strip()
            return text if text.startswith("220") else None
    except OSError:
        return None


def wait_for_banner(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SetupError(f"process exited with status {proc.returncode} before listening")
        banner = smtp_banner(host, port, timeout=1.0)
        if banner:
            return banner
        time.sleep(0.1)
    raise SetupError(f"no SMTP banner on {format_hostport(host, port)} within {timeout:.0f} s")


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None


@dataclass
class Processes:
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path | None = None) -> Started:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            # own session: a Ctrl-C reaches only us, and we stop the whole group
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        s = Started(name, proc, log)
        self.started.append(s)
        return s

    def stop_all(self) -> None:
        for s in reversed(self.started):
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGTERM)
        for s in reversed(self.started):
            try:
                s.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                print(f"# {s.name} ignored SIGTERM; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=5)
            # workers that outlived their parent are still in the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, signal.SIGKILL)
        self.started.clear()


def ensure_loadgen() -> Path:
    if LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN_BIN
    cc = os.environ.get("CC", "cc")
    tmp = LOADGEN_BIN.with_suffix(".tmp")
    cmd = [cc, "-std=c11", "-O2", "-pthread", "-Wall", "-Wextra", "-o", str(tmp), str(LOADGEN_SRC)]
    print("# building loadgen: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    tmp.replace(LOADGEN_BIN)
    return LOADGEN_BIN


# ------------------------------------------------------------------ runs


@dataclass
class Scenario:
    sessions: int
    per_conn: int
    size: int
    duration: float

    def title(self) -> str:
        return (
            f"{self.sessions} session(s) x {self.per_conn} msgs/conn, "
            f"{self.size}-byte messages, {self.duration:g} s per run"
        )


@dataclass
class Bench:
    args: argparse.Namespace
    loadgen: Path
    direct: str
    proxy: str
    mailgate_pid: int | None
    sink_pid: int | None
    deadline: float
    json_out: Any = None
    message_file: Path | None = None  # the one message every transaction sends
    dns: Any = None  # the in-process ZoneDNSServer (--checks auth/all)
    checks: str = "none"  # the configuration mailgate runs: none, auth or all
    label: str = "none"  # checks plus what --without left off, e.g. all-helo-rdns
    mail_from: str = ""  # the envelope sender of this configuration's runs
    log: Path | None = None  # mailgate's log (None for an external relay)

    def loadgen_cmd(self, target: str, sc: Scenario, duration: float, cap: int) -> list[str]:
        a = self.args
        message = (
            ["--message-file", str(self.message_file)]
            if self.message_file
            else ["--size", str(sc.size)]
        )
        cmd = [
            str(self.loadgen),
            "--target",
            target,
            "--sessions",
            str(sc.sessions),
            "--per-conn",
            str(sc.per_conn),
            *message,
            "--duration",
            f"{duration:g}",
            "--max-messages",
            str(cap),
            "--from",
            self.mail_from or a.mail_from,
            "--to",
            a.rcpt_to,
            "--helo",
            a.helo,
            "--io-timeout",
            str(a.io_timeout),
        ]
        if a.source_ip:
            cmd += ["--source-ip", a.source_ip]
        if a.lat_from_connect:
            cmd.append("--lat-from-connect")
        return cmd

    def run_once(
        self, kind: str, sc: Scenario, duration: float | None = None, cap: int | None = None
    ) -> dict[str, Any]:
        target = self.direct if kind == "direct" else self.proxy
        duration = sc.duration if duration is None else duration
        cmd = self.loadgen_cmd(target, sc, duration, cap or self.args.max_messages)
        limit = max(1.0, min(duration + self.args.io_timeout + 5, self.deadline - time.monotonic()))
        dns0 = self.dns.count() if self.dns else None
        table0, sys0 = process_table(), system_ticks()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"kind": kind, "failed": f"loadgen did not finish within {limit:.0f} s"}
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        table1, sys1 = process_table(), system_ticks()
        try:
            res = parse_loadgen_output(proc.stdout)
        except ValueError as e:
            return {"kind": kind, "failed": f"{e}; rc={proc.returncode} {proc.stderr[-400:]}"}
        res["kind"] = kind
        res["wall_s"] = round(wall, 4)
        res["stderr"] = proc.stderr.strip()
        busy_total = sys1[0] - sys0[0]
        res["sys_busy_pct"] = (
            100.0 * (busy_total - (sys1[1] - sys0[1])) / busy_total if busy_total else None
        )
        cpu: dict[str, float | None] = {
            "loadgen": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        }
        for name, pid in (("mailgate", self.mailgate_pid), ("sink", self.sink_pid)):
            before, after = tree_cpu_seconds(pid, table0), tree_cpu_seconds(pid, table1)
            cpu[name] = None if before is None or after is None else after - before
        res["cpu_s"] = cpu
        n = res["messages"]
        if self.dns:
            res["dns_queries"] = self.dns.count() - dns0
        res["cpu_ms_per_msg"] = {
            k: (1000 * v / n if v is not None and n else None) for k, v in cpu.items()
        }
        return res

    def emit(self, record: dict[str, Any]) -> None:
        if self.json_out:
            self.json_out.write(json.dumps(record) + "\n")
            self.json_out.flush()


def summarize(sc: Scenario, rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per-round pairs -> medians, ratios and added latency."""

    def ok(r: dict[str, Any] | None) -> bool:
        return r is not None and "failed" not in r

    per_round = []
    for rnd in rounds:
        d, p = rnd.get("direct"), rnd.get("proxy")
        row: dict[str, Any] = {"direct": d, "proxy": p}
        if ok(d) and ok(p) and d and p and d["msgs_per_s"] > 0:
            row["ratio"] = p["msgs_per_s"] / d["msgs_per_s"]
            row["added_p50_us"] = p["lat_us"]["p50"] - d["lat_us"]["p50"]
            row["added_p99_us"] = p["lat_us"]["p99"] - d["lat_us"]["p99"]
        per_round.append(row)

    def med(kind: str, *path: str) -> float | None:
        vals = []
        for row in per_round:
            r = row[kind]
            if not ok(r):
                continue
            for key in path:
                r = r.get(key) if isinstance(r, dict) else None
            vals.append(r)
        return median(vals)

    def total(kind: str, key: str) -> int:
        return sum(row[kind].get(key, 0) for row in per_round if ok(row[kind]))

    return {
        "scenario": sc.__dict__,
        "rounds": len(per_round),
        "ratios": [row.get("ratio") for row in per_round],
        "ratio_median": median(row.get("ratio") for row in per_round),
        "direct_msgs_per_s": med("direct", "msgs_per_s"),
        "proxy_msgs_per_s": med("proxy", "msgs_per_s"),
        "direct_p50_us": med("direct", "lat_us", "p50"),
        "direct_p99_us": med("direct", "lat_us", "p99"),
        "proxy_p50_us": med("proxy", "lat_us", "p50"),
        "proxy_p99_us": med("proxy", "lat_us", "p99"),
        "added_p50_us": median(row.get("added_p50_us") for row in per_round),
        "added_p99_us": median(row.get("added_p99_us") for row in per_round),
        "mailgate_cpu_ms_per_msg": med("proxy", "cpu_ms_per_msg", "mailgate"),
        "sink_cpu_ms_per_msg_direct": med("direct", "cpu_ms_per_msg", "sink"),
        "sink_cpu_ms_per_msg_proxy": med("proxy", "cpu_ms_per_msg", "sink"),
        "direct_busy_pct": med("direct", "sys_busy_pct"),
        "proxy_busy_pct": med("proxy", "sys_busy_pct"),
        "proxy_dns_queries": total("proxy", "dns_queries"),
        "direct_errors": total("direct", "errors"),
        "proxy_errors": total("proxy", "errors"),
        "failed_runs": sum(not ok(row[k]) for row in per_round for k in ("direct", "proxy")),
        "per_round": [
            {k: v for k, v in row.items() if k not in ("direct", "proxy")} for row in per_round
        ],
    }


def compare_configs(
    first_rounds: list[dict[str, dict[str, Any]]],
    first: dict[str, Any],
    other_rounds: list[dict[str, dict[str, Any]]],
    other: dict[str, Any],
) -> dict[str, Any]:
    """One configuration against the first, over the rounds both ran (round i of
    each ran seconds apart, so the machine's drift between sittings cancels).

    ``throughput`` is the median of other ratio / first ratio per round: each side
    is normalised by its own adjacent direct run first. ``raw_throughput`` is the
    median of the per-round quotients of proxy msgs/s, without that normalisation;
    when the two disagree, the direct runs (bimodal at one session) are the noise.
    """

    def rate(run: dict[str, Any] | None) -> float | None:
        return run["msgs_per_s"] if run and "failed" not in run else None

    per_round: list[float | None] = []
    raw_per_round: list[float | None] = []
    for ratio_f, ratio_o, rnd_f, rnd_o in zip(
        first["ratios"], other["ratios"], first_rounds, other_rounds, strict=True
    ):
        per_round.append(ratio_o / ratio_f if ratio_f and ratio_o is not None else None)
        rate_f, rate_o = rate(rnd_f.get("proxy")), rate(rnd_o.get("proxy"))
        raw_per_round.append(rate_o / rate_f if rate_f and rate_o is not None else None)
    cpu_f, cpu_o = first["mailgate_cpu_ms_per_msg"], other["mailgate_cpu_ms_per_msg"]
    return {
        "rounds": len(per_round),
        "throughput": median(per_round),
        "throughput_per_round": per_round,
        "raw_throughput": median(raw_per_round),
        "raw_throughput_per_round": raw_per_round,
        "mailgate_cpu_ms_per_msg": cpu_o,
        "first_mailgate_cpu_ms_per_msg": cpu_f,
        "cpu_quotient": cpu_o / cpu_f if cpu_f and cpu_o is not None else None,
        "proxy_p99_us": other["proxy_p99_us"],
        "first_proxy_p99_us": first["proxy_p99_us"],
    }


# ------------------------------------------------------------------ output


def fmt(value: float | None, spec: str = ".0f") -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.00"


def ms(us: float | None) -> str:
    return "-" if us is None else fmt(us / 1000, ".2f")


HEADER = (
    f"{'':>7} {'direct/s':>9} {'proxy/s':>9} {'ratio':>6} "
    f"{'direct p50/p99 ms':>17} {'proxy p50/p99 ms':>17} {'added p50/p99 ms':>17} "
    f"{'mg cpu ms/msg':>13} {'sink ms/msg d/p':>15} {'busy% d/p':>9} {'errors d/p':>10}"
)


def table_row(
    label: str, d: dict[str, Any] | None, p: dict[str, Any] | None, extra: dict[str, Any]
) -> str:
    def get(r: dict[str, Any] | None, *path: str) -> Any:
        if r is None or "failed" in r:
            return None
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None
        return r

    def both(path: tuple[str, ...], spec: str = ".0f", sep: str = "/") -> str:
        return fmt(get(d, *path), spec) + sep + fmt(get(p, *path), spec)

    def lat(r: dict[str, Any] | None) -> str:
        return ms(get(r, "lat_us", "p50")) + " / " + ms(get(r, "lat_us", "p99"))

    cells = [
        f"{label:>7}",
        f"{fmt(get(d, 'msgs_per_s')):>9}",
        f"{fmt(get(p, 'msgs_per_s')):>9}",
        f"{fmt(extra.get('ratio'), '.3f'):>6}",
        f"{lat(d):>17}",
        f"{lat(p):>17}",
        f"{ms(extra.get('added_p50_us')) + ' / ' + ms(extra.get('added_p99_us')):>17}",
        f"{fmt(get(p, 'cpu_ms_per_msg', 'mailgate'), '.3f'):>13}",
        f"{both(('cpu_ms_per_msg', 'sink'), '.3f'):>15}",
        f"{both(('sys_busy_pct',)):>9}",
        f"{both(('errors',)):>10}",
    ]
    return " ".join(cells)


def print_scenario(
    sc: Scenario, rounds: list[dict[str, dict[str, Any]]], summary: dict[str, Any], label: str = ""
) -> None:
    """The table of one configuration; ``label`` names it when there are several."""
    what = f", checks {label}" if label else ""
    print(f"\n== {sc.title()}, {len(rounds)} round(s), interleaved{what} ==")
    print(HEADER)
    for i, (rnd, extra) in enumerate(zip(rounds, summary["per_round"], strict=True), 1):
        print(table_row(f"round {i}", rnd.get("direct"), rnd.get("proxy"), extra))
    med_d = {
        "msgs_per_s": summary["direct_msgs_per_s"],
        "lat_us": {"p50": summary["direct_p50_us"], "p99": summary["direct_p99_us"]},
        "cpu_ms_per_msg": {"sink": summary["sink_cpu_ms_per_msg_direct"]},
        "sys_busy_pct": summary["direct_busy_pct"],
        "errors": summary["direct_errors"],
    }
    med_p = {
        "msgs_per_s": summary["proxy_msgs_per_s"],
        "lat_us": {"p50": summary["proxy_p50_us"], "p99": summary["proxy_p99_us"]},
        "cpu_ms_per_msg": {
            "mailgate": summary["mailgate_cpu_ms_per_msg"],
            "sink": summary["sink_cpu_ms_per_msg_proxy"],
        },
        "sys_busy_pct": summary["proxy_busy_pct"],
        "errors": summary["proxy_errors"],
    }
    extra = {
        "ratio": summary["ratio_median"],
        "added_p50_us": summary["added_p50_us"],
        "added_p99_us": summary["added_p99_us"],
    }
    print(table_row("median", med_d, med_p, extra) + "   (errors: totals)")
    ratios = " ".join(fmt(r, ".3f") for r in summary["ratios"])
    print(f"ratio proxy/direct: median {fmt(summary['ratio_median'], '.3f')}  per round [{ratios}]")


def comparison_line(first: str, other: str, comp: dict[str, Any]) -> str:
    """'all / none: throughput 0.47 (per round 0.45 0.49; raw msgs/s 0.46), ...':
    the figure a bar like "at least 60 % of the empty pipeline" is read from."""
    per_round = " ".join(fmt(x, ".2f") for x in comp["throughput_per_round"])
    cpu_q = comp["cpu_quotient"]
    return (
        f"{other} / {first}: throughput {fmt(comp['throughput'], '.2f')} "
        f"(per round {per_round}; raw msgs/s {fmt(comp['raw_throughput'], '.2f')}), "
        f"cpu ms/msg {fmt(comp['mailgate_cpu_ms_per_msg'], '.2f')} vs "
        f"{fmt(comp['first_mailgate_cpu_ms_per_msg'], '.2f')}"
        + (f" ({fmt(cpu_q, '.2f')}x)" if cpu_q is not None else "")
        + f", p99 {ms(comp['proxy_p99_us'])} vs {ms(comp['first_proxy_p99_us'])} ms"
    )


def comparison_summary_line(sc: Scenario, first: str, other: str, comp: dict[str, Any]) -> str:
    """The comparison for grep; it starts with compare= so that ``grep ^scenario=``
    still finds only the one-configuration lines."""
    return " ".join(
        [
            f"compare={other}/{first}",
            f"scenario={sc.sessions}x{sc.per_conn}",
            f"throughput={fmt(comp['throughput'], '.3f')}",
            f"raw_throughput={fmt(comp['raw_throughput'], '.3f')}",
            f"mg_cpu_ms={fmt(comp['mailgate_cpu_ms_per_msg'], '.3f')}",
            f"first_mg_cpu_ms={fmt(comp['first_mailgate_cpu_ms_per_msg'], '.3f')}",
            f"cpu_quotient={fmt(comp['cpu_quotient'], '.2f')}",
            f"p99_ms={ms(comp['proxy_p99_us'])}",
            f"first_p99_ms={ms(comp['first_proxy_p99_us'])}",
            f"rounds={comp['rounds']}",
        ]
    )


def loud(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! {message}\n{bar}", flush=True)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", default="1,20", help="concurrent sessions, comma list")
    ap.add_argument("--per-conn", type=int, default=10, help="messages per connection")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes (headers+body)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per scenario: a direct+proxy pair per configuration each",
    )
    ap.add_argument("--workers", type=int, default=1, help="mailgate server.workers")
    ap.add_argument(
        "--checks",
        default="none",
        metavar="CONF[,CONF...]",
        help="none: every check disabled; auth: SPF/DKIM/DMARC/ARC; all: + DNSBL, greylist; "
        "a comma list (none,all) runs one mailgate per configuration in the same rounds "
        "and compares each with the first",
    )
    ap.add_argument(
        "--without",
        default="",
        metavar="CHECK,...",
        help="leave these checks off in every configuration but none "
        "(prices a check by difference)",
    )
    ap.add_argument("--json-out", help="append JSON lines (every run and a summary per scenario)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="overall bound in seconds")
    ap.add_argument("--proxy", help="HOST:PORT of a relay already running: do not start mailgate")
    ap.add_argument(
        "--proxy-pid", type=int, help="with --proxy: pid whose process tree is the relay"
    )
    ap.add_argument(
        "--sink", help="HOST:PORT of the sink; started there unless one already answers"
    )
    ap.add_argument("--sink-pid", type=int, help="pid of an already running sink (CPU accounting)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load first")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between runs")
    ap.add_argument("--max-messages", type=int, default=2_000_000, help="message cap per run")
    ap.add_argument("--io-timeout", type=int, default=10, help="loadgen socket timeout (s)")
    ap.add_argument("--source-ip", help="bind loadgen connections to this local address")
    ap.add_argument(
        "--lat-from-connect",
        action="store_true",
        help="time a connection's first message from connect() (as shared/bench does)",
    )
    ap.add_argument(
        "--mail-from",
        help=f"envelope sender (default {AUTH_SENDER} with checks, sender@{SENDER_DOMAIN} "
        "without; given, every configuration sends it)",
    )
    ap.add_argument("--rcpt-to", default="rcpt@rcpt.test")
    ap.add_argument("--helo", default="client.sender.test")
    ap.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="redis.url (--checks all)"
    )
    ap.add_argument("--no-xclient", action="store_true", help="upstream.xclient = false")
    ap.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds to wait for mailgate"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (policy, mailgate log)")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="run mailgate under cProfile; pstats written to FILE "
        "(with several configurations, to FILE.<checks> each)",
    )
    a = ap.parse_args(argv)
    try:
        a.configs = parse_checks_list(a.checks)
    except ValueError as e:
        ap.error(str(e))
    a.checks = ",".join(a.configs)
    a.without = frozenset(x.strip() for x in a.without.split(",") if x.strip())
    unknown = a.without - set(CHECK_NAMES)
    if unknown:
        ap.error(f"--without: unknown checks {', '.join(sorted(unknown))}")
    try:
        a.session_list = [int(x) for x in a.sessions.split(",") if x.strip()]
    except ValueError:
        ap.error("--sessions takes a comma list of integers")
    if not a.session_list or min(a.session_list) < 1 or a.per_conn < 1 or a.rounds < 1:
        ap.error("--sessions, --per-conn and --rounds must be positive")
    if a.workers < 1 or a.duration <= 0:
        ap.error("--workers and --duration must be positive")
    if a.proxy and not a.sink:
        ap.error("--proxy needs --sink HOST:PORT: the sink that relay delivers to")
    if a.proxy and len(a.configs) > 1:
        ap.error("--proxy measures one relay: give --checks a single configuration")
    if a.mail_from is None and len(a.configs) == 1:
        a.mail_from = default_sender(a.checks)
    # with several configurations and no --mail-from each keeps its own default sender
    sender_domain = (a.mail_from or AUTH_SENDER).rpartition("@")[2].lower()
    if a.configs != ["none"] and sender_domain != SENDER_DOMAIN:
        ap.error(f"with --checks {a.checks} the sender must be in {SENDER_DOMAIN}")
    return a


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so that cleanup runs.

    SIGINT is set explicitly: a shell starts background jobs with it ignored.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def start_sink(a: argparse.Namespace, procs: Processes) -> tuple[str, int | None]:
    if a.sink:
        host, port = parse_hostport(a.sink)
        if smtp_banner(host, port):
            print(f"# sink: using the server already on {a.sink} (pid {a.sink_pid or '?'})")
            return a.sink, a.sink_pid
    else:
        host, port = "127.0.0.1", free_port()
    exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(exe):
        raise SetupError("smtp-sink not found (Debian: apt-get install postfix)")
    argv = [exe, format_hostport(host, port), "1024"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    s = procs.start("smtp-sink", argv)
    wait_for_banner(host, port, 10.0, s.proc)
    print(f"# sink: {' '.join(argv)} (pid {s.proc.pid})")
    return format_hostport(host, port), s.proc.pid


def sender_for(a: argparse.Namespace, checks: str) -> str:
    """The envelope sender of one configuration's runs, direct and proxy."""
    return str(a.mail_from or default_sender(checks))


def without_for(a: argparse.Namespace, checks: str) -> frozenset[str]:
    """--without applies to every configuration but none, which has nothing to leave off."""
    return a.without if checks != "none" else frozenset()


def profile_path(profile: str, checks: str, several: bool) -> Path:
    """Where a mailgate's pstats go: FILE, or FILE.<checks> when several mailgates
    would otherwise overwrite one another's file."""
    path = Path(profile).resolve()
    return path.with_name(f"{path.name}.{checks}") if several else path


def start_mailgate(
    a: argparse.Namespace,
    procs: Processes,
    workdir: Path,
    sink: str,
    nameservers: list[str],
    checks: str,
    several: bool = False,
) -> tuple[str, int, Path]:
    """Start one mailgate for one configuration. With several, each has a policy,
    a log, a listen port and a metrics port of its own; all relay to the one sink."""
    port, mport = free_port(), free_port()
    listen = f"127.0.0.1:{port}"
    stem = f"mailgate-{checks}" if several else "mailgate"
    config = workdir / f"{stem}.toml"
    config.write_text(
        policy_toml(
            listen=listen,
            upstream=sink,
            metrics=f"127.0.0.1:{mport}",
            workers=a.workers,
            checks=checks,
            nameservers=nameservers,
            redis_url=a.redis_url,
            xclient=not a.no_xclient,
            without=a.without,
        )
    )
    log = workdir / f"{stem}.log"
    argv = [sys.executable, "-m", "filter", "serve", "--config", str(config)]
    if a.profile:
        # cProfile writes its file when serve returns (SIGTERM drains, then exits)
        argv[1:1] = ["-m", "cProfile", "-o", str(profile_path(a.profile, checks, several))]
    s = procs.start(stem, argv, log=log)
    try:
        wait_for_banner("127.0.0.1", port, a.start_timeout, s.proc)
    except SetupError as e:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise SetupError(f"{stem} did not start: {e}\n--- {log} (tail) ---\n{tail}") from e
    tag = f" [{config_label(checks, without_for(a, checks))}]" if several else ""
    print(f"# mailgate{tag}: {' '.join(argv)} (pid {s.proc.pid}, workers {a.workers})")
    print(f"# mailgate log{tag}: {log}; metrics on 127.0.0.1:{mport}")
    return listen, s.proc.pid, log


def start_benches(
    a: argparse.Namespace,
    procs: Processes,
    workdir: Path,
    loadgen: Path,
    deadline: float,
    json_out: Any,
    fixture: AuthFixture | None,
) -> list[Bench]:
    """The sink, then one mailgate (or the external relay) per configuration, in
    --checks order; a Bench for each, all sharing the sink and the fixture."""
    several = len(a.configs) > 1
    sink, sink_pid = start_sink(a, procs)
    benches = []
    for checks in a.configs:
        own = fixture if checks != "none" else None  # none sends what it always sent
        if a.proxy:
            parse_hostport(a.proxy)
            wait_for_banner(*parse_hostport(a.proxy), 5.0)
            proxy, mailgate_pid, log = a.proxy, a.proxy_pid, None
            print(f"# proxy: external relay on {proxy} (pid {mailgate_pid or '?'})")
        else:
            nameservers = [own.dns.nameserver] if own else []
            proxy, mailgate_pid, log = start_mailgate(
                a, procs, workdir, sink, nameservers, checks, several
            )
        b = Bench(a, loadgen, sink, proxy, mailgate_pid, sink_pid, deadline, json_out)
        b.checks, b.label = checks, config_label(checks, without_for(a, checks))
        b.mail_from, b.log = sender_for(a, checks), log
        if own:
            b.message_file, b.dns = own.message_file, own.dns
        benches.append(b)
    return benches


def message_size(a: argparse.Namespace, bench: Bench) -> int:
    return bench.message_file.stat().st_size if bench.message_file else int(a.size)


def meta_record(a: argparse.Namespace, benches: list[Bench]) -> dict[str, Any]:
    """The first JSON line: as it always was for one configuration; with several,
    their proxies and messages under "configurations"."""
    record: dict[str, Any] = {"type": "meta", "argv": sys.argv, "direct": benches[0].direct}
    if len(benches) == 1:
        record["proxy"] = benches[0].proxy
        record["checks"] = a.checks
        record["message_bytes"] = message_size(a, benches[0])
    else:
        record["checks"] = a.checks
        record["configurations"] = [
            {
                "checks": b.checks,
                "label": b.label,
                "proxy": b.proxy,
                "message_bytes": message_size(a, b),
                "mail_from": b.mail_from,
            }
            for b in benches
        ]
    record |= {"nproc": os.cpu_count(), "loadavg": os.getloadavg(), "time": time.time()}
    return record


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    deadline = time.monotonic() + a.time_limit
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    keep = a.keep
    json_out = open(a.json_out, "a") if a.json_out else None  # noqa: SIM115
    exit_code = 0
    fixture: AuthFixture | None = None
    try:
        with interruptible():
            loadgen = ensure_loadgen()
            if a.configs != ["none"]:
                fixture = start_auth_fixture(a, workdir, sender_for(a, "auth"))
            print_header(a, fixture)
            benches = start_benches(a, procs, workdir, loadgen, deadline, json_out, fixture)
            benches[0].emit(meta_record(a, benches))
            exit_code = run_all(a, benches)
            keep = keep or (exit_code != 0 and not a.proxy)
    except KeyboardInterrupt:
        print("\n# interrupted; stopping what was started", file=sys.stderr)
        exit_code = 130
    except (SetupError, subprocess.CalledProcessError, ValueError) as e:
        print(f"bench: {e}", file=sys.stderr)
        exit_code = 2
        keep = True
    finally:
        # a second Ctrl-C must not leave the sink or mailgate behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        if fixture:
            fixture.dns.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if json_out:
            json_out.close()
        if keep:
            print(f"# work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code


def print_header(a: argparse.Namespace, fixture: AuthFixture | None) -> None:
    """What is measured: per configuration its checks and its messages; the shared
    DNS server once."""
    if len(a.configs) > 1:
        print(
            f"# configurations: {', '.join(a.configs)}, one mailgate each; every round runs "
            f"direct then proxy for each in turn; compared with {a.configs[0]}"
        )
    dns_shown = False
    for checks in a.configs:
        own = fixture if checks != "none" else None
        print_checks_header(a, checks, sender_for(a, checks), own, show_dns=not dns_shown)
        dns_shown = dns_shown or own is not None


def print_checks_header(
    a: argparse.Namespace,
    checks: str,
    mail_from: str,
    fixture: AuthFixture | None,
    show_dns: bool = True,
) -> None:
    if checks == "none":
        print("# checks: none (spf, dkim, dmarc, arc, dnsbl, greylist disabled)")
        print(f"# messages: generated by loadgen, {a.size} bytes, unsigned, unique Message-IDs")
        return
    on = "spf, dkim, dmarc, arc" + (", dnsbl, greylist" if checks == "all" else "")
    off = "" if checks == "all" else "; dnsbl, greylist off"
    print(f"# checks: {checks} ({on} on{off}); trusted_networks = []")
    if fixture:
        if show_dns:
            print(
                f"# dns: in-process ZoneDNSServer on {fixture.dns.nameserver} (TTL {DNS_TTL} s): "
                f"SPF, DMARC p=reject, DKIM key {DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN} "
                "(RSA-2048, made now)"
            )
        print(
            f"# messages: {fixture.message_file} ({fixture.message_size} bytes, "
            f"DKIM-signed d={SENDER_DOMAIN}), the same for every transaction, direct and proxy; "
            f"MAIL FROM {mail_from}"
        )


def verify_auth(
    a: argparse.Namespace, bench: Bench, log: Path, sc: Scenario, tag: str = ""
) -> None:
    """Warm mailgate's DNS cache with 20 messages and insist that they passed SPF, DKIM
    and DMARC: a benchmark of a pipeline that silently fails its checks measures nothing."""
    n = 20
    offset = log.stat().st_size
    warm = Scenario(min(2, sc.sessions), sc.per_conn, sc.size, sc.duration)
    r = bench.run_once("proxy", warm, duration=10.0, cap=n)
    if "failed" in r or r["errors"] or r["messages"] != n:
        what = r.get("failed") or f"{r['messages']}/{n} accepted, {r['errors']} errors"
        raise SetupError(
            f"auth warm-up{tag} through mailgate: {what}\n{r.get('stderr', '')}\n(log: {log})"
        )
    events: list[dict[str, str]] = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # the log line may trail the 250 a little
        with open(log, "rb") as f:
            f.seek(offset)
            events = message_events(f.read().decode(errors="replace"))
        if len(events) >= n:
            break
        time.sleep(0.1)
    bad = [e for e in events if missing_auth_symbols(e, a.without) or e.get("action") != "accept"]
    if len(events) < n or bad:
        shown = "\n".join(
            f"  action={e.get('action')} symbols={e.get('symbols')} missing="
            + ",".join(missing_auth_symbols(e, a.without))
            for e in (bad or events)[:5]
        )
        raise SetupError(
            f"auth warm-up{tag}: {len(events)} event=message lines for {n} messages, "
            f"{len(bad)} without action=accept and all of {', '.join(AUTH_SYMBOLS)}; "
            f"the checks are not doing their job, so there is nothing to measure\n"
            f"{shown}\n(mailgate log: {log})"
        )
    symbols = sorted({e.get("symbols", "") for e in events})
    print(
        f"# auth warm-up{tag}: {n}/{n} accepted, symbols {' | '.join(symbols)}, "
        f"{r.get('dns_queries', '?')} DNS queries"
    )


def summary_line(bench: Bench, summary: dict[str, Any]) -> str:
    """One machine-greppable line per scenario and configuration."""
    sc = summary["scenario"]

    parts = [
        f"scenario={sc['sessions']}x{sc['per_conn']}",
        f"checks={bench.label}",
        f"ratio={fmt(summary['ratio_median'], '.3f')}",
        f"p99_added_ms={ms(summary['added_p99_us'])}",
        f"mg_cpu_ms={fmt(summary['mailgate_cpu_ms_per_msg'], '.3f')}",
        f"p50_ms={ms(summary['proxy_p50_us'])}",
        f"p99_ms={ms(summary['proxy_p99_us'])}",
        f"proxy_per_s={fmt(summary['proxy_msgs_per_s'])}",
        f"direct_per_s={fmt(summary['direct_msgs_per_s'])}",
        f"proxy_errors={summary['proxy_errors']}",
        f"rounds={summary['rounds']}",
    ]
    if bench.checks != "none":
        parts.append(f"dns_queries={summary['proxy_dns_queries']}")
    return " ".join(parts)


@dataclass
class Tally:
    """What went wrong over all runs; it decides the exit status."""

    proxy_errors: dict[str, int] = field(default_factory=dict)  # per configuration label
    failed: int = 0


def prepare(a: argparse.Namespace, bench: Bench, scenarios: list[Scenario], tag: str) -> None:
    """Before anything is measured: let the greylisting triplet pass, and with checks
    make sure they pass (verify_auth), for one configuration."""
    if bench.checks == "all" and not a.proxy:
        # the first attempt of a triplet is greylisted; retry it after the delay
        bench.run_once("proxy", scenarios[0], duration=2.0, cap=1)
        time.sleep(1.5)
    if bench.checks != "none":
        if bench.log is None:
            print("# external relay: cannot read its log, so the auth symbols go unchecked")
        else:
            verify_auth(a, bench, bench.log, scenarios[-1], tag)


def warm_up(a: argparse.Namespace, bench: Bench, sc: Scenario, tag: str) -> None:
    """Unrecorded load through both targets, so that first-connection costs do not
    land in round 1."""
    if a.warmup <= 0:
        return
    for kind in ("direct", "proxy"):
        w = bench.run_once(kind, sc, duration=a.warmup)
        if "failed" in w or w["errors"]:
            loud(f"warmup against {kind}{tag}: {w.get('failed') or str(w['errors']) + ' errors'}")
            if w.get("stderr"):
                print(w["stderr"])


def round_fits(a: argparse.Namespace, sc: Scenario, configs: int, deadline: float) -> bool:
    """Whether another round can start. With several configurations the whole round
    must fit, since the comparison pairs round i of each; with one, as it always was
    (its proxy run is cut at the deadline)."""
    needed = sc.duration + 2
    if configs > 1:
        needed += (2 * configs - 1) * (sc.duration + a.pause)
    return time.monotonic() + needed <= deadline


def run_pair(
    a: argparse.Namespace, bench: Bench, sc: Scenario, rnd: int, several: bool, tally: Tally
) -> dict[str, dict[str, Any]]:
    """One configuration's part of a round: a direct run, then its proxy run."""
    pair: dict[str, dict[str, Any]] = {}
    for kind in ("direct", "proxy"):
        r = bench.run_once(kind, sc)
        pair[kind] = r
        which = {"checks": bench.checks} if several else {}
        bench.emit({"type": "run", **which, "scenario": sc.__dict__, "round": rnd, **r})
        note = r.get("failed") or (
            f"{r['msgs_per_s']:.0f} msg/s, p50 {ms(r['lat_us']['p50'])} ms, "
            f"errors {r['errors']}"
            + (f", DNS queries {r['dns_queries']}" if kind == "proxy" and bench.dns else "")
        )
        what = f"{kind:6} {bench.label}" if several else f"{kind:6}"
        print(f"  {sc.sessions:>3} sess round {rnd + 1} {what}: {note}", flush=True)
        if "failed" in r:
            tally.failed += 1
        elif r["errors"]:
            if kind == "proxy":
                tally.proxy_errors[bench.label] = (
                    tally.proxy_errors.get(bench.label, 0) + r["errors"]
                )
                loud(
                    f"PROXY ERRORS: {r['errors']} failed transactions "
                    f"({r.get('io_errors', 0)} I/O) in round {rnd + 1}, "
                    f"{sc.sessions} sessions" + (f", checks {bench.label}" if several else "")
                )
            else:
                print(f"  ! {r['errors']} errors against the sink itself")
            if r.get("stderr"):
                print("  > " + r["stderr"].replace("\n", "\n  > "))
        time.sleep(a.pause)
    return pair


def report_scenario(
    benches: list[Bench],
    scenarios: list[Scenario],
    rounds: list[list[dict[str, dict[str, Any]]]],
) -> list[str]:
    """Tables, JSON records and comparisons of one scenario (scenarios[i] and
    rounds[i] belong to benches[i]); returns its lines for the summary at the end."""
    several = len(benches) > 1
    lines: list[str] = []
    summaries = []
    for bench, sc, rnds in zip(benches, scenarios, rounds, strict=True):
        summary = summarize(sc, rnds)
        summaries.append(summary)
        bench.emit({"type": "scenario", "checks": bench.checks, **summary})
        print_scenario(sc, rnds, summary, bench.label if several else "")
        lines.append(summary_line(bench, summary))
    if several:
        print()
    first = benches[0]
    for i in range(1, len(benches)):
        bench, sc = benches[i], scenarios[i]
        comp = compare_configs(rounds[0], summaries[0], rounds[i], summaries[i])
        bench.emit(
            {
                "type": "comparison",
                "checks": bench.checks,
                "label": bench.label,
                "first": first.checks,
                "first_label": first.label,
                "scenario": sc.__dict__,
                **comp,
            }
        )
        print(comparison_line(first.label, bench.label, comp))
        lines.append(comparison_summary_line(sc, first.label, bench.label, comp))
    return lines


def run_all(a: argparse.Namespace, benches: list[Bench]) -> int:
    several = len(benches) > 1
    tags = [f" [{b.label}]" if several else "" for b in benches]
    scenarios = [
        [Scenario(s, a.per_conn, message_size(a, b), a.duration) for s in a.session_list]
        for b in benches
    ]
    for bench, scs, tag in zip(benches, scenarios, tags, strict=True):
        prepare(a, bench, scs, tag)
    for bench, scs, tag in zip(benches, scenarios, tags, strict=True):
        warm_up(a, bench, scs[-1], tag)
    incomplete = False
    tally = Tally()
    summary_lines: list[str] = []
    for i in range(len(a.session_list)):
        here = [scs[i] for scs in scenarios]
        rounds: list[list[dict[str, dict[str, Any]]]] = [[] for _ in benches]
        for rnd in range(a.rounds):
            if not round_fits(a, here[0], len(benches), benches[0].deadline):
                incomplete = True
                break
            # A direct run before each configuration's proxy run (direct, none, direct,
            # all, ...), not one direct run per round shared by all of them: each
            # configuration's direct run sends that configuration's message and sender
            # (none: loadgen's unsigned ones; auth/all: the DKIM-signed one), so its ratio
            # is the very figure a one-configuration run gives; and the direct run that
            # normalises a proxy run is the one just before it, so drift within the round
            # cancels. With a shared direct run, ratio_all / ratio_none would be nothing
            # but the raw msgs/s quotient, which is reported beside it anyway.
            for j, bench in enumerate(benches):
                rounds[j].append(run_pair(a, bench, here[j], rnd, several, tally))
        if rounds[0]:
            summary_lines += report_scenario(benches, here, rounds)
        if incomplete:
            break
    if summary_lines:
        print()
        for line in summary_lines:
            print(line)
    if incomplete:
        loud(f"time limit ({a.time_limit:g} s) reached: results are incomplete")
    proxy_errors = sum(tally.proxy_errors.values())
    if proxy_errors:
        logs = [str(b.log) for b in benches if b.log and tally.proxy_errors.get(b.label)]
        where = f" (mailgate log: {', '.join(logs)})" if logs else ""
        loud(f"{proxy_errors} ERRORS THROUGH THE PROXY{where}")
    if tally.failed:
        loud(f"{tally.failed} run(s) failed outright")
    return 1 if proxy_errors or tally.failed or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
