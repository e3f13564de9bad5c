"""The durable queue: SQLite in WAL mode with synchronous=FULL under ``queue.path``.

`SpoolDB` is the synchronous store, used directly by the CLI (another process may be serving).
`Spool` wraps one `SpoolDB` in a dedicated writer thread and batches concurrent operations into one
transaction and one fsync (group commit): 50 sessions finishing DATA at once cost one fsync.
`Spool.open` is how the relay opens its spool: under the directory's lock (one relay per spool),
after taking over the spools of worker processes that no longer exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal, cast

from relay.bodyfiles import (
    ORPHANED_DIR,
    OrphanedBody,
    SavedEnvelope,
    adopt_partial,
    count_orphans,
    envelope_path,
    fsync_dir,
    list_orphans,
    quarantine_unknown,
    remove_partial_bodies,
    restore_files,
    write_synced,
)
from relay.envelope import DEFAULT_UPSTREAM, Envelope
from relay.errors import SpoolError
from relay.headers import header_end
from relay.infobip.priority import DEFAULT_PRIORITY, PRIORITY_NAMES
from relay.infobip.reports import LATE_BOUNCE, Incoming, Report, Tracking
from relay.outgoing import MessageData, SpooledBody

log = logging.getLogger("relay.spool")

State = Literal["queued", "deferred", "failed", "delivered", "bounced"]
STATES: tuple[State, ...] = ("queued", "deferred", "failed", "delivered", "bounced")
RecipientState = Literal["pending", "delivered", "failed", "bounced"]
DB_NAME = "queue.sqlite3"
BODIES_DIR = "bodies"
# Held (flock) by the relay serving the spool; the CLI takes it to know that none does.
LOCK_FILE = "relay.lock"
# Bodies above this size go to a file of their own (written and fsynced before the row commits):
# in SQLite a 1 MiB blob costs 256 overflow pages to write, checkpoint and free again. Below it
# the row is cheaper: a file costs three fsyncs of its own (body, sidecar, directory) where rows
# share their batch's one. At 64 KiB, a mix with 25 % of 150 KiB mail ran 347-402 msgs/s end to
# end; at 256 KiB 431-440 with 10-15 % less CPU (the 4 KiB probe's p99 rose from 31-61 to
# 88-115 ms, still under Postfix's 176 ms).
FILE_BODY_THRESHOLD = 256 * 1024
# Concurrent large-body writes: enough for a burst of uploads to fsync side by side.
BODY_WRITERS = 16
# Where a message's bytes are: the `body_file` column.
IN_ROW = 0  # `data` holds the whole message
# bodies/<id> holds the whole message, `data` is NULL: a large message the relay had whole in
# memory (a header block near its 256 KiB limit and a small body; a caller of insert), and
# every body file of spools written before SPLIT.
WHOLE_FILE = 1
# `data` holds the header block as the rules left it, bodies/<id> the rest (from the blank line
# on) where the listener streamed it: a large body is written to disk once.
SPLIT = 2
# The rows that have a body file (and sidecar) in bodies/.
_HAS_BODY_FILE = "body_file IN (1, 2)"
_MAX_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    mail_from    TEXT NOT NULL,
    recipients   TEXT NOT NULL,
    mail_options TEXT NOT NULL,
    size         INTEGER NOT NULL,
    client       TEXT,
    auth_user    TEXT,
    listener     TEXT,
    last_reply   TEXT,
    upstream_id  TEXT,
    data         BLOB,
    body_file    INTEGER NOT NULL DEFAULT 0,
    auth_deferred INTEGER NOT NULL DEFAULT 0,
    headers      BLOB,
    awaiting_report INTEGER NOT NULL DEFAULT 0,
    route        TEXT NOT NULL DEFAULT 'default',
    original_mail_from TEXT
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt);
"""
# Delivery reports (issue 11). `sent`: which message and recipient an Infobip message id (from
# the DATA reply) stands for. `inbox`: reports and tracking events not matched yet (they can
# arrive before the 250 is committed), kept for REPORT_WINDOW. `seen`: the keys of every item
# received in REPORT_WINDOW, so that a repeated POST or page changes and counts nothing.
_REPORTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (
    upstream_id TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    PRIMARY KEY (upstream_id, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    key      TEXT PRIMARY KEY,
    received REAL NOT NULL,
    item     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    key      TEXT PRIMARY KEY,
    received REAL NOT NULL
) WITHOUT ROWID;
"""
# Infobip keeps reports for 48 hours: an item unmatched for that long never will be.
REPORT_WINDOW = 48 * 3600.0
# A delivered record waits for its final report at most this long (bounds the spool).
REPORT_WAIT_CAP = 72 * 3600.0
# How delivery words a recipient that ran past queue.max_age (relay.delivery).
EXPIRED_PREFIX = "expired after max_age: "
# The original header block kept for a DSN is cut (at a line end) to this size.
_MAX_KEPT_HEADERS = 64 * 1024
# A `messages` table without these is not a spool of ours (body_file is added to old spools).
_REQUIRED_COLUMNS = frozenset({
    "id", "state", "priority", "created", "updated", "next_attempt", "attempts", "mail_from",
    "recipients", "mail_options", "size", "client", "auth_user", "listener", "last_reply",
    "upstream_id", "data"})
_INSERT = ("INSERT INTO messages (id, state, priority, created, updated, next_attempt,"
           " attempts, mail_from, recipients, mail_options, size, client, auth_user,"
           " listener, data, body_file, headers, route, original_mail_from)"
           " VALUES (?, 'queued', ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: RecipientState = "pending"
    reply: str | None = None
    # Infobip's message id from the DATA reply that accepted this recipient.
    upstream_id: str | None = None
    report: Report | None = None
    tracking: Tracking | None = None

    def merged_with(self, stored: Recipient) -> Recipient:
        """This attempt's view of a recipient, keeping what reports wrote meanwhile.

        A report that arrived during the attempt (for a recipient accepted earlier) must not
        be overwritten by the attempt's stale copy, and a bounce is never undone.
        """
        if stored.report is None and stored.tracking is None and stored.state != "bounced":
            return self
        state = "bounced" if stored.state == "bounced" else self.state
        return replace(self, state=state, report=stored.report or self.report,
                       tracking=stored.tracking or self.tracking)


@dataclass(frozen=True, slots=True)
class Failed:
    """A recipient that failed permanently, with what says why (the bouncer words the DSN)."""

    address: str
    reply: str | None = None  # the SMTP reply at send time (a 5xx, or the max_age expiry)
    expired: bool = False  # ran past queue.max_age
    report: Report | None = None  # an UNDELIVERABLE, EXPIRED or REJECTED report
    tracking: Tracking | None = None  # a LATE_BOUNCE


@dataclass(frozen=True, slots=True)
class Generated:
    """A message the relay writes itself (a DSN), to be queued like any other."""

    id: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


# Called inside the transaction that makes recipients fail: (message, its kept header block,
# the failures) -> the DSN to queue, or None. Set by the relay when bounces are on.
Bouncer = Callable[["QueuedMessage", bytes, list[Failed]], Generated | None]


@dataclass(frozen=True, slots=True)
class Bounced:
    """A recipient that a report or tracking event bounced (logged once committed)."""

    queue_id: str
    address: str
    upstream_id: str | None
    status: str
    error: str


@dataclass
class Applied:
    """What a batch of reports and tracking events did to the spool."""

    new: list[Incoming]
    duplicates: int = 0
    unmatched: int = 0
    bounced: list[Bounced] | None = None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A spool record without its data (listing, scheduling, inspection)."""

    id: str
    state: State
    priority: int
    created: float
    updated: float
    next_attempt: float
    attempts: int
    mail_from: str
    recipients: tuple[Recipient, ...]
    mail_options: tuple[str, ...]
    size: int
    client: str | None
    auth_user: str | None
    listener: str | None
    last_reply: str | None
    upstream_id: str | None
    route: str = DEFAULT_UPSTREAM  # the named upstream that delivers it
    original_mail_from: str | None = None  # the client's sender, when a rule rewrote it

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.state == "pending")

    @property
    def priority_name(self) -> str:
        return PRIORITY_NAMES.get(self.priority, str(self.priority))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt achieved, decided by the delivery module."""

    recipients: tuple[Recipient, ...]
    state: State
    next_attempt: float
    attempts: int
    last_reply: str | None
    upstream_id: str | None = None
    # Deferred only because the upstream refused our credentials: due at once after a restart
    # or a reload with other upstream settings.
    auth_deferred: bool = False


_COLUMNS = ("id, state, priority, created, updated, next_attempt, attempts, mail_from, recipients, "
            "mail_options, size, client, auth_user, listener, last_reply, upstream_id, route, "
            "original_mail_from")


_RECORD = ("UPDATE messages SET state=?, recipients=?, next_attempt=?, attempts=?, last_reply=?,"
           " upstream_id=COALESCE(?, upstream_id), auth_deferred=?, awaiting_report=?, updated=?"
           " WHERE id=?")
# A delivered message keeps its record (for `queue list --state delivered`) but not its bytes.
_RECORD_DELIVERED = _RECORD.replace(" WHERE", ", data=NULL WHERE")
_APPLY = ("UPDATE messages SET state=?, recipients=?, awaiting_report=?, updated=? WHERE id=?")
# Rows per bulk statement: 512 x 17 values stays below SQLite's 32,766 bound variables.
_BULK_ROWS = 512
_INSERT_KIND = 13  # the body_file column in _INSERT's values


@functools.lru_cache(maxsize=64)
def _bulk_insert(count: int) -> str:
    marks = "(?, 'queued', ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    return _INSERT[:_INSERT.index(" VALUES")] + " VALUES " + ", ".join([marks] * count)


_RECIPIENTS_OF = ("SELECT json_group_array(json_array(id, recipients, body_file)) FROM messages"
                  " WHERE id IN ({marks})")
_BULK_RECORD = (
    "UPDATE messages SET state=v.column2, recipients=v.column3, next_attempt=v.column4,"
    " attempts=v.column5, last_reply=v.column6,"
    " upstream_id=COALESCE(v.column7, messages.upstream_id), auth_deferred=v.column8,"
    " awaiting_report=v.column9, updated=v.column10,"
    " data=CASE WHEN v.column11 THEN NULL ELSE messages.data END"
    " FROM (VALUES {rows}) AS v WHERE messages.id=v.column1")


@functools.lru_cache(maxsize=64)
def _bulk_record(count: int) -> str:
    """_RECORD for ``count`` rows at once: (id, the 9 values of _RECORD, drop) per row."""
    rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count)
    return _BULK_RECORD.format(rows=rows)


@dataclass(frozen=True, slots=True)
class _Stored:
    """What recording an outcome reads of a message's row."""

    recipients: tuple[Recipient, ...]
    files: bool  # body_file is not IN_ROW


