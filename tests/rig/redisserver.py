"""Private ``redis-server`` processes for the tests that need a Redis of their own
(Sentinel, Cluster, password and ACL users, unix socket, TLS), and a replicated
master under Sentinel for the failover tests (:func:`start_sentinel_group`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis

from tests.rig.ports import free_port

T = TypeVar("T")


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


# --- a replicated master under Sentinel, for failover tests ------------------------------

#: A full sync starts at once (Redis waits 5 s by default for more replicas to join).
_FAST_SYNC = ("--repl-diskless-sync-delay", "0")


def kill_servers(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGKILL servers whatever their state: a SIGSTOPped one ignores ``terminate`` until
    continued, so it is continued first (teardown of the failover tests)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        proc.wait(timeout=10)


@dataclass
class SentinelGroup:
    """A master, its replicas and sentinels (service ``service``), each in a directory
    of its own, on ports from ``free_port``. Instances are addressed by port; a port
    keeps its instance across ``restart`` (an old master coming back where it was)."""

    tmp: Path
    service: str
    master_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def start(self, port: int, *args: str) -> None:
        d = self.tmp / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = start_redis_server(d, *args)

    def client(self, port: int) -> redis.Redis:
        """A plain (decoding) client of one instance; close it after use."""
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def ask(self, what: Callable[[redis.Redis], T]) -> T:
        """``what`` of a fresh client of one instance (the first sentinel), closed after."""
        c = self.client(self.sentinel_ports[0])
        try:
            return what(c)
        finally:
            c.close()

    def master_as_sentinel_says(self) -> int | None:
        """The port the (first) sentinel names as the master, or None."""
        addr = self.ask(lambda c: c.sentinel_get_master_addr_by_name(self.service))
        return int(addr[1]) if addr else None

    def settled_master(self) -> int | None:
        """The master's port once the (first) sentinel has settled on it (linked, not
        down, no failover in progress), else None."""
        state = self.ask(lambda c: c.sentinel_master(self.service))
        return int(state["port"]) if state.get("flags") == "master" else None

    def role(self, port: int) -> str:
        c = self.client(port)
        try:
            return str(c.info("replication")["role"])
        finally:
            c.close()

    def in_sync(self, port: int) -> bool:
        """Whether a replica's link to its master is up."""
        c = self.client(port)
        try:
            return c.info("replication").get("master_link_status") == "up"
        finally:
            c.close()

    def send_signal(self, port: int, sig: signal.Signals) -> None:
        """SIGSTOP (freeze: connections hang, nothing is refused) or SIGCONT one instance."""
        os.kill(self.procs[port].pid, sig)

    def kill(self, port: int) -> None:
        """SIGKILL one instance (a crash: no shutdown, no goodbye to its clients)."""
        proc = self.procs[port]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed data instance again on its port, as it was configured at first
        (a master comes back believing it is one; the sentinels must demote it)."""
        self.start(port, "--port", str(port), *_FAST_SYNC)

    def close(self) -> None:
        kill_servers(self.procs.values())


def start_sentinel_group(
    tmp: Path,
    *,
    service: str = "mg",
    replicas: int = 1,
    sentinels: int = 1,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 2000,
) -> SentinelGroup:
    """Start a master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 1) and
    return once the replicas are in sync and every sentinel knows them. Replicas start
    before the sentinels so that the sentinels' first INFO of the master lists them
    (otherwise they would learn of them only at the next INFO, 10 s later).

    ``down_after_ms`` below 1000 makes the sentinel flap: it links to a master it has
    just promoted only after about half a second, may judge it down meanwhile and fail
    over again (to a restarted old master, if one is back: everything lost)."""
    master = free_port()
    group = SentinelGroup(tmp, service, master, [free_port() for _ in range(replicas)], [])
    try:
        group.start(master, "--port", str(master), *_FAST_SYNC)
        for port in group.replica_ports:
            group.start(
                port, "--port", str(port), "--replicaof", "127.0.0.1", str(master), *_FAST_SYNC
            )
        for port in group.replica_ports:
            wait_until(lambda port=port: group.in_sync(port), "replica in sync")  # type: ignore[misc]
        for _ in range(sentinels):
            port = free_port()
            group.sentinel_ports.append(port)
            d = tmp / str(port)
            d.mkdir()
            (d / "sentinel.conf").write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {service} 127.0.0.1 {master} 1\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            )
            group.procs[port] = start_redis_server(d, "sentinel.conf", "--sentinel")
        for port in group.sentinel_ports:
            s = group.client(port)
            try:
                wait_until(
                    lambda s=s: (
                        s.sentinel_master(service)["flags"] == "master"  # type: ignore[misc]
                        and len(s.sentinel_slaves(service)) == replicas
                    ),
                    "sentinel linked to the master and knowing the replicas",
                )
            finally:
                s.close()
    except BaseException:
        group.close()
        raise
    return group
