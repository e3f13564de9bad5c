"""One authenticated, TLS-only SMTP connection to the Infobip endpoint (aiosmtplib).

It turns every reply and transport failure into a `SendResult` or one of two exceptions, so the
delivery module decides on outcomes without knowing SMTP or aiosmtplib.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib

from relay.config import UpstreamConfig
from relay.errors import RelayError

log = logging.getLogger("relay.upstream")

_QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)>?", re.IGNORECASE)
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


@dataclass(frozen=True, slots=True)
class SendResult:
    """Per-recipient result of one transaction. Replies are ``"250 2.6.0 Message queued as X"``."""

    accepted: tuple[str, ...] = ()
    temporary: dict[str, str] = field(default_factory=dict)
    permanent: dict[str, str] = field(default_factory=dict)
    reply: str = ""
    upstream_id: str | None = None


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def parse_upstream_id(message: str) -> str | None:
    match = _QUEUED_AS.search(message)
    return match.group(1) if match else None


class UpstreamConnection:
    """A lazily connected upstream session, reused for many messages."""

    def __init__(self, config: UpstreamConfig, local_hostname: str,
                 ssl_context: ssl.SSLContext) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.ssl_context = ssl_context
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self.transactions = 0

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: bytes,
                   mail_options: tuple[str, ...] = ()) -> SendResult:
        """Forward one message; UpstreamUnavailable / UpstreamAuthError are about the connection."""
        smtp = await self._ready_connection()
        timeout = max(self.config.timeout, len(data) / _UPLOAD_RATE)
        try:
            refused, message = await _transaction(smtp, mail_from, recipients, data,
                                                  mail_options=mail_options,
                                                  command_timeout=timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return _all_refused(exc)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                await self.close()
            return _whole_message(recipients, exc.code, exc.message)
        except aiosmtplib.SMTPNotSupported as exc:
            return _whole_message(recipients, 554, f"5.6.7 upstream: {exc}")
        except ValueError as exc:
            # aiosmtplib refuses addresses with control characters before sending anything.
            return _whole_message(recipients, 553, f"5.1.3 invalid address: {exc}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise UpstreamUnavailable(f"connection lost during the transaction: {exc}") from exc
        finally:
            self._last_used = time.monotonic()
        self.transactions += 1
        return _partial(recipients, refused, message)

    async def probe(self) -> None:
        """Connect and authenticate (readiness, start-up check); raises like `send`."""
        await self._ready_connection()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()

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


async def _transaction(smtp: aiosmtplib.SMTP, mail_from: str, recipients: tuple[str, ...],
                       data: bytes, *, mail_options: tuple[str, ...], command_timeout: float
                       ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """MAIL, RCPT..., DATA like aiosmtplib's sendmail, minus its per-message regex passes.

    The spool holds CRLF-normalised bytes already; sendmail would normalise them twice more
    and dot-stuff with a regex, which dominated the cost of large messages.
    """
    timeout = command_timeout
    options = list(mail_options)
    if smtp.supports_extension("size"):
        options.insert(0, f"SIZE={len(data)}")
    encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
    try:
        await smtp.mail(mail_from, options=options, encoding=encoding, timeout=timeout)
        refused: dict[str, aiosmtplib.SMTPResponse] = {}
        errors: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient, encoding=encoding, timeout=timeout)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[recipient] = aiosmtplib.SMTPResponse(exc.code, exc.message)
                errors.append(exc)
        if len(errors) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(errors)
        response = await _data(smtp, data, command_timeout=timeout)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.rset(timeout=timeout)
        raise
    return refused, response.message


async def _data(smtp: aiosmtplib.SMTP, data: bytes, *, command_timeout: float
                ) -> aiosmtplib.SMTPResponse:
    timeout = command_timeout
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the message data")
    # Nothing is awaited between the write and read_response(), so the reply cannot arrive
    # before aiosmtplib's protocol expects one.
    protocol.write(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    response = await protocol.read_response(timeout=timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


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
        upstream_id=parse_upstream_id(message),
    )
    for address, response in refused.items():
        _classify(address, response.code, response.message, result)
    return result
