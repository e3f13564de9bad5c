"""What the listener hands to the rules and the spool: one accepted message and its context."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# The name of the top-level ``upstream``: where a message goes when no rule routes it elsewhere.
DEFAULT_UPSTREAM = "default"


@dataclass(frozen=True, slots=True)
class MessageContext:
    """Facts about a message that rules can match on and templates can render."""

    queue_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    client_ip: str
    auth_user: str | None
    listener: str
    size: int
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class Envelope:
    """An accepted message: context plus the raw bytes (CRLF line endings) to forward."""

    context: MessageContext
    data: bytes
    # ESMTP options the client used that must be repeated upstream (BODY=8BITMIME, SMTPUTF8).
    mail_options: tuple[str, ...] = ()
    # A streamed message: ``data`` is then only the header block, and the body (from the blank
    # line on) waits in this file under the spool's bodies/ directory. The spool renames it
    # into place (never joined to the header block).
    body_file: Path | None = None
    # The octets in ``body_file``, counted as they were written (no stat of the file).
    body_size: int = 0
    # The named upstream the rules chose (``route``), and the envelope sender the client gave
    # when a ``rewrite`` changed it (None: not rewritten; ``context.mail_from`` is what is sent).
    route: str = DEFAULT_UPSTREAM
    original_mail_from: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) + self.body_size
