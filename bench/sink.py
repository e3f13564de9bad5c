"""A fast counting SMTP sink that stands in for Infobip's SMTP API in the benchmark.

It speaks just enough SMTP for the relay and Postfix's ``smtp`` client: implicit TLS (port-465
style) and/or plaintext listeners, EHLO with PIPELINING, AUTH PLAIN/LOGIN (``App`` + API key,
required on the TLS listener only, so that ``smtp-source`` can measure the ceiling on the plain
one), MAIL/RCPT/DATA/RSET/NOOP/QUIT. It is a plain ``asyncio.Protocol`` (uvloop when
installed), parses pipelined input in one pass per read and keeps nothing but a few bytes per
message, so it is not the bottleneck (see ``python -m bench ceiling``).

Each accepted message is identified by ``Message-Id`` header + envelope recipients
(``smtp-source`` writes a per-run unique ``Message-Id`` and, with ``-N``, a unique recipient
number). The sink counts received/unique messages, duplicates, and messages lacking the
expected header (``X-IB-Client-Priority: LOW`` by default).

Run one sink process (``python -m bench.sink --tls-port P --plain-port Q --control-port C``);
it prints ``READY`` once listening. Control protocol on 127.0.0.1:C, one JSON reply per line:
``stats`` (counters), ``dump`` (every key with its count and header flag), ``reset``, ``quit``.
Several processes can share the SMTP ports with ``--reuse-port`` (each with its own control
port); ``SinkClient`` merges them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from relay.memory import keep_heap_between_messages
from relay.outgoing import find_line_dot

_uvloop: Any = None
try:
    import uvloop

    _uvloop = uvloop
except ImportError:  # pragma: no cover - optional speed-up
    pass

T = TypeVar("T")

API_USERNAME = "App"
DEFAULT_API_KEY = "bench-api-key"
DEFAULT_HEADER = "X-IB-Client-Priority"
DEFAULT_HEADER_VALUE = "LOW"
SIZE_LIMIT = 20_971_520
MAX_LINE = 4096
HEAD_LIMIT = 65536
_END_OF_DATA = b"\r\n.\r\n"
HOSTNAME = "smtp.email-messaging.com"

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)[ \t\r]*$", re.IGNORECASE | re.MULTILINE)
_ADDRESS = re.compile(r"<([^>]*)>")


@dataclass
class SinkStats:
    """Counters of one sink process. Keys are ``message-id|rcpt,rcpt``."""

    header: str = DEFAULT_HEADER
    header_value: str = DEFAULT_HEADER_VALUE
    received: int = 0
    byte_count: int = 0
    connections: int = 0
    tls_connections: int = 0
    auth_ok: int = 0
    auth_failed: int = 0
    missing_header: int = 0
    wrong_header: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    last_unique_ts: float | None = None
    seen: dict[str, list[int]] = field(default_factory=dict)  # key -> [count, has_header]
    _header_re: re.Pattern[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._header_re = re.compile(
            rb"^" + re.escape(self.header.encode()) + rb":[ \t]*(.*?)[ \t\r]*$",
            re.IGNORECASE | re.MULTILINE,
        )

    def record(self, rcpts: Sequence[str], head: bytes, size: int) -> None:
        """Count one message of ``size`` dot-stuffed bytes (final dot excluded) whose header
        block (or its first 64 KiB) is ``head``."""
        now = time.monotonic()
        match = _MESSAGE_ID.search(head)
        message_id = match.group(1).decode("latin-1") if match else ""
        key = f"{message_id}|{','.join(rcpts)}"
        header = self._header_re.search(head)
        has_header = 0
        if header is None:
            self.missing_header += 1
        elif header.group(1).decode("latin-1").strip() != self.header_value:
            self.wrong_header += 1
        else:
            has_header = 1
        self.received += 1
        self.byte_count += size
        if self.first_ts is None:
            self.first_ts = now
        self.last_ts = now
        entry = self.seen.get(key)
        if entry is None:
            self.seen[key] = [1, has_header]
            self.last_unique_ts = now
        else:
            entry[0] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "unique": len(self.seen),
            "duplicates": self.received - len(self.seen),
            "bytes": self.byte_count,
            "connections": self.connections,
            "tls_connections": self.tls_connections,
            "auth_ok": self.auth_ok,
            "auth_failed": self.auth_failed,
            "missing_header": self.missing_header,
            "wrong_header": self.wrong_header,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "last_unique_ts": self.last_unique_ts,
        }

    def reset(self) -> None:
        self.received = self.byte_count = self.connections = self.tls_connections = 0
        self.auth_ok = self.auth_failed = self.missing_header = self.wrong_header = 0
        self.first_ts = self.last_ts = self.last_unique_ts = None
        self.seen = {}


class SMTPSinkProtocol(asyncio.Protocol):
    """One SMTP session. Pipelining-tolerant: every complete command in a read is answered in
    order and the replies go out in one write.

    Message content is streamed, as a real receiver does: only the header block (at most
    ``HEAD_LIMIT``) and the last four bytes are kept, so the sink spends its CPU on TLS and a
    scan for the end of data, not on growing and copying multi-MiB buffers. The benchmark's
    sink shares the machine with the system under test; the real upstream does not."""

    def __init__(self, stats: SinkStats, *, tls: bool, require_auth: bool, password: str) -> None:
        self.stats = stats
        self.tls = tls
        self.require_auth = require_auth
        self.password = password
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.head = bytearray()
        self.head_done = False
        self.size = 0
        # The content seen so far ends with these bytes; DATA's own CRLF stands before the
        # first byte, so that an empty message (".\r\n" at once) ends like any other.
        self.tail = b"\r\n"
        self.authed = False
        self.auth_state: str | None = None  # "plain", "login-user", "login-pass"
        self.login_user = ""
        self.greeted = False
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.closing = False

    # ---------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.stats.connections += 1
        if self.tls:
            self.stats.tls_connections += 1
        self.transport.write(f"220 {HOSTNAME} ESMTP bench-sink\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        out: list[bytes] = []
        if self.in_data:
            rest = self.content_received(data, out)
            if rest is None:
                self.flush(out)
                return
            data = rest
        self.buf += data
        buf = self.buf
        while buf and not self.closing:
            idx = buf.find(b"\r\n")
            if idx < 0:
                if len(buf) > MAX_LINE:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    self.closing = True
                break
            line = bytes(buf[:idx])
            del buf[: idx + 2]
            out.append(self.command(line))
            if self.in_data and buf:
                # A client that sends content before the 354: take it as content.
                pending = bytes(buf)
                buf.clear()
                rest = self.content_received(pending, out)
                if rest is None:
                    break
                buf += rest
        self.flush(out)

    def flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if self.closing:
                self.transport.close()

    def content_received(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Take message content; return what follows the end of data, or ``None`` while the
        message goes on."""
        window = self.tail + data[:4]
        idx = window.find(_END_OF_DATA)
        if idx >= 0:
            end = idx - len(self.tail)
        else:
            # The terminator starts a line with a dot: the relay's own memchr scan for those
            # passes a chunk without one, and the header's dots, without a byte-wise search.
            line_dot = find_line_dot(data)
            end = data.find(_END_OF_DATA, line_dot) if line_dot >= 0 else -1
        if end == -1 and idx < 0:
            self.keep_head(data)
            self.size += len(data)
            self.tail = (self.tail + data[-4:])[-4:]
            if self.size > SIZE_LIMIT + 65536:
                out.append(b"552 5.3.4 Message too big\r\n")
                self.closing = True
            return None
        content_end = end + 2  # the CRLF before the dot belongs to the content
        self.keep_head(data[: max(content_end, 0)])
        self.stats.record(self.rcpts, bytes(self.head), self.size + content_end)
        out.append(b"250 2.0.0 Message queued\r\n")
        self.in_data = False
        self.mail_from = None
        self.rcpts = []
        return data[end + 5:]

    def keep_head(self, data: bytes) -> None:
        if self.head_done or not data:
            return
        scan_from = max(len(self.head) - 3, 0)
        self.head += data[: HEAD_LIMIT - len(self.head)]
        end = self.head.find(b"\r\n\r\n", scan_from)
        if end >= 0:
            del self.head[end + 2:]
            self.head_done = True
        elif len(self.head) >= HEAD_LIMIT:
            self.head_done = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # ---------------------------------------------------------------- commands
    def command(self, line: bytes) -> bytes:
        if self.auth_state is not None:
            return self.auth_continue(line)
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "MAIL":
            if self.require_auth and not self.authed:
                return b"530 5.7.0 Authentication required\r\n"
            if not self.greeted:
                return b"503 5.5.1 Send EHLO first\r\n"
            match = _ADDRESS.search(arg)
            if match is None:
                return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            self.mail_from = match.group(1)
            self.rcpts = []
            return b"250 2.1.0 Sender OK\r\n"
        if verb == "RCPT":
            if self.mail_from is None:
                return b"503 5.5.1 Need MAIL first\r\n"
            match = _ADDRESS.search(arg)
            if match is None:
                return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
            self.rcpts.append(match.group(1))
            return b"250 2.1.5 Recipient OK\r\n"
        if verb == "DATA":
            if self.mail_from is None or not self.rcpts:
                return b"503 5.5.1 Need RCPT first\r\n"
            self.in_data = True
            self.head = bytearray()
            self.head_done = False
            self.size = 0
            self.tail = b"\r\n"
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb in ("EHLO", "HELO"):
            self.greeted = True
            self.mail_from = None
            self.rcpts = []
            if verb == "HELO":
                return f"250 {HOSTNAME}\r\n".encode()
            lines = [HOSTNAME, "8BITMIME", f"SIZE {SIZE_LIMIT}"]
            if self.tls or not self.require_auth:
                lines.append("AUTH LOGIN PLAIN")
            lines += ["ENHANCEDSTATUSCODES", "PIPELINING"]
            return "".join(f"250-{item}\r\n" for item in lines).encode() + b"250 OK\r\n"
        if verb == "AUTH":
            return self.auth_start(arg)
        if verb == "RSET":
            self.mail_from = None
            self.rcpts = []
            return b"250 2.0.0 OK\r\n"
        if verb == "NOOP":
            return b"250 2.0.0 OK\r\n"
        if verb == "QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        return b"502 5.5.2 Command not recognized\r\n"

    def auth_start(self, arg: str) -> bytes:
        if self.authed:
            return b"503 5.5.1 Already authenticated\r\n"
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial and initial != "=":
                return self.auth_plain(initial)
            self.auth_state = "plain"
            return b"334 \r\n"
        if mechanism == "LOGIN":
            if initial:
                self.login_user = _b64(initial) or ""
                self.auth_state = "login-pass"
                return b"334 UGFzc3dvcmQ6\r\n"
            self.auth_state = "login-user"
            return b"334 VXNlcm5hbWU6\r\n"
        return b"504 5.5.4 Unrecognized authentication type\r\n"

    def auth_continue(self, line: bytes) -> bytes:
        state, self.auth_state = self.auth_state, None
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            return b"501 5.7.0 Authentication aborted\r\n"
        if state == "plain":
            return self.auth_plain(text)
        if state == "login-user":
            self.login_user = _b64(text) or ""
            self.auth_state = "login-pass"
            return b"334 UGFzc3dvcmQ6\r\n"
        return self.auth_result(self.login_user, _b64(text))

    def auth_plain(self, blob: str) -> bytes:
        decoded = _b64(blob)
        if decoded is None or decoded.count("\0") != 2:
            return b"501 5.5.2 Cannot decode response\r\n"
        _, user, password = decoded.split("\0")
        return self.auth_result(user, password)

    def auth_result(self, user: str, password: str | None) -> bytes:
        if user == API_USERNAME and password == self.password:
            self.authed = True
            self.stats.auth_ok += 1
            return b"235 2.7.0 Authentication successful\r\n"
        self.stats.auth_failed += 1
        return b"535 5.7.8 Authentication credentials invalid\r\n"


