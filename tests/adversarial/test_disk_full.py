"""Disk full: the spool on a 2 MiB tmpfs.

With the upstream down, a real ``infobip-relay serve`` process takes messages until its spool
fills up. It must then answer 452 (a temporary failure: the client keeps the message), never a
5xx, never a 250 it cannot keep, and log no traceback. Once the upstream is back, every message
that got a 250 is delivered, byte for byte and once, and the freed space takes mail again.

Needs root (``mount -t tmpfs``); skips, saying why, where mounting is not permitted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from relayrunner import ProcessRelay, relay_config

# Heavy tests share one xdist worker, one at a time (see pyproject addopts).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

TMPFS_SIZE = "2m"
MAX_ATTEMPTS = 400  # 2 MiB / 20 KiB is ~100: the spool must fill long before this


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A fresh 2 MiB tmpfs mount point, unmounted at teardown.

    Not under pytest's tmp_path: concurrent pytest sessions prune old tmp_path trees, and a
    pruning walk must never run into a live mount.
    """
    if os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a tmpfs (CI runs as root)")
    mount = shutil.which("mount") or shutil.which("mount", path="/usr/bin:/bin")
    umount = shutil.which("umount") or shutil.which("umount", path="/usr/bin:/bin")
    if mount is None or umount is None:
        pytest.skip("disk-full test needs mount(8) and umount(8) (util-linux)")
    point = Path(tempfile.mkdtemp(prefix="relay-diskfull-"))
    result = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                             "tmpfs", str(point)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): "
                    "the disk-full test needs CAP_SYS_ADMIN")
    try:
        yield point
    finally:
        if subprocess.run([umount, str(point)], capture_output=True, check=False).returncode:
            subprocess.run([umount, "-l", str(point)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            point.rmdir()


def _message(seq: int, size: int) -> bytes:
    """A message whose body is ``size`` octets of numbered, varied lines."""
    header = (f"From: <app@sender.test>\r\nTo: <user@rcpt.test>\r\nSubject: full {seq}\r\n"
              f"X-Test-Seq: {seq}\r\n\r\n").encode()
    lines = []
    total = 0
    number = 0
    while total < size:
        line = f"{seq:05d}/{number:06d} the quick brown fox jumps over the lazy dog\r\n".encode()
        lines.append(line)
        total += len(line)
        number += 1
    return header + b"".join(lines)


def _body(data: bytes) -> bytes:
    return data[data.index(b"\r\n\r\n") + 4:]


def _send(client: smtplib.SMTP, seq: int, size: int) -> tuple[str, int, bytes]:
    """One transaction: (stage, code, reply) of the first non-250 reply, or DATA's 250."""
    code, reply = client.mail("app@sender.test")
    if code != 250:
        client.rset()
        return "MAIL", code, reply
    code, reply = client.rcpt("user@rcpt.test")
    if code != 250:
        client.rset()
        return "RCPT", code, reply
    code, reply = client.data(_message(seq, size))
    return "DATA", code, reply


def _fill_spool(relay: ProcessRelay) -> tuple[dict[int, bytes], list[tuple[int, str, int, bytes]]]:
    """Send until the relay refuses 5 times; returns ({seq: message} of every 250, refusals).

    Checks on the way that refusals are 452 only, the session survives them, and that nothing
    crashed or logged a traceback.
    """
    sent: dict[int, bytes] = {}
    refusals: list[tuple[int, str, int, bytes]] = []
    # Bodies both under and over the 256 KiB inline limit (kept in the database vs. in files).
    sizes = [20_000, 300_000, 3_000]
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("app.client.test")
        for seq in range(MAX_ATTEMPTS):
            size = sizes[seq % len(sizes)]
            stage, code, reply = _send(client, seq, size)
            if code == 250:  # a smaller message may still fit after a larger one did not
                sent[seq] = _message(seq, size)
                continue
            refusals.append((seq, stage, code, reply))
            if len(refusals) >= 5:
                break
        assert client.noop()[0] == 250  # the session survives a full disk

    assert refusals, f"{MAX_ATTEMPTS} messages fit in a {TMPFS_SIZE} spool?"
    assert sent, f"not even one message fit: {refusals[:1]}"
    assert all(code == 452 for _, _, code, _ in refusals), refusals
    assert relay.proc is not None and relay.proc.poll() is None, relay.log()[-3000:]
    log = relay.log()
    assert "Traceback" not in log, log[-5000:]
    return sent, refusals


def _by_seq(fake: FakeUpstream) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    for message in fake.messages:
        found.setdefault(int(message.parsed()["X-Test-Seq"]), []).append(message.data)
    return found


@pytest.fixture
def full_relay(request: pytest.FixtureRequest, small_tmpfs: Path, fake_upstream: FakeUpstream,
               start_relay_process: Callable[..., ProcessRelay], tmp_path: Path
               ) -> tuple[ProcessRelay, dict[int, bytes]]:
    """A relay process whose spool (on the small tmpfs) was filled while the upstream was down;
    the upstream is started again before the test gets it.

    ``request.param`` is queue.min_free_space: "0" lets the spool hit ENOSPC itself (452 at
    DATA), a reserve makes the relay refuse at MAIL first and keep room for outcomes.
    """
    queue = {"path": str(small_tmpfs / "spool"), "min_free_space": request.param}
    config = relay_config(tmp_path, fake_upstream, queue=queue)
    fake_upstream.stop()  # nothing leaves: the spool fills up
    relay = start_relay_process(config)
    sent, refusals = _fill_spool(relay)
    print(f"\n{len(sent)} message(s) acknowledged before the spool was full; refusals: "
          f"{[(stage, code) for _, stage, code, _ in refusals]}")
    fake_upstream.start()
    return relay, sent


@pytest.mark.parametrize("full_relay", ["0", "512KiB"], indirect=True)
def test_disk_full_answers_452_and_loses_nothing(
        full_relay: tuple[ProcessRelay, dict[int, bytes]], fake_upstream: FakeUpstream) -> None:
    """452 (never 5xx, never a traceback) when full; every 250 delivered, byte for byte."""
    relay, sent = full_relay
    fake_upstream.wait_for(len(sent), timeout=60)
    deadline = time.monotonic() + 30
    while set(_by_seq(fake_upstream)) < set(sent) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # repeats would show up now
    by_seq = _by_seq(fake_upstream)
    assert relay.terminate() == 0
    assert set(by_seq) == set(sent), (f"lost: {sorted(set(sent) - set(by_seq))}, "
                                      f"never acknowledged: {sorted(set(by_seq) - set(sent))}")
    for seq, copies in by_seq.items():
        for copy in copies:
            assert _body(copy) == _body(sent[seq]), f"{seq}: body changed"
    # An outcome that cannot be committed keeps its message claimed: never sent again.
    repeated = {seq: len(copies) for seq, copies in by_seq.items() if len(copies) > 1}
    assert not repeated, f"{len(fake_upstream.messages)} deliveries of {len(sent)}: {repeated}"
    log = relay.log()
    assert "Traceback" not in log, log[-5000:]


@pytest.mark.parametrize("full_relay", ["512KiB"], indirect=True)
def test_disk_full_delivers_each_message_once_then_recovers(
        full_relay: tuple[ProcessRelay, dict[int, bytes]], fake_upstream: FakeUpstream) -> None:
    """Delivering the backlog of a full spool must not repeat it, and the freed space takes new
    mail again."""
    relay, sent = full_relay
    fake_upstream.wait_for(len(sent), timeout=60)
    time.sleep(2.0)  # repeats would show up now
    by_seq = _by_seq(fake_upstream)
    repeated = {seq: len(copies) for seq, copies in by_seq.items() if len(copies) > 1}
    assert not repeated, (f"{len(fake_upstream.messages)} deliveries of {len(sent)} messages; "
                          f"repeated: {dict(list(repeated.items())[:10])}")

    deadline = time.monotonic() + 30
    while True:
        with smtplib.SMTP(*relay.address, timeout=30) as client:
            client.ehlo("app.client.test")
            stage, code, reply = _send(client, 10_000, 20_000)
        if code == 250 or time.monotonic() > deadline:
            break
        assert code == 452, (stage, code, reply)
        time.sleep(0.5)
    assert code == 250, f"still {code} {reply!r} at {stage} after the spool drained"
    fake_upstream.wait_for(len(sent) + 1, timeout=20)
    assert relay.terminate() == 0
    assert "Traceback" not in relay.log()
