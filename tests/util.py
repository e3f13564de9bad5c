"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio

import aiosmtplib

# One free_port for the tests and the benchmark, so the two cannot drift apart.
from bench.procs import free_port

__all__ = ["free_port", "quit_cleanly"]


async def quit_cleanly(smtp: aiosmtplib.SMTP) -> None:
    """QUIT, then wait until the socket is closed. A TLS session's close first waits for the
    server's close_notify; a loop that asyncio.run() closes before that leaves the socket to
    the garbage collector, whose ResourceWarning then fails whichever test is running."""
    transport = smtp.transport
    await smtp.quit()
    sock = transport.get_extra_info("socket") if transport is not None else None
    for _ in range(500):
        if sock is None or sock.fileno() == -1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the client's socket was still open 5 s after QUIT")
