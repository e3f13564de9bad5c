"""Tests for relay.headers: the raw header-block editor."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.headers import (
    MAX_LINE_LENGTH,
    HeaderBlock,
    first_value,
    format_field,
    header_end,
    is_field_name,
    split,
    unfold_value,
)

MESSAGE = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Foo <foo@example.com>\r\n"
    b"Subject: a folded\r\n"
    b"\tsubject line\r\n"
    b"X-Latin: caf\xe9\r\n"
    b"X-Utf8: \xc3\xa9t\xc3\xa9\r\n"
    b"X-Dup: one\r\n"
    b"X-Dup: two\r\n"
    b"\r\n"
    b"Body: not a header\r\n"
    b"\r\n"
    b".\r\n"
)


def edit(data: bytes, *actions: tuple[str, str, str]) -> bytes:
    block, offset = HeaderBlock.parse(data)
    for action, name, value in actions:
        if action == "set":
            block.set(name, value)
        else:
            block.remove(name)
    return block.to_bytes() + data[offset:]


# --- splitting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "head", "rest"),
    [
        (b"A: 1\r\n\r\nbody", b"A: 1\r\n", b"\r\nbody"),
        (b"A: 1\r\n\r\n", b"A: 1\r\n", b"\r\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", b""),
        (b"A: 1", b"A: 1", b""),
        (b"", b"", b""),
        (b"\r\nbody only\r\n\r\nmore", b"", b"\r\nbody only\r\n\r\nmore"),
        (b"A: 1\r\n\r\nB: 2\r\n\r\n", b"A: 1\r\n", b"\r\nB: 2\r\n\r\n"),
    ],
)
def test_split_puts_blank_line_in_the_rest(data: bytes, head: bytes, rest: bytes) -> None:
    assert split(data) == (head, rest)
    assert header_end(data) == len(head)


def test_unchanged_block_round_trips_exactly() -> None:
    block, offset = HeaderBlock.parse(MESSAGE)
    assert block.to_bytes() + MESSAGE[offset:] == MESSAGE
    assert not block.changed


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_any_bytes_round_trip(data: bytes) -> None:
    block, offset = HeaderBlock.parse(data)
    assert block.to_bytes() + data[offset:] == data
    assert block.original == data[:offset]


# --- reading -------------------------------------------------------------------------------


def test_get_unfolds_and_is_case_insensitive() -> None:
    block, _ = HeaderBlock.parse(MESSAGE)
    assert block.get("subject") == "a folded\tsubject line"
    assert block.get("FROM") == "Foo <foo@example.com>"
    assert block.get("X-Missing") is None


def test_get_decodes_utf8_and_replaces_invalid_bytes() -> None:
    block, _ = HeaderBlock.parse(MESSAGE)
    assert block.get("X-Utf8") == "été"
    assert block.get("X-Latin") == "caf\ufffd"


def test_get_all_and_has() -> None:
    block, _ = HeaderBlock.parse(MESSAGE)
    assert block.get_all("x-dup") == ["one", "two"]
    assert block.get("X-Dup") == "one"
    assert block.get_all("nothing") == []
    assert block.has("x-DUP")
    assert not block.has("Body")  # that line is in the body


def test_lines_that_are_not_fields_are_kept_but_not_matched() -> None:
    data = b"From foo@bar Mon Jan  1 00:00:00 2024\r\n no-field\r\nA: 1\r\n\r\nx"
    block, offset = HeaderBlock.parse(data)
    assert [field.name for field in block.fields()] == ["A"]
    block.set("A", "2")
    assert block.to_bytes() + data[offset:] == data.replace(b"A: 1", b"A: 2")


def test_leading_continuation_line_is_opaque() -> None:
    block, _ = HeaderBlock.parse(b" stray\r\nA: 1\r\n\r\n")
    assert [(field.name, field.value) for field in block.fields()] == [("A", "1")]


def test_whitespace_before_colon_is_accepted() -> None:
    block, _ = HeaderBlock.parse(b"Subject : hi\r\n\r\n")
    assert block.get("Subject") == "hi"


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("X-IB-Track", True),
        ("a!#~", True),
        ("", False),
        ("a b", False),
        ("a:b", False),
        ("é", False),
        ("a\x7f", False),
    ],
)
def test_is_field_name(name: str, valid: bool) -> None:
    assert is_field_name(name) is valid


def test_unfold_value() -> None:
    assert unfold_value(b"A:  x\r\n  y \r\n") == "x  y"


# --- editing -------------------------------------------------------------------------------


def test_set_replaces_first_occurrence_in_place_and_drops_the_rest() -> None:
    result = edit(MESSAGE, ("set", "x-dup", "three"))
    head, rest = split(result)
    assert b"x-dup: three\r\n" in head
    assert b"X-Dup" not in head
    assert head.index(b"x-dup") == MESSAGE.index(b"X-Dup: one")
    assert rest == split(MESSAGE)[1]


def test_set_new_header_goes_at_end_of_block() -> None:
    result = edit(MESSAGE, ("set", "X-New", "v"))
    head, rest = split(result)
    assert head == split(MESSAGE)[0] + b"X-New: v\r\n"
    assert rest == split(MESSAGE)[1]


def test_untouched_folded_and_8bit_fields_keep_their_bytes() -> None:
    result = edit(MESSAGE, ("set", "X-New", "v"), ("remove", "x-dup", ""))
    assert b"Subject: a folded\r\n\tsubject line\r\n" in result
    assert b"X-Latin: caf\xe9\r\n" in result
    assert b"X-Utf8: \xc3\xa9t\xc3\xa9\r\n" in result


def test_remove_glob_counts_and_is_case_insensitive() -> None:
    block, offset = HeaderBlock.parse(MESSAGE)
    assert block.remove("x-*") == 4
    assert block.remove("x-*") == 0
    assert block.to_bytes() + MESSAGE[offset:] == MESSAGE.replace(
        b"X-Latin: caf\xe9\r\nX-Utf8: \xc3\xa9t\xc3\xa9\r\nX-Dup: one\r\nX-Dup: two\r\n", b""
    )


def test_remove_then_set_keeps_the_original_position() -> None:
    block, _ = HeaderBlock.parse(b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    block.remove("B")
    block.set("Z", "new")
    block.set("b", "again")
    assert block.to_bytes() == b"A: 1\r\nb: again\r\nC: 3\r\nZ: new\r\n"


def test_set_to_same_bytes_is_not_a_change() -> None:
    block, _ = HeaderBlock.parse(b"A: 1\r\n\r\n")
    block.set("A", "1")
    assert not block.changed
    block.set("A", "2")
    assert block.changed


def test_add_appends_even_if_present() -> None:
    block, _ = HeaderBlock.parse(b"A: 1\r\n\r\n")
    block.add("A", "2")
    assert block.get_all("a") == ["1", "2"]


def test_replace_and_delete_by_index() -> None:
    block, _ = HeaderBlock.parse(b"A: 1\r\nB: 2\r\n\r\n")
    first, second = block.fields()
    block.replace(first.index, "A", "one")
    block.delete(second.index)
    assert block.to_bytes() == b"A: one\r\n"
    with pytest.raises(IndexError):
        block.delete(second.index)
    with pytest.raises(IndexError):
        block.replace(second.index, "B", "x")


def test_message_without_blank_line_or_final_crlf() -> None:
    data = b"A: 1\r\nB: 2"
    result = edit(data, ("set", "C", "3"))
    assert result == b"A: 1\r\nB: 2\r\nC: 3\r\n"
    assert edit(data, ("set", "B", "x")) == b"A: 1\r\nB: x\r\n"


def test_empty_message_and_body_only_message() -> None:
    assert edit(b"", ("set", "A", "1")) == b"A: 1\r\n"
    assert edit(b"\r\nbody", ("set", "A", "1")) == b"A: 1\r\n\r\nbody"


def test_set_rejects_line_breaks() -> None:
    block, _ = HeaderBlock.parse(b"A: 1\r\n\r\n")
    for bad in ("x\r\nB: injected", "x\ny", "x\0"):
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            block.set("A", bad)


def test_non_ascii_value_is_written_as_utf8() -> None:
    assert format_field("X-Note", "café") == "X-Note: café\r\n".encode()


# --- folding -------------------------------------------------------------------------------


def test_short_values_are_not_folded() -> None:
    value = "word " * 150
    assert format_field("X-A", value.strip()).count(b"\r\n") == 1


def test_long_values_fold_at_whitespace_and_unfold_back() -> None:
    value = " ".join(f"word{i}" for i in range(700))
    raw = format_field("X-Callback", value)
    lines = raw.split(b"\r\n")[:-1]
    assert len(lines) > 1
    assert all(len(line) <= MAX_LINE_LENGTH for line in lines)
    assert all(line[:1] == b" " and line.strip() for line in lines[1:])
    assert unfold_value(raw) == value


def test_value_without_whitespace_stays_on_one_line() -> None:
    value = "x" * 2000
    assert format_field("X-A", value) == f"X-A: {value}\r\n".encode()


@given(
    st.lists(
        st.text(alphabet="ab \t", min_size=1, max_size=40).map(str.strip).filter(bool),
        min_size=1,
        max_size=80,
    )
)
@settings(max_examples=100)
def test_folding_never_changes_the_unfolded_value(words: list[str]) -> None:
    value = " ".join(words * 20)
    raw = format_field("X-Long", value)
    assert unfold_value(raw) == value.strip(" \t")
    for line in raw.split(b"\r\n")[1:-1]:
        assert line[:1] in (b" ", b"\t") and line.strip()


# --- properties ----------------------------------------------------------------------------

NAMES = st.sampled_from(["A", "b", "X-IB-Track", "Subject", "X-Dup", "From"])
VALUES = st.text(
    alphabet=st.characters(exclude_characters="\r\n\0", codec="utf-8"),
    max_size=30,
)
BODIES = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\r\n\r\n", b".\r\n", b"A: 1\r\n", b"From: x\r\n", b"\n"]),
    ),
    max_size=10,
).map(b"".join)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
ACTIONS = st.lists(
    st.tuples(st.sampled_from(["set", "remove"]), st.sampled_from(["A", "x-*", "SUBJECT"]), VALUES),
    max_size=6,
)


def build(headers: list[tuple[str, str]], body: bytes) -> bytes:
    return b"".join(format_field(name, value.strip(" \t")) for name, value in headers) + (
        b"\r\n" + body
    )


@given(HEADERS, BODIES, ACTIONS)
@settings(max_examples=200)
def test_edits_never_touch_the_body_and_are_idempotent(
    headers: list[tuple[str, str]], body: bytes, actions: list[tuple[str, str, str]]
) -> None:
    data = build(headers, body)
    once = edit(data, *actions)
    assert split(once)[1] == b"\r\n" + body
    assert edit(once, *actions) == once


# --- first_value: one field without a full parse -----------------------------------------

FIELD_LINES = st.sampled_from([
    b"Date: d", b"date : lower, obsolete space", b"X-Date: not it", b" folded Date: no",
    b"\tmore", b"garbage line", b"Date:", b"Subject: s", b"DATE: \xc3\xa9", b"dAtE\t : tab",
    b"Dates: longer name", b"Date", b"Date x: not a field of that name",
])


@given(st.lists(FIELD_LINES, max_size=8), st.booleans())
@settings(max_examples=300)
def test_first_value_is_what_a_full_parse_gets(lines: list[bytes], terminated: bool) -> None:
    head = b"\r\n".join(lines) + (b"\r\n" if terminated and lines else b"")
    assert first_value(head, "Date") == HeaderBlock.parse(head)[0].get("Date")


@pytest.mark.parametrize(("head", "value"), [
    (b"Subject: s\r\nDate: Mon,\r\n 1 Jan\r\nX: y\r\n", "Mon, 1 Jan"),
    (b"Subject: s\r\n X-Date: folded into Subject\r\n", None),
    (b"date:   spaced  \r\n", "spaced"),
    (b"Date: last line without CRLF", "last line without CRLF"),
])
def test_first_value(head: bytes, value: str | None) -> None:
    assert first_value(head, "Date") == value
