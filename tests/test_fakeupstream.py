"""The fake Infobip upstream behaves like the real endpoint, checked with smtplib and aiosmtplib."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import threading
import time

import aiosmtplib
import pytest
from fakeupstream import INFOBIP_HOSTNAME, FakeUpstream, FakeUpstreamFactory
from util import quit_cleanly

KEY = "test-api-key"
MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def plain_token(user: str, password: str) -> str:
    """Base64 AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def aio_client(fake: FakeUpstream, *, timeout: float = 5) -> aiosmtplib.SMTP:
    """An aiosmtplib client for ``fake`` that verifies the certificate against the test CA."""
    return aiosmtplib.SMTP(
        hostname="localhost",
        port=fake.port,
        start_tls=fake.tls == "starttls",
        use_tls=fake.tls == "implicit",
        tls_context=fake.client_ssl_context(),
        local_hostname="client.test",
        timeout=timeout,
    )


async def connect_and_login(fake: FakeUpstream, mechanism: str = "PLAIN") -> aiosmtplib.SMTP:
    """Connect, check TLS is really on, EHLO again, authenticate with one mechanism."""
    smtp = aio_client(fake)
    await smtp.connect()
    assert smtp.get_transport_info("sslcontext") is not None
    await smtp.ehlo()
    if mechanism == "PLAIN":
        await smtp.auth_plain("App", KEY)
    else:
        await smtp.auth_login("App", KEY)
    return smtp


def send_once(fake: FakeUpstream, rcpts: list[str] | None = None) -> str:
    """Connect, log in, send MSG, quit; return the DATA reply text."""

    async def run() -> str:
        smtp = await connect_and_login(fake)
        _, reply = await smtp.sendmail("a@example.com", rcpts or ["b@example.net"], MSG)
        await quit_cleanly(smtp)
        return reply

    return asyncio.run(run())


# -- EHLO, STARTTLS and AUTH gating -----------------------------------------------------------
def test_starttls_ehlo_and_gating_with_smtplib(fake_upstream: FakeUpstream) -> None:
    with smtplib.SMTP("127.0.0.1", fake_upstream.port, local_hostname="client.test") as smtp:
        code, text = smtp.ehlo()
        assert code == 250
        assert text.decode().split("\n") == [
            INFOBIP_HOSTNAME, "8BITMIME", "SIZE 20971520", "STARTTLS",
            "ENHANCEDSTATUSCODES", "PIPELINING", "OK",
        ]
        assert smtp.docmd("MAIL", "FROM:<a@example.com>") == (
            530, b"5.7.0 Must issue a STARTTLS command first"
        )
        assert smtp.docmd("AUTH", "PLAIN " + plain_token("App", KEY))[0] == 530

        code, text = smtp.starttls(context=fake_upstream.client_ssl_context())
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        code, text = smtp.ehlo()
        lines = text.decode().split("\n")
        assert "AUTH LOGIN PLAIN" in lines
        assert "STARTTLS" not in lines

        assert smtp.docmd("MAIL", "FROM:<a@example.com>") == (
            530, b"5.7.0 Authentication required"
        )
        assert smtp.docmd("AUTH", "PLAIN " + plain_token("App", "wrong")) == (
            535, b"5.7.8 Authentication credentials invalid"
        )
        assert smtp.docmd("AUTH", "PLAIN " + plain_token("Other", KEY))[0] == 535
        assert smtp.docmd("AUTH", "PLAIN " + plain_token("App", KEY)) == (
            235, b"2.7.0 Authentication successful"
        )
        assert smtp.docmd("MAIL", "FROM:<a@example.com> SIZE=20971521")[0] == 552
        assert smtp.docmd("MAIL", "FROM:<a@example.com>") == (
            250, b"2.1.0 Sender <a@example.com> OK"
        )
        assert smtp.docmd("RCPT", "TO:<b@example.net>") == (
            250, b"2.1.5 Recipient <b@example.net> OK"
        )
        assert smtp.docmd("RSET") == (250, b"2.0.0 OK")
        assert smtp.noop() == (250, b"2.0.0 OK")

    assert fake_upstream.auth_failures == 2
    assert fake_upstream.auth_successes == 1
    assert fake_upstream.connections == 1
    [session] = fake_upstream.sessions
    assert session.tls and session.auth_mechanism == "PLAIN"
    assert fake_upstream.errors == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_auth_and_send_with_aiosmtplib(
    fake_upstream: FakeUpstream, mechanism: str
) -> None:
    async def run() -> tuple[str, str]:
        smtp = await connect_and_login(fake_upstream, mechanism)
        assert not smtp.supports_extension("starttls")
        _, first = await smtp.sendmail("a@example.com", ["b@example.net", "c@example.org"], MSG)
        _, second = await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        await quit_cleanly(smtp)
        return first, second

    first, second = asyncio.run(run())
    one, two = fake_upstream.wait_for(2)
    assert first == f"2.6.0 Message queued as {one.message_id}"
    assert second == f"2.6.0 Message queued as {two.message_id}"
    assert one.message_id != two.message_id
    assert one.message_id.startswith("fake-1-")
    assert one.mail_from == "a@example.com"
    assert one.rcpt_tos == ["b@example.net", "c@example.org"]
    assert one.data == MSG
    assert one.parsed()["Subject"] == "hi"
    assert one.auth_mechanism == mechanism
    assert one.tls is True
    assert one.session_id == two.session_id  # one connection, two messages
    assert f"SIZE={len(MSG)}" in one.mail_options
    assert fake_upstream.connections == 1


