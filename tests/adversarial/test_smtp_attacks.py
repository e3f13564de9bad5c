"""The listener attacked over real sockets: forged addresses, smuggling, floods, protocol abuse.

Every test here failed against the relay before issue 8 was fixed; each checks what reaches the
fake upstream byte for byte, not only the reply the attacker saw.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from rawsmtp import Raw
from relayrunner import ThreadRelay, relay_config, spool_messages, wait_until
from util import free_port

from relay.passwords import hash_password

MESSAGE = (b"From: App <app@x.test>\r\nTo: user@y.test\r\nSubject: attack\r\n"
           b"Message-ID: <m1@x.test>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n")
PASSWORD = "secret"


def listener(**settings: Any) -> dict[str, Any]:
    return {"name": "local", "address": "127.0.0.1", "port": free_port(), **settings}


def session(relay: ThreadRelay) -> Raw:
    raw = Raw(relay.address)
    raw.reply()
    assert raw.cmd("EHLO attacker.test")[0] == 250
    return raw


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def upstream_quiet(fake: Any, seconds: float = 0.5) -> bool:
    time.sleep(seconds)
    return fake.messages == []


# ---------------------------------------------------------------------------------------------
# Item 1: the address that is checked is the address that is sent
# ---------------------------------------------------------------------------------------------
FORGED = [
    b'MAIL FROM:<"a\r<ceo@bank.test>"@x.test>',
    b'MAIL FROM:<"a\n<ceo@bank.test>"@x.test>',
    b'MAIL FROM:<"a\x00<ceo@bank.test>"@x.test>',
    b'MAIL FROM:<"a\x0b<ceo@bank.test>"@x.test>',
    b"MAIL FROM:<ceo@bank.test\r@x.test>",
]


@pytest.mark.parametrize("command", FORGED)
def test_forged_sender_never_passes_allowed_senders(fake_upstream, start_relay, command):
    relay = start_relay(fake_upstream, listeners=[listener(allowed_senders=["*@x.test"])])
    with session(relay) as raw:
        raw.send(command + b"\r\n")
        code, lines = raw.reply()
        assert code in (501, 553), lines
        if b"\n" in command:  # a bare LF ends a command line: the rest is a second, bad one
            assert raw.reply()[0] == 500
        assert raw.cmd("NOOP")[0] == 250  # the session goes on, in step
    assert spool_messages(relay) == []


def test_forged_recipient_is_refused_and_nothing_is_sent(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        assert raw.cmd("MAIL FROM:<app@x.test>")[0] == 250
        code, lines = raw.cmd(b'RCPT TO:<"a\r<other@evil.test>"@y.test>')
        assert code == 501 and b"control character" in lines[0], lines
        assert raw.cmd("RCPT TO:<user@y.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(MESSAGE + b".\r\n")
        assert raw.reply()[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert received.rcpt_tos == ["user@y.test"]
    assert received.mail_from == "app@x.test"


def test_quoted_local_part_is_sent_exactly_as_checked(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, listeners=[listener(allowed_senders=['"*"@x.test'])])
    with session(relay) as raw:
        assert raw.cmd('MAIL FROM:<"john <ceo@bank.test> smith"@x.test>')[0] == 250
        assert raw.cmd('RCPT TO:<"a b"@y.test>')[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(MESSAGE + b".\r\n")
        assert raw.reply()[0] == 250
    [received] = fake_upstream.wait_for(1)
    # aiosmtplib's quote_address() would have sent <ceo@bank.test> here.
    assert received.mail_from == '"john <ceo@bank.test> smith"@x.test'
    assert received.rcpt_tos == ['"a b"@y.test']


def test_user_allowed_senders_see_the_same_address(fake_upstream, start_relay):
    users = [{"name": "alice", "password_hash": hash_password(PASSWORD),
              "allowed_senders": ["alice@x.test"]}]
    relay = start_relay(fake_upstream, users=users, listeners=[listener(auth="required")])
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    with session(relay) as raw:
        assert raw.cmd(f"AUTH PLAIN {blob}")[0] == 235
        code, _ = raw.cmd(b'MAIL FROM:<"x\r<alice@x.test>"@evil.test>')
        assert code == 501
        code, _ = raw.cmd(b"MAIL FROM:<alice@x.test.evil.test>")
        assert code == 553
        assert raw.cmd("MAIL FROM:<alice@x.test>")[0] == 250


# ---------------------------------------------------------------------------------------------
# Item 3: malformed addresses get their answer at MAIL/RCPT, never a failed message later
# ---------------------------------------------------------------------------------------------
MALFORMED_RECIPIENTS = [
    (b"RCPT TO:<bad address@y.test>", 553),
    (b"RCPT TO:<a\x00b@y.test>", 501),
    ("RCPT TO:<a\u0085b@y.test>".encode(), 553),
    ("RCPT TO:<jörg@y.test>".encode(), 553),  # 8-bit without SMTPUTF8
    (b"RCPT TO:<\xff\xfe@y.test>", 553),  # not UTF-8
    (b"RCPT TO:<user@-y.test>", 553),
    (b"RCPT TO:<user@y.test> NOTIFY=NEVER", 555),  # DSN is not advertised
]


@pytest.mark.parametrize(("command", "code"), MALFORMED_RECIPIENTS)
def test_malformed_recipients_are_refused_and_the_valid_one_delivered(fake_upstream, start_relay,
                                                                      command, code):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        assert raw.cmd("MAIL FROM:<app@x.test>")[0] == 250
        got, lines = raw.cmd(command)
        assert got == code, lines
        assert raw.cmd("RCPT TO:<user@y.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(MESSAGE + b".\r\n")
        assert raw.reply()[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert received.rcpt_tos == ["user@y.test"]
    [record] = wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivery")
    assert [r.state for r in record.recipients] == ["delivered"]


def test_non_ascii_sender_needs_smtputf8_and_an_upstream_that_takes_it(fake_upstream,
                                                                      start_relay):
    relay = start_relay(fake_upstream)  # the fake, like Infobip, does not advertise SMTPUTF8
    assert relay.server.delivery is not None
    wait_until(lambda: relay.server.delivery.health.smtputf8 is not None,  # type: ignore[union-attr]
               what="first contact with the upstream")
    with session(relay) as raw:
        code, lines = raw.cmd("MAIL FROM:<jörg@x.test>".encode())
        assert code == 553 and b"5.6.7" in lines[0] and b"SMTPUTF8" in lines[0], lines
        code, lines = raw.cmd("MAIL FROM:<jörg@x.test> SMTPUTF8".encode())
        assert code == 553 and b"upstream does not support SMTPUTF8" in lines[0], lines
        # ASCII addresses with SMTPUTF8 and an 8-bit body still go, as 8BITMIME.
        assert raw.cmd("MAIL FROM:<app@x.test> SMTPUTF8 BODY=8BITMIME")[0] == 250
        assert raw.cmd("RCPT TO:<user@y.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send("Subject: Grüße\r\n\r\nÜmlaut ✓\r\n.\r\n".encode())
        assert raw.reply()[0] == 250
    [received] = fake_upstream.wait_for(1)
    options = [o.upper() for o in received.mail_options]
    assert "BODY=8BITMIME" in options and "SMTPUTF8" not in options
    assert body_of(received.data) == "Ümlaut ✓\r\n".encode()
    assert b"with UTF8SMTP id" in received.data  # the client's hop did use SMTPUTF8


def test_utf8smtp_in_received_with_an_upstream_that_takes_it(fake_upstream_factory, start_relay):
    upstream = fake_upstream_factory(smtputf8=True)
    relay = start_relay(upstream)
    wait_until(lambda: relay.server.delivery.health.smtputf8,  # type: ignore[union-attr]
               what="first contact with the upstream")
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.sendmail("jörg@x.test", ["user@y.test"], "Subject: ü\r\n\r\nü\r\n".encode(),
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [received] = upstream.wait_for(1)
    assert received.mail_from == "jörg@x.test"
    assert b"with UTF8SMTP id" in received.data  # RFC 6531 7.3


# ---------------------------------------------------------------------------------------------
# Item 6: smuggling; every variant byte-checked at the upstream
# ---------------------------------------------------------------------------------------------
SMUGGLED = b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@z.test>\r\nDATA\r\nforged\r\n"
# (what the client sends before the smuggled commands, the line the dot becomes). Only a dot
# after a real CRLF is a stuffing dot (RFC 5321 4.5.2); after a bare CR or LF it is text.
SMUGGLING = [
    (b"hello\r.\r\n", b"."),
    (b"hello\n.\n", b"."),
    (b"hello\r\n.\n", b""),
    (b"hello\n.\r\n", b"."),
    (b"hello\r.\r", b"."),
]


@pytest.mark.parametrize(("variant", "dot_line"), SMUGGLING)
def test_smuggling_variants_stay_inside_one_message(fake_upstream, start_relay, variant,
                                                    dot_line):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        assert raw.cmd("MAIL FROM:<app@x.test>")[0] == 250
        assert raw.cmd("RCPT TO:<user@y.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(b"Subject: s\r\n\r\n" + variant + SMUGGLED + b".\r\n")
        assert raw.reply()[0] == 250
    [received] = fake_upstream.wait_for(1)
    assert upstream_quiet(fake_upstream) is False  # the one message, and no second one
    assert len(fake_upstream.messages) == 1
    assert received.mail_from == "app@x.test"
    # The fake unstuffs like any server: a lone dot came back as a line of its own.
    lines = body_of(received.data).split(b"\r\n")
    assert lines[:3] == [b"hello", dot_line, b"MAIL FROM:<admin@bank.test>"]
    assert b"\r" not in body_of(received.data).replace(b"\r\n", b"")
    assert b"\n" not in body_of(received.data).replace(b"\r\n", b"")


def test_bare_cr_or_nul_in_the_header_block_is_refused(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    for header in (b"Subject: a\rBcc: victim@z.test\r\n", b"Subject: a\x00b\r\n"):
        with session(relay) as raw:
            assert raw.cmd("MAIL FROM:<app@x.test>")[0] == 250
            assert raw.cmd("RCPT TO:<user@y.test>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            raw.send(header + b"\r\nbody\r\n.\r\n")
            code, lines = raw.reply()
            assert code == 550 and b"5.6.0" in lines[0], lines
    assert upstream_quiet(fake_upstream)
    assert spool_messages(relay) == []


def test_bare_lf_ends_a_command_like_postfix_normalize(fake_upstream, start_relay):
    # Decided and documented: like Postfix's smtpd_forbid_bare_newline = normalize, a command
    # line may end in a bare LF. No smuggling follows, since the relay writes its own commands.
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        raw.send(b"MAIL FROM:<app@x.test>\nRCPT TO:<user@y.test>\r\n")
        assert raw.reply()[0] == 250
        assert raw.reply()[0] == 250


# ---------------------------------------------------------------------------------------------
# Item 2: command lines are bounded before AUTH, whatever the client sends
# ---------------------------------------------------------------------------------------------
def _vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _flood(address: tuple[str, int], size: int) -> bytes:
    """Send one NOOP line of ``size`` octets without CRLF; return what the relay answered."""
    chunk = b"NOOP " + b"x" * (64 * 1024)
    with socket.create_connection(address, timeout=10) as sock:
        sock.recv(1000)  # greeting
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the relay closed on us: what we want
        try:
            return sock.recv(1000)
        except OSError:
            return b""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.xdist_group("heavy")  # RSS is measured: nothing heavy beside it
def test_command_line_flood_is_bounded(fake_upstream, start_relay_process, tmp_path):
    config = relay_config(tmp_path, fake_upstream, access={"trusted_networks": ["10.0.0.0/8"]})
    relay = start_relay_process(config)
    assert relay.proc is not None
    before = _vm_kb(relay.proc.pid, "VmRSS")
    started = time.monotonic()
    replies = [_flood(relay.address, 18 * 1024 * 1024) for _ in range(20)]
    elapsed = time.monotonic() - started
    peak = _vm_kb(relay.proc.pid, "VmHWM")
    print(f"\n20 x 18 MiB command-line floods: answered in {elapsed:.2f} s, relay RSS "
          f"{before // 1024} MiB before, peak {peak // 1024} MiB")
    assert all(reply.startswith(b"500 5.5.2 Line too long") for reply in replies), replies[:3]
    # Before the fix each of these lines was buffered whole: 1.16 GB for 20 of them.
    assert peak - before < 30 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
    assert elapsed < 20  # each flood ends after 2 KiB, not after 18 MiB
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        assert client.noop()[0] == 250  # the relay is unharmed


def test_long_auth_line_is_refused_not_buffered(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        raw.send(b"AUTH PLAIN " + b"A" * 100_000 + b"\r\n")
        code, lines = raw.reply()
        assert code == 500 and b"Line too long" in lines[0]
        assert closed(raw)


def closed(raw: Raw) -> bool:
    """True once the relay has closed the connection (EOF, or a reset for unread input)."""
    try:
        while raw.file.readline():
            pass
    except OSError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Item 10: the null sender
# ---------------------------------------------------------------------------------------------
def test_null_sender_is_refused_clearly_by_default(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        code, lines = raw.cmd("MAIL FROM:<>")
        assert code == 550 and b"null_sender_address" in lines[0], lines


def test_null_sender_is_rewritten_when_an_address_is_configured(fake_upstream, start_relay):
    relay = start_relay(fake_upstream,
                        listeners=[listener(allowed_senders=["*@x.test"])],
                        access={"trusted_networks": ["127.0.0.0/8"],
                                "null_sender_address": "postmaster@example.com"})
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("mta.x.test")
        client.sendmail("", ["user@y.test"], MESSAGE)
    [received] = fake_upstream.wait_for(1)
    assert received.mail_from == "postmaster@example.com"


# ---------------------------------------------------------------------------------------------
# Low items: AUTH, parameters, HELP
# ---------------------------------------------------------------------------------------------
def _auth_relay(start_relay, fake_upstream, **settings: Any) -> ThreadRelay:
    users = [{"name": "alice", "password_hash": hash_password(PASSWORD)}]
    return start_relay(fake_upstream, users=users,
                       listeners=[listener(auth="optional", **settings)])


def test_auth_login_with_non_ascii_base64_is_501_without_a_traceback(fake_upstream, start_relay,
                                                                     caplog):
    relay = _auth_relay(start_relay, fake_upstream)
    with caplog.at_level(logging.INFO), session(relay) as raw:
        code, lines = raw.cmd("AUTH LOGIN ä".encode())
        assert code == 501, lines
        code, lines = raw.cmd("AUTH PLAIN ä".encode())
        assert code == 501, lines
        assert raw.cmd("NOOP")[0] == 250
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_auth_inside_a_transaction_is_503(fake_upstream, start_relay):
    relay = _auth_relay(start_relay, fake_upstream)
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    with session(relay) as raw:
        assert raw.cmd("MAIL FROM:<app@x.test>")[0] == 250
        code, lines = raw.cmd(f"AUTH PLAIN {blob}")
        assert code == 503, lines
        assert raw.cmd("RSET")[0] == 250
        assert raw.cmd(f"AUTH PLAIN {blob}")[0] == 235


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
def test_auth_lines_never_reach_the_log_at_any_level(fake_upstream, start_relay, caplog,
                                                     monkeypatch, level):
    """aiosmtpd's "mail.log" masks AUTH lines; the relay skips the masking only for lines
    that are not logged at all (listener._sanitized_log_if_enabled)."""
    import aiosmtpd.smtp  # noqa: PLC0415

    sanitized: list[bytes] = []
    sanitize = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize",
                        lambda text: sanitized.append(text) or sanitize(text))
    relay = _auth_relay(start_relay, fake_upstream)
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    with caplog.at_level(level, logger="mail.log"), session(relay) as raw:
        assert raw.cmd(f"AUTH PLAIN {blob}")[0] == 235
        assert raw.cmd("NOOP")[0] == 250
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert blob not in logged and PASSWORD not in logged
    if level == logging.DEBUG:
        assert "AUTH PLAIN ********" in logged  # logged, masked
        assert sanitized
    else:
        assert not sanitized  # nothing logged, nothing masked


@pytest.mark.parametrize("command", [
    "MAIL FROM:<a@x.test> RET=HDRS",
    "MAIL FROM:<a@x.test> ENVID=abc",
])
def test_dsn_parameters_are_refused_while_dsn_is_not_advertised(fake_upstream, start_relay,
                                                               command):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        code, lines = raw.cmd(command)
        assert code == 555 and lines[0].startswith(b"555 5.5.4"), lines


def test_repeated_mail_parameters_are_a_syntax_error(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        assert raw.cmd("MAIL FROM:<a@x.test> BODY=7BIT BODY=8BITMIME")[0] == 501
        assert raw.cmd("MAIL FROM:<a@x.test> SIZE=10 SIZE=20")[0] == 501
        assert raw.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME")[0] == 250


def _help_commands(raw: Raw) -> set[str]:
    code, lines = raw.cmd("HELP")
    assert code == 250, lines
    return set(lines[0].decode().split(":", 1)[1].split())


def test_help_lists_every_command_but_auth_where_it_is_off(fake_upstream, start_relay):
    relay = start_relay(fake_upstream)
    with session(relay) as raw:
        commands = _help_commands(raw)
        assert {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP",
                "VRFY"} <= commands
        assert "AUTH" not in commands and "STARTTLS" not in commands
        for verb in ("MAIL", "EHLO", "DATA", "RCPT"):
            code, lines = raw.cmd(f"HELP {verb}")
            assert code == 250 and b"Syntax: " + verb.encode() in lines[0], lines


def test_help_lists_auth_where_it_is_offered(fake_upstream, start_relay):
    relay = _auth_relay(start_relay, fake_upstream)
    with session(relay) as raw:
        assert "AUTH" in _help_commands(raw)
        assert raw.cmd("HELP AUTH")[0] == 250


# ---------------------------------------------------------------------------------------------
# Pipelined abuse
# ---------------------------------------------------------------------------------------------
def test_pipelined_flood_of_recipients_stays_in_step(fake_upstream, start_relay):
    relay = start_relay(fake_upstream, access={"trusted_networks": ["127.0.0.0/8"],
                                               "max_recipients": 5})
    with session(relay) as raw:
        batch = b"MAIL FROM:<app@x.test>\r\n" + b"".join(
            b"RCPT TO:<u%d@y.test>\r\n" % i for i in range(50)) + b"DATA\r\n"
        raw.send(batch)
        codes = [raw.reply()[0] for _ in range(52)]
        assert codes[0] == 250 and codes[1:6] == [250] * 5
        assert set(codes[6:51]) == {452} and codes[51] == 354
        raw.send(MESSAGE + b".\r\nQUIT\r\n")
        assert raw.reply()[0] == 250
        assert raw.reply()[0] == 221
    [received] = fake_upstream.wait_for(1)
    assert received.rcpt_tos == [f"u{i}@y.test" for i in range(5)]
