"""RFC 2920 pipelining over an aiosmtplib connection: one write, then every reply read once.

aiosmtplib 5.1 reads exactly one reply per command: ``SMTPProtocol.data_received`` parses one
reply per call and drops whatever arrives while a parsed reply waits to be picked up, or while no
command is marked pending; ``read_response()`` only waits for new data. Several replies in one
TLS read, or a reply that arrives before the next ``read_response()`` is awaited (under uvloop
two reads can be delivered back to back with no task step in between), would be lost or hang.

So while a group of pipelined commands is in flight, `ReplyReader` stands in for the
SMTPProtocol as the transport's protocol (``BaseTransport.set_protocol``, public asyncio API, also
implemented by uvloop): whatever arrives is appended to the protocol's own buffer and every
complete reply in it is parsed at once and queued, whatever the packet boundaries. Connection loss,
EOF and flow control are forwarded to the SMTPProtocol, so its own state stays as if it had seen
them; on leaving, the SMTPProtocol is the transport's protocol again.

The only private aiosmtplib API used is here (and aiosmtplib is pinned to 5.1.x for it):

- ``SMTPProtocol._buffer``: the received bytes not parsed yet, shared so that nothing received
  before or after the group is lost in the hand-over;
- ``SMTPProtocol._read_response_from_buffer()``: aiosmtplib's own reply parser (multi-line replies,
  line limits), so a pipelined reply parses exactly like a lockstep one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol


class ReplyReader(asyncio.Protocol):
    """``with ReplyReader(protocol) as replies:`` send a group with `send`, read with `next`.

    Every reply is returned exactly once and in order. Used by one task at a time, like the
    aiosmtplib connection it wraps (the relay never shares an upstream session between tasks).
    """

    def __init__(self, protocol: SMTPProtocol) -> None:
        if protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._protocol = protocol
        self._transport: asyncio.BaseTransport = protocol.transport
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def __enter__(self) -> ReplyReader:
        self._transport.set_protocol(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._transport.set_protocol(self._protocol)

    # -- the client side -------------------------------------------------------------------------
    def send(self, commands: Sequence[Sequence[bytes]]) -> None:
        """Write the commands (each a list of words, as for ``execute_command``) in one write."""
        lines = []
        for words in commands:
            if any(COMMAND_INJECTION_REGEX.search(word) for word in words):
                # The check execute_command makes: a CR or LF would smuggle in a command.
                raise ValueError("Command arg contains a prohibited control character")
            lines.append(b" ".join(words) + b"\r\n")
        self._protocol.write(b"".join(lines))

    def write(self, data: bytes) -> None:
        """Raw bytes (the lone dot of an empty DATA)."""
        self._protocol.write(data)

    async def next(self, seconds: float) -> aiosmtplib.SMTPResponse:
        """The next reply; SMTPReadTimeoutError after ``seconds`` without a complete one,
        SMTPServerDisconnected (or the parser's SMTPResponseException) if none can come."""
        if self._replies:  # the group's replies often come in one read: no timer for those
            return self._replies.popleft()
        try:
            async with asyncio.timeout(seconds):
                while not self._replies:
                    if self._error is not None:
                        raise self._error
                    self._wakeup = asyncio.get_running_loop().create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") \
                from exc
        return self._replies.popleft()

    @property
    def pending(self) -> bool:
        """Whether anything arrived beyond the replies read so far (a server out of step)."""
        return bool(self._replies) or bool(self._protocol._buffer)

    # -- asyncio.Protocol: called by the transport -----------------------------------------------
    def data_received(self, data: bytes) -> None:
        buffer = self._protocol._buffer
        buffer.extend(data)
        try:
            while (reply := self._protocol._read_response_from_buffer()) is not None:
                self._replies.append(reply)
            if len(buffer) > MAX_RESPONSE_LENGTH:
                del buffer[:]
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        except aiosmtplib.SMTPException as exc:
            self._fail(exc)
        self._wake()

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self._protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
