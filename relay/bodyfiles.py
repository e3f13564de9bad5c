"""Body files of the spool, their envelope sidecars and the quarantine of unknown ones.

A body over the spool's file threshold lives in ``bodies/<id>``, next to ``bodies/<id>.env``: a
small JSON copy of its envelope (sender, recipients, options, priority). Both are fsynced before
the row commits, so that a body whose row is lost (database truncated, replaced or restored from
an old backup) can still be delivered exactly: `infobip-relay queue recover`.

Two layouts. A message the listener streamed to disk keeps its body where it was written: the
``.partial`` file is renamed to ``bodies/<id>`` (written once, never copied) and holds the body
from the blank line on, while its header block (as the rules left it) is in the row and in the
sidecar's ``head``. Any other large message (one held whole in memory, and every body of
spools written before streamed bodies were kept apart) has the whole message in the file, and a
sidecar without ``head``.

Nothing here deletes a body the database does not know: such files move to ``bodies/orphaned/``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORPHANED_DIR = "orphaned"
ENVELOPE_SUFFIX = ".env"
# A body being received: renamed to ``bodies/<id>`` only once its message is spooled, so one
# left by a crash or a disconnect is recognisably unfinished (never acknowledged) and removed
# at start.
PARTIAL_SUFFIX = ".partial"
STANDARD_PRIORITY = 1
# Queue ids are upper-case hex today; anything outside this set is not a name the relay wrote,
# and an id given on the command line must never walk out of the directory.
_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


@dataclass(frozen=True, slots=True)
class SavedEnvelope:
    """What the body file lacks to be sent again: the envelope and the spool's bookkeeping."""

    mail_from: str
    recipients: tuple[str, ...]
    mail_options: tuple[str, ...] = ()
    priority: int = STANDARD_PRIORITY
    created: float = 0.0
    client: str | None = None
    auth_user: str | None = None
    listener: str | None = None
    route: str = "default"  # the named upstream (relay.envelope.DEFAULT_UPSTREAM)
    original_mail_from: str | None = None
    # The header block when the body file holds only the body (a streamed message); None: the
    # file is the whole message.
    head: bytes | None = None

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {
            "mail_from": self.mail_from, "recipients": list(self.recipients),
            "mail_options": list(self.mail_options), "priority": self.priority,
            "created": self.created, "client": self.client, "auth_user": self.auth_user,
            "listener": self.listener, "route": self.route,
            "original_mail_from": self.original_mail_from,
        }
        if self.head is not None:  # base64: a header block may hold 8-bit octets
            fields["head"] = base64.b64encode(self.head).decode("ascii")
        return json.dumps(fields, separators=(",", ":")).encode()

    @property
    def head_size(self) -> int:
        return 0 if self.head is None else len(self.head)

    @classmethod
    def from_json(cls, raw: bytes) -> SavedEnvelope:
        """Parse a sidecar; ValueError when it is not one (truncated, edited, foreign)."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        recipients = _strings(data.get("recipients"), "recipients")
        if not recipients:
            raise ValueError("no recipients")
        return cls(
            mail_from=_string(data.get("mail_from"), "mail_from"),
            recipients=recipients,
            mail_options=_strings(data.get("mail_options", []), "mail_options"),
            priority=_number(data.get("priority", STANDARD_PRIORITY), "priority", int),
            created=float(_number(data.get("created", 0.0), "created", float)),
            client=_optional_string(data.get("client"), "client"),
            auth_user=_optional_string(data.get("auth_user"), "auth_user"),
            listener=_optional_string(data.get("listener"), "listener"),
            # Sidecars written before named upstreams and sender rewriting lack these.
            route=_string(data.get("route", "default"), "route"),
            original_mail_from=_optional_string(data.get("original_mail_from"),
                                                "original_mail_from"),
            # Absent from every sidecar of a whole-message file (all of them, before).
            head=_optional_base64(data.get("head"), "head"),
        )


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _optional_string(value: Any, name: str) -> str | None:
    return None if value is None else _string(value, name)


def _optional_base64(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(_string(value, name), validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not base64") from None


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a list")
    return tuple(_string(item, name) for item in value)


def _number(value: Any, name: str, kind: type[int] | type[float]) -> Any:
    # bool is an int in Python, but true/false in a sidecar is damage, not a priority.
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} is not a number")
    return value


@dataclass(frozen=True, slots=True)
class OrphanedBody:
    """A quarantined body; ``envelope`` is None when its sidecar is missing or damaged.

    ``size`` is the message's: the file plus the header block its sidecar carries, if any.
    """

    id: str
    path: Path
    size: int
    envelope: SavedEnvelope | None
    problem: str | None = None


def is_message_id(name: str) -> bool:
    return _ID.fullmatch(name) is not None


def envelope_path(body: Path) -> Path:
    return body.with_name(body.name + ENVELOPE_SUFFIX)


def write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, never over an existing file) with ``data`` and fsync it."""
    _create_synced(path, lambda fd: _write_all(fd, data))


