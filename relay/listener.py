"""The SMTP listener: aiosmtpd's protocol in the relay's own loop, with the relay's access policy.

Owns the client conversation only: who may relay (trusted networks, local AUTH), limits, replies.
An accepted message goes through the rules, into the spool (fsync) and only then gets its 250.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import itertools
import logging
import os
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session as SMTPSession

from relay import __version__
from relay.address import AddressError, parse_path
from relay.bodyfiles import PARTIAL_SUFFIX
from relay.config import Config, ListenerConfig
from relay.envelope import Envelope, MessageContext
from relay.errors import SpoolError
from relay.infobip.headers import report_defaults
from relay.logs import info_line
from relay.message import Arrival, MessageRefused, PreparedMessage, prepare_head
from relay.metrics import Metrics
from relay.outgoing import MessageData, SpooledBody
from relay.passwords import verify_password
from relay.rules import apply_rules
from relay.spool import FILE_BODY_THRESHOLD, QueuedMessage, Recipient, Spool
from relay.streaming import BodyFixer, DataDecoder, HeaderSplitter, Octets

log = logging.getLogger("relay.listener")

_LOG_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


def _sanitized_log_if_enabled(func: Callable[..., None], msg: Any, *args: Any,
                              **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, which masks AUTH lines, only for a line that will be logged.

    aiosmtpd 1.4.6 calls it twice for every command line, and it copies and regex-matches
    the line before the logger looks at its level: at the relay's default level, where
    "mail.log" logs nothing, that was 1 % of the event loop's time with small mail.
    """
    logger = getattr(func, "__self__", None)
    level = _LOG_METHOD_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and \
            not logger.isEnabledFor(level):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log
aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled  # read by SMTP._handle_client

_ENHANCED = re.compile(rb"^\d\.\d{1,3}\.\d{1,3}\b")
# RFC 3463 codes for the replies aiosmtpd writes without one.
_DEFAULT_ENHANCED = {
    b"221": b"2.0.0", b"235": b"2.7.0", b"250": b"2.0.0", b"252": b"2.5.0",
    b"421": b"4.3.0", b"451": b"4.3.0", b"452": b"4.3.1", b"454": b"4.7.0",
    b"500": b"5.5.2", b"501": b"5.5.4", b"502": b"5.5.1", b"503": b"5.5.1", b"504": b"5.5.4",
    b"530": b"5.7.0", b"535": b"5.7.8", b"538": b"5.7.11", b"550": b"5.7.1", b"552": b"5.3.4",
    b"553": b"5.1.3", b"554": b"5.3.0", b"555": b"5.5.4",
}
_DATA_CHUNK = 64 * 1024
# Large bodies: start writing them to disk every this many octets (see _BodyWriter.write).
_WRITEBACK_STEP = 2 * 1024 * 1024
# The header block stays in memory for the rules; a client cannot make that unbounded.
HEADER_LIMIT = 256 * 1024
_TOO_MUCH = "552 Error: Too much mail data"
_NO_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
_HEADER_TOO_LONG = "552 5.3.4 Message header block too long (limit 256 KiB)"
# RFC 5321 4.5.3.1.4 allows 512 octets a command line; the rest is room for ESMTP parameters
# and AUTH PLAIN's initial response. DATA does not go through this limit (see _read_data).
COMMAND_LINE_LIMIT = 2048
_NULL_SENDER = re.compile(r"\s*FROM:\s*<>", re.IGNORECASE)
# Outlook and vCenter send AUTH=<> without it being advertised: harmless, dropped. DSN
# parameters (RET, ENVID, NOTIFY, ORCPT) are refused with 555, since DSN is not advertised.
_IGNORED_PARAMS = frozenset({"AUTH"})
_AUTH_FAILURE_WINDOW = 600.0


class MessageSink(Protocol):
    """Where spooled messages go next (the delivery scheduler)."""

    def reserve(self, message_id: str) -> None: ...
    def release(self, message_id: str) -> None: ...
    def submit(self, message: QueuedMessage, data: MessageData | None) -> None: ...
    @property
    def upstream_smtputf8(self) -> bool | None:
        """Whether the upstream advertised SMTPUTF8 (None until it was reached)."""
    @property
    def upstream_max_size(self) -> int | None:
        """The SIZE the upstream advertised (None: not reached yet, or no limit)."""


@dataclass
class ListenerState:
    """State shared by every connection of every listener; `config` is swapped on reload."""

    config: Config
    spool: Spool
    sink: MessageSink
    metrics: Metrics
    accepting: bool = True
    connections: set[RelaySMTP] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)
    auth_failures: dict[str, tuple[int, float]] = field(default_factory=dict)
    tls_contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)
    storage_warned: float = -3600.0


