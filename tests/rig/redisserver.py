"""Private ``redis-server`` processes for the tests that need a Redis of their own
(Sentinel, Cluster, password and ACL users, unix socket, TLS)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis


def start_redis_server(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    """A redis-server in the foreground on 127.0.0.1, persisting nothing (stop it with
    ``stop_servers``). ``args`` are redis-server's own: a config file, ``--port`` …"""
    return subprocess.Popen(
        ["redis-server", *args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` (Redis errors count as "not yet") until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop_servers(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=10)
