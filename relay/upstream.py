"""One authenticated, TLS-only SMTP connection to the Infobip endpoint (aiosmtplib).

`Upstream` is what the delivery module sees of it (send / probe / close), like chasquid's
Courier or httpx's transports: `UpstreamConnection` implements it with aiosmtplib, and the tests
drive `Delivery` with a scripted fake. Every reply and transport failure becomes a `SendResult`
or one of the `UpstreamError` exceptions, so delivery decides on outcomes without knowing SMTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, cast

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from relay.address import AddressError, check_mailbox
from relay.config import UpstreamConfig
from relay.errors import RelayError
from relay.infobip.replies import parse_message_id
from relay.outgoing import DotStuffer, MessageData, OpenedData, message_size
from relay.pipelining import ReplyReader

log = logging.getLogger("relay.upstream")

# Above this idle time a NOOP checks the connection before a transaction: providers drop idle
# connections silently, and a failure at MAIL would cost the message an attempt.
_NOOP_AFTER_IDLE = 10.0
# The DATA timeout covers the whole upload, so it grows with the message (worst case 64 KiB/s).
_UPLOAD_RATE = 64 * 1024


class UpstreamError(RelayError):
    """A failure of the connection itself, not attributable to one message."""


class UpstreamUnavailable(UpstreamError):
    """Cannot connect, TLS failed or is not offered, or the server went away: retry later."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused our credentials: a configuration problem, not the messages' fault."""


class UpstreamOutcomeUnknown(UpstreamError):
    """No reply to the final dot (timeout, disconnect): the upstream may have the message."""


class InvalidAddress(ValueError):
    """An address that cannot go on an SMTP command line exactly as it was spooled."""


class _OutOfStep(Exception):
    """A 503 before the final dot: the session's transaction state is not what we think it is."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _NoFinalReply(Exception):
    """The message and its final dot were written but no reply came back."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """Per-recipient result of one transaction. Replies are ``"250 2.6.0 Message queued as X"``."""

    accepted: tuple[str, ...] = ()
    temporary: dict[str, str] = field(default_factory=dict)
    permanent: dict[str, str] = field(default_factory=dict)
    reply: str = ""
    upstream_id: str | None = None
    # Decided here without a word to the upstream (every address refused before MAIL): says
    # nothing about the upstream's health.
    local: bool = False


class Upstream(Protocol):
    """One session to the upstream, connected lazily and reused for many messages."""

    @property
    def connected(self) -> bool:
        """Whether a session is open now (for the open-connections gauge)."""
        ...

    @property
    def smtputf8(self) -> bool | None:
        """Whether the upstream advertised SMTPUTF8 at the last EHLO (None before any)."""
        ...

    @property
    def max_size(self) -> int | None:
        """The SIZE the upstream advertised at the last EHLO (None: none, or none known)."""
        ...

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: MessageData,
                   mail_options: tuple[str, ...] = ()) -> SendResult:
        """Forward one message; per-recipient results, or an `UpstreamError` about the session:
        UpstreamUnavailable (retry later), UpstreamAuthError (credentials refused),
        UpstreamOutcomeUnknown (the final dot went out and no reply came back).

        Calls that overlap take turns, in the order they were made; so do `probe` and `close`
        (a reload closes the connections it replaces while they may be sending)."""
        ...

    async def probe(self) -> None:
        """Connect and authenticate; raises UpstreamUnavailable or UpstreamAuthError."""
        ...

    async def close(self) -> None:
        """End the session politely (QUIT) if one is open."""
        ...


UpstreamFactory = Callable[[], Upstream]


def _close_now(smtp: aiosmtplib.SMTP,
               transport: asyncio.BaseTransport | None = None) -> None:
    """Close the socket at once, without TLS's close_notify exchange: after QUIT's reply
    nothing is left to say, and a session given up on may never answer it, which held the
    socket open until the TLS shutdown timed out (30 s). ``transport``: the session's, taken
    before QUIT (aiosmtplib forgets it once QUIT is answered and starts that shutdown)."""
    transport = transport or smtp.transport
    if transport is not None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not isinstance().
        cast(asyncio.Transport, transport).abort()
    smtp.close()


def connection_factory(config: UpstreamConfig, local_hostname: str
                       ) -> Callable[[], UpstreamConnection]:
    """A factory of connections to the upstream ``config`` describes (one TLS context for all)."""
    return functools.partial(UpstreamConnection, config, local_hostname, config.ssl_context())


def advertised_size(value: str) -> int | None:
    """RFC 1870: the SIZE keyword's value; 0 or nothing means no fixed limit (None)."""
    value = value.strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def encode_address(address: str, *, utf8: bool) -> bytes:
    """The bytes that go between ``<`` and ``>`` on MAIL/RCPT: the address itself, or nothing.

    It is never re-parsed (a parser that keeps the ``<...>`` inside a quoted local part would
    send another address than the one that was checked), only checked again with the very rule
    the listener applied at MAIL/RCPT (relay.address), for spools written by older versions.
    Raises InvalidAddress.
    """
    if address:
        try:
            check_mailbox(address)
        except AddressError as exc:
            raise InvalidAddress(exc.reason) from None
    try:
        return address.encode("utf-8" if utf8 else "ascii")
    except UnicodeEncodeError:
        raise InvalidAddress("non-ASCII without SMTPUTF8" if not utf8
                             else "not encodable as UTF-8") from None


