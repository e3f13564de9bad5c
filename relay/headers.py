"""Edit the raw RFC 5322 header block of a message without touching anything else.

This runs for every relayed message, so it works on bytes and never uses the ``email``
package: the header block is split into fields once, fields nobody edits keep their exact
bytes (folding, 8-bit and UTF-8 included) and the body is never parsed.

Layout: ``HeaderBlock.parse(data)`` returns the block and ``offset``, the index in ``data``
where the header block ends.  ``data[offset:]`` is the blank separator line followed by the
body (``b"\\r\\n" + body``), or ``b""`` when the message has no blank line, in which case the
whole message is headers.  ``block.to_bytes() + data[offset:]`` is the edited message.
``header_end`` is the one place that finds that offset: relay.message uses it on the bytes as
received (bare LF allowed), the editor on the prepared CRLF message.

New headers are appended at the end of the header block (just before the blank line).  A
header that is set again replaces its first occurrence in place and drops the others.  A
header that was removed and is then set again during the same edit returns to the position
it was removed from, so "remove, then set" replaces in place and editing is idempotent.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

CRLF = b"\r\n"
# RFC 5322 section 2.1.1: a line must not exceed 998 characters excluding the CRLF.
MAX_LINE_LENGTH = 998
_WSP = b" \t"
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# The end of a line followed by an empty one; "\r?" admits CRLF and bare LF in any mix.
_BLANK_LINE = re.compile(rb"\n\r?\n")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One live field of a block: ``index`` is its position for ``replace``/``delete``."""

    index: int
    name: str
    value: str


@dataclass(slots=True)
class _Field:
    # ``lname`` is None for a line that is not a header field (garbage, an mbox "From "
    # line): it is kept byte for byte but can never be matched or edited.
    lname: str | None
    name: str
    raw: bytes


def header_end(data: bytes | bytearray, start: int = 0) -> int:
    """Return the offset where the header block ends (see the module docstring).

    Any mix of CRLF and bare LF line endings is understood, so that the listener can split a
    message before it fixes line endings; on CRLF data this is the first CRLF CRLF + 2. The
    block never includes the blank line: ``data[offset:]`` starts with it. ``start``: where
    the blank line may begin at the earliest (data before it was searched already).
    """
    if data[:1] == b"\n" or data[:2] == CRLF:
        return 0  # a blank first line: no header at all
    match = _BLANK_LINE.search(data, start)
    return match.start() + 1 if match else len(data)


def split(data: bytes) -> tuple[bytes, bytes]:
    """Return ``(header block, rest)``; ``rest`` starts with the blank line, if any."""
    offset = header_end(data)
    return data[:offset], data[offset:]


def is_field_name(name: str) -> bool:
    """Whether ``name`` is a valid RFC 5322 field name (printable ASCII except ':')."""
    return name.isascii() and _FIELD_NAME.fullmatch(name.encode("ascii")) is not None


def format_field(name: str, value: str) -> bytes:
    """Encode ``name: value`` as a CRLF-terminated field, folded at whitespace if too long.

    Non-ASCII values are written as UTF-8 (RFC 6532).  A value with no whitespace to fold at
    stays on one long line: folding elsewhere would change the value.
    """
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"header {name} value must not contain CR, LF or NUL")
    line = f"{name}: {value}".encode("utf-8", "surrogateescape")
    if len(line) <= MAX_LINE_LENGTH:
        return line + CRLF
    return CRLF.join(_fold(line, len(name) + 2)) + CRLF


def _fold(line: bytes, value_start: int) -> list[bytes]:
    pieces: list[bytes] = []
    start = 0
    while len(line) - start > MAX_LINE_LENGTH:
        cut = _fold_point(line, max(start + 1, value_start), start + MAX_LINE_LENGTH)
        if cut < 0:
            break
        pieces.append(line[start:cut])
        start = cut
    pieces.append(line[start:])
    return pieces


def _fold_point(line: bytes, low: int, high: int) -> int:
    """Last whitespace in ``line[low:high+1]`` that follows a non-whitespace byte.

    Falls back to the first such whitespace after ``high`` (an overlong line still beats an
    unfoldable one); -1 when there is none.  Folding only there keeps every line non-blank.
    """
    for pos in range(min(high, len(line) - 1), low - 1, -1):
        if line[pos] in _WSP and line[pos - 1] not in _WSP:
            return pos
    for pos in range(high + 1, len(line)):
        if line[pos] in _WSP and line[pos - 1] not in _WSP:
            return pos
    return -1


