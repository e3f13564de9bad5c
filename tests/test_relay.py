"""The core path, for real: smtplib client -> relay (listener, spool, delivery) -> fake Infobip."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from relayrunner import (
    ThreadRelay,
    relay_config,
    send_raw,
    spool_messages,
    wait_until,
    write_config,
)

from relay.cli import main as cli_main
from relay.config import load_config
from relay.delivery import Delivery
from relay.envelope import Envelope, MessageContext
from relay.infobip.priority import PRIORITIES
from relay.metrics import Metrics
from relay.spool import Recipient, Spool, SpoolDB
from relay.upstream import UpstreamConnection

MESSAGE = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: report\r\n"
           b"Message-ID: <m1@example.com>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n"
           b"line one\r\n.leading dot\r\n\r\nlast line\r\n")


def send(relay: ThreadRelay, rcpts: list[str] | None = None, data: bytes = MESSAGE,
         sender: str = "app@example.com") -> tuple[int, bytes]:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail(sender)
        for rcpt in rcpts or ["user@example.net"]:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        return client.data(data)




def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_message_reaches_infobip_over_tls_with_auth(fake_upstream_factory, start_relay, tls,
                                                    mechanism):
    upstream = fake_upstream_factory(tls=tls)
    relay = start_relay(upstream, upstream={"auth_mechanism": mechanism})
    code, reply = send(relay, ["a@example.net", "b@example.net"])
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
    queue_id = reply.split()[-1].decode()

    [received] = upstream.wait_for(1)
    assert received.tls is True
    assert received.auth_mechanism == mechanism
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["a@example.net", "b@example.net"]
    assert body_of(received.data) == body_of(MESSAGE)
    assert f"id {queue_id}".encode() in received.data  # our Received trace header

    [record] = wait_until(lambda: [m for m in spool_messages(relay) if m.state == "delivered"],
                          what="delivered record")
    assert record.id == queue_id
    assert record.upstream_id == received.message_id
    assert record.attempts == 1


def test_one_authenticated_connection_is_reused(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, upstream={"connections": 1})
    for _ in range(5):
        assert send(relay)[0] == 250
    received = fake_upstream.wait_for(5)
    # One session carried all five (the start-up probe may have opened another, briefly).
    assert len({r.session_id for r in received}) == 1
    assert fake_upstream.auth_successes <= 2


def test_refuses_to_send_when_upstream_offers_no_tls(fake_upstream_factory, start_relay):
    upstream = fake_upstream_factory(tls="none")
    relay = start_relay(upstream, upstream={"tls": "starttls"})
    assert send(relay)[0] == 250
    [message] = wait_until(lambda: [m for m in spool_messages(relay, ("deferred",))],
                           what="a deferred message")
    assert "STARTTLS" in (message.last_reply or "")
    time.sleep(0.5)
    assert upstream.messages == []
    assert upstream.auth_successes == 0 and upstream.auth_failures == 0


def test_upstream_outage_then_recovery(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    fake_upstream.stop()
    assert send(relay)[0] == 250
    wait_until(lambda: spool_messages(relay, ("deferred",)), what="deferral during outage")
    assert relay.call(relay.server.readiness())[0] is False
    fake_upstream.start()
    fake_upstream.wait_for(1, timeout=15)
    wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivery after outage")


def test_background_tasks_are_kept_until_done_and_cancelled_at_shutdown(start_relay):
    relay = start_relay(None)

    async def reload_in_background() -> tuple[bool, bool, asyncio.Task[Any]]:
        relay.server.request_reload()  # what SIGHUP does
        [reload] = [t for t in relay.server._tasks if t.get_name() == "reload"]
        accepted = await reload
        await asyncio.sleep(0)
        relay.server._background(asyncio.sleep(3600), "long")
        [long] = [t for t in relay.server._tasks if t.get_name() == "long"]
        return accepted, reload in relay.server._tasks, long

    accepted, still_kept, long = relay.call(reload_in_background())
    assert accepted is True and still_kept is False  # discarded once done
    relay.stop()
    assert long.cancelled()  # shutdown cancelled and awaited it


def test_temporary_failure_is_retried(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    fake_upstream.fail_next("data", 451, "4.3.0 try later")
    assert send(relay)[0] == 250
    fake_upstream.wait_for(1, timeout=15)
    [record] = wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivered")
    assert record.attempts == 2


def test_permanent_failure_is_kept_and_listed(fake_upstream, start_relay, capsys):
    relay = start_relay(fake_upstream)
    fake_upstream.fail_next("mail", 550, "5.7.1 sender not verified")
    queue_id = send(relay)[1].split()[-1].decode()
    wait_until(lambda: spool_messages(relay, ("failed",)), what="failed message")
    spool = str(relay.config.queue.path)

    assert cli_main(["queue", "list", "--spool", spool]) == 0
    out = capsys.readouterr().out
    assert queue_id in out and "failed" in out and "550 5.7.1 sender not verified" in out

    assert cli_main(["queue", "show", queue_id, "--spool", spool, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipients"][0]["state"] == "failed"

    # An operator fixes the cause and retries: it goes out.
    assert cli_main(["queue", "retry", queue_id, "--spool", spool]) == 0
    fake_upstream.wait_for(1, timeout=10)
    wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivered after retry")


def test_queue_delete(fake_upstream, start_relay, capsys):
    relay = start_relay(fake_upstream)
    fake_upstream.fail_next("mail", 554, "5.0.0 no")
    queue_id = send(relay)[1].split()[-1].decode()
    wait_until(lambda: spool_messages(relay, ("failed",)), what="failed message")
    spool = str(relay.config.queue.path)
    assert cli_main(["queue", "delete", queue_id, "--spool", spool]) == 0
    assert spool_messages(relay) == []
    assert cli_main(["queue", "delete", queue_id, "--spool", spool]) == 1
    assert "no message" in capsys.readouterr().err


def test_recipients_get_their_own_outcome(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    fake_upstream.reject_recipient("gone@example.net", 550, "5.1.1 no such user")
    fake_upstream.reject_recipient("full@example.net", 452, "4.2.2 mailbox full")
    send(relay, ["ok@example.net", "gone@example.net", "full@example.net"])
    [first] = fake_upstream.wait_for(1)
    assert first.rcpt_tos == ["ok@example.net"]

    fake_upstream.clear_faults()
    received = fake_upstream.wait_for(2, timeout=15)
    assert received[1].rcpt_tos == ["full@example.net"]  # only the deferred one, once
    [record] = wait_until(lambda: spool_messages(relay, ("failed",)), what="final state")
    states = {r.address: r.state for r in record.recipients}
    assert states == {"ok@example.net": "delivered", "gone@example.net": "failed",
                      "full@example.net": "delivered"}
    time.sleep(0.5)
    assert len(fake_upstream.messages) == 2


def test_bad_api_key_keeps_mail_queued_until_fixed(fake_upstream, start_relay, tmp_path, caplog):
    relay = start_relay(fake_upstream, upstream={"password": "wrong-key-123"},
                        queue={"auth_retry": "60s"})
    assert send(relay)[0] == 250
    [message] = wait_until(lambda: spool_messages(relay, ("deferred",)), what="deferred")
    assert "authentication" in (message.last_reply or "")
    assert message.attempts == 0  # not the message's fault
    assert fake_upstream.messages == []
    assert "wrong-key-123" not in caplog.text
    assert any("authentication failed" in r.getMessage() for r in caplog.records)

    # The operator fixes the key and reloads: mail flows without a restart.
    config_text = relay.config_path.read_text().replace("wrong-key-123", "test-api-key")
    relay.config_path.write_text(config_text)
    assert relay.reload() is True
    relay.call(_make_due(relay, message.id))
    fake_upstream.wait_for(1, timeout=10)


async def on_spool(relay: ThreadRelay, operation: Callable[[SpoolDB], Any]) -> Any:
    """Run ``operation`` in the relay's spool writer thread, inside a write transaction."""
    spool = relay.server.spool
    assert spool is not None
    return await spool._submit(operation, write=True)


