"""A spooled message on its way upstream: read from its body file in chunks, dot-stuffed on the fly.

Large messages never exist as one ``bytes`` on the sending side: the file is read a chunk at a
time (off the event loop), each chunk dot-stuffed (``DotStuffer``) and written with backpressure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import BinaryIO

CHUNK = 256 * 1024
_CRLF = b"\r\n"


class MessageFile:
    """A spooled message read from its body file: ``head`` (the header block, from the spool
    row, when the file holds only the body) then the file; ``size`` counts both."""

    __slots__ = ("_file", "head", "size")

    def __init__(self, file: BinaryIO, size: int, head: bytes = b"") -> None:
        self._file = file
        self.head = head
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        """The head, then the file from its start, ``CHUNK`` octets at a time."""
        if self.head:
            yield self.head
        await asyncio.to_thread(self._file.seek, 0)  # a retry sends it again from the start
        while chunk := await asyncio.to_thread(self._file.read, CHUNK):
            yield chunk

    def close(self) -> None:
        self._file.close()


MessageData = bytes | MessageFile


def message_size(data: MessageData) -> int:
    return len(data) if isinstance(data, bytes) else data.size


class DotStuffer:
    """RFC 5321 4.5.2 transparency, chunk by chunk: a line that starts with "." gets another.

    Keeps the last two octets it saw as context (at first a virtual CRLF, so a leading dot is
    stuffed), so a CRLF "." cut between two chunks is still found.
    """

    __slots__ = ("_context", "_empty")

    def __init__(self) -> None:
        self._context = _CRLF
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        self._empty = False
        context = self._context
        self._context = chunk[-2:] if len(chunk) >= 2 else (context + chunk)[-2:]
        if b"." not in chunk:
            return chunk  # memchr finds no dot at all: the usual case for base64 attachments
        piece = context + chunk
        # The context octets are never changed by the replacement: it only adds dots after them.
        return piece.replace(b"\r\n.", b"\r\n..")[2:] if b"\r\n." in piece else chunk

    def finish(self) -> bytes:
        """The end of data: a CRLF when the message lacks a final one, then "." CRLF."""
        ending = b"" if not self._empty and self._context == _CRLF else _CRLF
        return ending + b".\r\n"
