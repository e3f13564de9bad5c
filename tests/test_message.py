"""Tests for relay.message: one preparation of a message, for the listener and `rules test`.

Table tests for the pure functions, then the property that the split preparation gives the
bytes the former whole-message preparation gave, then the live relay and `rules test` agreeing.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from relayrunner import send_raw

from relay import __version__
from relay.cli import main, rules_test_report
from relay.envelope import MessageContext
from relay.headers import header_end
from relay.infobip.priority import PRIORITIES
from relay.message import (
    HEADER_REFUSAL,
    Arrival,
    MessageRefused,
    PreparedMessage,
    break_long_lines,
    crlf_line_endings,
    fix_lines,
    has_bare_line_end,
    has_long_line,
    prepare,
    with_protocol,
)

WHEN = datetime(2024, 3, 1, 12, 30, 45, tzinfo=UTC)
CTX = MessageContext(queue_id="Q1", mail_from="app@example.com", rcpt_tos=("u@example.net",),
                     client_ip="192.0.2.7", auth_user=None, listener="local", size=0,
                     received_at=WHEN)
ARRIVAL = Arrival(hostname="relay.example.com", helo="client.example.com")
RECEIVED = (b"Received: from client.example.com ([192.0.2.7])\r\n\tby relay.example.com "
            b"(infobip-relay " + __version__.encode() + b") with ESMTP id Q1;\r\n"
            b"\tFri, 01 Mar 2024 12:30:45 +0000\r\n")
MESSAGE_ID = b"Message-ID: <Q1@relay.example.com>\r\n"
DATE = b"Date: Fri, 01 Mar 2024 12:30:45 +0000\r\n"
TRACE = RECEIVED + MESSAGE_ID + DATE


# --- line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "fixed"), [
    (b"", b""),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n"),  # bare LF
    (b"a\rb\r", b"a\r\nb\r\n"),  # bare CR
    (b"a\r\nb\nc\rd\r\n", b"a\r\nb\r\nc\r\nd\r\n"),  # mixed
    (b"a\r\r\nb", b"a\r\n\r\nb"),  # CR before a CRLF
    (b"a\n\rb", b"a\r\n\r\nb"),  # LF CR is two line ends, not one
    (b"\n", b"\r\n"),
    (b"\r", b"\r\n"),
])
def test_crlf_line_endings(raw: bytes, fixed: bytes) -> None:
    assert crlf_line_endings(raw) == fixed


def test_clean_data_is_returned_without_a_copy() -> None:
    data = b"A: 1\r\n\r\n" + b"x" * 998 + b"\r\n"
    assert fix_lines(data) is data


# A cut just after an LF is a line boundary: pieces fixed one by one join to the whole fixed.
CHUNKED = b"A: 1\nB: 2\r\n\nbody\rline\r\n" + b"y" * 1200 + b"\nend\n"


@pytest.mark.parametrize("cut", [index + 1 for index, byte in enumerate(CHUNKED)
                                 if byte == ord("\n")])
def test_line_fixes_apply_chunk_by_chunk_at_line_ends(cut: int) -> None:
    assert fix_lines(CHUNKED[:cut]) + fix_lines(CHUNKED[cut:]) == fix_lines(CHUNKED)


@pytest.mark.parametrize(("first", "second", "same"), [
    (b"a\r\n", b"b\r\n", True),  # after the LF of a CRLF
    (b"a\n", b"\rb", True),  # after a bare LF, before a bare CR
    (b"a\r", b"\nb", False),  # inside a CRLF: each half alone sees a bare CR, then a bare LF
])
def test_chunk_edges_must_follow_an_lf(first: bytes, second: bytes, same: bool) -> None:
    joined = crlf_line_endings(first) + crlf_line_endings(second)
    assert (joined == crlf_line_endings(first + second)) is same


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"x" * 600]), max_size=20),
       st.data())
@settings(max_examples=200)
def test_any_cut_after_an_lf_gives_the_same_bytes(pieces: list[bytes], data: st.DataObject
                                                  ) -> None:
    whole = b"".join(pieces)
    cuts = [index + 1 for index, byte in enumerate(whole) if byte == ord("\n")]
    cut = data.draw(st.sampled_from(cuts)) if cuts else 0
    assert fix_lines(whole[:cut]) + fix_lines(whole[cut:], last=True) == \
        fix_lines(whole, last=True)


# --- long lines ----------------------------------------------------------------------------


def pieces_of(length: int) -> bytes:
    """A line of ``length`` z's as the relay breaks it: 998, then space + 997 at a time."""
    line = b"z" * length
    rest = [b" " + line[start:start + 997] for start in range(998, length, 997)]
    return b"\r\n".join([line[:998], *rest])


