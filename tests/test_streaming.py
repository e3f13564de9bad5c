"""Streamed DATA equals the whole-message path for any split of the input (Hypothesis)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import outgoing
from relay.bodyfiles import PARTIAL_SUFFIX
from relay.envelope import MessageContext
from relay.message import (
    Arrival,
    MessageRefused,
    fix_lines,
    has_bare_line_end,
    lines_fit,
    prepare,
    prepare_head,
)
from relay.outgoing import CHUNK, DotStuffer, MessageFile, SpooledBody, find_line_dot
from relay.spool import BODIES_DIR, Spool, SpoolDB, absorb_spool
from relay.streaming import (
    BodyFixer,
    DataDecoder,
    HeaderSplitter,
    _nothing_to_fix_vector,
)

CTX = MessageContext(queue_id="Q1", mail_from="a@b", rcpt_tos=("c@d",), client_ip="192.0.2.1",
                     auth_user=None, listener="l", size=1,
                     received_at=datetime(2026, 1, 1, tzinfo=UTC))
ARRIVAL = Arrival(hostname="relay.test", helo="client")


def whole_read(wire: bytes) -> tuple[bytes, bytes] | None:
    """The oracle: the listener's former whole-message DATA reader (unstuffed data, leftover)."""
    buffer = b"\r\n" + wire
    end = buffer.find(b"\r\n.\r\n")
    if end < 0:
        return None
    data = buffer[2:end + 2]
    if data[:1] == b".":
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n"), buffer[end + 5:]


def whole_prepare(raw: bytes) -> bytes | str:
    try:
        return prepare(raw, CTX, ARRIVAL).data
    except MessageRefused as refusal:
        return refusal.reply


def streamed(chunks: list[bytes]) -> tuple[bytes, bytes | str, int] | None:
    """(leftover, prepared message or refusal, raw size) through the streaming stages."""
    decoder, splitter, fixer = DataDecoder(), HeaderSplitter(1 << 30), BodyFixer()
    head: bytes | None = None
    body = b""
    for index, chunk in enumerate(chunks):
        data = decoder.feed(chunk)
        if head is None:
            split = splitter.feed(data)
            if split is not None:
                head, rest = split
                body += fixer.feed(rest)
        else:
            body += fixer.feed(data)
        if decoder.ended:
            unread = b"".join(chunks[index + 1:])  # left in the reader, as in the listener
            break
    else:
        return None
    last = head is None
    if head is None:
        head = splitter.finish()
    try:
        prepared: bytes | str = prepare_head(head, CTX, ARRIVAL, last=last) + body + \
            fixer.finish()
    except MessageRefused as refusal:
        prepared = refusal.reply
    return decoder.leftover + unread, prepared, decoder.size


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]


# Few distinct octets, so that CR, LF, dots, blank lines and terminators are frequent.
_ATOMS = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.\r\n", b":",
                          b"X: y", b"\x00", b"\xc3\xa9", b" "])
_LONG = st.integers(min_value=990, max_value=3100).map(lambda n: b"x" * n)
wires = st.lists(st.one_of(_ATOMS, _ATOMS, _ATOMS, _LONG), max_size=40).map(b"".join)


def _check(wire: bytes, cuts: list[int]) -> None:
    expected = whole_read(wire)
    result = streamed(split_at(wire, cuts))
    if expected is None:
        assert result is None
        return
    raw, leftover = expected
    assert result is not None
    assert result[0] == leftover
    assert result[1] == whole_prepare(raw)
    # The size limit counts the stuffed data up to and including its last CRLF.
    assert result[2] == (b"\r\n" + wire).find(b"\r\n.\r\n")


@settings(max_examples=400, deadline=None)
@given(wires.map(lambda w: w + b"\r\n.\r\n"), st.lists(st.integers(0, 8000), max_size=12))
def test_any_split_gives_the_whole_message_result(wire: bytes, cuts: list[int]) -> None:
    _check(wire, cuts)


@settings(max_examples=200, deadline=None)
@given(wires, st.lists(st.integers(0, 8000), max_size=12))
def test_any_input_and_split_even_unterminated(wire: bytes, cuts: list[int]) -> None:
    _check(wire, cuts)


@settings(max_examples=100, deadline=None)
@given(wires.map(lambda w: w + b"\r\n.\r\n"))
def test_one_octet_at_a_time(wire: bytes) -> None:
    _check(wire, list(range(len(wire))))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 2100), min_size=1, max_size=8), st.integers(0, 1100))
def test_lines_fit_agrees_with_splitting_every_line(lengths: list[int], column: int) -> None:
    """The fixer's fast check (one search per ~1,000 octets) against the obvious oracle."""
    data = b"\r\n".join(b"x" * length for length in lengths)
    lines = data.split(b"\r\n")
    expected = column + len(lines[0]) <= 998 and all(len(line) <= 998 for line in lines[1:])
    assert lines_fit(data, column) is expected


