"""infobip-relay as a subprocess, configured as the same relay as the Postfix instance.

The config (``relay.yaml``) and the spool live under one directory. The process is started
as ``infobip-relay serve -c relay.yaml`` (falling back to ``python -m relay`` or
``relay.cli.main`` when the console script is not on PATH), is ready once its listener port
accepts a connection, and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import on_exit, process_tree, stop_process, wait_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RelayConfig:
    port: int
    sink_port: int
    metrics_port: int
    ca_file: Path
    password: str
    username: str = "App"
    sender_domain: str = "bench.example.com"
    header: str = "X-IB-Client-Priority"
    header_value: str = "LOW"
    connections: int = 8
    max_connections: int = 2000
    max_connections_per_client: int = 1100  # the idle test opens 1,000 from 127.0.0.1
    extra: dict[str, Any] = field(default_factory=dict)


class RelayError(RuntimeError):
    pass


def relay_command(config_file: Path) -> list[str]:
    # the console script next to this interpreter (not a pyenv shim or another install)
    script = Path(sys.executable).with_name("infobip-relay")
    if script.is_file():
        return [str(script), "serve", "-c", str(config_file)]
    if (PROJECT_ROOT / "relay" / "__main__.py").exists():
        return [sys.executable, "-m", "relay", "serve", "-c", str(config_file)]
    return [sys.executable, "-c", "import sys; from relay.cli import main; sys.exit(main())",
            "serve", "-c", str(config_file)]


class RelayProcess:
    def __init__(self, root: Path, config: RelayConfig) -> None:
        self.root = root
        self.config = config
        self.config_file = root / "relay.yaml"
        self.log_file = root / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> dict[str, Any]:
        c = self.config
        settings: dict[str, Any] = {
            "listeners": [{"name": "bench", "address": "127.0.0.1", "port": c.port,
                           "tls": "none"}],
            "access": {"trusted_networks": ["127.0.0.0/8"], "max_message_size": "20MiB",
                       "max_recipients": 100, "max_connections": c.max_connections,
                       "max_connections_per_client": c.max_connections_per_client},
            "upstream": {"host": "127.0.0.1", "port": c.sink_port, "tls": "implicit",
                         "username": c.username, "password": c.password,
                         "auth_mechanism": "PLAIN", "connections": c.connections,
                         "ca_file": str(c.ca_file)},
            "queue": {"path": str(self.root / "spool")},
            "rules": [{"name": "bench priority",
                       "when": {"mail_from": f"*@{c.sender_domain}"},
                       "set": {c.header: c.header_value}}],
            "metrics": {"address": "127.0.0.1", "port": c.metrics_port},
            "logging": {"level": "info", "format": "text"},  # the relay's default
        }
        for key, value in c.extra.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key].update(value)
            else:
                settings[key] = value
        return settings

    def write(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # JSON is YAML; no PyYAML needed here
        self.config_file.write_text(json.dumps(self.settings(), indent=2) + "\n")
        self.config_file.chmod(0o600)

    def start(self, timeout: float = 30.0) -> None:
        self.write()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        with self.log_file.open("wb") as log:
            # No PR_SET_PDEATHSIG here: with it, the relay was sometimes sent SIGTERM in the
            # middle of a run. Cleanup is on_exit (normal exit, exceptions, signals).
            self.proc = subprocess.Popen(
                relay_command(self.config_file), stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, env=env)
        on_exit(self._cleanup)
        proc = self.proc
        if not wait_port(self.config.port, timeout, alive=lambda: proc.poll() is None):
            code = proc.poll()
            self.stop()
            raise RelayError(f"infobip-relay did not start listening on 127.0.0.1:"
                             f"{self.config.port} (exit code {code}):\n{self.log_tail()}")

    def _cleanup(self) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout=timeout)
        self.proc = None
        return code

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def pids(self) -> list[int]:
        return process_tree([self.proc.pid]) if self.proc is not None else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def spool_files(self) -> int:
        spool = self.root / "spool"
        return sum(len(files) for _, _, files in os.walk(spool)) if spool.is_dir() else 0

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
