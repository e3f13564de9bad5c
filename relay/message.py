"""Prepare a received message once: what the relay sends and what `rules test` shows.

``prepare(raw, ctx, arrival)`` turns the DATA bytes a client sent into a ``PreparedMessage``:

1. the header block is split off first (``relay.headers.header_end``, bare LF allowed) and
   refused with 550 5.6.0 if it holds a bare CR or a NUL;
2. header block and body each get CRLF line endings and lines of at most 998 octets;
3. a Received header is put in front, and Message-ID and Date where the client gave none.

The header block stays in memory (the rules edit it); the body is handed on untouched after
step 2. The line fixes are pure functions of whole lines, so that streaming can apply them to
chunks of the body as they arrive: for pieces cut just after an LF, fixing each piece and
joining the results gives the same bytes as fixing the whole (tests/test_message.py).

The time, queue id and client facts come in through ``MessageContext`` and ``Arrival``, never
from a clock here, so the live listener and `infobip-relay rules test` produce the same bytes
for the same inputs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from relay import __version__
from relay.envelope import MessageContext
from relay.headers import CRLF, MAX_LINE_LENGTH, first_value, header_end
from relay.infobip.priority import priority_value

# Bare CR and bare LF both become CRLF: no line ending other than CRLF ever leaves the relay, so
# no upstream can see a line structure (or an end of data) that the relay did not see.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# RFC 5321 caps a line at 998 octets + CRLF; like Postfix (smtp_line_length_limit) longer lines
# are broken with CRLF + space, which is a valid fold in headers and keeps bodies deliverable.
# A line within the limit has its LF at most this far after the previous line's LF.
LF_REACH = MAX_LINE_LENGTH + 2
# A bare LF and a bare CR. Each starts with a literal, which the regex engine looks for at
# memchr speed: about 40 % less time than three counts, and far less than _BARE_LINE_END
# (its alternation, like a leading look-behind, tests every octet).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_CR_OR_NUL = re.compile(rb"\r(?!\n)|\x00")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
PRIORITY_HEADER = "X-IB-Client-Priority"
HEADER_REFUSAL = "550 5.6.0 Message header contains a bare CR or a NUL character"
# A view of the received bytes when they needed no fix, else the fixed bytes.
Body = bytes | memoryview


class MessageRefused(ValueError):
    """The message cannot be relayed as sent; ``reply`` is the SMTP reply that says why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Arrival:
    """How the message reached the relay, as its Received header records it (RFC 5321 4.4)."""

    hostname: str  # the relay's own name ("by")
    helo: str | None  # the name the client gave in EHLO/HELO, unchecked
    extended: bool = True  # EHLO rather than HELO
    utf8: bool = False  # MAIL FROM had SMTPUTF8
    tls: bool = False


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message as the relay forwards it, split where the rules need it split.

    ``header_block`` is every field, CRLF-terminated, trace fields first, without the blank
    line. ``body`` is the rest: the blank line and the body (``b"\\r\\n" + body``), or ``b""``
    for a message that has no blank line. ``header_block + body`` is what goes upstream.
    """

    header_block: bytes
    body: Body

    @property
    def data(self) -> bytes:
        """The whole message: one copy, made only once the header block is final."""
        return self.header_block + self.body

    @property
    def priority(self) -> int:
        """The spool's sort key for X-IB-Client-Priority (absent or unknown: STANDARD)."""
        return priority_value(self.header(PRIORITY_HEADER))

    def header(self, name: str) -> str | None:
        """The unfolded value of the first ``name`` field, None when there is none."""
        return first_value(self.header_block, name)


def prepare(raw: bytes, ctx: MessageContext, arrival: Arrival) -> PreparedMessage:
    """Prepare DATA as received (unstuffed, any line endings); MessageRefused if it cannot go."""
    end = header_end(raw)
    head = prepare_head(raw[:end], ctx, arrival, last=end == len(raw))
    return PreparedMessage(head, _body(raw, end))


def prepare_head(head: bytes, ctx: MessageContext, arrival: Arrival, *, last: bool) -> bytes:
    """The header block as sent: trace fields added, lines fixed (``last``: no body follows).

    The streaming listener calls this with the header part it kept in memory.
    """
    if _BARE_CR_OR_NUL.search(head):
        # In a header a bare CR would split or hide a field: refused rather than reinterpreted.
        # In the body it is only a line ending, fixed like a bare LF.
        raise MessageRefused(HEADER_REFUSAL)
    head = fix_lines(head, last=last)
    return trace_fields(head, ctx, arrival) + head


def _body(raw: bytes, start: int) -> Body:
    if start == len(raw):
        return b""
    if raw.endswith(CRLF) and not has_bare_line_end(raw, start) and \
            not has_long_line(raw, start):
        # Most mail needs no fix: a view of what was received spares a copy of the message.
        return memoryview(raw)[start:]
    return fix_lines(raw[start:], last=True)