def test_lines_fit_at_the_limit() -> None:
    for data, column, fits in [(b"x" * 998, 0, True), (b"x" * 999, 0, False),
                               (b"x" * 500, 498, True), (b"x" * 500, 499, False),
                               (b"\r\n" + b"x" * 998 + b"\r\n", 998, True),
                               (b"\r\n", 999, False), (b"", 998, True),
                               (b"x" * 998 + b"\r\n" + b"y" * 998, 0, True),
                               (b"a\r\n" + b"y" * 999 + b"\r\nb", 0, False)]:
        assert lines_fit(data, column) is fits, (len(data), column)


_LINE_ATOMS = st.sampled_from([b"\r\n", b"\r\n", b"\r", b"\n", b"x", b"\n\r", b"\r\r\n"])
_RUNS = st.integers(min_value=1, max_value=1100).map(lambda n: b"y" * n)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(_LINE_ATOMS, _LINE_ATOMS, _RUNS), min_size=1, max_size=30)
       .map(b"".join).filter(lambda d: not d.endswith(b"\r")), st.integers(0, 1000))
def test_the_vector_check_agrees_with_the_regex_check(data: bytes, column: int) -> None:
    """Large pieces are checked with numpy, small ones with regexes: the same verdict."""
    plain = not has_bare_line_end(data) and lines_fit(data, column)
    assert _nothing_to_fix_vector(data, column) is plain


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2100), min_size=1, max_size=40), st.integers(1, 200),
       st.integers(0, 1000), st.integers(0, 4))
def test_the_vector_check_agrees_on_large_pieces(lengths: list[int], repeat: int, column: int,
                                                  flaw: int) -> None:
    """Pieces of 16 KiB and more with lines of any length, seen by the block shortcut (an LF
    in every 500 octets) or the exact path, and maybe a bare CR or LF somewhere."""
    data = b"\r\n".join(b"x" * length for length in lengths * repeat)
    if flaw and data:
        at = (flaw * 7919) % len(data)
        data = data[:at] + (b"\n", b"\r", b"\r\n", b"x")[flaw - 1] + data[at:]
    if not data or data.endswith(b"\r"):
        data += b"x"
    plain = not has_bare_line_end(data) and lines_fit(data, column)
    assert _nothing_to_fix_vector(data, column) is plain


@pytest.mark.parametrize("line", [b"z" * 76, b"z" * 998, b"z" * 999, b"z" * 2500])
@pytest.mark.parametrize("flaw", [b"", b"\n", b"\r", b"\r\r\n"])
def test_large_pieces_fixed_as_the_whole_message_path(line: bytes, flaw: bytes) -> None:
    """Pieces of 64 KiB and more (the numpy path) give what fix_lines gives the whole body."""
    body = (line + b"\r\n") * (300_000 // len(line))
    body = body[:150_001] + flaw + body[150_001:]
    fixer = BodyFixer()
    pieces = [body[start:start + 65_536] for start in range(0, len(body), 65_536)]
    out = b"".join(fixer.feed(piece) for piece in pieces) + fixer.finish()
    assert out == fix_lines(body, last=True)


_DOTTY = st.lists(st.sampled_from([b".", b"..", b"a.", b"\r", b"\n", b"\r\n", b"\r\n.", b"x"]),
                 max_size=120).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_DOTTY)
def test_the_dot_scan_finds_what_a_search_finds(data: bytes) -> None:
    """Dots checked one by one, then a search: the same answer as the search alone, with
    fewer or more dots than are checked one by one before a line-starting one."""
    assert find_line_dot(data) == data.find(b"\r\n.")


@pytest.mark.parametrize(("data", "expected"), [
    (b"", -1), (b".", -1), (b"\r\n.", 0), (b"\n.\r\n.", 2), (b"a.b\r\n.", 3),
    (b"a." * 31 + b"\r\n.", 62), (b"a." * 32 + b"\r\n.", 64), (b"a." * 33 + b"\r\n.", 66),
    (b"a." * 40, -1), (b"X-Id: <1.2.3@x>\r\n\r\n" + b"X" * 5000, -1),
])
def test_the_dot_scan_known_cases(data: bytes, expected: int) -> None:
    assert find_line_dot(data) == expected


def test_known_cases() -> None:
    for wire in [b".\r\n", b"..\r\n.\r\n", b"a\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n",
                 b"a: b\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n", b"a\n\nb\rc\r\n.\r\nQUIT\r\n"]:
        for size in (1, 2, 3, 5, 997, 998, 999, 4096):
            _check(wire, list(range(size, len(wire), size)))


