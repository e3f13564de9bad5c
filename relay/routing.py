"""Named upstreams: one `Delivery` per upstream, and the listener's view of them all.

`Deliveries` is the listener's ``MessageSink``: a spooled message goes to the delivery of the
upstream its rules chose (``route``). Each delivery polls the spool for its own route only, so
a bad key or an outage on one upstream pauses that upstream's mail and nothing else.

A reload may add, change or remove upstreams; removing one that queued mail still uses would
strand that mail, so `stranded()` lets the server refuse such a reload first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from relay.config import Config, UpstreamConfig
from relay.delivery import Delivery
from relay.envelope import DEFAULT_UPSTREAM
from relay.metrics import Metrics
from relay.outgoing import MessageData
from relay.spool import QueuedMessage, Spool
from relay.upstream import UpstreamFactory

log = logging.getLogger("relay.routing")

# Makes the connection factory of one upstream (relay.upstream.connection_factory in the relay).
FactoryMaker = Callable[[UpstreamConfig, str], UpstreamFactory]


def stranded(config: Config, waiting: dict[str, int]) -> dict[str, int]:
    """Upstreams missing from ``config`` that queued or deferred mail (``waiting``) still uses."""
    return {name: count for name, count in sorted(waiting.items())
            if count and config.upstream_named(name) is None}


def describe_stranded(counts: dict[str, int]) -> str:
    """``3 queued message(s) still use upstream 'marketing'`` (and so on, for each)."""
    return "; ".join(f"{count} queued message(s) still use upstream {name!r}"
                     for name, count in counts.items())


class Deliveries:
    """The deliveries of one spool, by upstream name; the listener's ``MessageSink``."""

    def __init__(self, config: Config, spool: Spool, metrics: Metrics,
                 make_factory: FactoryMaker) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.make_factory = make_factory
        # One set for all: the listener claims an id before the route is known to anyone.
        self._known: set[str] = set()
        self._by_name: dict[str, Delivery] = {}
        # Set by stop(): a reload still running then must not start or replace anything.
        self._stopping = False
        for upstream in config.all_upstreams:
            self._by_name[upstream.name] = self._new(config, upstream)

    def _new(self, config: Config, upstream: UpstreamConfig) -> Delivery:
        self.metrics.add_upstream(upstream.name)
        return Delivery(config, self.spool, self.metrics,
                        self.make_factory(upstream, config.hostname), name=upstream.name,
                        known=self._known)

    def __iter__(self) -> Iterator[Delivery]:
        return iter(self._by_name.values())

    def get(self, name: str) -> Delivery | None:
        return self._by_name.get(name)

    @property
    def default(self) -> Delivery:
        return self._by_name[DEFAULT_UPSTREAM]

    # -- lifecycle

    async def start(self) -> None:
        for delivery in self:
            await delivery.start()

    async def stop(self, grace: float) -> None:
        self._stopping = True
        await asyncio.gather(*(delivery.stop(grace) for delivery in self))

    async def reconfigure(self, config: Config, grace: float) -> None:
        """Adopt a reloaded config (the server checked first that nothing is stranded):
        upstreams added start, changed ones reconnect, removed ones stop (within ``grace``).
        Nothing once stop() has begun: a delivery started then would outlive the shutdown."""
        if self._stopping:
            log.warning("the relay is stopping: the reloaded upstream settings are not applied")
            return
        old = self.config
        self.config = config
        for upstream in config.all_upstreams:
            delivery = self._by_name.get(upstream.name)
            if delivery is None:
                delivery = self._by_name[upstream.name] = self._new(config, upstream)
                await delivery.start()
                log.info("upstream %s added (%s:%d)", upstream.name, upstream.host, upstream.port)
            elif upstream != old.upstream_named(upstream.name):
                delivery.reconfigure(config, self.make_factory(upstream, config.hostname))
            else:
                delivery.config = config
        removed = [name for name in self._by_name if config.upstream_named(name) is None]
        for name in removed:
            await self._by_name.pop(name).stop(grace)
            self.metrics.remove_upstream(name)
            log.info("upstream %s removed", name)

    # -- the listener's side (relay.listener.MessageSink)

    def reserve(self, message_id: str) -> None:
        self._known.add(message_id)

    def release(self, message_id: str) -> None:
        self._known.discard(message_id)

    def submit(self, message: QueuedMessage, data: MessageData | None) -> None:
        delivery = self._by_name.get(message.route)
        if delivery is None:
            # Only a message spooled while a reload removed its upstream gets here.
            self._known.discard(message.id)
            log.error("%s is routed to upstream %r, which is no longer configured; it waits in "
                      "the spool until that upstream is configured again", message.id,
                      message.route, extra={"queue_id": message.id})
            return
        delivery.submit(message, data)

    @property
    def upstream_smtputf8(self) -> bool | None:
        """Whether every upstream takes SMTPUTF8: MAIL comes before the rules choose one."""
        known = [delivery.health.smtputf8 for delivery in self]
        if False in known:
            return False
        return None if None in known else True

    @property
    def upstream_max_size(self) -> int | None:
        """The smallest SIZE an upstream advertised: the route is not known at MAIL."""
        sizes = [size for delivery in self if (size := delivery.health.max_size) is not None]
        return min(sizes) if sizes else None

    # -- readiness

    def readiness(self) -> tuple[bool, str]:
        """Ready while any upstream is: one account's bad key must not take the gateway (and
        the other accounts' mail) out of a load balancer. The reason names every upstream."""
        verdicts = [(delivery.name, *delivery.health.readiness()) for delivery in self]
        if len(verdicts) == 1:
            return verdicts[0][1], verdicts[0][2]
        ready = any(ok for _, ok, _ in verdicts)
        details = "; ".join(f"upstream {name}: {reason}" for name, _, reason in verdicts)
        count = sum(ok for _, ok, _ in verdicts)
        return ready, f"{'ready' if ready else 'not ready'} ({count} of {len(verdicts)} " \
                      f"upstreams ready): {details}"
