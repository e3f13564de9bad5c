"""Interop with Debian's HAProxy in front of the relay: `send-proxy` (v1) and `send-proxy-v2`.

HAProxy runs as a child process (`haproxy -f cfg -db`, not the system service) with two TCP
frontends, one per protocol version, both forwarding to one relay listener with
`proxy_protocol: true` that trusts only 127.0.0.1 (HAProxy's side of the connection) as a
proxy. Clients connect to HAProxy from 127.0.0.5 (trusted to relay) and 127.0.0.6 (not): the
relay must decide, log and stamp `Received` with those addresses, never with HAProxy's. The v2
backend is health-checked (`option smtpchk`), so HAProxy also sends LOCAL connections, which
the relay answers without counting them as clients. Skips where haproxy is not installed;
.ci/run installs it.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayrunner import ThreadRelay, spool_messages, wait_until
from test_interop import require
from util import free_port

TRUSTED_CLIENT = "127.0.0.5"
UNTRUSTED_CLIENT = "127.0.0.6"
HAPROXY_SIDE = "127.0.0.1"
MESSAGE = b"From: app@example.com\r\nTo: user@example.net\r\nSubject: via haproxy\r\n\r\nhi\r\n"

CONFIG = """\
global
    log stderr format raw local0 info
    maxconn 64
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_v1
    bind 127.0.0.1:{v1_port}
    default_backend relay_v1
frontend smtp_v2
    bind 127.0.0.1:{v2_port}
    default_backend relay_v2
backend relay_v1
    server relay 127.0.0.1:{relay_port} send-proxy
backend relay_v2
    option smtpchk HELO haproxy.test
    server relay 127.0.0.1:{relay_port} send-proxy-v2 check inter 300ms
"""


class HAProxy:
    def __init__(self, binary: str, directory: Path, relay_port: int) -> None:
        self.v1_port, self.v2_port = free_port(), free_port()
        self.config = directory / "haproxy.cfg"
        self.config.write_text(CONFIG.format(v1_port=self.v1_port, v2_port=self.v2_port,
                                             relay_port=relay_port), encoding="utf-8")
        self.log = directory / "haproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "-f", str(self.config), "-db"],
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float = 10) -> None:
        """Until HAProxy holds its ports. Not by connecting: that would reach the relay too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            if all(_taken(port) for port in (self.v1_port, self.v2_port)):
                return
            time.sleep(0.05)
        raise AssertionError(f"haproxy did not listen:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _taken(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return True
    return False


@pytest.fixture
def haproxy_relay(fake_upstream, start_relay, tmp_path: Path
                  ) -> Iterator[tuple[ThreadRelay, HAProxy]]:
    binary = require("haproxy")
    relay = start_relay(fake_upstream,
                        listeners=[{"name": "behind-haproxy", "address": "127.0.0.1",
                                    "port": free_port(), "proxy_protocol": True}],
                        # HAProxy's own address is trusted too: the carried one must decide.
                        access={"trusted_networks": [f"{TRUSTED_CLIENT}/32",
                                                     f"{HAPROXY_SIDE}/32"],
                                "trusted_proxies": [f"{HAPROXY_SIDE}/32"]})
    haproxy = HAProxy(binary, tmp_path, relay.address[1])
    try:
        haproxy.wait_listening()
        yield relay, haproxy
    finally:
        haproxy.stop()


def send_via(port: int, source: str) -> tuple[int, bytes]:
    """One message through HAProxy from ``source``: the reply to DATA, or to a refused MAIL."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("app.example.com")
        code, reply = client.mail("app@example.com")
        if code != 250:
            return code, reply
        assert client.rcpt("user@example.net")[0] == 250
        return client.data(MESSAGE)


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_carries_the_client_address_to_the_relay(haproxy_relay, fake_upstream, caplog,
                                                          version):
    caplog.set_level(logging.INFO, logger="relay")
    relay, haproxy = haproxy_relay
    port = haproxy.v1_port if version == 1 else haproxy.v2_port

    code, reply = send_via(port, TRUSTED_CLIENT)
    assert code == 250, reply
    [received] = fake_upstream.wait_for(1)
    received_field = received.parsed()["Received"]
    assert f"([{TRUSTED_CLIENT}])" in received_field, received_field
    [record] = spool_messages(relay)
    assert record.client == TRUSTED_CLIENT

    # The same proxy, another client: HAProxy's own address (127.0.0.1, in trusted_networks
    # here) must not make it a trusted client.
    code, reply = send_via(port, UNTRUSTED_CLIENT)
    assert code == 530, reply
    print(f"\nPROXY v{version} via haproxy: relay saw Received {received_field!r}; "
          f"{UNTRUSTED_CLIENT} got {code} {reply.decode()}")
    assert "closed a connection" not in caplog.text
    assert len(fake_upstream.messages) == 1


def test_haproxy_local_health_checks_are_answered_and_not_counted(haproxy_relay, caplog):
    caplog.set_level(logging.DEBUG, logger="relay.listener")
    relay, haproxy = haproxy_relay

    def local_checks() -> int:
        return sum("PROXY v2 local from 127.0.0.1" in r.getMessage() for r in caplog.records)

    wait_until(lambda: local_checks() >= 3, timeout=10, what="three HAProxy health checks")
    registry = relay.server.metrics.registry
    assert not registry.get_sample_value("relay_smtp_connections_total",
                                         {"listener": "behind-haproxy"})
    assert "DOWN" not in haproxy.output(), haproxy.output()
    print(f"\nHAProxy health checks (LOCAL): {local_checks()} answered; haproxy log: "
          f"{haproxy.output().strip() or '(empty)'}")
    assert "closed a connection" not in caplog.text
