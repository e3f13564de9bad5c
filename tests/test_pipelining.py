"""RFC 2920 pipelining towards the upstream: one write for MAIL, RCPT... and DATA.

Real sockets and TLS against the fake Infobip, which is as strict as Exim about synchronization
(a command sent too early is a ``554 SMTP synchronization error``) and records whether each
transaction came in one read. After every failure, the pooled connection must carry the next
message correctly (on the same session unless the session had to go).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol
from fakeupstream import DEFAULT_API_KEY, FakeUpstream, FakeUpstreamFactory

from relay.config import Secret, UpstreamConfig
from relay.outgoing import SpooledBody
from relay.pipelining import ReplyReader
from relay.upstream import SendResult, UpstreamConnection, UpstreamUnavailable

MESSAGE = b"From: app@example.com\r\nSubject: pipelined\r\n\r\nbody\r\n.leading dot\r\n"
T = TypeVar("T")


def connection(fake: FakeUpstream, timeout: float = 5.0) -> UpstreamConnection:
    config = UpstreamConfig(host=fake.host, port=fake.port, tls="starttls", username="App",
                            password=Secret(DEFAULT_API_KEY), ca_file=fake.ca_pem_path,
                            timeout=timeout, data_timeout=5.0)
    return UpstreamConnection(config, "relay.test", config.ssl_context())


def run(fake: FakeUpstream, scenario: Callable[[UpstreamConnection], Coroutine[Any, Any, T]],
        timeout: float = 5.0, *, loop: str = "asyncio") -> T:
    async def main() -> T:
        upstream = connection(fake, timeout)
        try:
            return await scenario(upstream)
        finally:
            await upstream.close()
            # uvloop closes a socket a loop iteration or two after abort(); a loop closed
            # before that fails with EBUSY (the relay's own loop keeps running at that point).
            for _ in range(5):
                await asyncio.sleep(0)

    if loop == "uvloop":  # what the relay runs on: its transports call protocols their own way
        import uvloop  # noqa: PLC0415

        return uvloop.run(main())
    return asyncio.run(main())


async def send(upstream: UpstreamConnection, *recipients: str) -> SendResult:
    return await upstream.send("app@example.com", recipients or ("user@example.net",), MESSAGE)


def send_then_next(fake: FakeUpstream, *recipients: str, loop: str = "asyncio"
                   ) -> tuple[SendResult, SendResult]:
    """A message to ``recipients``, then one to next@example.net over the same connection."""
    async def scenario(upstream: UpstreamConnection) -> tuple[SendResult, SendResult]:
        return await send(upstream, *recipients), await send(upstream, "next@example.net")

    return run(fake, scenario, loop=loop)


def assert_next_message_goes_through(fake: FakeUpstream, result: SendResult, *,
                                     same_session: bool) -> None:
    """``result`` is the second send's; it went over the first session or a new one."""
    assert result.accepted == ("next@example.net",) and result.upstream_id, result
    received = fake.messages[-1]
    assert received.rcpt_tos == ["next@example.net"] and received.data == MESSAGE
    assert received.pipelined
    assert (fake.connections == 1) is same_session
    assert fake.sync_errors == 0


# -- the happy path ------------------------------------------------------------------------------

def test_a_body_file_is_opened_by_the_session_and_sent_whole(fake_upstream: FakeUpstream,
                                                             tmp_path: Path) -> None:
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    path = tmp_path / "BODY"
    path.write_bytes(body * 40_000)  # several chunks, a dot at the start of many lines
    message = SpooledBody(head + b"\r\n\r\n", path, len(head) + 4 + len(body) * 40_000)

    async def scenario(upstream: UpstreamConnection) -> SendResult:
        return await upstream.send("app@example.com", ("user@example.net",), message)

    result = run(fake_upstream, scenario)
    assert result.accepted == ("user@example.net",), result
    [received] = fake_upstream.messages
    assert received.data == head + b"\r\n\r\n" + body * 40_000


