"""relay.pidfile: written by the process that talks to systemd, read by `infobip-relay reload`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.pidfile import PID_FILE, read_pid, remove_pid, write_pid


def test_write_read_remove(tmp_path: Path) -> None:
    (tmp_path / PID_FILE).write_text("123456789 stale and longer\n", encoding="ascii")
    (tmp_path / PID_FILE).chmod(0o644)
    write_pid(tmp_path)
    assert (tmp_path / PID_FILE).read_text(encoding="ascii") == f"{os.getpid()}\n"
    assert (tmp_path / PID_FILE).stat().st_mode & 0o777 == 0o600
    assert read_pid(tmp_path) == os.getpid()
    remove_pid(tmp_path)
    assert read_pid(tmp_path) is None
    remove_pid(tmp_path)  # already gone: no error


@pytest.mark.parametrize("content", ["0\n", "-1\n", "-4242\n", "", "abc\n", "12 13\n"])
def test_a_pid_that_would_signal_a_group_or_makes_no_sense_is_none(tmp_path: Path,
                                                                    content: str) -> None:
    (tmp_path / PID_FILE).write_text(content, encoding="ascii")
    assert read_pid(tmp_path) is None
