"""The SMTP listener over real sockets: TLS, local AUTH, sender policy, limits, replies, reload."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rawsmtp import Raw
from relayrunner import ThreadRelay, spool_messages, wait_until
from util import free_port

from relay.passwords import hash_password

MESSAGE = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: listener\r\n"
           b"Message-ID: <l1@example.com>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n"
           b"hello\r\n")
PASSWORD = "secret"
PASSWORD_HASH = hash_password(PASSWORD)  # scrypt: hash once for the whole module
UNTRUSTED = {"trusted_networks": ["10.0.0.0/8"]}  # 127.0.0.1 is not trusted
ENHANCED = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
# What a leaked exception looks like in aiosmtpd's fallback reply: "500 Error: (KeyError) ...".
LEAK = re.compile(rb"Traceback|\(\w*(Error|Exception|Exit|Interrupt)\)|File \"|\bline \d+\b")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def listener(**settings: Any) -> dict[str, Any]:
    return {"name": "local", "address": "127.0.0.1", "port": free_port(), **settings}


def tls_listener(cert_files: tuple[Path, Path], tls: str = "starttls", **settings: Any
                 ) -> dict[str, Any]:
    cert, key = cert_files
    return listener(tls=tls, certificate=str(cert), private_key=str(key), **settings)


def user(name: str = "alice", **settings: Any) -> dict[str, Any]:
    return {"name": name, "password_hash": PASSWORD_HASH, **settings}


def plain_blob(name: str, password: str) -> str:
    return base64.b64encode(f"\0{name}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()




def open_connections(relay: ThreadRelay) -> int:
    assert relay.server.state is not None
    return len(relay.server.state.connections)


def no_leaked_connections(relay: ThreadRelay) -> bool:
    state = relay.server.state
    assert state is not None
    return not state.connections and not state.per_client


@pytest.fixture
def client_tls(ca_pem_path: Path) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    return ssl.create_default_context(cafile=str(ca_pem_path))


# ---------------------------------------------------------------------------------------------
# 1. TLS
# ---------------------------------------------------------------------------------------------
def test_starttls_verified_handshake_and_delivery(fake_upstream, start_relay, listener_cert_files,
                                                  client_tls):
    relay = start_relay(fake_upstream, listeners=[tls_listener(listener_cert_files)])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_tls)
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.example.com")
        assert not client.has_extn("starttls")  # not offered twice
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    [received] = fake_upstream.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["user@example.net"]
    assert b"with ESMTPS id" in received.data  # the trace header records the TLS session


def test_starttls_rejects_an_untrusted_ca(start_relay, listener_cert_files):
    relay = start_relay(None, listeners=[tls_listener(listener_cert_files)])
    foreign = ssl.create_default_context()  # system store: does not know the test CA
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        with pytest.raises(ssl.SSLCertVerificationError):
            raw.starttls(foreign)


def test_failed_starttls_handshake_leaks_no_connection(start_relay, listener_cert_files):
    relay = start_relay(None, listeners=[tls_listener(listener_cert_files)])
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        assert raw.cmd("STARTTLS")[0] == 220
        raw.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert raw.at_eof()
    wait_until(lambda: no_leaked_connections(relay), what="connection bookkeeping to drain")


def test_implicit_tls_from_the_first_byte(fake_upstream, start_relay, listener_cert_files,
                                          client_tls):
    relay = start_relay(fake_upstream, listeners=[tls_listener(listener_cert_files, "implicit")])
    # A plaintext client gets no greeting: the server waits for a TLS ClientHello.
    with Raw(relay.address, timeout=1.0) as raw, pytest.raises(TimeoutError):
        raw.file.readline()
    with Raw(relay.address) as raw:
        raw.send(b"EHLO plaintext.example.com")
        try:
            data = raw.sock.recv(100)
        except OSError:
            data = b""
        assert not data.startswith(b"220")
    with smtplib.SMTP_SSL(*relay.address, timeout=10, context=client_tls) as client:
        assert client.ehlo("client.example.com")[0] == 250
        assert not client.has_extn("starttls")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        assert client.data(MESSAGE)[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert b"with ESMTPS id" in received.data
    wait_until(lambda: no_leaked_connections(relay), what="connection bookkeeping to drain")


# ---------------------------------------------------------------------------------------------
# 2. Local AUTH
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("auth", ["optional", "required"])
@pytest.mark.parametrize(("mechanism", "initial"),
                         [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)])
def test_auth_success_over_tls(start_relay, listener_cert_files, client_tls, auth,
                               mechanism, initial):
    relay = start_relay(None, access=UNTRUSTED, users=[user()],
                        listeners=[tls_listener(listener_cert_files, auth=auth)])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=client_tls)
        client.ehlo("client.example.com")
        assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        client.user, client.password = "alice", PASSWORD
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, reply = client.auth(mechanism, method, initial_response_ok=initial)
        assert code == 235 and reply.startswith(b"2.7.0"), reply
        assert client.docmd("AUTH", "PLAIN " + plain_blob("alice", PASSWORD))[0] == 503
        assert client.mail("app@example.com")[0] == 250


@pytest.mark.parametrize("auth", ["optional", "required"])
def test_wrong_password_and_unknown_user_get_535(start_relay, listener_cert_files,
                                                 client_tls, auth):
    relay = start_relay(None, users=[user()],
                        listeners=[tls_listener(listener_cert_files, auth=auth)])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=client_tls)
        client.ehlo("client.example.com")
        code, reply = client.docmd("AUTH", "PLAIN " + plain_blob("alice", "wrong"))
        assert (code, reply[:5]) == (535, b"5.7.8")
        code, reply = client.docmd("AUTH", "LOGIN " + b64("mallory"))
        assert code == 334
        code, reply = client.docmd(b64(PASSWORD))
        assert (code, reply[:5]) == (535, b"5.7.8")
        if auth == "required":  # even though 127.0.0.1 is trusted
            assert client.mail("app@example.com")[0] == 530


def test_malformed_auth_exchanges(start_relay, listener_cert_files, client_tls):
    relay = start_relay(None, users=[user()],
                        listeners=[tls_listener(listener_cert_files, auth="optional")])
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        raw.starttls(client_tls)
        raw.cmd("EHLO client.example.com")
        assert raw.cmd("AUTH PLAIN !!notbase64!!")[0] == 501
        assert raw.cmd("AUTH PLAIN " + b64("only-two\0parts"))[0] == 501
        assert raw.cmd("AUTH CRAM-MD5")[0] == 504
        assert raw.cmd("AUTH LOGIN")[0] == 334
        assert raw.cmd("*")[0] == 501  # client aborts the exchange
        assert raw.cmd("AUTH PLAIN")[0] == 334
        assert raw.cmd("%%%")[0] == 501
        code, lines = raw.cmd("AUTH PLAIN " + plain_blob("alice", PASSWORD))
        assert code == 235, lines


def test_untrusted_client_without_tls_cannot_auth_or_relay(start_relay, listener_cert_files):
    relay = start_relay(None, access=UNTRUSTED, users=[user()],
                        listeners=[tls_listener(listener_cert_files, auth="optional")])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, reply = client.docmd("AUTH", "PLAIN " + plain_blob("alice", PASSWORD))
        assert (code, reply[:6]) == (538, b"5.7.11")
        code, reply = client.mail("app@example.com")
        assert (code, reply[:5]) == (530, b"5.7.0")


def test_untrusted_client_may_relay_after_auth(fake_upstream, start_relay, listener_cert_files,
                                               client_tls):
    relay = start_relay(fake_upstream, access=UNTRUSTED, users=[user()],
                        listeners=[tls_listener(listener_cert_files, auth="optional")])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=client_tls)
        client.ehlo("client.example.com")
        assert client.mail("app@example.com")[0] == 530  # not yet authenticated
        client.login("alice", PASSWORD)
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    queue_id = reply.split()[-1].decode()
    [received] = fake_upstream.wait_for(1)
    assert b"with ESMTPSA id" in received.data
    [record] = spool_messages(relay)
    assert (record.id, record.auth_user, record.client) == (queue_id, "alice", "127.0.0.1")


def test_trusted_client_is_offered_auth_without_tls(start_relay):
    relay = start_relay(None, users=[user()], listeners=[listener(auth="optional")])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        assert client.mail("app@example.com")[0] == 250  # optional: trusted needs no AUTH
        client.rset()
        client.user, client.password = "alice", PASSWORD
        assert client.auth("PLAIN", client.auth_plain)[0] == 235


def test_auth_required_applies_to_trusted_clients(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, users=[user()], listeners=[listener(auth="required")])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.has_extn("auth")
        code, reply = client.mail("app@example.com")
        assert (code, reply[:5]) == (530, b"5.7.0")
        client.login("alice", PASSWORD)
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        assert client.data(MESSAGE)[0] == 250
    fake_upstream.wait_for(1)
    assert [m.auth_user for m in spool_messages(relay)] == ["alice"]


def test_auth_none_is_not_offered(start_relay, listener_cert_files, client_tls):
    relay = start_relay(None, users=[user()],
                        listeners=[tls_listener(listener_cert_files)])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert not client.has_extn("auth")
        client.starttls(context=client_tls)
        client.ehlo("client.example.com")
        assert not client.has_extn("auth")
        code, reply = client.docmd("AUTH", "PLAIN " + plain_blob("alice", PASSWORD))
        assert (code, reply[:5]) == (502, b"5.5.1")
        assert client.mail("app@example.com")[0] == 250  # trusted network


# ---------------------------------------------------------------------------------------------
# 3. AUTH failures are slowed down and counted
# ---------------------------------------------------------------------------------------------
def test_repeated_auth_failures_slow_down_and_are_counted(start_relay):
    relay = start_relay(None, users=[user()], listeners=[listener(auth="optional")])
    durations = []
    with smtplib.SMTP(*relay.address, timeout=20) as client:
        client.ehlo("client.example.com")
        for _ in range(3):
            started = time.monotonic()
            assert client.docmd("AUTH", "PLAIN " + plain_blob("alice", "guess"))[0] == 535
            durations.append(time.monotonic() - started)
    assert durations[2] > durations[0] + 0.4, durations
    metrics = relay.server.metrics.render().decode()
    assert 'relay_auth_failures_total{listener="local"} 3.0' in metrics


# ---------------------------------------------------------------------------------------------
# 4. allowed_senders
# ---------------------------------------------------------------------------------------------
def test_listener_allowed_senders(start_relay):
    relay = start_relay(None, listeners=[
        listener(allowed_senders=["*@Example.COM", "alerts@ops.example.net"])])
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        for sender in ("app@example.com", "APP@EXAMPLE.com", "Alerts@OPS.example.NET"):
            assert client.mail(sender)[0] == 250, sender
            client.rset()
        for sender in ("app@example.com.evil.net", "other@ops.example.net", "x@example.org"):
            code, reply = client.mail(sender)
            assert (code, reply[:5]) == (553, b"5.7.1"), sender
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        assert client.data(MESSAGE)[0] == 250


def test_user_allowed_senders_override_the_listener(start_relay):
    relay = start_relay(None, users=[
        user("alice", allowed_senders=["Billing@Example.com"]), user("bob")],
        listeners=[listener(auth="optional", allowed_senders=["*@example.com"])])

    def mail_codes(name: str | None) -> dict[str, int]:
        with smtplib.SMTP(*relay.address, timeout=10) as client:
            client.ehlo("client.example.com")
            if name:
                client.login(name, PASSWORD)
            codes = {}
            for sender in ("BILLING@example.COM", "app@example.com"):
                codes[sender] = client.mail(sender)[0]
                client.rset()
            return codes

    assert mail_codes("alice") == {"BILLING@example.COM": 250, "app@example.com": 553}
    assert mail_codes("bob") == {"BILLING@example.COM": 250, "app@example.com": 250}
    assert mail_codes(None) == {"BILLING@example.COM": 250, "app@example.com": 250}


# ---------------------------------------------------------------------------------------------
# 5. Limits and timeouts
# ---------------------------------------------------------------------------------------------
def test_max_connections(start_relay):
    relay = start_relay(None, access={"max_connections": 2})
    first, second = Raw(relay.address), Raw(relay.address)
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        with Raw(relay.address) as third:
            code, lines = third.reply()
            assert code == 421 and lines[0].startswith(b"421 4.7.0 Too many connections"), lines
            assert third.at_eof()
        assert first.cmd("QUIT")[0] == 221
        first.close()
        wait_until(lambda: open_connections(relay) < 2, what="a slot to free up")
        with Raw(relay.address) as fourth:
            assert fourth.reply()[0] == 220
            assert fourth.cmd("EHLO client.example.com")[0] == 250
    finally:
        first.close()
        second.close()
    wait_until(lambda: no_leaked_connections(relay), what="connection bookkeeping to drain")


def test_max_connections_per_client(start_relay):
    relay = start_relay(None, access={"max_connections_per_client": 1})
    with Raw(relay.address) as first:
        assert first.reply()[0] == 220
        with Raw(relay.address) as second:
            code, lines = second.reply()
            assert code == 421
            assert lines[0].startswith(b"421 4.7.0 Too many connections from your address")
            assert second.at_eof()
        # The limit is per address: another loopback address still gets in.
        with Raw(relay.address, source="127.0.0.2") as other:
            assert other.reply()[0] == 220
        first.cmd("QUIT")
    wait_until(lambda: no_leaked_connections(relay), what="the client's slot to free up")
    with Raw(relay.address) as again:
        assert again.reply()[0] == 220


def test_idle_client_times_out(start_relay):
    relay = start_relay(None, access={"command_timeout": "1s"})
    with Raw(relay.address) as raw:
        raw.reply()
        assert raw.cmd("EHLO client.example.com")[0] == 250
        assert open_connections(relay) == 1
        started = time.monotonic()
        assert raw.reply()[1] == [b"421 4.4.2 Timeout, closing connection"]
        assert 0.8 < time.monotonic() - started < 3
        assert raw.at_eof()
    wait_until(lambda: no_leaked_connections(relay), what="connection count back to 0")


def test_stalled_data_is_dropped_and_nothing_spooled(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"data_timeout": "1s"})
    with Raw(relay.address) as raw:
        raw.up_to_data()
        raw.send(b"Subject: half a message\r\n\r\nfirst line\r\n")
        assert raw.reply()[1][0].startswith(b"421 4.4.2")
        assert raw.at_eof()
    wait_until(lambda: no_leaked_connections(relay), what="connection count back to 0")
    assert spool_messages(relay) == []
    assert fake_upstream.messages == []


def _loop_errors(relay: ThreadRelay) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    relay.loop.call_soon_threadsafe(relay.loop.set_exception_handler,
                                    lambda _loop, context: errors.append(context))
    return errors


@pytest.mark.parametrize("how", ["data_timeout", "client_reset"])
def test_connection_lost_during_data_leaves_no_timer(start_relay, how):
    relay = start_relay(None, access={"data_timeout": "1s", "command_timeout": "1s"})
    errors = _loop_errors(relay)
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        raw.cmd("MAIL FROM:<app@example.com>")
        raw.cmd("RCPT TO:<user@example.net>")
        assert raw.cmd("DATA")[0] == 354
        raw.send(b"Subject: half a message\r\n")
        if how == "data_timeout":
            assert raw.reply()[1][0].startswith(b"421 4.4.2")
        else:  # the client's host resets the connection
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: no_leaked_connections(relay), what="connection count back to 0")
    time.sleep(1.5)  # past command_timeout: a re-armed timer would have fired by now
    assert [(e.get("message"), repr(e.get("exception"))) for e in errors] == []


# ---------------------------------------------------------------------------------------------
# 6. Replies
# ---------------------------------------------------------------------------------------------
def test_enhanced_status_codes_after_ehlo_only(start_relay):
    relay = start_relay(None)
    with Raw(relay.address) as raw:
        code, greeting = raw.reply()
        assert code == 220 and not ENHANCED.match(greeting[0])
        code, ehlo = raw.cmd("EHLO client.example.com")
        assert code == 250 and b"250-ENHANCEDSTATUSCODES" in ehlo
        assert not [line for line in ehlo if ENHANCED.match(line)], ehlo
        assert raw.cmd("NOOP")[1] == [b"250 2.0.0 OK"]
        assert raw.cmd("RSET")[1] == [b"250 2.0.0 OK"]
        assert raw.cmd("VRFY <someone@example.com>")[1][0].startswith(b"252 2.5.0 ")
        assert raw.cmd("RCPT TO:<user@example.net>")[1][0].startswith(b"503 5.5.1 ")
        assert raw.cmd("DATA")[1][0].startswith(b"503 5.5.1 ")
        assert raw.cmd("MAIL FROM:<app@example.com>")[1][0].startswith(b"250 2.1.0 ")
        assert raw.cmd("MAIL FROM:<app@example.com>")[1][0].startswith(b"503 5.5.1 ")
        assert raw.cmd("RCPT TO:<user@example.net>")[1][0].startswith(b"250 2.1.5 ")
        # HELO switches back to plain SMTP: no codes added.
        code, helo = raw.cmd("HELO client.example.com")
        assert code == 250 and not ENHANCED.match(helo[0])
        assert raw.cmd("NOOP")[1] == [b"250 OK"]
        assert raw.cmd("RSET")[1] == [b"250 OK"]
        assert raw.cmd("QUIT")[1][0].startswith(b"221 ")
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("HELO client.example.com")
        assert raw.cmd("NOOP")[1] == [b"250 OK"]
        code, lines = raw.cmd("FROBNICATE")
        assert code == 500 and not ENHANCED.match(lines[0])


def test_unknown_command_gets_500(start_relay):
    relay = start_relay(None)
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        code, lines = raw.cmd("FROBNICATE now")
        assert code == 500 and lines[0].startswith(b"500 5.5.2 "), lines
        assert b"FROBNICATE" in lines[0] and not LEAK.search(lines[0])
        assert raw.cmd("NOOP")[0] == 250  # the session goes on


PROTOCOL_ERRORS = [
    b"MAIL FROM:<unterminated@example.com",
    b"MAIL FROM:<a@example.com> SIZE=lots",
    b"MAIL FROM:<a@example.com> BODY=9BIT",
    b"MAIL FROM:<a@example.com> SMTPUTF8=yes",
    b"MAIL FROM:<a@example.com> FOO=BAR",
    b"MAIL FROM:<a@example.com> =",
    b"MAIL FROM:<a@example.com> SIZE=999999999999999999999999",
    b"MAIL TO:<a@example.com>",
    b"MAIL",
    b"RCPT TO:<b@example.com>",
    b"DATA",
    b"DATA now",
    b"RSET now",
    b"QUIT now",
    b"EHLO",
    b"HELO",
    b"STARTTLS",
    b"AUTH",
    b"AUTH PLAIN a b c",
    b"AUTH PLAIN ====",
    b"VRFY",
    b"VRFY <<<>>>",
    b"EXPN list",
    b"HELP",
    b"HELP MAIL",
    b"HELP NOSUCH",
    b"\xff\xfe\xfd",
    b"MAIL FROM:<\x00@example.com>",
    b" ",
    b"X" * 2000,
    b"MAIL FROM:<" + b"a" * 600 + b"@example.com>",
]


def test_protocol_errors_never_leak_exceptions(start_relay):
    relay = start_relay(None, users=[user()], listeners=[listener(auth="optional")])
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        replies = []
        for line in PROTOCOL_ERRORS:
            _, lines = raw.cmd(line)
            replies.append((line[:40], lines))
            assert re.match(rb"^\d{3}( |$)", lines[-1]), (line, lines)
            raw.cmd("RSET")
        assert raw.cmd("NOOP")[0] == 250
    leaked = [(line, lines) for line, lines in replies if any(LEAK.search(x) for x in lines)]
    assert leaked == []
    internal = [(line, lines) for line, lines in replies if lines[-1].startswith(b"451")]
    assert internal == []


def test_non_utf8_address_gets_a_definite_answer(start_relay):
    relay = start_relay(None)
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        code, lines = raw.cmd(b"MAIL FROM:<caf\xe9@example.com>")
        assert code in (250, 501, 553), lines
        raw.cmd("RSET")
        assert raw.cmd("MAIL FROM:<app@example.com>")[0] == 250
        code, lines = raw.cmd(b"RCPT TO:<caf\xe9@example.net>")
        assert code in (250, 501, 553), lines


def test_non_utf8_sender_through_a_whole_transaction(start_relay):
    """If an undecodable address is accepted at MAIL, the message must be spooled too."""
    relay = start_relay(None)
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        code, lines = raw.cmd(b"MAIL FROM:<caf\xe9@example.com>")
        if code != 250:
            return  # refused up front: a definite answer, nothing more to check
        assert raw.cmd("RCPT TO:<user@example.net>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        code, lines = raw.cmd(MESSAGE + b".\r\n")
        assert code == 250, lines
    assert len(spool_messages(relay)) == 1


# ---------------------------------------------------------------------------------------------
# DATA: the listener's own bulk reader (terminator, dot-unstuffing, pipelining, size)
# ---------------------------------------------------------------------------------------------
def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def test_data_terminator_unstuffing_and_pipelining(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    # Only CRLF.CRLF ends DATA: bare-LF dot lines must not let a second envelope be smuggled in.
    smuggled = (b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.org>\r\n"
                b"line\r\n.\nRCPT TO:<victim@example.org>\r\n..stuffed\r\n.\r\n")
    big = b"".join(b".%06d dot-leading line to unstuff\r\n" % i for i in range(20000))  # ~700KB
    second = b"Subject: two\r\n\r\n" + big
    with Raw(relay.address) as raw:
        raw.reply()
        raw.cmd("EHLO client.example.com")
        stuffed = second.replace(b"\r\n.", b"\r\n..")
        raw.sock.sendall(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n")
        assert [raw.reply()[0] for _ in range(3)] == [250, 250, 354]
        # The end of message and the whole next transaction in one write.
        raw.sock.sendall(smuggled + b"MAIL FROM:<app@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                         b"DATA\r\n" + stuffed + b".\r\nNOOP\r\n")
        assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 354, 250]
        assert raw.reply()[1] == [b"250 2.0.0 OK"]  # NOOP after the dot was kept, not swallowed
    first, other = sorted(fake_upstream.wait_for(2), key=lambda m: m.rcpt_tos)
    assert first.rcpt_tos == ["b@example.net"]
    assert body_of(first.data) == big
    assert other.rcpt_tos == ["user@example.net"]
    # ".\nRCPT..." starts a CRLF line, so its dot is unstuffed like any other (RFC 5321 4.5.2).
    assert body_of(other.data) == (b"first\r\n.\r\nMAIL FROM:<evil@example.org>\r\nline\r\n\r\n"
                                   b"RCPT TO:<victim@example.org>\r\n.stuffed\r\n")
    assert len(spool_messages(relay)) == 2


def test_oversize_message_is_refused_and_the_session_goes_on(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"max_message_size": "4KiB"})
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        code, reply = client.mail("app@example.com", ["SIZE=999999"])
        assert (code, reply[:5]) == (552, b"5.3.4")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, reply = client.data(MESSAGE + b"x" * 10_000 + b"\r\n")
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        assert client.data(MESSAGE)[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert body_of(received.data) == b"hello\r\n"
    assert len(spool_messages(relay)) == 1


# ---------------------------------------------------------------------------------------------
# 7. Graceful shutdown
# ---------------------------------------------------------------------------------------------
def test_graceful_shutdown_finishes_transactions_in_flight(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    busy = smtplib.SMTP(*relay.address, timeout=10)
    idle = Raw(relay.address)
    try:
        busy.ehlo("busy.example.com")
        assert busy.mail("app@example.com")[0] == 250
        assert busy.rcpt("user@example.net")[0] == 250
        idle.reply()
        idle.cmd("EHLO idle.example.com")
        wait_until(lambda: open_connections(relay) == 2, what="both sessions registered")

        relay.loop.call_soon_threadsafe(relay.server.request_stop)

        assert idle.reply()[1] == [b"421 4.3.2 Service shutting down"]
        assert idle.at_eof()
        assert relay.server.state is not None and relay.server.state.accepting is False
        with Raw(relay.address) as late:
            code, lines = late.reply()
            assert code == 421 and lines[0].startswith(b"421 4.7.0 Service shutting down")
            assert late.at_eof()

        code, reply = busy.data(MESSAGE)
        assert code == 250, reply
        queue_id = reply.split()[-1].decode()
    finally:
        idle.close()
        busy.close()
    relay.stop()
    [record] = spool_messages(relay)
    assert record.id == queue_id and record.state in ("queued", "delivered")
    if record.state == "delivered":
        assert len(fake_upstream.messages) == 1


def _tls_session_left_closing(relay: ThreadRelay, context: ssl.SSLContext) -> Raw:
    """QUIT over STARTTLS, then keep the TCP connection open and never answer close_notify.

    The server's TLS transport is then closing (asyncio waits up to 30 s for the peer) while the
    protocol is still registered as an open connection.
    """
    raw = Raw(relay.address)
    raw.reply()
    raw.cmd("EHLO client.example.com")
    raw.starttls(context)
    raw.cmd("EHLO client.example.com")
    assert raw.cmd("QUIT")[0] == 221
    time.sleep(0.2)
    return raw


def test_shutdown_survives_a_closing_tls_session(start_relay, listener_cert_files, client_tls):
    relay = start_relay(None, listeners=[tls_listener(listener_cert_files)])
    with _tls_session_left_closing(relay, client_tls):
        # What SIGTERM runs; called in the relay's loop so that a failure leaves it running.
        relay.call(relay.server.shutdown(), timeout=15)
    assert not (relay.config.queue.path / "relay.pid").exists()  # shutdown ran to its end


def test_idle_timer_on_a_closing_tls_session(start_relay, listener_cert_files, client_tls):
    relay = start_relay(None, access={"command_timeout": "1s"},
                        listeners=[tls_listener(listener_cert_files)])
    errors = _loop_errors(relay)
    with _tls_session_left_closing(relay, client_tls):
        time.sleep(1.3)  # past command_timeout
    wait_until(lambda: no_leaked_connections(relay), what="connection count back to 0")
    assert [(e.get("message"), repr(e.get("exception"))) for e in errors] == []


# ---------------------------------------------------------------------------------------------
# 8. Certificate reload
# ---------------------------------------------------------------------------------------------
def _peer_cert_after_starttls(relay: ThreadRelay, context: ssl.SSLContext) -> bytes:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        cert = client.sock.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def _peer_cert_implicit(relay: ThreadRelay, context: ssl.SSLContext) -> bytes:
    with smtplib.SMTP_SSL(*relay.address, timeout=10, context=context) as client:
        client.ehlo("client.example.com")
        assert isinstance(client.sock, ssl.SSLSocket)
        cert = client.sock.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def _point_config_to_new_cert(relay: ThreadRelay, tls_ca: Any, directory: Path) -> bytes:
    fresh = tls_ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = directory / "new-cert.pem", directory / "new-key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in fresh.cert_chain_pems))
    fresh.private_key_pem.write_to_path(str(key_path))
    config = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    config["listeners"][0].update(certificate=str(cert_path), private_key=str(key_path))
    relay.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return ssl.PEM_cert_to_DER_cert(fresh.cert_chain_pems[0].bytes().decode())


def test_reload_presents_the_new_certificate_to_new_starttls_sessions(
        start_relay, listener_cert_files, client_tls, tls_ca, tmp_path):
    relay = start_relay(None, listeners=[tls_listener(listener_cert_files)])
    before = _peer_cert_after_starttls(relay, client_tls)
    assert before == ssl.PEM_cert_to_DER_cert(listener_cert_files[0].read_text())
    fresh = _point_config_to_new_cert(relay, tls_ca, tmp_path)
    assert relay.reload() is True
    after = _peer_cert_after_starttls(relay, client_tls)
    assert after == fresh != before


def test_reload_presents_the_new_certificate_on_implicit_tls(
        start_relay, listener_cert_files, client_tls, tls_ca, tmp_path):
    relay = start_relay(None, listeners=[tls_listener(listener_cert_files, "implicit")])
    before = _peer_cert_implicit(relay, client_tls)
    fresh = _point_config_to_new_cert(relay, tls_ca, tmp_path)
    assert relay.reload() is True
    after = _peer_cert_implicit(relay, client_tls)
    assert after == fresh != before


def test_a_client_that_keeps_talking_is_not_timed_out(start_relay):
    """Each command moves the idle deadline: 3 s of NOOPs every 0.4 s against a 1 s timeout."""
    relay = start_relay(None, access={"command_timeout": "1s"})
    with Raw(relay.address) as raw:
        raw.reply()
        started = time.monotonic()
        while True:
            assert raw.cmd("NOOP")[0] == 250
            idle_from = time.monotonic()
            if idle_from - started > 3:
                break
            time.sleep(0.4)
        assert raw.reply()[1] == [b"421 4.4.2 Timeout, closing connection"]
        assert 0.8 < time.monotonic() - idle_from < 2


def test_the_command_timeout_after_data_is_the_shorter_one_again(fake_upstream, start_relay):
    """DATA's longer deadline does not outlive the message: idle afterwards, the command
    timeout applies."""
    relay = start_relay(fake_upstream, access={"command_timeout": "1s", "data_timeout": "5s"})
    with Raw(relay.address) as raw:
        raw.up_to_data()
        time.sleep(1.5)  # within data_timeout, past command_timeout
        assert raw.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
        idle_from = time.monotonic()
        assert raw.reply()[1] == [b"421 4.4.2 Timeout, closing connection"]
        assert 0.8 < time.monotonic() - idle_from < 2
