"""The X-IB-* header schema: the headers Infobip reads, their canonical names and value checks.

The rules compiler checks ``set``/``default`` values with it at start-up, and the
``client_headers: fix`` policy checks what applications send, so both agree on what Infobip
accepts. ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` (RFC 8058) are checked here too:
Infobip passes them on, and a wrong one-click header gets mail marked as spam.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

from relay.headers import HeaderBlock, is_field_name
from relay.infobip.priority import PRIORITIES
from relay.settings import did_you_mean

IB_HEADERS = (
    "X-IB-Bulk-Id",
    "X-IB-Callback-Data",
    "X-IB-Intermediate-Report",
    "X-IB-Notify-Content-Type",
    "X-IB-Notify-Url",
    "X-IB-Tracking-Url",
    "X-IB-Track",
    "X-IB-Track-Clicks",
    "X-IB-Track-Opens",
    "X-IB-Client-Priority",
    "X-IB-Application-Id",
    "X-IB-Entity-Id",
    "X-IB-Skip-Passive-Storage",
    "X-IB-Skip-Active-Storage",
)
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"

# CR and LF would start new header lines; NUL is refused by most MTAs.
FORBIDDEN_CHARS = re.compile(r"[\r\n\0]")
# "<uri>" in List-Unsubscribe and in From-like headers.
ANGLE_URI = re.compile(r"<\s*([^<>]*?)\s*>")

_CANONICAL = {name.lower(): name for name in (*IB_HEADERS, LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST)}
_UNSUBSCRIBE_LIST = re.compile(r"\s*<[^<>]*>\s*(?:,\s*<[^<>]*>\s*)*")


def canonical_header_name(name: str) -> str:
    """Return the canonical spelling of a known header, or ``name`` itself for other headers.

    Raises ValueError for an invalid field name or an unknown ``X-IB-*`` header.
    """
    if not is_field_name(name):
        raise ValueError(f"{name!r} is not a valid header name (printable ASCII except ':')")
    known = _CANONICAL.get(name.lower())
    if known is not None:
        return known
    if name.lower().startswith("x-ib-"):
        raise ValueError(f"unknown Infobip header {name!r}{did_you_mean(name, IB_HEADERS)}")
    return name


def is_schema_header(name: str) -> bool:
    """Whether the schema governs ``name``: any ``X-IB-*`` name and the two unsubscribe headers."""
    lower = name.lower()
    return lower.startswith("x-ib-") or lower in (
        LIST_UNSUBSCRIBE.lower(),
        LIST_UNSUBSCRIBE_POST.lower(),
    )


def validate_header_value(name: str, value: str) -> str:
    """Return ``value`` normalised for header ``name`` or raise ValueError saying why not."""
    canonical = canonical_header_name(name)
    if FORBIDDEN_CHARS.search(value):
        raise ValueError("must not contain CR, LF or NUL characters")
    value = value.strip(" \t")
    check = _VALUE_CHECKS.get(canonical)
    return value if check is None else check(value)


def has_https_uri(list_unsubscribe: str) -> bool:
    """Whether a ``List-Unsubscribe`` value offers an https URI (RFC 8058 one-click needs one)."""
    return any(uri.lower().startswith("https://") for uri in ANGLE_URI.findall(list_unsubscribe))


def _one_of(*allowed: str) -> Callable[[str], str]:
    by_lower = {choice.lower(): choice for choice in allowed}

    def check(value: str) -> str:
        try:
            return by_lower[value.lower()]
        except KeyError:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}") from None

    return check


def _length(low: int, high: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(value) < low:
            raise ValueError("must not be empty")
        if len(value) > high:
            raise ValueError(f"must be at most {high} characters, got {len(value)}")
        return value

    return check


def _check_url(value: str) -> str:
    message = f"must be an absolute http or https URL with a host, got {value!r}"
    if not value.isascii() or any(char.isspace() for char in value):
        raise ValueError(message)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(message) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(message)
    return value


def _check_list_unsubscribe(value: str) -> str:
    message = f"must be one or more <uri> separated by commas, got {value!r}"
    if not _UNSUBSCRIBE_LIST.fullmatch(value):
        raise ValueError(message)
    uris = ANGLE_URI.findall(value)
    for uri in uris:
        if not uri or any(char.isspace() for char in uri) or not urlsplit(uri).scheme:
            raise ValueError(message)
    return ", ".join(f"<{uri}>" for uri in uris)


def _check_one_click(value: str) -> str:
    if value.lower() != ONE_CLICK.lower():
        raise ValueError(f"must be exactly {ONE_CLICK}, got {value!r}")
    return ONE_CLICK


_BOOLEAN = _one_of("true", "false")
_VALUE_CHECKS: dict[str, Callable[[str], str]] = {
    "X-IB-Client-Priority": _one_of(*PRIORITIES),
    "X-IB-Notify-Content-Type": _one_of("application/json", "application/xml"),
    "X-IB-Track": _BOOLEAN,
    "X-IB-Track-Clicks": _BOOLEAN,
    "X-IB-Track-Opens": _BOOLEAN,
    "X-IB-Intermediate-Report": _BOOLEAN,
    "X-IB-Skip-Passive-Storage": _BOOLEAN,
    "X-IB-Skip-Active-Storage": _BOOLEAN,
    "X-IB-Notify-Url": _check_url,
    "X-IB-Tracking-Url": _check_url,
    "X-IB-Bulk-Id": _length(1, 100),
    "X-IB-Callback-Data": _length(1, 4000),
    "X-IB-Application-Id": _length(1, 255),
    "X-IB-Entity-Id": _length(1, 255),
    LIST_UNSUBSCRIBE: _check_list_unsubscribe,
    LIST_UNSUBSCRIBE_POST: _check_one_click,
}


CALLBACK_DATA = "X-IB-Callback-Data"
NOTIFY_URL = "X-IB-Notify-Url"


def report_defaults(head: bytes, queue_id: str, callback_template: str | None,
                    notify_url: str | None) -> bytes:
    """``head`` with X-IB-Callback-Data and X-IB-Notify-Url added where it has none.

    The callback data lets a report find its message even without the Infobip id; the notify
    URL makes Infobip POST the reports to the relay's webhook. ``head`` itself when nothing
    is added.
    """
    wanted = []
    if callback_template is not None:
        wanted.append((CALLBACK_DATA, callback_template.format(queue_id=queue_id)))
    if notify_url is not None:
        wanted.append((NOTIFY_URL, notify_url))
    if not wanted:
        return head
    block, offset = HeaderBlock.parse(head)
    added = False
    for name, value in wanted:
        if not block.has(name):
            block.add(name, value)
            added = True
    return block.to_bytes() + head[offset:] if added else head
