"""Infobip's delivery reports and tracking events: JSON payloads -> small frozen records.

The same report shape arrives two ways (infobip-facts.md): POSTed to a message's
X-IB-Notify-Url, and served once by ``GET /email/1/reports``. Tracking events (OPENED, CLICKED,
UNSUBSCRIBED, COMPLAINED, LATE_BOUNCE) are POSTed to the same kind of URL. Pure functions only:
no I/O, so the webhook, the poller and the tests share them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

# Status groups by id, for a report that carries only groupId.
GROUPS = {1: "PENDING", 2: "UNDELIVERABLE", 3: "DELIVERED", 4: "EXPIRED", 5: "REJECTED"}
# A report in one of these groups is the last word on its recipient.
FINAL_GROUPS = frozenset({"DELIVERED", "UNDELIVERABLE", "EXPIRED", "REJECTED"})
# ...and one of these makes the recipient (and its message) bounced.
BOUNCE_GROUPS = frozenset({"UNDELIVERABLE", "EXPIRED", "REJECTED"})
TRACKING_TYPES = frozenset({"OPENED", "CLICKED", "UNSUBSCRIBED", "COMPLAINED", "LATE_BOUNCE"})
LATE_BOUNCE = "LATE_BOUNCE"
# Fields are cut to this length: a report is stored, and its size must not be the sender's
# choice.
_MAX_FIELD = 500


class PayloadError(ValueError):
    """A body that is not a batch of reports or tracking events."""


@dataclass(frozen=True, slots=True)
class Report:
    """What one delivery report says about one recipient (kept as ``recipients[].report``)."""

    group: str
    status: str
    error: str
    error_id: int | None
    permanent: bool
    done_at: str | None

    @property
    def final(self) -> bool:
        return self.group in FINAL_GROUPS

    @property
    def bounced(self) -> bool:
        return self.group in BOUNCE_GROUPS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(group=data["group"], status=data["status"], error=data["error"],
                   error_id=data.get("error_id"), permanent=bool(data.get("permanent")),
                   done_at=data.get("done_at"))


@dataclass(frozen=True, slots=True)
class Tracking:
    """The last tracking event of one recipient (kept as ``recipients[].tracking``)."""

    type: str
    at: float | None  # sendDateTime, seconds
    url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tracking:
        return cls(type=data["type"], at=data.get("at"), url=data.get("url"))


@dataclass(frozen=True, slots=True)
class Incoming:
    """One item of a batch, addressed by the keys that find its recipient."""

    kind: str  # "report" or "tracking"
    message_id: str | None  # Infobip's, from the DATA reply
    to: str
    callback_data: str | None
    report: Report | None = None
    tracking: Tracking | None = None
    event_id: str | None = None

    @property
    def key(self) -> str:
        """Identical items (Infobip retries, a repeated POST) share this key."""
        body = self.event_id if self.event_id else json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(f"{self.kind}\0{body}".encode()).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message_id": self.message_id, "to": self.to,
                "callback_data": self.callback_data, "event_id": self.event_id,
                "report": self.report.as_dict() if self.report else None,
                "tracking": self.tracking.as_dict() if self.tracking else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Incoming:
        report, tracking = data.get("report"), data.get("tracking")
        return cls(kind=data["kind"], message_id=data.get("message_id"), to=data["to"],
                   callback_data=data.get("callback_data"), event_id=data.get("event_id"),
                   report=Report.from_dict(report) if report else None,
                   tracking=Tracking.from_dict(tracking) if tracking else None)


def parse_body(body: bytes) -> tuple[list[Incoming], int]:
    """A webhook body or a page of the reports API: (items, count of unusable items).

    ``{"results": [...]}`` (reports, and tracking events wrapped the same way), a bare list,
    or one tracking event object. PayloadError when it is none of these.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise PayloadError("not JSON") from None
    if isinstance(payload, dict) and isinstance(payload.get("results"), list):
        items = payload["results"]
    elif isinstance(payload, list):
        items = payload
    elif isinstance(payload, dict) and "notificationType" in payload:
        items = [payload]
    else:
        raise PayloadError('expected {"results": [...]}')
    parsed = [parse_item(item) for item in items]
    good = [item for item in parsed if item is not None]
    return good, len(parsed) - len(good)


def parse_item(item: object) -> Incoming | None:
    """One report or tracking event; None when it lacks what would find its recipient."""
    if not isinstance(item, dict):
        return None
    if "notificationType" in item:
        return _tracking(item)
    return _report(item)


def _report(item: dict[str, Any]) -> Incoming | None:
    to = _text(item.get("to"))
    status = _mapping(item.get("status"))
    error = _mapping(item.get("error"))
    group = _group(status)
    if not to or group is None:
        return None
    report = Report(group=group, status=_text(status.get("name")) or group,
                    error=_text(error.get("name")) or "", error_id=_int(error.get("id")),
                    permanent=error.get("permanent") is True, done_at=_text(item.get("doneAt")))
    return Incoming("report", _text(item.get("messageId")), to,
                    _text(item.get("callbackData")), report=report)


def _tracking(item: dict[str, Any]) -> Incoming | None:
    kind = _text(item.get("notificationType"))
    to = _text(item.get("recipient")) or _text(item.get("to"))
    if kind is None or kind.upper() not in TRACKING_TYPES or not to:
        return None
    sent = item.get("sendDateTime")
    at = sent / 1000.0 if isinstance(sent, int | float) and not isinstance(sent, bool) else None
    tracking = Tracking(type=kind.upper(), at=at, url=_text(item.get("url")))
    return Incoming("tracking", _text(item.get("messageId")), to,
                    _text(item.get("callbackData")), tracking=tracking,
                    event_id=_text(item.get("eventId")))


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _group(status: dict[str, Any]) -> str | None:
    name = _text(status.get("groupName"))
    if name and name.upper() in GROUPS.values():
        return name.upper()
    group_id = _int(status.get("groupId"))
    return GROUPS.get(group_id) if group_id is not None else None


def _text(value: object) -> str | None:
    """A string field (a number too: messageId may come as one), cut to a bounded length."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        text = str(value).strip()
        return text[:_MAX_FIELD] or None
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None