def _encode_recipients(recipients: tuple[str, ...], utf8: bool
                       ) -> tuple[dict[str, bytes], dict[str, str]]:
    """(address -> wire bytes) for the valid recipients, (address -> 553 reply) for the rest."""
    valid: dict[str, bytes] = {}
    invalid: dict[str, str] = {}
    for address in recipients:
        try:
            valid[address] = encode_address(address, utf8=utf8)
        except InvalidAddress as exc:
            invalid[address] = f"553 5.1.3 invalid address: {exc}"
    return valid, invalid


class UpstreamConnection:
    """A lazily connected upstream session, reused for many messages."""

    def __init__(self, config: UpstreamConfig, local_hostname: str,
                 ssl_context: ssl.SSLContext) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.ssl_context = ssl_context
        self._smtp: aiosmtplib.SMTP | None = None
        self._smtputf8: bool | None = None
        self._max_size: int | None = None
        self._last_used = 0.0
        # One operation at a time. A reload closes replaced connections whatever they are
        # doing: a QUIT written while a 354 was on its way became the message's first line.
        self._turn = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    @property
    def smtputf8(self) -> bool | None:
        """Whether the server advertised SMTPUTF8 at the last EHLO (None before any)."""
        return self._smtputf8

    @property
    def max_size(self) -> int | None:
        return self._max_size

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: MessageData,
                   mail_options: tuple[str, ...] = ()) -> SendResult:
        """Forward one message; UpstreamUnavailable / UpstreamAuthError are about the connection.

        UpstreamOutcomeUnknown: the final dot went out and no reply came back.
        """
        async with self._turn:
            return await self._send(mail_from, recipients, data, mail_options)

    async def _send(self, mail_from: str, recipients: tuple[str, ...], data: MessageData,
                    mail_options: tuple[str, ...]) -> SendResult:
        utf8 = "SMTPUTF8" in mail_options
        try:
            sender = encode_address(mail_from, utf8=utf8)
        except InvalidAddress as exc:
            result = _whole_message(recipients, 553, f"5.1.7 invalid sender address: {exc}")
            return replace(result, local=True)
        # Checked before MAIL goes out: a refusal half-way through would leave the session
        # inside a transaction.
        valid, invalid = _encode_recipients(recipients, utf8)
        result = await self._send_opened(sender, valid, data, mail_options) if valid \
            else SendResult(local=True)
        result.permanent.update(invalid)
        return result

    async def _send_opened(self, sender: bytes, recipients: dict[str, bytes], data: MessageData,
                           mail_options: tuple[str, ...]) -> SendResult:
        """A body file is opened here, where it is read. One that is gone (the message was
        deleted meanwhile) or unreadable is a local temporary failure."""
        if isinstance(data, bytes):
            return await self._send_checked(sender, recipients, data, mail_options)
        try:
            opened = data.open()
        except OSError as exc:
            reply = f"451 4.3.0 cannot read the spooled body: {exc.strerror}"
            return SendResult(temporary=dict.fromkeys(recipients, reply), reply=reply, local=True)
        try:
            return await self._send_checked(sender, recipients, opened, mail_options)
        finally:
            opened.close()

    async def _send_checked(self, sender: bytes, recipients: dict[str, bytes], data: OpenedData,
                            mail_options: tuple[str, ...]) -> SendResult:
        """One transaction; after a 503 once more on a new session, never a permanent failure."""
        try:
            return await self._send_once(sender, recipients, data, mail_options)
        except _OutOfStep as exc:
            log.warning("upstream answered %s: dropping the connection and trying once more on a "
                        "new one", exc.reply)
        try:
            return await self._send_once(sender, recipients, data, mail_options)
        except _OutOfStep as exc:
            # Not the message's fault as far as we can tell: retried later like any 4xx.
            return _whole_message(tuple(recipients), 451,
                                  f"4.5.0 upstream answered {exc.reply} on a new connection")

    async def _send_once(self, sender: bytes, recipients: dict[str, bytes], data: OpenedData,
                         mail_options: tuple[str, ...]) -> SendResult:
        smtp = await self._ready_connection()
        names = tuple(recipients)
        timeouts = _Timeouts(command=max(self.config.timeout, message_size(data) / _UPLOAD_RATE),
                             final=self.config.data_timeout + message_size(data) / _UPLOAD_RATE)
        try:
            refused, message = await _transaction(smtp, sender, recipients, data,
                                                  mail_options=mail_options, timeouts=timeouts)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return _all_refused(exc)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._refused(names, exc)
        except _NoFinalReply as exc:
            self._drop()
            raise UpstreamOutcomeUnknown(f"no reply to the final dot: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self._drop()
            raise UpstreamUnavailable(f"connection lost during the transaction: {exc}") from exc
        except BaseException:
            # A bug or a cancellation mid-transaction: the session state is unknown, so the
            # session must never carry another message.
            self._drop()
            raise
        finally:
            self._last_used = time.monotonic()
        return _partial(names, refused, message)

    async def _refused(self, recipients: tuple[str, ...],
                       exc: aiosmtplib.SMTPResponseException) -> SendResult:
        if exc.code == 503:
            self._drop()
            raise _OutOfStep(_reply(exc.code, exc.message)) from exc
        if exc.code == 421:
            await self._close()  # within the send's turn
        return _whole_message(recipients, exc.code, exc.message)

    def _drop(self) -> None:
        """Close without QUIT: the session may be mid-transaction or out of step."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            _close_now(smtp)

    async def probe(self) -> None:
        """Connect and authenticate (readiness, start-up check); raises like `send`."""
        async with self._turn:
            await self._ready_connection()

    async def close(self) -> None:
        async with self._turn:
            await self._close()

    async def _close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        transport = smtp.transport
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass  # the transport goes below all the same
        finally:
            _close_now(smtp, transport)  # also when QUIT was cancelled: no socket may leak

    async def _ready_connection(self) -> aiosmtplib.SMTP:
        smtp = self._smtp
        if smtp is not None and smtp.is_connected:
            if time.monotonic() - self._last_used < _NOOP_AFTER_IDLE:
                return smtp
            try:
                await smtp.noop(timeout=10)
                return smtp
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                log.debug("idle upstream connection is gone; reconnecting")
                smtp.close()
        self._smtp = None
        self._smtp = await self._connect()
        self._last_used = time.monotonic()
        return self._smtp

    async def _connect(self) -> aiosmtplib.SMTP:
        config = self.config
        implicit = config.tls == "implicit"
        smtp = aiosmtplib.SMTP(
            hostname=config.host, port=config.port, local_hostname=self.local_hostname,
            timeout=config.timeout, use_tls=implicit, start_tls=not implicit,
            tls_context=self.ssl_context,
        )
        where = f"{config.host}:{config.port}"
        try:
            await smtp.connect()
            if smtp.get_transport_info("sslcontext") is None:
                # Never reached with start_tls=True/use_tls=True; kept so that no future library
                # default can make us talk in clear.
                raise UpstreamUnavailable(f"{where}: TLS is not active; refusing to send")
            await smtp.ehlo()
            self._smtputf8 = smtp.supports_extension("smtputf8")
            self._max_size = advertised_size(smtp.esmtp_extensions.get("size", ""))
            await self._authenticate(smtp)
        except UpstreamError:
            smtp.close()
            raise
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            raise UpstreamUnavailable(f"{where}: {_describe(exc)}") from exc
        except (OSError, TimeoutError) as exc:
            smtp.close()
            raise UpstreamUnavailable(f"{where}: cannot connect: {exc}") from exc
        except BaseException:
            smtp.close()  # cancelled (shutdown, reload) half-way: the socket must not leak
            raise
        log.debug("connected to %s (%s)", where, config.tls)
        return smtp

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> None:
        mechanism = self._choose_mechanism(smtp)
        username, password = self.config.username, self.config.password.reveal()
        try:
            if mechanism == "PLAIN":
                await smtp.auth_plain(username, password)
            else:
                await smtp.auth_login(username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            detail = _reply(exc.code, exc.message)
            if 400 <= exc.code < 500:
                raise UpstreamUnavailable(f"temporary AUTH failure: {detail}") from exc
            raise UpstreamAuthError(
                f"authentication as {username!r} with AUTH {mechanism} was refused ({detail}): "
                "check the API key (upstream.password) and username") from exc

    def _choose_mechanism(self, smtp: aiosmtplib.SMTP) -> str:
        offered = {method.upper() for method in smtp.server_auth_methods}
        wanted = self.config.auth_mechanism
        if wanted != "auto":
            if wanted not in offered:
                raise UpstreamAuthError(f"upstream does not offer AUTH {wanted} "
                                        f"(offers: {', '.join(sorted(offered)) or 'none'})")
            return wanted
        for mechanism in ("PLAIN", "LOGIN"):
            if mechanism in offered:
                return mechanism
        offers = ", ".join(sorted(offered)) or "none"
        raise UpstreamAuthError(f"upstream offers no AUTH PLAIN or LOGIN (offers: {offers})")


@dataclass(frozen=True, slots=True)
class _Timeouts:
    command: float  # each command, and the DATA upload
    final: float  # the reply to the final dot (RFC 5321 4.5.3.2 gives it 10 minutes)


async def _transaction(smtp: aiosmtplib.SMTP, sender: bytes, recipients: dict[str, bytes],
                       data: OpenedData, *, mail_options: tuple[str, ...], timeouts: _Timeouts
                       ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """MAIL, RCPT..., DATA, with the addresses exactly as spooled (aiosmtplib would re-parse them).

    Pipelined (RFC 2920) when the upstream advertises PIPELINING: MAIL, every RCPT and DATA go out
    in one write, then their replies are read in order (one round trip instead of 2 + recipients).
    The spool holds CRLF-normalised bytes already; sendmail would normalise them twice more
    and dot-stuff with a regex, which dominated the cost of large messages.
    """
    options = [option.encode("ascii") for option in mail_options]
    if smtp.supports_extension("size"):
        options.insert(0, b"SIZE=%d" % message_size(data))
    mail = [b"MAIL", b"FROM:<" + sender + b">", *options]
    try:
        if smtp.supports_extension("pipelining"):
            refused = await _pipelined_envelope(smtp, mail, recipients, timeouts)
            response = await _message(smtp, data, timeouts)
            return refused, response.message
        await _command(smtp, mail, timeouts, ok=(250,))
        refused = {}
        errors: list[aiosmtplib.SMTPRecipientRefused] = []
        for name, address in recipients.items():
            try:
                await _command(smtp, [b"RCPT", b"TO:<" + address + b">"], timeouts,
                               ok=(250, 251), recipient=name)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[name] = aiosmtplib.SMTPResponse(exc.code, exc.message)
                errors.append(exc)
        if len(errors) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(errors)
        response = await _data(smtp, data, timeouts)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        await _reset_or_drop(smtp, timeouts)
        raise
    return refused, response.message


async def _pipelined_envelope(smtp: aiosmtplib.SMTP, mail: list[bytes],
                              recipients: dict[str, bytes], timeouts: _Timeouts
                              ) -> dict[str, aiosmtplib.SMTPResponse]:
    """MAIL, each RCPT and DATA in one write; the refused recipients once DATA got its 354.

    Raises like the lockstep commands would: SMTPResponseException with MAIL's reply (503: out
    of step), with a RCPT's 503 (out of step), SMTPRecipientsRefused, SMTPDataError. Every reply
    of the group is read first, whatever went wrong, so the session stays in step (a 421 ends it:
    the server is closing). A 354 that must not be followed by the message gets a lone dot when
    only the recipients were refused (the server has no recipient to deliver to: RFC 2920 3.1,
    as Postfix does); otherwise the server's transaction state is unknown and the connection is
    dropped without completing DATA, so that nothing can be delivered.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    group = [mail, *([b"RCPT", b"TO:<" + address + b">"] for address in recipients.values()),
             [b"DATA"]]
    with ReplyReader(protocol) as replies:
        replies.send(group)
        received: list[aiosmtplib.SMTPResponse] = []
        for _ in group:
            reply = await replies.next(timeouts.command)
            if reply.code == 421:
                # Service closing (the fake, Infobip and Postfix close right after): no more
                # replies will come. Closed as aiosmtplib's execute_command does.
                smtp.close()
                raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
            received.append(reply)
        mail_reply, *rcpt_replies, start = received
        refused, error = _envelope_verdict(mail_reply, dict(zip(recipients, rcpt_replies,
                                                                strict=True)), start)
        if start.code == 354 and error is not None:
            if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
                replies.write(b".\r\n")
                await replies.next(timeouts.command)  # a refusal (no recipients): ignored
            else:
                smtp.close()
        if replies.pending and smtp.is_connected:
            # More than one reply per command: whatever comes next would be mispaired.
            smtp.close()
            if error is None:
                raise aiosmtplib.SMTPServerDisconnected(
                    "the upstream sent more than the replies to MAIL, RCPT and DATA")
    if error is not None:
        raise error
    return refused


