"""Prometheus metrics and the HTTP endpoints /metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay import __version__

if TYPE_CHECKING:
    from relay.upstream import SendResult

log = logging.getLogger("relay.metrics")

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
StatsRefresher = Callable[[], Awaitable[None]]
# The readiness reason that means the spool refused a write (relay.app.Server.readiness).
SPOOL_NOT_WRITABLE = "spool is not writable"


class Metrics:
    """Every metric of one relay instance, in its own registry (tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("relay_smtp_connections", "Client connections accepted",
                                   ["listener"], registry=r)
        self.connections_open = Gauge("relay_smtp_connections_open", "Client connections open",
                                      ["listener"], registry=r)
        self.received = Counter("relay_messages_received", "Messages whose DATA was received",
                                ["listener"], registry=r)
        self.accepted = Counter("relay_messages_accepted", "Messages spooled and answered 250",
                                ["listener"], registry=r)
        self.rejected = Counter("relay_messages_rejected", "Commands or messages refused",
                                ["listener", "reason"], registry=r)
        self.outcomes = Counter("relay_delivery_attempts",
                                "Delivery attempts by resulting message state "
                                "(delivered, deferred, failed)", ["state", "upstream"],
                                registry=r)
        # Everything about one upstream carries its name (`upstream`, `upstreams:` keys) in
        # the label ``upstream``: a bad key on one account shows on that account alone.
        self.upstream_replies = Counter("relay_upstream_replies", "Upstream replies by code",
                                        ["code", "upstream"], registry=r)
        self.upstream_errors = Counter("relay_upstream_errors",
                                       "Connection-level upstream failures", ["kind", "upstream"],
                                       registry=r)
        self.unknown_outcomes = Counter(
            "relay_upstream_unknown_outcomes",
            "Messages deferred because no reply to the final dot came back (the upstream may "
            "have them: retried after queue.retry_max)", ["upstream"], registry=r)
        self.upstream_connections_open = Gauge("relay_upstream_connections_open",
                                               "Authenticated upstream connections open",
                                               ["upstream"], registry=r)
        self.send_latency = Histogram("relay_upstream_send_seconds",
                                      "Time to forward one message upstream", ["upstream"],
                                      registry=r,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
                                               30, 60))
        self.bytes_in = Counter("relay_bytes_received", "Message bytes received from clients",
                                registry=r)
        self.bytes_out = Counter("relay_bytes_sent", "Message bytes sent upstream", registry=r)
        self.rule_matches = Counter("relay_rule_matches", "Messages matched by each rule",
                                    ["rule"], registry=r)
        self.client_headers = Counter("relay_client_headers",
                                      "X-IB-* headers from clients fixed or dropped",
                                      ["action"], registry=r)
        self.auth_failures = Counter("relay_auth_failures", "Failed local AUTH attempts",
                                     ["listener"], registry=r)
        self.queue_depth = Gauge("relay_queue_messages", "Messages in the spool by state",
                                 ["state"], registry=r)
        self.oldest_age = Gauge("relay_queue_oldest_age_seconds",
                                "Age of the oldest queued or deferred message", registry=r)
        self.upstream_up = Gauge("relay_upstream_up",
                                 "1 if the last upstream contact succeeded", ["upstream"],
                                 registry=r)
        # The operator's view (issue 13): `infobip-relay status`, deploy/monitoring/.
        self.build_info = Gauge("relay_build_info", "Always 1; the version is in the label",
                                ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self.start_time = Gauge("relay_start_time_seconds",
                                "Unix time at which this relay process started", registry=r)
        self.start_time.set(time.time())
        self.last_delivery = Gauge("relay_last_delivery_timestamp_seconds",
                                   "Unix time at which the upstream last accepted a message "
                                   "(0: not since the start)", registry=r)
        self.upstream_auth_ok = Gauge("relay_upstream_auth_ok",
                                      "0 while the upstream refuses our credentials",
                                      ["upstream"], registry=r)
        self.ready = Gauge("relay_ready", "1 if /readyz answers 200 (evaluated at each scrape)",
                           registry=r)
        self.spool_writable = Gauge("relay_spool_writable",
                                    "1 if the spool takes writes (evaluated at each scrape)",
                                    registry=r)
        self.spool_writable.set(1)

    def add_upstream(self, name: str) -> None:
        """Export an upstream's series from the start (an alert needs a 0 to compare with)."""
        self.upstream_up.labels(upstream=name).set(0)
        self.upstream_auth_ok.labels(upstream=name).set(1)
        self.upstream_connections_open.labels(upstream=name).set(0)
        self.unknown_outcomes.labels(upstream=name)

    def remove_upstream(self, name: str) -> None:
        """Stop exporting the gauges of an upstream that a reload removed."""
        for gauge in (self.upstream_up, self.upstream_auth_ok, self.upstream_connections_open):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def observe_send(self, seconds: float, result: SendResult, size: int, upstream: str
                     ) -> None:
        self.send_latency.labels(upstream=upstream).observe(seconds)
        code = result.reply[:3] if result.reply[:3].isdigit() else "other"
        self.upstream_replies.labels(code=code, upstream=upstream).inc()
        if result.accepted:
            self.bytes_out.inc(size)
            self.last_delivery.set(time.time())

    def observe_readiness(self, ready: bool, reason: str) -> None:
        self.ready.set(1 if ready else 0)
        self.spool_writable.set(0 if reason == SPOOL_NOT_WRITABLE else 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """A tiny asyncio HTTP/1.1 server: enough for Prometheus and orchestrator probes."""

    def __init__(self, metrics: Metrics, readiness: Readiness, refresh: StatsRefresher) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.refresh = refresh
        self._server: asyncio.Server | None = None
        self.started = time.time()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n",
                                                                                  b""):
                del line
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"method not allowed\n")
                return
            status, body, content_type = await self._route(parts[1].split("?", 1)[0])
            await self._respond(writer, status, body if parts[0] == "GET" else b"", content_type)
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("health endpoint failed")
            await self._respond(writer, 500, b"internal error\n")
        finally:
            writer.close()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            await self.refresh()
            self.metrics.observe_readiness(*await self.readiness())
            return 200, self.metrics.render(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            ready, reason = await self.readiness()
            return (200 if ready else 503), (reason + "\n").encode(), "text/plain"
        return 404, b"not found\n", "text/plain"

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                       content_type: str = "text/plain") -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Error",
                  503: "Service Unavailable"}.get(status, "OK")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
