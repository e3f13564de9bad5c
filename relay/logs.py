"""Logging setup: one line per event, text or JSON, with every configured secret masked."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

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
    """The handler configure_logging() installs: a reload finds it by its class."""


def configure_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
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
