"""The server: wires spool, delivery, listeners and metrics; owns startup, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from relay import sdnotify
from relay.config import Config, load_config, permission_warnings
from relay.delivery import Delivery
from relay.errors import ConfigError, RelayError, SpoolError
from relay.listener import ListenerState, protocol_factory, server_tls_context
from relay.metrics import HealthServer, Metrics
from relay.spool import Spool, absorb_spool, restrict_mode, worker_spool_dir, worker_spools
from relay.upstream import UpstreamConnection

log = logging.getLogger("relay.server")

PID_FILE = "relay.pid"
LOCK_FILE = "relay.lock"
_READY_UPSTREAM_WINDOW = 300.0


class StartupError(RelayError):
    """The relay cannot start (port taken, spool locked, bad certificate...)."""


class Server:
    """One relay instance. `serve()` runs until SIGTERM/SIGINT (or `request_stop()`)."""

    def __init__(self, config: Config, config_path: str | None = None, *,
                 worker: int = 0, workers: int = 1) -> None:
        self.config = config
        self.config_path = config_path
        # With several worker processes each owns a spool and a metrics port of its own and
        # shares the SMTP ports (SO_REUSEPORT); the supervisor owns the pid file and systemd.
        self.worker = worker
        self.workers = workers
        self.spool_dir = worker_spool_dir(config.queue.path, worker)
        self.supervised = workers > 1
        self.metrics = Metrics()
        self.spool: Spool | None = None
        self.delivery: Delivery | None = None
        self.state: ListenerState | None = None
        self.health_server: HealthServer | None = None
        self.listeners: list[asyncio.Server] = []
        self.bound: dict[str, tuple[str, int]] = {}
        self.metrics_port: int | None = None
        self.on_ready: Callable[[], None] | None = None
        self._stop = asyncio.Event()
        self._lock_file: IO[str] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    # -- public lifecycle

    async def serve(self) -> None:
        # Handlers first: a SIGHUP's default action would kill a relay that is still starting.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self.startup()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self.reload())

    async def startup(self) -> None:
        config = self.config
        for warning in permission_warnings(config):
            log.warning("%s", warning)
        self._lock_spool(self.spool_dir)
        try:
            self.spool = Spool(self.spool_dir)
            self._absorb_orphan_spools()
        except SpoolError as exc:
            raise StartupError(str(exc)) from exc
        self.spool.start()
        # The credentials may have been fixed while we were down.
        await self._release_auth_deferred("at start")
        self.delivery = Delivery(config, self.spool, self.metrics, self._connection_factory(config))
        self.state = ListenerState(config=config, spool=self.spool, sink=self.delivery,
                                   metrics=self.metrics)
        self.state.tls_contexts = _listener_tls_contexts(config)
        await self._start_listeners(config)
        await self._start_health(config)
        await self.delivery.start()
        if not self.supervised:
            self._write_pid(config.queue.path)
            self._start_watchdog()
        counts = await self.spool.counts()
        pending = counts["queued"] + counts["deferred"]
        log.info("infobip-relay ready: listening on %s; upstream %s:%d (%s); %d message(s) "
                 "waiting in %s", ", ".join(f"{h}:{p}" for h, p in self.bound.values()),
                 config.upstream.host, config.upstream.port, config.upstream.tls, pending,
                 self.spool_dir)
        if not self.supervised:
            sdnotify.ready(f"relaying; {pending} message(s) queued")
        self.started.set()
        if self.on_ready is not None:
            self.on_ready()

    async def shutdown(self) -> None:
        """Stop accepting, let sessions and sends in flight finish within the grace period."""
        if not self.supervised:
            sdnotify.stopping()
        config = self.config
        log.info("shutting down (grace period %.0fs)", config.grace_period)
        deadline = time.monotonic() + config.grace_period
        if self.state is not None:
            self.state.accepting = False
            for connection in list(self.state.connections):
                if not connection.in_transaction:
                    connection.close_for_shutdown()
            while any(c.in_transaction for c in self.state.connections) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for connection in list(self.state.connections):
                connection.close_for_shutdown()
        for server in self.listeners:
            server.close()
        for server in self.listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        if self.delivery is not None:
            await self.delivery.stop(max(0.5, deadline - time.monotonic()))
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.health_server is not None:
            await self.health_server.stop()
        if self.spool is not None:
            await self.spool.close()
        if not self.supervised:
            self._remove_pid(config.queue.path)
        self._unlock_spool()
        log.info("stopped; every accepted message is in the spool")

    async def reload(self) -> bool:
        """Re-read the config: rules, access, users, upstream and certificates change in place."""
        if not self.supervised:
            sdnotify.reloading()
        try:
            try:
                new = load_config(self.config_path)
                tls_contexts = _listener_tls_contexts(new)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return False
            _warn_unreloadable(self.config, new)
            upstream_changed = new.upstream != self.config.upstream
            self.config = new
            if self.state is not None:
                self.state.config = new
                self.state.tls_contexts = _adopt_certificates(self.state.tls_contexts,
                                                              tls_contexts, new)
            if self.delivery is not None:
                if upstream_changed:
                    # Before reconfigure() wakes the poller, so that they go out at once.
                    await self._release_auth_deferred("after the upstream settings changed")
                    self.delivery.reconfigure(new, self._connection_factory(new))
                else:
                    self.delivery.config = new
            log.info("configuration reloaded from %s (%d rule(s))", new.source, len(new.rules))
            return True
        finally:
            if not self.supervised:
                sdnotify.ready("relaying")

    # -- parts

    async def _release_auth_deferred(self, when: str) -> None:
        """Messages held back only by a refused API key wait no longer for queue.auth_retry."""
        assert self.spool is not None
        try:
            released = await self.spool.release_auth_deferred(time.time())
        except SpoolError as exc:
            log.error("cannot release messages deferred by upstream authentication: %s", exc)
            return
        if released:
            log.info("%d message(s) deferred by an upstream authentication failure are due "
                     "again %s", released, when)

    def _connection_factory(self, config: Config) -> Callable[[], UpstreamConnection]:
        context = config.upstream.ssl_context()

        def factory() -> UpstreamConnection:
            return UpstreamConnection(config.upstream, config.hostname, context)

        return factory

    async def _start_listeners(self, config: Config) -> None:
        assert self.state is not None
        loop = asyncio.get_running_loop()
        for listener in config.listeners:
            implicit = self.state.tls_contexts.get(listener.name) \
                if listener.tls == "implicit" else None
            try:
                server = await loop.create_server(protocol_factory(listener, self.state),
                                                  listener.address, listener.port,
                                                  ssl=implicit, backlog=1024,
                                                  reuse_port=self.supervised or None)
            except OSError as exc:
                raise StartupError(f"listener {listener.name!r} cannot bind "
                                   f"{listener.address}:{listener.port}: {exc.strerror}") from exc
            self.listeners.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.bound[listener.name] = (str(host), int(port))

    async def _start_health(self, config: Config) -> None:
        if not config.metrics.enabled:
            return
        self.health_server = HealthServer(self.metrics, self.readiness, self.refresh_stats)
        try:
            port = config.metrics.port + self.worker if config.metrics.port else 0
            self.metrics_port = await self.health_server.start(config.metrics.address, port)
        except OSError as exc:
            raise StartupError(f"metrics cannot bind {config.metrics.address}:"
                               f"{config.metrics.port}: {exc.strerror}") from exc

    async def readiness(self) -> tuple[bool, str]:
        """Ready when the spool takes writes and the upstream answered recently."""
        if self.spool is None or self.delivery is None or not await self.spool.check_writable():
            return False, "spool is not writable"
        health = self.delivery.health
        if health.auth_failed:
            return False, f"upstream refuses our credentials: {health.last_error}"
        recent = health.last_success is not None and \
            time.time() - health.last_success < _READY_UPSTREAM_WINDOW
        if health.failures or not recent:
            reason = health.last_error or "no contact yet"
            return False, f"upstream not reachable recently: {reason}"
        return True, "ready"

    async def refresh_stats(self) -> None:
        if self.spool is None or self.delivery is None:
            return
        counts = await self.spool.counts()
        for state, count in counts.items():
            self.metrics.queue_depth.labels(state=state).set(count)
        oldest = await self.spool.oldest_pending()
        self.metrics.oldest_age.set(time.time() - oldest if oldest else 0)
        self.metrics.upstream_up.set(1 if self.delivery.health.ok else 0)
        self.metrics.upstream_connections_open.set(self.delivery.open_connections)

    def _start_watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return

        async def ping() -> None:
            while True:
                sdnotify.watchdog()
                await asyncio.sleep(interval / 2)

        self._watchdog = asyncio.create_task(ping(), name="watchdog")

    # -- spool directory bookkeeping

    def _absorb_orphan_spools(self) -> None:
        """Take over the spools of workers that no longer exist (the worker count went down)."""
        assert self.spool is not None
        for index, directory in worker_spools(self.config.queue.path):
            if index < self.workers or index % self.workers != self.worker:
                continue
            moved = absorb_spool(self.spool.db, directory)
            if moved:
                log.info("took over %d message(s) from %s", moved, directory)

    def _lock_spool(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            restrict_mode(directory, 0o700)
            handle = open_private(directory / LOCK_FILE)
        except OSError as exc:
            raise StartupError(f"cannot use spool directory {directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StartupError(f"another infobip-relay is already using the spool {directory}"
                               ) from None
        self._lock_file = handle

    def _unlock_spool(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @staticmethod
    def _write_pid(directory: Path) -> None:
        write_pid_file(directory / PID_FILE)

    @staticmethod
    def _remove_pid(directory: Path) -> None:
        with contextlib.suppress(OSError):
            (directory / PID_FILE).unlink()


def _listener_tls_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    contexts = {}
    for index, listener in enumerate(config.listeners):
        if listener.tls == "none":
            continue
        try:
            contexts[listener.name] = server_tls_context(listener)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"listeners[{index}].certificate", f"cannot load: {exc}") from None
    return contexts


def _adopt_certificates(current: dict[str, ssl.SSLContext], fresh: dict[str, ssl.SSLContext],
                        config: Config) -> dict[str, ssl.SSLContext]:
    """Load reloaded certificates into the contexts in use.

    An implicit-TLS asyncio server keeps the context it was created with, so new certificates
    must go into that same object; `fresh` was built first to prove the files load.
    """
    adopted = dict(fresh)
    for listener in config.listeners:
        context = current.get(listener.name)
        if context is not None and listener.name in fresh:
            context.load_cert_chain(str(listener.certificate), str(listener.private_key))
            adopted[listener.name] = context
    return adopted


def _warn_unreloadable(old: Config, new: Config) -> None:
    if old.listeners != new.listeners:
        for before, after in zip(old.listeners, new.listeners, strict=False):
            if (before.address, before.port, before.tls) != (after.address, after.port, after.tls):
                log.warning("listener addresses, ports and TLS modes change only on restart")
                break
    if old.queue.path != new.queue.path:
        log.warning("queue.path changes only on restart")
    if old.metrics != new.metrics:
        log.warning("metrics address changes only on restart")


def open_private(path: Path) -> IO[str]:
    """Open (append, create 0600) a file in the spool; an existing one loses other access."""
    handle = open(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600),  # noqa: SIM115
                  "a+", encoding="utf-8")
    restrict_mode(path, 0o600)
    return handle


def write_pid_file(path: Path) -> None:
    with open_private(path) as handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")


def read_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / PID_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    # 0 and negative numbers would signal a whole process group: never trust them.
    return pid if pid > 0 else None
