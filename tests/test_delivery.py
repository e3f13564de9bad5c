"""The scheduler: through a real relay (recovery after a bad key or an outage, per-recipient
logs), driving a scripted fake Upstream over a real spool, and its pure parts in tables."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from relayrunner import (
    ThreadRelay,
    relay_config,
    send,
    spool_messages,
    wait_until,
    write_config,
)

import relay.delivery as delivery_module
from relay.config import Config, load_config
from relay.delivery import Delivery, UpstreamHealth, backoff_delay, decide_outcome
from relay.envelope import Envelope, MessageContext
from relay.errors import SpoolError
from relay.infobip.priority import PRIORITIES
from relay.metrics import Metrics
from relay.spool import Outcome, QueuedMessage, Recipient, Spool, SpoolDB
from relay.upstream import (
    SendResult,
    Upstream,
    UpstreamAuthError,
    UpstreamError,
    UpstreamOutcomeUnknown,
    UpstreamUnavailable,
)

StartRelay = Callable[..., ThreadRelay]
MESSAGE = b"From: app@example.com\r\nSubject: test\r\n\r\nbody\r\n"


def deferred_by_auth(relay: ThreadRelay) -> QueuedMessage:
    def find() -> QueuedMessage | None:
        return next((m for m in spool_messages(relay, ("deferred",))
                     if "authentication failed" in (m.last_reply or "")), None)

    found: QueuedMessage = wait_until(find, what="a message deferred by the 535")
    return found


def fix_api_key(config_path: Path) -> None:
    text = config_path.read_text(encoding="utf-8").replace("wrong-key-123", "test-api-key")
    config_path.write_text(text, encoding="utf-8")


# -- item 9: recovery after a bad API key ------------------------------------------------------

def test_reload_with_the_fixed_key_sends_auth_deferred_mail_at_once(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"password": "wrong-key-123", "connections": 1},
                        queue={"auth_retry": "5m"})
    send(relay)
    deferred_by_auth(relay)
    fix_api_key(relay.config_path)
    assert relay.reload() is True
    fake_upstream.wait_for(1, timeout=3)


def test_restart_with_the_fixed_key_sends_auth_deferred_mail_at_once(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"password": "wrong-key-123"},
                        queue={"auth_retry": "5m"})
    send(relay)
    deferred_by_auth(relay)
    relay.stop()
    fix_api_key(relay.config_path)
    restarted = ThreadRelay(relay.config_path).start()
    try:
        fake_upstream.wait_for(1, timeout=3)
    finally:
        restarted.stop()


def test_auth_deferrals_of_an_older_spool_are_recognised_and_released_at_start(
        fake_upstream: FakeUpstream, start_relay: StartRelay, tmp_path: Path) -> None:
    db = SpoolDB(tmp_path / "spool")
    ctx = MessageContext("OLDAUTH", "app@example.com", ("user@example.net",), "127.0.0.1", None,
                         "local", len(MESSAGE))
    now = time.time()
    db.transaction(lambda: db.insert(Envelope(ctx, MESSAGE), PRIORITIES["STANDARD"], now))
    # As an earlier version left it: no auth_deferred column, only the reply says why.
    db.conn.execute("ALTER TABLE messages DROP COLUMN auth_deferred")
    db.conn.execute("UPDATE messages SET state='deferred', next_attempt=?, last_reply="
                    "'upstream authentication failed: 535 5.7.8 bad key'", (now + 3600,))
    db.close()
    start_relay(fake_upstream)
    fake_upstream.wait_for(1, timeout=3)


def test_upstream_back_after_a_failed_connect_burst_is_used_within_seconds(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"connections": 8})
    fake_upstream.stop()
    for _ in range(8):
        send(relay)
    wait_until(lambda: len(spool_messages(relay, ("deferred",))) == 8, what="8 deferred")
    delivery = relay.server.delivery
    assert delivery is not None
    # The burst of refused connects paused the workers for a long time.
    assert delivery.health.down_until - time.monotonic() > 20
    fake_upstream.start()
    fake_upstream.wait_for(8, timeout=6)


# -- low: one log line per recipient, with its own reply ---------------------------------------

def test_each_recipient_outcome_is_logged_with_its_own_reply(
        fake_upstream: FakeUpstream, start_relay: StartRelay,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    relay = start_relay(fake_upstream)
    fake_upstream.reject_recipient("later@example.net", 450, "4.2.0 mailbox busy")
    queue_id = send(relay, ("ok@example.net", "later@example.net"))
    fake_upstream.wait_for(1)

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.name == "relay.delivery" and queue_id in r.getMessage()]

    wait_until(lambda: len(lines()) >= 2, what="the first attempt's log lines")
    by_recipient = {getattr(r, "recipient", None): r for r in reversed(lines())}
    ok, later = by_recipient["ok@example.net"], by_recipient["later@example.net"]
    assert ok.levelno == logging.INFO
    assert "ok@example.net" in ok.getMessage() and "250 2.6.0" in ok.getMessage()
    assert later.levelno == logging.WARNING
    assert "later@example.net" in later.getMessage()
    assert "450 4.2.0 mailbox busy" in later.getMessage()
    assert "250" not in later.getMessage().split(":", 1)[1]
    # Retries of the deferred recipient never log the delivered one again.
    time.sleep(1.5)
    assert sum(1 for r in lines() if getattr(r, "recipient", None) == "ok@example.net") == 1
    [record] = [m for m in spool_messages(relay) if m.id == queue_id]
    assert "450 4.2.0 mailbox busy" in (record.last_reply or "")


# -- Delivery against a scripted fake Upstream, with a real spool --------------------------------
#
# No sockets: each send() takes the next step of a script (a SendResult, a function of the
# recipients returning one, or an UpstreamError to raise), so every outcome path of Delivery runs
# in milliseconds and in a known order.

Step = SendResult | UpstreamError | Callable[[tuple[str, ...]], SendResult]


def accept(recipients: tuple[str, ...]) -> SendResult:
    return SendResult(accepted=recipients, reply="250 2.6.0 Message queued as IB-1",
                      upstream_id="IB-1")


@dataclass
class Sent:
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]


@dataclass
class Script:
    """What the fake upstreams answer, shared by every connection the factory makes."""

    sends: list[Step] = field(default_factory=list)
    probes: list[UpstreamError | None] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    made: list[ScriptedUpstream] = field(default_factory=list)

    def factory(self) -> Upstream:
        upstream = ScriptedUpstream(self)
        self.made.append(upstream)
        return upstream


class ScriptedUpstream:
    """An in-memory `Upstream`: no SMTP, only the script's answers; unscripted sends succeed."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.open = False
        self.closed = False

    @property
    def connected(self) -> bool:
        return self.open

    @property
    def smtputf8(self) -> bool | None:
        return True if self.open else None

    @property
    def max_size(self) -> int | None:
        return None

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: bytes,
                   mail_options: tuple[str, ...] = ()) -> SendResult:
        self.script.sent.append(Sent(mail_from, recipients, data, mail_options))
        step: Step = self.script.sends.pop(0) if self.script.sends else accept
        if isinstance(step, UpstreamError):
            self.open = False
            raise step
        self.open = True
        return step if isinstance(step, SendResult) else step(recipients)

    async def probe(self) -> None:
        failure = self.script.probes.pop(0) if self.script.probes else None
        if failure is not None:
            raise failure
        self.open = True

    async def close(self) -> None:
        self.open = False
        self.closed = True


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path, relay_config(
        tmp_path, None, upstream={"connections": 1},
        queue={"retry_initial": "0.2s", "retry_max": "0.5s", "auth_retry": "1h"})))


