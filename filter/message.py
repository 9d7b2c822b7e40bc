"""The message body received in DATA: in memory while small, spooled to disk when big.

Memory per session stays bounded by ``spool_threshold`` whatever the client sends.
The header block is kept in memory separately (bounded by MAX_HEADER_BLOCK) because
checks read it and header edits rewrite it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

from filter.headers import MAX_HEADER_BLOCK, filter_block, header_end, split_fields

CHUNK = 64 * 1024


class MessageBuffer:
    """Append-only store of unstuffed message content."""

    def __init__(self, spool_threshold: int = 1024 * 1024) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=spool_threshold)  # noqa: SIM115
        self._head = bytearray()
        self._header_end: int | None = None
        self._fields: list[tuple[bytes, bytes]] | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._file.write(data)
        self.size += len(data)
        if self._header_end is None and len(self._head) <= MAX_HEADER_BLOCK:
            search = max(0, len(self._head) - 3)
            self._head += data[: MAX_HEADER_BLOCK + 4 - len(self._head)]
            if self._head.startswith(b"\r\n"):
                self._header_end = 0
            else:
                i = self._head.find(b"\r\n\r\n", search)
                if i >= 0:
                    self._header_end = i + 2

    @property
    def header_complete(self) -> bool:
        """The blank line after the header fields has arrived."""
        return self._header_end is not None

    @property
    def header_overflow(self) -> bool:
        """The header fields run past MAX_HEADER_BLOCK: no blank line within it.

        Such a message is refused: the checks and the removal of forged fields only
        ever see the first MAX_HEADER_BLOCK bytes, so fields after it (a forged
        Authentication-Results, a second From) would go through unseen.
        """
        return self._header_end is None and self.size > MAX_HEADER_BLOCK

    @property
    def starts_folded(self) -> bool:
        """The first line is a continuation line (SP or HT): no header field to extend."""
        return bool(self._head) and self._head[0] in (0x20, 0x09)

    @property
    def header_block(self) -> bytes:
        """The header fields (each ending in CRLF), without the blank separator line.

        A message without a blank line is all header (RFC 5322 allows no body), up to
        MAX_HEADER_BLOCK.
        """
        end = self._header_end
        if end is None:
            end = min(len(self._head), self.size, MAX_HEADER_BLOCK)
        return bytes(self._head[:end])

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``split_fields`` of the header block: parsed once when the block is complete.

        The prefetch, DMARC and other readers of one message then share one parse.
        A copy of the list is returned, so no reader can change what another sees.
        """
        if self._fields is not None:
            return list(self._fields)
        fields = list(split_fields(self.header_block))
        if self._header_end is not None:
            self._fields = fields
            return list(fields)
        return fields

    def content(self) -> bytes:
        """The whole message; only for callers that accept its size in memory."""
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0, 2)
        return data

    def iter_chunks(
        self,
        prepend: bytes = b"",
        drop: Callable[[bytes, bytes], bool] | None = None,
    ) -> Iterator[bytes]:
        """The message for the upstream: new fields first, dropped fields left out."""
        block = self.header_block
        kept = filter_block(block, drop) if drop else block
        if prepend or kept:
            yield prepend + kept
        self._file.seek(len(block))
        while True:
            data = self._file.read(CHUNK)
            if not data:
                break
            yield data
        self._file.seek(0, 2)

    def close(self) -> None:
        self._file.close()


__all__ = ["MessageBuffer", "header_end"]