_ID_SALT = secrets.randbits(16)
_ID_COUNTER = itertools.count(secrets.randbits(20))


def _writable(transport: asyncio.BaseTransport) -> asyncio.WriteTransport:
    # uvloop's transports do not subclass asyncio's ABCs, so no isinstance() check here.
    return cast(asyncio.WriteTransport, transport)


def new_queue_id() -> str:
    """Sortable and unique: microseconds since the epoch, a per-process salt and a counter.

    No system randomness per message: os.urandom showed up at ~4 % of the CPU time.
    """
    return f"{time.time_ns() // 1000:013X}{_ID_SALT:04X}{next(_ID_COUNTER) & 0xFFFFF:05X}"


class _CommandLineReader:
    """The session's StreamReader, except that a command line over the limit ends the session.

    aiosmtpd would read an over-long line to its end before answering 500; a client that never
    ends it keeps the connection busy for as long as it likes. This answers at once and closes.
    """

    __slots__ = ("_inner", "_on_overrun")

    def __init__(self, inner: asyncio.StreamReader, on_overrun: Callable[[], None]) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_on_overrun", on_overrun)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        try:
            line: bytes = await self._inner.readuntil(separator)
        except asyncio.LimitOverrunError:
            self._on_overrun()
            raise ConnectionResetError("command line too long") from None
        return line

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # aiosmtpd swaps the transport under the reader after STARTTLS.
        setattr(self._inner, name, value)


def _unwrapped(reader: asyncio.StreamReader) -> asyncio.StreamReader:
    """The StreamReader under the command-line bound (DATA has a bound of its own)."""
    if isinstance(reader, _CommandLineReader):
        inner: asyncio.StreamReader = reader._inner
        return inner
    return reader


@dataclass(slots=True)
class Received:
    """One message's DATA as read: the raw header part in memory, the fixed body after it."""

    head: bytes
    last: bool  # no blank line: the header part is the whole message
    body: bytes  # the fixed body when it stayed small, else b""
    body_file: Path | None  # the fixed body, when it went to disk
    body_size: int  # octets in body_file
    size: int  # octets of (unstuffed) data as the client sent them
    ascii: bool