def first_value(head: bytes, name: str) -> str | None:
    """``HeaderBlock.parse(head)[0].get(name)`` without parsing every field of ``head``.

    The listener reads a few fields of every message (Message-ID, Date, the priority): a
    search for one name costs a fraction of a full parse. ``head`` is a CRLF header block.
    """
    found = _field_start(head, name.lower().encode("ascii"))
    if found is None:
        return None
    start, value = found
    return unfold_value(head[start : _field_stop(head, value)])


_AFTER_NAME = re.compile(rb"[ \t]*:")


def _field_start(head: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the first field called ``name`` (lower case) starts, and where its value does.

    At a line start (never a continuation line, which starts with WSP); RFC 5322's obsolete
    syntax allows WSP before the colon, as _parse_field does. A find in the lowered block, not
    a case-insensitive regex search, which tries every octet: three of these a message.
    """
    lowered = head.lower()
    at = 0 if lowered.startswith(name) else _line_start(lowered, name, 0)
    while at >= 0:
        colon = _AFTER_NAME.match(head, at + len(name))
        if colon is not None:
            return at, colon.end()
        at = _line_start(lowered, name, at + 1)
    return None


def _line_start(lowered: bytes, name: bytes, start: int) -> int:
    """The next line from ``start`` on that begins with ``name``, or -1."""
    at = lowered.find(b"\n" + name, max(start - 1, 0))
    return at + 1 if at >= 0 else -1


def _field_stop(head: bytes, start: int) -> int:
    """Where the field whose value starts at ``start`` ends: after its last continuation line."""
    while True:
        end = head.find(CRLF, start)
        if end < 0:
            return len(head)
        start = end + 2
        if head[start : start + 1] not in (b" ", b"\t"):
            return start


def unfold_value(raw: bytes) -> str:
    """Value of a raw field (``Name: value\\r\\n``), unfolded, stripped, decoded leniently."""
    colon = raw.find(b":")
    value = raw[colon + 1 :].replace(CRLF, b"").strip(b" \t\r\n")
    return value.decode("utf-8", "replace")


@lru_cache(maxsize=256)
def _glob_matcher(glob: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(glob.lower()))


def _parse_field(lines: list[bytes]) -> _Field:
    raw = CRLF.join(lines)
    first = lines[0]
    colon = first.find(b":")
    if colon > 0 and first[0] not in _WSP:
        name_bytes = first[:colon].rstrip(_WSP)  # RFC 5322 obsolete syntax allows WSP here
        if _FIELD_NAME.fullmatch(name_bytes):
            name = name_bytes.decode("ascii")
            return _Field(name.lower(), name, raw)
    return _Field(None, "", raw)


class HeaderBlock:
    """The header fields of one message, editable in place; see the module docstring."""

    __slots__ = ("_fields", "_original", "_removed")

    def __init__(self, fields: list[_Field], original: bytes) -> None:
        self._fields: list[_Field | None] = list(fields)
        self._original = original
        # lower name -> position of the first occurrence removed during this edit
        self._removed: dict[str, int] = {}

    @classmethod
    def parse(cls, data: bytes) -> tuple[HeaderBlock, int]:
        """Split ``data`` into its header block and the offset where the rest begins."""
        offset = header_end(data)
        head = data[:offset]
        return cls(_parse_fields(head), head), offset

    @property
    def original(self) -> bytes:
        """The header block exactly as parsed."""
        return self._original

    @property
    def changed(self) -> bool:
        """Whether ``to_bytes()`` differs from the block as parsed."""
        return self.to_bytes() != self._original

    def get(self, name: str) -> str | None:
        """Unfolded value of the first ``name`` field, or None if there is none."""
        lname = name.lower()
        for field in self._fields:
            if field is not None and field.lname == lname:
                return unfold_value(field.raw)
        return None

    def get_all(self, name: str) -> list[str]:
        """Unfolded values of every ``name`` field, in message order."""
        lname = name.lower()
        return [
            unfold_value(field.raw)
            for field in self._fields
            if field is not None and field.lname == lname
        ]

    def has(self, name: str) -> bool:
        """Whether at least one ``name`` field is present."""
        lname = name.lower()
        return any(field is not None and field.lname == lname for field in self._fields)

    def fields(self, named: Callable[[str], bool] | None = None) -> list[HeaderField]:
        """Every live header field (non-header lines excluded) with its position; with
        ``named``, only those whose name it accepts (the others' values are not unfolded)."""
        return [
            HeaderField(index, field.name, unfold_value(field.raw))
            for index, field in enumerate(self._fields)
            if field is not None and field.lname is not None
            and (named is None or named(field.name))
        ]

    def set(self, name: str, value: str) -> None:
        """Make ``value`` the only ``name`` field, in place of the first occurrence."""
        self.set_field(name, format_field(name, value))

    def set_field(self, name: str, raw: bytes) -> None:
        """``set`` with a field formatted elsewhere (``Name: value``, folded, CRLF-ended).

        For values that need the email package's structured encoding (an RFC 2047 display
        name); the caller keeps every line within 998 octets.
        """
        if not raw.endswith(CRLF) or b"\r" in raw.replace(CRLF, b"") or \
                b"\n" in raw.replace(CRLF, b"") or not raw.lower().startswith(
                    name.lower().encode("ascii") + b":"):
            raise ValueError(f"not a CRLF-terminated {name} field")
        lname = name.lower()
        positions = self._positions(lname)
        if positions:
            self._fields[positions[0]] = _Field(lname, name, raw)
            for position in positions[1:]:
                self._delete(position)
        elif lname in self._removed:
            self._fields[self._removed.pop(lname)] = _Field(lname, name, raw)
        else:
            self._fields.append(_Field(lname, name, raw))

    def add(self, name: str, value: str) -> None:
        """Append a ``name`` field even if one exists (for trace-like headers)."""
        self._fields.append(_Field(name.lower(), name, format_field(name, value)))

    def replace(self, index: int, name: str, value: str) -> None:
        """Rewrite the field at ``index`` (from ``fields()``) keeping its position."""
        if self._fields[index] is None:
            raise IndexError(f"header field {index} was deleted")
        self._fields[index] = _Field(name.lower(), name, format_field(name, value))

    def delete(self, index: int) -> None:
        """Remove the field at ``index`` (from ``fields()``)."""
        if self._fields[index] is None:
            raise IndexError(f"header field {index} was deleted")
        self._delete(index)

    def remove(self, name_glob: str) -> int:
        """Remove every field whose name matches the case-insensitive glob; return how many."""
        matcher = _glob_matcher(name_glob)
        removed = 0
        for index, field in enumerate(self._fields):
            if field is not None and field.lname is not None and matcher.match(field.lname):
                self._delete(index)
                removed += 1
        return removed

    def to_bytes(self) -> bytes:
        """The header block, each field CRLF-terminated except an unterminated last line."""
        live = [field.raw for field in self._fields if field is not None]
        # Only the message's last line can lack its CRLF (a message without a blank line);
        # it needs one as soon as a field is appended after it.
        for position in range(len(live) - 1):
            if not live[position].endswith(CRLF):
                live[position] += CRLF
        return b"".join(live)

    def _positions(self, lname: str) -> list[int]:
        return [
            index
            for index, field in enumerate(self._fields)
            if field is not None and field.lname == lname
        ]

    def _delete(self, index: int) -> None:
        field = self._fields[index]
        if field is not None and field.lname is not None:
            previous = self._removed.get(field.lname, index)
            self._removed[field.lname] = min(previous, index)
        self._fields[index] = None


def _parse_fields(head: bytes) -> list[_Field]:
    if not head:
        return []
    lines = head.split(CRLF)
    if lines[-1] == b"":
        lines.pop()  # the CRLF that ends the last field
        terminated = True
    else:
        terminated = False
    groups: list[list[bytes]] = []
    for line in lines:
        if groups and line[:1] in (b" ", b"\t"):
            groups[-1].append(line)
        else:
            groups.append([line])
    fields = [_parse_field(group) for group in groups]
    for field in fields:
        field.raw += CRLF
    if not terminated:
        fields[-1].raw = fields[-1].raw[:-2]
    return fields
