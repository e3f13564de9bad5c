"""The spool on real files: body sidecars, the quarantine of unknown bodies, recovery, damage,
group commit (and the rollback of one write in a batch), locking and the takeover of worker
spools."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spooldamage import (
    make_foreign_file,
    make_foreign_sqlite,
    make_spool_with_rows,
    make_wrong_schema,
    overwrite_middle_page,
    store_streamed,
)

import relay.spool as spool_module
from relay.bodyfiles import ORPHANED_DIR, SavedEnvelope
from relay.envelope import Envelope, MessageContext
from relay.errors import SpoolError
from relay.outgoing import DotStuffer, SpooledBody
from relay.spool import (
    DB_NAME,
    LOCK_FILE,
    SPLIT,
    WHOLE_FILE,
    Generated,
    Outcome,
    Recipient,
    Spool,
    SpoolDB,
    absorb_spool,
)

# Over FILE_BODY_THRESHOLD: a body file of its own.
LARGE = b"Received: from client ([127.0.0.1])\r\n\tby relay; id X\r\n" + b"x" * 300_000
SMALL = b"Subject: small\r\n\r\nhello\r\n"
# A streamed message as the listener hands it over: the header block (8-bit, as a client may
# send it) and the body from the blank line on, with lines that need dot-stuffing.
HEAD = b"Received: from client\r\n\tby relay; id S\r\nSubject: caf\xc3\xa9\r\n"
BODY = b"\r\n" + b"".join(b".line %06d\r\n" % n for n in range(12_000))


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
    assert "head" not in json.loads(saved.to_json())  # the file is the whole message
    split = SavedEnvelope("a@x.test", ("b@y.test",), head=HEAD)
    assert SavedEnvelope.from_json(split.to_json()).head == HEAD


def test_a_sidecar_with_a_damaged_head_is_refused() -> None:
    raw = json.loads(SavedEnvelope("a@x.test", ("b@y.test",), head=HEAD).to_json())
    raw["head"] = "not base64!"
    with pytest.raises(ValueError, match="head is not base64"):
        SavedEnvelope.from_json(json.dumps(raw).encode())


# --------------------------------------------------------------------------- streamed (split)


def read_source(db: SpoolDB, queue_id: str) -> bytes:
    """What delivery sends (before dot-stuffing), read the way the upload reads it."""
    spooled = db.source(queue_id)
    assert isinstance(spooled, SpooledBody)
    source = spooled.open()

    async def read() -> bytes:
        return b"".join([chunk async for chunk in source.chunks()])

    try:
        data = asyncio.run(read())
        assert asyncio.run(read()) == data  # a retry sends it again from the start
        assert source.size == len(data)
    finally:
        source.close()
    return data


def stuffed(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.finish()


def test_a_streamed_body_is_renamed_into_place_not_copied(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    inode = store_streamed(db, "SPLIT1", HEAD, BODY)
    body = spool_dir / "bodies" / "SPLIT1"
    assert names(spool_dir / "bodies") == ["SPLIT1", "SPLIT1.env"]  # the partial is gone
    # The very file the listener wrote, holding the body only: it was written once.
    assert body.stat().st_ino == inode
    assert body.read_bytes() == BODY
    row = db.conn.execute("SELECT data, body_file, size FROM messages WHERE id='SPLIT1'"
                          ).fetchone()
    assert (bytes(row[0]), row[1], row[2]) == (HEAD, SPLIT, len(HEAD) + len(BODY))
    assert SavedEnvelope.from_json((spool_dir / "bodies" / "SPLIT1.env").read_bytes()).head \
        == HEAD


def test_a_split_message_is_read_and_sent_whole(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store_streamed(db, "SPLIT2", HEAD, BODY)
    assert db.data("SPLIT2") == HEAD + BODY
    assert read_source(db, "SPLIT2") == HEAD + BODY
    # Dot-stuffed across the head/body seam as the whole message would be.
    assert stuffed([HEAD, BODY]) == stuffed([HEAD + BODY])
    assert db.get("SPLIT2").size == len(HEAD) + len(BODY)  # type: ignore[union-attr]


def test_a_body_file_row_of_an_old_spool_is_still_sent_whole(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store(db, "OLD")  # a large message held in memory: the whole of it in the file
    row = db.conn.execute("SELECT data, body_file FROM messages WHERE id='OLD'").fetchone()
    assert row == (None, WHOLE_FILE)
    assert (spool_dir / "bodies" / "OLD").read_bytes() == LARGE
    assert "head" not in json.loads((spool_dir / "bodies" / "OLD.env").read_bytes())
    assert db.data("OLD") == LARGE
    assert read_source(db, "OLD") == LARGE


def test_a_delivered_split_message_drops_its_head_and_files(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store_streamed(db, "SPLIT3", HEAD, BODY)
    outcome = Outcome((Recipient("a@y.test", "delivered"),), "delivered", 0.0, 1, "250 ok")
    db.transaction(lambda: db.record("SPLIT3", outcome, time.time()))
    assert db.conn.execute("SELECT data FROM messages WHERE id='SPLIT3'").fetchone() == (None,)
    assert names(spool_dir / "bodies") == []
    assert db.data("SPLIT3") is None and db.source("SPLIT3") is None


def test_a_failed_split_message_keeps_its_headers_for_the_dsn(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store_streamed(db, "SPLIT4", HEAD, BODY)
    assert db._headers("SPLIT4") == HEAD  # from the row, without reading the body file
    db.keep_headers = True
    store_streamed(db, "SPLIT5", HEAD, BODY)
    assert db.conn.execute("SELECT headers FROM messages WHERE id='SPLIT5'").fetchone() == \
        (HEAD,)


def test_a_split_orphan_is_quarantined_and_recovered_exactly(spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    store_streamed(db, "KEEP", HEAD, BODY)
    store_streamed(db, "LOST", HEAD, BODY)
    db.conn.execute("DELETE FROM messages WHERE id='LOST'")
    assert db.quarantine_orphan_bodies() == ["LOST"]  # KEEP (SPLIT) has a row: kept
    assert names(spool_dir / "bodies" / ORPHANED_DIR) == ["LOST", "LOST.env"]
    [orphan] = db.orphans()
    assert orphan.size == len(HEAD) + len(BODY)  # the message's, not the file's
    assert orphan.envelope is not None and orphan.envelope.head == HEAD

    db.recover(orphan, orphan.envelope, time.time())
    row = db.conn.execute("SELECT data, body_file, size FROM messages WHERE id='LOST'"
                          ).fetchone()
    assert (bytes(row[0]), row[1], row[2]) == (HEAD, SPLIT, len(HEAD) + len(BODY))
    assert db.data("LOST") == HEAD + BODY
    assert read_source(db, "LOST") == HEAD + BODY
    assert db.get("LOST").mail_options == ("BODY=8BITMIME",)  # type: ignore[union-attr]
    assert db.quarantine_orphan_bodies() == []  # the next start keeps it


def test_an_old_sidecar_without_head_recovers_the_file_as_the_whole_message(
        spool_dir: Path) -> None:
    db = SpoolDB(spool_dir)
    quarantine = spool_dir / "bodies" / ORPHANED_DIR
    quarantine.mkdir(parents=True)
    (quarantine / "OLDFMT").write_bytes(LARGE)
    # A sidecar as relays before named upstreams and split bodies wrote it.
    (quarantine / "OLDFMT.env").write_bytes(
        b'{"mail_from":"app@x.test","recipients":["a@y.test"],"mail_options":[],'
        b'"priority":1,"created":5.0,"client":null,"auth_user":null,"listener":"local"}')
    [orphan] = db.orphans()
    assert orphan.envelope is not None and orphan.envelope.head is None
    assert orphan.size == len(LARGE)
    db.recover(orphan, orphan.envelope, time.time())
    row = db.conn.execute("SELECT data, body_file FROM messages WHERE id='OLDFMT'").fetchone()
    assert row == (None, WHOLE_FILE)
    assert db.data("OLDFMT") == LARGE
    assert read_source(db, "OLDFMT") == LARGE


def test_absorbing_a_worker_spool_moves_split_bodies(tmp_path: Path) -> None:
    source = SpoolDB(tmp_path / "worker-1")
    store_streamed(source, "SPLITW", HEAD, BODY)
    source.close()
    target = SpoolDB(tmp_path / "main")
    assert absorb_spool(target, tmp_path / "worker-1") == 1
    assert names(tmp_path / "main" / "bodies") == ["SPLITW", "SPLITW.env"]
    assert target.quarantine_orphan_bodies() == []
    assert target.data("SPLITW") == HEAD + BODY


def test_a_split_message_put_through_the_spool_is_stored_split(spool_dir: Path) -> None:
    """Spool.put: the body file and sidecar in a worker thread, then the row."""
    async def scenario() -> bytes | None:
        spool = Spool(spool_dir)
        spool.start()
        try:
            spool.db.bodies.mkdir(mode=0o700, exist_ok=True)
            partial = spool.db.bodies / "PUT.partial"
            partial.write_bytes(BODY)
            ctx = MessageContext("PUT", "app@x.test", ("a@y.test",), "127.0.0.1", None,
                                 "local", 0)
            await spool.put(Envelope(ctx, HEAD, (), partial, len(BODY)), 1)
            return await spool.data("PUT")
        finally:
            await spool.close()

    assert asyncio.run(scenario()) == HEAD + BODY
    assert (spool_dir / "bodies" / "PUT").stat().st_size == len(BODY)
    assert names(spool_dir / "bodies") == ["PUT", "PUT.env"]


# --------------------------------------------------------------------------- group commit
#
# A gate holds the writer thread while operations queue up, so that they form exactly one
# batch; SQLite's trace callback (called in the writer thread) shows every statement it ran.


def envelope(queue_id: str, data: bytes = SMALL) -> Envelope:
    ctx = MessageContext(queue_id, "app@x.test", ("a@y.test", "b@y.test"), "192.0.2.7", None,
                         "local", len(data))
    return Envelope(ctx, data)


DELIVERED = Outcome((Recipient("a@y.test", "delivered", "250 ok"),
                     Recipient("b@y.test", "delivered", "250 ok")), "delivered", 0.0, 1, "250 ok")


async def one_batch(spool: Spool, submit: Callable[[], list[Awaitable[Any]]]
                    ) -> tuple[list[Any], list[str]]:
    """Run the operations ``submit`` starts as one batch; their results and the SQL it ran."""
    statements: list[str] = []
    inside, gate = threading.Event(), threading.Event()

    def hold(db: SpoolDB) -> None:
        inside.set()
        gate.wait(10)

    held = spool._submit(hold)
    assert await asyncio.to_thread(inside.wait, 10)  # the writer thread waits in hold()
    operations = [asyncio.ensure_future(operation) for operation in submit()]
    while spool._ops.qsize() < len(operations):  # each has queued its operation
        await asyncio.sleep(0.001)
    spool.db.conn.set_trace_callback(statements.append)
    gate.set()
    await held
    results = await asyncio.gather(*operations, return_exceptions=True)
    spool.db.conn.set_trace_callback(None)
    return results, statements


@pytest.mark.parametrize("bulk", [True, False])
def test_concurrent_puts_share_one_transaction(spool_dir: Path, bulk: bool) -> None:
    """One transaction for the batch; with a recent SQLite one INSERT for all of it."""
    async def scenario() -> tuple[list[Any], list[str], int]:
        spool = Spool(spool_dir)
        spool.db.bulk = bulk
        spool.start()
        try:
            results, statements = await one_batch(
                spool, lambda: [spool.put(envelope(f"M{n:03d}"), 1) for n in range(100)])
            return results, statements, (await spool.counts())["queued"]
        finally:
            await spool.close()

    results, statements, queued = asyncio.run(scenario())
    assert results == [None] * 100 and queued == 100
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1  # one transaction, one fsync, for 100 messages
    assert sum(s.startswith("INSERT INTO messages") for s in statements) == (1 if bulk else 100)


def test_concurrent_puts_without_a_gate_still_batch(spool_dir: Path) -> None:
    commits = 0

    def count(statement: str) -> None:
        nonlocal commits
        commits += statement == "COMMIT"

    async def scenario() -> int:
        spool = Spool(spool_dir)
        spool.db.conn.set_trace_callback(count)
        spool.start()
        try:
            await asyncio.gather(*(spool.put(envelope(f"M{n:03d}"), 1) for n in range(200)))
            return (await spool.counts())["queued"]
        finally:
            await spool.close()

    assert asyncio.run(scenario()) == 200
    assert 1 <= commits < 200 // 4


def test_one_failed_write_in_a_batch_is_rolled_back_alone(spool_dir: Path) -> None:
    def fail_halfway(db: SpoolDB) -> None:
        db.record("HALF", DELIVERED, time.time())  # would unlink HALF's body files...
        raise RuntimeError("a bug after the first statement")  # ...but is rolled back

    async def scenario() -> tuple[list[Any], list[str], Spool]:
        spool = Spool(spool_dir)
        spool.start()
        try:
            for queue_id in ("SENT", "HALF"):
                await spool.put(envelope(queue_id, LARGE), 1)  # bodies in files
            await spool.put(envelope("TWICE"), 1)
            results, statements = await one_batch(spool, lambda: [
                spool.record_soon("SENT", DELIVERED),
                spool.put(envelope("TWICE"), 1),  # the id exists: UNIQUE constraint
                spool._submit(fail_halfway, write=True),
                spool.put(envelope("NEW"), 1),
            ])
            return results, statements, spool
        finally:
            await spool.close()

    results, statements, _ = asyncio.run(scenario())
    recorded, duplicate, bug, new = results
    assert recorded is True and new is None
    assert isinstance(duplicate, SpoolError) and "UNIQUE constraint failed" in str(duplicate)
    assert isinstance(bug, RuntimeError)  # not a spool error: it keeps its type for the log
    assert statements.count("COMMIT") == 1
    assert statements.count("ROLLBACK TO op") == 2

    db = SpoolDB(spool_dir, create=False)
    states = {m.id: m.state for m in db.list()}
    assert states == {"SENT": "delivered", "HALF": "queued", "TWICE": "queued", "NEW": "queued"}
    # The committed record's files went; the rolled-back one's stayed with its row.
    assert names(spool_dir / "bodies") == ["HALF", "HALF.env"]
    assert db.data("HALF") == LARGE
    db.close()


@pytest.mark.parametrize("reports", [True, False])
def test_upstream_ids_are_indexed_only_for_reports(spool_dir: Path, reports: bool) -> None:
    """The `sent` index serves report matching alone: a relay without reports skips it."""
    db = SpoolDB(spool_dir)
    db.index_sent = reports
    try:
        store(db, "M1", SMALL)
        sent = Outcome((Recipient("a@y.test", "delivered", "250 ok", "IB-1"),
                        Recipient("b@y.test", "delivered", "250 ok", "IB-1")),
                       "delivered", 0.0, 1, "250 ok", "IB-1")
        assert db.transaction(lambda: db.record("M1", sent, time.time())) is True
        rows = db.conn.execute("SELECT upstream_id, recipient, message_id FROM sent").fetchall()
        assert sorted(rows) == ([("IB-1", "a@y.test", "M1"), ("IB-1", "b@y.test", "M1")]
                                if reports else [])
        assert [r.state for r in db.get("M1").recipients] == ["delivered", "delivered"]
    finally:
        db.close()


def _numbered_dsns() -> Callable[[Any, bytes, list[Any]], Generated]:
    """A bouncer whose DSNs are numbered in the order it is called."""
    numbers = itertools.count(1)

    def bounce(message: Any, headers: bytes, failed: list[Any]) -> Generated:
        return Generated(f"DSN-{next(numbers)}-{message.id}", "", (message.mail_from,),
                         b"Subject: dsn\r\n\r\n" + b",".join(f.address.encode() for f in failed))
    return bounce


def _outcome(kind: str, attempt: int) -> Outcome:
    a, b = "a@y.test", "b@y.test"
    recipients = {
        "delivered": (Recipient(a, "delivered", "250 ok", f"IB-{attempt}"),
                      Recipient(b, "delivered", "250 ok", f"IB-{attempt}")),
        "deferred": (Recipient(a, "pending", "451 later"), Recipient(b, "pending", "451 later")),
        "partial": (Recipient(a, "delivered", "250 ok", f"IB-{attempt}"),
                    Recipient(b, "failed", "550 no such user")),
        "failed": (Recipient(a, "failed", "550 no"), Recipient(b, "failed", "550 no")),
    }[kind]
    state = {"delivered": "delivered", "deferred": "deferred", "partial": "failed",
             "failed": "failed"}[kind]
    upstream_id = f"IB-{attempt}" if kind in ("delivered", "partial") else None
    return Outcome(recipients, state, 1000.0 + attempt, attempt, "reply", upstream_id)


_KINDS = st.sampled_from(["delivered", "deferred", "partial", "failed"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["M0", "M1", "M2", "M3", "GONE"]), _KINDS),
                min_size=1, max_size=8),
       st.dictionaries(st.sampled_from(["M0", "M1", "M2", "M3"]),
                       st.sampled_from(["deferred", "partial"])), st.booleans())
def test_record_many_writes_what_record_does_one_by_one(
        tmp_path_factory: pytest.TempPathFactory, outcomes: list[tuple[str, str]],
        earlier: dict[str, str], reports: bool) -> None:
    """The bulk path is the same change as the one-by-one path, row for row: merges with an
    earlier attempt, dropped bodies, upstream-id index, DSNs, missing and repeated ids."""
    def run(bulk: bool) -> tuple[Any, ...]:
        db = SpoolDB(tmp_path_factory.mktemp("spool"))
        db.index_sent, db.keep_headers, db.bouncer = reports, True, _numbered_dsns()
        try:
            for n in range(4):
                data = LARGE if n % 2 else SMALL
                ctx = MessageContext(f"M{n}", "app@x.test", ("a@y.test", "b@y.test"),
                                     "192.0.2.7", None, "local", len(data))
                db.transaction(lambda ctx=ctx, data=data: db.insert(Envelope(ctx, data), 1, 100.0))
            for queue_id, kind in sorted(earlier.items()):  # an earlier attempt's mark
                db.transaction(lambda q=queue_id, k=kind: db.record(q, _outcome(k, 0), 500.0))
            items = [(queue_id, _outcome(kind, n + 1), 900.0 + n)
                     for n, (queue_id, kind) in enumerate(outcomes)]
            if bulk:
                found = db.transaction(lambda: db.record_many(items))
            else:
                found = db.transaction(lambda: [db.record(*item) for item in items])
            unlinked = sorted(p.name for p in (db.bodies.iterdir() if db.bodies.exists()
                                               else ()))
            return (found, db.conn.execute("SELECT * FROM messages ORDER BY id").fetchall(),
                    db.conn.execute("SELECT * FROM sent ORDER BY 1, 2").fetchall(), unlinked)
        finally:
            db.close()

    assert run(bulk=True) == run(bulk=False)


@pytest.mark.parametrize("bulk", [True, False])
def test_only_a_delivered_message_with_body_files_has_files_to_remove(
        spool_dir: Path, bulk: bool) -> None:
    """A message kept in its row never had files: dropping it costs no unlink() calls (two
    per message, each a system call in the writer thread); a file body and its sidecar go."""
    db = SpoolDB(spool_dir)
    try:
        for queue_id, data in (("ROW", SMALL), ("FILE", LARGE)):
            db.transaction(lambda q=queue_id, d=data: db.insert(envelope(q, d), 1, 100.0))
        for queue_id, expected in (("ROW", []), ("FILE", ["FILE", "FILE.env"])):
            item = (queue_id, DELIVERED, 200.0)

            def record(item: tuple[str, Outcome, float] = item) -> list[str]:
                db.record_many([item]) if bulk else db.record(*item)
                return sorted(path.name for path in db._unlink_after_commit)
            assert db.transaction(record) == expected
        assert not any(db.bodies.iterdir())  # and the transaction removed them
    finally:
        db.close()


def test_a_delivered_row_is_freed_without_rewriting_its_pages(spool_dir: Path) -> None:
    """Dropping a delivered in-row body frees its pages; it must not write them again.

    Debian builds SQLite with SECURE_DELETE, which zeroes every freed page through the WAL:
    each delivered body was written twice. The spool asks for the FAST mode."""
    body = b"Subject: in the row\r\n\r\n" + b"y" * 200_000
    db = SpoolDB(spool_dir)
    try:
        assert len(body) <= spool_module.FILE_BODY_THRESHOLD  # kept in its row
        db.transaction(lambda: db.insert(envelope("ROW", body), 1, 100.0))
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = spool_dir / f"{DB_NAME}-wal"
        assert wal.stat().st_size == 0
        db.transaction(lambda: db.record("ROW", DELIVERED, 200.0))
        frames = (wal.stat().st_size - 32) // (24 + 4096)
        # The body's ~49 overflow pages go to the free list; only the row's leaf page, the
        # free-list trunk, the header page and the other tables' pages are written.
        assert 0 < frames < 12, frames
    finally:
        db.close()


def test_closing_lets_a_large_put_in_flight_commit(spool_dir: Path) -> None:
    """A body file still being written when the spool closes (a graceful stop) gets its row
    committed: the session in that put hears 250-worthy success, and nothing is orphaned."""
    async def scenario() -> None:
        spool = Spool(spool_dir)
        spool.start()
        put = asyncio.ensure_future(spool.put(envelope("BIG", LARGE), 1))
        await asyncio.sleep(0)  # a body writer has it
        await spool.close()
        await put

    asyncio.run(scenario())
    db = SpoolDB(spool_dir)
    try:
        stored = db.get("BIG")
        assert stored is not None and stored.state == "queued"
        assert db.data("BIG") == LARGE
    finally:
        db.close()


def test_a_body_file_that_cannot_be_written_fails_the_put_and_leaves_no_row(
        spool_dir: Path) -> None:
    """The body writer's failure reaches the waiting session as a SpoolError (a 452), and no
    insert follows it."""
    async def scenario() -> str:
        spool = Spool(spool_dir)
        spool.start()
        try:
            (spool_dir / "bodies").mkdir(exist_ok=True)
            (spool_dir / "bodies" / "BIG").mkdir()  # the body file cannot be created
            with pytest.raises(SpoolError) as raised:
                await asyncio.wait_for(spool.put(envelope("BIG", LARGE), 1), 10)
            assert await spool.get("BIG") is None
            await asyncio.wait_for(spool.put(envelope("NEXT"), 1), 10)  # the spool goes on
            return str(raised.value)
        finally:
            await spool.close()

    assert "spool error" in asyncio.run(scenario())


def test_a_body_file_that_cannot_be_removed_does_not_stop_the_writer(
        spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A delivered message's file is removed after the commit; an error there (EISDIR here,
    EACCES or EIO elsewhere) is logged, and the writer goes on with the next batch."""
    async def scenario() -> tuple[bool, int]:
        spool = Spool(spool_dir)
        spool.start()
        try:
            await spool.put(envelope("SENT", LARGE), 1)
            body = spool_dir / "bodies" / "SENT"
            body.unlink()
            (body / "in-the-way").mkdir(parents=True)  # unlink() now fails with EISDIR
            recorded = await asyncio.wait_for(spool.record_soon("SENT", DELIVERED), 5)
            await asyncio.wait_for(spool.put(envelope("NEXT"), 1), 5)
            return recorded, (await asyncio.wait_for(spool.counts(), 5))["queued"]
        finally:
            await spool.close()

    with caplog.at_level(logging.ERROR, logger="relay.spool"):
        recorded, queued = asyncio.run(scenario())
    assert recorded is True and queued == 1
    assert any("cannot remove" in r.getMessage() and "SENT" in r.getMessage()
               for r in caplog.records)


