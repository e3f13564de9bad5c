"""The scheduler through a real relay: recovery after a bad key or an outage, per-recipient logs."""

from __future__ import annotations

import logging
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from relayrunner import ThreadRelay, spool_messages, wait_until

from relay.envelope import Envelope, MessageContext
from relay.infobip.priority import PRIORITIES
from relay.spool import QueuedMessage, SpoolDB

StartRelay = Callable[..., ThreadRelay]
MESSAGE = b"From: app@example.com\r\nSubject: test\r\n\r\nbody\r\n"


def send(relay: ThreadRelay, rcpts: tuple[str, ...] = ("user@example.net",)) -> str:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    return reply.split()[-1].decode()


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
