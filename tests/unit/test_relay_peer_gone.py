"""What waits in an upstream socket before the final dot: the end of the connection
(logged as such) or bytes (a protocol error). Both event loops mailgate may run on."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from filter.relay import _peer_gone
from filter.smtpstream import SMTPStream

pytestmark = pytest.mark.both_loops


async def _peer_does(action: str) -> str | None:
    """Connect an SMTPStream to a server that then closes, resets or talks; peek."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    _, stream = await loop.create_connection(SMTPStream, "127.0.0.1", port)
    peer, _ = await loop.sock_accept(server)
    await stream.connected
    stream.transport.pause_reading()  # the bytes stay in the socket, as before the dot
    if action == "close":
        peer.close()
    elif action == "reset":
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
    else:
        peer.send(b"250 early\r\n")
    await asyncio.sleep(0.05)
    try:
        return _peer_gone(stream)
    finally:
        stream.abort()
        if action == "talk":
            peer.close()
        server.close()


@pytest.mark.parametrize(
    ("action", "seen"), [("close", "closed"), ("reset", "reset"), ("talk", None)]
)
async def test_the_end_of_the_connection_is_told_from_bytes(action: str, seen: str | None) -> None:
    assert await _peer_does(action) == seen
