"""Free loopback ports for servers the tests start (bind to 0, read, release)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (small race window: use it promptly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port that a Redis Cluster node can use: its bus port (+10000) must fit too."""
    for _ in range(200):
        port = free_port(host)
        if port + 10000 <= 65535:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")
