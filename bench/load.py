"""Load generation: ``smtp-source`` for throughput, a sequential probe client for acceptance
latency, and a client that holds many idle connections open.

Latency method: ``smtp-source`` reports no per-message timing, so while it runs, one extra
SMTP session (the *probe*) sends messages of the same size to the same listener, one at a
time, at most one every ``interval`` seconds. For each message it writes the body, waits for
the socket to drain, takes a timestamp, writes the final ``.<CRLF>`` and takes the second
timestamp when the ``250`` reply line arrives: the latency is end-of-DATA -> 250 under the
full ``smtp-source`` load. Probe messages carry ``Message-Id: <probe.TAG.N@bench>`` and are
counted by the sink like every other message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from typing import Any

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SENDER = "sender@bench.example.com"
RECIPIENT = "rcpt@example.net"


# --------------------------------------------------------------------------- smtp-source
@dataclass
class SourceResult:
    pid: int
    returncode: int | None
    seconds: float
    started: float  # time.monotonic() just before exec
    stderr: str
    timed_out: bool = False


def smtp_source_command(port: int, *, messages: int, size: int, sessions: int,
                        sender: str = SENDER, recipient: str = RECIPIENT) -> list[str]:
    """20 parallel sessions that stay connected (``-d``), ``-l`` bytes of body per message,
    one recipient each with a unique number prepended (``-N``)."""
    return [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-d", "-l", str(size),
            "-r", "1", "-N", "-f", sender, "-t", recipient, "-M", "bench-client.example.com",
            f"127.0.0.1:{port}"]


async def run_smtp_source(port: int, *, messages: int, size: int, sessions: int,
                          time_limit: float) -> SourceResult:
    command = smtp_source_command(port, messages=messages, size=size, sessions=sessions)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    timed_out = False
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _, stderr = await proc.communicate()
    seconds = time.monotonic() - started
    return SourceResult(pid=proc.pid, returncode=proc.returncode, seconds=seconds,
                        started=started, stderr=stderr.decode(errors="replace")[-2000:],
                        timed_out=timed_out)


# --------------------------------------------------------------------------- latency probe
@dataclass
class ProbeResult:
    tag: str
    sent: int = 0  # messages that got a 250 after DATA
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds

    def summary(self) -> dict[str, Any]:
        # Every sample kept: a case that ends in a second has a handful per round, so its p99
        # is that round's slowest message; the report pools the rounds' samples as well.
        return {"samples": len(self.latencies), "sent": self.sent,
                "errors": self.errors[:5], "error_count": len(self.errors),
                **latency_stats(self.latencies),
                "latencies_ms": [round(value * 1000, 3) for value in sorted(self.latencies)]}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def latency_stats(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3),
        "max_ms": round(max(latencies) * 1000, 3),
    }


def probe_message(tag: str, number: int, size: int) -> bytes:
    """Headers like smtp-source's plus ``size`` bytes of body, dot-stuffing not needed."""
    head = (f"From: <{SENDER}>\r\nTo: <probe{number}@example.net>\r\n"
            f"Date: {formatdate()}\r\nMessage-Id: <probe.{tag}.{number}@bench>\r\n"
            f"Subject: latency probe {number}\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    body = line * (size // len(line)) + b"X" * (size % len(line)) + b"\r\n"
    return head + body


def probe_match(tag: str) -> Callable[[str], bool]:
    prefix = f"<probe.{tag}."
    return lambda key: key.startswith(prefix)


class ReplyError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, wait: float) -> str:
    """Read one (possibly multi-line) SMTP reply; returns its last line."""
    while True:
        line = (await asyncio.wait_for(reader.readline(), wait)).decode(errors="replace")
        if not line:
            raise ReplyError("connection closed")
        if len(line) < 4 or line[3] != "-":
            return line.rstrip()


async def _expect(reader: asyncio.StreamReader, code: str, wait: float) -> str:
    line = await _reply(reader, wait)
    if not line.startswith(code):
        raise ReplyError(line)
    return line


async def run_probe(port: int, *, tag: str, size: int, stop: asyncio.Event,
                    interval: float = 0.05, step_timeout: float = 60.0,
                    max_messages: int = 100_000) -> ProbeResult:
    """Send probe messages one at a time until ``stop`` is set; see the module docstring."""
    result = ProbeResult(tag=tag)
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    number = 0
    try:
        while not stop.is_set() and number < max_messages:
            began = time.monotonic()
            try:
                if connection is None:
                    connection = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), step_timeout)
                    reader, writer = connection
                    await _expect(reader, "220", step_timeout)
                    writer.write(b"EHLO bench-probe.example.com\r\n")
                    await _expect(reader, "250", step_timeout)
                reader, writer = connection
                number += 1
                data = probe_message(tag, number, size)
                writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
                await _expect(reader, "250", step_timeout)
                writer.write(f"RCPT TO:<probe{number}@example.net>\r\n".encode())
                await _expect(reader, "250", step_timeout)
                writer.write(b"DATA\r\n")
                await _expect(reader, "354", step_timeout)
                writer.write(data)
                await writer.drain()
                t0 = time.perf_counter()
                writer.write(b".\r\n")
                await _expect(reader, "250", step_timeout)
                result.latencies.append(time.perf_counter() - t0)
                result.sent += 1
            except (OSError, ReplyError, TimeoutError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection[1].close()
                connection = None
                if len(result.errors) > 20:
                    break
                await asyncio.sleep(0.2)
            pause = interval - (time.monotonic() - began)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
    finally:
        if connection is not None:
            writer = connection[1]
            with contextlib.suppress(Exception):
                writer.write(b"QUIT\r\n")
                await asyncio.wait_for(writer.drain(), 2)
            writer.close()
    return result


# --------------------------------------------------------------------------- idle connections
@dataclass
class IdleResult:
    requested: int
    greeted: int = 0  # got a 220 greeting
    refused: int = 0  # connection refused/reset, or a non-220 greeting (e.g. 421)
    timed_out: int = 0
    other_replies: dict[str, int] = field(default_factory=dict)
    seconds_to_greet: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def hold_idle_connections(port: int, count: int, *, step_timeout: float = 30.0,
                                hold: float = 2.0,
                                during_hold: Callable[[], object] | None = None) -> IdleResult:
    """Open ``count`` connections at once, read the greeting on each, keep them all open for
    ``hold`` seconds, call ``during_hold()`` (in a thread; e.g. to sample memory), close."""
    result = IdleResult(requested=count)
    writers: list[asyncio.StreamWriter] = []
    started = time.monotonic()

    async def one() -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), step_timeout)
        except TimeoutError:
            result.timed_out += 1
            return
        except OSError:
            result.refused += 1
            return
        writers.append(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), step_timeout)
        except TimeoutError:
            result.timed_out += 1
            return
        except OSError:
            result.refused += 1
            return
        if line.startswith(b"220"):
            result.greeted += 1
            # a multi-line greeting ("220-") is still a greeting; leave the rest unread
        else:
            result.refused += 1
            code = line[:3].decode(errors="replace") or "EOF"
            result.other_replies[code] = result.other_replies.get(code, 0) + 1

    await asyncio.gather(*(one() for _ in range(count)))
    result.seconds_to_greet = round(time.monotonic() - started, 3)
    try:
        await asyncio.sleep(hold)
        if during_hold is not None:
            await asyncio.to_thread(during_hold)
    finally:
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return result