def test_implicit_tls(fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(tls="implicit")

    async def run() -> None:
        smtp = aio_client(fake)
        await smtp.connect()
        assert smtp.get_transport_info("sslcontext") is not None
        await smtp.ehlo()
        assert not smtp.supports_extension("starttls")
        assert smtp.esmtp_extensions["auth"] == "LOGIN PLAIN"
        await smtp.auth_login("App", KEY)
        await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        await quit_cleanly(smtp)

    asyncio.run(run())
    [msg] = fake.wait_for(1)
    assert msg.tls is True and msg.auth_mechanism == "LOGIN"
    # A plaintext client gets no greeting from an implicit-TLS port.
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        smtplib.SMTP("127.0.0.1", fake.port, timeout=0.3)


def test_plain_mode_offers_no_starttls_and_no_auth(
    fake_upstream_factory: FakeUpstreamFactory,
) -> None:
    fake = fake_upstream_factory(tls="none")
    with smtplib.SMTP("127.0.0.1", fake.port) as smtp:
        _, text = smtp.ehlo()
        lines = text.decode().split("\n")
        assert "STARTTLS" not in lines
        assert not any(line.startswith("AUTH") for line in lines)
        with pytest.raises(smtplib.SMTPNotSupportedError):
            smtp.starttls()
        assert smtp.docmd("STARTTLS")[0] == 454
        assert smtp.docmd("AUTH", "PLAIN " + plain_token("App", KEY))[0] == 538
        assert smtp.docmd("MAIL", "FROM:<a@example.com>")[0] == 530

    async def run() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=fake.port, start_tls=True, timeout=5)
        with pytest.raises(aiosmtplib.SMTPException):
            await smtp.connect()
        smtp.close()

    asyncio.run(run())
    assert fake.messages == []