@pytest.mark.parametrize(("line", "expected"), [
    (b"z" * 998, b"z" * 998),
    (b"z" * 999, b"z" * 998 + b"\r\n z"),
    (b"z" * 1995, b"z" * 998 + b"\r\n " + b"z" * 997),
    (b"z" * 1996, b"z" * 998 + b"\r\n " + b"z" * 997 + b"\r\n z"),
    (b"z" * 5000, pieces_of(5000)),
])
def test_long_lines_are_broken_with_crlf_space(line: bytes, expected: bytes) -> None:
    assert break_long_lines(b"a\r\n" + line + b"\r\nb\r\n") == b"a\r\n" + expected + b"\r\nb\r\n"
    assert break_long_lines(line + b"\r\n") == expected + b"\r\n"  # the first line
    assert break_long_lines(line) == expected  # the last line, without CRLF
    assert all(len(part) <= 998 for part in break_long_lines(line).split(b"\r\n"))


@pytest.mark.parametrize(("data", "start", "long"), [
    (b"", 0, False),
    (b"z" * 998 + b"\r\n", 0, False),
    (b"z" * 999 + b"\r\n", 0, True),
    (b"z" * 998, 0, False),
    (b"z" * 999, 0, True),
    (b"a\r\n" + b"z" * 999 + b"\r\nb\r\n", 0, True),
    (b"a\r\n" + b"z" * 998 + b"\r\nb\r\n", 0, False),
    (b"z" * 2000 + b"\r\nshort\r\n", 1500, False),  # only data[start:] counts
    (b"short\r\n" + b"z" * 2000 + b"\r\n", 3, True),
])
def test_has_long_line(data: bytes, start: int, long: bool) -> None:
    assert has_long_line(data, start) is long


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"\n\r", b"\r\r\n", b"y" * 600]),
                max_size=12).map(b"".join), st.integers(0, 30))
def test_bare_line_ends_and_long_lines_agree_with_splitting(data: bytes, start: int) -> None:
    """Both checks look at ``data[start:]`` only, as the obvious split of that slice does."""
    part = data[start:]
    crlf = part.count(b"\r\n")
    assert has_bare_line_end(data, start) is (part.count(b"\n") != crlf or
                                              part.count(b"\r") != crlf)
    if not has_bare_line_end(data, start):
        assert has_long_line(data, start) is any(len(line) > 998 for line in part.split(b"\r\n"))


# --- the end of the header block -----------------------------------------------------------


