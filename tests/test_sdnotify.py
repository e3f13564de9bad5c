"""relay.sdnotify against real AF_UNIX datagram sockets standing in for systemd's notify socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import sdnotify

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="sd_notify and abstract sockets are Linux-only"
)


class Receiver:
    """The manager's end: a bound datagram socket that records what arrives and from whom."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # SO_PASSCRED makes the kernel attach the sender's pid, as systemd does to enforce
        # NotifyAccess=main.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> tuple[bytes, int]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        return data, pid

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    address = str(tmp_path / "notify.sock")
    receiver = Receiver(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield receiver
    receiver.sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"infobip-relay-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield receiver
    receiver.sock.close()


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (sdnotify.ready, b"READY=1"),
        (
            lambda: sdnotify.ready("accepting on 127.0.0.1:2525"),
            b"READY=1\nSTATUS=accepting on 127.0.0.1:2525",
        ),
        (sdnotify.stopping, b"STOPPING=1"),
        (sdnotify.watchdog, b"WATCHDOG=1"),
        (lambda: sdnotify.status("3 queued"), b"STATUS=3 queued"),
        (lambda: sdnotify.status("caf\u00e9"), "STATUS=caf\u00e9".encode()),
        (lambda: sdnotify.notify("FDSTORE=0\nERRNO=5"), b"FDSTORE=0\nERRNO=5"),
    ],
    ids=["ready", "ready-status", "stopping", "watchdog", "status", "status-utf8", "raw"],
)
def test_exact_datagram_on_path_socket(
    path_socket: Receiver, send: Callable[[], bool], expected: bytes
) -> None:
    assert send() is True
    data, pid = path_socket.receive()
    assert data == expected
    # Sent by this very process, so NotifyAccess=main accepts it (no helper subprocess).
    assert pid == os.getpid()
    path_socket.assert_empty()


def test_exact_datagram_on_abstract_socket(abstract_socket: Receiver) -> None:
    assert sdnotify.ready("up") is True
    assert abstract_socket.receive()[0] == b"READY=1\nSTATUS=up"
    assert sdnotify.stopping() is True
    assert abstract_socket.receive()[0] == b"STOPPING=1"


def test_reloading_carries_current_monotonic_usec(path_socket: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data, _pid = path_socket.receive()
    first, second = data.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_newlines_in_status_cannot_inject_assignments(path_socket: Receiver) -> None:
    assert sdnotify.status("bad\nREADY=1\r\nSTOPPING=1") is True
    assert path_socket.receive()[0] == b"STATUS=bad READY=1 STOPPING=1"
    assert sdnotify.ready("a\nb") is True
    assert path_socket.receive()[0] == b"READY=1\nSTATUS=a b"


@pytest.mark.parametrize(
    "send",
    [
        sdnotify.ready,
        sdnotify.stopping,
        sdnotify.reloading,
        sdnotify.watchdog,
        lambda: sdnotify.status("x"),
        lambda: sdnotify.notify("READY=1"),
    ],
)
def test_not_under_systemd_returns_false(
    monkeypatch: pytest.MonkeyPatch, send: Callable[[], bool]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert send() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert send() is False


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify.sock", "/no/such/dir/sock"])
def test_unusable_socket_returns_false_and_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.DEBUG, logger="relay.sdnotify"):
        assert sdnotify.ready() is False
    assert any(r.levelno == logging.DEBUG for r in caplog.records)


def test_manager_gone_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket file whose listener closed: connect() gets ECONNREFUSED, which must not escape.
    address = str(tmp_path / "gone.sock")
    receiver = Receiver(address)
    receiver.sock.close()
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.watchdog() is False


def test_unencodable_text_returns_false(path_socket: Receiver) -> None:
    assert sdnotify.status("\udcff") is False
    path_socket.assert_empty()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("2500000", "self", 2.5),
        ("30000000", "other", None),
        ("30000000", "junk", None),
        ("junk", None, None),
        ("0", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() == expected