@contextlib.asynccontextmanager
async def delivering(config: Config, script: Script) -> AsyncIterator[tuple[Delivery, Spool]]:
    spool = Spool(config.queue.path)
    spool.start()
    delivery = Delivery(config, spool, Metrics(), script.factory)
    await delivery.start()
    try:
        yield delivery, spool
    finally:
        await delivery.stop(2)
        await spool.close()


async def spool_one(delivery: Delivery, queue_id: str,
                    rcpts: tuple[str, ...] = ("a@example.net",)) -> None:
    """Spool a message and hand it to delivery at once, as the listener does."""
    ctx = MessageContext(queue_id, "app@example.com", rcpts, "127.0.0.1", None, "local",
                         len(MESSAGE))
    delivery.reserve(queue_id)
    await delivery.spool.put(Envelope(ctx, MESSAGE, ("BODY=8BITMIME",)), PRIORITIES["STANDARD"])
    message = await delivery.spool.get(queue_id)
    assert message is not None
    delivery.submit(message, MESSAGE)


async def settled(spool: Spool, queue_id: str, states: tuple[str, ...] = ("delivered", "failed"),
                  *, attempts: int = 1) -> QueuedMessage:
    """The message once it is in one of ``states`` after at least ``attempts`` attempts."""
    message = None
    try:
        async with asyncio.timeout(5):
            while True:
                message = await spool.get(queue_id)
                if message is not None and message.state in states and \
                        message.attempts >= attempts:
                    return message
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{queue_id} not in {states} within 5s: {message}") from None


