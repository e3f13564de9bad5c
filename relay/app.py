"""The server: wires spool, delivery, listeners and metrics; owns startup, signals and shutdown.

Everything else lives with its part: the spool's lock and the takeover of old worker spools in
`Spool.open`, pid files in relay.pidfile, TLS contexts in relay.tlsconfig, the upstream's
readiness in `UpstreamHealth`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from relay import sdnotify
from relay.config import Config, load_config, permission_warnings
from relay.delivery import Delivery
from relay.errors import ConfigError, RelayError, SpoolError
from relay.listener import ListenerState, protocol_factory
from relay.metrics import HealthServer, Metrics
from relay.pidfile import remove_pid, write_pid
from relay.proxyserver import ProxyListener
from relay.spool import Spool, worker_spool_dir
from relay.tlsconfig import adopt_certificates, listener_contexts
from relay.upstream import connection_factory

log = logging.getLogger("relay.server")


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
        self.listeners: list[asyncio.Server | ProxyListener] = []
        self.bound: dict[str, tuple[str, int]] = {}
        self.metrics_port: int | None = None
        self.on_ready: Callable[[], None] | None = None
        self._stop = asyncio.Event()
        # Background tasks (reloads, the watchdog): kept until done, cancelled at shutdown.
        self._tasks: set[asyncio.Task[Any]] = set()
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
        self._background(self.reload(), "reload")

    async def startup(self) -> None:
        config = self.config
        for warning in permission_warnings(config):
            log.warning("%s", warning)
        try:
            self.spool = Spool.open(config.queue.path, worker=self.worker, workers=self.workers)
        except SpoolError as exc:
            raise StartupError(str(exc)) from exc
        self.spool.start()
        # The credentials may have been fixed while we were down.
        await self._release_auth_deferred("at start")
        self.delivery = Delivery(config, self.spool, self.metrics,
                                 connection_factory(config.upstream, config.hostname))
        self.state = ListenerState(config=config, spool=self.spool, sink=self.delivery,
                                   metrics=self.metrics)
        self.state.tls_contexts = listener_contexts(config)
        await self._start_listeners(config)
        await self._start_health(config)
        await self.delivery.start()
        if not self.supervised:
            write_pid(config.queue.path)
            if (interval := sdnotify.watchdog_interval()) is not None:
                self._background(sdnotify.keep_watchdog_fed(interval), "watchdog")
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.health_server is not None:
            await self.health_server.stop()
        if not self.supervised:
            remove_pid(config.queue.path)  # before the spool's lock goes with close()
        if self.spool is not None:
            await self.spool.close()
        log.info("stopped; every accepted message is in the spool")

    async def reload(self) -> bool:
        """Re-read the config: rules, access, users, upstream and certificates change in place."""
        if not self.supervised:
            sdnotify.reloading()
        try:
            try:
                new = load_config(self.config_path)
                tls_contexts = listener_contexts(new)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return False
            _warn_unreloadable(self.config, new)
            upstream_changed = new.upstream != self.config.upstream
            self.config = new
            if self.state is not None:
                self.state.config = new
                self.state.tls_contexts = adopt_certificates(self.state.tls_contexts,
                                                             tls_contexts, new)
            if self.delivery is not None:
                if upstream_changed:
                    # Before reconfigure() wakes the poller, so that they go out at once.
                    await self._release_auth_deferred("after the upstream settings changed")
                    self.delivery.reconfigure(new, connection_factory(new.upstream, new.hostname))
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

    async def _start_listeners(self, config: Config) -> None:
        assert self.state is not None
        loop = asyncio.get_running_loop()
        for listener in config.listeners:
            implicit = self.state.tls_contexts.get(listener.name) \
                if listener.tls == "implicit" else None
            server: asyncio.Server | ProxyListener
            try:
                if listener.proxy_protocol:  # the PROXY header comes before TLS and SMTP
                    server = await ProxyListener.start(listener, self.state,
                                                       reuse_port=self.supervised)
                else:
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
        return self.delivery.health.readiness()

    async def refresh_stats(self) -> None:
        if self.spool is None or self.delivery is None:
            return
        counts = await self.spool.counts()
        for state, count in counts.items():
            self.metrics.queue_depth.labels(state=state).set(count)
        oldest = await self.spool.oldest_pending()
        self.metrics.oldest_age.set(time.time() - oldest if oldest else 0)
        self.metrics.upstream_up.set(1 if self.delivery.health.ok else 0)
        self.metrics.upstream_auth_ok.set(0 if self.delivery.health.auth_failed else 1)
        self.metrics.upstream_connections_open.set(self.delivery.open_connections)

    def _background(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coroutine`` as a task that is kept until done and cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

def _warn_unreloadable(old: Config, new: Config) -> None:
    if old.listeners != new.listeners:
        for before, after in zip(old.listeners, new.listeners, strict=False):
            if (before.address, before.port, before.tls, before.proxy_protocol) != \
                    (after.address, after.port, after.tls, after.proxy_protocol):
                log.warning("listener addresses, ports, TLS modes and proxy_protocol change only "
                            "on restart")
                break
    if old.queue.path != new.queue.path:
        log.warning("queue.path changes only on restart")
    if old.metrics != new.metrics:
        log.warning("metrics address changes only on restart")


def run_server(server: Server) -> None:
    """Run one server to completion on the best event loop available."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(server.serve())
    else:
        uvloop.run(server.serve())
