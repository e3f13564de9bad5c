"""The upstream process: every TLS session to the upstreams, on a core of its own.

Like Postfix's smtp(8) next to its qmgr(8): the relay's main process keeps the listener, the
spool and the scheduling, and hands each send to this process over a socketpair
(relay.upstreamproc). Here run the very `UpstreamConnection` objects the relay would otherwise
run itself, so the TLS encryption and the SMTP client work of forwarding no longer compete with
accepting mail for one core.

It is started by the relay (``python -m relay.upstreamchild FD``) and ends when the relay says
``exit`` or when the socketpair closes, whatever killed the relay. Signals from a terminal or a
service manager (INT, TERM, HUP to the whole group) are ignored: the relay decides when its
sends in flight are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.config import UpstreamConfig
from relay.frames import FrameProtocol
from relay.logs import configure_logging
from relay.memory import keep_heap_between_messages, keep_releasing_free_memory, release_free_memory
from relay.outgoing import MessageData, SpooledBody
from relay.upstream import (
    SendResult,
    UpstreamAuthError,
    UpstreamConnection,
    UpstreamOutcomeUnknown,
    UpstreamUnavailable,
    connection_factory,
)

log = logging.getLogger("relay.upstreamchild")

# Sent to the whole process group by a terminal or a service manager; the relay handles them.
GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
# How long the relay's "exit" waits for the sessions' QUITs before they are cut.
_QUIT_GRACE = 5.0

State = tuple[bool, bool | None, int | None]


def connection_state(connection: UpstreamConnection | None) -> State:
    """What the relay mirrors of a session: (connected, SMTPUTF8, SIZE) as of the last EHLO."""
    if connection is None:
        return False, None, None
    return connection.connected, connection.smtputf8, connection.max_size


def result_fields(result: SendResult) -> tuple[Any, ...]:
    return (result.accepted, result.temporary, result.permanent, result.reply,
            result.upstream_id, result.local)


def failure_kind(exc: BaseException) -> str:
    """The name an upstream error crosses the socketpair with (relay.upstreamproc raises it)."""
    if isinstance(exc, UpstreamAuthError):
        return "auth"
    if isinstance(exc, UpstreamOutcomeUnknown):
        return "unknown"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    return "error"


def message_of(payload: bytes | tuple[str, bytes, str, int]) -> MessageData:
    """The message to send: its bytes, or its body file (the session opens it)."""
    if isinstance(payload, bytes):
        return payload
    _, head, path, size = payload
    return SpooledBody(head, Path(path), size)


class Child:
    """Runs what the relay asks for, one task per request, and answers each with a frame."""

    def __init__(self) -> None:
        self.channel = FrameProtocol(self.on_frame, self.on_lost)
        self.ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._factories: dict[int, Callable[[], UpstreamConnection]] = {}
        self._connections: dict[int, UpstreamConnection] = {}
        self._factory_of: dict[int, int] = {}  # connection id -> factory id
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._forgetting: set[asyncio.Task[None]] = set()

    # -- frames from the relay

    def on_frame(self, frame: tuple[Any, ...]) -> None:
        kind = frame[0]
        if kind == "send":
            _, request, connection_id, mail_from, recipients, payload, options = frame
            self._start(request, self._connections.get(connection_id),
                        lambda c: self._send(c, mail_from, recipients, payload, options))
        elif kind == "probe":
            _, request, connection_id = frame
            self._start(request, self._connections.get(connection_id), self._probe)
        elif kind == "close":  # the session only: the slot is used again later
            _, request, connection_id = frame
            self._start(request, self._connections.get(connection_id), self._close)
        elif kind == "open":
            _, connection_id, factory_id, config, hostname = frame
            self._connections[connection_id] = self._factory(factory_id, config, hostname)()
            self._factory_of[connection_id] = factory_id
        elif kind == "forget":  # the relay let go of this slot (replaced, or a probe's)
            self._forget(frame[1])
        elif kind == "cancel":
            task = self._tasks.get(frame[1])
            if task is not None:
                task.cancel()
        elif kind == "hello":
            _, level, fmt, secrets = frame
            configure_logging(level, fmt, secrets)
        elif kind == "exit" and not self.ended.done():
            self.ended.set_result(True)

    def on_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.error("channel to the relay broken: %s", exc)
        if not self.ended.done():
            self.ended.set_result(False)

    def _forget(self, connection_id: int) -> None:
        """Drop a slot, closing its session if one is open, and its factory (and TLS context)
        once no slot uses it: reloads and probes would otherwise pile them up."""
        connection = self._connections.pop(connection_id, None)
        factory_id = self._factory_of.pop(connection_id, None)
        if factory_id not in self._factory_of.values():
            self._factories.pop(factory_id, None)  # type: ignore[arg-type]
        if connection is not None and connection.connected:
            task = asyncio.create_task(connection.close())
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    def _factory(self, factory_id: int, config: UpstreamConfig, hostname: str
                 ) -> Callable[[], UpstreamConnection]:
        """One TLS context per factory, as in the relay: its sessions share it."""
        factory = self._factories.get(factory_id)
        if factory is None:
            factory = self._factories[factory_id] = connection_factory(config, hostname)
        return factory

    # -- requests

    def _start(self, request: int, connection: UpstreamConnection | None,
               operation: Callable[[UpstreamConnection], Awaitable[tuple[Any, ...] | None]]
               ) -> None:
        task = asyncio.create_task(self._answer(request, connection, operation))
        self._tasks[request] = task
        task.add_done_callback(lambda _: self._tasks.pop(request, None))

    async def _answer(self, request: int, connection: UpstreamConnection | None,
                      operation: Callable[[UpstreamConnection],
                                          Awaitable[tuple[Any, ...] | None]]) -> None:
        try:
            if connection is None:
                raise UpstreamUnavailable("no such upstream session")
            fields = await operation(connection)
        except asyncio.CancelledError:
            return  # the relay gave up on it and stopped waiting
        except Exception as exc:
            if failure_kind(exc) == "error":
                log.exception("unexpected error in an upstream session")
            self.channel.send(("failed", request, failure_kind(exc), str(exc),
                               connection_state(connection)))
            return
        self.channel.send(("done", request, fields, connection_state(connection)))

    @staticmethod
    async def _send(connection: UpstreamConnection, mail_from: str,
                    recipients: tuple[str, ...], payload: bytes | tuple[str, bytes, str, int],
                    options: tuple[str, ...]) -> tuple[Any, ...]:
        return result_fields(await connection.send(mail_from, recipients, message_of(payload),
                                                   options))

    @staticmethod
    async def _probe(connection: UpstreamConnection) -> None:
        await connection.probe()

    @staticmethod
    async def _close(connection: UpstreamConnection) -> None:
        await connection.close()

    # -- the end

    async def finish(self, polite: bool) -> None:
        """Cancel what is still running; QUIT the sessions left when the relay asked to exit."""
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *self._forgetting, return_exceptions=True)
        connections = list(self._connections.values())
        self._connections.clear()
        if polite:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.close() for c in connections), return_exceptions=True),
                    _QUIT_GRACE)
        if self.channel.transport is not None:
            self.channel.transport.close()


async def serve(descriptor: int) -> None:
    loop = asyncio.get_running_loop()
    child = Child()
    sock = socket.socket(fileno=descriptor)
    await loop.create_unix_connection(lambda: child.channel, sock=sock)
    # The chunks of a burst of large mail pass through here too: give their pages back after
    # it, as the relay does (relay.memory).
    trim = None
    if release_free_memory is not None:
        keep_heap_between_messages()
        trim = asyncio.create_task(keep_releasing_free_memory(release_free_memory))
    polite = await child.ended
    if trim is not None:
        trim.cancel()
    await child.finish(polite)


def main(argv: list[str]) -> int:
    # Blocked by the relay until now (relay.upstreamproc._launch): ignored from here on.
    for signum in GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m relay.upstreamchild FD (started by infobip-relay serve)",
              file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(serve(int(argv[1])))
    else:
        uvloop.run(serve(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