@dataclass(frozen=True, slots=True)
class _Change:
    """What recording one outcome writes: the row's new values, index rows, failures."""

    message_id: str
    recipients: tuple[Recipient, ...]
    drop: bool
    files: bool  # the message has body files (not IN_ROW): dropping it removes them
    values: tuple[Any, ...]  # (id, state, recipients, ..., updated, drop) as _bulk_record takes
    index: list[tuple[str, str, str]]
    failed: list[Failed]

    @property
    def record_values(self) -> tuple[Any, ...]:
        """The same for _RECORD: without the drop flag, the id last (its WHERE)."""
        return (*self.values[1:-1], self.values[0])


def _decode_recipient(item: dict[str, Any]) -> Recipient:
    report, tracking = item.get("rep"), item.get("t")
    return Recipient(item["a"], item["s"], item.get("r"), item.get("u"),
                     Report.from_dict(report) if report else None,
                     Tracking.from_dict(tracking) if tracking else None)


def _decode_recipients(text: str) -> tuple[Recipient, ...]:
    return tuple(_decode_recipient(item) for item in json.loads(text))


def message_state(recipients: Iterable[Recipient]) -> State:
    """A message's state from its recipients': any bounced recipient makes it bounced."""
    states = {r.state for r in recipients}
    if "pending" in states:
        return "deferred"
    if "bounced" in states:
        return "bounced"
    if "failed" in states:
        return "failed"
    return "delivered"


def _awaiting_report(recipients: Iterable[Recipient]) -> bool:
    """Whether a recipient that Infobip accepted still lacks its final report."""
    return any(r.state == "delivered" and (r.report is None or not r.report.final)
               for r in recipients)


def _keeps_data(recipients: Iterable[Recipient]) -> bool:
    """Pending recipients need the bytes to be sent, failed ones to be retried."""
    return any(r.state in ("pending", "failed") for r in recipients)


def _row_to_message(row: tuple[Any, ...]) -> QueuedMessage:
    recipients = _decode_recipients(row[8])
    return QueuedMessage(
        id=row[0], state=row[1], priority=row[2], created=row[3], updated=row[4],
        next_attempt=row[5], attempts=row[6], mail_from=row[7], recipients=recipients,
        mail_options=tuple(json.loads(row[9])), size=row[10], client=row[11], auth_user=row[12],
        listener=row[13], last_reply=row[14], upstream_id=row[15], route=row[16],
        original_mail_from=row[17],
    )


def _encode_recipient(r: Recipient) -> dict[str, Any]:
    item: dict[str, Any] = {"a": r.address, "s": r.state, "r": r.reply}
    if r.upstream_id is not None:
        item["u"] = r.upstream_id
    if r.report is not None:
        item["rep"] = r.report.as_dict()
    if r.tracking is not None:
        item["t"] = r.tracking.as_dict()
    return item


def _encode_recipients(recipients: Iterable[Recipient]) -> str:
    return json.dumps([_encode_recipient(r) for r in recipients], separators=(",", ":"))


