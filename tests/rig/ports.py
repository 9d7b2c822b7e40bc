"""Free loopback ports for servers the tests start.

Ports come from below the kernel's ephemeral range.  ``bind(0)`` hands out an
ephemeral port, and between releasing it and the server binding it again any
outgoing connection of the suite (SMTP clients, Postfix, redis-py) may take it as
its local port: CI once lost a run to exactly that (EADDRINUSE on the metrics
port).  Below the ephemeral range only listeners compete, and each port is handed
out once per test process. Under pytest-xdist every worker picks from a slice of the
range of its own (``tests.rig.workers.worker_slice``), so two workers never race for one
port.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from tests.rig.workers import worker_slice

_handed_out: set[int] = set()
_rng = random.Random(os.getpid())


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _pick(host: str, low: int, high: int, also: int = 0) -> int | None:
    """A port in this worker's slice of [low, high) free on host (and port+also when
    also is set)."""
    low, high = worker_slice(low, high)
    if high - low < 100:
        return None
    for _ in range(500):
        port = _rng.randrange(low, high)
        if port in _handed_out or (also and port + also in _handed_out):
            continue
        if _bindable(host, port) and (not also or _bindable(host, port + also)):
            _handed_out.add(port)
            if also:
                _handed_out.add(port + also)
            return port
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host, never one this process handed out before."""
    ephemeral = _ephemeral_low()
    port = _pick(host, max(10000, ephemeral - 12000), ephemeral)
    if port is not None:
        return port
    for _ in range(50):  # odd port range configured: fall back to the kernel's pick
        port = _kernel_port(host)
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on {host}")


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port that a Redis Cluster node can use: its bus port (+10000) must be free too."""
    ephemeral = _ephemeral_low()
    # Both the node port and its bus port stay below the ephemeral range when it allows.
    port = _pick(host, max(1024, ephemeral - 22000), ephemeral - 10000, also=10000)
    if port is None:
        port = _pick(host, 1024, 55535, also=10000)
    if port is None:
        raise RuntimeError("no free port pair for a Redis Cluster node")
    return port
