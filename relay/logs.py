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
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TextIO

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class SecretFilter(logging.Filter):
    """Masks secrets in the final message text, whatever path they took into a log call."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def mask(self, message: str) -> str:
        for secret in self.secrets:
            message = message.replace(secret, "********")
        return message

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
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
        escaped = escape_controls(message)
        if escaped is not message:
            record.msg, record.args = escaped, None
        return True


def escape_controls(message: str) -> str:
    """``message`` itself when it has no control character, else a copy with each as \\xNN."""
    if not _CONTROLS.search(message):
        return message
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", message)


class _SecondStamp:
    """A time's text, its second formatted once: strftime and localtime/gmtime cost a few
    microseconds a line, and the lines of a second share them."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time],
                 fraction: str) -> None:
        self._fmt, self._convert, self._fraction = fmt, convert, fraction
        self._second: tuple[int, str] = (-1, "")  # one attribute: read whole by any thread

    def __call__(self, created: float, msecs: float) -> str:
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self._fmt, self._convert(second)))
        return self._fraction % (cached[1], msecs)


# logging.Formatter's default asctime ("2026-12-06 18:00:00,123") and the JSON lines' time.
local_stamp = _SecondStamp("%Y-%m-%d %H:%M:%S", time.localtime, "%s,%03d")
utc_stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime, "%s.%03dZ")


class TextFormatter(logging.Formatter):
    """Lines as "TIME LEVEL LOGGER: MESSAGE", in logging's default time format."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return local_stamp(record.created, record.msecs)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {key: value for key, value in vars(record).items()
                  if key not in _STANDARD_ATTRS}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json_line(record.created, record.msecs, record.levelname.lower(), record.name,
                         message=record.getMessage(), fields=fields)


def json_line(created: float, msecs: float, level: str, name: str, *, message: str,
              fields: Mapping[str, object]) -> str:
    """One JSON object: time, level, logger, message, then the fields that are set."""
    entry: dict[str, object] = {"time": utc_stamp(created, msecs), "level": level,
                                "logger": name, "message": message}
    for key, value in fields.items():
        if value is not None and not key.startswith("_"):
            entry[key] = value
    return json.dumps(entry, default=str, ensure_ascii=False)


class Dressing(NamedTuple):
    """A handler's filters and formatter as _dress() installed them."""

    secrets: SecretFilter
    escape: EscapeControlsFilter
    formatter: TextFormatter | JSONFormatter

    def worn_by(self, handler: logging.Handler) -> bool:
        """Whether the handler still has this formatter and these two filters, only these."""
        filters = handler.filters
        return handler.formatter is self.formatter and len(filters) == 2 and \
            filters[0] is self.secrets and filters[1] is self.escape


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
        self.dressing: Dressing | None = None  # what _dress() set, for info_line()
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
        self._gather(loop, line)
        self._last = record

    def _gather(self, loop: asyncio.AbstractEventLoop, line: str) -> None:
        if not self._gathered:
            loop.call_soon(self.flush)
        self._gathered.append(line)

    def gather_info(self, loop: asyncio.AbstractEventLoop, dressing: Dressing, name: str,
                    message: str, fields: Mapping[str, object]) -> None:
        """The line the filters and the formatter would make of an info record, gathered."""
        message = escape_controls(dressing.secrets.mask(message))
        created = time.time()
        msecs = (created - int(created)) * 1000
        if isinstance(dressing.formatter, JSONFormatter):
            line = json_line(created, msecs, "info", name, message=message, fields=fields)
        else:
            line = f"{local_stamp(created, msecs)} INFO {name}: {message}"
        with self.lock:  # type: ignore[union-attr]
            self._gather(loop, line + self.terminator)
            self._last = None  # no record stands for this line

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
            # Lines info_line() gathered have no record: handleError still reports the failure.
            self.handleError(record or logging.makeLogRecord({"msg": "gathered log lines"}))


_HANDLERS: weakref.WeakSet[RelayLogHandler] = weakref.WeakSet()


def _flush_before_fork() -> None:
    """A forked child must not write the lines its parent gathered a second time."""
    for handler in list(_HANDLERS):
        handler.flush()


os.register_at_fork(before=_flush_before_fork)


def info_line(logger: logging.Logger, msg: str, *args: object,
              fields: Mapping[str, object]) -> None:
    """``logger.info(msg, *args, extra=fields)`` for the lines every message logs.

    When configure_logging()'s handler is the only one the line would reach and an event loop
    runs on this thread, the line is made here and gathered straight away: the same text,
    without a LogRecord and the calls of the filters and the formatter. Those cost ~50 us a
    line inside the relay (two lines a message: 10 % of the small-mail rate). Anything else
    (the tests' log capture, another handler, filter or formatter, no loop, logging's
    one-mapping form of ``args``) gets logger.info itself.
    """
    loop = asyncio._get_running_loop()
    handler = _only_handler(logger) if loop is not None else None
    dressing = handler.dressing if handler is not None else None
    if loop is None or handler is None or dressing is None or \
            not dressing.worn_by(handler) or (len(args) == 1 and isinstance(args[0], Mapping)):
        logger.info(msg, *args, extra=dict(fields))
        return
    handler.gather_info(loop, dressing, logger.name, msg % args if args else msg, fields)


def _only_handler(logger: logging.Logger) -> RelayLogHandler | None:
    """The RelayLogHandler that alone takes this logger's info lines, unfiltered, or None.

    As Logger.handle and callHandlers go: the logger's own filters, then the handlers of it
    and its parents up to the first that does not propagate.
    """
    if logger.disabled or logger.filters or not logger.isEnabledFor(logging.INFO):
        return None
    found: RelayLogHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or not isinstance(handler, RelayLogHandler) or \
                    handler.level > logging.INFO:
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


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


def _dress(handler: RelayLogHandler, fmt: str, secrets: Iterable[str]) -> None:
    """The format, then the mask of ``secrets`` and the escaping of control characters."""
    dressing = Dressing(SecretFilter(secrets), EscapeControlsFilter(),
                        JSONFormatter() if fmt == "json" else TextFormatter())
    # One assignment each: a thread logging meanwhile sees the old filters or the new, never
    # none (info_line() goes the slow way until it finds those of the dressing it reads).
    handler.dressing = dressing
    handler.setFormatter(dressing.formatter)
    handler.filters = [dressing.secrets, dressing.escape]


def _set_levels(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # aiosmtpd logs every command at INFO and a traceback per failed TLS handshake.
    logging.getLogger("mail.log").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
