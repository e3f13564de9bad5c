"""A graceful stop against what is still running: sends waiting for a token, sends cut off by
the grace period, a reload that finishes during the shutdown. Real relay, real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fakeupstream import FakeUpstream, FakeUpstreamFactory
from relayrunner import ThreadRelay, send, spool_messages, wait_until

from relay.envelope import Envelope, MessageContext
from relay.spool import SpoolDB

StartRelay = Callable[..., ThreadRelay]


def _stop_in_background(relay: ThreadRelay) -> threading.Thread:
    """relay.stop() without blocking the test: it returns once the shutdown has begun."""
    stopper = threading.Thread(target=relay.stop, daemon=True)
    stopper.start()
    wait_until(lambda: relay.server.state is not None and not relay.server.state.accepting,
               what="shutdown begun")
    return stopper


# -- a stop starts no new send ---------------------------------------------------------------

@pytest.mark.parametrize("process", ["off", "on"])
def test_a_graceful_stop_starts_no_new_send(fake_upstream: FakeUpstream,
                                            start_relay: StartRelay, process: str) -> None:
    """stop(): "let sends in flight finish; everything else stays spooled". A worker that was
    waiting for a pacing token when the stop began takes a job and sends it anyway."""
    # The second token comes 4 s after the first, while the first send is still in flight
    # (7 s) and the stop, begun well before, waits for it: slack for a loaded machine.
    relay = start_relay(fake_upstream, upstream={"connections": 2, "rate": "15/m"},
                        grace_period="12s", upstream_process=process)
    fake_upstream.delay_next("data", 7.0)  # the first send is in flight during the stop
    first = send(relay)
    wait_until(lambda: fake_upstream.transactions, what="first send under way")
    second = send(relay)  # the other worker waits for the next token
    stopper = _stop_in_background(relay)
    stopper.join(20)
    assert not stopper.is_alive()
    sent = {m.message_id for m in fake_upstream.messages}
    records = {m.id: m for m in spool_messages(relay)}
    assert records[first].state == "delivered"
    # The second message was not in flight when the stop began: it must stay spooled.
    assert len(sent) == 1, f"{len(sent)} messages sent; second is {records[second].state}"
    assert records[second].state == "queued"


# -- a send cut off by the grace period is an unknown outcome ---------------------------------

@pytest.mark.parametrize("process", ["off", "on"])
def test_a_send_cut_by_the_grace_period_is_not_retried_at_once(
        fake_upstream: FakeUpstream, start_relay: StartRelay, process: str) -> None:
    """The final dot went out, the reply is slow, the grace period ends: the upstream may
    have the message (an unknown outcome), yet the record stays as it was, due at once."""
    relay = start_relay(fake_upstream, upstream={"connections": 1}, grace_period="1s",
                        upstream_process=process,
                        queue={"retry_initial": "0.3s", "retry_max": "1h"})
    fake_upstream.delay_next("data", 4.0)  # recorded by the fake, reply held back
    queue_id = send(relay)
    wait_until(lambda: fake_upstream.messages, what="the message reached the upstream")
    relay.stop()
    [record] = [m for m in spool_messages(relay) if m.id == queue_id]
    state = (record.state, record.attempts, round(record.next_attempt - time.time(), 1))
    # The upstream has it; a restart must not send it again before retry_max.
    start_relay(fake_upstream, upstream={"connections": 1}, upstream_process=process,
                queue={"retry_initial": "0.3s", "retry_max": "1h"})
    time.sleep(1.5)
    copies = [m for m in fake_upstream.messages if m.data == fake_upstream.messages[0].data]
    assert len(copies) == 1, f"{len(copies)} copies upstream; record at stop: {state}"


# -- a reload during the shutdown changes nothing --------------------------------------------

@pytest.mark.parametrize("process", ["off", "on"])
def test_a_reload_during_the_shutdown_adds_no_delivery_that_outlives_it(
        fake_upstream_factory: FakeUpstreamFactory, start_relay: StartRelay, tmp_path: Path,
        process: str) -> None:
    """SIGHUP during a graceful stop: Server.shutdown() gathered the deliveries that existed
    when it called Deliveries.stop(); a reload finishing meanwhile adds and starts another,
    whose workers then send (after the stop of delivery) and are never stopped."""
    default, marketing = fake_upstream_factory(), fake_upstream_factory(api_key="mk")
    # Mail routed to 'marketing', which the running config does not have (yet).
    db = SpoolDB(tmp_path / "spool")
    context = MessageContext("Q1MARKETING", "n@news.example.com", ("user@example.net",),
                             "192.0.2.1", None, "local", 40)
    body = b"From: n@news.example.com\r\nSubject: routed\r\n\r\nbody\r\n"
    db.transaction(lambda: db.insert(Envelope(context, body, route="marketing"), 1, time.time()))
    db.close()
    relay = start_relay(default, upstream={"connections": 1}, grace_period="5s",
                        upstream_process=process)
    default.delay_next("data", 2.0)  # a send in flight keeps Delivery.stop() waiting
    send(relay)
    wait_until(lambda: default.transactions, what="the default send under way")
    marketing.delay_next("data", 5.0)
    stopper = _stop_in_background(relay)
    time.sleep(0.3)  # Deliveries.stop() is waiting for the send in flight
    raw = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    raw["upstreams"] = {"marketing": {
        "host": marketing.host, "port": marketing.port, "tls": "starttls", "username": "App",
        "password": "mk", "ca_file": str(marketing.ca_pem_path), "connections": 1}}
    relay.config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert relay.reload() is True
    stopper.join(15)
    assert not stopper.is_alive()
    workers = [task for delivery in relay.server.deliveries or ()
               for task in delivery._workers]
    running = [task.get_name() for task in workers if not task.done()]
    sent_after_stop = [m.message_id for m in marketing.messages]
    [record] = [m for m in spool_messages(relay) if m.id == "Q1MARKETING"]
    assert not running and not sent_after_stop, (running, sent_after_stop, record.state,
                                                 record.attempts, record.last_reply)