def test_partial_bodies_are_removed_at_start(tmp_path: Path) -> None:
    """A body left half-received by a crash or a disconnect mid-DATA was never acknowledged."""
    SpoolDB(tmp_path).close()
    bodies = tmp_path / BODIES_DIR
    bodies.mkdir(exist_ok=True)
    (bodies / f"0123ABC{PARTIAL_SUFFIX}").write_bytes(b"half a body")
    spool = Spool(tmp_path)
    spool.db.close()
    assert list(bodies.iterdir()) == []


def whole_stuff(data: bytes) -> bytes:
    """The oracle: the upstream's former whole-message dot-stuffing (relay.upstream._data)."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def stuffed(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.finish()


@settings(max_examples=400, deadline=None)
@given(wires, st.lists(st.integers(0, 8000), max_size=12))
def test_dot_stuffing_any_split_equals_the_whole_message(data: bytes, cuts: list[int]) -> None:
    assert stuffed(split_at(data, cuts)) == whole_stuff(data)
    assert stuffed(split_at(data, list(range(len(data))))) == whole_stuff(data)


def test_dot_stuffing_known_cases() -> None:
    for data in [b"", b".", b"\r\n", b".\r\n", b"a\r\n.\r\n.", b"\r", b"\n."]:
        for size in (1, 2, 3):
            assert stuffed(split_at(data, list(range(size, len(data), size)))) == \
                whole_stuff(data)


@pytest.mark.parametrize("cached", [True, False], ids=["page-cache-on-loop", "thread"])
def test_a_message_file_is_read_in_chunks_from_its_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """Read on the loop when the page cache has it (RWF_NOWAIT), else in a thread: the same."""
    if not cached:
        monkeypatch.setattr(outgoing, "_NOWAIT", None)
    else:
        with open(__file__, "rb") as source:
            assert outgoing._read_cached(source.fileno(), 0) is not None
    path = tmp_path / "body"
    data = bytes(range(256)) * 4099
    path.write_bytes(data)
    message = MessageFile(path.open("rb"), len(data))

    async def read() -> list[bytes | bytearray]:
        return [chunk async for chunk in message.chunks()]

    try:
        for _ in range(2):  # a retry reads it again from the start
            chunks = asyncio.run(read())
            assert b"".join(chunks) == data
            assert max(len(chunk) for chunk in chunks) <= CHUNK
    finally:
        message.close()


def test_a_header_sent_one_octet_at_a_time_costs_linear_time() -> None:
    """Each piece is searched once: 200 KiB of header in 1-octet reads is not quadratic."""
    header = b"X-Filler: " + b"v" * 100 + b"\r\n"
    data = header * (200 * 1024 // len(header)) + b"\r\nbody\r\n"
    splitter = HeaderSplitter(256 * 1024)
    started = time.monotonic()
    split = None
    for index in range(len(data)):
        split = splitter.feed(data[index:index + 1])
        if split is not None:
            break
    assert split is not None and split[0] + split[1] == data[:index + 1]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("piece", [1000, 64 * 1024, 1 << 20])
def test_a_header_over_the_limit_overflows_in_reads_of_any_size(piece: int) -> None:
    """The limit holds even when the whole header, blank line and all, comes in one read."""
    data = b"X-Filler: " + b"v" * 100 + b"\r\n"
    data = data * (300 * 1024 // len(data)) + b"\r\nbody\r\n"
    splitter = HeaderSplitter(256 * 1024)
    results = [splitter.feed(data[start:start + piece]) for start in range(0, len(data), piece)]
    assert results == [None] * len(results)
    assert splitter.overflowed


def test_absorbing_a_worker_spool_removes_its_partial_bodies(tmp_path: Path) -> None:
    SpoolDB(tmp_path / "worker-1").close()
    bodies = tmp_path / "worker-1" / BODIES_DIR
    bodies.mkdir(exist_ok=True)
    (bodies / f"0123ABC{PARTIAL_SUFFIX}").write_bytes(b"half a body")
    target = SpoolDB(tmp_path / "main")
    assert absorb_spool(target, tmp_path / "worker-1") == 0
    target.close()
    assert list(bodies.iterdir()) == []


def test_a_spooled_body_opens_as_the_message_or_not_at_all(tmp_path: Path) -> None:
    """What the listener hands the delivery for a streamed message: opened (by the upstream
    session), the head then the file; once the file is gone (the message deleted meanwhile),
    FileNotFoundError."""
    path = tmp_path / "BODY"
    path.write_bytes(b"body\r\n")
    spooled = SpooledBody(b"Subject: s\r\n\r\n", path, 20)

    async def read(message: MessageFile) -> bytes:
        return b"".join([bytes(chunk) async for chunk in message.chunks()])

    opened = spooled.open()
    try:
        assert opened.size == 20
        assert asyncio.run(read(opened)) == b"Subject: s\r\n\r\nbody\r\n"
    finally:
        opened.close()
    path.unlink()
    with pytest.raises(FileNotFoundError):
        spooled.open()
