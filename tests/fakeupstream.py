"""A fake Infobip SMTP endpoint for tests.

Runs aiosmtpd on 127.0.0.1 in a background thread with its own event loop, answers like Infobip's
SMTP API (EHLO lines, enhanced status codes, ``Message queued as <id>``), records every accepted
message and lets the test thread inject failures, drops and outages at runtime.

Strict about command synchronization like Exim: without PIPELINING advertised
(``pipelining=False``) a command sent before the previous reply was written gets ``554 SMTP
synchronization error`` and the connection closes; with it, MAIL, RCPT and RSET may be pipelined
but EHLO, DATA, AUTH, STARTTLS, NOOP, QUIT... must end a group (RFC 2920 3.1). Each transaction
is recorded in ``transactions`` with whether MAIL, the RCPTs and DATA arrived in one read.

Usage::

    with FakeUpstream(tls="starttls") as fake:
        ...  # point the relay at fake.host / fake.port with ca_file=fake.ca_pem_path
        [msg] = fake.wait_for(1)
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import gc
import itertools
import logging
import secrets
import ssl
import tempfile
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, get_args

import trustme
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

__all__ = [
    "API_USERNAME",
    "DEFAULT_API_KEY",
    "INFOBIP_HOSTNAME",
    "INFOBIP_SIZE_LIMIT",
    "DelayStage",
    "DropStage",
    "FailStage",
    "FakeUpstream",
    "FakeUpstreamFactory",
    "Received",
    "SessionRecord",
    "TlsMode",
    "TransactionRecord",
]

TlsMode = Literal["starttls", "implicit", "none"]
FailStage = Literal["connect", "auth", "mail", "rcpt", "data_start", "data"]
DropStage = Literal["connect", "mail", "rcpt", "data"]
DelayStage = Literal["auth", "mail", "rcpt", "data_start", "data"]

INFOBIP_HOSTNAME: Final = "smtp.email-messaging.com"
INFOBIP_SIZE_LIMIT: Final = 20_971_520
API_USERNAME: Final = "App"
DEFAULT_API_KEY: Final = "test-api-key"

_TLS_MODES: Final = frozenset(get_args(TlsMode))
_FAIL_STAGES: Final = frozenset(get_args(FailStage))
_DROP_STAGES: Final = frozenset(get_args(DropStage))
_DELAY_STAGES: Final = frozenset(get_args(DelayStage))
# RFC 2920 3.1: the commands that may appear anywhere in a group (SEND, SOML, SAML aside); any
# other one must be the last, i.e. nothing may follow it before its reply.
_PIPELINABLE: Final = frozenset({"MAIL", "RCPT", "RSET"})


def _quiet_mail_log() -> None:
    """aiosmtpd logs every command at INFO and a deprecation warning per successful AUTH."""

    def drop_login_data_warning(record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in str(record.msg)

    logger = logging.getLogger("mail.log")
    logger.setLevel(logging.WARNING)
    if not any(getattr(f, "__name__", "") == "drop_login_data_warning" for f in logger.filters):
        logger.addFilter(drop_login_data_warning)


_quiet_mail_log()


@dataclass(frozen=True)
class Received:
    """One message the fake accepted (250 after DATA), or dropped after reading it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message_id: str
    auth_mechanism: str | None
    tls: bool
    session_id: int
    mail_options: list[str] = field(default_factory=list)
    # time.monotonic() when the final dot was answered (pacing and ordering tests).
    received_at: float = 0.0
    # MAIL, every RCPT and DATA arrived in one read (a pipelining client).
    pipelined: bool = False

    def parsed(self) -> email.message.EmailMessage:
        """The data parsed with the modern email policy."""
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


@dataclass
class SessionRecord:
    """One TCP connection: whether it ended up TLS and which AUTH mechanism succeeded."""

    session_id: int
    peer: Any
    tls: bool
    auth_mechanism: str | None = None


