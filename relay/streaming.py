"""DATA as a stream: the wire decoder, the header splitter and the body line fixer.

Each stage keeps only a few bytes of state between chunks, so a message of any size passes
through fixed-size buffers. Fed any split of the same input, the stages give the same bytes as
the whole-message path (``relay.message.prepare``); tests/test_streaming.py checks this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relay.headers import CRLF, MAX_LINE_LENGTH, header_end
from relay.message import LF_REACH, crlf_line_endings, has_bare_line_end, lines_fit
from relay.outgoing import LINE_DOT, find_line_dot

# What the wire reader hands over: the reader's own buffer, not a copy of it.
Octets = bytes | bytearray

_END = b"\r\n.\r\n"
_CRLF_LINES = (b"", b"")  # CRLF.split(CRLF)
# Tails of a chunk that may begin "CRLF ." across the boundary, longest first.
_MAY_BEGIN_DOT_LINE = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
# From this size on a piece is checked with numpy (a few vector passes, about a third of the
# regex searches' time); below it numpy's fixed cost per call is the larger one.
_VECTOR_FROM = 16 * 1024
_CR, _LF = 13, 10
# Half of LF_REACH: when every aligned block this long holds an LF, no two consecutive LFs
# can be more than 2 * 500 - 1 octets apart. Usual mail (lines of ~78) always passes.
_BLOCK = LF_REACH // 2
# A break goes before the octet at these offsets of a line: 998, then every 997 more
# (relay.message._broken: the first piece keeps 998 octets, each continuation 1 + 997).
_FIRST_BREAK = MAX_LINE_LENGTH
_STEP = MAX_LINE_LENGTH - 1


class DataDecoder:
    """SMTP DATA from the wire: finds CRLF.CRLF and undoes the dot-stuffing, chunk by chunk.

    Only a chunk's tail that may begin "CRLF ." (CR, CRLF, CRLF ".", CRLF "." CR) is held
    back for the next chunk; everything before it is handed on. A chunk that neither starts
    nor ends such a sequence, the usual case for a large body, is handed on as it is, not
    copied. Until the first octet is seen a virtual CRLF stands before the data, so that a
    dot on the first line is unstuffed and a lone "." ends an empty message.
    """

    __slots__ = ("_held", "_virtual", "ended", "leftover", "size")

    def __init__(self) -> None:
        self._held: Octets = CRLF  # raw octets not handed on yet; at first the virtual line break
        self._virtual = True  # _held is the virtual CRLF, not message data
        self.size = 0  # raw (stuffed) octets of message data so far, as the size limit counts
        self.ended = False
        self.leftover = b""  # what followed the terminator (pipelined commands)

    def feed(self, chunk: Octets) -> Octets:
        """The unstuffed message data that ``chunk`` completes (maybe b"")."""
        if self._virtual and len(self._held) == 2 and chunk and not chunk.startswith(b"."):
            # No dot at the start: the virtual CRLF can take part in no match.
            self._held, self._virtual = b"", False
        data = self._held + chunk if self._held else chunk
        skip = 2 if self._virtual else 0
        line_dot = find_line_dot(data)
        end = data.find(_END, line_dot) if line_dot >= 0 else -1
        if end >= 0:
            self.ended = True
            self.leftover = bytes(data[end + 5:])
            cut = end + 2  # the terminator's first CRLF ends the last line of the data
        else:
            cut = len(data) - _dot_line_start(data)
        if cut <= skip:  # nothing but (part of) a possible "CRLF ." yet
            self._held = data
            return b""
        self._held, self._virtual = data[cut:], False
        self.size += cut - skip
        out = data if cut == len(data) else data[:cut]
        if 0 <= line_dot < cut - 2:
            out = out.replace(LINE_DOT, CRLF)
        return out[skip:] if skip else out


def _dot_line_start(data: Octets) -> int:
    """How many of ``data``'s last octets may begin "CRLF ." (and so the terminator)."""
    tail = data[-4:]
    for held in _MAY_BEGIN_DOT_LINE:
        if tail.endswith(held):
            return len(held)
    return 0


class HeaderSplitter:
    """Collects the start of the message until the header block's end is known."""

    __slots__ = ("_data", "limit")

    def __init__(self, limit: int) -> None:
        self._data = bytearray()
        self.limit = limit

    def feed(self, data: Octets) -> tuple[bytes, Octets] | None:
        """``(header part, rest)`` once the split is known, else None (data kept)."""
        held = self._data
        if not held and len(data) >= 2:
            # The usual case, the whole header in the first read: that read is split as it
            # is, not copied into the buffer and out again (three copies of up to 256 KiB).
            end = header_end(data)
            if end < len(data) and end <= self.limit:
                return bytes(data[:end]), data[end:]
            held += data
            return None
        # Searched before up to here: a client sending a byte at a time costs linear time.
        start = max(0, len(held) - 2)
        held += data
        if len(held) < 2:
            return None
        end = header_end(held, start)
        if end >= len(held):
            return None  # no blank line yet: the header may still go on
        if end > self.limit:
            return None  # ended, but too long: ``overflowed`` says so, however large the read
        return bytes(held[:end]), bytes(held[end:])

    @property
    def held(self) -> int:
        return len(self._data)

    @property
    def overflowed(self) -> bool:
        return len(self._data) > self.limit

    def finish(self) -> bytes:
        """The whole message when it ended before the split was known: all header."""
        return bytes(self._data)