def _envelope_verdict(mail: aiosmtplib.SMTPResponse, rcpts: dict[str, aiosmtplib.SMTPResponse],
                      start: aiosmtplib.SMTPResponse
                      ) -> tuple[dict[str, aiosmtplib.SMTPResponse], Exception | None]:
    """(refused recipients, the error the lockstep commands would have raised or None)."""
    if mail.code != 250:
        # The RCPT and DATA replies (503 need MAIL, typically) only follow from this one.
        return {}, aiosmtplib.SMTPResponseException(mail.code, mail.message)
    refused: dict[str, aiosmtplib.SMTPResponse] = {}
    errors: list[aiosmtplib.SMTPRecipientRefused] = []
    for name, reply in rcpts.items():
        if reply.code in (250, 251):
            continue
        if reply.code == 503:
            # Out of step whichever command it answers: never one recipient's verdict.
            return {}, aiosmtplib.SMTPResponseException(reply.code, reply.message)
        refused[name] = reply
        errors.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, name))
    if len(errors) == len(rcpts):
        # DATA's reply (503 no valid recipients, typically) only follows from these.
        return refused, aiosmtplib.SMTPRecipientsRefused(errors)
    if start.code != 354:
        return refused, aiosmtplib.SMTPDataError(start.code, start.message)
    return refused, None