async def _make_due(relay: ThreadRelay, message_id: str) -> None:
    await on_spool(relay, lambda db: db.retry(message_id, time.time()))


def test_oversize_messages_are_refused(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"max_message_size": "10KiB"})
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.esmtp_features["size"] == str(10 * 1024)
        code, reply = client.mail("app@example.com", ["SIZE=20000"])
        assert code == 552 and reply.startswith(b"5.3.4")
        client.rset()
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(b"Subject: big\r\n\r\n" + b"x" * 60 + b"\r\n" * 0 +
                                  (b"y" * 70 + b"\r\n") * 200)
        assert code == 552
    assert spool_messages(relay) == []


def test_too_many_recipients(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"max_recipients": 2})
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        assert client.rcpt("a@example.net")[0] == 250
        assert client.rcpt("b@example.net")[0] == 250
        code, reply = client.rcpt("c@example.net")
        assert code == 452 and reply.startswith(b"4.5.3")


def test_untrusted_client_must_authenticate(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"trusted_networks": ["10.0.0.0/8"]})
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert "auth" not in client.esmtp_features
        code, reply = client.mail("app@example.com")
        assert code == 530 and reply == b"5.7.0 Authentication required"


def test_ehlo_advertises_extensions(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        for extension in ("size", "8bitmime", "smtputf8", "enhancedstatuscodes", "pipelining"):
            assert extension in client.esmtp_features


def test_unknown_harmless_parameters_are_accepted(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.mail("app@example.com", ["AUTH=<>"])[0] == 250


def test_bare_lf_and_long_lines_are_made_rfc_clean(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    long_line = b"z" * 5000
    # Bare LF inside; only the final CRLF.CRLF ends DATA (anything else would allow smuggling).
    data = b"Subject: legacy\nX-Test: 1\n\nfirst\n" + long_line + b"\nend\r\n"
    send_raw(relay, data)  # as legacy apps send it: smtplib would fix the line endings itself
    [received] = fake_upstream.wait_for(1)
    # Lines over 998 octets are broken the way Postfix breaks them: CRLF + space.
    expected_long = b"z" * 998 + b"".join(b"\r\n " + b"z" * 997 for _ in range(4)) + \
        b"\r\n " + b"z" * (5000 - 998 - 4 * 997)
    assert body_of(received.data) == b"first\r\n" + expected_long + b"\r\nend\r\n"
    assert all(len(line) <= 998 for line in received.data.split(b"\r\n"))


def test_utf8_and_8bit_survive(fake_upstream_factory, start_relay):
    upstream = fake_upstream_factory(smtputf8=True)
    relay = start_relay(upstream)
    # Non-ASCII addresses are taken only once the upstream was seen to advertise SMTPUTF8.
    wait_until(lambda: relay.server.delivery.health.smtputf8, what="upstream contact")
    data = "Subject: Grüße\r\n\r\nÜmlaut body ✓\r\n".encode()
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.sendmail("jörg@example.com", ["user@example.net"], data,
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [received] = upstream.wait_for(1)
    assert received.mail_from == "jörg@example.com"
    assert body_of(received.data) == "Ümlaut body ✓\r\n".encode()
    assert "SMTPUTF8" in [o.upper() for o in received.mail_options]


def test_spool_full_answers_452_and_keeps_nothing(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    spool = relay.server.spool
    assert spool is not None

    def fill(db: SpoolDB) -> None:
        pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
        db.conn.execute(f"PRAGMA max_page_count = {pages}")

    relay.call(on_spool(relay, fill))
    code, reply = send(relay, data=MESSAGE + b"x" * 50000 + b"\r\n")
    assert code == 452 and reply.startswith(b"4.3.1")
    assert spool_messages(relay) == []
    time.sleep(0.3)
    assert fake_upstream.messages == []


def test_priority_header_orders_the_backlog(fake_upstream, tmp_path):
    """HIGH before STANDARD before LOW, whatever the arrival order."""
    config = load_config(write_config(tmp_path, relay_config(tmp_path, fake_upstream,
                                                             upstream={"connections": 1})))

    async def scenario() -> None:
        spool = Spool(config.queue.path)
        spool.start()
        context = config.upstream.ssl_context()
        delivery = Delivery(config, spool, Metrics(),
                            lambda: UpstreamConnection(config.upstream, "relay.test", context))
        for index, priority in enumerate(("LOW", "STANDARD", "HIGH")):
            data = f"Subject: {priority}\r\n\r\nx\r\n".encode()
            ctx = MessageContext(f"ID{index}", "app@example.com", ("u@example.net",),
                                 "127.0.0.1", None, "local", len(data))
            delivery.reserve(ctx.queue_id)
            await spool.put(Envelope(ctx, data), PRIORITIES[priority])
            message = await spool.get(ctx.queue_id)
            assert message is not None and message.recipients == (Recipient("u@example.net"),)
            delivery.submit(message, data)
        await delivery.start()
        await asyncio.to_thread(fake_upstream.wait_for, 3, 15)
        await delivery.stop(5)
        await spool.close()

    asyncio.run(scenario())
    assert [r.parsed()["Subject"] for r in fake_upstream.messages] == ["HIGH", "STANDARD", "LOW"]


def test_messages_expire_after_max_age(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, queue={"max_age": "1s", "retry_initial": "0.4s",
                                              "retry_max": "0.4s"})
    fake_upstream.fail_next("rcpt", 451, "4.7.1 greylisted", times=100)
    send(relay)
    [record] = wait_until(lambda: spool_messages(relay, ("failed",)), timeout=15,
                          what="expiry")
    assert "expired after max_age" in (record.recipients[0].reply or "")


def test_metrics_and_health_endpoints(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    send(relay)
    fake_upstream.wait_for(1)
    base = f"http://127.0.0.1:{relay.server.metrics_port}"
    wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivered")
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert 'relay_messages_accepted_total{listener="local"} 1.0' in metrics
    assert 'relay_delivery_attempts_total{state="delivered",upstream="default"} 1.0' in metrics
    assert 'relay_queue_messages{state="delivered"} 1.0' in metrics
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    ready = urllib.request.urlopen(base + "/readyz", timeout=5)
    assert ready.status == 200


def test_null_sender_gets_a_clear_permanent_refusal(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        code, reply = client.mail("<>")
        assert code == 550 and b"Null sender" in reply
        assert client.mail("app@example.com")[0] == 250  # the session goes on


LARGE_BODY = b"".join(b"line %06d of a large report .........................\r\n" % n
                      for n in range(6000))  # ~330 KB: stored as a file of its own


def test_large_bodies_live_in_files_until_delivered(fake_upstream, start_relay, capsys):
    relay = start_relay(fake_upstream)
    bodies = relay.config.queue.path / "bodies"
    fake_upstream.stop()
    queue_id = send(relay, data=b"Subject: big\r\n\r\n" + LARGE_BODY)[1].split()[-1].decode()
    wait_until(lambda: spool_messages(relay, ("deferred",)), what="deferred")
    assert (bodies / queue_id).stat().st_size > 200_000
    assert (bodies / queue_id).stat().st_mode & 0o777 == 0o600

    fake_upstream.start()
    [received] = fake_upstream.wait_for(1, timeout=15)
    assert body_of(received.data) == LARGE_BODY
    wait_until(lambda: not (bodies / queue_id).exists(), what="body file removed")
    [record] = spool_messages(relay, ("delivered",))
    assert record.size > 200_000


def test_deleting_a_large_message_removes_its_file(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    fake_upstream.fail_next("mail", 550, "5.7.1 no")
    queue_id = send(relay, data=b"Subject: big\r\n\r\n" + LARGE_BODY)[1].split()[-1].decode()
    wait_until(lambda: spool_messages(relay, ("failed",)), what="failed")
    path = relay.config.queue.path / "bodies" / queue_id
    assert path.exists()
    assert cli_main(["queue", "delete", queue_id, "--spool", str(relay.config.queue.path)]) == 0
    assert not path.exists()


def test_orphan_body_files_are_quarantined_at_start(tmp_path):
    spool_dir = tmp_path / "spool"
    db = SpoolDB(spool_dir)
    ctx = MessageContext("KEEPME", "a@example.com", ("b@example.net",), "127.0.0.1", None,
                         "local", 0)
    db.transaction(lambda: db.insert(Envelope(ctx, b"x" * 300_000), 1, time.time()))
    db.close()
    (spool_dir / "bodies" / "ORPHAN").write_bytes(b"never acknowledged")

    async def reopen() -> bytes | None:
        spool = Spool(spool_dir)
        spool.start()
        try:
            return await spool.data("KEEPME")
        finally:
            await spool.close()

    assert asyncio.run(reopen()) == b"x" * 300_000
    assert sorted(p.name for p in (spool_dir / "bodies").iterdir()) == \
        ["KEEPME", "KEEPME.env", "orphaned"]
    assert (spool_dir / "bodies" / "orphaned" / "ORPHAN").read_bytes() == b"never acknowledged"
