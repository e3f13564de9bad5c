"""Interop with real SMTP clients installed from Debian: Postfix (as a null client), swaks,
msmtp and curl each send through the relay to the fake upstream, and the bytes the upstream
received are compared with what the client was given.

Only the body (everything after the first empty line) is compared byte for byte: the clients
and the relay add trace and missing headers (Received, Message-ID, Date, ...). Each test skips,
naming the missing program, where its client is not installed; .ci/run installs them all.

Expected transformations, the same for every client:

* line ends become CRLF (a bare-LF body is normalised, by the client or by the relay);
* a line longer than 998 octets is broken with CRLF + space (RFC 5322 §2.1.1; Postfix's
  smtp_line_length_limit does the same): removing every "CRLF space" gives back the line;
* 8-bit bytes and leading dots arrive unchanged (dot-stuffing is undone exactly once).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream, Received
from relayrunner import ThreadRelay
from util import free_port

from bench.postfix import PostfixConfig, PostfixInstance

SENDER = "app@sender.test"
RECIPIENT = "user@rcpt.test"
MAX_LINE = 998


def _tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories a non-login root shell may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def require(name: str, package: str | None = None) -> str:
    """The path of ``name``, or skip the test saying which Debian package provides it."""
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package `{package or name}`; "
                    f".ci/run installs it)")
    return path


# ---------------------------------------------------------------------------------------------
# Test messages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """A message with a unique tag header; ``body`` uses CRLF unless it is the bare-LF probe."""

    kind: str
    tag: str
    raw: bytes  # what the client is given
    body: bytes  # the body part of ``raw``

    @property
    def expected_body(self) -> bytes:
        """The body as the upstream must receive it (CRLF line ends; long lines unfolded)."""
        return _crlf(self.body)


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def make_probe(kind: str, client: str) -> Probe:
    """``kind``: ``8bit`` (UTF-8 body, leading dots), ``long`` (a 2,500-octet line),
    ``barelf`` (LF line ends only)."""
    tag = f"{client}-{kind}-{uuid.uuid4().hex[:12]}"
    headers = [
        f"From: Interop <{SENDER}>",
        f"To: <{RECIPIENT}>",
        f"Subject: interop {client} {kind}",
        f"X-Test-Tag: {tag}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    if kind == "8bit":
        body = ("Grüße aus Köln: äöü ÄÖÜ ß € 日本語\r\n"
                ".a line with a leading dot\r\n"
                "..two leading dots\r\n"
                "\tindented, trailing space \r\n"
                "\r\n"
                "last line\r\n").encode()
    elif kind == "long":
        long_line = "".join(f"{n:05d}" for n in range(500))  # 2,500 octets, no spaces
        body = (f"short line\r\n{long_line}\r\nafter the long line: é\r\n").encode()
    elif kind == "barelf":
        body = "line one\nline two: ünïcödé\n.dot line\n\nlast line\n".encode()
    else:  # pragma: no cover - a typo in a test
        raise ValueError(kind)
    eol = "\n" if kind == "barelf" else "\r\n"
    raw = (eol.join(headers) + eol + eol).encode() + body
    return Probe(kind, tag, raw, body)


def body_of(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    assert end >= 0, f"no header/body separator in {data[:300]!r}"
    return data[end + 4:]


def find_tagged(fake: FakeUpstream, tag: str, timeout: float = 20.0) -> Received:
    """The one message carrying ``X-Test-Tag: tag``, waiting for it to arrive."""
    deadline = time.monotonic() + timeout
    needle = f"X-Test-Tag: {tag}\r\n".encode()
    while True:
        found = [m for m in fake.messages if needle in m.data]
        if found:
            time.sleep(0.2)  # a duplicate would arrive right after
            found = [m for m in fake.messages if needle in m.data]
            assert len(found) == 1, f"{tag}: delivered {len(found)} times"
            return found[0]
        if time.monotonic() > deadline:
            tags = [m.parsed()["X-Test-Tag"] for m in fake.messages]
            raise AssertionError(f"{tag} not delivered within {timeout:g}s; got {tags}")
        time.sleep(0.05)


def assert_body(received: Received, probe: Probe) -> None:
    got = body_of(received.data)
    longest = max(len(line) for line in got.split(b"\r\n"))
    assert longest <= MAX_LINE, f"{probe.tag}: a {longest}-octet line reached the upstream"
    assert b"\n" not in got.replace(b"\r\n", b""), f"{probe.tag}: bare LF upstream"
    assert b"\r" not in got.replace(b"\r\n", b""), f"{probe.tag}: bare CR upstream"
    if probe.kind == "long":
        assert got != probe.expected_body  # it had to be broken
        got = got.replace(b"\r\n ", b"")
    assert got == probe.expected_body, (
        f"{probe.tag}: body changed\n sent: {probe.expected_body!r}\n  got: {got!r}")
    assert received.mail_from == SENDER
    assert received.rcpt_tos == [RECIPIENT]
    if probe.kind != "long" and not probe.body.isascii():
        assert "BODY=8BITMIME" in [o.upper() for o in received.mail_options]


def run(argv: list[str], *, stdin: bytes | None = None, timeout: float = 30.0
        ) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode}\nstdout: {result.stdout.decode(errors='replace')}"
        f"\nstderr: {result.stderr.decode(errors='replace')}")
    return result


KINDS = ["8bit", "long", "barelf"]


@pytest.fixture
def relay(fake_upstream: FakeUpstream, start_relay: Callable[..., ThreadRelay]) -> ThreadRelay:
    return start_relay(fake_upstream)


# ---------------------------------------------------------------------------------------------
# swaks, msmtp, curl
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_swaks(kind: str, relay: ThreadRelay, fake_upstream: FakeUpstream,
               tmp_path: Path) -> None:
    swaks = require("swaks")
    probe = make_probe(kind, "swaks")
    message = tmp_path / "message.eml"
    # swaks always ends the data with CRLF "." itself: give it the message without its last
    # line end, or the upstream sees one empty line more than the client meant.
    message.write_bytes(probe.raw.removesuffix(b"\n").removesuffix(b"\r"))
    host, port = relay.address
    result = run([swaks, "--server", host, "--port", str(port), "--helo", "swaks.client.test",
                  "--from", SENDER, "--to", RECIPIENT, "--data", f"@{message}"])
    assert b"queued as" in result.stdout
    assert_body(find_tagged(fake_upstream, probe.tag), probe)


@pytest.mark.parametrize("kind", KINDS)
def test_msmtp(kind: str, relay: ThreadRelay, fake_upstream: FakeUpstream) -> None:
    msmtp = require("msmtp")
    probe = make_probe(kind, "msmtp")
    host, port = relay.address
    # --file=/dev/null: no system or user configuration file is read.
    run([msmtp, "--file=/dev/null", f"--host={host}", f"--port={port}", "--tls=off",
         "--auth=off", "--domain=msmtp.client.test", f"--from={SENDER}", "--", RECIPIENT],
        stdin=probe.raw)
    assert_body(find_tagged(fake_upstream, probe.tag), probe)


@pytest.mark.parametrize("kind", KINDS)
def test_curl(kind: str, relay: ThreadRelay, fake_upstream: FakeUpstream,
              tmp_path: Path) -> None:
    """curl uploads the file as it is: the bare-LF probe reaches the relay with bare LFs."""
    curl = require("curl")
    probe = make_probe(kind, "curl")
    message = tmp_path / "message.eml"
    raw = probe.raw
    if not raw.endswith(b"\r\n"):
        # curl ends data that does not end in CRLF with CRLF "." CRLF: a final bare LF would be
        # one more (empty) line. Without it, the last line ends with curl's CRLF.
        raw = raw.removesuffix(b"\n")
    message.write_bytes(raw)
    host, port = relay.address
    run([curl, "--silent", "--show-error", "--url", f"smtp://{host}:{port}/curl.client.test",
         "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", str(message)])
    assert_body(find_tagged(fake_upstream, probe.tag), probe)


# ---------------------------------------------------------------------------------------------
# Postfix as a null client
# ---------------------------------------------------------------------------------------------
def _postfix_instance(root: Path, relay_port: int, extra: dict[str, str]) -> PostfixInstance:
    """A private Postfix (bench/postfix.py) whose relayhost is the relay, in plain SMTP."""
    require("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (postfix start)")
    settings = {
        "myhostname": "postfix.client.test",
        # plain SMTP to the relay's trusted listener: no TLS, no SASL
        "smtp_tls_wrappermode": "no",
        "smtp_tls_security_level": "none",
        "smtp_sasl_auth_enable": "no",
        # fast retries, so that a refused message shows up as deferred, not silence
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        **extra,
    }
    config = PostfixConfig(port=free_port(), sink_port=relay_port, ca_file=Path("/dev/null"),
                           password="unused", sender_domain="no-prepend.invalid",
                           extra=settings)
    return PostfixInstance(root, config)


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., PostfixInstance]]:
    """``start(relay_port, **main_cf)`` -> a running private Postfix, stopped at teardown.

    Its directory is not under pytest's tmp_path: the postfix user must be able to walk to
    its queue, and every pytest session resets pytest-of-<user>/ to mode 0700.
    """
    started: list[PostfixInstance] = []
    root = Path(tempfile.mkdtemp(prefix="relay-interop-postfix-"))

    def start(relay_port: int, **extra: str) -> PostfixInstance:
        instance = _postfix_instance(root / f"postfix{len(started)}", relay_port, extra)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.stop()
    shutil.rmtree(root, ignore_errors=True)


def _postfix_sendmail(instance: PostfixInstance, probe: Probe) -> None:
    """Inject like a local application: Postfix's sendmail(1) with -C the private config."""
    sendmail = require("sendmail", "postfix")
    run([sendmail, "-C", str(instance.etc), "-f", SENDER, "-i", "--", RECIPIENT],
        stdin=probe.raw)