def test_scripted_delivery_records_the_upstream_reply_and_id(config: Config) -> None:
    script = Script()

    async def scenario() -> QueuedMessage:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "OK", ("a@example.net", "b@example.net"))
            done = await settled(spool, "OK")
            assert await spool.data("OK") is None  # a delivered message keeps no bytes
            return done

    done = asyncio.run(scenario())
    assert (done.state, done.attempts, done.upstream_id) == ("delivered", 1, "IB-1")
    assert done.last_reply == "250 2.6.0 Message queued as IB-1"
    assert [r.state for r in done.recipients] == ["delivered", "delivered"]
    [sent] = script.sent
    assert sent == Sent("app@example.com", ("a@example.net", "b@example.net"), MESSAGE,
                        ("BODY=8BITMIME",))


def test_scripted_partial_failure_retries_only_the_deferred_recipient(config: Config) -> None:
    script = Script(sends=[SendResult(accepted=("a@example.net",), reply="250 2.6.0 ok",
                                      temporary={"b@example.net": "450 4.2.0 busy"},
                                      permanent={"c@example.net": "550 5.1.1 unknown"})])

    async def scenario() -> QueuedMessage:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "PART", ("a@example.net", "b@example.net", "c@example.net"))
            first = await settled(spool, "PART", ("deferred",))
            assert first.last_reply == "450 4.2.0 busy"  # never the other recipient's 250
            return await settled(spool, "PART", ("failed", "delivered"), attempts=2)

    final = asyncio.run(scenario())
    assert [s.recipients for s in script.sent] == [
        ("a@example.net", "b@example.net", "c@example.net"), ("b@example.net",)]
    states = {r.address: (r.state, r.reply) for r in final.recipients}
    assert states == {"a@example.net": ("delivered", "250 2.6.0 ok"),
                      "b@example.net": ("delivered", "250 2.6.0 Message queued as IB-1"),
                      "c@example.net": ("failed", "550 5.1.1 unknown")}
    assert final.state == "failed"  # one recipient will never get it


def test_scripted_unavailable_upstream_defers_then_delivers(config: Config) -> None:
    script = Script(sends=[UpstreamUnavailable("127.0.0.1:25: cannot connect: refused")])

    async def scenario() -> tuple[QueuedMessage, QueuedMessage]:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "LATER")
            first = await settled(spool, "LATER", ("deferred",))
            return first, await settled(spool, "LATER", attempts=2)

    first, final = asyncio.run(scenario())
    assert first.last_reply == "451 4.4.1 127.0.0.1:25: cannot connect: refused"
    assert first.recipients[0].state == "pending"
    assert (final.state, final.attempts) == ("delivered", 2)
    assert len(script.sent) == 2


def test_scripted_auth_failure_defers_without_costing_an_attempt(config: Config) -> None:
    script = Script(sends=[UpstreamAuthError("535 5.7.8 bad key")])

    async def scenario() -> tuple[QueuedMessage, Delivery]:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "AUTH")
            deferred = await settled(spool, "AUTH", ("deferred",), attempts=0)
            return deferred, delivery

    deferred, delivery = asyncio.run(scenario())
    assert deferred.attempts == 0  # not the message's fault
    assert deferred.last_reply == "upstream authentication failed: 535 5.7.8 bad key"
    assert deferred.next_attempt - deferred.updated == pytest.approx(3600, abs=5)
    assert delivery.health.auth_failed
    assert delivery.health.readiness() == \
        (False, "upstream refuses our credentials: 535 5.7.8 bad key")
    assert len(script.sent) == 1  # the paused worker did not try again


