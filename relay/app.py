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
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from relay import sdnotify
from relay.config import Config, iter_secret_values, load_config, permission_warnings
from relay.delivery import Delivery
from relay.errors import ConfigError, RelayError, SpoolError
from relay.httpserver import HTTPServer, health_app
from relay.listener import ListenerState, protocol_factory
from relay.logs import reconfigure_logging
from relay.memory import keep_heap_between_messages, keep_releasing_free_memory, release_free_memory
from relay.metrics import Metrics
from relay.pidfile import remove_pid, write_pid
from relay.proxyserver import ProxyListener
from relay.reports.bounces import DsnBouncer
from relay.reports.pull import ReportPoller
from relay.reports.sink import ReportSink
from relay.reports.webhook import webhook_app
from relay.routing import Deliveries, FactoryMaker, describe_stranded, stranded
from relay.spool import Spool, worker_spool_dir
from relay.tlsconfig import adopt_certificates, listener_contexts
from relay.upstream import connection_factory
from relay.upstreamproc import UpstreamProcess
from relay.upstreamproc import wanted as upstream_process_wanted

log = logging.getLogger("relay.server")
# Seconds the event loop may keep the GIL while another thread waits for it before it is made to
# drop it (CPython's default: 0.005). The loop lets go of it by itself each time it polls and in
# each file write, so the spool's threads get it within a turn anyway; forced drops in between
# only cost both sides futex hand-offs across the cores. See run_server.
_SWITCH_INTERVAL = 0.02

