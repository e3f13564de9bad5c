"""What the listener hands to the rules and the spool: one accepted message and its context."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


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