def test_a_body_file_gone_is_a_local_temporary_failure(fake_upstream: FakeUpstream,
                                                       tmp_path: Path) -> None:
    """Deleted (``queue delete``) between its turn and its send: nothing goes out, and the
    connection carries the next message."""
    gone = SpooledBody(b"Subject: gone\r\n\r\n", tmp_path / "deleted", 100)

    async def scenario(upstream: UpstreamConnection) -> tuple[SendResult, SendResult]:
        first = await upstream.send("app@example.com", ("user@example.net",), gone)
        return first, await send(upstream, "next@example.net")

    result, after = run(fake_upstream, scenario)
    assert result.local and not result.accepted and not result.permanent
    assert result.reply.startswith("451 4.3.0 cannot read the spooled body: No such file")
    assert result.temporary == {"user@example.net": result.reply}
    assert [m.rcpt_tos for m in fake_upstream.messages] == [["next@example.net"]]
    assert after.accepted == ("next@example.net",)

@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("coalesce", [False, True], ids=["reply-by-reply", "one-write"])
def test_mail_rcpt_and_data_go_out_in_one_write(fake_upstream_factory: FakeUpstreamFactory,
                                                coalesce: bool, loop: str) -> None:
    fake = fake_upstream_factory(coalesce_replies=coalesce)

    async def scenario(upstream: UpstreamConnection) -> list[SendResult]:
        return [await send(upstream, "a@example.net", "b@example.net"),
                await send(upstream, "c@example.net")]

    first, second = run(fake, scenario, loop=loop)
    assert first.accepted == ("a@example.net", "b@example.net")
    assert (first.temporary, first.permanent) == ({}, {})
    one, two = fake.wait_for(2)
    assert first.upstream_id == one.message_id and second.upstream_id == two.message_id
    assert one.rcpt_tos == ["a@example.net", "b@example.net"] and one.data == MESSAGE
    assert one.mail_options == [f"SIZE={len(MESSAGE)}"]
    assert one.pipelined and two.pipelined
    assert [(t.rcpt_commands, t.pipelined) for t in fake.transactions] == [(2, True), (1, True)]
    assert one.session_id == two.session_id and fake.connections == 1
    assert fake.sync_errors == 0


