"""The pid file, ``relay.pid`` in queue.path: written by whoever talks to systemd (the single
relay process, or the supervisor of several workers), read by `infobip-relay reload`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from relay.spool import open_private

PID_FILE = "relay.pid"


def write_pid(directory: Path) -> None:
    """Write this process's pid (0600; an existing file is truncated first)."""
    with open_private(directory / PID_FILE) as handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")


def remove_pid(directory: Path) -> None:
    with contextlib.suppress(OSError):
        (directory / PID_FILE).unlink()


def read_pid(directory: Path) -> int | None:
    """The pid in ``directory``'s pid file; None when there is none or it makes no sense."""
    try:
        pid = int((directory / PID_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    # 0 and negative numbers would signal a whole process group: never trust them.
    return pid if pid > 0 else None