def test_delivered_files_are_removed_outside_the_writer_thread_and_before_close_ends(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing a batch's files took 6-18 ms with large mail: done in the writer thread, the
    next group commit (sessions waiting for their 250) waited for it."""
    threads: list[str] = []
    real_unlink_files = spool_module.unlink_files

    def watched(paths: list[Path]) -> None:
        threads.append(threading.current_thread().name)
        real_unlink_files(paths)
    monkeypatch.setattr(spool_module, "unlink_files", watched)

    async def scenario() -> None:
        spool = Spool(spool_dir)
        spool.start()
        try:
            await spool.put(envelope("SENT", LARGE), 1)
            assert await asyncio.wait_for(spool.record_soon("SENT", DELIVERED), 5) is True
        finally:
            await spool.close()

    asyncio.run(scenario())
    assert threads and all(name.startswith("spool-unlink") for name in threads), threads
    assert names(spool_dir / "bodies") == []  # close() waited for the removal


@pytest.mark.parametrize("big_first", [True, False])
def test_a_full_disk_in_a_batch_never_reports_a_write_that_did_not_commit(
        spool_dir: Path, big_first: bool) -> None:
    """SQLite may roll back the whole transaction on SQLITE_FULL, savepoints and all: then the
    whole batch fails, and each caller hears so (never a 250 or a recorded outcome that is not
    on disk)."""
    async def scenario() -> tuple[list[Any], list[str]]:
        spool = Spool(spool_dir)
        spool.start()
        try:
            await spool.put(envelope("SENT", LARGE), 1)
            pages = spool.db.conn.execute("PRAGMA page_count").fetchone()[0]
            spool.db.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full

            def submit() -> list[Awaitable[Any]]:
                operations = [spool.put(envelope("BIG", SMALL + b"x" * 50_000), 1),
                              spool.record_soon("SENT", DELIVERED)]
                return operations if big_first else operations[::-1]

            return await one_batch(spool, submit)
        finally:
            await spool.close()

    results, statements = asyncio.run(scenario())
    put, recorded = results if big_first else results[::-1]
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert isinstance(put, SpoolError) or isinstance(recorded, SpoolError)
    db = SpoolDB(spool_dir, create=False)
    states = {m.id: m.state for m in db.list()}
    assert ("BIG" in states) == (put is None)
    assert states["SENT"] == ("delivered" if recorded is True else "queued")
    assert names(spool_dir / "bodies") == ([] if recorded is True else ["SENT", "SENT.env"])
    db.close()


# --------------------------------------------------------------------------- Spool.open


def worker_spool(queue_path: Path, index: int, *queue_ids: str) -> None:
    db = SpoolDB(queue_path / f"worker-{index}")
    for queue_id in queue_ids:
        store(db, queue_id)
    db.close()


def ids(spool: Spool) -> list[str]:
    return sorted(m.id for m in spool.db.list())


def test_free_space_is_measured_again_near_the_limit_or_after_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """statvfs() at every MAIL was 3 % of the loop's time: a recent figure with a wide margin
    is reused, but near min_free_space (or after a second) each MAIL measures."""
    calls: list[str] = []
    real_statvfs = os.statvfs

    def counted(path: Any) -> os.statvfs_result:
        calls.append(str(path))
        return real_statvfs(path)
    monkeypatch.setattr(spool_module.os, "statvfs", counted)
    spool = Spool(tmp_path / "spool")
    try:
        free = spool.free_space()
        assert free > 2 * spool_module._FREE_SPACE_MARGIN, "the test needs 2 GiB free in /tmp"
        assert spool.free_space(needed=1000) == free
        assert len(calls) == 1  # plenty of room: the figure of a moment ago will do
        tight = free - spool_module._FREE_SPACE_MARGIN // 2
        spool.free_space(needed=tight)
        spool.free_space(needed=tight)
        assert len(calls) == 3  # near the limit: measured each time
        measured, at = spool._free_space
        spool._free_space = (measured, at - spool_module._FREE_SPACE_TTL)
        spool.free_space(needed=1000)
        assert len(calls) == 4  # a second later: measured again
    finally:
        spool.db.close()


def test_spool_open_holds_the_lock_until_close(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "queue")
    assert (tmp_path / "queue" / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(SpoolError, match="another infobip-relay is already using the spool"):
        Spool.open(tmp_path / "queue")
    asyncio.run(spool.close())
    asyncio.run(Spool.open(tmp_path / "queue").close())  # free again


def test_spool_open_gives_each_orphaned_worker_spool_to_one_worker(tmp_path: Path) -> None:
    queue_path = tmp_path / "queue"
    for index in (1, 2, 3, 4):
        worker_spool(queue_path, index, f"W{index}")
    # Down from five workers to two: worker 1 keeps its spool; 2 and 4 go to worker 0, 3 to 1.
    first = Spool.open(queue_path, worker=0, workers=2)
    second = Spool.open(queue_path, worker=1, workers=2)
    try:
        assert ids(first) == ["W2", "W4"]
        assert second.db.directory == queue_path / "worker-1"
        assert ids(second) == ["W1", "W3"]
        assert names(queue_path / "bodies") == ["W2", "W2.env", "W4", "W4.env"]
        assert first.db.data("W4") == LARGE and second.db.data("W3") == LARGE
    finally:
        asyncio.run(first.close())
        asyncio.run(second.close())
    emptied = SpoolDB(queue_path / "worker-3", create=False)
    assert emptied.list() == [] and names(queue_path / "worker-3" / "bodies") == []
    emptied.close()


@pytest.mark.parametrize("crash", ["before the files", "after the files"])
def test_a_takeover_interrupted_between_its_steps_is_repeated_without_loss_or_duplicate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str) -> None:
    queue_path = tmp_path / "queue"
    worker_spool(queue_path, 1, "MOVE1", "MOVE2")
    move = spool_module._move_body_files

    def crashing(source: SpoolDB, target: SpoolDB) -> None:
        if crash == "after the files":
            move(source, target)
        raise OSError("killed")

    monkeypatch.setattr(spool_module, "_move_body_files", crashing)
    with pytest.raises(OSError, match="killed"):
        Spool.open(queue_path)
    monkeypatch.undo()
    # The rows are in both spools now; the lock went with the failed open.
    spool = Spool.open(queue_path)  # the next start repeats the steps
    try:
        assert ids(spool) == ["MOVE1", "MOVE2"]
        assert spool.db.data("MOVE1") == LARGE and spool.db.data("MOVE2") == LARGE
        assert spool.db.quarantine_orphan_bodies() == []
    finally:
        asyncio.run(spool.close())
    source = SpoolDB(queue_path / "worker-1", create=False)
    assert source.list() == [] and names(queue_path / "worker-1" / "bodies") == []
    source.close()
    assert absorb_spool(SpoolDB(queue_path), queue_path / "worker-1") == 0  # nothing twice