@dataclass(frozen=True)
class TransactionRecord:
    """One MAIL ... DATA command sequence (recorded at DATA, whatever the replies)."""

    session_id: int
    rcpt_commands: int
    # MAIL, every RCPT and DATA arrived in one read and nothing followed DATA: pipelined.
    pipelined: bool


class FakeUpstreamFactory(Protocol):
    """Signature of the ``fake_upstream_factory`` fixture."""

    def __call__(
        self, tls: TlsMode = "starttls", api_key: str = DEFAULT_API_KEY, **options: Any
    ) -> FakeUpstream: ...


class _Closed(BaseException):
    """Raised in a hook after closing the connection on purpose; ends the session.

    A BaseException so that aiosmtpd's ``except Exception`` (500 reply) does not catch it.
    """


class _FakeSMTP(SMTP):
    """aiosmtpd session with Infobip's TLS/AUTH gating and the fault hooks."""

    def __init__(self, fake: FakeUpstream, **kwargs: Any) -> None:
        self.fake = fake
        self.session_id = 0
        self.session_mechanism: str | None = None  # not "auth_*": aiosmtpd scans that prefix
        if fake.line_length_limit is not None:
            self.line_length_limit = fake.line_length_limit
        # Synchronization and pipelining bookkeeping (see _synchronized).
        self.reads = 0  # data_received calls
        self.last_read = b""
        self.group_start: tuple[int, bytes] | None = None  # (reads, input after MAIL) at MAIL
        self.rcpt_commands = 0
        self.pipelined = False
        self.held_replies: list[bytes] = []
        super().__init__(_Handler(fake), **kwargs)
        self._smtp_methods = {name: self._synchronized(name, method)
                              for name, method in self._smtp_methods.items()}

    def tls_active(self) -> bool:
        """Implicit TLS from the first byte, or STARTTLS completed."""
        return self.fake.tls == "implicit" or self._tls_protocol is not None

    # -- connection lifecycle ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None  # connection_made runs again after STARTTLS
        super().connection_made(transport)
        if first:
            assert self.session is not None
            self.session_id = self.fake._on_connect(self, self.session.peer)

    def connection_lost(self, error: Exception | None) -> None:
        self.fake._on_disconnect(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        self.last_read = bytes(data)
        super().data_received(data)

    # -- command synchronization (RFC 2920, Exim's check_sync) ----------------------------------
    def input_pending(self) -> bool:
        """Whether the client sent more than the command being handled (before its reply)."""
        return bool(self._reader._buffer)  # type: ignore[attr-defined]

    def _synchronized(self, command: str, method: Any) -> Any:
        async def checked(arg: str | None) -> None:
            if self.input_pending() and (not self.fake.pipelining
                                         or command not in _PIPELINABLE):
                self.fake._count_sync_error()
                await self.flush_replies()
                await self.push("554 SMTP synchronization error")
                assert self.transport is not None
                self.transport.close()
                raise _Closed
            if command == "MAIL":
                self._start_group()
            elif command == "RCPT":
                self.rcpt_commands += 1
            elif command == "DATA":
                self._end_group()
            await method(arg)

        return checked

    def _start_group(self) -> None:
        rest = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        read = self.last_read
        # The MAIL line and the rest of the group came in the same read.
        head = read[: len(read) - len(rest)]
        one_read = read.endswith(rest) and head.count(b"\n") == 1 \
            and head[:5].upper() == b"MAIL "
        self.group_start = (self.reads, rest) if one_read else None
        self.rcpt_commands = 0

    def _end_group(self) -> None:
        start, self.group_start = self.group_start, None
        lines = start[1].split(b"\r\n") if start is not None else []
        self.pipelined = (
            start is not None and start[0] == self.reads
            and len(lines) == self.rcpt_commands + 2 and lines[-1] == b""
            and lines[-2].upper() == b"DATA"
            and all(line[:5].upper() == b"RCPT " for line in lines[:-2])
        )
        self.fake._record_transaction(self, self.rcpt_commands, self.pipelined)

    async def flush_replies(self) -> None:
        """Write the replies held back by ``coalesce_replies`` (in one write)."""
        if self.held_replies:
            held, self.held_replies = self.held_replies, []
            await super().push(b"\r\n".join(held))

    async def _handle_client(self) -> None:
        if self.fake._take_drop("connect"):
            self.abort()
            return
        reply = self.fake._take_failure("connect")
        if reply is not None:
            await self.push(reply)
            assert self.transport is not None
            self.transport.close()
            return
        with contextlib.suppress(_Closed):
            await super()._handle_client()

    def abort(self) -> None:
        """Close the TCP connection at once, without a reply."""
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    async def push(self, status: Any) -> None:
        if status == "220 Ready to start TLS":
            status = "220 2.0.0 Ready to start TLS"
        if self.fake.coalesce_replies:
            # As Postfix and Exim do: replies wait while more commands are already in, then go
            # out together (all the replies to a pipelined group in one write).
            self.held_replies.append(status.encode() if isinstance(status, str) else status)
            if not self.input_pending():
                await self.flush_replies()
            return
        await super().push(status)

    async def reply_and_close_if_421(self, reply: str) -> str:
        """A 421 means "closing channel": send it, close, and end the session."""
        if reply.startswith("421"):
            await self.push(reply)
            await self.flush_replies()
            assert self.transport is not None
            self.transport.close()
            raise _Closed
        return reply

    async def drop(self) -> None:
        """Abort the connection and end the session without replying."""
        self.abort()
        raise _Closed

    # -- gating ---------------------------------------------------------------------------------
    async def _refused_before_tls(self) -> bool:
        if self.fake.tls == "starttls" and not self.tls_active():
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return True
        return False

    async def _refused_unauthenticated(self) -> bool:
        assert self.session is not None
        if not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active():
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if await self._refused_before_tls():
            return
        if not self.tls_active():
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refused_before_tls() or await self._refused_unauthenticated():
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._refused_before_tls() or await self._refused_unauthenticated():
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        await self.fake._delay("data_start")
        if await self._refused_before_tls() or await self._refused_unauthenticated():
            return
        assert self.envelope is not None
        reply = self.fake._take_failure("data_start")
        if reply is not None:
            await self.push(await self.reply_and_close_if_421(reply))
            return
        if (self.fake.data_without_recipients and self.envelope.mail_from is not None
                and not self.envelope.rcpt_tos):
            await self._data_without_recipients()
            return
        await super().smtp_DATA(arg)

    async def _data_without_recipients(self) -> None:
        """A misbehaving server: 354 with no recipient, reads the data, then refuses it."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        while (line := await self._reader.readuntil(b"\r\n")) != b".\r\n":
            lines.append(line)
        self.fake._record_orphan(b"".join(lines))
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("554 5.5.1 Error: no valid recipients")


class _Handler:
    """aiosmtpd hooks; ``server`` is the per-connection ``_FakeSMTP``."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def handle_EHLO(
        self,
        server: _FakeSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        fake = self.fake
        lines = [INFOBIP_HOSTNAME, "8BITMIME", f"SIZE {fake.size_limit}"]
        if fake.tls == "starttls" and not server.tls_active():
            lines.append("STARTTLS")
        if server.tls_active():
            lines.append("AUTH LOGIN PLAIN")
        if fake.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if fake.pipelining:
            lines.append("PIPELINING")
        return [f"250-{line}" for line in lines] + ["250 OK"]

    def handle_STARTTLS(self, server: _FakeSMTP, session: Session, envelope: Envelope) -> bool:
        self.fake._on_tls(server)
        return True

    async def handle_AUTH(
        self, server: _FakeSMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        await self.fake._delay("auth")
        reply = self.fake._take_failure("auth")
        if reply is None:
            return MISSING  # let the built-in PLAIN/LOGIN run the authenticator
        self.fake._count_auth(ok=False)
        return await server.reply_and_close_if_421(reply)

    async def handle_MAIL(
        self, server: _FakeSMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        if self.fake._take_drop("mail"):
            await server.drop()
        await self.fake._delay("mail")
        reply = self.fake._take_failure("mail")
        if reply is not None:
            return await server.reply_and_close_if_421(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 Sender <{address}> OK"

    async def handle_RCPT(
        self, server: _FakeSMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.fake._take_drop("rcpt"):
            await server.drop()
        await self.fake._delay("rcpt")
        reply = self.fake._take_failure("rcpt") or self.fake._rejection(address)
        if reply is not None:
            return await server.reply_and_close_if_421(reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return f"250 2.1.5 Recipient <{address}> OK"

    async def handle_DATA(self, server: _FakeSMTP, session: Session, envelope: Envelope) -> str:
        fake = self.fake
        if fake._take_drop("data"):
            fake._record(server, envelope, dropped=True)
            await server.drop()
        reply = fake._take_failure("data")
        if reply is not None:
            return await server.reply_and_close_if_421(reply)
        received = fake._record(server, envelope, dropped=False)
        # Recorded first: a slow server keeps the message even if the client stops waiting.
        await fake._delay("data")
        return f"250 2.6.0 Message queued as {received.message_id}"

    async def handle_RSET(self, server: _FakeSMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"

    async def handle_NOOP(
        self, server: _FakeSMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: _FakeSMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        self.fake._record_error(error)
        return "451 4.3.0 Internal error in fake upstream"


class FakeUpstream:
    """A fake Infobip SMTP endpoint on 127.0.0.1; see the module docstring.

    All public methods are safe to call from any thread.
    """

    def __init__(
        self,
        tls: TlsMode = "starttls",
        api_key: str = DEFAULT_API_KEY,
        *,
        ca: trustme.CA | None = None,
        ca_pem_path: str | Path | None = None,
        cert: trustme.LeafCert | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        size_limit: int = INFOBIP_SIZE_LIMIT,
        smtputf8: bool = False,
        line_length_limit: int | None = None,
        idle_timeout: float = 300.0,
        pipelining: bool = True,
        coalesce_replies: bool = False,
        data_without_recipients: bool = False,
    ) -> None:
        """Configure (not start) the fake.

        ``smtputf8`` advertises SMTPUTF8 (Infobip does not; it is always accepted).
        ``line_length_limit`` overrides aiosmtpd's 1001-octet line limit.
        ``pipelining=False`` leaves PIPELINING out of EHLO (any pipelined command is then a
        synchronization error). ``coalesce_replies`` holds replies while more commands are
        waiting and writes them together. ``data_without_recipients`` answers DATA with 354
        even when every RCPT was refused (reads the data into ``orphan_data``, then 554), as a
        misbehaving server would.
        """
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {sorted(_TLS_MODES)}, not {tls!r}")
        self.tls: TlsMode = tls
        self.api_key = api_key
        self.host = host
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.line_length_limit = line_length_limit
        self.idle_timeout = idle_timeout
        self.pipelining = pipelining
        self.coalesce_replies = coalesce_replies
        self.data_without_recipients = data_without_recipients
        self._port = port

        self.ca = ca if ca is not None else trustme.CA()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if ca_pem_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="fakeupstream-")
            ca_pem_path = Path(self._tmpdir.name) / "ca.pem"
            self.ca.cert_pem.write_to_path(str(ca_pem_path))
        self.ca_pem_path = Path(ca_pem_path)
        self.cert = cert if cert is not None else self.ca.issue_cert("localhost", "127.0.0.1")
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(self._server_ctx)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._dropped: list[Received] = []
        self._sessions: dict[int, SessionRecord] = {}
        self._errors: list[BaseException] = []
        self._transactions: list[TransactionRecord] = []
        self._orphan_data: list[bytes] = []
        self._sync_errors = 0
        self._connections = 0
        self._auth_successes = 0
        self._auth_failures = 0
        self._session_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._failures: dict[str, deque[str]] = {s: deque() for s in _FAIL_STAGES}
        self._drops: dict[str, int] = dict.fromkeys(_DROP_STAGES, 0)
        self._delays: dict[str, deque[float]] = {s: deque() for s in _DELAY_STAGES}
        self._rejections: dict[str, str] = {}

        # Owned by the start()/stop() caller; _active only touched on the loop thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._active: set[_FakeSMTP] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        """Start listening (again on the same port after a stop()); returns self."""
        if self._loop is not None:
            raise RuntimeError("fake upstream already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"fake-upstream-{self.tls}", daemon=True
        )
        thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(loop), loop).result(10)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop listening and abort every open connection. The port stays reserved for start()."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            # asyncio can still hold a socket it accepted as the listener closed, in a task that
            # never ran; it is freed here. That is the fake's own teardown, not a leak of the
            # relay under test, so its ResourceWarning must not fail the test (filterwarnings).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                loop.close()
                gc.collect()
            self._loop = self._thread = self._server = None

    def close(self) -> None:
        """stop() and remove the temporary CA file, if this instance wrote one."""
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> FakeUpstream:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        def factory() -> _FakeSMTP:
            return _FakeSMTP(
                self,
                loop=loop,
                hostname=INFOBIP_HOSTNAME,
                ident="ESMTP fake-infobip",
                data_size_limit=self.size_limit,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=self._server_ctx if self.tls == "starttls" else None,
                require_starttls=False,  # enforced in _FakeSMTP with Infobip's wording
                auth_required=False,  # ditto
                auth_require_tls=False,  # ditto; aiosmtpd cannot see implicit TLS
                authenticator=self._authenticate,
                timeout=self.idle_timeout,
            )

        server = await loop.create_server(
            factory,
            self.host,
            self._port,
            ssl=self._server_ctx if self.tls == "implicit" else None,
            reuse_address=True,
        )
        self._port = server.sockets[0].getsockname()[1]
        return server

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        current = asyncio.current_task()
        # A connection accepted just before close() gets its transport in a task of its own and
        # its protocol in a later callback: abort and cancel until nothing is left, or its
        # socket outlives the loop (ResourceWarning, an error under filterwarnings).
        for _ in range(50):
            # First let pending tasks take a step: an accept task cancelled before its first
            # step never wraps its accepted socket, which then leaks.
            await asyncio.sleep(0.01)
            for proto in list(self._active):
                proto.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.01)  # connection_lost callbacks run here
            if not self._active and not [t for t in asyncio.all_tasks() if t is not current]:
                break
        await self._server.wait_closed()

    # -- addresses and TLS ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the listener is up."""
        return self._loop is not None

    @property
    def port(self) -> int:
        """The listening port (fixed after the first start())."""
        if self._port == 0:
            raise RuntimeError("fake upstream not started yet")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return self.host, self.port

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this fake's CA (and verifies the host name)."""
        return ssl.create_default_context(cafile=str(self.ca_pem_path))

    # -- records --------------------------------------------------------------------------------
    @property
    def messages(self) -> list[Received]:
        """Snapshot of the accepted messages, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def dropped_messages(self) -> list[Received]:
        """Messages read completely and then dropped by ``drop_next("data")`` (never 250'd)."""
        with self._lock:
            return list(self._dropped)

    @property
    def sessions(self) -> list[SessionRecord]:
        """Snapshot of every connection seen, in order."""
        with self._lock:
            return [replace(s) for s in self._sessions.values()]

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions that reached handle_exception (including failed TLS handshakes)."""
        with self._lock:
            return list(self._errors)

    @property
    def transactions(self) -> list[TransactionRecord]:
        """Every MAIL ... DATA sequence, in order, with whether it came pipelined."""
        with self._lock:
            return list(self._transactions)

    @property
    def orphan_data(self) -> list[bytes]:
        """What followed a 354 sent with no recipient (``data_without_recipients``)."""
        with self._lock:
            return list(self._orphan_data)

    @property
    def sync_errors(self) -> int:
        """Connections closed with ``554 SMTP synchronization error``."""
        with self._lock:
            return self._sync_errors

    @property
    def connections(self) -> int:
        """TCP connections accepted (counted once even with STARTTLS)."""
        with self._lock:
            return self._connections

    @property
    def auth_successes(self) -> int:
        """Successful AUTH commands."""
        with self._lock:
            return self._auth_successes

    @property
    def auth_failures(self) -> int:
        """Failed AUTH commands (bad credentials or injected failures)."""
        with self._lock:
            return self._auth_failures

    @property
    def open_connections(self) -> int:
        """Connections currently open (approximate when read from another thread)."""
        return len(self._active)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``count`` messages were accepted; return all of them.

        Raises AssertionError on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"fake upstream ({self.tls}, port {self._port}): expected at least "
                        f"{count} message(s) within {timeout:g}s, got {len(self._messages)} "
                        f"(connections={self._connections}, auth ok/failed="
                        f"{self._auth_successes}/{self._auth_failures}, "
                        f"dropped={len(self._dropped)}, errors={self._errors!r})"
                    )
                self._cond.wait(remaining)
            return list(self._messages)

    def clear_records(self) -> None:
        """Forget messages, sessions, errors and counters (not the faults)."""
        with self._lock:
            self._messages.clear()
            self._dropped.clear()
            self._sessions.clear()
            self._errors.clear()
            self._transactions.clear()
            self._orphan_data.clear()
            self._connections = self._auth_successes = self._auth_failures = 0
            self._sync_errors = 0

    # -- fault injection ------------------------------------------------------------------------
    def fail_next(
        self, stage: FailStage, code: int, text: str | None = None, times: int = 1
    ) -> None:
        """Answer the next ``times`` commands of ``stage`` with ``"<code> <text>"``.

        ``data_start`` answers the DATA command itself (instead of 354), ``data`` the final dot.
        ``connect`` greets with the reply and closes; any 421 closes the connection after replying.
        """
        if stage not in _FAIL_STAGES:
            raise ValueError(f"stage must be one of {sorted(_FAIL_STAGES)}, not {stage!r}")
        reply = _reply(code, text)
        with self._lock:
            self._failures[stage].extend([reply] * times)

    def drop_next(self, stage: DropStage, times: int = 1) -> None:
        """Close the TCP connection without a reply at the next ``times`` ``stage`` commands.

        ``data`` drops after the whole message was read (the ambiguous case); the message is
        recorded in ``dropped_messages``, not ``messages``.
        """
        if stage not in _DROP_STAGES:
            raise ValueError(f"stage must be one of {sorted(_DROP_STAGES)}, not {stage!r}")
        with self._lock:
            self._drops[stage] += times

    def delay_next(self, stage: DelayStage, seconds: float, times: int = 1) -> None:
        """Hold the reply to the next ``times`` ``stage`` commands for ``seconds``.

        ``auth`` delays the reply to AUTH (whether it then succeeds or not), ``data_start`` the
        reply to the DATA command, ``data`` the reply to the final dot; the message is recorded
        in ``messages`` before that wait, as a slow real server has it whether or not the client
        waits.
        """
        if stage not in _DELAY_STAGES:
            raise ValueError(f"stage must be one of {sorted(_DELAY_STAGES)}, not {stage!r}")
        with self._lock:
            self._delays[stage].extend([seconds] * times)

    def reject_recipient(self, addr: str, code: int, text: str | None = None) -> None:
        """Answer RCPT for ``addr`` (case-insensitive) with ``"<code> <text>"`` until cleared."""
        with self._lock:
            self._rejections[addr.lower()] = _reply(code, text)

    def clear_faults(self) -> None:
        """Forget all pending failures, drops, delays and recipient rejections."""
        with self._lock:
            for queue in self._failures.values():
                queue.clear()
            self._drops = dict.fromkeys(_DROP_STAGES, 0)
            for delays in self._delays.values():
                delays.clear()
            self._rejections.clear()

    # -- called on the loop thread --------------------------------------------------------------
    def _take_failure(self, stage: str) -> str | None:
        with self._lock:
            queue = self._failures[stage]
            return queue.popleft() if queue else None

    def _take_drop(self, stage: str) -> bool:
        with self._lock:
            if self._drops[stage] > 0:
                self._drops[stage] -= 1
                return True
            return False

    async def _delay(self, stage: str) -> None:
        with self._lock:
            queue = self._delays[stage]
            seconds = queue.popleft() if queue else 0.0
        if seconds:
            await asyncio.sleep(seconds)

    def _rejection(self, address: str) -> str | None:
        with self._lock:
            return self._rejections.get(address.lower())

    def _on_connect(self, server: _FakeSMTP, peer: Any) -> int:
        self._active.add(server)
        with self._lock:
            self._connections += 1
            session_id = next(self._session_ids)
            self._sessions[session_id] = SessionRecord(session_id, peer, self.tls == "implicit")
            return session_id

    def _on_disconnect(self, server: _FakeSMTP) -> None:
        self._active.discard(server)

    def _on_tls(self, server: _FakeSMTP) -> None:
        with self._lock:
            record = self._sessions.get(server.session_id)
            if record is not None:
                record.tls = True

    def _count_sync_error(self) -> None:
        with self._lock:
            self._sync_errors += 1

    def _record_transaction(self, server: _FakeSMTP, rcpt_commands: int, pipelined: bool) -> None:
        with self._lock:
            self._transactions.append(
                TransactionRecord(server.session_id, rcpt_commands, pipelined))

    def _record_orphan(self, data: bytes) -> None:
        with self._lock:
            self._orphan_data.append(data)

    def _count_auth(self, *, ok: bool) -> None:
        with self._lock:
            if ok:
                self._auth_successes += 1
            else:
                self._auth_failures += 1

    def _authenticate(
        self, server: _FakeSMTP, session: Session, envelope: Envelope, mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == API_USERNAME.encode()
            and secrets.compare_digest(auth_data.password, self.api_key.encode())
        )
        self._count_auth(ok=ok)
        if ok:
            server.session_mechanism = mechanism
            with self._lock:
                record = self._sessions.get(server.session_id)
                if record is not None:
                    record.auth_mechanism = mechanism
        return AuthResult(success=ok, handled=False, auth_data=mechanism if ok else None)

    def _record(self, server: _FakeSMTP, envelope: Envelope, *, dropped: bool) -> Received:
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        with self._cond:
            received = Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content),
                message_id=f"fake-{next(self._message_ids)}-{secrets.token_hex(4)}",
                auth_mechanism=server.session_mechanism,
                tls=server.tls_active(),
                session_id=server.session_id,
                mail_options=list(envelope.mail_options),
                received_at=time.monotonic(),
                pipelined=server.pipelined,
            )
            if dropped:
                self._dropped.append(received)
            else:
                self._messages.append(received)
                self._cond.notify_all()
            return received

    def _record_error(self, error: BaseException) -> None:
        if isinstance(error, TLSSetupException) and error.__cause__ is not None:
            error = error.__cause__
        with self._lock:
            self._errors.append(error)


def _reply(code: int, text: str | None) -> str:
    if not 200 <= code <= 599:
        raise ValueError(f"SMTP reply code out of range: {code}")
    if text is None:
        text = f"{code // 100}.0.0 Injected failure"
    return f"{code} {text}"
