"""The scheduler: takes due messages from the spool, forwards them, records every outcome.

Fresh messages come straight from the listener (no spool read); deferred ones and those left by
a previous run are found by polling the spool. One worker task owns one upstream connection, so
`upstream.connections` workers send in parallel, each reusing its authenticated session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.config import Config
from relay.metrics import Metrics
from relay.spool import Outcome, QueuedMessage, Recipient, Spool, State
from relay.upstream import (
    SendResult,
    UpstreamAuthError,
    UpstreamConnection,
    UpstreamUnavailable,
)

log = logging.getLogger("relay.delivery")

_POLL_INTERVAL = 1.0
_POLL_BATCH = 2000
_PRUNE_INTERVAL = 3600.0
_PROBE_INTERVAL = 60.0
# Fresh messages keep their bytes in memory up to this total, sparing a spool read per message;
# past it (a slow or absent upstream) they are read back from the spool when their turn comes.
_MEMORY_BUDGET = 16 * 1024 * 1024
_MAX_CONNECT_BACKOFF = 60.0


@dataclass(order=True)
class _Job:
    priority: int
    created: float
    seq: int
    id: str = field(compare=False)
    message: QueuedMessage | None = field(compare=False, default=None)
    data: bytes | None = field(compare=False, default=None)


class UpstreamHealth:
    """Shared view of the upstream: workers pause while it is down instead of burning attempts."""

    def __init__(self) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.auth_failed = False
        self.last_success: float | None = None
        self.last_error: str | None = None

    def record_success(self) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.auth_failed = False
        self.last_success = time.time()
        self.last_error = None

    def record_failure(self, error: str) -> float:
        self.failures += 1
        delay = min(_MAX_CONNECT_BACKOFF, 2.0 ** (self.failures - 1))
        self.down_until = time.monotonic() + delay
        self.last_error = error
        return delay

    def record_auth_failure(self, error: str, pause: float) -> None:
        self.auth_failed = True
        self.down_until = time.monotonic() + pause
        self.last_error = error

    @property
    def ok(self) -> bool:
        return self.failures == 0 and not self.auth_failed and self.last_success is not None

    async def wait_until_up(self) -> None:
        while (remaining := self.down_until - time.monotonic()) > 0:
            await asyncio.sleep(min(remaining, 1.0))


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter: initial * 2^(attempts-1), +-20 %, capped at maximum."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return min(maximum, max(initial, base * random.uniform(0.8, 1.2)))  # noqa: S311


def decide_outcome(message: QueuedMessage, result: SendResult, now: float,
                   config: Config) -> Outcome:
    """Merge one attempt's per-recipient results into the message's new spool state."""
    queue = config.queue
    expired = now - message.created >= queue.max_age
    recipients: list[Recipient] = []
    for recipient in message.recipients:
        address = recipient.address
        if recipient.state != "pending":
            recipients.append(recipient)
        elif address in result.accepted:
            recipients.append(Recipient(address, "delivered", result.reply))
        elif address in result.permanent:
            recipients.append(Recipient(address, "failed", result.permanent[address]))
        else:
            reply = result.temporary.get(address) or result.reply or "not attempted"
            if expired:
                recipients.append(Recipient(address, "failed", f"expired after max_age: {reply}"))
            else:
                recipients.append(Recipient(address, "pending", reply))
    attempts = message.attempts + 1
    state = _message_state(recipients)
    next_attempt = now
    if state == "deferred":
        next_attempt = now + backoff_delay(attempts, queue.retry_initial, queue.retry_max)
    last_reply = result.reply or next(
        (r.reply for r in recipients if r.reply and r.state != "delivered"), None)
    return Outcome(tuple(recipients), state, next_attempt, attempts, last_reply,
                   result.upstream_id)


def _message_state(recipients: list[Recipient]) -> State:
    states = {r.state for r in recipients}
    if "pending" in states:
        return "deferred"
    if "failed" in states:
        return "failed"
    return "delivered"


ConnectionFactory = Callable[[], UpstreamConnection]


class Delivery:
    """Workers + poller + housekeeping around one spool and one upstream."""

    def __init__(self, config: Config, spool: Spool, metrics: Metrics,
                 connection_factory: ConnectionFactory) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.connection_factory = connection_factory
        self.health = UpstreamHealth()
        self._ready: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._known: set[str] = set()
        self._seq = itertools.count()
        self._memory = 0
        self._workers: list[asyncio.Task[None]] = []
        self._connections: list[UpstreamConnection] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        self._stopping = False
        self._wake = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        for index in range(self.config.upstream.connections):
            connection = self.connection_factory()
            self._connections.append(connection)
            self._workers.append(asyncio.create_task(self._work(index),
                                                     name=f"delivery-worker-{index}"))
        self._tasks.append(asyncio.create_task(self._poll(), name="delivery-poller"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="delivery-housekeeping"))

    async def stop(self, grace: float) -> None:
        """Let sends in flight finish (up to ``grace`` seconds); everything else stays spooled."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        deadline = time.monotonic() + grace
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, *self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._connections), return_exceptions=True)

    def reconfigure(self, config: Config, connection_factory: ConnectionFactory) -> None:
        """Adopt a reloaded config: new connections use it; the health state starts afresh."""
        self.config = config
        self.connection_factory = connection_factory
        self.health = UpstreamHealth()
        for index, connection in enumerate(self._connections):
            replacement = connection_factory()
            self._connections[index] = replacement
            asyncio.create_task(connection.close())  # noqa: RUF006
        self._wake.set()

    # -- the listener's side

    def reserve(self, message_id: str) -> None:
        """Claim an id before it is spooled, so the poller cannot schedule it a second time."""
        self._known.add(message_id)

    def release(self, message_id: str) -> None:
        self._known.discard(message_id)

    def submit(self, message: QueuedMessage, data: bytes) -> None:
        """Queue a freshly spooled message for immediate delivery."""
        keep = self._memory + len(data) <= _MEMORY_BUDGET
        if keep:
            self._memory += len(data)
        self._ready.put_nowait(_Job(message.priority, message.created, next(self._seq),
                                    message.id, message, data if keep else None))

    @property
    def open_connections(self) -> int:
        return sum(1 for connection in self._connections if connection.connected)

    # -- workers

    async def _work(self, index: int) -> None:
        """Deliver with connection slot ``index`` (reconfigure() may replace the connection)."""
        while not self._stopping:
            await self.health.wait_until_up()
            try:
                job = await asyncio.wait_for(self._ready.get(),
                                             timeout=self.config.upstream.idle_timeout)
            except TimeoutError:
                # Close idle sessions politely rather than let the provider cut them.
                await self._connections[index].close()
                continue
            self._busy += 1
            recorded: asyncio.Future[bool] | None = None
            try:
                recorded = await self._deliver(self._connections[index], job)
            except Exception:
                log.exception("unexpected error delivering %s; it stays queued", job.id)
            finally:
                self._busy -= 1
                if recorded is None:
                    self._release(job)
                else:
                    # The next message goes out while this outcome is being committed; the id
                    # stays claimed until then so that the poller cannot send it again.
                    recorded.add_done_callback(functools.partial(self._release, job))

    def _release(self, job: _Job, recorded: asyncio.Future[bool] | None = None) -> None:
        if job.data is not None:
            self._memory -= len(job.data)
        self._known.discard(job.id)
        if recorded is not None and not recorded.cancelled() and recorded.exception():
            log.error("cannot record the outcome for %s: %s", job.id, recorded.exception())

    async def _deliver(self, connection: UpstreamConnection, job: _Job
                       ) -> asyncio.Future[bool] | None:
        """Send one message; returns the pending commit of its outcome, if there is one."""
        message = job.message or await self.spool.get(job.id)
        if message is None or message.state not in ("queued", "deferred") or not message.pending:
            return None
        data = job.data if job.data is not None else await self.spool.data(job.id)
        if data is None:
            return None
        started = time.monotonic()
        try:
            result = await connection.send(message.mail_from, message.pending, data,
                                           message.mail_options)
        except UpstreamAuthError as exc:
            return self._on_auth_failure(message, str(exc))
        except UpstreamUnavailable as exc:
            return self._on_unavailable(message, str(exc))
        self.health.record_success()
        self.metrics.observe_send(time.monotonic() - started, result, len(data))
        outcome = decide_outcome(message, result, time.time(), self.config)
        return self._record(message, outcome)

    def _on_auth_failure(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        pause = self.config.queue.auth_retry
        if not self.health.auth_failed:
            log.error("upstream authentication failed: %s; mail stays queued, retrying every %ss",
                      error, int(pause))
        self.health.record_auth_failure(error, pause)
        self.metrics.upstream_errors.labels(kind="auth").inc()
        # Not the message's fault: its attempt count and age limit are left alone.
        outcome = Outcome(message.recipients, "deferred", time.time() + pause, message.attempts,
                          f"upstream authentication failed: {error}")
        return self._record(message, outcome, log_it=False)

    def _on_unavailable(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        delay = self.health.record_failure(error)
        if self.health.failures == 1:
            log.warning("upstream unavailable: %s; pausing delivery %.0fs", error, delay)
        self.metrics.upstream_errors.labels(kind="unavailable").inc()
        outcome = decide_outcome(message, SendResult(reply=f"451 4.4.1 {error}"), time.time(),
                                 self.config)
        return self._record(message, outcome)

    def _record(self, message: QueuedMessage, outcome: Outcome, *, log_it: bool = True
                ) -> asyncio.Future[bool]:
        recorded = self.spool.record_soon(message.id, outcome)
        self.metrics.outcomes.labels(state=outcome.state).inc()
        if log_it:
            self._log_outcome(message, outcome)
        return recorded

    @staticmethod
    def _log_outcome(message: QueuedMessage, outcome: Outcome) -> None:
        level = {"delivered": logging.INFO, "deferred": logging.WARNING}.get(outcome.state,
                                                                           logging.ERROR)
        if not log.isEnabledFor(level):
            return
        delivered = sum(1 for r in outcome.recipients if r.state == "delivered")
        extra = {"queue_id": message.id, "state": outcome.state, "attempts": outcome.attempts,
                 "upstream_id": outcome.upstream_id, "reply": outcome.last_reply,
                 "recipients": len(outcome.recipients)}
        if outcome.state == "delivered":
            log.info("%s delivered to %d recipient(s): %s", message.id, delivered,
                     outcome.last_reply, extra=extra)
        elif outcome.state == "deferred":
            log.warning("%s deferred (attempt %d, next in %.0fs): %s", message.id,
                        outcome.attempts, outcome.next_attempt - time.time(), outcome.last_reply,
                        extra=extra)
        else:
            log.error("%s failed: %s", message.id, outcome.last_reply, extra=extra)

    # -- poller and housekeeping

    async def _poll(self) -> None:
        """Schedule due messages: deferred ones, retried ones, those left by an earlier run."""
        while not self._stopping:
            if self._ready.qsize() < _POLL_BATCH // 2:
                try:
                    due = await self.spool.due(time.time(), _POLL_BATCH)
                except Exception as exc:
                    log.error("cannot read the spool: %s", exc)
                    due = []
                for message_id, priority, created in due:
                    if message_id not in self._known:
                        self._known.add(message_id)
                        self._ready.put_nowait(_Job(priority, created, next(self._seq),
                                                    message_id))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_INTERVAL)

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        last_probe = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now - last_prune >= _PRUNE_INTERVAL:
                last_prune = now
                with contextlib.suppress(Exception):
                    pruned = await self.spool.prune_delivered(
                        time.time() - self.config.queue.keep_delivered)
                    if pruned:
                        log.debug("pruned %d delivered record(s)", pruned)
            if now - last_probe >= _PROBE_INTERVAL and self._busy == 0 and self._ready.empty():
                last_probe = now
                await self._probe()
            await asyncio.sleep(1.0)

    async def _probe(self) -> None:
        """Check the upstream when idle, so readiness and bad credentials show before mail does."""
        if time.monotonic() < self.health.down_until:
            return
        if self.health.last_success and time.time() - self.health.last_success < _PROBE_INTERVAL:
            return
        connection = self.connection_factory()
        try:
            await connection.probe()
        except UpstreamAuthError as exc:
            if not self.health.auth_failed:
                log.error("upstream authentication failed: %s", exc)
            self.health.record_auth_failure(str(exc), self.config.queue.auth_retry)
        except UpstreamUnavailable as exc:
            if self.health.failures == 0:
                log.warning("upstream unavailable: %s", exc)
            self.health.record_failure(str(exc))
        else:
            self.health.record_success()
        finally:
            await connection.close()
