"""Connection limits: total and per client address (L1, pure bookkeeping).

Counts what is open in this process. With ``server.workers = N`` each worker applies
both limits on its own (there is no shared counter): the kernel spreads connections
across the workers' SO_REUSEPORT listeners unevenly, so a 1/N share would refuse
clients below their limit; up to N times each limit can be open instead.
"""

from __future__ import annotations

from collections import Counter


class ConnectionLimiter:
    """Admits a connection unless the total or the client's own count is at its limit."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str, per_ip: bool = True) -> str | None:
        """Count the connection in and return None, or return why it is refused.

        ``per_ip=False`` exempts the address from its own limit (Postfix as the
        before-queue proxy: every session comes from its address).
        """
        if self.total >= self.max_total:
            return "refused_limit"
        if per_ip and self._per_ip[ip] >= self.max_per_ip:
            return "refused_per_ip"
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def reserve(self) -> bool:
        """Count a connection whose client is not known yet (PROXY header pending) in the
        total only; False when the total is at its limit. Undo with ``unreserve``."""
        if self.total >= self.max_total:
            return False
        self.total += 1
        return True

    def unreserve(self) -> None:
        self.total -= 1

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def count(self, ip: str) -> int:
        return self._per_ip[ip]

    def resize(self, max_total: int, max_per_ip: int) -> None:
        """Apply new limits from a reloaded policy; open connections are kept."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
