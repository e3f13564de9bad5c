"""The spool attacked on disk: an emptied, damaged or foreign database, and who may read it.

Real `infobip-relay` processes on real files: nothing here mocks SQLite or the file system.
"""

from __future__ import annotations

import hashlib
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from relayrunner import REPO, ProcessRelay, relay_config, wait_until, write_config
from spooldamage import (
    make_foreign_file,
    make_foreign_sqlite,
    make_spool_with_rows,
    overwrite_middle_page,
    store_streamed,
)

from relay.cli import main as cli_main
from relay.config import load_config, permission_warnings
from relay.envelope import Envelope, MessageContext
from relay.spool import DB_NAME, SPLIT, WHOLE_FILE, SpoolDB

pytestmark = pytest.mark.slow

LARGE_BODY = b"".join(b"%06d a line of a large report ..................................\r\n" % n
                      for n in range(4400))  # ~300 KB: kept in a body file of its own
StartProcess = Callable[[dict[str, Any]], ProcessRelay]


def send_large(address: tuple[str, int], subject: str, recipient: str) -> str:
    """Send one ~300 KB message; returns the queue id from the 250 reply."""
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("app@x.test")
        assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(f"Subject: {subject}\r\n\r\n".encode() + LARGE_BODY)
        assert code == 250, reply
        return reply.split()[-1].decode()


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """`infobip-relay ARGV...` as a separate process: tracebacks would show on its stderr."""
    return subprocess.run([sys.executable, "-m", "relay.cli", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=60, check=False)


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a digest of its content."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


# --------------------------------------------------------------------------- an emptied database


def test_an_emptied_database_quarantines_the_bodies_and_recover_delivers_them(
        fake_upstream: Any, start_relay_process: StartProcess, tmp_path: Path) -> None:
    config = relay_config(tmp_path, fake_upstream)
    spool = Path(config["queue"]["path"])
    fake_upstream.stop()  # the spool alone holds the mail
    relay = start_relay_process(config)
    sent = {send_large(relay.address, f"large {n}", f"user{n}@y.test"): f"user{n}@y.test"
            for n in range(3)}
    assert relay.terminate() == 0
    originals = _stored_messages(spool, sent)
    for queue_id, message in originals.items():  # streamed: the file holds the body alone
        assert (spool / "bodies" / queue_id).read_bytes() == message[message.index(b"\r\n\r\n")
                                                                     + 2:]
    (spool / DB_NAME).write_bytes(b"")  # what the operator found: 0 bytes

    relay = start_relay_process(config)
    quarantine = spool / "bodies" / "orphaned"
    assert names(quarantine) == sorted([*sent, *(f"{queue_id}.env" for queue_id in sent)])
    [alarm] = [line for line in relay.log().splitlines() if "unknown to the spool" in line]
    assert " ERROR " in alarm and "3 message body file(s)" in alarm and str(quarantine) in alarm
    assert "new or empty" in alarm and "queue recover" in alarm

    fake_upstream.start()
    assert cli_main(["queue", "recover", "--spool", str(spool)]) == 0  # the relay is running
    received = fake_upstream.wait_for(3, timeout=20)
    assert {tuple(m.rcpt_tos) for m in received} == {(rcpt,) for rcpt in sent.values()}
    by_id = {_queue_id_of(m.data): m for m in received}
    assert by_id.keys() == sent.keys()  # each went out under its original id
    for queue_id, message in by_id.items():
        assert message.data == originals[queue_id]
        assert message.mail_from == "app@x.test"
    wait_until(lambda: names(spool / "bodies") == ["orphaned"], what="bodies removed")
    assert names(quarantine) == []
    assert relay.terminate() == 0


def _stored_messages(spool: Path, ids: Iterable[str]) -> dict[str, bytes]:
    """Each message as the spool would send it, checking that it is stored split."""
    db = SpoolDB(spool, create=False)
    try:
        kinds = dict(db.conn.execute("SELECT id, body_file FROM messages"))
        assert {queue_id: kinds[queue_id] for queue_id in ids} == dict.fromkeys(ids, SPLIT)
        return {queue_id: db.data(queue_id) or b"" for queue_id in ids}
    finally:
        db.close()


def test_split_and_old_whole_file_rows_both_deliver_byte_exact(
        fake_upstream: Any, start_relay_process: StartProcess, tmp_path: Path) -> None:
    """A spool an older relay wrote (the whole message in the body file) beside split rows."""
    config = relay_config(tmp_path, fake_upstream)
    spool = Path(config["queue"]["path"])
    db = SpoolDB(spool)
    whole = b"Received: from old\r\n\tby relay; id OLDWHOLE; 1 Jan 2030\r\nSubject: old\r\n\r\n" + \
        LARGE_BODY
    ctx = MessageContext("OLDWHOLE", "app@x.test", ("a@y.test",), "127.0.0.1", None, "local", 0)
    db.transaction(lambda: db.insert(Envelope(ctx, whole), 1, time.time()))
    head = b"Received: from new\r\n\tby relay; id NEWSPLIT; 1 Jan 2030\r\nSubject: new\r\n"
    store_streamed(db, "NEWSPLIT", head, b"\r\n.dot first\r\n" + LARGE_BODY)
    assert dict(db.conn.execute("SELECT id, body_file FROM messages")) == \
        {"OLDWHOLE": WHOLE_FILE, "NEWSPLIT": SPLIT}
    db.close()

    relay = start_relay_process(config)
    received = {_queue_id_of(m.data): m.data for m in fake_upstream.wait_for(2, timeout=20)}
    assert received == {"OLDWHOLE": whole,
                        "NEWSPLIT": head + b"\r\n.dot first\r\n" + LARGE_BODY}
    wait_until(lambda: names(spool / "bodies") == [], what="bodies removed")
    assert relay.terminate() == 0


def _queue_id_of(data: bytes) -> str:
    received = data.split(b"\r\n\r\n", 1)[0].decode()
    return received.split(" id ", 1)[1].split(";", 1)[0]


def test_recover_without_an_envelope_file_keeps_the_body_until_given_one(
        tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    SpoolDB(spool).close()
    quarantine = spool / "bodies" / "orphaned"
    quarantine.mkdir(parents=True)
    (quarantine / "0001").write_bytes(b"Subject: old\r\n\r\n" + LARGE_BODY)  # older relay

    listed = cli("queue", "recover", "--spool", str(spool))
    assert listed.returncode == 1
    assert "0001: " in listed.stdout and "no envelope file" in listed.stdout
    assert "left in quarantine" in listed.stderr and "Traceback" not in listed.stderr
    assert names(quarantine) == ["0001"]

    given = cli("queue", "recover", "0001", "--from", "app@x.test", "--to", "a@y.test",
                "--spool", str(spool))
    assert given.returncode == 0, given.stderr
    db = SpoolDB(spool, create=False)
    message = db.get("0001")
    assert message is not None and message.state == "queued"
    assert (message.mail_from, message.pending) == ("app@x.test", ("a@y.test",))
    assert db.data("0001") == b"Subject: old\r\n\r\n" + LARGE_BODY
    db.close()
    assert names(quarantine) == []


def test_recover_after_a_stop_quarantines_first(tmp_path: Path) -> None:
    """The relay stopped, the database emptied: `queue recover` need not wait for a start."""
    spool = tmp_path / "spool"
    db = SpoolDB(spool)
    ctx = MessageContext("LOSTROW", "app@x.test", ("a@y.test",), "127.0.0.1", None, "local", 0)
    db.transaction(lambda: db.insert(Envelope(ctx, LARGE_BODY), 1, time.time()))
    db.close()
    (spool / DB_NAME).write_bytes(b"")
    result = cli("queue", "recover", "--spool", str(spool))
    assert result.returncode == 0, result.stderr
    assert "moved 1 body file(s)" in result.stdout and "LOSTROW: re-imported" in result.stdout
    db = SpoolDB(spool, create=False)
    assert db.data("LOSTROW") == LARGE_BODY
    db.close()


# --------------------------------------------------------------------------- damaged, foreign


@pytest.fixture(params=[overwrite_middle_page, make_foreign_file, make_foreign_sqlite],
                ids=["garbage-page", "foreign-file", "foreign-sqlite"])
def damaged_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A config file whose spool holds rows and a body file, its database then spoiled."""
    config = relay_config(tmp_path, None)
    spool = Path(config["queue"]["path"])
    make_spool_with_rows(spool)
    request.param(spool / DB_NAME)
    yield write_config(tmp_path, config)


@pytest.mark.parametrize("command", [["serve"], ["queue", "list"], ["queue", "recover"]])
def test_a_damaged_or_foreign_database_is_one_line_and_nothing_changes(
        damaged_spool: Path, command: list[str]) -> None:
    spool = load_config(damaged_spool).queue.path
    before = fingerprint(spool)
    result = cli(*command, "-c", str(damaged_spool))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("infobip-relay: error: ")
    assert "left untouched" in line
    after = fingerprint(spool)
    after.pop("relay.lock", None)  # `serve` takes the lock before it opens the database
    assert after == before


# --------------------------------------------------------------------------- files and secrets


@pytest.mark.parametrize("workers", [1, 2])
def test_every_file_in_the_spool_is_private(fake_upstream: Any, start_relay_process: StartProcess,
                                            tmp_path: Path, workers: int) -> None:
    config = relay_config(tmp_path, fake_upstream, workers=workers)
    spool = Path(config["queue"]["path"])
    spool.mkdir(mode=0o755)
    os.chmod(spool, 0o755)  # made by someone else, e.g. `install -d`
    fake_upstream.stop()  # keep the large bodies on disk
    old_umask = os.umask(0o022)  # what a shell gives; the relay inherits it
    try:
        relay = start_relay_process(config)
    finally:
        os.umask(old_umask)
    for number in range(4):  # with two workers, the kernel spreads these over both
        send_large(relay.address, f"large {number}", "a@y.test")
    wait_until((spool / "relay.pid").exists, what="pid file")
    everything = [spool, *spool.rglob("*")]
    seen = {path.name for path in everything}
    assert {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "relay.pid", "relay.lock",
            "bodies"} <= seen
    assert any(name.endswith(".env") for name in seen)
    loose = {str(path): oct(path.stat().st_mode & 0o777) for path in everything
             if path.stat().st_mode & 0o777 != (0o700 if path.is_dir() else 0o600)}
    assert loose == {}
    assert relay.terminate() == 0


def test_readable_secret_files_are_warned_about(
        fake_upstream: Any, start_relay_process: StartProcess, tmp_path: Path,
        listener_cert_files: tuple[Path, Path]) -> None:
    password_file = tmp_path / "api-key"
    password_file.write_text("test-api-key\n", encoding="utf-8")
    password_file.chmod(0o644)
    certificate, private_key = listener_cert_files
    key_copy = tmp_path / "key.pem"
    key_copy.write_bytes(private_key.read_bytes())
    key_copy.chmod(0o640)
    config = relay_config(tmp_path, fake_upstream)
    del config["upstream"]["password"]
    config["upstream"]["password_file"] = str(password_file)
    config["listeners"][0].update(tls="starttls", certificate=str(certificate),
                                  private_key=str(key_copy))
    path = write_config(tmp_path, config)

    checked = cli("check-config", "-c", str(path))
    assert checked.returncode == 0
    warnings = [line for line in checked.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2
    assert f"upstream.password_file: {password_file}" in warnings[0] and "0644" in warnings[0]
    assert f"listeners[0].private_key: {key_copy}" in warnings[1] and "0640" in warnings[1]
    assert "test-api-key" not in checked.stdout + checked.stderr

    relay = start_relay_process(config)
    logged = [line for line in relay.log().splitlines() if "accessible by group" in line]
    assert len(logged) == 2 and all(" WARNING " in line for line in logged)
    assert relay.terminate() == 0

    password_file.chmod(0o600)
    key_copy.chmod(0o600)
    assert permission_warnings(load_config(path)) == []