class SpoolDB:
    """Synchronous access to the spool database. Not thread-safe: one thread per instance."""

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.directory = directory
        self.path = directory / DB_NAME
        self.bodies = directory / BODIES_DIR
        if create:
            _make_private_dir(directory)
            _make_private_database(self.path)
        elif not self.path.exists():
            raise SpoolError(f"no spool at {self.path}")
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                        check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        try:
            # Before anything writes: a damaged or foreign file must stay exactly as found.
            self.is_new = self._check_database()
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a 250 survives power loss.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=30000")
            # Debian's SQLite is built with SECURE_DELETE: every deleted row's pages were
            # zeroed and written again, so a delivered 150 KiB body cost 460 KiB of writes
            # instead of 260 (and a third more CPU in the writer thread). FAST still zeroes
            # what shares a page with live rows; freed pages keep old bytes until reused,
            # like an unlinked body file or a Postfix queue file, in the same 0700 spool.
            self.conn.execute("PRAGMA secure_delete=FAST")
            self.conn.executescript(_SCHEMA)
            self._add_missing_columns()
            self.conn.executescript(_REPORTS_SCHEMA)
        except (sqlite3.Error, SpoolError) as exc:
            self.conn.close()
            if isinstance(exc, SpoolError):
                raise
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        if create:
            # After the checks: a foreign file keeps even its mode.
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                restrict_mode(directory / name, 0o600)
        # Files to remove once the transaction that stops referring to them has committed.
        self._unlink_after_commit: list[Path] = []
        # Bounces (issue 11): the relay sets these when reports.bounces.sender is set.
        self.keep_headers = False
        self.bouncer: Bouncer | None = None
        # insert_many/record_many need UPDATE ... FROM (3.33) and JSON functions (built in
        # since 3.38); an older SQLite runs the writes one by one.
        self.bulk = sqlite3.sqlite_version_info >= (3, 38, 0)
        # Whether upstream ids are indexed for matching delivery reports: only when the relay
        # takes reports in (one statement per delivered message fewer otherwise).
        self.index_sent = True

    def _check_database(self) -> bool:
        """Refuse a damaged or foreign database (SpoolError); True when it is new or empty."""
        try:
            tables = {row[0] for row in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return True
            self._check_schema(tables)
            # Reads every page once: 12 ms for 10,000 messages of 1 KB (0.1 s from a cold
            # disk), far cheaper than meeting the damage later, mid-delivery, under new mail.
            problem = self.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.OperationalError:
            raise  # locked, unreadable: not a verdict on the file's content
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise SpoolError(f"{self.path} is not an SQLite database, so not a spool; "
                                 "it was left untouched") from None
            problem = str(exc)
        if problem != "ok":
            detail = " ".join(str(problem).split())
            raise SpoolError(f"spool database {self.path} is damaged ({detail}); it was left "
                             "untouched: keep a copy of the spool directory, then repair the "
                             "file or move it aside (see `infobip-relay queue recover --help`)")
        return False

    def _check_schema(self, tables: set[str]) -> None:
        if "messages" not in tables:
            raise SpoolError(f"{self.path} is an SQLite database of something else (tables: "
                             f"{', '.join(sorted(tables))}), not a spool; it was left untouched")
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(messages)")}
        missing = _REQUIRED_COLUMNS - columns
        if missing:
            raise SpoolError(f"{self.path} has a messages table without "
                             f"{', '.join(sorted(missing))}: not a spool; it was left untouched")

    def _add_missing_columns(self) -> None:
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(messages)")}
        if "body_file" not in columns:  # spools written before bodies could live in files
            self.conn.execute(
                "ALTER TABLE messages ADD COLUMN body_file INTEGER NOT NULL DEFAULT 0")
        if "auth_deferred" not in columns:  # spools written before auth deferrals were marked
            self.conn.execute(
                "ALTER TABLE messages ADD COLUMN auth_deferred INTEGER NOT NULL DEFAULT 0")
            # The one mark such deferrals had: the reply written by Delivery._on_auth_failure.
            self.conn.execute(
                "UPDATE messages SET auth_deferred=1 WHERE state='deferred'"
                " AND last_reply LIKE 'upstream authentication failed:%'")
        if "headers" not in columns:  # spools written before delivery reports (issue 11)
            self.conn.execute("ALTER TABLE messages ADD COLUMN headers BLOB")
            self.conn.execute(
                "ALTER TABLE messages ADD COLUMN awaiting_report INTEGER NOT NULL DEFAULT 0")
        if "route" not in columns:  # spools written before named upstreams: all go to default
            self.conn.execute(
                "ALTER TABLE messages ADD COLUMN route TEXT NOT NULL DEFAULT 'default'")
        if "original_mail_from" not in columns:  # ... and before sender rewriting
            self.conn.execute("ALTER TABLE messages ADD COLUMN original_mail_from TEXT")

    def close(self) -> None:
        self.conn.close()

    # -- writes (each runs inside a transaction opened by the caller or by `transaction`)

    def transaction(self, operations: Callable[[], Any]) -> Any:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = operations()
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.forget_unlinks(0)
            raise
        self.conn.execute("COMMIT")
        self.unlink_committed()
        return result

    def unlink_committed(self) -> None:
        """Remove the body files of rows that a just-committed transaction let go of."""
        unlink_files(self.take_unlinks())

    def take_unlinks(self) -> list[Path]:
        """The body files a just-committed transaction let go of, for the caller to remove."""
        paths, self._unlink_after_commit = self._unlink_after_commit, []
        return paths

    def forget_unlinks(self, keep: int) -> None:
        """A rolled-back write still refers to its files: keep them."""
        del self._unlink_after_commit[keep:]

    @property
    def pending_unlinks(self) -> int:
        return len(self._unlink_after_commit)

    def insert(self, envelope: Envelope, priority: int, now: float, *,
               written: int | None = None) -> None:
        """Add a queued message; ``written``: its body files are written already, this size."""
        row = self._insert_row(envelope, priority, now, written)
        try:
            self.conn.execute(_INSERT, row)
        except sqlite3.Error:
            self._unlink_new_body(envelope, row)
            raise

    def insert_many(self, items: Sequence[tuple[Envelope, int, float, int | None]]) -> None:
        """Several `insert`s in one statement: one step of SQLite, so one hand-off of the GIL
        for the writer thread, where each statement costs one (see Spool). Raises like insert;
        the caller then runs them one by one to find the failing one."""
        rows = [self._insert_row(*item) for item in items]
        for start in range(0, len(rows), _BULK_ROWS):
            chunk = rows[start:start + _BULK_ROWS]
            self.conn.execute(_bulk_insert(len(chunk)), [value for row in chunk for value in row])

    def _insert_row(self, envelope: Envelope, priority: int, now: float,
                    written: int | None) -> tuple[Any, ...]:
        ctx = envelope.context
        recipients = _encode_recipients(Recipient(address) for address in ctx.rcpt_tos)
        size = envelope.size if written is None else written
        kind = body_kind(envelope, size)
        if kind != IN_ROW and written is None:
            self.write_body_files(envelope, priority, now)
        return (ctx.queue_id, priority, now, now, now, ctx.mail_from, recipients,
                json.dumps(list(envelope.mail_options)), size, ctx.client_ip,
                ctx.auth_user, ctx.listener, None if kind == WHOLE_FILE else envelope.data,
                kind, _kept_headers(envelope.data) if self.keep_headers else None,
                envelope.route, envelope.original_mail_from)

    def _unlink_new_body(self, envelope: Envelope, row: tuple[Any, ...]) -> None:
        """A message whose row could not be added leaves no body files behind."""
        if row[_INSERT_KIND] != IN_ROW:
            for path in self._body_files(envelope.context.queue_id):
                with contextlib.suppress(OSError):
                    path.unlink()

    def write_body_files(self, envelope: Envelope, priority: int, now: float) -> None:
        """Write and fsync a message's body file and sidecar (no database: any thread)."""
        ctx = envelope.context
        # A streamed body's file lacks the header block: the sidecar keeps it for recovery.
        head = envelope.data if envelope.body_file is not None else None
        saved = SavedEnvelope(ctx.mail_from, ctx.rcpt_tos, envelope.mail_options, priority,
                              now, ctx.client_ip, ctx.auth_user, ctx.listener, envelope.route,
                              envelope.original_mail_from, head)
        self._write_body(ctx.queue_id, envelope, saved)

    def _body_path(self, message_id: str) -> Path:
        return self.bodies / message_id

    def _body_files(self, message_id: str) -> tuple[Path, Path]:
        """The body and its envelope sidecar."""
        body = self._body_path(message_id)
        return body, envelope_path(body)

    def _write_body(self, message_id: str, envelope: Envelope, saved: SavedEnvelope) -> None:
        """Write and fsync a body file and its envelope sidecar before the row commits.

        A streamed body is not written again: its file is fsynced and renamed (SPLIT). The
        sidecar lets `queue recover` send the message again exactly if the row is ever lost;
        the rename and the two files share one fsync of the directory.
        """
        body, sidecar = self._body_files(message_id)
        if envelope.body_file is None:
            self.bodies.mkdir(mode=0o700, exist_ok=True)
            write_synced(body, envelope.data)
        else:  # streamed into bodies/ already: the directory is there
            adopt_partial(body, envelope.body_file)
        try:
            write_synced(sidecar, saved.to_json())
            fsync_dir(self.bodies)
        except OSError:
            for path in (body, sidecar):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise

    def record(self, message_id: str, outcome: Outcome, now: float) -> bool:
        """Store an attempt's outcome; delivered messages drop their data. False if deleted.

        Reports that arrived during the attempt are kept; recipients accepted with an Infobip
        id are indexed for reports; those that failed for good get a DSN (when bounces are on).
        """
        # Only the recipients: the whole row is read (and decoded) only for a DSN.
        row = self.conn.execute("SELECT recipients, body_file FROM messages WHERE id=?",
                                (message_id,)).fetchone()
        if row is None:
            return False
        change = self._change(message_id, outcome, now,
                              _Stored(_decode_recipients(row[0]), row[1] != IN_ROW))
        cursor = self.conn.execute(_RECORD_DELIVERED if change.drop else _RECORD,
                                   change.record_values)
        self._index(change.index)
        self._after_record(change, now)
        return cursor.rowcount > 0

    def record_many(self, items: Sequence[tuple[str, Outcome, float]]) -> list[bool]:
        """Several `record`s in three statements whatever their number (see insert_many):
        one reads every row's recipients, one updates every row, one indexes upstream ids."""
        ids = [message_id for message_id, _, _ in items]
        if len(set(ids)) < len(ids):  # one row twice: each must see the other's change
            return [self.record(*item) for item in items]
        stored = self._recipients_of(ids)
        changes = [(self._change(message_id, outcome, now, stored[message_id]), now)
                   for message_id, outcome, now in items if message_id in stored]
        for start in range(0, len(changes), _BULK_ROWS):
            chunk = changes[start:start + _BULK_ROWS]
            self.conn.execute(_bulk_record(len(chunk)),
                              [value for change, _ in chunk for value in change.values])
        self._index([row for change, _ in changes for row in change.index])
        for change, now in changes:
            self._after_record(change, now)
        return [message_id in stored for message_id in ids]

    def _recipients_of(self, ids: list[str]) -> dict[str, _Stored]:
        """The stored recipients of those of ``ids`` that exist, in one row (one step)."""
        found: dict[str, _Stored] = {}
        for start in range(0, len(ids), _BULK_ROWS):
            chunk = ids[start:start + _BULK_ROWS]
            marks = ",".join("?" * len(chunk))
            (pairs,) = self.conn.execute(_RECIPIENTS_OF.format(marks=marks), chunk).fetchone()
            found.update((message_id, _Stored(_decode_recipients(text), kind != IN_ROW))
                         for message_id, text, kind in json.loads(pairs))
        return found

    def _change(self, message_id: str, outcome: Outcome, now: float,
                stored: _Stored) -> _Change:
        before = stored.recipients
        recipients = _merge(outcome.recipients, before)
        state = outcome.state if outcome.state == "deferred" else message_state(recipients)
        drop = not _keeps_data(recipients)
        index = [(new.upstream_id, new.address.lower(), message_id)
                 for old, new in zip(before, recipients, strict=True)
                 if new.upstream_id is not None and old.upstream_id != new.upstream_id] \
            if self.index_sent else []
        failed = [_send_failure(new) for old, new in zip(before, recipients, strict=True)
                  if old.state == "pending" and new.state == "failed"]
        values = (message_id, state, _encode_recipients(recipients), outcome.next_attempt,
                  outcome.attempts, outcome.last_reply, outcome.upstream_id,
                  int(outcome.auth_deferred), int(_awaiting_report(recipients)), now, int(drop))
        return _Change(message_id, recipients, drop, stored.files, values, index, failed)

    def _index(self, rows: list[tuple[str, str, str]]) -> None:
        """Upstream id -> message, for matching delivery reports (one statement)."""
        for start in range(0, len(rows), _BULK_ROWS):
            chunk = rows[start:start + _BULK_ROWS]
            marks = ",".join(["(?, ?, ?)"] * len(chunk))
            self.conn.execute(f"INSERT OR REPLACE INTO sent VALUES {marks}",  # noqa: S608
                              [value for row in chunk for value in row])

    def _after_record(self, change: _Change, now: float) -> None:
        """A DSN for recipients that failed for good; a delivered message's files to remove."""
        if change.failed and (stored := self.get(change.message_id)) is not None:
            self._bounce(replace(stored, recipients=change.recipients), change.failed, now)
        if change.drop and change.files:  # an IN_ROW message never had files: no syscalls
            self._unlink_after_commit.extend(self._body_files(change.message_id))

    def _bounce(self, message: QueuedMessage, failed: list[Failed], now: float) -> None:
        """Queue the DSN for ``failed`` recipients in the transaction that made them fail."""
        if self.bouncer is None:
            return
        headers = self._headers(message.id)
        dsn = self.bouncer(message, headers, failed)
        if dsn is None:
            return
        recipients = _encode_recipients(Recipient(address) for address in dsn.recipients)
        # To a UTF-8 sender (who sent with SMTPUTF8), or quoting UTF-8 headers: SMTPUTF8 too.
        options = [] if dsn.data.isascii() and dsn.mail_from.isascii() and \
            all(address.isascii() for address in dsn.recipients) else ["SMTPUTF8"]
        # Through the upstream the failed message used: the same account, as the issue says.
        self.conn.execute(_INSERT, (dsn.id, DEFAULT_PRIORITY, now, now, now, dsn.mail_from,
                                    recipients, json.dumps(options), len(dsn.data), None, None,
                                    "dsn", dsn.data, 0, None, message.route, None))

    def _headers(self, message_id: str) -> bytes:
        """The header block kept for a DSN (or, failing that, the one in the message's data)."""
        row = self.conn.execute("SELECT headers, data FROM messages WHERE id=?",
                                (message_id,)).fetchone()
        if row is None:
            return b""
        if row[0] is not None:
            return bytes(row[0])
        return _kept_headers(bytes(row[1])) if row[1] is not None else b""

    # -- delivery reports and tracking events

    def receive(self, items: list[Incoming], now: float) -> Applied:
        """Take a batch in: each new item is applied to its recipient or kept in the inbox.

        Items received before (same key, within REPORT_WINDOW) are counted as duplicates and
        change nothing: Infobip retries, and a client may POST the same batch twice.
        """
        applied = Applied(new=[], bounced=[])
        for item in items:
            key = item.key
            if self.conn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)",
                                 (key, now)).rowcount == 0:
                applied.duplicates += 1
                continue
            applied.new.append(item)
            if not self.apply(item, now, applied):
                applied.unmatched += 1
                self.conn.execute("INSERT OR IGNORE INTO inbox VALUES (?, ?, ?)",
                                  (key, now, json.dumps(item.to_json())))
        return applied

    def match_inbox(self, now: float, others: Iterable[SpoolDB] = (), limit: int = 1000
                    ) -> tuple[Applied, int]:
        """Apply the inbox items that match now (here or in ``others``); drop expired ones.

        Returns what was applied and how many items expired unmatched.
        """
        applied = Applied(new=[], bounced=[])
        rows = self.conn.execute("SELECT key, item FROM inbox ORDER BY received LIMIT ?",
                                 (limit,)).fetchall()
        for key, text in rows:
            item = Incoming.from_json(json.loads(text))
            if self.apply(item, now, applied) or any(
                    other.transaction(functools.partial(other.apply, item, now, applied))
                    for other in others):
                self.conn.execute("DELETE FROM inbox WHERE key=?", (key,))
        expired = self.conn.execute("DELETE FROM inbox WHERE received < ?",
                                    (now - REPORT_WINDOW,)).rowcount
        self.conn.execute("DELETE FROM seen WHERE received < ?", (now - REPORT_WINDOW,))
        return applied, expired

    def inbox_size(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])

    def apply(self, item: Incoming, now: float, applied: Applied) -> bool:
        """Apply one item to its recipient; False when no accepted recipient matches yet."""
        found = self._find(item)
        if found is None:
            return False
        message, index = found
        recipients = list(message.recipients)
        old = recipients[index]
        new = _updated(old, item)
        recipients[index] = new
        self.conn.execute(_APPLY, (message_state(recipients), _encode_recipients(recipients),
                                   int(_awaiting_report(recipients)), now, message.id))
        if old.state != "bounced" and new.state == "bounced":
            report = item.report
            status = report.status if report else LATE_BOUNCE
            error = report.error if report else ""
            assert applied.bounced is not None
            applied.bounced.append(Bounced(message.id, new.address, new.upstream_id, status,
                                           error))
            failure = Failed(new.address, report=report, tracking=item.tracking)
            self._bounce(replace(message, recipients=tuple(recipients)), [failure], now)
        return True

    def _find(self, item: Incoming) -> tuple[QueuedMessage, int] | None:
        """The message and recipient index an item is about: by (Infobip id, recipient),
        else by callback data = queue id; only recipients that Infobip has accepted."""
        to = item.to.lower()
        candidates = []
        if item.message_id is not None:
            row = self.conn.execute("SELECT message_id FROM sent WHERE upstream_id=? AND "
                                    "recipient=?", (item.message_id, to)).fetchone()
            if row is not None:
                candidates.append(row[0])
        if item.callback_data is not None:
            candidates.append(item.callback_data)
        for message_id in candidates:
            message = self.get(message_id)
            if message is None:
                continue
            for index, recipient in enumerate(message.recipients):
                if recipient.address.lower() == to and recipient.state in ("delivered",
                                                                            "bounced"):
                    return message, index
        return None

    def retry(self, message_id: str, now: float) -> bool:
        """Make a deferred or failed message due now; its failed recipients are tried again."""
        message = self.get(message_id)
        if message is None or message.state == "delivered":
            return False
        recipients = tuple(Recipient(r.address, "pending", r.reply) if r.state == "failed" else r
                           for r in message.recipients)
        self.conn.execute(
            "UPDATE messages SET state='queued', recipients=?, next_attempt=?, updated=?"
            " WHERE id=?",
            (_encode_recipients(recipients), now, now, message_id),
        )
        return True

    def release_auth_deferred(self, now: float, route: str | None = None) -> int:
        """Make due now the messages deferred only by an upstream authentication failure
        (only those of upstream ``route``, if given)."""
        return self.conn.execute(
            "UPDATE messages SET next_attempt=?, auth_deferred=0, updated=?"
            " WHERE auth_deferred=1 AND state IN ('queued', 'deferred')"
            " AND (? IS NULL OR route = ?)", (now, now, route, route),
        ).rowcount

    def delete(self, message_id: str) -> bool:
        deleted = self.conn.execute("DELETE FROM messages WHERE id=?",
                                    (message_id,)).rowcount > 0
        if deleted:
            self._unlink_after_commit.extend(self._body_files(message_id))
        return deleted

    def quarantine_orphan_bodies(self) -> list[str]:
        """Move body files without a row to ``bodies/orphaned/``; the quarantined ids.

        Never deleted: a crash between body write and commit (nobody was told 250) and a lost
        or replaced database (everything was told 250) leave the same traces.
        """
        states = dict(self.conn.execute(
            f"SELECT id, state FROM messages WHERE {_HAS_BODY_FILE}"))  # noqa: S608
        return quarantine_unknown(self.bodies, states)

    def orphans(self) -> list[OrphanedBody]:
        return list_orphans(self.bodies)

    def recover(self, orphan: OrphanedBody, saved: SavedEnvelope, now: float) -> None:
        """Re-import a quarantined body as a queued message with its original id.

        A sidecar with a header block (``head``) means the file holds the body alone (SPLIT);
        one without, written before bodies were kept apart, the whole message (WHOLE_FILE).
        """
        if self.get(orphan.id) is not None:
            raise SpoolError(f"{orphan.id} is already in the spool; its quarantined copy "
                             f"{orphan.path} was left alone")
        # Files first, row last: a crash in between leaves a body without a row, which the
        # next start quarantines again.
        restore_files(self.bodies, orphan, saved)
        recipients = _encode_recipients(Recipient(address) for address in saved.recipients)
        kind = WHOLE_FILE if saved.head is None else SPLIT
        self.transaction(lambda: self.conn.execute(
            _INSERT, (orphan.id, saved.priority, saved.created or now, now, now,
                      saved.mail_from, recipients, json.dumps(list(saved.mail_options)),
                      orphan.size, saved.client, saved.auth_user, saved.listener, saved.head,
                      kind, None, saved.route, saved.original_mail_from)))

    def prune_delivered(self, older_than: float, report_cutoff: float | None = None) -> int:
        """Delete delivered and bounced records last changed before ``older_than``; one that
        still awaits a final report only once it is older than ``report_cutoff`` too."""
        cutoff = older_than if report_cutoff is None else min(older_than, report_cutoff)
        ids = [row[0] for row in self.conn.execute(
            "SELECT id FROM messages WHERE state IN ('delivered', 'bounced') AND updated < ?"
            " AND (awaiting_report=0 OR updated < ?)", (older_than, cutoff))]
        for message_id in ids:
            self.delete(message_id)
        if ids:
            self.conn.execute("DELETE FROM sent WHERE message_id NOT IN (SELECT id FROM messages)")
        return len(ids)

    # -- reads

    def get(self, message_id: str) -> QueuedMessage | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id=?",  # noqa: S608
                                (message_id,)).fetchone()
        return _row_to_message(row) if row else None

    def _stored(self, message_id: str) -> bytes | tuple[bytes, Path] | None:
        """A message's bytes when they are in the row; (what goes before the body file, the
        file's path) when it has one; None when its bytes are gone (delivered) or it is."""
        row = self.conn.execute("SELECT data, body_file, state FROM messages WHERE id=?",
                                (message_id,)).fetchone()
        if row is None:
            return None
        data, kind, state = row
        if kind == IN_ROW:
            return None if data is None else bytes(data)
        # A SPLIT row that let go of its header block (_RECORD_DELIVERED) let go of its file.
        if state == "delivered" or (kind == SPLIT and data is None):
            return None
        return (b"" if kind == WHOLE_FILE else bytes(data)), self._body_path(message_id)

    def data(self, message_id: str) -> bytes | None:
        """The whole message in memory (inspection, recovery); delivery streams source()."""
        stored = self._stored(message_id)
        if not isinstance(stored, tuple):
            return stored
        head, path = stored
        try:
            return head + path.read_bytes()
        except FileNotFoundError:
            return None

    def source(self, message_id: str) -> MessageData | None:
        """What to send: the bytes of a small message; for a body file, the header block kept
        in the row (if any) and the file's name (the sender opens it)."""
        stored = self._stored(message_id)
        if not isinstance(stored, tuple):
            return stored
        head, path = stored
        try:
            size = len(head) + path.stat().st_size
        except FileNotFoundError:
            return None
        return SpooledBody(head, path, size)

    def due(self, now: float, limit: int, route: str | None = None
            ) -> list[tuple[str, int, float]]:
        """(id, priority, created) of queued/deferred messages due by ``now``, most urgent first;
        with ``route``, only those for that upstream."""
        return self.conn.execute(
            "SELECT id, priority, created FROM messages WHERE state IN ('queued', 'deferred')"
            " AND next_attempt <= ? AND (? IS NULL OR route = ?)"
            " ORDER BY priority, created LIMIT ?", (now, route, route, limit),
        ).fetchall()

    def waiting_by_route(self) -> dict[str, int]:
        """Queued and deferred messages per upstream name (what a reload must not strand)."""
        return dict(self.conn.execute(
            "SELECT route, COUNT(*) FROM messages WHERE state IN ('queued', 'deferred')"
            " GROUP BY route").fetchall())

    def list(self, states: Iterable[str] | None = None, limit: int = 1000) -> list[QueuedMessage]:
        wanted = tuple(states or STATES)
        marks = ",".join("?" * len(wanted))  # placeholders only; values stay bound parameters
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE state IN ({marks})"  # noqa: S608
            " ORDER BY created LIMIT ?",
            (*wanted, limit),
        ).fetchall()
        return [_row_to_message(row) for row in rows]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for state, count in self.conn.execute(
                "SELECT state, COUNT(*) FROM messages GROUP BY state"):
            counts[state] = count
        return counts

    def oldest_pending(self) -> float | None:
        row = self.conn.execute(
            "SELECT MIN(created) FROM messages WHERE state IN ('queued', 'deferred')").fetchone()
        return row[0] if row else None


