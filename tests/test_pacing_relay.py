"""Pacing through a real relay (real sockets, the fake Infobip): the measured rate, adaptive
back-off on throttling replies, and priority within the paced stream."""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Callable

import pytest
from fakeupstream import FakeUpstream, Received
from relayrunner import ThreadRelay, spool_messages, wait_until

StartRelay = Callable[..., ThreadRelay]
pytestmark = pytest.mark.xdist_group("heavy")  # timing is measured: nothing heavy beside it


def submit(relay: ThreadRelay, subjects: list[str], priority: str | None = None
           ) -> list[tuple[str, float, float]]:
    """Send one message per subject in one SMTP session: (subject, 250 latency, 250 time)."""
    header = f"X-IB-Client-Priority: {priority}\r\n" if priority else ""
    answered = []
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        for subject in subjects:
            data = f"From: app@example.com\r\nSubject: {subject}\r\n{header}\r\nbody\r\n"
            client.mail("app@example.com")
            client.rcpt("user@example.net")
            started = time.monotonic()
            code, reply = client.data(data.encode())
            done = time.monotonic()
            assert code == 250, reply
            answered.append((subject, done - started, done))
    return answered


def subject(message: Received) -> str:
    return str(message.parsed()["Subject"])


def sample(relay: ThreadRelay, name: str) -> float:
    value = relay.server.metrics.registry.get_sample_value(name, {"upstream": "default"})
    assert value is not None, name
    return value


def test_100_messages_at_20_per_second_take_their_time_and_clients_get_250_at_once(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream={"rate": "20/s", "connections": 4})
    started = time.monotonic()
    answered = submit(relay, [f"m{index}" for index in range(100)])
    clients_done = time.monotonic()
    messages = fake_upstream.wait_for(100, timeout=15)
    arrived = max(m.received_at for m in messages)
    took = arrived - started
    latencies = sorted(latency for _, latency, _ in answered)
    print(f"\n100 messages at 20/s: arrived after {took:.2f}s; 250 latency median "
          f"{latencies[50] * 1000:.1f}ms, max {latencies[-1] * 1000:.1f}ms; clients done after "
          f"{clients_done - started:.2f}s")
    # Burst of one: 99 intervals of 1/20 s at least (4.95 s); 4.5 s is the bound.
    assert took >= 4.5
    spread = arrived - min(m.received_at for m in messages)
    assert spread >= 4.5
    assert took < 12  # paced, not stalled
    # Queue, never refuse: every client got its 250 at once, long before the mail went out.
    assert latencies[50] < 0.1 and latencies[-1] < 1.0
    assert clients_done - started < took - 1.5
    assert sorted(subject(m) for m in messages) == sorted(f"m{index}" for index in range(100))


def test_throttling_upstream_slows_down_delivers_everything_and_recovers(
        fake_upstream: FakeUpstream, start_relay: StartRelay,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.pacing")
    relay = start_relay(fake_upstream, upstream={"rate": "200/s", "connections": 4})
    throttles = 3
    fake_upstream.fail_next("mail", 451, "4.7.0 rate limit exceeded", times=throttles)
    lowest = {"rate": 200.0, "connections": 4.0}
    stop = threading.Event()

    def watch() -> None:  # what /metrics shows while it happens
        while not stop.is_set():
            lowest["rate"] = min(lowest["rate"], sample(relay, "relay_upstream_pacing_rate"))
            lowest["connections"] = min(lowest["connections"],
                                        sample(relay, "relay_upstream_pacing_connections"))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        count = 150
        submit(relay, [f"m{index}" for index in range(count)])
        fake_upstream.wait_for(count, timeout=15)

        def recovered() -> bool:
            return sample(relay, "relay_upstream_throttling") == 0 and \
                sample(relay, "relay_upstream_pacing_rate") == 200
        wait_until(recovered, timeout=5, what="the full pace again")
    finally:
        stop.set()
        watcher.join(5)
    assert lowest["rate"] <= 100 and lowest["connections"] <= 2, lowest
    assert sample(relay, "relay_upstream_pacing_connections") == 4
    assert sample(relay, "relay_upstream_throttled_replies_total") == throttles
    # The throttled messages went out too, each counting one attempt only: its delivery.
    records = wait_until(lambda: [m for m in spool_messages(relay)
                                  if m.state == "delivered"] if len(spool_messages(
                                      relay, ("delivered",))) == count else None,
                         what="every outcome recorded")
    assert {m.attempts for m in records} == {1}
    assert len({subject(m) for m in fake_upstream.messages}) == count
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.pacing"
             and r.levelno >= logging.INFO]
    assert len(lines) == 2, lines
    assert "is throttling (451 4.7.0 rate limit exceeded)" in lines[0]
    assert "stopped throttling: back at the full pace (200 messages/s" in lines[1]


def test_high_priority_overtakes_low_mail_waiting_for_its_token(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """The guarantee: a message that is only waiting for a token never goes before a more
    urgent one; only sends already in flight when the HIGH message was queued can."""
    relay = start_relay(fake_upstream, upstream={"rate": "4/s", "connections": 3})
    submit(relay, [f"low{index}" for index in range(12)], "LOW")
    fake_upstream.wait_for(2, timeout=5)  # the paced stream is under way
    answered = submit(relay, ["high0", "high1", "high2"], "HIGH")
    messages = fake_upstream.wait_for(15, timeout=10)
    order = [subject(m) for m in messages]
    at = {subject(m): m.received_at for m in messages}
    for name, _, accepted in answered:
        overtaking = [s for s in order if s.startswith("low") and accepted < at[s] < at[name]]
        # At 4/s a send takes a few ms of a 250 ms interval: at most one can be in flight.
        assert len(overtaking) <= 1, (name, order)
    highs = [order.index(name) for name, _, _ in answered]
    assert highs == sorted(highs)  # and in their own order
    assert max(highs) < order.index("low11")