@pytest.mark.parametrize(("raw", "head"), [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),  # CRLF CRLF
    (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n"),  # LF LF
    (b"A: 1\r\nB: 2\r\n\nbody\n", b"A: 1\r\nB: 2\r\n"),  # CRLF then LF
    (b"A: 1\nB: 2\n\r\nbody\r\n", b"A: 1\nB: 2\n"),  # LF then CRLF
    (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no body
    (b"A: 1", b"A: 1"),
    (b"\r\nbody\r\n\r\nmore\r\n", b""),  # no header
    (b"\nbody\n\nmore\n", b""),
    (b"", b""),
    (b"A: 1\r\n\r\nB: 2\r\n\r\n", b"A: 1\r\n"),  # only the first blank line counts
])
def test_header_end(raw: bytes, head: bytes) -> None:
    assert header_end(raw) == len(head)


# --- priority -------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "priority"), [
    (b"", "STANDARD"),  # absent
    (b"X-IB-Client-Priority: HIGH\r\n", "HIGH"),
    (b"x-ib-client-priority: low\r\n", "LOW"),  # lower-case name and value
    (b"X-IB-Client-Priority: URGENT\r\n", "STANDARD"),  # unknown
    (b"X-IB-Client-Priority:\r\n HIGH\r\n", "HIGH"),  # folded value
    (b"X-IB-Client-Priority : LOW\r\n", "LOW"),  # obsolete space before the colon
    (b"X-IB-Client-Priority: LOW\r\nX-IB-Client-Priority: HIGH\r\n", "LOW"),  # the first one
    (b"X-Other: 1\r\n X-IB-Client-Priority: HIGH\r\n", "STANDARD"),  # a continuation line
])
def test_priority(header: bytes, priority: str) -> None:
    message = PreparedMessage(b"Subject: s\r\n" + header, b"\r\nX-IB-Client-Priority: LOW\r\n")
    assert message.priority == PRIORITIES[priority]


# --- Received -------------------------------------------------------------------------------


@pytest.mark.parametrize(("extended", "utf8", "tls", "authenticated", "name"), [
    (False, False, False, False, "SMTP"),
    (False, False, True, True, "SMTP"),  # RFC 3848 has no SMTPS or SMTPA
    (True, False, False, False, "ESMTP"),
    (True, False, True, False, "ESMTPS"),
    (True, False, False, True, "ESMTPA"),
    (True, False, True, True, "ESMTPSA"),
    (True, True, False, False, "UTF8SMTP"),
    (True, True, True, False, "UTF8SMTPS"),
    (True, True, False, True, "UTF8SMTPA"),
    (True, True, True, True, "UTF8SMTPSA"),
])
def test_received_protocol_names(extended: bool, utf8: bool, tls: bool, authenticated: bool,
                                 name: str) -> None:
    assert with_protocol(extended=extended, utf8=utf8, tls=tls,
                         authenticated=authenticated) == name


def test_received_header_names_helo_address_protocol_id_and_time() -> None:
    ctx = replace(CTX, auth_user="app")
    arrival = Arrival(hostname="relay.example.com", helo="bad name\x01", tls=True)
    head = prepare(b"Subject: s\r\n\r\n", ctx, arrival).header_block
    assert head.startswith(b"Received: from badname ([192.0.2.7])\r\n\tby relay.example.com "
                           b"(infobip-relay " + __version__.encode() + b") with ESMTPSA id Q1;"
                           b"\r\n\tFri, 01 Mar 2024 12:30:45 +0000\r\n")


# --- prepare --------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "head", "body"), [
    (b"Subject: s\r\n\r\nbody\r\n", TRACE + b"Subject: s\r\n", b"\r\nbody\r\n"),
    (b"Subject: s\n\nbody\rnext\n", TRACE + b"Subject: s\r\n", b"\r\nbody\r\nnext\r\n"),
    (b"Date: d\r\nmessage-id: <m>\r\n\r\nb\r\n", RECEIVED + b"Date: d\r\nmessage-id: <m>\r\n",
     b"\r\nb\r\n"),  # present, in any case: not added
    (b"Subject: s\r\n", TRACE + b"Subject: s\r\n", b""),  # no body
    (b"Subject: s", TRACE + b"Subject: s\r\n", b""),  # and no final line end
    (b"\r\nMessage-ID: <in-body>\r\n", TRACE, b"\r\nMessage-ID: <in-body>\r\n"),  # no header
    (b"", TRACE, b""),
    (b"Subject: " + b"s" * 1000 + b"\n\n" + b"b" * 999 + b"\n",
     TRACE + b"Subject: " + b"s" * 989 + b"\r\n " + b"s" * 11 + b"\r\n",
     b"\r\n" + b"b" * 998 + b"\r\n b\r\n"),
])
def test_prepare(raw: bytes, head: bytes, body: bytes) -> None:
    prepared = prepare(raw, CTX, ARRIVAL)
    assert (prepared.header_block, bytes(prepared.body)) == (head, body)
    assert prepared.data == head + body