def _postfix_smtp(instance: PostfixInstance, probe: Probe) -> None:
    """Inject through the instance's smtpd, declaring BODY=8BITMIME like an ESMTP client."""
    with smtplib.SMTP("127.0.0.1", instance.config.port, timeout=30) as client:
        client.ehlo("app.client.test")
        refused = client.sendmail(SENDER, [RECIPIENT], probe.raw,
                                  mail_options=["BODY=8BITMIME"])
        assert not refused


def _wait_postfix(instance: PostfixInstance, fake: FakeUpstream, probe: Probe) -> Received:
    try:
        return find_tagged(fake, probe.tag, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nPostfix maillog:\n{instance.log_tail(30)}") from None


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_postfix_null_client(relay: ThreadRelay, fake_upstream: FakeUpstream,
                             postfix_factory: Callable[..., PostfixInstance]) -> None:
    """8-bit and long-line messages through Postfix's smtpd, a bare-LF one through its
    sendmail(1); Postfix relays all three to the relay (relayhost), which forwards them."""
    postfix = postfix_factory(relay.address[1])
    probes = [(make_probe("8bit", "postfix"), _postfix_smtp),
              (make_probe("long", "postfix"), _postfix_smtp),
              (make_probe("barelf", "postfix"), _postfix_sendmail)]
    for probe, inject in probes:
        inject(postfix, probe)
    for probe, _ in probes:
        assert_body(_wait_postfix(postfix, fake_upstream, probe), probe)
    problems = [line for line in postfix.log_problems() if "status=" in line]
    assert not problems, problems


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_postfix_bounce_with_null_sender(fake_upstream: FakeUpstream,
                                         start_relay: Callable[..., ThreadRelay],
                                         postfix_factory: Callable[..., PostfixInstance]) -> None:
    """Postfix bounces a message it cannot deliver; the bounce (MAIL FROM:<>) goes out through
    the relay, whose access.null_sender: rewrite gives it the configured sender."""
    relay = start_relay(fake_upstream, access={"null_sender": "rewrite",
                                               "null_sender_address": "postmaster@example.com"})
    # Mail to bounce.test is refused by Postfix itself (error transport): it bounces to SENDER.
    postfix = postfix_factory(relay.address[1],
                              transport_maps="inline:{bounce.test=error:mailbox-unavailable}")
    tag = f"bounce-{uuid.uuid4().hex[:12]}"
    # Through sendmail(1), as a local application would: smtpd would refuse it at RCPT time.
    sendmail = require("sendmail", "postfix")
    run([sendmail, "-C", str(postfix.etc), "-f", SENDER, "-i", "--", "nobody@bounce.test"],
        stdin=(f"From: <{SENDER}>\nTo: <nobody@bounce.test>\nSubject: will bounce\n"
               f"X-Test-Tag: {tag}\n\nbounce me\n").encode())
    bounce = _wait_postfix(postfix, fake_upstream, Probe("bounce", tag, b"", b""))
    assert bounce.mail_from == "postmaster@example.com"
    assert bounce.rcpt_tos == [SENDER]
    parsed = bounce.parsed()
    assert parsed.get_content_type() == "multipart/report"
    assert "mailbox-unavailable" in bounce.data.decode(errors="replace")
