"""The test rig's port allocator: listeners stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket

import pytest

from tests.rig import workers
from tests.rig.ports import _ephemeral_low, free_cluster_port, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if low > 12000:
        assert all(p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_is_never_handed_out_twice_even_when_released() -> None:
    first = free_port()
    assert all(free_port() != first for _ in range(200))


def test_cluster_ports_leave_room_for_the_bus_port() -> None:
    port = free_cluster_port()
    assert port + 10000 <= 65535
    with socket.socket() as node, socket.socket() as bus:
        node.bind(("127.0.0.1", port))
        bus.bind(("127.0.0.1", port + 10000))


def test_xdist_workers_get_disjoint_port_slices_that_keep_bus_ports_at_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two parallel workers never pick the same port, nor one's bus port as the other's."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for i in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{i}")
        assert workers.worker_index() == i
        slices.append((workers.worker_slice(20000, 32000), workers.worker_slice(10000, 22000)))
    plain = [range(*s[0]) for s in slices]
    assert all(len(r) == 4000 for r in plain)
    assert not set(plain[0]) & set(plain[1]) and not set(plain[1]) & set(plain[2])
    for i, (free, cluster) in enumerate(slices):
        # a cluster node port of worker i has its bus port (+10000) in worker i's slice
        assert cluster[0] + 10000 == free[0] and cluster[1] + 10000 == free[1], i


def test_without_xdist_the_worker_is_the_only_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert (workers.worker_index(), workers.worker_count()) == (0, 1)
    assert workers.worker_slice(20000, 32000) == (20000, 32000)