def _merge(attempt: tuple[Recipient, ...], stored: tuple[Recipient, ...]
           ) -> tuple[Recipient, ...]:
    if len(attempt) != len(stored):  # never: an outcome is made from this very record
        return attempt
    return tuple(new.merged_with(old) for new, old in zip(attempt, stored, strict=True))


def _updated(recipient: Recipient, item: Incoming) -> Recipient:
    """A recipient after a report or tracking event."""
    if item.tracking is not None:
        bounced = item.tracking.type == LATE_BOUNCE
        return replace(recipient, tracking=item.tracking,
                       state="bounced" if bounced else recipient.state)
    report = item.report
    if report is None or (recipient.report is not None and recipient.report.final
                          and not report.final):
        return recipient  # a late PENDING never overwrites the final word
    return replace(recipient, report=report,
                   state="bounced" if report.bounced else recipient.state)


def _send_failure(recipient: Recipient) -> Failed:
    """A recipient refused at send time (5xx) or out of time (max_age)."""
    reply = recipient.reply or "failed"
    return Failed(recipient.address, reply=reply,
                  expired=reply.startswith(EXPIRED_PREFIX))


def _kept_headers(data: bytes) -> bytes:
    """The header block of ``data``, cut at a line end to _MAX_KEPT_HEADERS."""
    head = data[:header_end(data)]
    if len(head) <= _MAX_KEPT_HEADERS:
        return head
    return head[:head.rfind(b"\r\n", 0, _MAX_KEPT_HEADERS) + 2]