def test_scripted_unknown_outcome_waits_at_least_retry_max(config: Config) -> None:
    config = replace(config, queue=replace(config.queue, retry_max=600.0))
    script = Script(sends=[UpstreamOutcomeUnknown("no reply to the final dot: timeout")])

    async def scenario() -> tuple[QueuedMessage, float]:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "MAYBE")
            deferred = await settled(spool, "MAYBE", ("deferred",))
            value = delivery.metrics.registry.get_sample_value(
                "relay_upstream_unknown_outcomes_total", {"upstream": "default"})
            return deferred, value or 0.0

    deferred, unknown = asyncio.run(scenario())
    assert deferred.last_reply == \
        "451 4.4.2 outcome unknown after the final dot: no reply to the final dot: timeout"
    assert deferred.next_attempt - deferred.updated >= 600 - 1
    assert unknown == 1
    assert len(script.sent) == 1


def _deferrals_cannot_commit(spool: Spool) -> list[str]:
    """Make the spool refuse to commit every deferral, as a full disk does; returns the ids."""
    refused: list[str] = []
    record_soon = spool.record_soon

    def failing(message_id: str, outcome: Outcome) -> asyncio.Future[bool]:
        if outcome.state != "deferred":
            return record_soon(message_id, outcome)
        refused.append(message_id)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.set_exception(SpoolError("spool commit failed: database or disk is full"))
        return future

    spool.record_soon = failing  # type: ignore[method-assign]
    return refused


@pytest.mark.parametrize(("failure", "sent_again"), [
    # Nothing reached the upstream: the message is due again at once (the poller finds it).
    (UpstreamUnavailable("127.0.0.1:25: cannot connect: refused"), True),
    (lambda rcpts: SendResult(temporary=dict.fromkeys(rcpts, "451 4.3.0 try later"),
                              reply="451 4.3.0 try later"), True),
    # The upstream may have it: held back (kept in memory) rather than sent again now.
    (UpstreamOutcomeUnknown("no reply to the final dot: timeout"), False),
    # One recipient has it: the next attempt must not send it to that one again.
    (lambda rcpts: SendResult(accepted=rcpts[:1], temporary={rcpts[1]: "451 4.2.0 later"},
                              reply="250 ok", upstream_id="IB-1"), False),
], ids=["unavailable", "451", "unknown-outcome", "partly-accepted"])
def test_a_deferral_that_cannot_be_recorded_holds_back_only_what_the_upstream_may_have(
        config: Config, failure: Step, sent_again: bool) -> None:
    script = Script(sends=[failure])

    async def scenario() -> tuple[list[str], QueuedMessage | None]:
        async with delivering(config, script) as (delivery, spool):
            refused = _deferrals_cannot_commit(spool)
            await spool_one(delivery, "FULL", ("a@example.net", "b@example.net"))
            if sent_again:
                return refused, await settled(spool, "FULL", ("delivered",))
            await asyncio.sleep(2.0)  # the poller runs every second
            return refused, await spool.get("FULL")

    refused, final = asyncio.run(scenario())
    assert refused[0] == "FULL"
    assert len(script.sent) == (2 if sent_again else 1)
    assert final is not None
    assert final.state == ("delivered" if sent_again else "queued")


def test_scripted_permanent_refusal_fails_at_once(config: Config) -> None:
    script = Script(sends=[lambda rcpts: SendResult(
        permanent=dict.fromkeys(rcpts, "554 5.7.1 rejected"), reply="554 5.7.1 rejected")])

    async def scenario() -> QueuedMessage:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "NO")
            return await settled(spool, "NO")

    failed = asyncio.run(scenario())
    assert (failed.state, failed.last_reply) == ("failed", "554 5.7.1 rejected")
    assert len(script.sent) == 1


def test_reconfigure_closes_the_replaced_connections_and_keeps_their_tasks(
        config: Config) -> None:
    old, new = Script(), Script()

    async def scenario() -> tuple[int, int]:
        async with delivering(config, old) as (delivery, spool):
            await spool_one(delivery, "BEFORE")
            await settled(spool, "BEFORE")
            delivery.reconfigure(config, new.factory)
            closing = len(delivery._closing)  # referenced until done, not fire-and-forget
            await spool_one(delivery, "AFTER")
            await settled(spool, "AFTER")
            await asyncio.sleep(0)
            return closing, len(delivery._closing)

    closing_at_once, closing_later = asyncio.run(scenario())
    assert closing_at_once == 1 and closing_later == 0
    assert all(upstream.closed for upstream in old.made)
    assert [s.recipients for s in new.sent] == [("a@example.net",)]
    assert all(upstream.closed for upstream in new.made)  # stop() closed the new ones


