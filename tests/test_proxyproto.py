"""relay.proxyproto's parser as a table, its socket reader, and the PROXY keys of the config."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import textwrap
from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.proxyproto import (
    V1_MAX,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    read_header,
)


def v2(command: int = 0x21, family: int = 0x11, payload: bytes = b"",
       length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, then ``payload``."""
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + payload


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


TLVS = (b"\x01\x00\x02h2"  # ALPN
        b"\x02\x00\x10mail.example.com"  # authority
        b"\x20\x00\x05\x07\x00\x00\x00\x00")  # SSL, empty sub-TLVs

VALID = [
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 25\r\n",
     ProxyHeader(1, "proxy", ("192.0.2.10", 56324), ("10.0.0.1", 25))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n",
     ProxyHeader(1, "proxy", ("2001:db8::7", 0), ("2001:db8::1", 65535))),
    (b"PROXY TCP6 ::ffff:192.0.2.10 ::1 1 2\r\n",
     ProxyHeader(1, "proxy", ("::ffff:c000:20a", 1), ("::1", 2))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "unknown")),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1, "unknown")),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ProxyHeader(1, "proxy", ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    (v2(payload=inet("192.0.2.10", "10.0.0.1", 40000, 25)),
     ProxyHeader(2, "proxy", ("192.0.2.10", 40000), ("10.0.0.1", 25))),
    (v2(family=0x12, payload=inet("192.0.2.10", "10.0.0.1", 53, 25)),  # UDP
     ProxyHeader(2, "proxy", ("192.0.2.10", 53), ("10.0.0.1", 25))),
    (v2(family=0x21, payload=inet("2001:db8::7", "2001:db8::1", 1, 465)),
     ProxyHeader(2, "proxy", ("2001:db8::7", 1), ("2001:db8::1", 465))),
    (v2(payload=inet("192.0.2.10", "10.0.0.1", 40000, 25) + TLVS),
     ProxyHeader(2, "proxy", ("192.0.2.10", 40000), ("10.0.0.1", 25))),
    (v2(command=0x20, family=0x00), ProxyHeader(2, "local")),
    (v2(command=0x20, family=0x11, payload=inet("10.0.5.10", "10.0.0.1", 1, 25)),
     ProxyHeader(2, "local")),  # LOCAL ignores whatever address block it has
    (v2(family=0x00, payload=TLVS), ProxyHeader(2, "unknown")),
    (v2(family=0x31, payload=bytes(216)), ProxyHeader(2, "unknown")),  # AF_UNIX
    (v2(payload=inet("192.0.2.10", "10.0.0.1", 1, 25) + bytes(V2_MAX_PAYLOAD - 12)),
     ProxyHeader(2, "proxy", ("192.0.2.10", 1), ("10.0.0.1", 25))),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_headers_whole_and_octet_by_octet(data: bytes, expected: ProxyHeader) -> None:
    assert ProxyHeaderParser().feed(data) == expected
    parser = ProxyHeaderParser()
    results = [parser.feed(data[i:i + 1]) for i in range(len(data))]
    assert results[-1] == expected
    assert results[:-1] == [None] * (len(data) - 1)
    assert parser.rest == b""


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_octets_after_the_header_are_kept(data: bytes, expected: ProxyHeader) -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(data + b"\x16\x03\x01EHLO x\r\n") == expected
    assert parser.rest == b"\x16\x03\x01EHLO x\r\n"
    assert parser.wanted == 0


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_reading_only_what_is_wanted_never_passes_the_end(data: bytes,
                                                          expected: ProxyHeader) -> None:
    stream = data + b"EHLO client.example\r\n"
    parser = ProxyHeaderParser()
    position = 0
    header = None
    while header is None:
        wanted = parser.wanted
        assert wanted > 0
        header = parser.feed(stream[position:position + wanted])
        assert parser.rest == b""
        position += wanted
    assert header == expected
    assert position == len(data)


MALFORMED = [
    (b"EHLO client.example\r\n", "not a PROXY header"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY header"),  # a ClientHello
    (b"proxy TCP4 192.0.2.10 10.0.0.1 1 25\r\n", "not a PROXY header"),
    (b"PROXY TCP5 192.0.2.10 10.0.0.1 1 25\r\n", "TCP4|TCP6|UNKNOWN"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 1\r\n", "TCP4|TCP6|UNKNOWN"),
    (b"PROXY TCP4  192.0.2.10 10.0.0.1 1 25\r\n", "TCP4|TCP6|UNKNOWN"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 1 25 extra\r\n", "TCP4|TCP6|UNKNOWN"),
    (b"PROXY TCP4 192.0.2.300 10.0.0.1 1 25\r\n", "not an IP address"),
    (b"PROXY TCP4 192.0.2.010 10.0.0.1 1 25\r\n", "not an IP address"),
    (b"PROXY TCP4 example.com 10.0.0.1 1 25\r\n", "not an IP address"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 25\r\n", "TCP4 with an IPv6 address"),
    (b"PROXY TCP6 192.0.2.10 2001:db8::1 1 25\r\n", "TCP6 with an IPv4 address"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 65536 25\r\n", "port out of range"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 1 99999\r\n", "port out of range"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 -1 25\r\n", "port out of range"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 025 25\r\n", "port out of range"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 1 25\n", "does not end with CRLF"),
    (b"PROXY TCP4 192.0.2.10\r10.0.0.1 1 25\r\n", "CR not followed by LF"),
    (b"PROXY UNKNOWN" + b" x" * 60 + b"\r\n", f"longer than {V1_MAX}"),
    (b"PROXY TCP4 " + b"1" * 200, f"longer than {V1_MAX}"),
    (b"\r\n\r\n\x00\r\nQUIT\r" + bytes(8), "bad v2 signature"),
    (v2(command=0x11, payload=inet("192.0.2.10", "10.0.0.1", 1, 25)), "version/command"),
    (v2(command=0x22, payload=inet("192.0.2.10", "10.0.0.1", 1, 25)), "version/command"),
    (v2(family=0x13, payload=inet("192.0.2.10", "10.0.0.1", 1, 25)), "family/transport"),
    (v2(family=0x41, payload=inet("192.0.2.10", "10.0.0.1", 1, 25)), "family/transport"),
    (v2(family=0x11, payload=bytes(11)), "shorter than its family needs"),
    (v2(family=0x21, payload=inet("192.0.2.10", "10.0.0.1", 1, 25)),
     "shorter than its family needs"),
    (v2(family=0x31, payload=bytes(100)), "shorter than its family needs"),
    (v2(length=V2_MAX_PAYLOAD + 1), "over the limit"),
    (v2(length=65535), "over the limit"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_headers_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason.replace("|", r"\|")):
        ProxyHeaderParser().feed(data)


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_headers_are_refused_octet_by_octet(data: bytes, reason: str) -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError, match=reason.replace("|", r"\|")):
        for i in range(len(data)):
            parser.feed(data[i:i + 1])


def test_a_wrong_first_octet_is_refused_at_once() -> None:
    # A client speaking SMTP or TLS straight to a PROXY listener is told apart without waiting.
    for first in (b"E", b"\x16", b"\x00"):
        with pytest.raises(ProxyHeaderError, match="not a PROXY header"):
            ProxyHeaderParser().feed(first)


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.10 10.0.0.1 56324",
    v2(payload=inet("192.0.2.10", "10.0.0.1", 1, 25))[:20],
    V2_SIGNATURE[:5],
])
def test_truncated_headers_wait_for_more(data: bytes) -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(data) is None
    assert parser.wanted > 0


def test_memory_is_bounded_by_the_largest_header() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(v2(payload=inet("192.0.2.10", "10.0.0.1", 1, 25))[:16]) is None
    assert parser.wanted == 12
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY ") is None
    assert parser.wanted <= V1_MAX - 6
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(b"PROXY " + b"9" * 10_000_000)


def test_a_parser_is_used_once() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(ProxyHeaderError, match="already complete"):
        parser.feed(b"PROXY UNKNOWN\r\n")


# --------------------------------------------------------------------------- read_header


async def _read_from(chunks: list[bytes]) -> tuple[ProxyHeader | str, bytes]:
    """What read_header makes of ``chunks`` sent with pauses, and what it left unread."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        async def send() -> None:
            for chunk in chunks:
                theirs.sendall(chunk)
                await asyncio.sleep(0.01)
            theirs.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(send())
        try:
            result: ProxyHeader | str = await asyncio.wait_for(read_header(ours), 5)
        except ProxyHeaderError as exc:
            result = str(exc)
        await sender
        ours.setblocking(True)
        left = b"".join(iter(lambda: ours.recv(4096), b""))
        return result, left
    finally:
        ours.close()
        theirs.close()


def test_read_header_leaves_the_rest_in_the_socket() -> None:
    header = v2(payload=inet("192.0.2.10", "10.0.0.1", 40000, 465))
    result, left = asyncio.run(_read_from([header[:7], header[7:20], header[20:] + b"\x16\x03"]))
    assert result == ProxyHeader(2, "proxy", ("192.0.2.10", 40000), ("10.0.0.1", 465))
    assert left == b"\x16\x03"
    line = b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 25\r\n"
    result, left = asyncio.run(_read_from([line[:30], line[30:] + b"EHLO x\r\n"]))
    assert result == ProxyHeader(1, "proxy", ("192.0.2.10", 56324), ("10.0.0.1", 25))
    assert left == b"EHLO x\r\n"


def test_read_header_reports_a_closed_or_bad_connection() -> None:
    assert asyncio.run(_read_from([b"PROXY TCP4 1"]))[0] == \
        "connection closed before a complete PROXY header"
    assert "not a PROXY header" in str(asyncio.run(_read_from([b"EHLO x\r\n"]))[0])


# --------------------------------------------------------------------------- configuration


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "relay.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, {"INFOBIP_API_KEY": "k"})


def test_proxy_keys_default_off(tmp_path: Path) -> None:
    config = load_config(None, {"INFOBIP_API_KEY": "k"})
    assert config.listeners[0].proxy_protocol is False
    assert config.access.trusted_proxies == ()
    assert not config.access.is_trusted_proxy("127.0.0.1")


def test_proxy_keys_load(tmp_path: Path) -> None:
    config = _load(tmp_path, """
        listeners: [{name: lan, address: 127.0.0.1, proxy_protocol: true}]
        access: {trusted_proxies: [10.0.5.10/32, "2001:db8::/64"]}
    """)
    assert config.listeners[0].proxy_protocol is True  # type: ignore[attr-defined]
    access = config.access  # type: ignore[attr-defined]
    assert access.is_trusted_proxy("10.0.5.10") and access.is_trusted_proxy("::ffff:10.0.5.10")
    assert access.is_trusted_proxy("2001:db8::5") and not access.is_trusted_proxy("10.0.5.11")


def test_proxy_protocol_without_trusted_proxies_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, """
            listeners: [{name: a, address: 127.0.0.1}, {name: lan, address: 127.0.0.1,
                         proxy_protocol: true}]
        """)
    assert info.value.path == "listeners[1].proxy_protocol"
    assert "access.trusted_proxies is empty" in str(info.value)


@pytest.mark.parametrize(("text", "path"), [
    ("listeners: [{name: a, proxy_protocol: yes please}]", "listeners[0].proxy_protocol"),
    ("access: {trusted_proxies: [10.0.5.300/32]}", "access.trusted_proxies"),
    ("access: {trusted_proxy: [10.0.5.10/32]}", "access.trusted_proxy"),
])
def test_bad_proxy_values_name_their_key(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text + "\n")
    assert info.value.path == path, str(info.value)


def test_the_readme_proxy_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [part.split("```")[0] for part in readme.split("```yaml\n")[1:]]
    [block] = [b for b in blocks if "proxy_protocol: true" in b]
    config = _load(tmp_path, block)
    assert config.listeners[0].proxy_protocol  # type: ignore[attr-defined]
    assert config.access.is_trusted_proxy("10.0.5.10")  # type: ignore[attr-defined]