def _b64(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


# -------------------------------------------------------------------- control channel
class ControlProtocol(asyncio.Protocol):
    def __init__(self, stats: SinkStats, stop: asyncio.Event) -> None:
        self.stats = stats
        self.stop = stop
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf and self.transport is not None:
            line, self.buf = self.buf.split(b"\n", 1)
            command = line.decode().strip()
            reply: Any
            if command == "stats":
                reply = self.stats.summary()
            elif command == "dump":
                reply = {"stats": self.stats.summary(), "seen": self.stats.seen}
            elif command == "reset":
                self.stats.reset()
                reply = {"ok": True}
            elif command == "quit":
                reply = {"ok": True}
                self.stop.set()
            else:
                reply = {"error": f"unknown command {command!r}"}
            self.transport.write(json.dumps(reply).encode() + b"\n")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def _listen_socket(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats = SinkStats(header=args.header, header_value=args.header_value)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers: list[asyncio.Server] = []
    if args.tls_port:
        context = server_context(args.cert, args.key)
        servers.append(await loop.create_server(
            lambda: SMTPSinkProtocol(stats, tls=True, require_auth=True, password=args.password),
            sock=_listen_socket(args.tls_port, args.reuse_port), ssl=context, backlog=4096,
        ))
    if args.plain_port:
        servers.append(await loop.create_server(
            lambda: SMTPSinkProtocol(stats, tls=False, require_auth=args.plain_auth,
                                     password=args.password),
            sock=_listen_socket(args.plain_port, args.reuse_port), backlog=4096,
        ))
    servers.append(await loop.create_server(
        lambda: ControlProtocol(stats, stop), "127.0.0.1", args.control_port))
    print("READY", flush=True)
    if args.parent_pid:
        watcher = loop.create_task(_watch_parent(args.parent_pid, stop))
    await stop.wait()
    if args.parent_pid:
        watcher.cancel()
    for server in servers:
        server.close()


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    """Exit when the benchmark driver is gone, so that no sink outlives a killed run."""
    while not stop.is_set():
        if os.getppid() != pid:
            stop.set()
        await asyncio.sleep(1.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tls-port", type=int, default=0, help="implicit-TLS listener port")
    parser.add_argument("--plain-port", type=int, default=0, help="plaintext listener port")
    parser.add_argument("--plain-auth", action="store_true",
                        help="require AUTH on the plaintext listener too")
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--cert", help="PEM certificate chain (TLS listener)")
    parser.add_argument("--key", help="PEM private key (TLS listener)")
    parser.add_argument("--password", default=DEFAULT_API_KEY, help="API key accepted for App")
    parser.add_argument("--header", default=DEFAULT_HEADER)
    parser.add_argument("--header-value", default=DEFAULT_HEADER_VALUE)
    parser.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT (workers)")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this parent dies")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.tls_port and not (args.cert and args.key):
        parser.error("--tls-port needs --cert and --key")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Each TLS read is a fresh buffer of up to 256 KiB, freed at once: with glibc's default
    # thresholds the heap shrank and grew again on every read, and the sink spent more on
    # page faults than on its own work. The relay does the same (relay.memory).
    keep_heap_between_messages()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve(args), uvloop_ok=not args.no_uvloop)
    return 0


def run_loop(coro: Coroutine[Any, Any, T], *, uvloop_ok: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    if uvloop_ok and _uvloop is not None:
        return cast(T, _uvloop.run(coro))
    return asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())


# -------------------------------------------------------------------- driver side
@dataclass
class CaseCount:
    """What the sink saw for one class of keys (one load run)."""

    expected: int
    received: int = 0
    unique: int = 0
    missing_header: int = 0

    @property
    def lost(self) -> int:
        return max(self.expected - self.unique, 0)

    @property
    def duplicates(self) -> int:
        return self.received - self.unique

    @property
    def extra(self) -> int:
        """Unique messages beyond what was sent (should be impossible)."""
        return max(self.unique - self.expected, 0)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicates == 0 and self.extra == 0
                and self.missing_header == 0)

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "received": self.received, "unique": self.unique,
                "lost": self.lost, "duplicates": self.duplicates, "extra": self.extra,
                "missing_header": self.missing_header, "ok": self.ok}