def test_scripted_throttling_reply_costs_no_attempt_and_comes_back_soon(config: Config) -> None:
    config = replace(config, queue=replace(config.queue, retry_initial=600.0, retry_max=600.0))
    throttled = SendResult(temporary={"a@example.net": "451 4.7.0 rate limit exceeded"},
                           reply="451 4.7.0 rate limit exceeded")
    script = Script(sends=[throttled])

    async def scenario() -> tuple[QueuedMessage, QueuedMessage, Delivery]:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "SLOW")
            deferred = await settled(spool, "SLOW", ("deferred",), attempts=0)
            # Not after retry_initial (600 s): after the pacer's delay (one token's time).
            return deferred, await settled(spool, "SLOW"), delivery

    deferred, final, delivery = asyncio.run(scenario())
    assert deferred.attempts == 0
    assert deferred.last_reply == "451 4.7.0 rate limit exceeded"
    # Unlimited, one send seen (1/s) halved: 0.5/s, so one token's time is 2 s.
    assert deferred.next_attempt - deferred.updated == pytest.approx(2.0, abs=0.2)
    assert (final.state, final.attempts) == ("delivered", 1)
    registry = delivery.metrics.registry
    assert registry.get_sample_value("relay_upstream_throttled_replies_total",
                                     {"upstream": "default"}) == 1
    # One connection, unlimited: halving leaves one connection and half the observed rate.
    assert registry.get_sample_value("relay_upstream_pacing_connections",
                                     {"upstream": "default"}) == 1
    assert registry.get_sample_value("relay_upstream_throttling", {"upstream": "default"}) == 1


def test_scripted_other_temporary_reply_still_costs_an_attempt(config: Config) -> None:
    config = replace(config, queue=replace(config.queue, retry_initial=600.0, retry_max=600.0))
    script = Script(sends=[SendResult(temporary={"a@example.net": "451 4.3.0 local error"},
                                      reply="451 4.3.0 local error")])

    async def scenario() -> QueuedMessage:
        async with delivering(config, script) as (delivery, spool):
            await spool_one(delivery, "ERR")
            return await settled(spool, "ERR", ("deferred",))

    deferred = asyncio.run(scenario())
    assert deferred.attempts == 1
    assert deferred.next_attempt - deferred.updated >= 600 * 0.8


@pytest.mark.parametrize(("workers", "rate"), [(1, 60.0), (4, 15.0)])
def test_each_worker_process_paces_at_its_share_of_the_rate(config: Config, workers: int,
                                                           rate: float) -> None:
    config = replace(config, workers=workers,
                     upstream=replace(config.upstream, rate=60.0, connections=3))
    delivery = Delivery(config, Spool(config.queue.path), Metrics(), Script().factory)
    assert (delivery.pacer.rate, delivery.pacer.concurrency) == (rate, 3)
    unlimited = Delivery(replace(config, upstream=replace(config.upstream, rate=None)),
                         Spool(config.queue.path), Metrics(), Script().factory)
    assert unlimited.pacer.rate is None


def test_reconfigure_keeps_the_pace_unless_its_settings_change(config: Config) -> None:
    paced = replace(config, upstream=replace(config.upstream, rate=10.0))
    delivery = Delivery(paced, Spool(config.queue.path), Metrics(), Script().factory)
    delivery.pacer.throttled(0, "451 4.7.0 rate limit exceeded")
    slowed = delivery.pacer
    delivery.reconfigure(replace(paced, rules=()), Script().factory)
    assert delivery.pacer is slowed and slowed.rate == 5.0  # other settings: still slowed
    delivery.reconfigure(replace(paced, upstream=replace(paced.upstream, rate=20.0)),
                         Script().factory)
    assert delivery.pacer.rate == 20.0 and not delivery.pacer.throttling


# -- decide_outcome: one attempt's results merged into the message's new state -----------------

NOW = 1_000_000.0
OK = "250 2.6.0 Message queued as IB-9"


def queued(*recipients: Recipient, age: float = 60.0, attempts: int = 0) -> QueuedMessage:
    return QueuedMessage(
        id="Q", state="queued", priority=PRIORITIES["STANDARD"], created=NOW - age,
        updated=NOW - age, next_attempt=NOW - age, attempts=attempts, mail_from="app@x.test",
        recipients=recipients, mail_options=(), size=10, client=None, auth_user=None,
        listener="local", last_reply=None, upstream_id=None)


