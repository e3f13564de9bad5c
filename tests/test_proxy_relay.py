"""PROXY protocol through a real relay over real sockets: the carried address is the client.

The relay listens with ``proxy_protocol: true`` and trusts 127.0.0.1 as its proxy; these tests
play the proxy themselves (HAProxy itself is in tests/adversarial/test_haproxy.py). Untrusted
peers come from 127.0.0.2, which Linux routes on the loopback interface like 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from rawsmtp import Raw
from relayrunner import ThreadRelay, spool_messages
from util import free_port

import relay.proxyserver
from relay.proxyproto import V2_SIGNATURE

PROXY = "127.0.0.1"
OTHER_PEER = "127.0.0.2"
TRUSTED_CLIENT = "198.51.100.7"  # in trusted_networks: relays without AUTH
UNTRUSTED_CLIENT = "192.0.2.10"
TRUSTED_V6 = "2001:db8::7"
MESSAGE = b"From: app@example.com\r\nTo: user@example.net\r\nSubject: proxied\r\n\r\nhello\r\n"


def v1(source: str, sport: int = 40000, dest: str = "10.0.0.1", dport: int = 25) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    if family == "TCP6" and ":" not in dest:
        dest = "2001:db8::1"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(source: str | None, sport: int = 40000, dest: str = "10.0.0.1", dport: int = 25,
       tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header for ``source``, or a LOCAL one when ``source`` is None."""
    if source is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    if family == socket.AF_INET6 and ":" not in dest:
        dest = "2001:db8::1"
    block = (socket.inet_pton(family, source) + socket.inet_pton(family, dest)
             + struct.pack("!HH", sport, dport) + tlvs)
    fam = b"\x21" if family == socket.AF_INET6 else b"\x11"
    return V2_SIGNATURE + b"\x21" + fam + struct.pack("!H", len(block)) + block


def proxy_listener(**settings: Any) -> dict[str, Any]:
    return {"name": "lan", "address": "127.0.0.1", "port": free_port(), "proxy_protocol": True,
            **settings}


@pytest.fixture
def proxied_relay(fake_upstream, start_relay) -> Callable[..., ThreadRelay]:
    """``proxied_relay(listener=..., rules=..., **access)`` -> a relay whose listener expects
    PROXY headers from 127.0.0.1."""

    def start(listener: dict[str, Any] | None = None, rules: list[Any] | None = None,
              **access: Any) -> ThreadRelay:
        access = {"trusted_networks": [f"{TRUSTED_CLIENT}/32", "2001:db8::/32"],
                  "trusted_proxies": [f"{PROXY}/32"], **access}
        return start_relay(fake_upstream, listeners=[listener or proxy_listener()],
                           access=access, rules=rules or [])

    return start


def connect(relay: ThreadRelay, header: bytes, source: str = PROXY) -> Raw:
    raw = Raw(relay.address, source=source)
    raw.sock.sendall(header)
    return raw


def send_message(raw: Raw) -> tuple[int, list[bytes]]:
    """EHLO to DATA on a greeted session; the reply to MAIL when it is refused."""
    assert raw.cmd("EHLO client.example.com")[0] == 250
    code, lines = raw.cmd("MAIL FROM:<app@example.com>")
    if code != 250:
        return code, lines
    assert raw.cmd("RCPT TO:<user@example.net>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(MESSAGE + b".\r\n")
    return raw.reply()


def closed_without_greeting(raw: Raw) -> bool:
    """The relay closed the connection and sent not one octet.

    Closing a socket with unread input sends a reset (the header nobody read), else a FIN.
    """
    try:
        return raw.sock.recv(100) == b""
    except ConnectionResetError:
        return True


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.listener" and "closed a connection"
            in r.getMessage()]


def sample(relay: ThreadRelay, name: str, **labels: str) -> float:
    return relay.server.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------
# The carried address is the client: trust, Received, rules, logs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "client"), [
    (v1(TRUSTED_CLIENT), TRUSTED_CLIENT),
    (v2(TRUSTED_CLIENT), TRUSTED_CLIENT),
    (v1(TRUSTED_V6), TRUSTED_V6),
    (v2(TRUSTED_V6, tlvs=b"\x01\x00\x02h2\x04\x00\x00"), TRUSTED_V6),
])
def test_a_trusted_carried_address_relays_and_is_in_received(proxied_relay, fake_upstream,
                                                             header, client):
    relay = proxied_relay()
    with connect(relay, header) as raw:
        assert raw.reply()[0] == 220
        code, lines = send_message(raw)
        assert code == 250, lines
        queue_id = lines[-1].split()[-1].decode()
    [received] = fake_upstream.wait_for(1)
    received_field = received.parsed()["Received"]
    assert f"([{client}])" in received_field, received_field
    [record] = spool_messages(relay)
    assert (record.id, record.client) == (queue_id, client)