def test_lockstep_when_pipelining_is_not_advertised(
        fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(pipelining=False)

    async def scenario(upstream: UpstreamConnection) -> list[SendResult]:
        return [await send(upstream, "a@example.net", "b@example.net"),
                await send(upstream, "c@example.net")]

    results = run(fake, scenario)
    assert [r.accepted for r in results] == [("a@example.net", "b@example.net"),
                                             ("c@example.net",)]
    assert [m.pipelined for m in fake.wait_for(2)] == [False, False]
    assert [t.pipelined for t in fake.transactions] == [False, False]
    assert fake.sync_errors == 0 and fake.connections == 1


def test_the_strict_fake_catches_a_client_that_pipelines_unasked(
        fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(pipelining=False)

    async def scenario(upstream: UpstreamConnection) -> None:
        await upstream.probe()
        assert upstream._smtp is not None
        upstream._smtp.esmtp_extensions["pipelining"] = ""  # pretend it was advertised
        with pytest.raises(UpstreamUnavailable):
            await send(upstream)

    run(fake, scenario)
    assert fake.sync_errors == 1 and fake.messages == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sends_made_before_the_last_returned_go_one_after_the_other(
        fake_upstream: FakeUpstream, loop: str) -> None:
    """Overlapping calls take turns in call order, never two transactions at once (the
    strict fake would answer 503 or count a synchronization error), and a close() asked for
    meanwhile waits its turn."""
    fake_upstream.delay_next("data", 0.3)  # the first final reply is slow

    async def scenario(upstream: UpstreamConnection) -> list[SendResult]:
        async with asyncio.timeout(10):  # interleaved transactions may hang instead
            first = asyncio.create_task(send(upstream, "a@example.net"))
            await asyncio.sleep(0)  # the first has the session
            second = asyncio.create_task(send(upstream, "b@example.net"))
            closing = asyncio.create_task(upstream.close())
            third = asyncio.create_task(send(upstream, "c@example.net"))
            results = [await first, await second]
            await closing
            return [*results, await third]

    results = run(fake_upstream, scenario, loop=loop)
    assert [r.accepted for r in results] == [("a@example.net",), ("b@example.net",),
                                             ("c@example.net",)]
    received = fake_upstream.wait_for(3)
    assert [m.rcpt_tos for m in received] == [["a@example.net"], ["b@example.net"],
                                              ["c@example.net"]]
    # The first two shared a session; the close() came after them, so the third needed a
    # new one.
    assert received[0].session_id == received[1].session_id != received[2].session_id
    assert fake_upstream.sync_errors == 0 and fake_upstream.connections == 2


@pytest.mark.parametrize("stage", ["data_start", "data"])
def test_a_close_during_a_send_waits_for_it(fake_upstream: FakeUpstream, stage: str) -> None:
    """A reload closes the connections it replaces, whatever they are doing: QUIT must not
    go out in the middle of a transaction. Written while the upstream's 354 is on its way, it
    would become the first line of the message."""
    fake_upstream.delay_next(stage, 0.3)

    async def scenario(upstream: UpstreamConnection) -> SendResult:
        async with asyncio.timeout(10):
            sending = asyncio.create_task(send(upstream))
            await asyncio.sleep(0.1)  # MAIL, RCPT and DATA are out; a reply is held back
            await upstream.close()
            assert sending.done()
            return await sending

    result = run(fake_upstream, scenario)
    assert result.accepted == ("user@example.net",) and result.upstream_id
    [received] = fake_upstream.wait_for(1)
    assert received.data == MESSAGE
    assert fake_upstream.sync_errors == 0 and not upstream_still_open(fake_upstream)


def upstream_still_open(fake: FakeUpstream) -> bool:
    time.sleep(0.2)
    return fake.open_connections > 0


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stage", "code", "kind", "text"), [
    ("mail", 550, "permanent", "5.7.1 Sender refused"),
    ("mail", 451, "temporary", "4.7.1 Sender refused"),
    ("data_start", 554, "permanent", "5.3.0 Not now"),
    ("data_start", 451, "temporary", "4.3.0 Not now"),
])
def test_mail_or_data_refused_fails_with_its_reply_and_the_session_goes_on(
        fake_upstream: FakeUpstream, stage: str, code: int, kind: str, text: str) -> None:
    fake_upstream.fail_next(stage, code, text)

    refused, later = send_then_next(fake_upstream, "a@example.net", "b@example.net")
    reply = f"{code} {text}"
    assert refused.accepted == () and refused.reply == reply
    assert getattr(refused, kind) == {"a@example.net": reply, "b@example.net": reply}
    # After a refused MAIL, the RCPT and DATA replies (503, need MAIL / need RCPT) were read,
    # not taken for out of step.
    assert_next_message_goes_through(fake_upstream, later, same_session=True)
    assert len(fake_upstream.messages) == 1