def test_a_clean_body_is_not_copied() -> None:
    raw = b"Subject: s\r\n\r\nbody\r\n"
    body = prepare(raw, CTX, ARRIVAL).body
    assert isinstance(body, memoryview)
    assert body.obj is raw


@pytest.mark.parametrize("raw", [
    b"Subject: a\rb\r\n\r\nbody\r\n",
    b"Subject: a\x00b\r\n\r\nbody\r\n",
    b"Subject: a\r",  # at the very end of a message without body
    b"Subject: a\nX: b\r\r\n\nbody\n",  # just before the blank line
])
def test_bare_cr_or_nul_in_the_header_is_refused(raw: bytes) -> None:
    with pytest.raises(MessageRefused) as refused:
        prepare(raw, CTX, ARRIVAL)
    assert refused.value.reply == HEADER_REFUSAL


def test_bare_cr_and_nul_in_the_body_are_not_refused() -> None:
    prepared = prepare(b"Subject: s\r\n\r\na\rb\x00\r\n", CTX, ARRIVAL)
    assert bytes(prepared.body) == b"\r\na\r\nb\x00\r\n"


# The whole-message preparation that relay.listener used before relay.message: the split one
# must give the same bytes for every message that has a header and ends in CRLF (what DATA
# delivers), or the relay would forward different bytes than it used to.
_OLD_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def old_prepare(raw: bytes) -> bytes:
    if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n"):
        raw = _OLD_BARE.sub(b"\r\n", raw)
    if len(raw) > 998 and max(map(len, raw.split(b"\n"))) > 999:
        lines = raw.split(b"\r\n")
        for index, line in enumerate(lines):
            if len(line) > 998:
                chunks = [line[:998]] + [b" " + line[s:s + 997] for s in range(998, len(line), 997)]
                lines[index] = b"\r\n".join(chunks)
        raw = b"\r\n".join(lines)
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end + 2]
    added = RECEIVED
    if not re.search(rb"(?im)^Message-ID:", head):
        added += MESSAGE_ID
    if not re.search(rb"(?im)^Date:", head):
        added += DATE
    return added + raw


HEADER_LINES = st.sampled_from([b"Subject: s", b"Date: d", b"message-id: <m>", b"X: " + b"x" * 1500,
                                b" folded", b"From: a@b"])
BODY_LINES = st.sampled_from([b"", b"body", b"Date: not a header", b"a\rb", b"a\x00",
                              b"z" * 2100, b"."])
ENDINGS = st.sampled_from([b"\r\n", b"\n"])


@given(st.lists(st.tuples(HEADER_LINES, ENDINGS), min_size=1, max_size=6),
       st.none() | st.tuples(ENDINGS, st.lists(st.tuples(BODY_LINES, ENDINGS), max_size=6)))
@settings(max_examples=300)
def test_same_bytes_as_the_whole_message_preparation(
        head: list[tuple[bytes, bytes]],
        body: tuple[bytes, list[tuple[bytes, bytes]]] | None) -> None:
    if head[0][0] == b" folded":
        head[0] = (b"Subject: s", head[0][1])  # a first line cannot continue anything
    raw = b"".join(line + end for line, end in head)
    if body is not None:
        raw += body[0] + b"".join(line + end for line, end in body[1])
    assert prepare(raw, CTX, ARRIVAL).data == old_prepare(raw)


# --- the live relay and `rules test` agree --------------------------------------------------