@pytest.mark.parametrize("header", [v1(UNTRUSTED_CLIENT), v2(UNTRUSTED_CLIENT)])
def test_an_untrusted_carried_address_is_refused_like_any_untrusted_client(
        proxied_relay, fake_upstream, header):
    # The proxy itself (127.0.0.1) is in the default trusted_networks of relay_config: the
    # carried address, not the proxy's, must decide.
    relay = proxied_relay(trusted_networks=["127.0.0.0/8", f"{TRUSTED_CLIENT}/32"])
    with connect(relay, header) as raw:
        assert raw.reply()[0] == 220
        code, lines = send_message(raw)
    assert code == 530, lines
    time.sleep(0.3)
    assert fake_upstream.messages == []


def test_the_rule_client_condition_sees_the_carried_address(proxied_relay, fake_upstream):
    rules = [{"name": "web tier", "when": {"client": f"{TRUSTED_CLIENT}/32"},
              "set": {"X-IB-Bulk-Id": "web-{client_ip}"}},
             {"name": "the proxy", "when": {"client": f"{PROXY}/32"},
              "set": {"X-IB-Callback-Data": "proxy"}}]
    relay = proxied_relay(rules=rules)
    with connect(relay, v2(TRUSTED_CLIENT)) as raw:
        assert raw.reply()[0] == 220
        assert send_message(raw)[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert received.parsed()["X-IB-Bulk-Id"] == f"web-{TRUSTED_CLIENT}"
    assert received.parsed()["X-IB-Callback-Data"] is None


# ---------------------------------------------------------------------------------------------
# Closed with one log line, nothing relayed: untrusted peers, missing or malformed headers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [v1(TRUSTED_CLIENT), v2(TRUSTED_CLIENT), b""])
def test_a_peer_that_is_not_a_trusted_proxy_is_closed_before_anything(
        proxied_relay, fake_upstream, caplog, header):
    caplog.set_level(logging.INFO, logger="relay")
    relay = proxied_relay()
    with connect(relay, header, source=OTHER_PEER) as raw:
        assert closed_without_greeting(raw)
    [record] = refusals(caplog)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert f"from {OTHER_PEER}: not in access.trusted_proxies" in record.getMessage()
    assert sample(relay, "relay_messages_rejected_total", listener="lan",
                  reason="proxy_untrusted") == 1
    assert sample(relay, "relay_smtp_connections_total", listener="lan") == 0


MALFORMED = [
    (b"EHLO client.example.com\r\n", "not a PROXY header"),
    (b"PROXY TCP4 192.0.2.300 10.0.0.1 1 25\r\n", "not an IP address"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 70000 25\r\n", "port out of range"),
    (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "longer than 107"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(64), "over the limit"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "shorter than its family needs"),
    (b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03", "not a PROXY header"),  # TLS, no header
    (v1(TRUSTED_CLIENT)[:20], "connection closed before a complete PROXY header"),
]


@pytest.mark.parametrize(("header", "reason"), MALFORMED)
def test_a_malformed_header_from_the_proxy_closes_the_connection(
        proxied_relay, fake_upstream, caplog, header, reason):
    caplog.set_level(logging.INFO, logger="relay")
    relay = proxied_relay()
    with connect(relay, header) as raw:
        if reason.startswith("connection closed"):
            raw.sock.shutdown(socket.SHUT_WR)
        assert closed_without_greeting(raw)
    [record] = refusals(caplog)
    assert f"from proxy {PROXY}: " in record.getMessage()
    assert reason in record.getMessage() and record.exc_info is None
    assert sample(relay, "relay_messages_rejected_total", listener="lan",
                  reason="proxy_header") == 1
    assert fake_upstream.messages == []


def test_a_proxy_connection_without_a_header_is_closed_after_the_timeout(
        proxied_relay, caplog, monkeypatch):
    monkeypatch.setattr(relay.proxyserver, "HEADER_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="relay")
    server = proxied_relay()
    with Raw(server.address, source=PROXY, timeout=5) as raw:
        started = time.monotonic()
        assert closed_without_greeting(raw)  # never a 220: the proxy's client waits for it
        assert 0.4 < time.monotonic() - started < 4
    [record] = refusals(caplog)
    assert "no complete PROXY header within 0.5 s" in record.getMessage()


# ---------------------------------------------------------------------------------------------
# LOCAL health checks; per-client limits on the carried address
# ---------------------------------------------------------------------------------------------
def test_a_local_health_check_is_answered_and_not_counted_as_a_client(proxied_relay):
    relay = proxied_relay(max_connections_per_client=1)
    with connect(relay, v2(None)) as first, connect(relay, v2(None)) as second:
        assert first.reply()[0] == 220 and second.reply()[0] == 220  # no per-client limit
        assert first.cmd("EHLO haproxy-check")[0] == 250
        assert relay.call(_per_client(relay)) == {}
        assert first.cmd("QUIT")[0] == 221
        assert second.cmd("QUIT")[0] == 221
    assert sample(relay, "relay_smtp_connections_total", listener="lan") == 0
    with connect(relay, v2(TRUSTED_CLIENT)) as client:
        assert client.reply()[0] == 220
        assert relay.call(_per_client(relay)) == {TRUSTED_CLIENT: 1}
    assert sample(relay, "relay_smtp_connections_total", listener="lan") == 1


async def _per_client(relay: ThreadRelay) -> dict[str, int]:
    assert relay.server.state is not None
    return dict(relay.server.state.per_client)


def test_the_per_client_limit_counts_carried_addresses(proxied_relay):
    relay = proxied_relay(max_connections_per_client=2)
    opened = [connect(relay, v1(UNTRUSTED_CLIENT, sport=40000 + i)) for i in range(2)]
    try:
        for raw in opened:
            assert raw.reply()[0] == 220
        with connect(relay, v2(UNTRUSTED_CLIENT, sport=40009)) as third:
            code, lines = third.reply()
            assert code == 421 and b"Too many connections from your address" in lines[0]
        # Another client behind the same proxy is not held back by the first one's sessions.
        with connect(relay, v2(TRUSTED_CLIENT)) as other:
            assert other.reply()[0] == 220
    finally:
        for raw in opened:
            raw.close()


def test_logs_name_the_carried_address(proxied_relay, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    relay = proxied_relay()
    with connect(relay, v1(UNTRUSTED_CLIENT)) as raw:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO x")[0] == 250
        assert raw.cmd("X" * 3000)[0] == 500  # a command line over the limit: logged
    assert any(f"client {UNTRUSTED_CLIENT} sent a command line" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Implicit TLS: the header, then the handshake
# ---------------------------------------------------------------------------------------------
def test_v2_header_then_tls_handshake_on_an_implicit_tls_listener(
        proxied_relay, fake_upstream, listener_cert_files, ca_pem_path):
    cert, key = listener_cert_files
    relay = proxied_relay(proxy_listener(tls="implicit", certificate=str(cert),
                                         private_key=str(key)))
    context = ssl.create_default_context(cafile=str(ca_pem_path))
    raw = Raw(relay.address, source=PROXY)
    # Corked, the header and the ClientHello leave in one segment (Linux sends a corked
    # partial frame after 200 ms): the relay must take the header and leave the hello.
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    raw.sock.sendall(v2(TRUSTED_CLIENT, dport=465))
    raw.sock = context.wrap_socket(raw.sock, server_hostname="localhost")
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    raw.file = raw.sock.makefile("rb")
    with raw:
        assert raw.reply()[0] == 220
        assert send_message(raw)[0] == 250
    [received] = fake_upstream.wait_for(1)
    received_field = received.parsed()["Received"]
    assert f"([{TRUSTED_CLIENT}])" in received_field and "with ESMTPS" in received_field


def test_a_failed_handshake_after_the_header_is_one_log_line(proxied_relay, caplog,
                                                             listener_cert_files):
    caplog.set_level(logging.INFO, logger="relay")
    cert, key = listener_cert_files
    relay = proxied_relay(proxy_listener(tls="implicit", certificate=str(cert),
                                         private_key=str(key)))
    with connect(relay, v2(TRUSTED_CLIENT) + b"EHLO not-tls\r\n") as raw:
        assert raw.at_eof()  # a TLS alert perhaps, then the end; never a 220
    time.sleep(0.2)
    records = [r for r in caplog.records if "failed before SMTP" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert f"from {TRUSTED_CLIENT} (via proxy {PROXY})" in records[0].getMessage()


# ---------------------------------------------------------------------------------------------
# Bounds and shutdown
# ---------------------------------------------------------------------------------------------
def test_connections_waiting_for_their_header_count_against_max_connections(
        proxied_relay, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    relay = proxied_relay(max_connections=2)
    waiting = [Raw(relay.address, source=PROXY) for _ in range(2)]  # no header yet
    try:
        time.sleep(0.2)
        with Raw(relay.address, source=PROXY) as third:
            assert closed_without_greeting(third)
        [record] = refusals(caplog)
        assert "too many connections" in record.getMessage()
    finally:
        for raw in waiting:
            raw.close()


def test_shutdown_closes_connections_still_waiting_for_a_header(proxied_relay):
    relay = proxied_relay()
    with Raw(relay.address, source=PROXY, timeout=10) as raw:
        time.sleep(0.2)
        started = time.monotonic()
        stopping = threading.Thread(target=relay.stop)
        stopping.start()
        assert closed_without_greeting(raw)
        # Closed as the shutdown begins: not left to the 5 s header timeout, nor to the 2 s
        # that the server waits for its listeners to close.
        assert time.monotonic() - started < 1.5
        stopping.join(30)
