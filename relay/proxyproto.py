"""PROXY protocol v1 and v2 headers (HAProxy's spec, proxy-protocol.txt): parse and read.

A proxy in front of the relay (HAProxy, a Kubernetes or cloud load balancer) opens each TCP
connection with one header that names the client it accepted. The parser is pure and
incremental; `read_header` takes exactly the header's octets off a socket, no more, so that
whatever follows (a TLS ClientHello, or SMTP) stays in the kernel for the real protocol.

aiosmtpd has PROXY support of its own, but it reads the header inside the SMTP protocol: after
an implicit-TLS handshake, and after the relay's per-client accounting has seen the proxy's
address. Both must come after the header here, so it is read before either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Literal

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The spec's bound for a v1 line, CRLF included ("PROXY UNKNOWN ffff:...:ffff ... 65535\r\n").
V1_MAX = 107
# The shortest v1 line is "PROXY UNKNOWN\r\n": never ask for more before knowing the version.
_V1_MIN = 15
_V2_FIXED = 16
# Address block plus TLVs. The spec allows 64 KiB; HAProxy's own TLVs (ALPN, authority, SSL,
# unique id) fit in a few hundred octets, and a bound keeps a proxy from holding memory.
V2_MAX_PAYLOAD = 2048
HEADER_TIMEOUT = 5.0

_V2_COMMANDS = {0x20: "LOCAL", 0x21: "PROXY"}
# family/transport byte -> (address length in the block, struct format); UNSPEC and AF_UNIX
# carry no IP address, so they mean "use the connection's own endpoints" (as v1 UNKNOWN).
_V2_INET = {0x11: (12, "!4s4sHH"), 0x12: (12, "!4s4sHH"),
            0x21: (36, "!16s16sHH"), 0x22: (36, "!16s16sHH")}
_V2_NO_ADDRESS = {0x00: 0, 0x31: 216, 0x32: 216}
# Decimal without leading zeros, as the spec requires for v1 ports.
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

Kind = Literal["proxy", "local", "unknown"]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why, for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a header said.

    ``kind`` is "proxy" (addresses carried), "local" (the proxy's own connection, e.g. a health
    check: no client behind it) or "unknown" (a client whose address the proxy could not
    express, v1 UNKNOWN or a v2 UNSPEC/UNIX family: the spec says to use the real endpoints).
    """

    version: int
    kind: Kind
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


class ProxyHeaderParser:
    """Feed octets as they arrive; `feed` returns the header once complete.

    Never holds more than one header's maximum size. ``wanted`` is how many further octets can
    belong to the header, so a reader asking for no more than that never takes bytes past it;
    octets fed beyond the header's end are kept in ``rest``, not lost.
    """

    __slots__ = ("_buffer", "_done", "rest")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False
        self.rest = b""

    @property
    def wanted(self) -> int:
        """The most octets that cannot go past the end of the header (0 once it is parsed)."""
        buffer = self._buffer
        if self._done:
            return 0
        if buffer[:1] == b"\r":
            if len(buffer) < _V2_FIXED:
                return _V2_FIXED - len(buffer)
            return _V2_FIXED + _v2_length(buffer) - len(buffer)
        if len(buffer) < _V1_MIN:
            return _V1_MIN - len(buffer)
        # The line may end with the next CRLF: one octet if the CR is already here.
        return min(1 if buffer.endswith(b"\r") else 2, V1_MAX - len(buffer))

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self._done:
            raise ProxyHeaderError("header already complete")
        view = memoryview(data)
        while view:
            take = self._room(view)
            self._buffer += view[:take]
            view = view[take:]
            header = self._parse()
            if header is not None:
                self._done = True
                self.rest = bytes(view)
                self._buffer = bytearray()
                return header
        return None

    def _room(self, data: memoryview) -> int:
        """How many of ``data``'s octets belong to the header, as far as can be told yet."""
        buffer = self._buffer
        if bytes((buffer or data)[:1]) == b"\r":
            if len(buffer) < _V2_FIXED:
                return _V2_FIXED - len(buffer)
            return _V2_FIXED + _v2_length(buffer) - len(buffer)
        newline = bytes(data[:V1_MAX]).find(b"\n")  # a v1 line ends at its first LF
        limit = V1_MAX - len(buffer)
        return limit if newline < 0 else min(limit, newline + 1)

    def _parse(self) -> ProxyHeader | None:
        buffer = bytes(self._buffer)
        if buffer[:1] == b"\r":
            return _parse_v2(buffer)
        return _parse_v1(buffer)


