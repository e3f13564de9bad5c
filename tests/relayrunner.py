"""Run a real relay for a test: in a thread with its own event loop, or as a child process."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from util import free_port

try:
    import uvloop
except ImportError:  # pragma: no cover - the fast extra is optional
    uvloop = None

from relay.app import Server
from relay.config import Config, load_config
from relay.spool import SpoolDB

REPO = Path(__file__).resolve().parent.parent


def relay_config(tmp_path: Path, fake: Any, /, **overrides: Any) -> dict[str, Any]:
    """A config dict for a relay in ``tmp_path`` forwarding to the ``fake`` upstream."""
    config: dict[str, Any] = {
        "listeners": [{"name": "local", "address": "127.0.0.1", "port": free_port()}],
        "access": {"trusted_networks": ["127.0.0.0/8"]},
        "upstream": {
            "host": "127.0.0.1" if fake is None else fake.host,
            "port": free_port() if fake is None else fake.port,
            "tls": "starttls" if fake is None or fake.tls != "implicit" else "implicit",
            "username": "App",
            "password": "test-api-key",
            "ca_file": str(fake.ca_pem_path) if fake is not None else None,
            "connections": 2,
            "timeout": "10s",
        },
        "queue": {"path": str(tmp_path / "spool"), "retry_initial": "0.3s", "retry_max": "1s"},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "logging": {"level": "info"},
        "grace_period": "5s",
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    if config["upstream"].get("ca_file") is None:
        config["upstream"].pop("ca_file", None)
    return config


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class ThreadRelay:
    """A relay `Server` running in a background thread; `stop()` is a graceful shutdown."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.server = Server(self.config, str(config_path))
        # The same event loop as production (`infobip-relay serve` prefers uvloop).
        self.loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._started.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        await self.server.startup()
        self._started.set()
        try:
            await self.server._stop.wait()
        finally:
            await self.server.shutdown()

    def start(self) -> ThreadRelay:
        self._thread.start()
        self._started.wait(15)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.server.bound[self.config.listeners[0].name]

    def call(self, coroutine: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def reload(self) -> bool:
        return bool(self.call(self.server.reload()))

    def stop(self, timeout: float = 30) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error


class ProcessRelay:
    """`infobip-relay serve -c FILE` as a child process, for kill and signal tests."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.config = load_config(config_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> ProcessRelay:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "-c", str(self.config_path)],
            stdout=log, stderr=log, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        host, port = self.address
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((host, port), timeout=0.5) as sock:
                    sock.recv(100)
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"relay did not start listening:\n{self.log()}")

    @property
    def address(self) -> tuple[str, int]:
        listener = self.config.listeners[0]
        return listener.address, listener.port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


ALL_STATES = ("queued", "deferred", "failed", "delivered")


def spool_messages(relay: ThreadRelay, states: tuple[str, ...] = ALL_STATES) -> list[Any]:
    """The relay's spool records in these states, read the way the CLI reads them."""
    db = SpoolDB(relay.config.queue.path, create=False)
    try:
        return db.list(states)
    finally:
        db.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
               ) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


TEST_MESSAGE = b"From: app@example.com\r\nSubject: test\r\n\r\nbody\r\n"


def send(relay: ThreadRelay, rcpts: tuple[str, ...] = ("user@example.net",),
         message: bytes = TEST_MESSAGE) -> str:
    """One message from app@example.com through the relay; returns its queue id."""
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message)
    assert code == 250, reply
    return reply.split()[-1].decode()


def send_raw(relay: ThreadRelay, raw: bytes) -> str:
    """DATA exactly as given (smtplib would fix line endings itself); returns the queue id."""
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(raw + b".\r\n")
        code, reply = client.getreply()
        assert code == 250, reply
    return reply.split()[-1].decode()