# How often reports that found no message yet are tried again.
_MATCH_INTERVAL = 1.0


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
        self.deliveries: Deliveries | None = None
        self.state: ListenerState | None = None
        self.health_server: HTTPServer | None = None
        self.webhook_server: HTTPServer | None = None
        self.webhook_port: int | None = None
        self.reports: ReportSink | None = None
        # The upstream sessions' own process, when config.upstream_process wants one.
        self.upstream_process: UpstreamProcess | None = None
        self.poller: ReportPoller | None = None
        self.listeners: list[asyncio.Server | ProxyListener] = []
        self.bound: dict[str, tuple[str, int]] = {}
        self.metrics_port: int | None = None
        self.on_ready: Callable[[], None] | None = None
        self._stop = asyncio.Event()
        # Background tasks (reloads, the watchdog): kept until done, cancelled at shutdown.
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = asyncio.Event()

    @property
    def delivery(self) -> Delivery | None:
        """The delivery of the ``default`` upstream."""
        return self.deliveries.default if self.deliveries is not None else None

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
        self._set_up_bounces(config, self.spool)
        self.spool.start()
        # The credentials may have been fixed while we were down.
        await self._release_auth_deferred("at start")
        self.deliveries = Deliveries(config, self.spool, self.metrics,
                                     await self._upstream_factories(config))
        await self._warn_unrouted(config)
        self.state = ListenerState(config=config, spool=self.spool, sink=self.deliveries,
                                   metrics=self.metrics)
        self.state.tls_contexts = listener_contexts(config)
        await self._start_listeners(config)
        await self._start_health(config)
        await self._start_reports(config, self.spool)
        await self.deliveries.start()
        if not self.supervised:
            write_pid(config.queue.path)
            if (interval := sdnotify.watchdog_interval()) is not None:
                self._background(sdnotify.keep_watchdog_fed(interval), "watchdog")
        if release_free_memory is not None:
            keep_heap_between_messages()  # only with the trim below to give the heap back
            self._background(keep_releasing_free_memory(release_free_memory), "memory-trim")
        counts = await self.spool.counts()
        pending = counts["queued"] + counts["deferred"]
        upstreams = ", ".join(f"{u.name} {u.host}:{u.port} ({u.tls})"
                              for u in config.all_upstreams)
        log.info("infobip-relay ready: listening on %s; upstream %s; %d message(s) "
                 "waiting in %s", ", ".join(f"{h}:{p}" for h, p in self.bound.values()),
                 upstreams, pending, self.spool_dir)
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
        if self.deliveries is not None:
            await self.deliveries.stop(max(0.5, deadline - time.monotonic()))
        if self.upstream_process is not None:
            await self.upstream_process.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.health_server is not None:
            await self.health_server.stop()
        if self.webhook_server is not None:
            await self.webhook_server.stop()
        if self.reports is not None:
            self.reports.close()
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
            if not await self._routes_kept(new):
                return False
            _warn_unreloadable(self.config, new)
            changed = [upstream.name for upstream in new.all_upstreams
                       if upstream != self.config.upstream_named(upstream.name)]
            self._reconfigure_logging(self.config, new)
            self.config = new
            if self.state is not None:
                self.state.config = new
                self.state.tls_contexts = adopt_certificates(self.state.tls_contexts,
                                                             tls_contexts, new)
            if self.deliveries is not None:
                for name in changed:
                    # Before reconfigure() wakes the pollers, so that they go out at once.
                    await self._release_auth_deferred("after the upstream settings changed",
                                                      name)
                await self.deliveries.reconfigure(new, new.grace_period)
            log.info("configuration reloaded from %s (%d rule(s))", new.source, len(new.rules))
            return True
        finally:
            if not self.supervised:
                sdnotify.ready("relaying")

    # -- parts

    def _reconfigure_logging(self, old: Config, new: Config) -> None:
        """The new level and format, here and in the upstream process. Both configs' secrets
        stay masked: a session opened before the reload may still log the old key."""
        secrets = {*iter_secret_values(old), *iter_secret_values(new)}
        reconfigure_logging(new.logging.level, new.logging.format, secrets)
        if self.upstream_process is not None:
            self.upstream_process.reconfigure_logging(new.logging.level, new.logging.format,
                                                      secrets)

    async def _routes_kept(self, new: Config) -> bool:
        """False (logged) when ``new`` drops an upstream that queued mail still uses."""
        assert self.spool is not None
        try:
            lost = stranded(new, await self.spool.waiting_by_route())
        except SpoolError as exc:
            log.error("reload refused, keeping the running configuration: cannot count the "
                      "queued mail of each upstream: %s", exc)
            return False
        if lost:
            log.error("reload refused, keeping the running configuration: %s; put the "
                      "upstream back, or let that mail be delivered (or `queue delete` it) "
                      "first", describe_stranded(lost))
            return False
        return True

    async def _upstream_factories(self, config: Config) -> FactoryMaker:
        """Sessions in this process, or in the upstream process (started here) if wanted."""
        if not upstream_process_wanted(config):
            return connection_factory
        self.upstream_process = UpstreamProcess(
            config.logging.level, config.logging.format, iter_secret_values(config),
            on_crash=self.metrics.upstream_process_restarts.inc)
        await self.upstream_process.start()
        log.info("upstream sessions run in process %s", self.upstream_process.pid)
        return self.upstream_process.connection_factory

    async def _warn_unrouted(self, config: Config) -> None:
        """Mail whose upstream left the config while the relay was stopped waits, kept."""
        assert self.spool is not None
        lost = stranded(config, await self.spool.waiting_by_route())
        if lost:
            log.error("%s, which the configuration no longer has: that mail waits in the spool "
                      "until the upstream is configured again", describe_stranded(lost))

    async def _release_auth_deferred(self, when: str, route: str | None = None) -> None:
        """Messages held back only by a refused API key wait no longer for queue.auth_retry."""
        assert self.spool is not None
        try:
            released = await self.spool.release_auth_deferred(time.time(), route)
        except SpoolError as exc:
            log.error("cannot release messages deferred by upstream authentication: %s", exc)
            return
        if released:
            which = f" of upstream {route}" if route else ""
            log.info("%d message(s)%s deferred by an upstream authentication failure are due "
                     "again %s", released, which, when)

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
        self.health_server = HTTPServer(health_app(self.metrics, self.readiness,
                                                   self.refresh_stats))
        try:
            port = config.metrics.port + self.worker if config.metrics.port else 0
            self.metrics_port = await self.health_server.start(config.metrics.address, port)
        except OSError as exc:
            raise StartupError(f"metrics cannot bind {config.metrics.address}:"
                               f"{config.metrics.port}: {exc.strerror}") from exc

    async def readiness(self) -> tuple[bool, str]:
        """Ready when the spool takes writes and an upstream answered recently.

        A reports API that refuses the key does not stop mail: it is named, not failed.
        """
        if self.spool is None or self.deliveries is None or \
                not await self.spool.check_writable():
            return False, "spool is not writable"
        ready, reason = self.deliveries.readiness()
        if self.poller is not None and self.poller.auth_error:
            reason = f"{reason}; reports pull: {self.poller.auth_error}"
        return ready, reason

    # -- delivery reports (issue 11)

    def _set_up_bounces(self, config: Config, spool: Spool) -> None:
        # Reports are matched by upstream id; without reports nothing reads that index.
        spool.db.index_sent = config.reports.enabled
        sender = config.reports.bounce_sender
        if sender is None:
            return
        spool.db.keep_headers = True
        spool.db.bouncer = DsnBouncer(sender, config.hostname, self.metrics.bounces_sent)

    async def _start_reports(self, config: Config, spool: Spool) -> None:
        """The webhook and the poller, in one process only (worker 0) with ``workers: N``."""
        reports = config.reports
        if not reports.enabled or self.worker != 0:
            return
        self.reports = ReportSink(spool, self.metrics, config.queue.path,
                                  siblings=self.workers > 1, bouncer=spool.db.bouncer)
        if reports.webhook is not None:
            hook = reports.webhook
            self.webhook_server = HTTPServer(webhook_app(hook, self.reports))
            try:
                self.webhook_port = await self.webhook_server.start(hook.address, hook.port)
            except OSError as exc:
                raise StartupError(f"reports.webhook cannot bind {hook.address}:{hook.port}: "
                                   f"{exc.strerror}") from exc
        if reports.pull is not None:
            self.poller = ReportPoller(reports.pull, self.reports, self.metrics)
            self._background(self.poller.run(), "reports-poller")
        self._background(self._match_reports(self.reports), "reports-matcher")

    @staticmethod
    async def _match_reports(sink: ReportSink) -> None:
        """Reports that came before their message's 250 was committed are matched here."""
        while True:
            await asyncio.sleep(_MATCH_INTERVAL)
            try:
                await sink.match_waiting()
            except (SpoolError, OSError) as exc:
                log.error("cannot match waiting reports: %s", exc)

    async def refresh_stats(self) -> None:
        if self.spool is None or self.deliveries is None:
            return
        counts = await self.spool.counts()
        for state, count in counts.items():
            self.metrics.queue_depth.labels(state=state).set(count)
        oldest = await self.spool.oldest_pending()
        self.metrics.oldest_age.set(time.time() - oldest if oldest else 0)
        for delivery in self.deliveries:
            name = delivery.name
            self.metrics.upstream_up.labels(upstream=name).set(1 if delivery.health.ok else 0)
            self.metrics.upstream_auth_ok.labels(upstream=name).set(
                0 if delivery.health.auth_failed else 1)
            self.metrics.upstream_connections_open.labels(upstream=name).set(
                delivery.open_connections)

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
    if old.upstream_process != new.upstream_process:
        log.warning("upstream_process changes only on restart")
    if old.reports != new.reports:
        log.warning("reports settings change only on restart (X-IB-* defaults excepted)")


def run_server(server: Server) -> None:
    """Run one server to completion on the best event loop available."""
    # Measured in three A B B A blocks of relay-only runs, 0.5 ms (the value before) against
    # 20 ms: the mix of 2,000 went from a median of 619 to 657 msgs/s end to end with 6 % less
    # CPU (each block ahead), 2 KiB from 1,334 to 1,411; 1 MiB, 10 MiB and the probes'
    # acceptance latency stayed within their spread. 5 ms came between. 100 ms was ahead of
    # 20 ms in two blocks by 2 and 11 %, within the VM's noise, but would let one long turn of
    # the loop (a reload, a large queue listing) keep the spool's writer from committing as long.
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(server.serve())
    else:
        uvloop.run(server.serve())