def body_kind(envelope: Envelope, size: int) -> int:
    """Where a message of ``size`` octets is stored: IN_ROW, WHOLE_FILE or SPLIT (streamed)."""
    if envelope.body_file is not None:
        return SPLIT
    return WHOLE_FILE if size > FILE_BODY_THRESHOLD else IN_ROW


def worker_spool_dir(directory: Path, index: int) -> Path:
    """Worker 0 uses queue.path itself (so one worker equals the single-process layout)."""
    return directory if index == 0 else directory / f"worker-{index}"


def worker_spools(directory: Path) -> list[tuple[int, Path]]:
    """(index, directory) of each worker spool under queue.path, in index order."""
    found = []
    for path in directory.glob("worker-*"):
        suffix = path.name.removeprefix("worker-")
        if suffix.isdigit() and (path / DB_NAME).exists():
            found.append((int(suffix), path))
    return sorted(found)


def find_spools(directory: Path) -> list[Path]:
    """Every spool directory under queue.path: its own and those of worker processes."""
    own = [directory] if (directory / DB_NAME).exists() else []
    return own + [path for _, path in worker_spools(directory)]


def take_over_worker_spools(target: SpoolDB, directory: Path, *, worker: int, workers: int
                            ) -> int:
    """Move into ``target`` the messages of the worker spools under queue.path ``directory``
    whose worker no longer exists (the worker count went down) and that fall to ``worker``.

    Each orphaned spool goes to exactly one of the ``workers`` remaining workers.
    """
    moved_in_all = 0
    for index, source in worker_spools(directory):
        if index < workers or index % workers != worker:
            continue
        moved = absorb_spool(target, source)
        if moved:
            log.info("took over %d message(s) from %s", moved, source)
        moved_in_all += moved
    return moved_in_all


