"""The scheduler: takes due messages from the spool, forwards them, records every outcome.

Fresh messages come straight from the listener (no spool read); deferred ones and those left by
a previous run are found by polling the spool. One worker task owns one upstream connection, so
`upstream.connections` workers send in parallel, each reusing its authenticated session.

Every send is paced (relay.pacing): it waits for its upstream's token and for a place among the
connections that may send at once, both cut back while the upstream answers with throttling
replies. The message sent is the most urgent one ready when the token comes, so pacing keeps
the HIGH > STANDARD > LOW order.

Delivery knows the upstream only as the `Upstream` protocol (send / probe / close), made by the
factory it is given: the relay passes `upstream.connection_factory`, the tests a scripted fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
from dataclasses import dataclass, field, replace

from relay.config import Config, UpstreamConfig
from relay.envelope import DEFAULT_UPSTREAM
from relay.logs import info_line
from relay.metrics import Metrics
from relay.outgoing import MessageData, SpooledBody, message_size
from relay.pacing import Pacer
from relay.spool import (
    EXPIRED_PREFIX,
    REPORT_WAIT_CAP,
    Outcome,
    QueuedMessage,
    Recipient,
    Spool,
    State,
    message_state,
)
from relay.upstream import (
    SendResult,
    Upstream,
    UpstreamAuthError,
    UpstreamFactory,
    UpstreamOutcomeUnknown,
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
# While mail waits for a paused upstream, probe this often: one failed burst of connects must not
# hold the mail back for _MAX_CONNECT_BACKOFF once the upstream is back.
_WAITING_PROBE_INTERVAL = 2.0
_LOG_LEVELS = {"delivered": logging.INFO, "pending": logging.WARNING, "failed": logging.ERROR,
               "bounced": logging.ERROR}
# Ready means the upstream answered within this window (a probe runs every _PROBE_INTERVAL).
_READY_UPSTREAM_WINDOW = 300.0


@dataclass(order=True)
class _Job:
    priority: int
    created: float
    seq: int
    id: str = field(compare=False)
    message: QueuedMessage | None = field(compare=False, default=None)
    data: MessageData | None = field(compare=False, default=None)

    @property
    def memory(self) -> int:
        """The bytes this job holds in memory (a body file's head only)."""
        if self.data is None:
            return 0
        return len(self.data.head if isinstance(self.data, SpooledBody) else self.data)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One send and the state it reports into, all of one config generation.

    reconfigure() replaces the connection, the health state and perhaps the pacer at once;
    a send that began before it reports into the ones it began with, never into the new.
    """

    connection: Upstream
    health: UpstreamHealth
    pacer: Pacer
    ticket: int


class UpstreamHealth:
    """Shared view of the upstream: workers pause while it is down instead of burning attempts."""

    def __init__(self) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.auth_failed = False
        self.last_success: float | None = None
        self.last_error: str | None = None
        # Learnt from the upstream's EHLO; the listener refuses what it could not forward.
        self.smtputf8: bool | None = None
        # The upstream's EHLO SIZE: the listener never accepts a message it could not forward.
        self.max_size: int | None = None

    def record_success(self, smtputf8: bool | None = None, max_size: int | None = None
                       ) -> None:
        if smtputf8 is not None:
            self.smtputf8 = smtputf8
            self.max_size = max_size  # learnt at the same EHLO (None: no limit advertised)
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

    @property
    def paused(self) -> bool:
        return time.monotonic() < self.down_until

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) as far as the upstream goes: it answered recently and accepts us."""
        if self.auth_failed:
            return False, f"upstream refuses our credentials: {self.last_error}"
        recent = self.last_success is not None and \
            time.time() - self.last_success < _READY_UPSTREAM_WINDOW
        if self.failures or not recent:
            reason = self.last_error or "no contact yet"
            return False, f"upstream not reachable recently: {reason}"
        return True, "ready"


def _nothing_handed_over(outcome: Outcome) -> bool:
    """A deferral in which every recipient is still pending: no copy is upstream."""
    return outcome.state == "deferred" and all(r.state == "pending" for r in outcome.recipients)


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter: initial * 2^(attempts-1), +-20 %, capped at maximum."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return min(maximum, max(initial, base * random.uniform(0.8, 1.2)))  # noqa: S311


def decide_outcome(message: QueuedMessage, result: SendResult, now: float,
                   config: Config, *, min_delay: float = 0.0) -> Outcome:
    """Merge one attempt's per-recipient results into the message's new spool state.

    ``min_delay``: a deferred message waits at least this long (an unknown outcome).
    """
    queue = config.queue
    expired = now - message.created >= queue.max_age
    recipients: list[Recipient] = []
    for recipient in message.recipients:
        address = recipient.address
        if recipient.state != "pending":
            recipients.append(recipient)
        elif address in result.accepted:
            recipients.append(Recipient(address, "delivered", result.reply,
                                        upstream_id=result.upstream_id))
        elif address in result.permanent:
            recipients.append(Recipient(address, "failed", result.permanent[address]))
        else:
            reply = result.temporary.get(address) or result.reply or "not attempted"
            if expired:
                recipients.append(Recipient(address, "failed", f"{EXPIRED_PREFIX}{reply}"))
            else:
                recipients.append(Recipient(address, "pending", reply))
    attempts = message.attempts + 1
    state = message_state(recipients)
    next_attempt = now
    if state == "deferred":
        next_attempt = now + max(min_delay, backoff_delay(attempts, queue.retry_initial,
                                                          queue.retry_max))
    last_reply = _explaining_reply(message, recipients, result, state)
    return Outcome(tuple(recipients), state, next_attempt, attempts, last_reply,
                   result.upstream_id)


def _explaining_reply(message: QueuedMessage, recipients: list[Recipient], result: SendResult,
                      state: State) -> str | None:
    """The reply that explains the new state: never another recipient's 250 or an older 5xx."""
    if state == "delivered":
        return result.reply or None
    attempted = set(message.pending)
    for wanted in ("pending", "failed"):
        for recipient in recipients:
            if recipient.state == wanted and recipient.address in attempted and recipient.reply:
                return recipient.reply
    return result.reply or None


class Delivery:
    """Workers + poller + housekeeping around one spool and one named upstream.

    It takes from the spool only the messages routed to ``name``: each upstream has its own
    workers, connections, health and auth-failure pause (relay.routing runs one per upstream).
    ``known``: the claimed ids, shared by the deliveries of one spool (the listener claims an
    id before it knows which one will send it).
    """

    def __init__(self, config: Config, spool: Spool, metrics: Metrics,
                 upstream_factory: UpstreamFactory, *, name: str = DEFAULT_UPSTREAM,
                 known: set[str] | None = None) -> None:
        self.config = config
        self.name = name
        self.pacer = _pacer_for(config, name)
        self.spool = spool
        self.metrics = metrics
        self.upstream_factory = upstream_factory
        self.health = UpstreamHealth()
        self._ready: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._known: set[str] = set() if known is None else known
        # Outcomes the spool could not commit (disk full, I/O error). Their messages stay
        # claimed, so a delivered one is never sent again, until a retry commits them.
        self._unrecorded: dict[str, Outcome] = {}
        self._seq = itertools.count()
        self._memory = 0
        self._workers: list[asyncio.Task[None]] = []
        self._connections: list[Upstream] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Connections replaced by reconfigure(), closing in the background; awaited at stop().
        self._closing: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._stopping = False
        self._wake = asyncio.Event()
        # Set when the upstream may be usable again (a probe succeeded, a reload): paused
        # workers look at the health again at once.
        self._resume = asyncio.Event()

    # -- lifecycle

    @property
    def upstream(self) -> UpstreamConfig:
        """This delivery's upstream settings in the current config."""
        return _named_upstream(self.config, self.name)

    async def start(self) -> None:
        for index in range(self.upstream.connections):
            connection = self.upstream_factory()
            self._connections.append(connection)
            self._workers.append(asyncio.create_task(self._work(index),
                                                     name=f"delivery-worker-{index}"))
        self._show_pacing()
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
        await asyncio.gather(*(c.close() for c in self._connections), *self._closing,
                             return_exceptions=True)
        await self._record_unrecorded()
        if self._unrecorded:
            log.error("%d outcome(s) could not be recorded before shutdown; those messages may "
                      "be sent again after a restart: %s", len(self._unrecorded),
                      ", ".join(sorted(self._unrecorded)))

    def reconfigure(self, config: Config, upstream_factory: UpstreamFactory) -> None:
        """Adopt a reloaded config: new connections use it; the health state starts afresh, and
        so does the pace if its settings changed."""
        if _pacing_settings(config, self.name) != _pacing_settings(self.config, self.name):
            self.pacer = _pacer_for(config, self.name)
            self._show_pacing()
        self.config = config
        self.upstream_factory = upstream_factory
        self.health = UpstreamHealth()
        for index, connection in enumerate(self._connections):
            self._connections[index] = upstream_factory()
            closing = asyncio.create_task(connection.close(), name="delivery-close-replaced")
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._resume.set()
        self._wake.set()

    # -- the listener's side

    def reserve(self, message_id: str) -> None:
        """Claim an id before it is spooled, so the poller cannot schedule it a second time."""
        self._known.add(message_id)

    def release(self, message_id: str) -> None:
        self._known.discard(message_id)

    def submit(self, message: QueuedMessage, data: MessageData | None) -> None:
        """Queue a freshly spooled message for immediate delivery (None: read it back later)."""
        job = _Job(message.priority, message.created, next(self._seq), message.id, message, data)
        if self._memory + job.memory > _MEMORY_BUDGET:
            job.data = None
        self._memory += job.memory
        self._ready.put_nowait(job)

    @property
    def upstream_smtputf8(self) -> bool | None:
        return self.health.smtputf8

    @property
    def upstream_max_size(self) -> int | None:
        return self.health.max_size

    @property
    def open_connections(self) -> int:
        return sum(1 for connection in self._connections if connection.connected)

    # -- workers

    async def _work(self, index: int) -> None:
        """Deliver with connection slot ``index`` (reconfigure() may replace the connection)."""
        while not self._stopping:
            await self._wait_until_up()
            pacer = self.pacer  # reconfigure() may replace it: leave the gate that was entered
            async with pacer.gate:
                taken = await self._take(index, pacer)
                if taken is not None:
                    job, ticket = taken
                    await self._work_on(job, _Attempt(self._connections[index], self.health,
                                                      pacer, ticket))

    async def _take(self, index: int, pacer: Pacer) -> tuple[_Job, int] | None:
        """The most urgent ready job once the pacer lets a send start, with its pacing ticket.

        The job that woke us goes back first and the head of the queue is taken only with the
        token: a LOW message waiting for a token never goes before a HIGH one queued
        meanwhile. None: idle for idle_timeout (the session is closed), or the others took
        every job while we waited.
        """
        if self._ready.empty():  # wait_for wraps get() in a task: only when there is a wait
            try:
                job = await asyncio.wait_for(self._ready.get(),
                                             timeout=self.upstream.idle_timeout)
            except TimeoutError:
                # Close idle sessions politely rather than let the provider cut them.
                await self._connections[index].close()
                return None
        else:
            job = self._ready.get_nowait()
        self._ready.put_nowait(job)
        ticket = await pacer.acquire()
        if self._stopping:  # stop() began meanwhile: only sends already in flight finish
            pacer.refund()
            return None
        try:
            return self._ready.get_nowait(), ticket
        except asyncio.QueueEmpty:
            pacer.refund()
            return None

    async def _work_on(self, job: _Job, attempt: _Attempt) -> None:
        self._busy += 1
        recorded: asyncio.Future[bool] | None = None
        try:
            recorded = await self._deliver(job, attempt)
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

    async def _wait_until_up(self) -> None:
        """Pause while the upstream is down; reconfigure() replaces self.health, so re-read it."""
        while (remaining := self.health.down_until - time.monotonic()) > 0:
            self._resume.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resume.wait(), remaining)

    def _release(self, job: _Job, recorded: asyncio.Future[bool] | None = None) -> None:
        self._memory -= job.memory
        if job.id not in self._unrecorded:
            self._known.discard(job.id)

    def _keep_if_unrecorded(self, message_id: str, outcome: Outcome, keep: bool,
                            recorded: asyncio.Future[bool]) -> None:
        if recorded.cancelled() or recorded.exception() is None:
            return
        if not keep:
            # Nothing reached the upstream: the row as it stands is still true, so the
            # message is simply due again. Held back instead, on a full disk that no outcome
            # can be committed to, it would wait until the disk had room (and none is made).
            log.warning("cannot record the outcome for %s (%s): %s; the message stays due",
                        message_id, outcome.state, recorded.exception(),
                        extra={"queue_id": message_id})
            return
        self._unrecorded[message_id] = outcome
        log.error("cannot record the outcome for %s (%s): %s; it is kept in memory and retried, "
                  "and the message is not sent again meanwhile", message_id, outcome.state,
                  recorded.exception(), extra={"queue_id": message_id})

    async def _record_unrecorded(self) -> None:
        """Commit the outcomes that failed to commit; release each message that made it."""
        for message_id, outcome in list(self._unrecorded.items()):
            try:
                await self.spool.record_soon(message_id, outcome)
            except Exception:  # still failing: the next round tries again
                return
            del self._unrecorded[message_id]
            self._known.discard(message_id)
            log.info("outcome for %s recorded after all", message_id,
                     extra={"queue_id": message_id})

    async def _deliver(self, job: _Job, attempt: _Attempt) -> asyncio.Future[bool] | None:
        """Send one message; returns the pending commit of its outcome, if there is one."""
        message = job.message or await self.spool.get(job.id)
        if message is None or message.state not in ("queued", "deferred") or not message.pending:
            return None
        # A fresh message's own bytes or body file: no spool read on its way to its first
        # attempt. A body file is opened where it is read (the upstream process, if any).
        data = job.data if job.data is not None else await self.spool.source(job.id)
        if data is None:
            return None
        return await self._send(attempt, message, data)

    async def _send(self, attempt: _Attempt, message: QueuedMessage, data: MessageData
                    ) -> asyncio.Future[bool] | None:
        started = time.monotonic()
        connection = attempt.connection
        try:
            result = await connection.send(message.mail_from, message.pending, data,
                                           message.mail_options)
        except UpstreamAuthError as exc:
            if attempt.health is not self.health:
                return self._on_superseded(message, f"authentication failed: {exc}")
            return self._on_auth_failure(message, str(exc))
        except UpstreamOutcomeUnknown as exc:
            return self._on_unknown_outcome(message, str(exc))
        except UpstreamUnavailable as exc:
            if attempt.health is not self.health:
                return self._on_superseded(message, str(exc))
            return self._on_unavailable(message, str(exc))
        except asyncio.CancelledError:
            # stop() gave up on the send after its grace period. The final dot may be out
            # (this layer cannot tell), so the message must not go again at once after a
            # restart. Committed before the spool closes: the deliveries stop first.
            with contextlib.suppress(Exception):  # a closed spool: the cancellation goes on
                self._on_unknown_outcome(message, "the relay stopped before the reply came")
            raise
        if not result.local:
            attempt.health.record_success(connection.smtputf8, connection.max_size)
            self.metrics.observe_send(time.monotonic() - started, result, message_size(data),
                                      self.name)
            throttling = self._throttling_reply(result, attempt.pacer)
            if throttling is not None:
                return self._on_throttled(message, result, attempt, throttling)
            if attempt.pacer.succeeded() and attempt.pacer is self.pacer:
                self._show_pacing()
        outcome = decide_outcome(message, result, time.time(), self.config)
        return self._record(message, outcome)

    @staticmethod
    def _throttling_reply(result: SendResult, pacer: Pacer) -> str | None:
        """The reply (whole message or one recipient's) that asks us to slow down, if any."""
        replies = (result.reply, *result.temporary.values())
        return next((reply for reply in replies if pacer.classifier.reply(reply)), None)

    def _on_throttled(self, message: QueuedMessage, result: SendResult, attempt: _Attempt,
                      reply: str) -> asyncio.Future[bool]:
        """The upstream asks us to slow down: pace lower, and send this message again soon.

        Like an authentication failure it is not the message's fault: it costs no attempt and
        does not move the message along its backoff schedule (max_age still applies).
        """
        self.metrics.throttled_replies.labels(upstream=self.name).inc()
        pacer = attempt.pacer
        if pacer.throttled(attempt.ticket, reply) and pacer is self.pacer:
            self._show_pacing()
        now = time.time()
        outcome = decide_outcome(message, result, now, self.config)
        if outcome.state == "deferred":
            outcome = replace(outcome, attempts=message.attempts,
                              next_attempt=now + pacer.retry_delay)
        return self._record(message, outcome)

    def _show_pacing(self) -> None:
        pacer, name = self.pacer, self.name
        self.metrics.pacing_rate.labels(upstream=name).set(pacer.rate or 0)
        self.metrics.pacing_connections.labels(upstream=name).set(pacer.concurrency)
        self.metrics.throttling.labels(upstream=name).set(1 if pacer.throttling else 0)

    def _on_auth_failure(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        pause = self.config.queue.auth_retry
        if not self.health.auth_failed:
            log.error("upstream %s: authentication failed: %s; its mail stays queued, retrying "
                      "every %ss", self.name, error, int(pause))
        self.health.record_auth_failure(error, pause)
        self.metrics.upstream_errors.labels(kind="auth", upstream=self.name).inc()
        # Not the message's fault: its attempt count and age limit are left alone, and the
        # mark lets a restart or a reload with new credentials make it due at once.
        outcome = Outcome(message.recipients, "deferred", time.time() + pause, message.attempts,
                          f"upstream authentication failed: {error}", auth_deferred=True)
        return self._record(message, outcome, log_it=False)

    def _on_unknown_outcome(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        """The upstream may have the message: retry, but no sooner than retry_max.

        A quick retry would duplicate every message of an upstream that is merely slow; no
        retry would lose those it really dropped.
        """
        self.metrics.unknown_outcomes.labels(upstream=self.name).inc()
        result = SendResult(reply=f"451 4.4.2 outcome unknown after the final dot: {error}")
        outcome = decide_outcome(message, result, time.time(), self.config,
                                 min_delay=self.config.queue.retry_max)
        return self._record(message, outcome, resend_safe=False)

    def _on_superseded(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        """A send under the upstream settings a reload replaced failed before the message was
        handed over. It says nothing of the new settings: the message is due again at once,
        at no cost of an attempt, and the new health state is left alone (an old key's 535
        must not pause the new key for ``auth_retry``)."""
        log.info("%s: a send begun before the reload failed (%s); sending it again with the "
                 "new upstream settings", message.id, error, extra={"queue_id": message.id})
        outcome = Outcome(message.recipients, "deferred", time.time(), message.attempts,
                          f"451 4.4.1 before the reload of the upstream settings: {error}")
        return self._record(message, outcome, log_it=False)

    def _on_unavailable(self, message: QueuedMessage, error: str) -> asyncio.Future[bool]:
        delay = self.health.record_failure(error)
        if self.health.failures == 1:
            log.warning("upstream %s unavailable: %s; pausing its delivery %.0fs", self.name,
                        error, delay)
        self.metrics.upstream_errors.labels(kind="unavailable", upstream=self.name).inc()
        outcome = decide_outcome(message, SendResult(reply=f"451 4.4.1 {error}"), time.time(),
                                 self.config)
        return self._record(message, outcome)

    def _record(self, message: QueuedMessage, outcome: Outcome, *, log_it: bool = True,
                resend_safe: bool = True) -> asyncio.Future[bool]:
        """Commit ``outcome``. ``resend_safe``: False when the upstream may have the message
        although no recipient says so (an unknown outcome)."""
        recorded = self.spool.record_soon(message.id, outcome)
        keep = not (resend_safe and _nothing_handed_over(outcome))
        # Registered before the worker's _release callback, so it runs first.
        recorded.add_done_callback(functools.partial(self._keep_if_unrecorded, message.id,
                                                     outcome, keep))
        self.metrics.outcomes.labels(state=outcome.state, upstream=self.name).inc()
        if log_it:
            self._log_outcome(message, outcome)
        return recorded

    @staticmethod
    def _log_outcome(message: QueuedMessage, outcome: Outcome) -> None:
        """One line per recipient of this attempt, each with its own reply."""
        attempted = set(message.pending)
        for recipient in outcome.recipients:
            if recipient.address in attempted:
                _log_recipient(message.id, recipient, outcome)

    # -- poller and housekeeping

    async def _poll(self) -> None:
        """Schedule due messages: deferred ones, retried ones, those left by an earlier run."""
        while not self._stopping:
            if self._ready.qsize() < _POLL_BATCH // 2:
                try:
                    due = await self.spool.due(time.time(), _POLL_BATCH, self.name)
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
                        time.time() - self.config.queue.keep_delivered,
                        # Records wait for their final report, but not forever.
                        time.time() - REPORT_WAIT_CAP if self.config.reports.enabled else None)
                    if pruned:
                        log.debug("pruned %d delivered record(s)", pruned)
            if self._unrecorded:
                await self._record_unrecorded()
            if self._mail_waits_for_upstream():
                if now - last_probe >= _WAITING_PROBE_INTERVAL:
                    last_probe = now
                    await self._probe(waiting=True)
            elif now - last_probe >= _PROBE_INTERVAL and self._busy == 0 and self._ready.empty():
                last_probe = now
                await self._probe()
            await asyncio.sleep(1.0)

    def _mail_waits_for_upstream(self) -> bool:
        """Workers are paused after connect failures while messages are ready to go."""
        health = self.health
        return health.paused and health.failures > 0 and not health.auth_failed \
            and not self._ready.empty()

    async def _probe(self, *, waiting: bool = False) -> None:
        """Check the upstream when idle (readiness, bad credentials show before mail does), or
        during a pause while mail waits (``waiting``): success lets the workers go at once."""
        if not waiting and self.health.paused:
            return
        if not waiting and self.health.last_success and \
                time.time() - self.health.last_success < _PROBE_INTERVAL:
            return
        # A reload during the probe replaces both: the answer is about the settings it used.
        connection, health = self.upstream_factory(), self.health
        try:
            await connection.probe()
        except UpstreamAuthError as exc:
            if not health.auth_failed and health is self.health:
                log.error("upstream %s: authentication failed: %s", self.name, exc)
            health.record_auth_failure(str(exc), self.config.queue.auth_retry)
        except UpstreamUnavailable as exc:
            if health.failures == 0 and health is self.health:
                log.warning("upstream %s unavailable: %s", self.name, exc)
            health.record_failure(str(exc))
        else:
            if health.paused and health is self.health:
                log.info("upstream %s is reachable again; resuming delivery", self.name)
            health.record_success(connection.smtputf8, connection.max_size)
            self._resume.set()
        finally:
            await connection.close()


def _named_upstream(config: Config, name: str) -> UpstreamConfig:
    upstream = config.upstream_named(name)
    if upstream is None:  # relay.routing stops a delivery before its upstream goes
        raise LookupError(f"no upstream {name!r} in the configuration")
    return upstream


def _pacing_settings(config: Config, name: str) -> tuple[object, ...]:
    upstream = _named_upstream(config, name)
    return upstream.rate, upstream.connections, upstream.throttle_patterns, config.workers


def _pacer_for(config: Config, name: str) -> Pacer:
    """The pace of one upstream; with several worker processes each takes its share."""
    upstream = _named_upstream(config, name)
    rate = None if upstream.rate is None else upstream.rate / config.workers
    return Pacer(rate, upstream.connections, upstream.throttle_patterns, name=name)


def _log_recipient(queue_id: str, recipient: Recipient, outcome: Outcome) -> None:
    level = _LOG_LEVELS[recipient.state]
    if not log.isEnabledFor(level):
        return
    extra = {"queue_id": queue_id, "recipient": recipient.address, "state": outcome.state,
             "recipient_state": recipient.state, "attempts": outcome.attempts,
             "upstream_id": outcome.upstream_id, "reply": recipient.reply}
    if recipient.state == "delivered":
        info_line(log, "%s delivered to <%s>: %s", queue_id, recipient.address, recipient.reply,
                  fields=extra)
    elif recipient.state == "pending":
        log.warning("%s deferred for <%s> (attempt %d, next in %.0fs): %s", queue_id,
                    recipient.address, outcome.attempts, outcome.next_attempt - time.time(),
                    recipient.reply, extra=extra)
    else:
        log.error("%s failed for <%s>: %s", queue_id, recipient.address, recipient.reply,
                  extra=extra)
