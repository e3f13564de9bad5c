"""What Infobip's SMTP endpoint says back: the message id in the reply to DATA."""

from __future__ import annotations

import re

# "250 2.6.0 Message queued as <id>" (infobip-facts.md); the brackets are optional elsewhere.
_QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)>?", re.IGNORECASE)


def parse_message_id(reply: str) -> str | None:
    """Infobip's message id from a DATA reply (delivery reports carry it), or None."""
    match = _QUEUED_AS.search(reply)
    return match.group(1) if match else None
