"""The sending side against the fake Infobip: pooled sessions, exact addresses, slow final replies.

Real sockets and TLS throughout; the fake answers a nested MAIL with 503 as Exim and Postfix do.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fakeupstream import FakeUpstream
from relayrunner import ThreadRelay, send, spool_messages, wait_until

from relay.config import load_config, redacted
from relay.envelope import Envelope, MessageContext
from relay.infobip.priority import PRIORITIES
from relay.spool import QueuedMessage, SpoolDB
from relay.upstream import InvalidAddress, encode_address

StartRelay = Callable[..., ThreadRelay]
MESSAGE = b"From: app@example.com\r\nSubject: test\r\n\r\nbody\r\n"


def spool_before_start(spool_dir: Path, messages: list[tuple[str, str, tuple[str, ...]]]) -> None:
    """Put (queue_id, sender, recipients) into the spool, in this order, as if accepted earlier.

    The listener refuses such addresses now; older spools (and any listener bug) can hold them,
    and the sending side must cope on its own.
    """
    db = SpoolDB(spool_dir)
    try:
        for offset, (queue_id, sender, recipients) in enumerate(messages):
            ctx = MessageContext(queue_id, sender, recipients, "127.0.0.1", None, "local",
                                 len(MESSAGE))
            created = time.time() - 60 + offset  # oldest first in the poller's order
            db.transaction(lambda ctx=ctx, created=created: db.insert(
                Envelope(ctx, MESSAGE), PRIORITIES["STANDARD"], created))
    finally:
        db.close()


def record_of(relay: ThreadRelay, queue_id: str) -> QueuedMessage | None:
    return next((m for m in spool_messages(relay) if m.id == queue_id), None)


def final(relay: ThreadRelay, queue_id: str, timeout: float = 10.0) -> QueuedMessage:
    def done() -> QueuedMessage | None:
        record = record_of(relay, queue_id)
        return record if record is not None and record.state in ("delivered", "failed") \
            else None

    found: QueuedMessage = wait_until(done, timeout, what=f"{queue_id} delivered or failed")
    return found


# -- item 4: a pooled connection is never left inside a transaction ---------------------------

@pytest.mark.parametrize("bad", ["bad address@example.net", "nul\x00@example.net",
                                 "jörg@example.net"])
def test_a_refused_address_does_not_poison_the_pooled_connection(
        fake_upstream: FakeUpstream, start_relay: StartRelay, tmp_path: Path, bad: str) -> None:
    spool_before_start(tmp_path / "spool", [
        ("FIRST", "app@example.com", ("ok@example.net", bad)),
        ("SECOND", "app@example.com", ("next@example.net",)),
    ])
    relay = start_relay(fake_upstream, upstream={"connections": 1})

    second = final(relay, "SECOND")
    assert second.state == "delivered", second.last_reply
    first = final(relay, "FIRST")
    states = {r.address: (r.state, r.reply or "") for r in first.recipients}
    assert states["ok@example.net"][0] == "delivered"
    assert states[bad][0] == "failed" and states[bad][1].startswith("553 5.1.3 invalid address")
    received = fake_upstream.wait_for(2)
    assert [r.rcpt_tos for r in received] == [["ok@example.net"], ["next@example.net"]]
    # Both went over the one pooled session: it was never left mid-transaction.
    assert received[0].session_id == received[1].session_id


def test_503_at_mail_retries_on_a_new_connection_instead_of_failing(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"connections": 1})
    fake_upstream.fail_next("mail", 503, "5.5.1 Error: nested MAIL command")
    queue_id = send(relay)
    record = final(relay, queue_id)
    assert record.state == "delivered", record.last_reply
    assert record.attempts == 1  # the retry on a fresh session is part of the same attempt
    [received] = fake_upstream.wait_for(1)
    assert received.rcpt_tos == ["user@example.net"]


def test_503_twice_is_a_temporary_failure(fake_upstream: FakeUpstream,
                                          start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"connections": 1})
    fake_upstream.fail_next("mail", 503, "5.5.1 Error: nested MAIL command", times=2)
    queue_id = send(relay)
    deferred = wait_until(lambda: (r := record_of(relay, queue_id)) and r.attempts >= 1 and r,
                          what="first attempt recorded")
    assert deferred.state in ("deferred", "delivered")  # never "failed"
    assert final(relay, queue_id).state == "delivered"


def test_addresses_go_upstream_exactly_as_checked_or_not_at_all(
        fake_upstream: FakeUpstream, start_relay: StartRelay, tmp_path: Path) -> None:
    spool_before_start(tmp_path / "spool", [
        ("RCPT", "app@x.test", ('"a\r<other@evil.test>"@y.test', "ok@example.net")),
        ("SENDER", '"a\r<ceo@bank.test>"@x.test', ("user@example.net",)),
        ("QUOTED", "app@x.test", ('"john doe"@example.net',)),
    ])
    relay = start_relay(fake_upstream, upstream={"connections": 1})
    for queue_id in ("RCPT", "SENDER", "QUOTED"):
        final(relay, queue_id)
    sender = record_of(relay, "SENDER")
    assert sender is not None and sender.state == "failed"
    assert (sender.last_reply or "").startswith("553 5.1.7 invalid sender address")
    received = fake_upstream.wait_for(2)
    time.sleep(0.3)
    assert len(fake_upstream.messages) == 2
    addresses = [a for r in fake_upstream.messages for a in [r.mail_from, *r.rcpt_tos]]
    assert not any("evil" in a or "bank" in a for a in addresses)
    assert received[0].rcpt_tos == ["ok@example.net"]
    assert received[1].rcpt_tos == ['"john doe"@example.net']


@pytest.mark.parametrize(("address", "utf8", "wire"), [
    ("a@example.net", False, b"a@example.net"),
    ("", False, b""),
    ('"john doe"@example.net', False, b'"john doe"@example.net'),
    ("jörg@example.net", True, "jörg@example.net".encode()),
])
def test_encode_address_keeps_the_bytes(address: str, utf8: bool, wire: bytes) -> None:
    assert encode_address(address, utf8=utf8) == wire


@pytest.mark.parametrize(("address", "utf8"), [
    ("a\r\nRCPT TO:<x@y>", False), ("a\x00@b", False), ("x\x85y@b", True),
    ("a\u2028@b", True), ("a b@c", False), ("a>b@c", False), ("jörg@b", False),
    ("\ud800@b", True), ('"a\r<other@evil.test>"@y.test', False),
])
def test_encode_address_refuses_what_would_change_the_command(address: str,
                                                               utf8: bool) -> None:
    with pytest.raises(InvalidAddress):
        encode_address(address, utf8=utf8)


# -- item 8: a slow reply to the final dot -----------------------------------------------------

def test_upstream_data_timeout_is_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("upstream: {timeout: 30s}\n", encoding="utf-8")
    default = load_config(path, {"INFOBIP_API_KEY": "k" * 12})
    assert (default.upstream.timeout, default.upstream.data_timeout) == (30.0, 600.0)
    path.write_text("upstream: {data_timeout: 15m}\n", encoding="utf-8")
    assert load_config(path, {"INFOBIP_API_KEY": "k" * 12}).upstream.data_timeout == 900.0
    assert "data_timeout: 15m" in yaml.safe_dump(redacted(load_config(
        path, {"INFOBIP_API_KEY": "k" * 12})))


def test_slow_final_reply_within_data_timeout_is_delivered_once(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"timeout": "1s", "data_timeout": "6s"})
    fake_upstream.delay_next("data", 2.0, times=3)
    ids = [send(relay) for _ in range(3)]
    for queue_id in ids:
        assert final(relay, queue_id, timeout=20).state == "delivered"
    time.sleep(1.5)
    assert len(fake_upstream.messages) == 3


def test_no_final_reply_within_data_timeout_is_an_unknown_outcome(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"timeout": "1s", "data_timeout": "1s"},
                        queue={"retry_initial": "0.3s", "retry_max": "60s"})
    fake_upstream.delay_next("data", 3.0)
    queue_id = send(relay)

    def unknown() -> QueuedMessage | None:
        record = record_of(relay, queue_id)
        return record if record is not None and record.attempts >= 1 else None

    record: QueuedMessage = wait_until(unknown, timeout=10, what="first attempt recorded")
    assert record.state == "deferred"
    assert "outcome unknown after the final dot" in (record.last_reply or "")
    assert "outcome unknown after the final dot" in (record.recipients[0].reply or "")
    # The slower retry: queue.retry_max, not retry_initial.
    assert record.next_attempt - record.updated >= 59
    assert _metric(relay, "relay_upstream_unknown_outcomes_total") == 1.0
    time.sleep(3.5)  # past the fake's delay: no quick second copy
    assert len(fake_upstream.messages) == 1
    still = record_of(relay, queue_id)
    assert still is not None and still.attempts == 1


# -- a 421 mid-session, a connection lost after DATA --------------------------------------------

def first_attempt(relay: ThreadRelay, queue_id: str) -> QueuedMessage:
    found: QueuedMessage = wait_until(
        lambda: (r := record_of(relay, queue_id)) and r.attempts >= 1 and r,
        what=f"{queue_id}: first attempt recorded")
    return found


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_a_421_mid_session_closes_it_and_the_retry_reconnects(
        fake_upstream: FakeUpstream, start_relay: StartRelay, stage: str) -> None:
    relay = start_relay(fake_upstream, upstream={"connections": 1},
                        queue={"retry_initial": "0.5s", "retry_max": "1s"})
    # Replies, then closes. Not a throttling text ("too many connections" would be one: paced,
    # and no attempt counted; see test_pacing_relay.py).
    fake_upstream.fail_next(stage, 421, "4.3.2 System not accepting network messages")
    queue_id = send(relay)
    deferred = first_attempt(relay, queue_id)
    assert deferred.state == "deferred", deferred.last_reply
    assert deferred.last_reply == "421 4.3.2 System not accepting network messages"
    assert deferred.recipients[0].reply == "421 4.3.2 System not accepting network messages"
    record = final(relay, queue_id)
    assert (record.state, record.attempts) == ("delivered", 2)
    [received] = fake_upstream.wait_for(1)
    # The session that answered 421 is gone; the new one stays pooled for the next message.
    later = send(relay)
    assert final(relay, later).state == "delivered"
    assert fake_upstream.wait_for(2)[1].session_id == received.session_id


@pytest.mark.parametrize("process", ["off", "on"])
@pytest.mark.parametrize("stage", ["data_start", "data"])
def test_a_reload_mid_send_lets_the_send_finish_before_its_quit(
        fake_upstream: FakeUpstream, start_relay: StartRelay, process: str, stage: str) -> None:
    """A reload replaces the connections and closes the old ones: the QUIT waits for the
    send in flight. Written while the upstream's 354 was on its way, it became the first line
    of the message (a reload under load corrupted mail)."""
    relay = start_relay(fake_upstream, upstream_process=process,
                        upstream={"connections": 1, "data_timeout": "10s"})
    fake_upstream.delay_next(stage, 1.5)
    queue_id = send(relay)
    time.sleep(0.5)  # the transaction is out; the fake holds back the reply to DATA or the dot
    settings = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    settings["upstream"]["timeout"] = "29s"  # changed: the connections are replaced
    relay.config_path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert relay.reload() is True
    record = final(relay, queue_id)
    assert (record.state, record.attempts) == ("delivered", 1), record.last_reply
    [received] = fake_upstream.wait_for(1)
    assert received.data.startswith(b"Received: ") and b"QUIT" not in received.data
    later = send(relay)
    assert final(relay, later).state == "delivered"
    time.sleep(0.3)
    assert len(fake_upstream.messages) == 2 and fake_upstream.sync_errors == 0


@pytest.mark.parametrize("process", ["off", "on"])
def test_a_send_with_the_old_key_failing_after_a_reload_does_not_pause_the_new_one(
        fake_upstream: FakeUpstream, start_relay: StartRelay, process: str) -> None:
    """The key is revoked; the operator sets the new one and reloads while a session with the
    old key waits for its AUTH reply. That refusal belongs to the old settings: it neither
    pauses the upstream for ``auth_retry`` nor holds its message back that long."""
    relay = start_relay(fake_upstream, upstream_process=process,
                        upstream={"connections": 1}, queue={"auth_retry": "1h"})
    wait_until(lambda: fake_upstream.auth_successes >= 1, what="the start-up probe")
    time.sleep(0.2)  # its session closed: the send opens the next one
    fake_upstream.api_key = "rotated-key"
    fake_upstream.delay_next("auth", 3.0)
    queue_id = send(relay)
    time.sleep(1.0)  # the send has sent AUTH with the old key; the refusal comes after the reload
    settings = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    settings["upstream"]["password"] = "rotated-key"
    relay.config_path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert relay.reload() is True
    record = final(relay, queue_id)
    assert record.state == "delivered", record.last_reply
    assert record.attempts == 1  # the old key's refusal cost the message no attempt
    assert fake_upstream.auth_failures == 1
    assert relay.server.deliveries is not None
    health = relay.server.deliveries.default.health
    assert not health.auth_failed and health.ok
    later = send(relay)
    assert final(relay, later).state == "delivered"


def test_a_probe_with_the_old_key_failing_after_a_reload_does_not_pause_the_new_one(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """The start-up probe runs with a revoked key; the operator reloads with the right one
    before its 535 comes. The new settings are not paused for ``auth_retry``."""
    fake_upstream.delay_next("auth", 3.0)  # the first AUTH: the start-up probe's
    relay = start_relay(fake_upstream, upstream={"connections": 1, "password": "revoked-key"},
                        queue={"auth_retry": "1h"})
    wait_until(lambda: fake_upstream.connections >= 1, what="the start-up probe's connection")
    time.sleep(1.0)  # its AUTH is out; the refusal comes after the reload
    settings = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    settings["upstream"]["password"] = fake_upstream.api_key
    relay.config_path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert relay.reload() is True
    wait_until(lambda: fake_upstream.auth_failures == 1, what="the old probe's refusal")
    time.sleep(0.2)
    assert relay.server.deliveries is not None
    assert not relay.server.deliveries.default.health.auth_failed
    queue_id = send(relay)
    assert final(relay, queue_id, timeout=5).state == "delivered"


def test_a_connection_lost_after_data_is_an_unknown_outcome(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"connections": 1},
                        queue={"retry_initial": "0.3s", "retry_max": "1s"})
    fake_upstream.drop_next("data")  # reads the whole message, then closes without a reply
    queue_id = send(relay)
    deferred = first_attempt(relay, queue_id)
    assert deferred.state == "deferred"
    assert (deferred.last_reply or "").startswith(
        "451 4.4.2 outcome unknown after the final dot: ")
    # Not retried at once like a lost connection: no sooner than queue.retry_max.
    assert deferred.next_attempt - deferred.updated >= 0.99
    assert _metric(relay, "relay_upstream_unknown_outcomes_total") == 1.0
    assert len(fake_upstream.dropped_messages) == 1 and fake_upstream.messages == []
    # At least once: the retry sends it again, on a new session.
    record = final(relay, queue_id)
    assert (record.state, record.attempts) == ("delivered", 2)
    [received] = fake_upstream.wait_for(1)
    assert received.session_id != fake_upstream.dropped_messages[0].session_id
    assert received.data == fake_upstream.dropped_messages[0].data


def _metric(relay: ThreadRelay, name: str) -> float:
    text = relay.server.metrics.render().decode()
    match = re.search(rf'^{name}{{upstream="default"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"{name} not exported"
    return float(match.group(1))