class SinkCluster:
    """Starts ``workers`` sink processes sharing the SMTP ports (SO_REUSEPORT) and talks to
    their control ports."""

    def __init__(self, *, cert: str, key: str, password: str = DEFAULT_API_KEY,
                 workers: int = 1, tls_port: int = 0, plain_port: int = 0,
                 header: str = DEFAULT_HEADER, header_value: str = DEFAULT_HEADER_VALUE) -> None:
        from bench.procs import free_port  # noqa: PLC0415 - keep the sink process lean

        self.cert, self.key, self.password = cert, key, password
        self.workers = workers
        self.tls_port = tls_port or free_port()
        self.plain_port = plain_port or free_port()
        self.control_ports = [free_port() for _ in range(workers)]
        self.header, self.header_value = header, header_value
        self.procs: list[Any] = []

    def start(self, timeout: float = 15.0) -> SinkCluster:
        import subprocess  # noqa: PLC0415

        from bench.procs import on_exit  # noqa: PLC0415

        on_exit(self.stop)
        for control_port in self.control_ports:
            command = [sys.executable, "-m", "bench.sink", "--tls-port", str(self.tls_port),
                       "--plain-port", str(self.plain_port), "--control-port", str(control_port),
                       "--cert", self.cert, "--key", self.key, "--password", self.password,
                       "--header", self.header, "--header-value", self.header_value,
                       "--parent-pid", str(os.getpid())]
            if self.workers > 1:
                command.append("--reuse-port")
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=_project_root())
            self.procs.append(proc)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = b""
            while time.monotonic() < deadline and proc.poll() is None:
                line = proc.stdout.readline()
                if line.strip() == b"READY":
                    break
            if line.strip() != b"READY":
                self.stop()
                raise RuntimeError(f"sink did not start (exit {proc.poll()})")
        return self

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def _ask(self, port: int, command: str) -> Any:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(command.encode() + b"\n")
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
        return json.loads(b"".join(chunks))

    def stats(self) -> dict[str, Any]:
        """Counters summed over the workers (``unique`` is per worker, summed: an upper bound
        when one message went to two workers; ``dump`` merges exactly)."""
        total: dict[str, Any] = {}
        for port in self.control_ports:
            for name, value in self._ask(port, "stats").items():
                if name.endswith("_ts"):
                    if value is not None:
                        total[name] = value if total.get(name) is None else (
                            min(total[name], value) if name == "first_ts"
                            else max(total[name], value))
                    else:
                        total.setdefault(name, None)
                else:
                    total[name] = total.get(name, 0) + value
        return total

    def dump(self) -> dict[str, list[int]]:
        """Every key seen by any worker: ``[count, has_header]`` merged."""
        merged: dict[str, list[int]] = {}
        for port in self.control_ports:
            for key, (count, has_header) in self._ask(port, "dump")["seen"].items():
                entry = merged.setdefault(key, [0, 1])
                entry[0] += count
                entry[1] &= has_header
        return merged

    def reset(self) -> None:
        for port in self.control_ports:
            self._ask(port, "reset")

    def wait_unique(self, target: int, timeout: float, poll: float = 0.05,
                    stalled: float | None = None) -> dict[str, Any]:
        """Poll until ``unique >= target`` or timeout (or no progress for ``stalled`` s)."""
        deadline = time.monotonic() + timeout
        last_progress, last_unique = time.monotonic(), -1
        while True:
            stats = self.stats()
            now = time.monotonic()
            if stats["unique"] >= target or now >= deadline:
                return stats
            if stats["unique"] != last_unique:
                last_unique, last_progress = stats["unique"], now
            elif stalled is not None and now - last_progress > stalled:
                return stats
            time.sleep(poll)

    def stop(self) -> None:
        from bench.procs import stop_process  # noqa: PLC0415

        for proc in self.procs:
            stop_process(proc, timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []


def count_case(seen: dict[str, list[int]], *, expected: int,
               match: Callable[[str], bool], require_header: bool = True) -> CaseCount:
    """Count the keys of one load run (``match`` selects them) in a merged ``dump``."""
    case = CaseCount(expected=expected)
    for key, (count, has_header) in seen.items():
        if match(key):
            case.unique += 1
            case.received += count
            if require_header and not has_header:
                case.missing_header += count
    return case


def smtp_source_match(pid: int) -> Callable[[str], bool]:
    """Keys of messages written by the smtp-source process ``pid``: its Message-Id is
    ``<PID.FD.COUNT@host>`` with PID in hex (at least 4 digits)."""
    prefix = f"<{pid:04x}."
    return lambda key: key.startswith(prefix)


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
