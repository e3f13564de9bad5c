"""Prometheus metrics of one relay instance (served by relay.httpserver)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relay import __version__

if TYPE_CHECKING:
    from relay.upstream import SendResult

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
        # Pacing (relay.pacing), per upstream: what AIMD currently allows this process.
        self.pacing_rate = Gauge("relay_upstream_pacing_rate",
                                 "Effective send rate limit in messages/s (0: unlimited)",
                                 ["upstream"], registry=r)
        self.pacing_connections = Gauge("relay_upstream_pacing_connections",
                                        "Effective number of connections that may send at once",
                                        ["upstream"], registry=r)
        self.throttling = Gauge("relay_upstream_throttling",
                                "1 while throttling replies hold the pace below the configured "
                                "one", ["upstream"], registry=r)
        self.throttled_replies = Counter("relay_upstream_throttled_replies",
                                         "Throttling replies from the upstream (421/450/451/454 "
                                         "matching upstream.throttle_patterns)", ["upstream"],
                                         registry=r)
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
        self.upstream_process_restarts = Counter(
            "relay_upstream_process_restarts",
            "Times the upstream process ended unasked (its sends became outcome-unknown)",
            registry=r)
        self.upstream_auth_ok = Gauge("relay_upstream_auth_ok",
                                      "0 while the upstream refuses our credentials",
                                      ["upstream"], registry=r)
        self.ready = Gauge("relay_ready", "1 if /readyz answers 200 (evaluated at each scrape)",
                           registry=r)
        self.spool_writable = Gauge("relay_spool_writable",
                                    "1 if the spool takes writes (evaluated at each scrape)",
                                    registry=r)
        self.spool_writable.set(1)
        # Delivery reports and tracking events (issue 11).
        self.reports = Counter("relay_reports", "Infobip delivery reports received, by status "
                               "group (each report once)", ["group"], registry=r)
        self.tracking_events = Counter("relay_tracking_events", "Infobip tracking events "
                                       "received, by type (each eventId once)", ["type"],
                                       registry=r)
        self.bounces_sent = Counter("relay_bounces_sent", "DSNs queued to original senders",
                                    registry=r)
        self.reports_unmatched = Gauge("relay_reports_unmatched", "Reports and tracking events "
                                       "waiting for their message's record", registry=r)
        self.reports_pull_success = Gauge(
            "relay_reports_pull_last_success_timestamp_seconds",
            "Unix time of the last successful poll of Infobip's reports API (0: none yet)",
            registry=r)
        self.reports_pull_errors = Counter("relay_reports_pull_errors", "Failed polls of "
                                           "Infobip's reports API", ["kind"], registry=r)

        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram) and metric._labelnames:
                _remember_children(metric)

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


def _remember_children(metric: Counter | Gauge | Histogram) -> None:
    """Make ``metric.labels(...)`` a dictionary lookup after the first call with those values.

    prometheus_client checks, converts and sorts the label values and takes a lock on every
    call; the relay asks for the same few children several times per message (the
    listener's, the upstream's). ``remove`` and ``clear`` forget what they drop.
    """
    children: dict[tuple[tuple[object, ...], tuple[tuple[str, object], ...]], Any] = {}
    labels, remove, clear = metric.labels, metric.remove, metric.clear

    def remembered_labels(*values: object, **named: object) -> Any:
        key = (values, tuple(named.items()))
        child = children.get(key)
        if child is None:
            child = children[key] = labels(*values, **named)
        return child

    def forgetting_remove(*values: object) -> None:
        children.clear()
        remove(*values)

    def forgetting_clear() -> None:
        children.clear()
        clear()

    metric.labels = remembered_labels  # type: ignore[method-assign]
    metric.remove = forgetting_remove  # type: ignore[method-assign]
    metric.clear = forgetting_clear  # type: ignore[method-assign]
