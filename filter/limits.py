"""Connection limits: total and per client address (L1, pure bookkeeping).

In one process the counts are plain counters. With ``server.workers = N`` the
supervisor also hands every worker a ``SharedCounts`` table, so both limits hold for
the whole server, as Postfix's anvil counts ``smtpd_client_connection_count_limit``
for all its smtpd processes, and not N times each limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class SharedCounts:
    """Every worker's open connections, in one shared mapping, under one record lock.

    Created by the supervisor before it forks, so every worker maps the same memory.
    Each worker writes only its own column (its total and a table of per-address
    counters), so the supervisor can forget a dead worker's connections by clearing
    its column. Admitting a connection (read the sums, then count it in) holds an
    ``fcntl`` record lock on the mapping's file: the check and the count are one
    step for all workers, so a burst never overshoots a limit, and the kernel drops
    a lock whose holder died, so a killed worker cannot leave it held. It costs two
    system calls (about a microsecond) per connection and is held for a few.

    An address's count is kept in ``HASHES`` slots of ``SLOTS`` (a count-min
    sketch, where anvil keeps an exact table in a process of its own): another
    address sharing all of its slots can only make it look busier, never less busy,
    and with a few thousand open connections that takes a collision in every one of
    three 65,536-slot tables.
    """

    SLOTS = 1 << 16
    HASHES = 3

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.stride = 1 + self.SLOTS  # a column: the total, then the slots
        self._fd = os.memfd_create("mailgate-connection-counts", os.MFD_CLOEXEC)
        size = 4 * workers * self.stride
        os.ftruncate(self._fd, size)
        self._mem = mmap.mmap(self._fd, size)  # MAP_SHARED: one copy after fork
        self._ints = memoryview(self._mem).cast("i")

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def column(self, index: int) -> SharedColumn:
        return SharedColumn(self, index)

    def clear(self, index: int) -> None:
        """Forget what worker ``index`` counted: it died, its connections with it."""
        start = index * self.stride
        with self.locked():
            self._ints[start : start + self.stride] = memoryview(bytes(4 * self.stride)).cast("i")

    def total(self) -> int:
        ints, stride = self._ints, self.stride
        return sum(ints[w * stride] for w in range(self.workers))

    def per_ip(self, slots: tuple[int, ...]) -> int:
        ints, stride = self._ints, self.stride
        return min(sum(ints[w * stride + s] for w in range(self.workers)) for s in slots)

    def add(self, index: int, slots: tuple[int, ...], delta: int) -> None:
        base = index * self.stride
        self._ints[base] += delta
        for s in slots:
            self._ints[base + s] += delta

    @classmethod
    def slots_of(cls, ip: str) -> tuple[int, ...]:
        """The address's slots (1-based: 0 is the total), the same in every worker."""
        digest = hashlib.blake2b(ip.encode(), digest_size=2 * cls.HASHES).digest()
        return tuple(
            1 + int.from_bytes(digest[2 * i : 2 * i + 2], "big") for i in range(cls.HASHES)
        )


class SharedColumn:
    """One worker's part: admits against the sums of all, counts into its own column."""

    def __init__(self, counts: SharedCounts, index: int) -> None:
        self.counts = counts
        self.index = index

    def total(self) -> int:
        return self.counts.total()

    def per_ip(self, ip: str) -> int:
        return self.counts.per_ip(SharedCounts.slots_of(ip))

    def admit(self, ip: str | None, max_total: int, max_per_ip: int | None) -> str | None:
        """Count the connection in unless a limit is reached; why not, or None."""
        counts = self.counts
        slots = () if ip is None else SharedCounts.slots_of(ip)
        with counts.locked():
            if counts.total() >= max_total:
                return "refused_limit"
            if max_per_ip is not None and counts.per_ip(slots) >= max_per_ip:
                return "refused_per_ip"
            counts.add(self.index, slots, 1)
        return None

    def remove(self, ip: str | None) -> None:
        slots = () if ip is None else SharedCounts.slots_of(ip)
        with self.counts.locked():
            self.counts.add(self.index, slots, -1)


class ConnectionLimiter:
    """Admits a connection unless the total or the client's own count is at its limit.

    With ``shared`` (a worker of several) the limits apply to the sums over every
    worker; this process's own counts are still kept, to undo exactly what it added.
    """

    def __init__(self, max_total: int, max_per_ip: int, shared: SharedColumn | None = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.shared = shared
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str, per_ip: bool = True) -> str | None:
        """Count the connection in and return None, or return why it is refused.

        ``per_ip=False`` exempts the address from its own limit (Postfix as the
        before-queue proxy: every session comes from its address).
        """
        if self.shared is not None:
            refusal = self.shared.admit(ip, self.max_total, self.max_per_ip if per_ip else None)
            if refusal is not None:
                return refusal
        elif self.total >= self.max_total:
            return "refused_limit"
        elif per_ip and self._per_ip[ip] >= self.max_per_ip:
            return "refused_per_ip"
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def reserve(self) -> bool:
        """Count a connection whose client is not known yet (PROXY header pending) in the
        total only; False when the total is at its limit. Undo with ``unreserve``."""
        if self.shared is not None:
            if self.shared.admit(None, self.max_total, None) is not None:
                return False
        elif self.total >= self.max_total:
            return False
        self.total += 1
        return True

    def unreserve(self) -> None:
        self.total -= 1
        if self.shared is not None:
            self.shared.remove(None)

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        if self.shared is not None:
            self.shared.remove(ip)

    def count(self, ip: str) -> int:
        """This client's open connections, in every worker when shared."""
        return self._per_ip[ip] if self.shared is None else self.shared.per_ip(ip)

    def resize(self, max_total: int, max_per_ip: int) -> None:
        """Apply new limits from a reloaded policy; open connections are kept."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