def absorb_spool(target: SpoolDB, source_dir: Path) -> int:
    """Move every message of another spool into ``target`` (a worker count went down).

    Idempotent: ids are unique, so re-running after a crash between the two commits neither
    loses nor duplicates a message.
    """
    source = SpoolDB(source_dir, create=False)
    try:
        # By name: columns added by migrations may stand in another order in either file.
        columns = ", ".join(row[1] for row in source.conn.execute("PRAGMA table_info(messages)"))
        rows = source.conn.execute(f"SELECT {columns} FROM messages").fetchall()  # noqa: S608
        if rows:
            # Rows first, then files, then the source rows: after a crash at any point the next
            # start repeats the steps, and a moved file always has a row that keeps it.
            marks = ",".join("?" * len(rows[0]))
            target.transaction(lambda: target.conn.executemany(
                f"INSERT OR IGNORE INTO messages ({columns}) VALUES ({marks})",  # noqa: S608
                rows))
            _move_body_files(source, target)
            source.transaction(lambda: source.conn.execute("DELETE FROM messages"))
        remove_partial_bodies(source.bodies)  # that worker is gone: nobody finishes them
    finally:
        source.close()
    return len(rows)


def _move_body_files(source: SpoolDB, target: SpoolDB) -> None:
    for (message_id,) in source.conn.execute(
            f"SELECT id FROM messages WHERE {_HAS_BODY_FILE}"):  # noqa: S608
        for moved_from in source._body_files(message_id):
            if moved_from.exists():
                target.bodies.mkdir(mode=0o700, exist_ok=True)
                os.replace(moved_from, target.bodies / moved_from.name)


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolError(f"cannot create spool directory {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SpoolError(f"spool directory {directory} is not writable")
    # An existing directory keeps the mode it was made with; the spool holds message text.
    restrict_mode(directory, 0o700)
    restrict_mode(directory / BODIES_DIR, 0o700)


def _make_private_database(path: Path) -> None:
    """Create the database file 0600 before SQLite does.

    SQLite gives a new WAL or SHM file the mode of the database file, and the WAL holds
    message text: a 0600 database keeps them private too.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise SpoolError(f"cannot create spool database {path}: {exc.strerror}") from exc


def open_private(path: Path) -> IO[str]:
    """Open (append, create 0600) a file in the spool; an existing one loses other access."""
    handle = open(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600),  # noqa: SIM115
                  "a+", encoding="utf-8")
    restrict_mode(path, 0o600)
    return handle


def lock_spool(directory: Path) -> IO[str]:
    """Create ``directory`` (0700) and hold its lock for as long as the returned file is open.

    SpoolError when the directory is unusable or another relay holds the lock.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        restrict_mode(directory, 0o700)
        handle = open_private(directory / LOCK_FILE)
    except OSError as exc:
        raise SpoolError(f"cannot use spool directory {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SpoolError(f"another infobip-relay is already using the spool {directory}"
                         ) from None
    return handle


def restrict_mode(path: Path, mode: int) -> None:
    """Take away permissions beyond ``mode``; a file we may not chmod is left as it is."""
    try:
        current = path.stat().st_mode & 0o777
        if current & ~mode:
            os.chmod(path, current & mode)
    except (FileNotFoundError, PermissionError):
        pass


_Op = tuple[Callable[[SpoolDB], Any], asyncio.Future[Any], bool]


class _Insert:
    """SpoolDB.insert as a write the writer thread can join with others (insert_many)."""

    __slots__ = ("row",)

    def __init__(self, envelope: Envelope, priority: int, now: float, written: int | None
                 ) -> None:
        self.row = (envelope, priority, now, written)

    def __call__(self, db: SpoolDB) -> None:
        envelope, priority, now, written = self.row
        db.insert(envelope, priority, now, written=written)


class _Record:
    """SpoolDB.record as a write the writer thread can join with others (record_many)."""

    __slots__ = ("row",)

    def __init__(self, message_id: str, outcome: Outcome, now: float) -> None:
        self.row = (message_id, outcome, now)

    def __call__(self, db: SpoolDB) -> bool:
        return db.record(*self.row)


_FREE_SPACE_TTL = 1.0
_FREE_SPACE_MARGIN = 1 << 30


class Spool:
    """Async front of the spool: one writer thread, group commit, results back on the loop."""

    def __init__(self, directory: Path) -> None:
        self.db = SpoolDB(directory)
        _log_quarantine(self.db, self.db.quarantine_orphan_bodies())
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock: IO[str] | None = None
        # Large bodies are fsynced here, concurrently (the file system batches them into few
        # journal commits). Not asyncio's default pool: its cpu+4 threads also read bodies for
        # the upstream and check passwords, and a burst of uploads queued behind them.
        self._body_writers = ThreadPoolExecutor(BODY_WRITERS, thread_name_prefix="spool-body")
        # Delivered messages' files are removed here, not in the writer thread: with large
        # mail a batch let go of 8-16 files, whose unlink() took 6-18 ms (ext4 frees their
        # blocks), and the next group commit, with sessions waiting for their 250, waited.
        self._unlinker = ThreadPoolExecutor(1, thread_name_prefix="spool-unlink")
        self._free_space = (0, -_FREE_SPACE_TTL)  # bytes, when measured (monotonic)

    @classmethod
    def open(cls, directory: Path, *, worker: int = 0, workers: int = 1) -> Spool:
        """The locked spool of worker ``worker`` (of ``workers``) under queue.path ``directory``.

        It has taken over the messages of worker spools left without a worker. SpoolError when
        another relay holds it, or it is damaged or unusable. `close()` releases the lock.
        """
        own = worker_spool_dir(directory, worker)
        lock = lock_spool(own)
        try:
            spool = cls(own)
            try:
                take_over_worker_spools(spool.db, directory, worker=worker, workers=workers)
            except BaseException:
                spool.db.close()
                raise
        except BaseException:
            lock.close()
            raise
        spool._lock = lock
        return spool

    def body_path(self, message_id: str) -> Path:
        """Where a message's body file is once it is spooled (if it has one)."""
        return self.db._body_path(message_id)

    def free_space(self, needed: int = 0) -> int:
        """Bytes available to the relay on the spool's file system.

        Asked at every MAIL: a statvfs() each time was 3 % of the event loop's time with small
        mail. A figure measured less than a second ago is given again while it exceeds
        ``needed`` by _FREE_SPACE_MARGIN, more than a second of mail can use up; near the
        limit every call measures.
        """
        measured, at = self._free_space
        now = time.monotonic()
        if now - at < _FREE_SPACE_TTL and measured >= needed + _FREE_SPACE_MARGIN:
            return measured
        stats = os.statvfs(self.db.directory)
        free = stats.f_bavail * stats.f_frsize
        self._free_space = (free, now)
        return free

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        # The body writers first: each one still writing queues its insert for the writer
        # thread (see put), which must still be there to commit it.
        await asyncio.to_thread(self._body_writers.shutdown, wait=True)
        if self._thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await asyncio.to_thread(self._unlinker.shutdown, wait=True)
        self.db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- async API

    async def put(self, envelope: Envelope, priority: int) -> None:
        """Store a message; returns only once it is fsynced. Raises SpoolError otherwise.

        A large body is written and fsynced in a worker thread first: in the writer thread
        its fsync would hold up the group commit of every small message behind it. That
        thread then queues the row's insert for the writer itself: a round trip through the
        event loop in between cost a loop turn, 4-12 ms while uploads keep it busy.
        """
        now = time.time()
        size = envelope.size
        if body_kind(envelope, size) == IN_ROW:
            await self._submit(_Insert(envelope, priority, now, None), write=True)
            return
        future = self._future()
        insert = _Insert(envelope, priority, now, size)
        try:
            self._body_writers.submit(self._write_body_then_insert, insert, future)
        except RuntimeError as exc:  # shut down: the spool is closing
            raise SpoolError("spool is not running") from exc
        await future

    def _write_body_then_insert(self, insert: _Insert, future: asyncio.Future[Any]) -> None:
        """In a body writer: the body files, then the insert queued (or the failure told)."""
        envelope, priority, now, _ = insert.row
        try:
            self.db.write_body_files(envelope, priority, now)
        except BaseException as exc:  # the waiting session must hear of any failure
            error = SpoolError(f"spool error: {exc}") if isinstance(exc, OSError) else exc
            failed: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = \
                [(future, None, error)]
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve_all, failed)
            return
        self._ops.put((insert, future, True))

    def record_soon(self, message_id: str, outcome: Outcome) -> asyncio.Future[bool]:
        """Queue an outcome for the next group commit; the future resolves once it is durable."""
        return self._submit(_Record(message_id, outcome, time.time()), write=True)

    async def get(self, message_id: str) -> QueuedMessage | None:
        result: QueuedMessage | None = await self._submit(lambda db: db.get(message_id))
        return result

    async def data(self, message_id: str) -> bytes | None:
        result: bytes | None = await self._submit(lambda db: db.data(message_id))
        return result

    async def source(self, message_id: str) -> MessageData | None:
        """The message to send: its bytes, or its body file by name."""
        result: MessageData | None = await self._submit(lambda db: db.source(message_id))
        return result

    async def due(self, now: float, limit: int, route: str | None = None
                  ) -> list[tuple[str, int, float]]:
        result: list[tuple[str, int, float]] = await self._submit(
            lambda db: db.due(now, limit, route))
        return result

    async def waiting_by_route(self) -> dict[str, int]:
        result: dict[str, int] = await self._submit(lambda db: db.waiting_by_route())
        return result

    async def counts(self) -> dict[str, int]:
        result: dict[str, int] = await self._submit(lambda db: db.counts())
        return result

    async def oldest_pending(self) -> float | None:
        result: float | None = await self._submit(lambda db: db.oldest_pending())
        return result

    async def prune_delivered(self, older_than: float, report_cutoff: float | None = None
                              ) -> int:
        result: int = await self._submit(
            lambda db: db.prune_delivered(older_than, report_cutoff), write=True)
        return result

    async def receive(self, items: list[Incoming]) -> Applied:
        """Commit a batch of reports and tracking events; returns once it is durable."""
        now = time.time()
        result: Applied = await self._submit(lambda db: db.receive(items, now), write=True)
        return result

    async def match_inbox(self) -> tuple[Applied, int]:
        """Apply the waiting reports that match now (this spool only); see SpoolDB."""
        now = time.time()
        result: tuple[Applied, int] = await self._submit(lambda db: db.match_inbox(now),
                                                         write=True)
        return result

    async def inbox_size(self) -> int:
        result: int = await self._submit(lambda db: db.inbox_size())
        return result

    async def release_auth_deferred(self, now: float, route: str | None = None) -> int:
        result: int = await self._submit(lambda db: db.release_auth_deferred(now, route),
                                         write=True)
        return result

    async def check_writable(self) -> bool:
        """Readiness probe: a write transaction that changes nothing must go through."""
        try:
            await self._submit(lambda db: None, write=True)
        except SpoolError:
            return False
        return True

    def _submit(self, operation: Callable[[SpoolDB], Any], *, write: bool = False
                ) -> asyncio.Future[Any]:
        future = self._future()
        self._ops.put((operation, future, write))
        return future

    def _future(self) -> asyncio.Future[Any]:
        """A future for a writer's answer; SpoolError once the writer is gone."""
        if self._loop is None or self._thread is None:
            raise SpoolError("spool is not running")
        return self._loop.create_future()

    # -- writer thread

    def _run(self) -> None:
        while True:
            first = self._ops.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._execute(batch)
            if stop:
                return

    def _execute(self, batch: list[_Op]) -> None:
        reads = [op for op in batch if not op[2]]
        writes = [op for op in batch if op[2]]
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for operation, future, _ in reads:
            results.append(self._call(operation, future))
        if writes:
            results.extend(self._commit_writes(writes))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve_all, results)
        # A delivered message's files, which no row refers to any more since this commit:
        # neither the sessions waiting for a 250 nor the next batch waits for their removal.
        unlinks = self.db.take_unlinks()
        if unlinks:
            self._unlinker.submit(unlink_files, unlinks)

    def _call(self, operation: Callable[[SpoolDB], Any], future: asyncio.Future[Any]
              ) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        try:
            return future, operation(self.db), None
        except Exception as exc:
            return future, None, _as_spool_error(exc)

    def _commit_writes(self, writes: list[_Op]
                       ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run every write in one transaction; a failing one is rolled back alone.

        The writes almost never fail, so they first run without a savepoint each (two
        statements fewer per write, and as many fewer GIL hand-offs for this thread). Only if
        one raises is the transaction rolled back and the batch run again, each write in its
        own savepoint.
        """
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                values = self._apply(writes)
            except Exception:  # the batch runs again, each write isolated
                conn.execute("ROLLBACK")
                self.db.forget_unlinks(0)
                return self._commit_isolated(writes)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            return self._failed_commit(writes, exc)
        return [(future, value, None) for (_, future, _), value in zip(writes, values,
                                                                       strict=True)]

    def _apply(self, writes: list[_Op]) -> list[Any]:
        """Run the writes in order, each one's value in turn; the inserts and records between
        two other writes go together (insert_many, record_many: a few statements for any
        number). None of them touches a row another one of them does: a message is recorded
        only after its insert committed, and is sent by one worker at a time."""
        values: list[Any] = [None] * len(writes)
        inserts: list[int] = []
        records: list[int] = []

        def flush() -> None:
            if inserts:
                self.db.insert_many([cast(_Insert, writes[i][0]).row for i in inserts])
            if records:
                found = self.db.record_many([cast(_Record, writes[i][0]).row for i in records])
                for index, value in zip(records, found, strict=True):
                    values[index] = value
            inserts.clear()
            records.clear()

        for index, (operation, _, _) in enumerate(writes):
            if isinstance(operation, _Insert) and self.db.bulk:
                inserts.append(index)
            elif isinstance(operation, _Record) and self.db.bulk:
                records.append(index)
            else:
                flush()
                values[index] = operation(self.db)
        flush()
        return values

    def _commit_isolated(self, writes: list[_Op]
                         ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Every write in its own savepoint, so that a failing one is rolled back alone.

        SQLite may abandon the whole transaction itself (SQLITE_FULL, SQLITE_IOERR): then the
        ROLLBACK TO fails too, and every write of the batch fails, none half-committed.
        """
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future, _ in writes:
                conn.execute("SAVEPOINT op")
                unlinks = self.db.pending_unlinks
                try:
                    value = operation(self.db)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    self.db.forget_unlinks(unlinks)
                    results.append((future, None, _as_spool_error(exc)))
                else:
                    results.append((future, value, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            return self._failed_commit(writes, exc)
        return results

    def _failed_commit(self, writes: list[_Op], exc: sqlite3.Error
                       ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        self.db.forget_unlinks(0)
        with contextlib.suppress(sqlite3.Error):
            self.db.conn.execute("ROLLBACK")
        error = SpoolError(f"spool commit failed: {exc}")
        return [(future, None, error) for _, future, _ in writes]


def _log_quarantine(db: SpoolDB, quarantined: list[str]) -> None:
    where = db.bodies / ORPHANED_DIR
    if quarantined:
        cause = (f"the database {db.path} is new or empty: it was probably lost, truncated or "
                 "replaced" if db.is_new else "their rows are missing")
        log.error("%d message body file(s) unknown to the spool database moved to %s, not "
                  "deleted (%s); re-import them with `infobip-relay queue recover`",
                  len(quarantined), where, cause)
    elif waiting := count_orphans(db.bodies):
        log.warning("%d message body file(s) wait in quarantine in %s; see `infobip-relay "
                    "queue recover`", waiting, where)


def _as_spool_error(exc: Exception) -> Exception:
    # SQLite errors (disk full, I/O error, locked) become SpoolError, which callers turn into a
    # temporary SMTP reply; anything else is a bug and keeps its type for the log.
    if isinstance(exc, sqlite3.Error | OSError):  # OSError: a body file (disk full, I/O)
        return SpoolError(f"spool error: {exc}")
    return exc


def unlink_files(paths: list[Path]) -> None:
    """Remove files no row refers to any more; one that cannot go is logged and left behind
    (the start-up scan quarantines it), never raised into the writer."""
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc)


def _resolve_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
