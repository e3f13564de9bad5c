"""X-IB-Client-Priority: Infobip's three priorities and the order the spool sends them in."""

from __future__ import annotations

# Lower sorts first: the scheduler sends HIGH before STANDARD before LOW.
PRIORITIES = {"HIGH": 0, "STANDARD": 1, "LOW": 2}
PRIORITY_NAMES = {value: key for key, value in PRIORITIES.items()}
DEFAULT_PRIORITY = PRIORITIES["STANDARD"]


def priority_value(header_value: str | None) -> int:
    """The sort key for an X-IB-Client-Priority value; absent or unknown means STANDARD."""
    if header_value is None:
        return DEFAULT_PRIORITY
    return PRIORITIES.get(header_value.strip().upper(), DEFAULT_PRIORITY)
