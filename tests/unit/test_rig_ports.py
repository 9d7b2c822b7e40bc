"""The test rig's port allocator: listeners stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket

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
