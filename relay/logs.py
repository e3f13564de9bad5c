"""Logging setup: one line per event, text or JSON, with every configured secret masked."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import weakref
from collections.abc import Iterable
from typing import TextIO

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class SecretFilter(logging.Filter):
    """Masks secrets in the final message text, whatever path they took into a log call."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "********")
        if masked is not message and masked != message:
            record.msg, record.args = masked, None
        return True


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EscapeControlsFilter(logging.Filter):
    """Writes control characters a client sent (CR, NUL, ESC...) as \\xNN.

    A CR or LF in an address or a HELO name would otherwise start a forged log line, and ESC
    sequences would reach the operator's terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROLS.search(message):
            record.msg = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
            record.args = None
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RelayLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure_logging() installs (a reload finds it by its class).

    On a thread that runs an event loop, info and debug lines are gathered and written once
    per turn of the loop, all in one write. A write releases the GIL, and each release let the
    spool's threads take it, which the loop then waited to get back: at info level (two lines
    a message) that cost a quarter of the small-mail rate. Warnings and errors, lines from any
    other thread and lines logged with no loop running are written at once, after whatever
    was gathered, so the order stays that of the calls. A SIGKILL loses at most one turn's
    lines; an exit (logging.shutdown, also before a worker's os._exit), a fork and flush()
    write them.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._gathered: list[str] = []
        self._last: logging.LogRecord | None = None  # for handleError if the write fails
        _HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        loop = asyncio._get_running_loop()
        if loop is None or record.levelno >= logging.WARNING:
            self._write(self._take_gathered() + line, record)
            return
        if not self._gathered:
            loop.call_soon(self.flush)
        self._gathered.append(line)
        self._last = record

    def flush(self) -> None:
        """Write what was gathered, then flush the stream (logging.shutdown calls this)."""
        with self.lock:  # type: ignore[union-attr]
            if self._gathered:
                self._write(self._take_gathered(), self._last)  # _write flushes the stream
                return
        super().flush()

    def _take_gathered(self) -> str:
        text = "".join(self._gathered)
        self._gathered.clear()
        return text

    def _write(self, text: str, record: logging.LogRecord | None) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            if record is not None:
                self.handleError(record)


_HANDLERS: weakref.WeakSet[RelayLogHandler] = weakref.WeakSet()


def _flush_before_fork() -> None:
    """A forked child must not write the lines its parent gathered a second time."""
    for handler in list(_HANDLERS):
        handler.flush()


os.register_at_fork(before=_flush_before_fork)


def configure_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    # Nothing these formats write needs the caller's file and line or the thread and process
    # ids, which cost a walk up the stack and a getpid() per line (logging HOWTO,
    # "Optimization"): a quarter of a line's 16 us.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = RelayLogHandler(sys.stderr)
    _dress(handler, fmt, secrets)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    _set_levels(level)


def reconfigure_logging(level: str, fmt: str, secrets: Iterable[str]) -> None:
    """A reload's level, format and secrets, on the handler configure_logging() installed.

    Only that handler changes: where the relay runs inside another program's logging (the
    tests' log capture, an embedding application), nothing was installed and nothing is.
    """
    ours = [handler for handler in logging.getLogger().handlers
            if isinstance(handler, RelayLogHandler)]
    if not ours:
        return
    for handler in ours:
        _dress(handler, fmt, secrets)
    _set_levels(level)


def _dress(handler: logging.Handler, fmt: str, secrets: Iterable[str]) -> None:
    """The format, then the mask of ``secrets`` and the escaping of control characters."""
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # One assignment: a thread logging meanwhile sees the old filters or the new, never none.
    handler.filters = [SecretFilter(secrets), EscapeControlsFilter()]


def _set_levels(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # aiosmtpd logs every command at INFO and a traceback per failed TLS handshake.
    logging.getLogger("mail.log").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