class BodyFixer:
    """``relay.message.fix_lines(body, last=True)`` applied to the body one piece at a time.

    Keeps a trailing CR back (it may be half of a CRLF in the next piece) and the length of
    the current line, so that breaks fall where the whole-message fixer puts them.
    """

    __slots__ = ("_column", "_cr", "_crlf_end", "_empty")

    def __init__(self) -> None:
        self._cr = False
        self._column = 0  # octets of the current (unbroken) line so far
        self._empty = True
        self._crlf_end = False

    def feed(self, data: Octets) -> Octets:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if not data:
            return data
        if _nothing_to_fix(data, self._column):
            return self._pass(data)  # the usual case
        data = crlf_line_endings(data)
        return self._emit(data, data.split(CRLF))

    def _pass(self, data: Octets) -> Octets:
        """``data`` unchanged; its last line continues the current one."""
        self._empty = False
        self._crlf_end = data.endswith(CRLF)
        last_lf = data.rfind(b"\n")
        self._column = len(data) - last_lf - 1 if last_lf >= 0 else self._column + len(data)
        return data

    def finish(self) -> bytes:
        """The rest: a held CR as a line ending, and a final CRLF when the body lacks one."""
        tail = self._emit(CRLF, _CRLF_LINES) if self._cr else b""
        self._cr = False
        if not self._empty and not self._crlf_end:
            tail += self._emit(CRLF, _CRLF_LINES)
        return tail

    def _emit(self, data: bytes, lines: Sequence[bytes]) -> bytes:
        """``data`` (CRLF line endings only, split into ``lines``) with long lines broken."""
        self._empty = False
        self._crlf_end = data.endswith(CRLF)
        fixed = []
        for index, line in enumerate(lines):
            column = self._column if index == 0 else 0
            fixed.append(_break_from(line, column))
            self._column = column + len(line)
        return CRLF.join(fixed)


def _nothing_to_fix(data: Octets, column: int) -> bool:
    """Whether ``data`` (not empty, no CR at its end) has CRLF line endings only and no line
    over 998 octets, its first line continuing one of ``column`` octets."""
    if len(data) >= _VECTOR_FROM:
        return _nothing_to_fix_vector(data, column)
    return not has_bare_line_end(data) and lines_fit(data, column)


def _nothing_to_fix_vector(data: Octets, column: int) -> bool:
    """``_nothing_to_fix`` for a large piece, in numpy (the piece is not copied)."""
    octets = np.frombuffer(data, np.uint8)
    cr, lf = octets == _CR, octets == _LF
    # Every CR directly followed by an LF and every LF directly preceded by a CR.
    if lf[0] or cr[-1] or not np.array_equal(cr[:-1], lf[1:]):
        return False
    whole = len(data) // _BLOCK * _BLOCK
    if whole and lf[:whole].reshape(-1, _BLOCK).any(axis=1).all():
        # An LF in every block of 500 octets puts consecutive LFs at most 999 apart, within
        # LF_REACH: only the first and the last line need measuring (memchr, no index array).
        first, last = data.find(b"\n"), data.rfind(b"\n")
        return column + first - 1 <= MAX_LINE_LENGTH and \
            len(data) - last - 1 <= MAX_LINE_LENGTH
    ends = np.flatnonzero(lf)
    if ends.size == 0:
        return column + len(data) <= MAX_LINE_LENGTH
    return column + int(ends[0]) - 1 <= MAX_LINE_LENGTH and \
        len(data) - int(ends[-1]) - 1 <= MAX_LINE_LENGTH and \
        (ends.size == 1 or int(np.diff(ends).max()) <= LF_REACH)


def _break_from(segment: bytes, column: int) -> bytes:
    """``segment`` (the line's octets from ``column`` on) with CRLF SP before each break point."""
    end = column + len(segment)
    if end <= MAX_LINE_LENGTH:
        return segment
    point = _FIRST_BREAK if column <= _FIRST_BREAK else \
        _FIRST_BREAK + -(-(column - _FIRST_BREAK) // _STEP) * _STEP
    pieces = []
    start = column
    while point < end:
        pieces.append(segment[start - column:point - column])
        start = point
        point += _STEP
    pieces.append(segment[start - column:])
    return b"\r\n ".join(pieces)