def test_one_of_two_recipients_refused(fake_upstream: FakeUpstream) -> None:
    fake_upstream.reject_recipient("bad@example.net", 550, "5.1.1 No such user")

    partial, later = send_then_next(fake_upstream, "ok@example.net", "bad@example.net")
    assert partial.accepted == ("ok@example.net",)
    assert partial.permanent == {"bad@example.net": "550 5.1.1 No such user"}
    first = fake_upstream.messages[0]
    assert first.rcpt_tos == ["ok@example.net"] and first.pipelined
    assert partial.upstream_id == first.message_id
    assert_next_message_goes_through(fake_upstream, later, same_session=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("misbehaving", [False, True], ids=["data-503", "data-354"])
def test_all_recipients_refused(fake_upstream_factory: FakeUpstreamFactory,
                                misbehaving: bool, loop: str) -> None:
    fake = fake_upstream_factory(data_without_recipients=misbehaving)
    fake.reject_recipient("a@example.net", 550, "5.1.1 No such user")
    fake.reject_recipient("b@example.net", 450, "4.2.1 Mailbox busy")

    refused, later = send_then_next(fake, "a@example.net", "b@example.net", loop=loop)
    assert refused.accepted == ()
    assert refused.permanent == {"a@example.net": "550 5.1.1 No such user"}
    assert refused.temporary == {"b@example.net": "450 4.2.1 Mailbox busy"}
    # A 354 with no recipient gets a lone dot: never the message.
    assert fake.orphan_data == ([b""] if misbehaving else [])
    assert_next_message_goes_through(fake, later, same_session=True)
    assert len(fake.messages) == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data_start"])
def test_503_is_out_of_step_and_retried_on_a_new_connection(fake_upstream: FakeUpstream,
                                                            stage: str) -> None:
    fake_upstream.fail_next(stage, 503, "5.5.1 Error: nested MAIL command")  # type: ignore[arg-type]

    retried, later = send_then_next(fake_upstream, "a@example.net")
    assert retried.accepted == ("a@example.net",) and retried.upstream_id
    first, second = fake_upstream.wait_for(2)
    assert first.rcpt_tos == ["a@example.net"] and first.pipelined
    assert fake_upstream.connections == 2  # the out-of-step session was dropped
    assert second.session_id == first.session_id  # the new one stays pooled
    assert_next_message_goes_through(fake_upstream, later, same_session=False)


def test_a_421_in_the_group_ends_the_session(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("rcpt", 421, "4.3.2 System not accepting network messages")

    refused, later = send_then_next(fake_upstream, "a@example.net", "b@example.net")
    reply = "421 4.3.2 System not accepting network messages"
    assert refused.reply == reply
    assert refused.temporary == {"a@example.net": reply, "b@example.net": reply}
    assert_next_message_goes_through(fake_upstream, later, same_session=False)
    assert len(fake_upstream.messages) == 1


# -- connection failures, reply timing -----------------------------------------------------------

@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_a_disconnect_mid_group_is_a_connection_failure(fake_upstream: FakeUpstream,
                                                        stage: str, loop: str) -> None:
    fake_upstream.drop_next(stage)  # type: ignore[arg-type]

    async def scenario(upstream: UpstreamConnection) -> SendResult:
        with pytest.raises(UpstreamUnavailable, match="connection lost during the transaction"):
            await send(upstream, "a@example.net", "b@example.net")
        assert not upstream.connected
        return await send(upstream, "next@example.net")

    later = run(fake_upstream, scenario, loop=loop)
    assert fake_upstream.messages[:-1] == [] and fake_upstream.dropped_messages == []
    assert_next_message_goes_through(fake_upstream, later, same_session=False)


def test_replies_one_by_one_with_delays(fake_upstream: FakeUpstream) -> None:
    fake_upstream.delay_next("mail", 0.2)
    fake_upstream.delay_next("rcpt", 0.2, times=2)
    fake_upstream.delay_next("data_start", 0.2)

    async def scenario(upstream: UpstreamConnection) -> list[SendResult]:
        await upstream.probe()
        started = time.monotonic()
        first = await send(upstream, "a@example.net", "b@example.net")
        assert time.monotonic() - started >= 0.8
        return [first, await send(upstream, "next@example.net")]

    first, later = run(fake_upstream, scenario)
    assert first.accepted == ("a@example.net", "b@example.net")
    assert fake_upstream.messages[0].pipelined
    assert_next_message_goes_through(fake_upstream, later, same_session=True)


def test_a_reply_that_does_not_come_is_a_timeout(fake_upstream: FakeUpstream) -> None:
    fake_upstream.delay_next("rcpt", 3.0)

    async def scenario(upstream: UpstreamConnection) -> SendResult:
        await upstream.probe()
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="Timed out"):
            await send(upstream, "a@example.net")
        assert time.monotonic() - started < 2.5
        return await send(upstream, "next@example.net")

    later = run(fake_upstream, scenario, timeout=1.0)
    assert_next_message_goes_through(fake_upstream, later, same_session=False)


# -- the reply reader on its own: any packet boundaries -------------------------------------------

class _Transport(asyncio.Transport):
    """Just enough transport for an SMTPProtocol: records writes and protocol changes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.protocol: asyncio.BaseProtocol | None = None
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


REPLIES = (b"250 2.1.0 Sender OK\r\n250-2.1.5 Recipient\r\n250 2.1.5 OK\r\n"
           b"550 5.1.1 No such user\r\n354 End data with <CR><LF>.<CR><LF>\r\n")


def _split(data: bytes, how: str) -> list[bytes]:
    if how == "one-packet":
        return [data]
    if how == "byte-by-byte":
        return [data[i:i + 1] for i in range(len(data))]
    return [line + b"\n" for line in data.split(b"\n")[:-1]]  # line by line


@pytest.mark.parametrize("early", [False, True], ids=["awaited", "arrived-early"])
@pytest.mark.parametrize("how", ["one-packet", "line-by-line", "byte-by-byte"])
def test_the_reader_returns_every_reply_once_whatever_the_packets(how: str, early: bool) -> None:
    async def scenario() -> None:
        protocol = SMTPProtocol()
        transport = _Transport()
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        with ReplyReader(protocol) as replies:
            assert transport.get_protocol() == replies
            replies.send([[b"MAIL", b"FROM:<a@b>", b"SIZE=10"], [b"RCPT", b"TO:<c@d>"],
                          [b"RCPT", b"TO:<e@f>"], [b"DATA"]])
            assert transport.written == [b"MAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\n"
                                         b"RCPT TO:<e@f>\r\nDATA\r\n"]
            chunks = _split(REPLIES, how)
            got = []
            if early:  # everything is in before the first read is awaited
                for chunk in chunks:
                    replies.data_received(chunk)
            else:
                async def feed() -> None:
                    for chunk in chunks:
                        await asyncio.sleep(0)
                        replies.data_received(chunk)

                feeder = asyncio.create_task(feed())
            for _ in range(4):
                got.append(await replies.next(1.0))
            if not early:
                await feeder
            assert [(r.code, r.message) for r in got] == [
                (250, "2.1.0 Sender OK"), (250, "2.1.5 Recipient\n2.1.5 OK"),
                (550, "5.1.1 No such user"), (354, "End data with <CR><LF>.<CR><LF>")]
            assert not replies.pending
        assert transport.get_protocol() == protocol
        # The SMTPProtocol reads the next reply as usual.
        protocol._response_pending = True
        protocol.data_received(b"250 2.0.0 OK\r\n")
        assert (await protocol.read_response(1.0)).code == 250

    asyncio.run(scenario())


def test_the_reader_reports_a_lost_connection_after_the_replies_that_came() -> None:
    async def scenario() -> None:
        protocol = SMTPProtocol()
        transport = _Transport()
        protocol.connection_made(transport)
        with ReplyReader(protocol) as replies:
            replies.data_received(b"250 OK\r\n250 OK\r\n")
            replies.connection_lost(None)
            assert (await replies.next(1.0)).code == 250
            assert (await replies.next(1.0)).code == 250
            with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                await replies.next(1.0)
        assert protocol.transport is None  # the SMTPProtocol saw the loss too

    asyncio.run(scenario())


def test_the_reader_times_out_and_refuses_injected_lines() -> None:
    async def scenario() -> None:
        protocol = SMTPProtocol()
        protocol.connection_made(_Transport())
        with ReplyReader(protocol) as replies:
            with pytest.raises(ValueError, match="prohibited control character"):
                replies.send([[b"RCPT", b"TO:<a@b>\r\nDATA"]])
            replies.data_received(b"250 partial")
            with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
                await replies.next(0.05)
            assert replies.pending

    asyncio.run(scenario())