AGREEMENT_RULES = [
    {"name": "dated", "when": {"header": {"Date": "*"}}, "set": {"X-IB-Bulk-Id": "dated"}},
    {"name": "with id", "when": {"header": {"Message-ID": "*@*"}},
     "set": {"X-IB-Callback-Data": "q={queue_id} at {datetime}"}},
    {"name": "from elsewhere", "when": {"mail_from": "*@elsewhere.example"},
     "set": {"X-IB-Track": False}},
    {"name": "from app", "when": {"mail_from": "app@example.com"},
     "default": {"X-IB-Notify-Url": "https://hooks.example.com/ib"}},
]
# No Date and no Message-ID; bare LF, a long header line and a client priority to be fixed.
AGREEMENT_MESSAGE = (b"From: App <app@example.com>\nTo: user@example.net\n"
                     b"Subject: " + b"long " * 250 + b"\n"
                     b"X-IB-Client-Priority: low\n\nHello\nworld\r\n")


def report_section(report: str, title: str) -> list[str]:
    section = report.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
    return [line for line in section.splitlines() if line]


def test_rules_test_shows_what_the_live_relay_sends(fake_upstream, start_relay) -> None:
    relay = start_relay(fake_upstream, rules=AGREEMENT_RULES)
    queue_id = send_raw(relay, AGREEMENT_MESSAGE)
    [received] = fake_upstream.wait_for(1)
    live_head = received.data[:header_end(received.data)]
    stamp = re.search(rb";\r\n\t([^\r]+)\r\n", live_head)
    assert stamp is not None
    received_at = parsedate_to_datetime(stamp.group(1).decode())
    live_matched = [rule["name"] for rule in AGREEMENT_RULES
                    if relay.server.metrics.registry.get_sample_value(
                        "relay_rule_matches_total", {"rule": rule["name"]})]

    report = rules_test_report(
        relay.config, relay.config.listeners[0], AGREEMENT_MESSAGE, mail_from="app@example.com",
        rcpt_tos=("user@example.net",), client_ip="127.0.0.1", user=None,
        helo="client.example.com", queue_id=queue_id, received_at=received_at)

    matched = [line.split(". ", 1)[1].removesuffix(": MATCHED")
               for line in report_section(report, "Rules:") if line.endswith(": MATCHED")]
    assert matched == live_matched == ["dated", "with id", "from app"]
    shown = [line.removeprefix("  ") for line in report_section(report, "Resulting headers:")]
    assert shown == live_head.decode().removesuffix("\r\n").split("\r\n")
    assert f"X-IB-Callback-Data: q={queue_id} at " in report
    assert f"Date: {format_datetime(received_at)}" in shown


def test_rules_test_sees_the_date_the_relay_adds(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 9: the relay adds Date before the rules run, so a rule on it matches live;
    # `rules test` used to prepare the message its own way and said it did not match.
    config = tmp_path / "relay.yaml"
    config.write_text("upstream: {password: k}\nrules:\n"
                      "  - {name: dated, when: {header: {Date: '*'}}, set: {X-IB-Bulk-Id: d}}\n")
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: app@example.com\nSubject: no date\n\nbody\n")
    assert main(["rules", "test", "-c", str(config), str(message)]) == 0
    out = capsys.readouterr().out
    assert "dated: MATCHED" in out
    headers = report_section(out, "Resulting headers:")
    assert headers[0].startswith("  Received: from unknown ([127.0.0.1])")
    assert [line for line in headers if line.startswith(("  Date: ", "  Message-ID: <"))]
    assert "  X-IB-Bulk-Id: d" in headers


def test_rules_test_refuses_what_the_relay_refuses(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("upstream: {password: k}\n")
    message = tmp_path / "message.eml"
    message.write_bytes(b"Subject: a\rb\n\nbody\n")
    assert main(["rules", "test", "-c", str(config), str(message)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"infobip-relay: error: the relay would refuse this message: " \
                          f"{HEADER_REFUSAL}"
