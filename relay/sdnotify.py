"""A tiny sd_notify(3) client: tells systemd (or any supervisor speaking the protocol) our state.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``. It is implemented here rather than taken from a library because it is
a dozen lines and the relay should not grow a dependency (or a C extension) for it.

``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read from the environment here, and
only here: they are runtime protocol variables that the service manager sets for this very
process, not settings, so they do not belong in the config module.

Nothing in this module raises: a supervisor that went away must never take the relay down with
it. Failures are logged at debug level and reported by a ``False`` return.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

# A blocking send to systemd returns at once unless its receive queue is full, which happens only
# when PID 1 is wedged. Bound the wait so that a wedged manager cannot stall the event loop for
# long; a lost WATCHDOG=1 then costs at most one missed ping out of the two per interval.
_SEND_TIMEOUT = 1.0


def _address(raw: str) -> str | None:
    """Socket address for ``$NOTIFY_SOCKET``, or None for a form this client does not speak."""
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes it with '@', the kernel wants a leading NUL.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # 'vsock:CID:PORT' (systemd 254+, for VMs) and relative paths are not used by a service unit.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (one or more ``KEY=VALUE`` lines) to the service manager.

    Returns True when the datagram was sent, False when not running under a notify-capable
    supervisor or when sending failed.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r, not notifying", raw)
        return False
    family = getattr(socket, "AF_UNIX", None)
    if family is None:  # pragma: no cover - only on platforms without AF_UNIX (Windows)
        return False
    try:
        payload = state.encode("utf-8")
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(payload)
    except (OSError, ValueError) as exc:
        # ValueError covers unencodable text (lone surrogates) and NULs in a path.
        log.debug("sd_notify: sending %r to %r failed: %s", state, raw, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline in a value would start a new assignment: 'STATUS=x\nREADY=1' must stay a status.
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) finished: listeners are bound and the relay accepts mail."""
    state = "READY=1"
    if status is not None:
        state += f"\nSTATUS={_one_line(status)}"
    return notify(state)


def stopping() -> bool:
    """Graceful shutdown began (sent on SIGTERM, before draining)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """A configuration reload began; send ``ready()`` once it is done.

    MONOTONIC_USEC is what Type=notify-reload (systemd 253+) requires to tell this reload from an
    earlier one; older managers ignore the extra field, so one message serves both.
    """
    # time.monotonic_ns() is CLOCK_MONOTONIC on Linux, the clock systemd compares against.
    usec = time.monotonic_ns() // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog() -> bool:
    """Keep-alive ping; must arrive more often than ``watchdog_interval()``."""
    return notify("WATCHDOG=1")


async def keep_watchdog_fed(interval: float) -> None:
    """Ping the watchdog at half ``interval`` (from `watchdog_interval`) until cancelled."""
    while True:
        watchdog()
        await asyncio.sleep(interval / 2)


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ``watchdog()`` ping, or None if it expects none.

    Callers should ping at half this interval, as sd_watchdog_enabled(3) advises. WATCHDOG_PID,
    when set, names the process the watchdog applies to; a child that inherited the variables
    must not ping on its parent's behalf.
    """
    raw_usec = os.environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = os.environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            log.debug("sd_notify: ignoring malformed WATCHDOG_PID %r", raw_pid)
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.debug("sd_notify: ignoring malformed WATCHDOG_USEC %r", raw_usec)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000