def adopt_partial(path: Path, partial: Path) -> None:
    """Make the streamed body ``partial`` the body file ``path``: fsync it, then rename it.

    The body was written once, as it arrived; it is neither copied nor read again. Queue ids
    are unique, so the rename never replaces another message's body. The caller fsyncs the
    directory that makes the new name durable.
    """
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, path)


def _create_synced(path: Path, fill: Callable[[int], None]) -> None:
    """Create ``path`` exclusively, let ``fill`` write it, fsync; no partial file is left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fill(fd)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink()
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine_unknown(bodies: Path, states: Mapping[str, str]) -> list[str]:
    """Move every body file (and sidecar) without a row in ``states`` to ``bodies/orphaned/``.

    ``states`` maps the ids of rows with a body file to their state. A row can be missing
    because the relay crashed between writing the body and committing the row (no client got
    250), or because the database was lost: the two look the same, so both are kept. Files of
    delivered rows are what an interrupted unlink left behind: the database says they are done.
    Returns the quarantined message ids.
    """
    if not bodies.is_dir():
        return []
    quarantined: set[str] = set()
    for path in bodies.iterdir():
        if not path.is_file():  # orphaned/ itself
            continue
        if path.name.endswith(PARTIAL_SUFFIX):
            _remove_partial(path)
            continue
        message_id = path.name.removesuffix(ENVELOPE_SUFFIX)
        state = states.get(message_id)
        if state == "delivered":
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        elif state is None:
            _move_to_quarantine(bodies, path)
            quarantined.add(message_id)
    if quarantined:
        fsync_dir(bodies / ORPHANED_DIR)
        fsync_dir(bodies)
    return sorted(quarantined)


def remove_partial_bodies(bodies: Path) -> None:
    """Remove the bodies left half-received in ``bodies`` (by a crash or a disconnect)."""
    if bodies.is_dir():
        for path in bodies.glob(f"*{PARTIAL_SUFFIX}"):
            _remove_partial(path)


def _remove_partial(path: Path) -> None:
    # Never acknowledged (DATA was not complete): nothing to keep.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _move_to_quarantine(bodies: Path, path: Path) -> None:
    target_dir = bodies / ORPHANED_DIR
    target_dir.mkdir(mode=0o700, exist_ok=True)
    target = target_dir / path.name
    if target.exists():  # the same id was quarantined before: keep both copies
        target = target_dir / f"{path.name}.{os.getpid()}-{path.stat().st_mtime_ns}"
    os.replace(path, target)


def list_orphans(bodies: Path) -> list[OrphanedBody]:
    """The quarantined bodies in ``bodies/orphaned/``, oldest file first."""
    directory = bodies / ORPHANED_DIR
    if not directory.is_dir():
        return []
    found = [_orphan(path) for path in directory.iterdir()
             if path.is_file() and is_message_id(path.name)]
    return sorted(found, key=lambda orphan: (orphan.path.stat().st_mtime, orphan.id))


def count_orphans(bodies: Path) -> int:
    directory = bodies / ORPHANED_DIR
    if not directory.is_dir():
        return 0
    return sum(1 for path in directory.iterdir() if is_message_id(path.name))


def _orphan(path: Path) -> OrphanedBody:
    size = path.stat().st_size
    try:
        raw = envelope_path(path).read_bytes()
    except FileNotFoundError:
        return OrphanedBody(path.name, path, size, None, "no envelope file")
    except OSError as exc:
        return OrphanedBody(path.name, path, size, None, f"cannot read envelope file: {exc}")
    try:
        envelope = SavedEnvelope.from_json(raw)
    except ValueError as exc:
        return OrphanedBody(path.name, path, size, None, f"damaged envelope file: {exc}")
    return OrphanedBody(path.name, path, size + envelope.head_size, envelope)


def restore_files(bodies: Path, orphan: OrphanedBody, envelope: SavedEnvelope) -> Path:
    """Put a quarantined body back in ``bodies/`` with ``envelope`` as its sidecar.

    Sidecar first, body last, each a rename: a crash in between leaves files that the next
    start quarantines again, with nothing lost. Returns the body's path.
    """
    quarantine = bodies / ORPHANED_DIR
    sidecar = quarantine / f"{orphan.id}{ENVELOPE_SUFFIX}.new"
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()  # a recovery interrupted before its rename
    write_synced(sidecar, envelope.to_json())
    body = bodies / orphan.id
    os.replace(sidecar, envelope_path(body))
    os.replace(orphan.path, body)
    with contextlib.suppress(FileNotFoundError):
        envelope_path(orphan.path).unlink()
    fsync_dir(quarantine)
    fsync_dir(bodies)
    return body