A, B = Recipient("a@y.test"), Recipient("b@y.test")


@pytest.mark.parametrize(("message", "result", "state", "recipients", "last_reply"), [
    pytest.param(queued(A, B), SendResult(accepted=("a@y.test", "b@y.test"), reply=OK),
                 "delivered", [("delivered", OK), ("delivered", OK)], OK, id="all-accepted"),
    pytest.param(queued(A, B), SendResult(temporary={"a@y.test": "450 4.2.0 busy",
                                                     "b@y.test": "451 4.3.0 later"}),
                 "deferred", [("pending", "450 4.2.0 busy"), ("pending", "451 4.3.0 later")],
                 "450 4.2.0 busy", id="all-temporary"),
    pytest.param(queued(A, B), SendResult(permanent={"a@y.test": "550 5.1.1 no",
                                                     "b@y.test": "550 5.1.1 no"}),
                 "failed", [("failed", "550 5.1.1 no"), ("failed", "550 5.1.1 no")],
                 "550 5.1.1 no", id="all-permanent"),
    pytest.param(queued(A, B), SendResult(accepted=("a@y.test",), reply=OK,
                                          temporary={"b@y.test": "450 4.2.0 busy"}),
                 "deferred", [("delivered", OK), ("pending", "450 4.2.0 busy")],
                 "450 4.2.0 busy", id="accepted+temporary: the 4xx explains, not the 250"),
    pytest.param(queued(A, B), SendResult(accepted=("a@y.test",), reply=OK,
                                          permanent={"b@y.test": "550 5.1.1 no"}),
                 "failed", [("delivered", OK), ("failed", "550 5.1.1 no")],
                 "550 5.1.1 no", id="accepted+permanent"),
    pytest.param(queued(A, B), SendResult(temporary={"a@y.test": "450 4.2.0 busy"},
                                          permanent={"b@y.test": "550 5.1.1 no"}),
                 "deferred", [("pending", "450 4.2.0 busy"), ("failed", "550 5.1.1 no")],
                 "450 4.2.0 busy", id="temporary+permanent: deferred until the 4xx settles"),
    pytest.param(queued(A), SendResult(reply="451 4.4.1 connection lost"),
                 "deferred", [("pending", "451 4.4.1 connection lost")],
                 "451 4.4.1 connection lost", id="whole-message reply for the unmentioned"),
    pytest.param(queued(A), SendResult(), "deferred", [("pending", "not attempted")],
                 "not attempted", id="not attempted"),
    pytest.param(queued(A, age=3600), SendResult(temporary={"a@y.test": "450 4.2.0 busy"}),
                 "failed", [("failed", "expired after max_age: 450 4.2.0 busy")],
                 "expired after max_age: 450 4.2.0 busy", id="expired by max_age"),
    pytest.param(queued(A, age=3600), SendResult(accepted=("a@y.test",), reply=OK),
                 "delivered", [("delivered", OK)], OK, id="expired but accepted: delivered"),
    pytest.param(queued(A, age=3599), SendResult(temporary={"a@y.test": "450 4.2.0 busy"}),
                 "deferred", [("pending", "450 4.2.0 busy")], "450 4.2.0 busy",
                 id="just under max_age"),
    pytest.param(queued(Recipient("a@y.test", "delivered", "250 earlier"), B, attempts=2),
                 SendResult(accepted=("b@y.test",), reply=OK),
                 "delivered", [("delivered", "250 earlier"), ("delivered", OK)], OK,
                 id="already delivered recipient keeps its reply"),
    pytest.param(queued(Recipient("a@y.test", "failed", "550 earlier"), B, attempts=2),
                 SendResult(temporary={"b@y.test": "450 4.2.0 busy"}),
                 "deferred", [("failed", "550 earlier"), ("pending", "450 4.2.0 busy")],
                 "450 4.2.0 busy", id="an older 5xx never explains this attempt"),
    pytest.param(queued(Recipient("a@y.test", "delivered", "250 earlier"), B, age=3600),
                 SendResult(temporary={"b@y.test": "450 4.2.0 busy"}),
                 "failed", [("delivered", "250 earlier"),
                            ("failed", "expired after max_age: 450 4.2.0 busy")],
                 "expired after max_age: 450 4.2.0 busy", id="expired with one delivered"),
])
def test_decide_outcome(config: Config, message: QueuedMessage, result: SendResult, state: str,
                        recipients: list[tuple[str, str]], last_reply: str) -> None:
    config = replace(config, queue=replace(config.queue, max_age=3600.0, retry_initial=30.0,
                                           retry_max=600.0))
    outcome = decide_outcome(message, result, NOW, config)
    assert outcome.state == state
    assert [(r.state, r.reply) for r in outcome.recipients] == recipients
    assert [r.address for r in outcome.recipients] == [r.address for r in message.recipients]
    assert outcome.last_reply == last_reply
    assert outcome.attempts == message.attempts + 1
    assert outcome.upstream_id == result.upstream_id
    if state == "deferred":
        delay = outcome.next_attempt - NOW
        bound = backoff_bounds(outcome.attempts, 30.0, 600.0)
        assert bound[0] <= delay <= bound[1]
    else:
        assert outcome.next_attempt == NOW