class _BodyWriter:
    """The fixed body: in memory while small, then appended to ``bodies/<id>.partial``.

    Writes go to the page cache and do not block for long; the fsync comes later, in the
    spool's writer thread, before the 250.
    """

    __slots__ = ("_fd", "_flushed", "ascii", "memory", "path", "written")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.memory = bytearray()
        self._fd: int | None = None
        self.ascii = True
        self.written = 0  # octets in the file
        self._flushed = 0  # octets whose writeback has been started

    def write(self, data: Octets) -> None:
        if not data:
            return
        self.ascii = self.ascii and data.isascii()
        if self._fd is None:
            if len(self.memory) + len(data) <= FILE_BODY_THRESHOLD:
                self.memory += data
                return
            self._fd = self._create()
            # Both go to the file as they are: joining them first copied up to 256 KiB twice.
            held, self.memory = self.memory, bytearray()
            self._append(held)
        self._append(data)

    def _create(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # no bodies/ yet (the first body file makes it), or removed
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            return os.open(self.path, flags, 0o600)

    def _append(self, data: Octets) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.written += len(data)
        if self.written - self._flushed >= _WRITEBACK_STEP:
            # Start the disk write of what has arrived (Linux: FADV_DONTNEED begins writeback
            # without waiting for it), so that the fsync before the 250 finds little left.
            os.posix_fadvise(self._fd, self._flushed, self.written - self._flushed,
                             os.POSIX_FADV_DONTNEED)
            self._flushed = self.written

    def close(self) -> Path | None:
        """The file holding the body, or None when it stayed in memory."""
        if self._fd is None:
            return None
        os.close(self._fd)
        self._fd = None
        return self.path

    def discard(self) -> None:
        self.memory = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def _read_buffered(reader: asyncio.StreamReader) -> bytearray:
    """All that the reader holds (waiting for some if none): its buffer itself, swapped for an
    empty one. StreamReader.read() would copy it out and then delete it from the buffer.

    ``_buffer``, ``_wait_for_data`` and ``_maybe_resume_transport`` are asyncio's own (the
    same from 3.8 to 3.13, and what read() itself uses); every DATA test goes through here,
    so a Python that renamed them fails loudly rather than quietly.
    """
    failure = reader.exception()
    if failure is not None:
        raise failure
    if not reader._buffer and not reader.at_eof():  # type: ignore[attr-defined]
        await reader._wait_for_data("read")  # type: ignore[attr-defined]
    chunk: bytearray = reader._buffer  # type: ignore[attr-defined]
    reader._buffer = bytearray()  # type: ignore[attr-defined]
    reader._maybe_resume_transport()  # type: ignore[attr-defined]
    return chunk


def _write_body(body: _BodyWriter, data: Octets) -> str | None:
    """None, or the refusal when the body cannot be written (a full disk): the rest drains."""
    try:
        body.write(data)
    except OSError as exc:
        log.error("cannot write a message body to %s: %s", body.path, exc)
        return _NO_STORAGE
    return None


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the relay's limits, enhanced status codes and strict addresses."""

    def __init__(self, handler: RelayHandler, state: ListenerState, listener: ListenerConfig,
                 *, origin: str | None = None, counted: bool = True, **kwargs: Any) -> None:
        # Bounds every command line (and so the memory a client can take before AUTH); DATA is
        # read in chunks by _read_data and is bounded by the message size instead.
        self.line_length_limit = COMMAND_LINE_LIMIT
        super().__init__(handler, **kwargs)
        self.state = state
        self.listener = _current_listener(state.config, listener)
        self.client_ip = ""
        # Behind a proxy: the client address its PROXY header carried (else the socket's peer).
        self._origin = origin
        # False for a proxy's LOCAL (health-check) connection: no client, so no per-client
        # limit and no client metrics.
        self.counted = counted
        self._refused = False
        self._in_ehlo = False
        # Set while MAIL FROM:<> is being rewritten to the configured null-sender address.
        self.null_sender_rewritten = False
        self.address_error: AddressError | None = None
        self.queue_id = ""
        self.received: Received | None = None  # the DATA being handled
        self._deadline = 0.0  # loop time at which the idle (or DATA) timeout ends the session

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, moved by a deadline instead of a new timer per command.

        aiosmtpd cancelled its timer and started another after every command line (a libuv
        timer made and torn down each time). Here a command only moves the deadline; the one
        timer, when it fires before the deadline, waits for the rest. A deadline that comes
        sooner than the timer (the command timeout after DATA's longer one) re-arms it.
        """
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
        else:
            self._timeout_cb()

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        bounded = cast(asyncio.StreamReader, _CommandLineReader(reader, self._line_too_long))
        super()._cb_client_connected(bounded, writer)

    def _line_too_long(self) -> None:
        self.state.metrics.rejected.labels(listener=self.listener.name,
                                           reason="line_too_long").inc()
        log.warning("client %s sent a command line over %d octets; closing", self.client_ip,
                    COMMAND_LINE_LIMIT)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):  # a TLS transport may be half torn down
                _writable(transport).write(b"500 5.5.2 Line too long, closing connection\r\n")
            transport.close()

    # -- connection bookkeeping and limits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client_ip or self._refused:
            # STARTTLS calls connection_made again on the same protocol object.
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = self._origin or (str(peer[0]) if peer else "")
        refusal = self._admission_refusal()
        if refusal is not None:
            self._refused = True
            self.state.metrics.rejected.labels(listener=self.listener.name, reason=refusal).inc()
            _writable(transport).write(b"421 4.7.0 " + _REFUSALS[refusal] + b"\r\n")
            transport.close()
            return
        self.state.connections.add(self)
        if self.counted:
            self.state.per_client[self.client_ip] = self.state.per_client.get(self.client_ip,
                                                                              0) + 1
            self.state.metrics.connections.labels(listener=self.listener.name).inc()
            self.state.metrics.connections_open.labels(listener=self.listener.name).inc()
        super().connection_made(transport)

    def _admission_refusal(self) -> str | None:
        access = self.state.config.access
        if not self.state.accepting:
            return "shutting_down"
        if len(self.state.connections) >= access.max_connections:
            return "too_many_connections"
        if self.counted and \
                self.state.per_client.get(self.client_ip, 0) >= access.max_connections_per_client:
            return "too_many_connections_from_client"
        return None

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self in self.state.connections:
            self.state.connections.discard(self)
            if self.counted:
                self._uncount()
        super().connection_lost(error)

    def _uncount(self) -> None:
        left = self.state.per_client.get(self.client_ip, 1) - 1
        if left > 0:
            self.state.per_client[self.client_ip] = left
        else:
            self.state.per_client.pop(self.client_ip, None)
        self.state.metrics.connections_open.labels(listener=self.listener.name).dec()

    def _timeout_cb(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):  # a TLS transport may be half torn down
                _writable(transport).write(b"421 4.4.2 Timeout, closing connection\r\n")
        if self.transport is not None:
            super()._timeout_cb()  # type: ignore[no-untyped-call]

    @property
    def is_tls(self) -> bool:
        return self.listener.tls == "implicit" or self._tls_protocol is not None

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope is not None and self.envelope.mail_from)

    def close_for_shutdown(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):  # a TLS transport may be half torn down
                _writable(transport).write(b"421 4.3.2 Service shutting down\r\n")
            transport.close()

    # -- replies

    async def push(self, status: str | bytes) -> None:
        if status == _MALFORMED_ADDRESS and self.address_error is not None:
            status = self._address_reply(self.address_error)
        # Replies may echo a client's address, undecodable bytes included (surrogateescape).
        response = status.encode("utf-8", "surrogateescape") if isinstance(status, str) \
            else status
        response = self._with_enhanced_code(response)
        if response[:1] in (b"4", b"5") and response[3:4] == b" ":
            self.state.metrics.rejected.labels(listener=self.listener.name,
                                               reason=response[:3].decode()).inc()
        await super().push(response)

    def _with_enhanced_code(self, response: bytes) -> bytes:
        # RFC 2034: only after EHLO, never on the EHLO reply itself nor on 220/334/354.
        if self._in_ehlo or self.session is None or not self.session.extended_smtp:
            return response
        code, sep, text = response[:3], response[3:4], response[4:]
        enhanced = _DEFAULT_ENHANCED.get(code)
        if sep not in (b" ", b"") or enhanced is None or _ENHANCED.match(text):
            return response
        return code + b" " + enhanced + (b" " + text if text else b"")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in bulk up to CRLF.CRLF instead of aiosmtpd's loop over every line.

        Same semantics as aiosmtpd 1.4.6: only CRLF.CRLF ends the data (no smuggling with bare
        LF), leading dots are unstuffed, an oversize message is read to its end and refused.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # aiosmtpd does not reset its idle timer while reading DATA: give the upload its own.
        self._reset_timeout(self.state.config.access.data_timeout)
        self.queue_id = new_queue_id()
        try:
            received = await self._read_data(self.queue_id)
        finally:
            if self.transport is not None:  # not after connection_lost cancelled the timer
                self._reset_timeout()
        if isinstance(received, str):
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(received)
            return
        self.received = received
        status: Any = None  # the hook's reply, once it gave one
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.received = None
            # Not spooled (a refusal or an error): the file goes. Spooled, it has its final
            # name already, and only a 250 says so.
            if received.body_file is not None and not _queued_reply(status):
                with contextlib.suppress(FileNotFoundError):
                    received.body_file.unlink()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, queue_id: str) -> Received | str:
        """The message read to CRLF.CRLF and streamed, or the refusal (then drained).

        Only CRLF.CRLF ends the data (no smuggling with bare LF) and leading dots are
        unstuffed, as in aiosmtpd 1.4.6; the body goes to disk as it arrives (relay.streaming).
        """
        body = _BodyWriter(self.state.spool.db.bodies / f"{queue_id}{PARTIAL_SUFFIX}")
        try:
            return await self._stream_data(body)
        except BaseException:
            body.discard()  # a disconnect mid-DATA leaves no file
            raise

    async def _stream_data(self, body: _BodyWriter) -> Received | str:
        reader = _unwrapped(self._reader)  # every chunk's reads: no __getattr__ on the way
        limit = self.data_size_limit or 0
        decoder, splitter, fixer = DataDecoder(), HeaderSplitter(HEADER_LIMIT), BodyFixer()
        head: bytes | None = None
        refusal: str | None = None
        size = 0
        # The reader's limit (the command-line bound) is also its flow-control mark: at 2 KiB
        # the transport paused and resumed every few KiB of DATA. A chunk's worth while the
        # data streams keeps memory bounded and the reads large.
        reader._limit = _DATA_CHUNK  # type: ignore[attr-defined]
        try:
            while not decoder.ended:
                chunk = await _read_buffered(reader)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                data = decoder.feed(chunk)
                if refusal is not None:
                    continue  # drained to the end, nothing kept
                size += len(data)
                if limit and decoder.size > limit:
                    refusal = _TOO_MUCH
                elif head is None:
                    split = splitter.feed(data)
                    if split is not None:
                        head, data = split
                        refusal = _write_body(body, fixer.feed(data))
                    elif splitter.overflowed:
                        refusal = _HEADER_TOO_LONG
                else:
                    refusal = _write_body(body, fixer.feed(data))
                if refusal is not None:
                    body.discard()
                    splitter = HeaderSplitter(HEADER_LIMIT)  # lets the header part go
        finally:
            reader._limit = COMMAND_LINE_LIMIT  # type: ignore[attr-defined]
        if decoder.leftover:  # pipelined commands after the dot go back to the command loop
            reader._buffer[:0] = decoder.leftover  # type: ignore[attr-defined]
        if refusal is not None:
            return refusal
        last = head is None
        if head is None:
            head = splitter.finish()
        refusal = _write_body(body, fixer.finish())
        if refusal is not None:
            body.discard()
            return refusal
        memory = bytes(body.memory)
        return Received(head, last, memory, body.close(), body.written, size, body.ascii)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd answers a null sender with a 501 syntax error; Infobip needs a sender, so
        # <> is either rewritten to the configured address or refused with a clear reason.
        self.null_sender_rewritten = False
        if arg and self.session is not None and self.session.host_name and \
                (null := _NULL_SENDER.match(arg)):
            access = self.state.config.access
            if access.null_sender != "rewrite" or not access.null_sender_address:
                await self.push("550 5.7.1 Null sender <> not accepted: Infobip needs a sender "
                                "address (set access.null_sender_address)")
                return
            self.null_sender_rewritten = True
            arg = f"FROM:<{access.null_sender_address}>{arg[null.end():]}"
        await super().smtp_MAIL(arg)

    @syntax("AUTH <mechanism>", when="auth_offered")
    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)

    @property
    def auth_offered(self) -> bool:
        """Whether this session may use AUTH (HELP lists it only then)."""
        handler = cast(RelayHandler, self.event_handler)
        return handler.auth_offered(self)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The exact mailbox text and the parameters, or (None, None) for a refused address.

        aiosmtpd's own parser accepts a CR inside a quoted local part and normalises what it
        parses; the relay must forward exactly the bytes its policies checked. Why an address
        was refused reaches the client through push() (address_error).
        """
        self.address_error = None
        if not arg:
            return "", ""
        try:
            return parse_path(arg)
        except AddressError as error:
            self.address_error = error
            # aiosmtpd answers (None, None) with "553 5.1.3 malformed address"; push() puts
            # the precise reason in its place.
            return None, None

    def _address_reply(self, error: AddressError) -> str:
        what = "Recipient" if self.envelope is not None and self.envelope.mail_from else "Sender"
        return error.reply(what)

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        names = [str(param).partition("=")[0] for param in params]
        if len(set(names)) != len(names):
            return None  # a repeated parameter (BODY=7BIT BODY=8BITMIME) is a syntax error
        result: dict[str, str | bool] | None = super()._getparams(params)
        if result is not None:
            for name in _IGNORED_PARAMS:
                result.pop(name, None)
        return result


_MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"

_REFUSALS = {
    "shutting_down": b"Service shutting down, try again later",
    "too_many_connections": b"Too many connections, try again later",
    "too_many_connections_from_client": b"Too many connections from your address",
}


class RelayHandler:
    """aiosmtpd handler hooks for one listener."""

    def __init__(self, listener: ListenerConfig, state: ListenerState) -> None:
        self._initial = listener
        self.state = state

    @property
    def listener(self) -> ListenerConfig:
        """This listener's settings from the current config (auth and policies reload)."""
        return _current_listener(self.state.config, self._initial)

    # -- EHLO and AUTH

    async def handle_EHLO(self, server: RelaySMTP, session: SMTPSession,
                          envelope: SMTPEnvelope, hostname: str, responses: list[str]
                          ) -> list[str]:
        session.host_name = hostname
        *extensions, last = responses
        lines = [line for line in extensions if not line.startswith("250-AUTH")]
        if self.auth_offered(server):
            lines.append("250-AUTH LOGIN PLAIN")
        lines += ["250-ENHANCEDSTATUSCODES", "250-PIPELINING", last]
        return lines

    def auth_offered(self, server: RelaySMTP) -> bool:
        if self.listener.auth == "none":
            return False
        return server.is_tls or self.state.config.access.is_trusted(server.client_ip)

    async def handle_AUTH(self, server: RelaySMTP, session: SMTPSession,
                          envelope: SMTPEnvelope, args: list[str]) -> Any:
        if self.listener.auth == "none":
            return "502 5.5.1 AUTH not available on this listener"
        if server.in_transaction:
            return "503 5.5.1 AUTH not permitted during a mail transaction"  # RFC 4954 4
        if not self.auth_offered(server):
            return "538 5.7.11 Encryption required for requested authentication mechanism"
        if args and args[0].upper() not in ("PLAIN", "LOGIN"):
            return "504 5.5.4 Unrecognized authentication type"
        return MISSING

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):  # ValueError: non-ASCII text
                return AuthResult(success=False, handled=False,
                                  message="501 5.5.2 Can't decode base64")
        parts = bytes(blob).split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 Malformed AUTH PLAIN response")
        return await self._check_credentials(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:
            try:
                login = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):  # ValueError: non-ASCII text
                return AuthResult(success=False, handled=False,
                                  message="501 5.5.2 Can't decode base64")
        else:
            answer = await server.challenge_auth("Username:")
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            login = bytes(answer)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(server, login, bytes(password))

    async def _check_credentials(self, server: RelaySMTP, login: bytes, password: bytes
                                 ) -> AuthResult:
        name = login.decode("utf-8", "replace")
        user = self.state.config.user(name)
        # scrypt takes tens of milliseconds: off the event loop, and run for unknown users too
        # so that timing does not reveal which names exist.
        stored = user.password_hash.reveal() if user else _DUMMY_HASH
        valid = await asyncio.to_thread(verify_password, password.decode("utf-8", "replace"),
                                        stored)
        if valid and user is not None:
            self.state.auth_failures.pop(server.client_ip, None)
            log.info("client %s authenticated as %s", server.client_ip, name)
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        await self._slow_down_failure(server.client_ip)
        self.state.metrics.auth_failures.labels(listener=self.listener.name).inc()
        log.warning("failed AUTH from %s for user %r", server.client_ip, name[:64])
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Authentication credentials invalid")

    async def _slow_down_failure(self, client_ip: str) -> None:
        """Each repeated failure from one address waits longer before its reply (up to 10 s)."""
        now = time.monotonic()
        count, first = self.state.auth_failures.get(client_ip, (0, now))
        if now - first > _AUTH_FAILURE_WINDOW:
            count, first = 0, now
        count += 1
        self.state.auth_failures[client_ip] = (count, first)
        await asyncio.sleep(min(10.0, 0.25 * 2 ** (count - 1)))

    # -- the transaction

    async def handle_MAIL(self, server: RelaySMTP, session: SMTPSession, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        refusal = self._international_refusal(address, envelope.smtp_utf8, "Sender")
        if refusal:
            return refusal
        if not self.state.accepting:
            asyncio.get_running_loop().call_soon(server.close_for_shutdown)
            return "421 4.3.2 Service shutting down, try again later"
        refusal = self._relay_refusal(server, session)
        if refusal:
            return refusal
        if server.null_sender_rewritten:
            # The client chose no address; the operator's own null_sender_address is sent.
            log.info("client %s: null sender <> rewritten to <%s>", server.client_ip, address)
        elif not self._sender_allowed(session, address):
            return f"553 5.7.1 Sender address <{address}> not allowed for this client"
        refusal = self._storage_refusal(mail_options)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 Sender <{address}> OK"

    def _storage_refusal(self, mail_options: list[str]) -> str | None:
        """452 while the spool's disk is short of queue.min_free_space (+ the declared SIZE).

        Refusing new mail early keeps room for recording what happens to mail already taken;
        a full disk would otherwise leave delivered messages unrecorded (and due again).
        """
        declared = next((int(option[5:]) for option in mail_options
                         if option[:5].upper() == "SIZE=" and option[5:].isdigit()), 0)
        needed = self.state.config.queue.min_free_space + declared
        try:
            free = self.state.spool.free_space(needed)
        except OSError:
            return None  # cannot tell; a failing write still answers 452
        if free >= needed:
            return None
        now = time.monotonic()
        if now - self.state.storage_warned > 60:
            self.state.storage_warned = now
            log.warning("spool has %d bytes free, below queue.min_free_space (%d): refusing new "
                        "mail with 452 until space is freed", free,
                        self.state.config.queue.min_free_space)
        return "452 4.3.1 Insufficient system storage, try again later"

    def _relay_refusal(self, server: RelaySMTP, session: SMTPSession) -> str | None:
        if session.authenticated:
            return None
        if self.listener.auth == "required":
            return "530 5.7.0 Authentication required"
        if self.state.config.access.is_trusted(server.client_ip):
            return None
        return "530 5.7.0 Authentication required"

    def _sender_allowed(self, session: SMTPSession, address: str) -> bool:
        patterns = list(self.listener.allowed_senders)
        if session.authenticated and session.login_data is not None:
            user = self.state.config.user(session.login_data.decode("utf-8", "replace"))
            if user is not None and user.allowed_senders:
                patterns = list(user.allowed_senders)
        if not patterns:
            return True
        lowered = address.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)

    async def handle_RCPT(self, server: RelaySMTP, session: SMTPSession, envelope: SMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        refusal = self._international_refusal(address, envelope.smtp_utf8, "Recipient")
        if refusal:
            return refusal
        if len(envelope.rcpt_tos) >= self.state.config.access.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return f"250 2.1.5 Recipient <{address}> OK"

    def _international_refusal(self, address: str, smtp_utf8: bool, what: str) -> str | None:
        """Refuse now a non-ASCII address that the upstream could not be given later."""
        if address.isascii():
            return None
        if not smtp_utf8:
            return f"553 5.6.7 {what} address is not ASCII: MAIL FROM needs the SMTPUTF8 parameter"
        supported = self.state.sink.upstream_smtputf8
        if supported is None:
            return f"451 4.6.7 {what} address is not ASCII and the upstream's SMTPUTF8 support " \
                   "is not known yet; try again later"
        if not supported:
            return f"553 5.6.7 {what} address is not ASCII and the upstream does not support " \
                   "SMTPUTF8"
        return None

    async def handle_DATA(self, server: RelaySMTP, session: SMTPSession,
                          envelope: SMTPEnvelope) -> str:
        metrics = self.state.metrics
        received = server.received
        assert received is not None
        metrics.received.labels(listener=self.listener.name).inc()
        metrics.bytes_in.inc(received.size)
        queue_id = server.queue_id
        ctx = self._context(server, session, envelope, queue_id, received.size)
        try:
            head = prepare_head(received.head, ctx, self._arrival(server, session, envelope),
                                last=received.last)
        except MessageRefused as refusal:
            return refusal.reply
        # The rules edit the header block only; a streamed body stays in its file, stored
        # beside the final header block (never joined to it).
        outcome = apply_rules(self.state.config.rules, ctx, head,
                              client_headers=self.listener.client_headers)
        self._count_rules(outcome.matched, outcome.fixed, outcome.dropped, outcome.warnings,
                          queue_id)
        # After the rules, so that a rule or the application may set them itself; only when
        # the relay takes reports in (otherwise nothing would read them).
        reports = self.state.config.reports
        head = report_defaults(outcome.data, queue_id, reports.callback_data,
                               reports.notify_url()) if reports.enabled else outcome.data
        prepared = PreparedMessage(head, received.body)
        data = prepared.data
        options = _forwarded_options(envelope, received.ascii and data.isascii(),
                                     self.state.sink.upstream_smtputf8)
        original_sender = None
        if outcome.mail_from is not None and outcome.mail_from != ctx.mail_from:
            # A rule's rewrite: the new sender goes upstream, the client's is kept on record.
            original_sender, ctx = ctx.mail_from, replace(ctx, mail_from=outcome.mail_from)
        message = Envelope(ctx, data, options, received.body_file, received.body_size,
                           route=outcome.route, original_mail_from=original_sender)
        size = message.size
        upstream_limit = self.state.sink.upstream_max_size
        if upstream_limit is not None and size > upstream_limit:
            # The relay's own additions took it over what the upstream accepts: refused now
            # rather than bounced later.
            return "552 5.3.4 Message size exceeds the upstream's limit once prepared"
        priority = prepared.priority
        sink = self.state.sink
        sink.reserve(queue_id)
        try:
            await self.state.spool.put(message, priority)
        except SpoolError as exc:
            sink.release(queue_id)
            log.error("cannot spool a message from %s: %s", ctx.client_ip, exc)
            return "452 4.3.1 Insufficient system storage, try again later"
        except BaseException:
            sink.release(queue_id)
            raise
        metrics.accepted.labels(listener=self.listener.name).inc()
        # A body on disk goes by its file: it is never held whole in memory.
        sink.submit(_queued(message, priority, size), data if received.body_file is None else
                    SpooledBody(data, self.state.spool.body_path(queue_id), size))
        if log.isEnabledFor(logging.INFO):  # spares building the fields on the hot path
            info_line(log, "%s queued from %s: <%s> to %d recipient(s), %d bytes", queue_id,
                      ctx.client_ip, ctx.mail_from, len(ctx.rcpt_tos), size,
                      fields={"queue_id": queue_id, "client": ctx.client_ip,
                              "sender": ctx.mail_from, "recipients": len(ctx.rcpt_tos),
                              "size": size, "user": ctx.auth_user, "listener": ctx.listener})
        if original_sender is not None:
            log.info("%s envelope sender <%s> rewritten to <%s> by the rules", queue_id,
                     original_sender, ctx.mail_from, extra={"queue_id": queue_id})
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _context(self, server: RelaySMTP, session: SMTPSession, envelope: SMTPEnvelope,
                 queue_id: str, size: int) -> MessageContext:
        user = session.login_data.decode("utf-8", "replace") if session.authenticated and \
            session.login_data is not None else None
        return MessageContext(queue_id=queue_id, mail_from=envelope.mail_from or "",
                              rcpt_tos=tuple(envelope.rcpt_tos), client_ip=server.client_ip,
                              auth_user=user, listener=self.listener.name, size=size)

    def _arrival(self, server: RelaySMTP, session: SMTPSession, envelope: SMTPEnvelope
                 ) -> Arrival:
        return Arrival(hostname=self.state.config.hostname, helo=session.host_name,
                       extended=session.extended_smtp, utf8=envelope.smtp_utf8,
                       tls=server.is_tls)

    def _count_rules(self, matched: tuple[str, ...], fixed: int, dropped: int,
                     warnings: tuple[str, ...], queue_id: str) -> None:
        metrics = self.state.metrics
        for name in matched:
            metrics.rule_matches.labels(rule=name).inc()
        if fixed:
            metrics.client_headers.labels(action="fixed").inc(fixed)
        if dropped:
            metrics.client_headers.labels(action="dropped").inc(dropped)
        for warning in warnings:
            log.warning("%s: %s", queue_id, warning, extra={"queue_id": queue_id})

    async def handle_exception(self, error: Exception) -> str:
        log.exception("error in an SMTP session: %s", type(error).__name__)
        return "451 4.3.0 Internal error, try again later"


# Verified for unknown user names so that a failure takes as long as for a known one.
_DUMMY_HASH = "scrypt$16384$8$1$" + "A" * 22 + "==$" + "A" * 43 + "="


def _forwarded_options(envelope: SMTPEnvelope, ascii_data: bool, upstream_smtputf8: bool | None
                       ) -> tuple[str, ...]:
    options = []
    if any(option.upper() == "BODY=8BITMIME" for option in envelope.mail_options) or \
            not ascii_data:
        options.append("BODY=8BITMIME")
    # Never to an upstream that did not advertise it (Infobip does not): the addresses are
    # ASCII then (non-ASCII ones were refused at MAIL/RCPT), and 8-bit text goes as 8BITMIME.
    if envelope.smtp_utf8 and upstream_smtputf8:
        options.append("SMTPUTF8")
    return tuple(options)


def _queued_reply(status: object) -> bool:
    return isinstance(status, str) and status.startswith("250 ")


def _queued(envelope: Envelope, priority: int, size: int) -> QueuedMessage:
    ctx = envelope.context
    now = time.time()
    return QueuedMessage(
        id=ctx.queue_id, state="queued", priority=priority, created=now, updated=now,
        next_attempt=now, attempts=0, mail_from=ctx.mail_from,
        recipients=tuple(Recipient(address) for address in ctx.rcpt_tos),
        mail_options=envelope.mail_options, size=size, client=ctx.client_ip,
        auth_user=ctx.auth_user, listener=ctx.listener, last_reply=None, upstream_id=None,
        route=envelope.route, original_mail_from=envelope.original_mail_from,
    )


def _current_listener(config: Config, listener: ListenerConfig) -> ListenerConfig:
    for candidate in config.listeners:
        if candidate.name == listener.name:
            return candidate
    return listener


def size_limit(configured: int, upstream: int | None) -> int:
    """The listener's limit (EHLO SIZE, MAIL SIZE=, DATA): never above what the upstream takes.

    The relay adds trace fields and may lengthen lines, so a message near the upstream's limit
    is also checked once prepared (handle_DATA); this keeps the advertised figure honest.
    """
    if upstream is None or (configured and configured <= upstream):
        return configured
    return upstream


ProtocolFactory = Callable[[], RelaySMTP]
# (the client address a PROXY header carried, whether it is a client) -> the protocol.
SessionFactory = Callable[[str | None, bool], RelaySMTP]


def protocol_factory(listener: ListenerConfig, state: ListenerState) -> ProtocolFactory:
    """Build the per-connection protocol factory for ``loop.create_server``."""
    new = session_factory(listener, state)
    return lambda: new(None, True)


def session_factory(listener: ListenerConfig, state: ListenerState) -> SessionFactory:
    """The factory with the client's address and kind given (behind a proxy: relay.proxyserver)."""
    handler = RelayHandler(listener, state)

    def factory(origin: str | None, counted: bool) -> RelaySMTP:
        config = state.config
        starttls = state.tls_contexts.get(listener.name) if listener.tls == "starttls" else None
        return RelaySMTP(
            handler, state, listener, origin=origin, counted=counted,
            data_size_limit=size_limit(config.access.max_message_size,
                                       state.sink.upstream_max_size),
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident=f"infobip-relay {__version__} ESMTP",
            tls_context=starttls,
            require_starttls=False,
            timeout=config.access.command_timeout,
            auth_required=False,
            # aiosmtpd cannot see an implicit-TLS socket as TLS; the handler enforces the rule.
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )

    return factory
