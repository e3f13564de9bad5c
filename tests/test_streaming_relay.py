"""Streamed DATA through a running relay: byte-exact large bodies, refusals that leave no file."""

from __future__ import annotations

import smtplib
from pathlib import Path

from rawsmtp import Raw
from relayrunner import ThreadRelay, spool_messages, wait_until

from relay.bodyfiles import PARTIAL_SUFFIX
from relay.message import fix_lines

HEAD = b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: big\r\n\r\n"


def bodies(relay: ThreadRelay) -> Path:
    spool = relay.server.spool
    assert spool is not None
    return spool.db.bodies


def body_files(relay: ThreadRelay) -> list[str]:
    directory = bodies(relay)
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def big_body(size: int) -> bytes:
    """Lines of every kind the stream must keep exact: dots, long, bare LF, bare CR."""
    lines = [b".dot first", b"..two dots", b"x" * 3000, b"bare\nlf", b"bare\rcr", b"plain " * 20]
    block = b"\r\n".join(lines) + b"\r\n"
    return block * (size // len(block) + 1)


def test_large_messages_arrive_byte_exact_and_leave_no_partial_file(fake_upstream,
                                                                    start_relay):
    relay = start_relay(fake_upstream)
    body = big_body(3 * 1024 * 1024)
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        for _ in range(2):
            assert client.sendmail("app@example.com", ["user@example.net"], HEAD + body) == {}
    received = fake_upstream.wait_for(2, timeout=30)
    expected = fix_lines(body, last=True)  # the whole-message path
    assert all(message.data.split(b"\r\n\r\n", 1)[1] == expected for message in received)
    assert not any(name.endswith(PARTIAL_SUFFIX) for name in body_files(relay))


def test_a_streamed_message_the_handler_refuses_leaves_no_file(fake_upstream, start_relay):
    """Refused after the whole body was streamed to disk (a bare CR in its header): the file
    goes with the refusal; the next one is spooled and keeps its body file until delivered."""
    relay = start_relay(fake_upstream)
    fake_upstream.delay_next("data", 2.0)  # the second message's file is looked at meanwhile
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(b"Subject: bad\rcr\r\n\r\n" + big_body(1024 * 1024))
        assert (code, reply) == (550, b"5.6.0 Message header contains a bare CR or a NUL "
                                      b"character")
        assert body_files(relay) == []
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(HEAD + big_body(1024 * 1024))
        assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    assert body_files(relay) == [queue_id, f"{queue_id}.env"]
    fake_upstream.wait_for(1, timeout=30)


def test_oversize_upload_is_drained_refused_and_leaves_no_file(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"max_message_size": "1MiB"})
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(HEAD + big_body(3 * 1024 * 1024))
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert body_files(relay) == []
        client.mail("app@example.com")  # the session goes on
        client.rcpt("user@example.net")
        assert client.data(HEAD + b"small\r\n")[0] == 250
    assert len(fake_upstream.wait_for(1)) == 1


def test_a_header_block_over_256_kib_is_refused(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    header = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"v" * 100) for n in range(3000))
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(header + b"\r\nbody\r\n")
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert b"header" in reply
        assert client.noop()[0] == 250
    assert spool_messages(relay) == []


def test_a_disconnect_mid_data_leaves_no_file(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with Raw(relay.address) as raw:
        raw.up_to_data()
        raw.send(HEAD + b"y" * 70 * 1024 * 10 + b"\r\n")  # past the in-memory part
        wait_until(lambda: any(name.endswith(PARTIAL_SUFFIX) for name in body_files(relay)),
                   what="a partial body file")
    wait_until(lambda: body_files(relay) == [], what="the partial body file removed")
    assert spool_messages(relay) == []


def test_the_listener_never_accepts_more_than_the_upstream_advertised(fake_upstream_factory,
                                                                       start_relay):
    upstream = fake_upstream_factory(size_limit=100_000)
    relay = start_relay(upstream, access={"max_message_size": "1MiB"})
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        # The configured limit until the upstream is reached (the relay may already have
        # probed it at start, which races with this EHLO), never more.
        assert client.esmtp_features["size"] in (str(1024 * 1024), "100000")
        client.sendmail("app@example.com", ["user@example.net"], HEAD + b"first\r\n")
    upstream.wait_for(1)
    wait_until(lambda: relay.server.delivery.health.max_size == 100_000, what="upstream SIZE")
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("client.example.com")
        assert client.esmtp_features["size"] == "100000"
        code, reply = client.mail("app@example.com", ["SIZE=100001"])
        assert (code, reply[:5]) == (552, b"5.3.4")
        client.rset()
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        # Within the limit as sent, over it with the relay's Received header added.
        code, reply = client.data(HEAD + b"z" * (100_000 - len(HEAD) - 200) + b"\r\n")
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250
    assert len(spool_messages(relay)) == 1
    assert body_files(relay) == []


def test_a_fresh_streamed_message_goes_out_without_reading_its_row_back(fake_upstream,
                                                                       start_relay):
    """The first delivery opens the body file the listener wrote: no read of the spool's row
    (a round trip through the writer thread, each one on an upstream connection's critical
    path) comes between the 250 and the send."""
    relay = start_relay(fake_upstream)
    spool = relay.server.spool
    assert spool is not None
    statements: list[str] = []
    spool.db.conn.set_trace_callback(statements.append)
    try:
        body = big_body(1024 * 1024)
        with smtplib.SMTP(*relay.address, timeout=30) as client:
            assert client.sendmail("app@example.com", ["user@example.net"], HEAD + body) == {}
        [received] = fake_upstream.wait_for(1, timeout=30)
        wait_until(lambda: [m.state for m in spool_messages(relay)] == ["delivered"],
                   what="the outcome recorded")
    finally:
        spool.db.conn.set_trace_callback(None)
    assert received.data.split(b"\r\n\r\n", 1)[1] == fix_lines(body, last=True)
    assert not [sql for sql in statements if sql.startswith("SELECT data, body_file")]
    assert any(sql.startswith("INSERT") for sql in statements)  # the trace saw the writer