def test_decide_outcome_min_delay_for_an_unknown_outcome(config: Config) -> None:
    config = replace(config, queue=replace(config.queue, retry_initial=30.0, retry_max=600.0))
    outcome = decide_outcome(queued(A), SendResult(reply="451 4.4.2 outcome unknown"), NOW,
                             config, min_delay=600.0)
    assert outcome.state == "deferred" and outcome.next_attempt - NOW >= 600.0


def test_decide_outcome_keeps_the_upstream_id(config: Config) -> None:
    result = SendResult(accepted=("a@y.test",), reply=OK, upstream_id="IB-9")
    assert decide_outcome(queued(A), result, NOW, config).upstream_id == "IB-9"


# -- backoff_delay: initial * 2^(attempts-1), jitter +-20 %, never below initial nor above max --

def backoff_bounds(attempts: int, initial: float, maximum: float) -> tuple[float, float]:
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return min(maximum, max(initial, base * 0.8)), min(maximum, base * 1.2)


@pytest.mark.parametrize(("attempts", "jitter", "expected"), [
    (1, 1.0, 30.0),  # first attempt: the initial delay
    (1, 0.8, 30.0),  # never below the initial delay
    (1, 1.2, 36.0),
    (0, 1.0, 30.0),  # no attempt yet counts as the first
    (2, 1.0, 60.0),
    (3, 0.8, 96.0),
    (3, 1.2, 144.0),
    (5, 1.0, 480.0),
    (6, 1.0, 600.0),  # 960 capped
    (6, 1.2, 600.0),  # jitter never lifts it over the cap
    (6, 0.8, 480.0),  # the cap is jittered downwards, so retries spread out
    (60, 1.0, 600.0),  # no overflow for absurd counts
])
def test_backoff_delay_table(monkeypatch: pytest.MonkeyPatch, attempts: int, jitter: float,
                             expected: float) -> None:
    monkeypatch.setattr(delivery_module.random, "uniform", lambda low, high: jitter)
    assert backoff_delay(attempts, 30.0, 600.0) == pytest.approx(expected)


@pytest.mark.parametrize("attempts", [0, 1, 2, 3, 4, 5, 6, 7, 20])
def test_backoff_delay_stays_within_its_bounds(attempts: int) -> None:
    low, high = backoff_bounds(attempts, 30.0, 600.0)
    delays = [backoff_delay(attempts, 30.0, 600.0) for _ in range(200)]
    assert all(low <= delay <= high for delay in delays)
    assert min(delays) >= 30.0 and max(delays) <= 600.0
    if attempts >= 2:
        assert len(set(delays)) > 1  # jittered, so that retries do not come in lockstep


def test_upstream_health_readiness() -> None:
    health = UpstreamHealth()
    assert health.readiness() == (False, "upstream not reachable recently: no contact yet")
    health.record_success()
    assert health.readiness() == (True, "ready")
    health.record_failure("127.0.0.1:25: cannot connect")
    assert health.readiness() == \
        (False, "upstream not reachable recently: 127.0.0.1:25: cannot connect")
    health.record_auth_failure("535 5.7.8 bad key", 60)
    assert health.readiness() == (False, "upstream refuses our credentials: 535 5.7.8 bad key")
    health.record_success()
    health.last_success = time.time() - 301  # longer ago than the readiness window
    assert health.readiness() == (False, "upstream not reachable recently: no contact yet")
