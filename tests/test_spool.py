"""SpoolDB on real files: body sidecars, the quarantine of unknown bodies, recovery, damage."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from relay.bodyfiles import ORPHANED_DIR, SavedEnvelope
from relay.envelope import Envelope, MessageContext
from relay.errors import SpoolError
from relay.spool import DB_NAME, Outcome, Recipient, SpoolDB, absorb_spool

LARGE = b"Received: from client ([127.0.0.1])\r\n\tby relay; id X\r\n" + b"x" * 100_000
SMALL = b"Subject: small\r\n\r\nhello\r\n"


def store(db: SpoolDB, queue_id: str, data: bytes = LARGE, *, priority: int = 1) -> None:
    ctx = MessageContext(queue_id, "app@x.test", ("a@y.test", "b@y.test"), "192.0.2.7", "joe",
                         "local", len(data))
    envelope = Envelope(ctx, data, ("BODY=8BITMIME",))
    db.transaction(lambda: db.insert(envelope, priority, time.time()))


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# --------------------------------------------------------------------------- envelope sidecars


def test_a_large_body_gets_an_envelope_sidecar(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "ID1", priority=0)
    sidecar = spool_dir / "bodies" / "ID1.env"
    assert sidecar.stat().st_mode & 0o777 == 0o600
    saved = SavedEnvelope.from_json(sidecar.read_bytes())
    assert (saved.mail_from, saved.recipients, saved.mail_options) == \
        ("app@x.test", ("a@y.test", "b@y.test"), ("BODY=8BITMIME",))
    assert (saved.priority, saved.client, saved.auth_user, saved.listener) == \
        (0, "192.0.2.7", "joe", "local")
    store(db, "ID2", SMALL)  # a body in the database needs no sidecar
    assert names(spool_dir / "bodies") == ["ID1", "ID1.env"]


def test_delivery_and_deletion_remove_the_sidecar_too(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "DONE")
    store(db, "GONE")
    outcome = Outcome((Recipient("a@y.test", "delivered"), Recipient("b@y.test", "delivered")),
                      "delivered", 0.0, 1, "250 ok")
    db.transaction(lambda: db.record("DONE", outcome, time.time()))
    db.transaction(lambda: db.delete("GONE"))
    assert names(spool_dir / "bodies") == []


def test_absorbing_a_worker_spool_moves_the_sidecar(tmp_path: Path) -> None:
    source = SpoolDB(tmp_path / "worker-1")
    store(source, "MOVED")
    source.close()
    target = SpoolDB(tmp_path / "main")
    assert absorb_spool(target, tmp_path / "worker-1") == 1
    assert names(tmp_path / "main" / "bodies") == ["MOVED", "MOVED.env"]
    assert target.quarantine_orphan_bodies() == []


# --------------------------------------------------------------------------- quarantine


def test_bodies_unknown_to_the_database_are_quarantined_not_deleted(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "KEEP")
    store(db, "LOST")
    db.conn.execute("DELETE FROM messages WHERE id='LOST'")  # the row is gone, the files not
    assert db.quarantine_orphan_bodies() == ["LOST"]
    assert names(spool_dir / "bodies") == ["KEEP", "KEEP.env", ORPHANED_DIR]
    assert names(spool_dir / "bodies" / ORPHANED_DIR) == ["LOST", "LOST.env"]
    assert (spool_dir / "bodies" / ORPHANED_DIR / "LOST").read_bytes() == LARGE
    assert db.data("KEEP") == LARGE


def test_leftover_files_of_delivered_rows_are_removed(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "SENT")
    db.conn.execute("UPDATE messages SET state='delivered' WHERE id='SENT'")  # unlink never ran
    assert db.quarantine_orphan_bodies() == []
    assert names(spool_dir / "bodies") == []


def test_an_emptied_database_is_new_and_its_bodies_are_quarantined(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    assert db.is_new
    for queue_id in ("A1", "A2", "A3"):
        store(db, queue_id)
    db.close()
    (spool_dir / DB_NAME).write_bytes(b"")  # truncated to 0 bytes

    db = SpoolDB(spool_dir)
    assert db.is_new
    assert db.quarantine_orphan_bodies() == ["A1", "A2", "A3"]
    assert [o.id for o in db.orphans()] == ["A1", "A2", "A3"]
    assert all(o.envelope is not None and o.envelope.recipients == ("a@y.test", "b@y.test")
               for o in db.orphans())


# --------------------------------------------------------------------------- recovery


def test_recover_puts_a_quarantined_body_back_with_its_id(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "BACK", priority=2)
    created = db.get("BACK").created  # type: ignore[union-attr]
    db.conn.execute("DELETE FROM messages")
    db.quarantine_orphan_bodies()
    [orphan] = db.orphans()
    assert orphan.envelope is not None

    db.recover(orphan, orphan.envelope, time.time())
    message = db.get("BACK")
    assert message is not None
    assert (message.state, message.priority, message.created, message.size) == \
        ("queued", 2, created, len(LARGE))
    assert message.pending == ("a@y.test", "b@y.test")
    assert message.mail_options == ("BODY=8BITMIME",)
    assert db.data("BACK") == LARGE
    assert names(spool_dir / "bodies") == ["BACK", "BACK.env", ORPHANED_DIR]
    assert names(spool_dir / "bodies" / ORPHANED_DIR) == []
    assert db.quarantine_orphan_bodies() == []  # the next start keeps it


def test_recover_refuses_an_id_the_spool_has(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "TWICE")
    db.conn.execute("UPDATE messages SET body_file=0")  # so that its files look unknown
    db.quarantine_orphan_bodies()
    [orphan] = db.orphans()
    assert orphan.envelope is not None
    with pytest.raises(SpoolError, match="already in the spool"):
        db.recover(orphan, orphan.envelope, time.time())
    assert orphan.path.exists()


@pytest.mark.parametrize(("sidecar", "problem"), [
    (None, "no envelope file"),
    (b'{"mail_from": "a@x.test", "recipients": []}', "damaged envelope file: no recipients"),
    (b'{"mail_from": "a@x.test", "recip', "damaged envelope file"),
])
def test_a_body_without_a_usable_envelope_is_listed_with_the_reason(
        spool_dir: Path, sidecar: bytes | None, problem: str) -> None:
    db = SpoolDB(spool_dir)
    quarantine = spool_dir / "bodies" / ORPHANED_DIR
    quarantine.mkdir(parents=True)
    (quarantine / "OLD").write_bytes(LARGE)
    if sidecar is not None:
        (quarantine / "OLD.env").write_bytes(sidecar)
    [orphan] = db.orphans()
    assert orphan.envelope is None
    assert orphan.problem is not None and orphan.problem.startswith(problem)


# --------------------------------------------------------------------------- damage


def make_spool_with_rows(spool_dir: Path, rows: int = 300) -> None:
    db = SpoolDB(spool_dir)
    for number in range(rows):
        store(db, f"ROW{number:05d}", SMALL + b"y" * 3000)
    store(db, "BIGBODY")
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def overwrite_middle_page(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size // 2 - (size // 2) % 4096)
        handle.write(os.urandom(4096))


def make_foreign_file(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"PK\x03\x04 not a database " * 200)


def make_foreign_sqlite(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('alice')")
    conn.commit()
    conn.close()


def make_wrong_schema(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE messages (id TEXT, subject TEXT)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("damage", "message"), [
    (overwrite_middle_page, "is damaged"),
    (make_foreign_file, "not an SQLite"),
    (make_foreign_sqlite, r"of something else \(tables: users\)"),
    (make_wrong_schema, "messages table without"),
])
@pytest.mark.parametrize("create", [True, False])
def test_a_damaged_or_foreign_database_is_refused_and_left_untouched(
        spool_dir: Path, damage, message: str, create: bool) -> None:
    make_spool_with_rows(spool_dir)
    database = spool_dir / DB_NAME
    damage(database)
    before = digest(database), database.stat().st_mode
    with pytest.raises(SpoolError, match=message) as caught:
        SpoolDB(spool_dir, create=create)
    assert "\n" not in str(caught.value)
    assert (digest(database), database.stat().st_mode) == before
    assert names(spool_dir / "bodies") == ["BIGBODY", "BIGBODY.env"]


def test_garbage_in_the_middle_of_our_own_spool_is_found_at_open(spool_dir: Path) -> None:
    make_spool_with_rows(spool_dir)
    overwrite_middle_page(spool_dir / DB_NAME)
    with pytest.raises(SpoolError, match=r"spool database .* is damaged \(.*\); it was left"):
        SpoolDB(spool_dir, create=False)


# --------------------------------------------------------------------------- permissions


def test_spool_files_and_directories_are_private(spool_dir: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        spool_dir.mkdir(mode=0o755)
        os.chmod(spool_dir, 0o755)  # an existing directory keeps its mode unless tightened
        db = SpoolDB(spool_dir)
        store(db, "BODY")
        reader = SpoolDB(spool_dir, create=False)  # a second connection: the SHM is in use
        assert reader.counts()["queued"] == 1
    finally:
        os.umask(old_umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in spool_dir.rglob("*")}
    assert {f"{DB_NAME}-wal", f"{DB_NAME}-shm", "BODY", "BODY.env"} <= modes.keys()
    assert modes == {name: 0o700 if (spool_dir / name).is_dir() or name == "bodies" else 0o600
                     for name in modes}
    assert spool_dir.stat().st_mode & 0o777 == 0o700
    reader.close()
    db.close()


def test_the_json_of_a_sidecar_round_trips() -> None:
    saved = SavedEnvelope("a@x.test", ("b@y.test",), ("SMTPUTF8",), 0, 1.5, "::1", None, "l")
    assert SavedEnvelope.from_json(saved.to_json()) == saved
    assert json.loads(saved.to_json())["recipients"] == ["b@y.test"]