def fix_lines(data: bytes, *, last: bool = False) -> bytes:
    """CRLF line endings and lines of at most 998 octets; ``data`` itself when already so.

    Works on whole lines: pieces of a message cut just after an LF can be fixed one by one,
    the ``last`` piece (the end of the message) getting a CRLF after its last line too.
    """
    data = crlf_line_endings(data)
    if last and data and not data.endswith(CRLF):
        data += CRLF
    return break_long_lines(data)


def has_bare_line_end(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether ``data[start:]`` holds a CR or an LF that is not part of a CRLF."""
    view = memoryview(data)[start:]  # no copy; the look-behind cannot see before ``start``
    return _BARE_LF.search(view) is not None or _BARE_CR.search(view) is not None


def crlf_line_endings(data: bytes | bytearray) -> bytes:
    """Every bare CR and bare LF as CRLF; ``data`` itself (no copy of bytes) when there is
    none."""
    return _BARE_LINE_END.sub(CRLF, data) if has_bare_line_end(data) else bytes(data)


def has_long_line(data: bytes, start: int = 0) -> bool:
    """Whether a line of ``data[start:]`` (CRLF line endings) is over 998 octets."""
    return not lines_fit(data, start=start)


def lines_fit(data: bytes | bytearray, column: int = 0, *, start: int = 0) -> bool:
    """Whether no line of ``data[start:]`` (CRLF line endings) exceeds 998 octets, the first
    continuing a line that has ``column`` octets already (a piece of a streamed body)."""
    if column > MAX_LINE_LENGTH:
        return False
    last_lf = start - 1 - column  # where the current line's LF would have been
    end = len(data)
    while end - last_lf > MAX_LINE_LENGTH + 1:  # what follows the last LF is still too long
        # The farthest LF within reach: one C search per ~1,000 octets rather than per line.
        last_lf = data.rfind(b"\n", max(last_lf + 1, start), last_lf + 1 + LF_REACH)
        if last_lf < 0:
            return False
    return True


def break_long_lines(data: bytes) -> bytes:
    """Lines over 998 octets broken with CRLF + space; ``data`` (CRLF endings) itself if none."""
    if not has_long_line(data):
        return data
    lines = data.split(CRLF)
    for index, line in enumerate(lines):
        if len(line) > MAX_LINE_LENGTH:
            lines[index] = _broken(line)
    return CRLF.join(lines)


def _broken(line: bytes) -> bytes:
    # The first piece keeps 998 octets; each continuation is a space + 997 octets.
    pieces = [line[:MAX_LINE_LENGTH]]
    pieces += [b" " + line[start : start + MAX_LINE_LENGTH - 1]
               for start in range(MAX_LINE_LENGTH, len(line), MAX_LINE_LENGTH - 1)]
    return CRLF.join(pieces)


def trace_fields(head: bytes, ctx: MessageContext, arrival: Arrival) -> bytes:
    """Received, then Message-ID and Date when ``head`` lacks them, as the relay adds them."""
    stamp = _date_field(ctx.received_at.replace(microsecond=0))
    added = received_header(ctx, arrival, stamp)
    if first_value(head, "Message-ID") is None:
        added += f"Message-ID: <{ctx.queue_id}@{arrival.hostname}>\r\n".encode()
    if first_value(head, "Date") is None:
        added += f"Date: {stamp}\r\n".encode()
    return added


@functools.lru_cache(maxsize=4)
def _date_field(moment: datetime) -> str:
    """RFC 5322 date-time of ``moment``: it cost more than the rest of the trace fields, and
    the mail of one second shares it."""
    return format_datetime(moment)


def received_header(ctx: MessageContext, arrival: Arrival, stamp: str) -> bytes:
    """The relay's trace field: client name and address, protocol, queue id and ``stamp``."""
    helo = _UNPRINTABLE.sub("", arrival.helo or "unknown")[:200] or "unknown"
    protocol = with_protocol(extended=arrival.extended, utf8=arrival.utf8, tls=arrival.tls,
                             authenticated=ctx.auth_user is not None)
    return (f"Received: from {helo} ([{ctx.client_ip}])\r\n\tby {arrival.hostname} "
            f"(infobip-relay {__version__}) with {protocol} id {ctx.queue_id};\r\n\t{stamp}\r\n"
            ).encode()


def with_protocol(*, extended: bool, utf8: bool, tls: bool, authenticated: bool) -> str:
    """The Received header's "with" keyword: RFC 3848 (ESMTP[S][A]), RFC 6531 (UTF8SMTP[S][A])."""
    if not extended:
        return "SMTP"  # RFC 3848 registers no TLS or AUTH variant of plain SMTP
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + \
        ("A" if authenticated else "")
