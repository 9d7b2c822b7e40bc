"""Which pytest-xdist worker this process is, so that parallel workers share nothing.

``scripts/test.sh`` runs the suite in several pytest-xdist processes. Every server a
test starts is private to its process already (Postfix, DNS, mailgate, scripted
upstreams), but two things are machine-wide: the shared Redis server and the loopback
port space. Each worker gets a Redis database of its own (``TEST_REDIS_DB``: the
``redis_url`` fixture flushes it before every test, which must never wipe another
worker's keys) and a slice of the port range of its own (``tests/rig/ports.py``).
Without xdist this is worker 0 of 1: database 9 and the whole range, as before.
"""

from __future__ import annotations

import os
import re

#: The first database of the tests; worker i uses FIRST_DB + i.
FIRST_DB = 9
#: Redis's default ``databases 16``: 0..15.
LAST_DB = 15


def worker_index() -> int:
    """0 for pytest-xdist's ``gw0`` (and without xdist), 1 for ``gw1``, …"""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    return int(match.group(1)) if match else 0


def worker_count() -> int:
    """How many xdist workers run the suite (1 without xdist)."""
    try:
        return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return 1


def _test_db() -> int:
    db = FIRST_DB + worker_index()
    if db > LAST_DB:
        raise RuntimeError(
            f"xdist worker {worker_index()} would need Redis database {db}; "
            f"at most {LAST_DB - FIRST_DB + 1} workers are supported (scripts/test.sh caps -n)"
        )
    return db


TEST_REDIS_DB = _test_db()
TEST_REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"


def worker_slice(low: int, high: int) -> tuple[int, int]:
    """This worker's share of the half-open range [low, high): equal slices in worker order.

    Ranges of the same width that are offset from each other map slice i onto slice i,
    which keeps a Redis Cluster node's bus port (+10000) in its own worker's share.
    """
    count = worker_count()
    width = (high - low) // count
    start = low + worker_index() * width
    return start, start + width
