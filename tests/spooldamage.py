"""Ways to spoil a spool database, shared by the unit and the process-level damage tests."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from relay.envelope import Envelope, MessageContext
from relay.spool import SpoolDB

BIG_BODY = b"Subject: big\r\n\r\n" + b"x" * 300_000  # over 256 KiB: a body file of its own


def make_spool_with_rows(spool_dir: Path, rows: int = 300) -> None:
    """A spool of ``rows`` small messages and one in a body file (id BIGBODY), checkpointed."""
    db = SpoolDB(spool_dir)
    for number in range(rows):
        _store(db, f"ROW{number:05d}", b"Subject: row\r\n\r\n" + b"y" * 3000)
    _store(db, "BIGBODY", BIG_BODY)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def _store(db: SpoolDB, queue_id: str, data: bytes) -> None:
    ctx = MessageContext(queue_id, "app@x.test", ("a@y.test",), "127.0.0.1", None, "local",
                         len(data))
    db.transaction(lambda: db.insert(Envelope(ctx, data), 1, time.time()))


def store_streamed(db: SpoolDB, queue_id: str, head: bytes, body: bytes) -> int:
    """Store a message as the listener hands over a streamed one: the header block in memory,
    the body (from the blank line on) in ``bodies/<id>.partial``. Returns the partial's inode."""
    db.bodies.mkdir(mode=0o700, exist_ok=True)
    partial = db.bodies / f"{queue_id}.partial"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(body)  # created as the listener creates it
    ctx = MessageContext(queue_id, "app@x.test", ("a@y.test",), "127.0.0.1", None, "local",
                         len(head) + len(body))
    envelope = Envelope(ctx, head, ("BODY=8BITMIME",), partial, len(body))
    inode = partial.stat().st_ino
    db.transaction(lambda: db.insert(envelope, 1, time.time()))
    return inode


def overwrite_middle_page(path: Path) -> None:
    """4 KiB of garbage over a page in the middle of the file: damage quick_check finds."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size // 2 - (size // 2) % 4096)
        handle.write(os.urandom(4096))


def make_foreign_file(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"PK\x03\x04 not a database " * 200)


def make_foreign_sqlite(path: Path) -> None:
    _replace_with_sqlite(path, "CREATE TABLE users (name TEXT)",
                         "INSERT INTO users VALUES ('alice')")


def make_wrong_schema(path: Path) -> None:
    _replace_with_sqlite(path, "CREATE TABLE messages (id TEXT, subject TEXT)")


def _replace_with_sqlite(path: Path, *statements: str) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