async def _command(smtp: aiosmtplib.SMTP, words: list[bytes], timeouts: _Timeouts, *,
                   ok: tuple[int, ...], recipient: str | None = None) -> None:
    response = await smtp.execute_command(*words, timeout=timeouts.command)
    if response.code in ok:
        return
    if recipient is None or response.code == 503:
        # A 503 is out of step whichever command it answers: never one recipient's verdict.
        raise aiosmtplib.SMTPResponseException(response.code, response.message)
    raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)


async def _reset_or_drop(smtp: aiosmtplib.SMTP, timeouts: _Timeouts) -> None:
    """End a refused transaction; a session that does not confirm the RSET is not reused."""
    try:
        response = await smtp.execute_command(b"RSET", timeout=timeouts.command)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        response = None
    if response is None or response.code != 250:
        smtp.close()


async def _data(smtp: aiosmtplib.SMTP, data: OpenedData, timeouts: _Timeouts
                ) -> aiosmtplib.SMTPResponse:
    start = await smtp.execute_command(b"DATA", timeout=timeouts.command)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return await _message(smtp, data, timeouts)


async def _message(smtp: aiosmtplib.SMTP, data: OpenedData, timeouts: _Timeouts
                   ) -> aiosmtplib.SMTPResponse:
    """After the 354: the message, the final dot, the final reply."""
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the message data")
    # aiosmtplib drops what arrives while no reply is pending; the upload awaits (drain), so an
    # early reply (a 552 or 421 mid-upload) must be kept for read_response() below.
    protocol._response_pending = True
    async with asyncio.timeout(timeouts.command):
        await _upload(protocol, data)
    try:
        response = await protocol.read_response(timeout=timeouts.final)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        # From here on the upstream may have accepted the message: the caller must not treat
        # this as a plain connection failure (retrying at once duplicates mail).
        raise _NoFinalReply(str(exc) or type(exc).__name__) from exc
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _upload(protocol: SMTPProtocol, data: OpenedData) -> None:
    """The message dot-stuffed, then the final dot; a file in chunks, each drained first."""
    stuffer = DotStuffer()
    if isinstance(data, bytes):  # small: in memory already, one write as before
        protocol.write(bytes(stuffer.feed(data)) + stuffer.finish())
        return
    async for chunk in data.chunks():
        # aiosmtplib types it bytes; it hands it to transport.write, which takes a bytearray.
        protocol.write(cast(bytes, stuffer.feed(chunk)))
        # Backpressure: never more than the transport's high-water mark waits in memory.
        await protocol._drain_helper()
    protocol.write(stuffer.finish())


def _describe(exc: aiosmtplib.SMTPException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply(exc.code, exc.message)
    text = str(exc)
    if "starttls" in text.lower():
        return f"STARTTLS failed or not offered ({text}); refusing to send in clear"
    return text


def _classify(address: str, code: int, message: str, result: SendResult) -> None:
    reply = _reply(code, message)
    if 400 <= code < 500:
        result.temporary[address] = reply
    else:
        result.permanent[address] = reply


def _all_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> SendResult:
    result = SendResult()
    for refused in exc.recipients:
        _classify(refused.recipient, refused.code, refused.message, result)
    return result


def _whole_message(recipients: tuple[str, ...], code: int, message: str) -> SendResult:
    result = SendResult(reply=_reply(code, message))
    for address in recipients:
        _classify(address, code, message, result)
    return result


def _partial(recipients: tuple[str, ...], refused: dict[str, aiosmtplib.SMTPResponse],
             message: str) -> SendResult:
    reply = message if message[:3].isdigit() else f"250 {message}"
    result = SendResult(
        accepted=tuple(r for r in recipients if r not in refused),
        reply=reply,
        upstream_id=parse_message_id(message),
    )
    for address, response in refused.items():
        _classify(address, response.code, response.message, result)
    return result
