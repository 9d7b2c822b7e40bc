"""Run mailgate as a real subprocess with a generated policy, for black-box tests.

A subprocess (not an in-process server) so signals, exit codes, logging and the
command line are tested the way an admin meets them.  The policy is written with a tiny
local TOML writer so this rig does not depend on the code under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.rig.ports import free_port

REPO = Path(__file__).resolve().parents[2]


# -- TOML writer (just what policies need) ------------------------------------------------
def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "-_" for c in k):
        return k
    return _toml_value(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"')
        out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        return f'"{out}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Path):
        return _toml_value(str(v))
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Serialise nested dicts / lists of dicts (``[[dnsbl.zones]]``) to TOML text."""
    lines: list[str] = []

    def table(path: list[str], d: Mapping[str, Any], header: str | None) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        scalars = {k: v for k, v in scalars.items() if not _is_table_array(v)}
        if header is not None and (scalars or not d):
            lines.append(header)
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if scalars or header:
            lines.append("")
        for k, v in d.items():
            sub = [*path, _toml_key(k)]
            if isinstance(v, Mapping):
                table(sub, v, f"[{'.'.join(sub)}]")
            elif _is_table_array(v):
                for item in v:
                    table(sub, item, f"[[{'.'.join(sub)}]]")

    table([], data, None)
    return "\n".join(lines).rstrip() + "\n"


LOG_FLUSH_WAIT = 0.4  # longer than mailgate's 0.25 s log flush interval


def deep_merge(
    base: dict[str, Any], over: Mapping[str, Any], expand_dots: bool = True
) -> dict[str, Any]:
    """Tables merge key by key; other values replace.

    Top-level ``"a.b": v`` keys are expanded (``{"server.mode": "monitor"}``); below the
    top level a dot is part of the key (``[domains."example.test"]``).
    """
    out = dict(base)
    for key, val in over.items():
        if expand_dots and "." in key:
            head, rest = key.split(".", 1)
            val = {rest: val}
            key = head
        if isinstance(val, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), val, expand_dots=False)
        elif isinstance(val, Mapping):
            out[key] = deep_merge({}, val, expand_dots=False)
        else:
            out[key] = val
    return out


class MailgateProcess:
    """``python -m filter serve --config <tmp>/mailgate.toml`` on free loopback ports.

    Defaults: listen ``127.0.0.1:<free>``, metrics ``127.0.0.1:<free>``,
    ``trusted_networks = []`` (so loopback test clients are checked, not exempt).
    ``overrides`` are merged over that (nested dicts or dotted keys).  Pass
    ``smtp_port`` to listen on a fixed port (e.g. ``postfix_filter.proxy_filter_port``).

    Usage::

        mg = MailgateProcess(tmp_path, {"upstream": {"address": up.address}}).start()
        smtp_client("127.0.0.1", mg.smtp_port) ...
        mg.send_signal(signal.SIGHUP); mg.stop(); print(mg.logs())
    """

    def __init__(
        self,
        tmp_dir: Path,
        overrides: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        smtp_port: int | None = None,
    ) -> None:
        self.dir = Path(tmp_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own_smtp_port = smtp_port is None
        self.smtp_port = smtp_port or free_port()
        self.metrics_port = free_port()
        self.config_path = self.dir / "mailgate.toml"
        self.stdout_path = self.dir / "mailgate.stdout"
        self.stderr_path = self.dir / "mailgate.stderr"
        self.env = dict(env or {})
        self.extra_args = list(args or [])
        self.policy: dict[str, Any] = deep_merge(
            {
                "server": {
                    "listen": [f"127.0.0.1:{self.smtp_port}"],
                    "hostname": "mx.mailgate.test",
                    "trusted_networks": [],
                },
                "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
                # Never real DNS from a test: a closed loopback port fails fast.
                # Fixtures point this at the loopback test DNS server instead.
                "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"},
            },
            overrides or {},
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def write_policy(self, overrides: Mapping[str, Any] | None = None) -> Path:
        """(Re)write the policy file, merging further overrides (then SIGHUP to reload)."""
        if overrides:
            self.policy = deep_merge(self.policy, overrides)
        self.config_path.write_text(dump_toml(self.policy))
        return self.config_path

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "filter",
            "serve",
            "--config",
            str(self.config_path),
            *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> MailgateProcess:
        """Start and wait for a 220 banner on the SMTP port; raise with stderr otherwise.

        If a port the rig picked was taken between the pick and the bind (another
        process's socket), the start is retried on fresh ports, at most twice.
        """
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if attempt == 2 or "address already in use" not in str(e).lower():
                    raise
                if not self._repick_ports():
                    raise
        raise AssertionError("unreachable")

    def _repick_ports(self) -> bool:
        """New free ports for the listeners the rig chose itself (False: none to change)."""
        metrics = self.policy.get("metrics", {})
        changed = False
        if metrics.get("listen") == f"127.0.0.1:{self.metrics_port}":
            self.metrics_port = free_port()
            self.policy["metrics"]["listen"] = f"127.0.0.1:{self.metrics_port}"
            changed = True
        server = self.policy.get("server", {})
        if self._own_smtp_port and server.get("listen") == [f"127.0.0.1:{self.smtp_port}"]:
            self.smtp_port = free_port()
            self.policy["server"]["listen"] = [f"127.0.0.1:{self.smtp_port}"]
            changed = True
        return changed

    def _start(self, timeout: float) -> MailgateProcess:
        self.write_policy()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("MAILGATE_CONFIG", None)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mailgate exited with {self.proc.returncode} during startup\n{self.logs()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as s:
                    s.settimeout(max(0.5, deadline - time.monotonic()))
                    if self.policy.get("server", {}).get("proxy_protocol"):
                        s.sendall(b"PROXY UNKNOWN\r\n")  # a health probe, as HAProxy sends
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
                    last_error = f"banner {banner!r}"
            except OSError as e:
                last_error = str(e)
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mailgate gave no 220 within {timeout}s ({last_error})\n{self.logs()}")

    def send_signal(self, sig: int = signal.SIGHUP) -> None:
        if self.proc is None:
            raise RuntimeError("not started")
        self.proc.send_signal(sig)

    def reload(self, overrides: Mapping[str, Any] | None = None) -> None:
        """Rewrite the policy and send SIGHUP."""
        self.write_policy(overrides)
        self.send_signal(signal.SIGHUP)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit and return the exit code."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after timeout); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> str:
        """stderr then stdout, labelled (mailgate logs to stderr).

        mailgate writes info lines in batches at least every 0.25 s (filter.logs), so a
        running process gets a moment to write what happened just before.
        """
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(LOG_FLUSH_WAIT)
        return f"--- stderr ---\n{self.stderr()}--- stdout ---\n{self.stdout()}"

    def __enter__(self) -> MailgateProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
