"""A line-level SMTP client for tests that must see every reply byte, EOF and timeout."""

from __future__ import annotations

import socket
import ssl


class Raw:
    """A line-level SMTP client on a plain socket: sees every reply line, EOF and timeouts."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0,
                 source: str | None = None) -> None:
        self.sock: socket.socket = socket.create_connection(
            address, timeout=timeout, source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def reply(self) -> tuple[int, list[bytes]]:
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(f"connection closed after {lines!r}")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def cmd(self, line: str | bytes) -> tuple[int, list[bytes]]:
        self.send(line.encode() if isinstance(line, str) else line)
        return self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data if data.endswith(b"\n") else data + b"\r\n")

    def up_to_data(self) -> None:
        """Greeting, EHLO, MAIL, RCPT, then DATA answered 354: ready for the message data."""
        self.reply()
        self.cmd("EHLO client.example.com")
        assert self.cmd("MAIL FROM:<app@example.com>")[0] == 250
        assert self.cmd("RCPT TO:<user@example.net>")[0] == 250
        assert self.cmd("DATA")[0] == 354

    def starttls(self, context: ssl.SSLContext) -> None:
        code, lines = self.cmd("STARTTLS")
        assert code == 220, lines
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def at_eof(self) -> bool:
        """True once the server has closed the connection (any further lines are discarded)."""
        try:
            while self.file.readline():
                pass
        except OSError:
            return False
        return True
