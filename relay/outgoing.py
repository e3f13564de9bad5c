"""A spooled message on its way upstream: read from its body file in chunks, dot-stuffed on the fly.

Large messages never exist as one ``bytes`` on the sending side: the file is read a chunk at a
time (off the event loop), each chunk dot-stuffed (``DotStuffer``) and written with backpressure.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 256 * 1024
_CRLF = b"\r\n"
# A piece of a message on its way: what is read from a file comes as a bytearray (no copy).
Chunk = bytes | bytearray
# Linux: a read that fails with EAGAIN instead of waiting for the disk.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


class MessageFile:
    """A spooled message read from its body file: ``head`` (the header block, from the spool
    row, when the file holds only the body) then the file; ``size`` counts both."""

    __slots__ = ("_file", "head", "size")

    def __init__(self, file: BinaryIO, size: int, head: bytes = b"") -> None:
        self._file = file
        self.head = head
        self.size = size

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The head, then the file from its start (also on a retry), ``CHUNK`` octets at a time.

        A body just received is still in the page cache: it is read on the event loop, which
        costs less than the hop to a thread and back; only what would wait for the disk is read
        in a thread.
        """
        if self.head:
            yield self.head
        descriptor, offset = self._file.fileno(), 0
        while True:
            chunk: Chunk | None = _read_cached(descriptor, offset)
            if chunk is None:
                chunk = await asyncio.to_thread(os.pread, descriptor, CHUNK, offset)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        self._file.close()


def _read_cached(descriptor: int, offset: int) -> bytearray | None:
    """Up to ``CHUNK`` octets at ``offset`` if the page cache holds them (b"" at the end),
    None if reading would wait for the disk or the system cannot tell."""
    if _NOWAIT is None:
        return None
    buffer = bytearray(CHUNK)  # not reused: the transport may keep what it is given
    try:
        count = os.preadv(descriptor, [buffer], offset, _NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None  # a file system or kernel without RWF_NOWAIT
        raise
    del buffer[count:]
    return buffer  # a bytearray: what DotStuffer and the transport take, without a copy


# A message as the upload reads it: its bytes, or its body file opened.
OpenedData = bytes | MessageFile
# Dots checked one by one before a search takes over: a header's worth (Message-Id, Date,
# Received lines with addresses). Each costs about what a search of 400 octets does.
_DOTS_BEFORE_SEARCH = 32
LINE_DOT = b"\r\n."  # the start of a line that begins with a dot (stuffed, or the end of data)


@dataclass(frozen=True, slots=True)
class SpooledBody:
    """A spooled message whose body is in a file: the header block kept apart (if any) and
    the file's name, not opened. It is opened only where it is read: in the upstream process
    when there is one, which spares the relay's event loop an open and a close per message."""

    head: bytes
    path: Path
    size: int  # the head and the file together

    def open(self) -> MessageFile:
        """The message to read; OSError (FileNotFoundError: the message was deleted)."""
        return MessageFile(self.path.open("rb"), self.size, self.head)


# A message as the delivery hands it to an upstream, and as the listener hands a fresh one
# to the delivery: its bytes, or its body file by name.
MessageData = bytes | SpooledBody


def message_size(data: MessageData | OpenedData) -> int:
    return len(data) if isinstance(data, bytes) else data.size


def find_line_dot(data: Chunk) -> int:
    """Where the first CRLF "." of ``data`` starts, or -1.

    A line that starts with a dot is stuffed on the way out and unstuffed on the way in, and
    the end of data starts so too. Dots are looked for with memchr, about 50 times faster
    than a search for the three octets: a chunk with none (base64 attachments) is passed at
    once, and so is the first chunk of a message whose only dots are in its header
    (Message-Id, Received). Text with a dot in every line falls back to the search.
    """
    dot = data.find(b".")
    for _ in range(_DOTS_BEFORE_SEARCH):
        if dot < 0:
            return -1
        if dot >= 2 and data[dot - 2] == 13 and data[dot - 1] == 10:
            return dot - 2
        dot = data.find(b".", dot + 1)
    return data.find(LINE_DOT, max(dot - 2, 0)) if dot >= 0 else -1


class DotStuffer:
    """RFC 5321 4.5.2 transparency, chunk by chunk: a line that starts with "." gets another.

    Keeps the last two octets it saw as context (at first a virtual CRLF, so a leading dot is
    stuffed), so a CRLF "." cut between two chunks is still found.
    """

    __slots__ = ("_context", "_empty")

    def __init__(self) -> None:
        self._context = _CRLF
        self._empty = True

    def feed(self, chunk: Chunk) -> Chunk:
        if not chunk:
            return chunk
        self._empty = False
        context = self._context
        self._context = bytes(chunk[-2:] if len(chunk) >= 2 else (context + chunk)[-2:])
        if find_line_dot(chunk) < 0 and find_line_dot(context + chunk[:2]) < 0:
            return chunk  # the usual case: no line starts with a dot, nothing is copied
        piece = context + chunk
        # The context octets are never changed by the replacement: it only adds dots after them.
        return piece.replace(LINE_DOT, b"\r\n..")[2:]

    def finish(self) -> bytes:
        """The end of data: a CRLF when the message lacks a final one, then "." CRLF."""
        ending = b"" if not self._empty and self._context == _CRLF else _CRLF
        return ending + b".\r\n"