def _v2_length(buffer: bytes | bytearray) -> int:
    return int.from_bytes(buffer[14:16], "big")


def _parse_v1(buffer: bytes) -> ProxyHeader | None:
    prefix = buffer[:len(V1_PREFIX)]
    if prefix != V1_PREFIX[:len(prefix)]:
        raise ProxyHeaderError(f"not a PROXY header (starts {buffer[:16]!r})")
    end = buffer.find(b"\n")
    if b"\r" in buffer[:(len(buffer) if end < 0 else end) - 1]:
        raise ProxyHeaderError("PROXY v1 line has a CR not followed by LF")
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} octets")
        return None
    if buffer[end - 1:end] != b"\r":
        raise ProxyHeaderError("PROXY v1 line does not end with CRLF")
    return _v1_fields(buffer[len(V1_PREFIX):end - 1])


def _v1_fields(line: bytes) -> ProxyHeader:
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "unknown")  # the spec: ignore whatever follows UNKNOWN
    fields = line.split(b" ")
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 expects TCP4|TCP6|UNKNOWN and four fields, got "
                               f"{line[:60]!r}")
    version = 4 if fields[0] == b"TCP4" else 6
    source = (_v1_address(fields[1], version), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], version), _v1_port(fields[4]))
    return ProxyHeader(1, "proxy", source, destination)


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"PROXY v1 address is not an IP address: {text[:45]!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1 TCP{version} with an IPv{address.version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 port out of range or malformed: {text[:8]!r}")
    return int(text)


def _parse_v2(buffer: bytes) -> ProxyHeader | None:
    signature = buffer[:len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[:len(signature)]:
        raise ProxyHeaderError("not a PROXY header (bad v2 signature)")
    if len(buffer) < _V2_FIXED:
        return None
    command = _V2_COMMANDS.get(buffer[12])
    if command is None:
        raise ProxyHeaderError(f"PROXY v2 with an unknown version/command byte 0x{buffer[12]:02x}")
    length = _v2_length(buffer)
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {length} octets is over the limit of "
                               f"{V2_MAX_PAYLOAD}")
    if len(buffer) < _V2_FIXED + length:
        return None
    payload = buffer[_V2_FIXED:]
    if command == "LOCAL":
        return ProxyHeader(2, "local")  # address block and TLVs are to be ignored
    return _v2_addresses(buffer[13], payload)


def _v2_addresses(family: int, payload: bytes) -> ProxyHeader:
    if family in _V2_NO_ADDRESS:
        if len(payload) < _V2_NO_ADDRESS[family]:
            raise ProxyHeaderError("PROXY v2 address block shorter than its family needs")
        return ProxyHeader(2, "unknown")
    if family not in _V2_INET:
        raise ProxyHeaderError(f"PROXY v2 with an unknown family/transport byte 0x{family:02x}")
    size, layout = _V2_INET[family]
    if len(payload) < size:
        raise ProxyHeaderError("PROXY v2 address block shorter than its family needs")
    # Whatever follows the address block is TLVs (ALPN, authority, SSL...): not needed here.
    src, dst, src_port, dst_port = struct.unpack(layout, payload[:size])
    return ProxyHeader(2, "proxy", (str(ipaddress.ip_address(src)), src_port),
                       (str(ipaddress.ip_address(dst)), dst_port))


# --------------------------------------------------------------------------- reading a socket


async def read_header(sock: socket.socket) -> ProxyHeader:
    """Take one PROXY header off non-blocking ``sock``, leaving every later octet unread.

    Peeks, lets the parser say how much of what is there is header, and consumes exactly that.
    Raises ProxyHeaderError for a malformed header or a connection closed before its end; the
    caller bounds the time (HEADER_TIMEOUT).
    """
    loop = asyncio.get_running_loop()
    parser = ProxyHeaderParser()
    while True:
        # Peeking past the header is harmless (only the header's part is consumed below) and
        # takes a whole v1 line at once, where `wanted` would go two octets at a time.
        peeked = await _peek(loop, sock, max(parser.wanted, V1_MAX))
        if not peeked:
            raise ProxyHeaderError("connection closed before a complete PROXY header")
        header = parser.feed(peeked)
        # Those octets are already in the socket's buffer: this recv does not wait.
        sock.recv(len(peeked) - len(parser.rest))
        if header is not None:
            return header


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