def test_bad_key_and_mail_before_auth(fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(api_key="another-key")

    async def run() -> None:
        smtp = aio_client(fake)
        await smtp.connect()
        await smtp.ehlo()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.mail("a@example.com")
        assert refused.value.code == 530
        assert refused.value.message == "5.7.0 Authentication required"
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
            await smtp.auth_plain("App", KEY)
        assert (exc.value.code, exc.value.message) == (
            535, "5.7.8 Authentication credentials invalid"
        )
        await smtp.auth_plain("App", "another-key")
        await quit_cleanly(smtp)

    asyncio.run(run())
    assert (fake.auth_failures, fake.auth_successes) == (1, 1)


def test_unverified_certificate_is_refused_by_client(fake_upstream: FakeUpstream) -> None:
    async def run() -> None:
        smtp = aiosmtplib.SMTP(
            hostname="localhost", port=fake_upstream.port, start_tls=True,
            tls_context=ssl.create_default_context(), timeout=5,
        )
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
            await smtp.connect()
        smtp.close()

    asyncio.run(run())
    assert fake_upstream.messages == []


# -- fault injection --------------------------------------------------------------------------
def test_reject_one_recipient_with_4xx(fake_upstream: FakeUpstream) -> None:
    fake_upstream.reject_recipient("Busy@Example.net", 451, "4.2.1 Mailbox busy")

    async def run() -> None:
        smtp = await connect_and_login(fake_upstream)
        rcpts = ["ok@example.net", "busy@example.net"]
        errors, _ = await smtp.sendmail("a@example.com", rcpts, MSG)
        assert {k: (v.code, v.message) for k, v in errors.items()} == {
            "busy@example.net": (451, "4.2.1 Mailbox busy")
        }
        # Persistent until cleared.
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail("a@example.com", ["busy@example.net"], MSG)
        fake_upstream.clear_faults()
        await smtp.sendmail("a@example.com", ["busy@example.net"], MSG)
        await quit_cleanly(smtp)

    asyncio.run(run())
    first, second = fake_upstream.wait_for(2)
    assert first.rcpt_tos == ["ok@example.net"]
    assert second.rcpt_tos == ["busy@example.net"]


@pytest.mark.parametrize(
    ("stage", "code", "error"),
    [
        ("mail", 451, aiosmtplib.SMTPSenderRefused),
        ("rcpt", 450, aiosmtplib.SMTPRecipientsRefused),
        ("data_start", 451, aiosmtplib.SMTPDataError),
        ("data", 554, aiosmtplib.SMTPDataError),
    ],
)
def test_fail_next(
    fake_upstream: FakeUpstream, stage: str, code: int, error: type[Exception]
) -> None:
    fake_upstream.fail_next(stage, code, f"{code // 100}.7.1 Injected", times=2)  # type: ignore[arg-type]

    async def run() -> str:
        smtp = await connect_and_login(fake_upstream)
        for _ in range(2):
            with pytest.raises(error):
                await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        _, reply = await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        await quit_cleanly(smtp)
        return reply

    reply = asyncio.run(run())
    [msg] = fake_upstream.wait_for(1)
    assert reply.endswith(msg.message_id)


def test_fail_auth_and_421_closes(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("auth", 454, "4.7.0 Temporary authentication failure")
    fake_upstream.fail_next("mail", 421, "4.4.5 Too many connections")

    async def run() -> None:
        smtp = aio_client(fake_upstream)
        await smtp.connect()
        await smtp.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
            await smtp.auth_plain("App", KEY)
        assert exc.value.code == 454
        await smtp.auth_plain("App", KEY)
        with pytest.raises((aiosmtplib.SMTPResponseException, aiosmtplib.SMTPServerDisconnected)):
            await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
        smtp.close()

    asyncio.run(run())
    assert fake_upstream.auth_failures == 1
    send_once(fake_upstream)
    fake_upstream.wait_for(1)


def test_fail_connect_with_421(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("connect", 421, "4.3.2 Service not available")
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP("127.0.0.1", fake_upstream.port, timeout=5)
    assert exc.value.smtp_code == 421
    assert exc.value.smtp_error == b"4.3.2 Service not available"
    send_once(fake_upstream)  # only the next connection was affected
    assert fake_upstream.connections == 2


@pytest.mark.parametrize("stage", ["connect", "mail", "rcpt", "data"])
def test_drop_next(fake_upstream: FakeUpstream, stage: str) -> None:
    fake_upstream.drop_next(stage)  # type: ignore[arg-type]

    async def run() -> None:
        smtp = aio_client(fake_upstream)
        with pytest.raises((aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError)):
            await smtp.connect()
            await smtp.ehlo()
            await smtp.auth_plain("App", KEY)
            await smtp.sendmail("a@example.com", ["b@example.net"], MSG)
        smtp.close()

    asyncio.run(run())
    assert fake_upstream.messages == []
    if stage == "data":  # read in full, then dropped before the 250: the ambiguous case
        [dropped] = fake_upstream.dropped_messages
        assert dropped.data == MSG
    else:
        assert fake_upstream.dropped_messages == []
    send_once(fake_upstream)
    fake_upstream.wait_for(1)
    assert fake_upstream.errors == []


def test_delay_next_data_holds_the_final_reply_but_keeps_the_message(
        fake_upstream: FakeUpstream) -> None:
    fake_upstream.delay_next("data", 1.0)
    with pytest.raises(ValueError, match="stage must be one of"):
        fake_upstream.delay_next("connect", 1.0)  # type: ignore[arg-type]

    async def give_up_early() -> None:
        smtp = await connect_and_login(fake_upstream)
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await smtp.sendmail("a@example.com", ["b@example.net"], MSG, timeout=0.3)
        smtp.close()

    asyncio.run(give_up_early())
    [kept] = fake_upstream.wait_for(1)  # a slow server has it even though the client left
    assert kept.data == MSG
    started = time.monotonic()
    send_once(fake_upstream)  # only the next final reply was delayed
    assert time.monotonic() - started < 1.0
    assert len(fake_upstream.wait_for(2)) == 2


def test_size_limit_on_data(fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(size_limit=1024)

    async def run() -> None:
        smtp = await connect_and_login(fake)
        assert smtp.esmtp_extensions["size"] == "1024"
        big = MSG + (b"x" * 70 + b"\r\n") * 30
        # The client announces SIZE: refused at MAIL.
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
            await smtp.sendmail("a@example.com", ["b@example.net"], big)
        assert exc.value.code == 552
        # Without SIZE the body is read and refused after the final dot.
        await smtp.mail("a@example.com")
        await smtp.rcpt("b@example.net")
        with pytest.raises(aiosmtplib.SMTPDataError) as data_exc:
            await smtp.data(big)
        assert data_exc.value.code == 552
        await quit_cleanly(smtp)

    asyncio.run(run())
    assert fake.messages == []


def test_smtputf8_option(fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(smtputf8=True)

    async def run() -> None:
        smtp = await connect_and_login(fake)
        assert smtp.supports_extension("smtputf8")
        await smtp.sendmail("ä@example.com", ["b@example.net"], MSG, mail_options=["SMTPUTF8"])
        await quit_cleanly(smtp)

    asyncio.run(run())
    [msg] = fake.wait_for(1)
    assert msg.mail_from == "ä@example.com"
    assert "SMTPUTF8" in msg.mail_options


# -- outage and recovery ----------------------------------------------------------------------
def test_stop_and_start_on_same_port(fake_upstream: FakeUpstream) -> None:
    port = fake_upstream.port
    send_once(fake_upstream)

    async def open_connection_then_outage() -> None:
        smtp = await connect_and_login(fake_upstream)
        await asyncio.to_thread(fake_upstream.stop)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
        smtp.close()
        with pytest.raises((aiosmtplib.SMTPConnectError, OSError)):
            await aio_client(fake_upstream).connect()

    asyncio.run(open_connection_then_outage())
    assert not fake_upstream.running
    fake_upstream.start()
    assert fake_upstream.port == port
    send_once(fake_upstream)
    assert len(fake_upstream.wait_for(2)) == 2  # records survive the restart


# -- wait_for ---------------------------------------------------------------------------------
def test_wait_for_times_out_with_clear_message(fake_upstream: FakeUpstream) -> None:
    started = time.monotonic()
    expected = r"expected at least 1 message\(s\) within 0.2s, got 0"
    with pytest.raises(AssertionError, match=expected):
        fake_upstream.wait_for(1, timeout=0.2)
    assert time.monotonic() - started < 2


def test_wait_for_wakes_up_on_arrival(fake_upstream: FakeUpstream) -> None:
    sender = threading.Timer(0.2, send_once, args=(fake_upstream,))
    sender.start()
    try:
        [msg] = fake_upstream.wait_for(1, timeout=5)
    finally:
        sender.join()
    assert msg.rcpt_tos == ["b@example.net"]


# -- command synchronization (RFC 2920), as strict as Exim -------------------------------------
def logged_in_smtplib(fake: FakeUpstream) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", fake.port, local_hostname="client.test", timeout=5)
    smtp.starttls(context=fake.client_ssl_context())
    smtp.ehlo()
    smtp.login("App", KEY)
    return smtp


def test_without_pipelining_an_early_command_is_a_synchronization_error(
        fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(pipelining=False)
    smtp = logged_in_smtplib(fake)
    assert not smtp.has_extn("pipelining")
    smtp.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
    assert smtp.getreply() == (554, b"SMTP synchronization error")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.getreply()
    smtp.close()
    assert fake.sync_errors == 1
    # In lockstep all is well, and the transaction is recorded as not pipelined.
    send_once(fake)
    [msg] = fake.wait_for(1)
    assert not msg.pipelined
    assert [(t.rcpt_commands, t.pipelined) for t in fake.transactions] == [(1, False)]


def test_with_pipelining_mail_rcpt_and_data_come_in_one_group(
        fake_upstream: FakeUpstream) -> None:
    smtp = logged_in_smtplib(fake_upstream)
    assert smtp.has_extn("pipelining")
    smtp.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
              b"RCPT TO:<c@example.net>\r\nDATA\r\n")
    assert [smtp.getreply()[0] for _ in range(4)] == [250, 250, 250, 354]
    smtp.send(MSG + b".\r\n")
    assert smtp.getreply()[0] == 250
    # DATA must end a group: anything sent before its 354 is a synchronization error.
    smtp.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
              + MSG + b".\r\n")
    assert [smtp.getreply() for _ in range(3)] == [
        (250, b"2.1.0 Sender <a@example.com> OK"), (250, b"2.1.5 Recipient <b@example.net> OK"),
        (554, b"SMTP synchronization error")]
    smtp.close()
    [msg] = fake_upstream.wait_for(1)
    assert msg.pipelined and msg.rcpt_tos == ["b@example.net", "c@example.net"]
    assert fake_upstream.sync_errors == 1
    assert [(t.rcpt_commands, t.pipelined) for t in fake_upstream.transactions] == [(2, True)]
    # aiosmtplib's lockstep is not pipelined, and not an error either.
    send_once(fake_upstream)
    assert not fake_upstream.wait_for(2)[1].pipelined


def test_coalesced_replies_and_data_without_recipients(
        fake_upstream_factory: FakeUpstreamFactory) -> None:
    fake = fake_upstream_factory(coalesce_replies=True, data_without_recipients=True)
    fake.reject_recipient("b@example.net", 550, "5.1.1 No such user")
    smtp = logged_in_smtplib(fake)
    assert smtp.sock is not None
    smtp.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    time.sleep(0.3)
    # All three replies in one read (one TLS record), the 354 despite no recipient.
    assert smtp.sock.recv(4096) == (b"250 2.1.0 Sender <a@example.com> OK\r\n"
                                    b"550 5.1.1 No such user\r\n"
                                    b"354 End data with <CR><LF>.<CR><LF>\r\n")
    smtp.send(b"x\r\n.\r\n")
    assert smtp.getreply() == (554, b"5.5.1 Error: no valid recipients")
    assert smtp.noop()[0] == 250
    smtp.close()
    assert fake.orphan_data == [b"x\r\n"] and fake.messages == []
