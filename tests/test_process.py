"""Reliability claims proven on a real `infobip-relay serve` process: kill it, restart it."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from relayrunner import REPO, relay_config
from util import free_port

from relay.cli import main as cli_main

pytestmark = pytest.mark.slow


def send_numbered(address: tuple[str, int], count: int) -> list[str]:
    queue_ids = []
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("client.example.com")
        for number in range(count):
            data = f"Subject: message {number}\r\n\r\nbody {number}\r\n".encode()
            client.mail("app@example.com")
            client.rcpt("user@example.net")
            code, reply = client.data(data)
            assert code == 250, reply
            queue_ids.append(reply.split()[-1].decode())
    return queue_ids


def subjects(upstream) -> list[str]:
    return sorted(str(m.parsed()["Subject"]) for m in upstream.messages)


# ~660 KB, over the spool's FILE_BODY_THRESHOLD: streamed to a body file of its own as it
# arrives (a few lines start with a dot, stuffed on the wire both ways).
LARGE_BODY = b"".join(b"%s%06d large body line ...................................\r\n"
                      % (b"." if n % 1000 == 0 else b"", n) for n in range(11000))


def send_large(address: tuple[str, int], subject: str) -> None:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.sendmail("app@example.com", ["user@example.net"],
                        f"Subject: {subject}\r\n\r\n".encode() + LARGE_BODY)


def body_of(message: Any) -> bytes:
    return bytes(message.data.split(b"\r\n\r\n", 1)[1])


def test_sigkill_after_250_loses_nothing(fake_upstream, start_relay_process, tmp_path):
    config = relay_config(tmp_path, fake_upstream)
    fake_upstream.stop()  # nothing can leave: the spool alone holds the mail
    relay = start_relay_process(config)
    send_numbered(relay.address, 20)
    send_large(relay.address, "large one")
    # Spooled as a header block in its row and the body in a file, with its envelope beside.
    assert len([path for path in (tmp_path / "spool" / "bodies").iterdir()
                if not path.name.startswith(".")]) == 2
    relay.kill()

    fake_upstream.start()
    relay = start_relay_process(config)
    fake_upstream.wait_for(21, timeout=20)
    time.sleep(1.0)
    assert subjects(fake_upstream) == sorted([*(f"message {n}" for n in range(20)),
                                              "large one"])
    large = next(m for m in fake_upstream.messages if m.parsed()["Subject"] == "large one")
    assert body_of(large) == LARGE_BODY
    assert relay.terminate() == 0


def test_sigkill_while_delivering_duplicates_at_most_in_flight(fake_upstream,
                                                               start_relay_process, tmp_path):
    """Killed mid-stream, every message still arrives; only sends in flight may repeat."""
    config = relay_config(tmp_path, fake_upstream, upstream={"connections": 2})
    relay = start_relay_process(config)
    send_numbered(relay.address, 40)
    relay.kill()
    relay = start_relay_process(config)
    fake_upstream.wait_for(40, timeout=20)
    time.sleep(1.5)
    arrived = [str(m.parsed()["Subject"]) for m in fake_upstream.messages]
    assert set(arrived) == {f"message {n}" for n in range(40)}
    assert len(arrived) - 40 <= 2  # at most one per upstream connection in flight
    relay.terminate()


def test_sigterm_is_graceful(fake_upstream, start_relay_process, tmp_path):
    relay = start_relay_process(relay_config(tmp_path, fake_upstream))
    send_numbered(relay.address, 3)
    fake_upstream.wait_for(3)
    assert relay.terminate() == 0
    log = relay.log()
    assert "Traceback" not in log
    assert "stopped" in log


def test_sighup_reload_keeps_running(fake_upstream, start_relay_process, tmp_path):
    relay = start_relay_process(relay_config(tmp_path, fake_upstream))
    relay.config_path.write_text(relay.config_path.read_text() + "\nbogus_key: 1\n")
    relay.signal(signal.SIGHUP)
    time.sleep(0.5)
    send_numbered(relay.address, 1)
    fake_upstream.wait_for(1)
    assert "reload refused" in relay.log() and "bogus_key" in relay.log()
    assert relay.terminate() == 0


def test_zero_config_from_environment(fake_upstream, tmp_path: Path):
    """`INFOBIP_API_KEY=... infobip-relay serve` with no file at all."""
    port = free_port()
    env = {
        **os.environ,
        "INFOBIP_API_KEY": "test-api-key",
        "INFOBIP_SMTP_HOST": fake_upstream.host,
        "INFOBIP_SMTP_PORT": str(fake_upstream.port),
        "INFOBIP_SMTP_TLS": "starttls",
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "RELAY_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "RELAY_QUEUE_PATH": str(tmp_path / "spool"),
        # The system store is the only trust source without a config file: add the test CA.
        "SSL_CERT_FILE": str(fake_upstream.ca_pem_path),
    }
    env.pop("INFOBIP_RELAY_CONFIG", None)
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve"], env=env,
                                cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                send_numbered(("127.0.0.1", port), 1)
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        [received] = fake_upstream.wait_for(1)
        assert received.tls and received.auth_mechanism == "PLAIN"
        assert (tmp_path / "spool" / "queue.sqlite3").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert "test-api-key" not in log_path.read_text()


def test_missing_api_key_is_one_clear_line(tmp_path: Path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INFOBIP_", "RELAY_"))}
    result = subprocess.run([sys.executable, "-m", "relay.cli", "serve"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "INFOBIP_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_workers_share_the_port_and_survive_a_worker_crash(fake_upstream, start_relay_process,
                                                           tmp_path, capsys):
    # Metrics off: worker K would take metrics.port + K, which a test cannot reserve.
    config = relay_config(tmp_path, fake_upstream, workers=2, metrics=False)
    relay = start_relay_process(config)
    assert relay.proc is not None
    deadline = time.monotonic() + 10
    while len(worker_pids(relay.proc.pid)) < 2:
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    first, second = worker_pids(relay.proc.pid)

    for _ in range(10):  # separate connections, spread by the kernel over both workers
        send_numbered(relay.address, 2)
    fake_upstream.wait_for(20)

    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while first in worker_pids(relay.proc.pid) or len(worker_pids(relay.proc.pid)) < 2:
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    assert second in worker_pids(relay.proc.pid)
    time.sleep(0.5)
    send_numbered(relay.address, 2)
    fake_upstream.wait_for(22)

    spool = tmp_path / "spool"
    assert (spool / "worker-1" / "queue.sqlite3").exists()
    deadline = time.monotonic() + 10
    while True:  # the record follows the upstream's 250 by a moment
        assert cli_main(["queue", "list", "--state", "delivered", "--spool", str(spool)]) == 0
        listed = capsys.readouterr().out
        if listed.count(" delivered ") == 22 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert listed.count(" delivered ") == 22
    assert relay.terminate() == 0


def test_fewer_workers_take_over_orphaned_spools(fake_upstream, start_relay_process, tmp_path):
    fake_upstream.stop()
    relay = start_relay_process(relay_config(tmp_path, fake_upstream, workers=2,
                                                           metrics=False))
    for number in range(10):
        send_numbered(relay.address, 1)
        send_large(relay.address, f"large {number}")
    assert relay.terminate() == 0

    fake_upstream.start()
    relay = start_relay_process(relay_config(tmp_path, fake_upstream, workers=1,
                                                           metrics=False))
    fake_upstream.wait_for(20, timeout=20)
    time.sleep(0.5)
    assert len(fake_upstream.messages) == 20
    assert all(body_of(m) == LARGE_BODY for m in fake_upstream.messages
               if str(m.parsed()["Subject"]).startswith("large"))
    assert relay.terminate() == 0
