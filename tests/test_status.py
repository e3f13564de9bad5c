"""`infobip-relay status` against real relays: over HTTP while one runs, from the spool when not."""

from __future__ import annotations

import json
import os
import smtplib
from pathlib import Path
from typing import Any

import pytest
from relayrunner import ThreadRelay, wait_until

from relay.cli import main
from relay.status import EXIT_NOT_READY, EXIT_NOT_RUNNING, EXIT_RUNNING, format_status, gather

MESSAGE = b"From: app@example.com\r\nSubject: status\r\n\r\nhello\r\n"


def send(relay: ThreadRelay, rcpts: list[str]) -> None:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.sendmail("app@example.com", rcpts, MESSAGE)


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["status", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_status_of_a_relay_with_a_backlog(start_relay, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """Upstream unreachable: mail piles up, status says so over HTTP and exits 1 (not ready)."""
    relay = start_relay(None, queue={"retry_initial": "10m", "retry_max": "30m"})
    for n in range(3):
        send(relay, [f"user{n}@example.net", "other@example.org"])
    config = str(relay.config_path)

    def waiting() -> bool:
        queue = status_json(capsys, "-c", config)[1]["queue"]
        return queue["deferred"] >= 1 and queue["queued"] + queue["deferred"] == 3

    # Delivery pauses after the first failed connects: some mail stays queued, not deferred.
    wait_until(waiting, what="three waiting messages, one of them deferred")
    code, data = status_json(capsys, "-c", config)
    assert code == EXIT_NOT_READY
    assert data["source"] == "http"
    assert data["running"] is True
    assert data["pid"] == os.getpid() and data["pid_alive"] is True  # a relay in this process
    assert data["version"] == "0.1.0"
    assert data["uptime_seconds"] >= 0
    assert data["upstream_up"] is False
    assert data["upstream_auth_ok"] is True
    assert data["ready"] is False and "upstream not reachable" in data["ready_reason"]
    assert data["queue"]["queued"] + data["queue"]["deferred"] == 3
    assert data["oldest"]["state"] in ("queued", "deferred")
    assert data["last_error"]["reply"].startswith("451")
    assert data["last_delivery"] is None

    assert main(["status", "-c", config]) == EXIT_NOT_READY
    text = capsys.readouterr().out
    assert "relay:         running (pid" in text
    assert "upstream:      down; credentials accepted" in text
    assert "deferred, 0 failed, 0 delivered" in text
    assert "last delivery: none yet" in text
    assert "last error:" in text and "451" in text


def test_status_of_a_healthy_relay(start_relay, fake_upstream,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    relay = start_relay(fake_upstream)
    send(relay, ["user@example.net"])
    fake_upstream.wait_for(1)
    config = str(relay.config_path)
    code, data = wait_until(lambda: (r := status_json(capsys, "-c", config))[0] == 0 and r,
                            what="a ready relay")
    assert code == EXIT_RUNNING
    assert data["upstream_up"] is True and data["ready"] is True
    assert data["last_delivery"] is not None
    assert data["last_delivered"]["upstream_id"]
    assert main(["status", "-c", config]) == EXIT_RUNNING
    text = capsys.readouterr().out
    assert "ready:         yes" in text
    assert "upstream:      up; credentials accepted" in text
    assert "Infobip id" in text


def test_status_falls_back_to_the_spool(start_relay, capsys: pytest.CaptureFixture[str]) -> None:
    relay = start_relay(None)
    send(relay, ["user@example.net"])
    relay.stop()
    config = str(relay.config_path)
    code, data = status_json(capsys, "-c", config)
    assert code == EXIT_NOT_RUNNING
    assert data["source"] == "spool" and data["running"] is False
    assert data["queue"]["queued"] + data["queue"]["deferred"] == 1
    assert data["pid"] is None
    assert "not reachable over HTTP" in data["notes"][0]
    assert main(["status", "-c", config]) == EXIT_NOT_RUNNING
    text = capsys.readouterr().out
    assert "relay:         not running" in text
    assert "(from the spool)" in text
    assert "note: relay not reachable over HTTP" in text


def test_status_with_spool_and_url_needs_no_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("INFOBIP_API_KEY", raising=False)
    monkeypatch.delenv("INFOBIP_RELAY_CONFIG", raising=False)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "relay.pid").write_text("999999999\n")
    status = gather(tmp_path / "spool", ["http://127.0.0.1:9"])
    assert status.source == "spool" and not status.running
    assert status.pid == 999999999 and status.pid_alive is False
    assert any("stale relay.pid" in note for note in status.notes)
    assert any("no spool at" in note for note in status.notes)
    assert "not running" in format_status(status)
    assert main(["status", "--spool", str(tmp_path / "spool"), "--url",
                 "http://127.0.0.1:9"]) == EXIT_NOT_RUNNING
