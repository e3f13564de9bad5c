"""The relay's side of the upstream process (relay.upstreamchild): sends go there, replies back.

`UpstreamProcess` starts the process and restarts it after a crash; its `connection_factory`
has the signature of `relay.upstream.connection_factory`, so `Delivery` is unchanged: it gets
`RemoteUpstream` objects, which implement the `Upstream` protocol by asking the process. A
message's bytes travel in the request when they are in memory; a body file travels as its path
(the process opens and streams it, so large mail never crosses the socketpair).

If the process dies, the sends it had are outcome-unknown (their final dot may have gone out:
retried no sooner than retry_max, like any lost reply), probes fail as "unavailable", and the
next request starts a new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from relay.config import Config, UpstreamConfig
from relay.frames import FrameProtocol
from relay.outgoing import MessageData
from relay.upstream import (
    SendResult,
    UpstreamAuthError,
    UpstreamError,
    UpstreamFactory,
    UpstreamOutcomeUnknown,
    UpstreamUnavailable,
)
from relay.upstreamchild import GROUP_SIGNALS

log = logging.getLogger("relay.upstreamproc")

# A process that dies at once is not restarted in a tight loop.
_RESTART_DELAY = 1.0
# How long stop() waits for the process to QUIT its sessions and exit before killing it.
_EXIT_TIMEOUT = 10.0

# cgroup v2: "QUOTA PERIOD" (microseconds) or "max PERIOD".
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

_ERRORS: dict[str, type[UpstreamError]] = {
    "auth": UpstreamAuthError, "unknown": UpstreamOutcomeUnknown,
    "unavailable": UpstreamUnavailable,
}


class ProcessLost(Exception):
    """The upstream process ended while a request was in it."""


class UnexpectedError(Exception):
    """A request failed in the upstream process in a way no `UpstreamError` describes (a bug)."""


def wanted(config: Config, cpus: float | None = None) -> bool:
    """Whether the sessions go to a process of their own (``upstream_process`` in the config):
    with ``auto``, when the relay may use more CPUs (``cpus``: `usable_cpus()`) than it has
    workers, each of which then gets one."""
    if config.upstream_process != "auto":
        return config.upstream_process == "on"
    return (usable_cpus() if cpus is None else cpus) > config.workers


def usable_cpus(cpu_max: Path = _CPU_MAX) -> float:
    """CPUs this process may run on: its affinity mask, cut by a cgroup v2 quota (containers
    started with ``--cpus 1`` see every core of the host in the mask)."""
    try:
        count = float(len(os.sched_getaffinity(0)))
    except OSError:  # a seccomp filter may refuse it (EPERM)
        count = float(os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max" or not period.isdigit() or not quota.isdigit() or int(period) == 0:
        return count
    return min(count, int(quota) / int(period))


class UpstreamProcess:
    """The child process holding every upstream session, and the requests waiting on it."""

    def __init__(self, logging_level: str, logging_format: str, secrets: Iterable[str], *,
                 on_crash: Callable[[], None] = lambda: None) -> None:
        self._hello = ("hello", logging_level, logging_format, tuple(secrets))
        self._on_crash = on_crash
        self._channel: FrameProtocol | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._requests = itertools.count(1)
        self._ids = itertools.count(1)
        # Bumped at each start: sessions opened in an earlier process are gone.
        self.generation = 0
        self._started_at = -_RESTART_DELAY
        self._starting = asyncio.Lock()
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def connection_factory(self, config: UpstreamConfig, hostname: str) -> UpstreamFactory:
        """Like relay.upstream.connection_factory: one TLS context (in the process) for all."""
        return functools.partial(RemoteUpstream, self, next(self._ids), config, hostname)

    def new_id(self) -> int:
        return next(self._ids)

    def forget(self, connection_id: int, generation: int) -> None:
        """A `RemoteUpstream` is gone: its slot in the process may go too (best effort)."""
        if self._channel is None or generation != self.generation:
            return
        with contextlib.suppress(RuntimeError):  # no running loop any more (at exit)
            self._channel.send(("forget", connection_id))

    async def start(self) -> None:
        await self._running()

    async def stop(self) -> None:
        """Ask the process to QUIT its sessions and exit; kill it if it does not in time."""
        self._stopping = True
        process, channel = self._process, self._channel
        if process is None:
            return
        if channel is not None:
            channel.send(("exit",))
        try:
            await asyncio.to_thread(process.wait, _EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("upstream process %d did not exit in %.0fs; killing it", process.pid,
                      _EXIT_TIMEOUT)
            process.kill()
            await asyncio.to_thread(process.wait)

    async def request(self, frame: Callable[[int], tuple[Any, ...]], opening: RemoteUpstream
                      ) -> tuple[Any, ...]:
        """Send ``frame(request id)`` (after the session's "open" if this process lacks it)
        and wait for its answer. Raises ProcessLost."""
        channel = await self._running()
        if opening.generation != self.generation:
            channel.send(opening.open_frame())
            opening.generation = self.generation
        request = next(self._requests)
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        channel.send(frame(request))
        try:
            return await future
        except asyncio.CancelledError:
            # The process may still be sending: it is told to stop, which drops the session.
            if self._pending.pop(request, None) is not None and self._channel is channel:
                channel.send(("cancel", request))
            raise

    async def _running(self) -> FrameProtocol:
        if self._channel is not None:
            return self._channel
        async with self._starting:
            if self._channel is None:
                if self._stopping:
                    raise ProcessLost("the relay is stopping")
                await asyncio.sleep(max(0.0, self._started_at + _RESTART_DELAY - time.monotonic()))
                await self._spawn()
        assert self._channel is not None
        return self._channel

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self._process = _launch(theirs.fileno())
        self._started_at = time.monotonic()
        channel = FrameProtocol(self._on_answer, functools.partial(self._on_lost,
                                                                   self._process))
        await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=ours)
        self.generation += 1
        channel.send(self._hello)
        self._channel = channel
        log.debug("upstream process %d started", self._process.pid)

    def reconfigure_logging(self, level: str, fmt: str, secrets: Iterable[str]) -> None:
        """A reload's logging settings and secrets, for the process now and after a restart."""
        self._hello = ("hello", level, fmt, tuple(secrets))
        if self._channel is not None:
            self._channel.send(self._hello)

    def _on_answer(self, frame: tuple[Any, ...]) -> None:
        future = self._pending.pop(frame[1], None)
        if future is not None and not future.done():
            future.set_result(frame)

    def _on_lost(self, process: subprocess.Popen[bytes], exc: Exception | None) -> None:
        self._channel = None
        pending, self._pending = self._pending, {}
        status = process.poll()
        reason = f"upstream process {process.pid} ended" + \
            (f" with status {status}" if status is not None else "") + \
            (f": {exc}" if exc is not None else "")
        for future in pending.values():
            if not future.done():
                future.set_exception(ProcessLost(reason))
        if not self._stopping:
            self._on_crash()
            log.error("%s; %d request(s) in it; a new one starts with the next request",
                      reason, len(pending))
            asyncio.get_running_loop().run_in_executor(None, process.wait)  # reap it


class RemoteUpstream:
    """One upstream session living in the upstream process (`relay.upstream.Upstream`)."""

    def __init__(self, process: UpstreamProcess, factory_id: int, config: UpstreamConfig,
                 hostname: str) -> None:
        self._process = process
        self._id = process.new_id()
        self._factory_id = factory_id
        self._config = config
        self._hostname = hostname
        # The process generation this session was opened in (0: none yet).
        self.generation = 0
        self._forget: weakref.finalize[Any, Any] | None = None
        self._state: tuple[bool, bool | None, int | None] = (False, None, None)

    def open_frame(self) -> tuple[Any, ...]:
        self._state = (False, None, None)
        # Once this object is gone (a replaced connection, a probe's), the process lets go of
        # the slot; a close() keeps the slot for the next send.
        if self._forget is not None:
            self._forget.detach()  # opened again in a new process: forget it there
        self._forget = weakref.finalize(self, self._process.forget, self._id,
                                        self._process.generation)
        return ("open", self._id, self._factory_id, self._config, self._hostname)

    @property
    def _live(self) -> bool:
        return self.generation == self._process.generation

    @property
    def connected(self) -> bool:
        return self._live and self._state[0]

    @property
    def smtputf8(self) -> bool | None:
        return self._state[1]

    @property
    def max_size(self) -> int | None:
        return self._state[2]

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: MessageData,
                   mail_options: tuple[str, ...] = ()) -> SendResult:
        # A body file goes by name: the process opens it itself (pickle would copy it whole).
        payload = data if isinstance(data, bytes) else ("file", data.head, str(data.path),
                                                        data.size)
        try:
            answer = await self._process.request(
                lambda request: ("send", request, self._id, mail_from, recipients, payload,
                                 mail_options), self)
        except ProcessLost as exc:
            raise UpstreamOutcomeUnknown(str(exc)) from exc
        accepted, temporary, permanent, reply, upstream_id, local = self._outcome(answer)
        return SendResult(accepted=accepted, temporary=temporary, permanent=permanent,
                          reply=reply, upstream_id=upstream_id, local=local)

    async def probe(self) -> None:
        try:
            answer = await self._process.request(lambda request: ("probe", request, self._id),
                                                 self)
        except ProcessLost as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        self._outcome(answer)

    async def close(self) -> None:
        if not self._live:
            return  # never opened in the process that runs now: nothing to close
        try:
            answer = await self._process.request(lambda request: ("close", request, self._id),
                                                 self)
        except ProcessLost:
            return
        self._outcome(answer)

    def _outcome(self, answer: tuple[Any, ...]) -> Any:
        """The answer's result, or its error raised; remembers the session's state."""
        self._state = answer[-1]
        if answer[0] == "done":
            return answer[2]
        kind, message = answer[2], answer[3]
        raise _ERRORS.get(kind, UnexpectedError)(message)


def _launch(descriptor: int) -> subprocess.Popen[bytes]:
    """python -m relay.upstreamchild FD, with our interpreter; a vfork+exec, over in a moment,
    so it runs on the event loop. Its logs go to our stderr.

    It starts with INT, TERM and HUP blocked (the mask survives exec) until it ignores them:
    a Ctrl-C or a service manager's TERM to the whole group during its start must not kill
    it before the relay's graceful stop.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        return subprocess.Popen([sys.executable, "-m", "relay.upstreamchild", str(descriptor)],
                                pass_fds=(descriptor,), stdin=subprocess.DEVNULL)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
