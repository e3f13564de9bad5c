"""Tests for relay.dsn: RFC 3464 bounces, the loop rules and the status mapping."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from typing import cast

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay.dsn import (
    MAX_ORIGINAL_HEADERS,
    SUBJECT,
    Failure,
    build_dsn,
    diagnostic_for_report,
    may_bounce,
    status_for_report,
    status_from_reply,
)

BOUNCER = "postmaster@relay.example"
ORIGINAL = (
    b"Received: from app.example ([192.0.2.1])\r\n"
    b"\tby relay.example with ESMTP id Q1; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: App <app@example.com>\r\n"
    b"To: one@example.org, two@example.org\r\n"
    b"Subject: Your invoice\r\n"
    b"Message-ID: <m1@example.com>\r\n"
)
FAILURES = (
    Failure("one@example.org", "5.1.1", "smtp; 550 5.1.1 <one@example.org>: no such user"),
    Failure("two@example.org", "5.1.1",
            "X-Infobip; UNDELIVERABLE_REJECTED_OPERATOR (6006 INVALID_EMAIL_ADDRESS)"),
)
PER_MESSAGE = ["Reporting-MTA", "X-Infobip-Relay-Queue-ID", "X-Infobip-Relay-Sender",
               "Arrival-Date"]
PER_RECIPIENT = ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]
TOP_LEVEL = {"from", "to", "subject", "date", "message-id", "auto-submitted", "mime-version",
             "content-type", "content-transfer-encoding"}


def dsn(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "queue_id": "Q1", "original_mail_from": "app@example.com",
        "original_headers": ORIGINAL, "failures": FAILURES, "bounce_sender": BOUNCER,
        "reporting_mta": "relay.example", "arrival_date": 1_700_000_000.0,
        "now": 1_700_000_100.0,
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def status_blocks(message: EmailMessage) -> list[Message]:
    blocks = parts(message)[1].get_payload()
    assert isinstance(blocks, list)
    assert all(isinstance(block, Message) for block in blocks)
    return cast("list[Message]", blocks)


def assert_well_formed(data: bytes) -> None:
    """Every line within 998 octets, and no line ending but CRLF."""
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    assert max(len(line) for line in lines) <= 998
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")


def unfold(value: bytes) -> str:
    return value.replace(b"\r\n", b"").decode()


def raw_fields(data: bytes, name: str) -> list[bytes]:
    """Raw values (folding kept) of every ``name`` field anywhere in ``data``."""
    pattern = rb"(?m)^" + re.escape(name.encode()) + rb": ((?:.*\r\n)(?:[ \t].*\r\n)*)"
    return [match.rstrip(b"\r\n") for match in re.findall(pattern, data)]


def xtext_decode(text: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda match: chr(int(match.group(1), 16)), text)


# ---------------------------------------------------------------------------------------------
# The DSN's structure
# ---------------------------------------------------------------------------------------------
def test_dsn_is_a_multipart_report_with_three_parts() -> None:
    data = dsn()
    assert_well_formed(data)
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"] == f"Mail Delivery System <{BOUNCER}>"
    assert b"\r\nTo: <app@example.com>\r\n" in data
    assert message["To"].addresses[0].addr_spec == "app@example.com"
    assert message["Subject"] == SUBJECT
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"] == "Tue, 14 Nov 2023 22:15:00 +0000"
    assert re.fullmatch(r"<Q1\.[0-9a-f]{20}@relay\.example>", message["Message-ID"])
    assert "Content-Transfer-Encoding" not in message  # all 7-bit
    assert {name.lower() for name in message} <= TOP_LEVEL
    assert [part.get_content_type() for part in parts(message)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not [part.defects for part in message.walk() if part.defects]


def test_delivery_status_has_per_message_fields_then_one_block_per_failure() -> None:
    blocks = status_blocks(parse(dsn()))
    assert len(blocks) == 1 + len(FAILURES)
    head = blocks[0]
    assert list(head.keys()) == PER_MESSAGE
    assert head["Reporting-MTA"] == "dns; relay.example"
    assert head["X-Infobip-Relay-Queue-ID"] == "Q1"
    assert head["X-Infobip-Relay-Sender"] == "rfc822; app@example.com"
    assert head["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    for block, failure in zip(blocks[1:], FAILURES, strict=True):
        assert list(block.keys()) == PER_RECIPIENT
        assert block["Final-Recipient"] == f"rfc822; {failure.recipient}"
        assert block["Action"] == "failed"
        assert block["Status"] == failure.status
        assert block["Diagnostic-Code"] == failure.diagnostic


def test_delivery_status_blocks_are_separated_by_blank_lines() -> None:
    body = parts(parse(dsn()))[1].as_bytes().split(b"\n\n", 1)[1]
    assert body.count(b"\n\nFinal-Recipient: ") == len(FAILURES)


def test_explanation_lists_each_recipient_and_its_diagnostic() -> None:
    text = parts(parse(dsn()))[0].get_content()
    assert "could not be delivered" in text
    assert "<one@example.org>: 550 5.1.1 <one@example.org>: no such user" in text
    assert "<two@example.org>: UNDELIVERABLE_REJECTED_OPERATOR (6006" in text
    assert max(len(line) for line in text.splitlines()) <= 76


def test_original_headers_are_attached_unchanged() -> None:
    attached = parts(parse(dsn()))[2].get_payload(decode=True)
    assert attached == ORIGINAL


def test_original_headers_get_crlf_and_lose_any_body() -> None:
    original = b"From: a@example.com\nSubject: folded\n\tsubject\r\nX-Bare-Cr: 1\r\n" \
        b"\nsecret body\r\n"
    attached = parts(parse(dsn(original_headers=original)))[2].get_payload(decode=True)
    assert attached == b"From: a@example.com\r\nSubject: folded\r\n\tsubject\r\nX-Bare-Cr: 1\r\n"


def test_8bit_original_headers_keep_their_bytes_and_are_declared_8bit() -> None:
    original = b"Subject: caf\xe9 \xc3\xa9t\xc3\xa9\r\nFrom: a@example.com\r\n"
    data = dsn(original_headers=original)
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[2]["Content-Transfer-Encoding"] == "8bit"
    assert b"\r\n\r\n" + original + b"\r\n--" in data


def test_original_headers_are_cut_at_a_field_boundary() -> None:
    field = b"X-Filler: " + b"x" * 70 + b"\r\n\t" + b"y" * 70 + b"\r\n"
    original = b"Subject: big\r\n" + field * (2 * MAX_ORIGINAL_HEADERS // len(field))
    message = parse(dsn(original_headers=original))
    attached = parts(message)[2].get_payload(decode=True)
    assert isinstance(attached, bytes)
    assert len(attached) <= MAX_ORIGINAL_HEADERS
    assert original.startswith(attached)
    assert attached.endswith(b"y" * 70 + b"\r\n")  # the folded field is complete
    assert "cut at 64 KiB" in parts(message)[0].get_content()


def test_empty_original_headers() -> None:
    message = parse(dsn(original_headers=b""))
    assert parts(message)[2].get_payload(decode=True) == b""
    assert len(parts(message)) == 3


def test_same_inputs_give_the_same_bytes_and_each_batch_a_new_message_id() -> None:
    assert dsn() == dsn()
    ids = {parse(data)["Message-ID"] for data in (
        dsn(), dsn(now=1_700_000_101.0), dsn(queue_id="Q2"), dsn(failures=FAILURES[:1]))}
    assert len(ids) == 4


def test_boundary_avoids_text_that_contains_it() -> None:
    boundary = parse(dsn()).get_boundary()
    assert boundary
    original = ORIGINAL + b"X-Trap: --" + boundary.upper().encode() + b"\r\n"
    message = parse(dsn(original_headers=original))
    assert message.get_boundary() != boundary
    assert len(parts(message)) == 3
    assert parts(message)[2].get_payload(decode=True) == original


def test_long_diagnostic_is_folded_and_unfolds_to_the_original() -> None:
    words = "smtp; 550 " + " ".join(f"word{index}" for index in range(500))
    assert len(words) > 3000
    data = dsn(failures=[Failure("one@example.org", "5.0.0", words)])
    assert_well_formed(data)
    (raw,) = raw_fields(data, "Diagnostic-Code")
    assert raw.count(b"\r\n ") > 30
    assert all(len(line) <= 78 for line in (b"Diagnostic-Code: " + raw).split(b"\r\n"))
    assert unfold(raw) == words
    assert status_blocks(parse(data))[1]["Diagnostic-Code"] == words


def test_diagnostic_without_spaces_is_broken_under_998_octets() -> None:
    data = dsn(failures=[Failure("one@example.org", "5.0.0", "smtp; " + "x" * 3000)])
    assert_well_formed(data)
    (raw,) = raw_fields(data, "Diagnostic-Code")
    assert unfold(raw).replace(" ", "") == "smtp;" + "x" * 3000


ATTACKS = [
    "smtp; 550 no\r\nBcc: victim@example.net",
    "smtp; 550 no\r\n\r\nFinal-Recipient: rfc822; forged@example.net",
    "smtp; 550 no\n--=_dsn_\r\nContent-Type: text/html\r\n\r\n<script>",
    "smtp; 550 no\r\n.\r\nMAIL FROM:<x@example.net>",
    "smtp; 550 no\rX-Bare-Cr: 1",
    "smtp; 550 no\nX-Bare-Lf: 1",
    "smtp; 550 no\0X-Nul: 1",
    "smtp; 550 no\x85X-Nel: 1\u2028X-Ls: 1",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_control_characters_never_inject_fields_or_parts(attack: str) -> None:
    failures = [Failure(f"v@example.org{attack[5:]}", "5.1.1\r\nX-Status: 1", attack),
                Failure("ok@example.org", "5.1.1", "smtp; 550 fine")]
    data = dsn(failures=failures, original_mail_from=f"app@example.com{attack[5:]}",
               queue_id=f"Q1{attack}", bounce_sender=f"{BOUNCER}{attack[5:]}",
               reporting_mta=f"relay.example{attack}")
    assert_well_formed(data)
    message = parse(data)
    assert {name.lower() for name in message} <= TOP_LEVEL
    assert len(parts(message)) == 3
    blocks = status_blocks(message)
    assert [list(block.keys()) for block in blocks] == [PER_MESSAGE] + [PER_RECIPIENT] * 2
    assert blocks[1]["Status"] == "5.0.0"  # not a status: replaced, not passed on
    assert blocks[2]["Final-Recipient"] == "rfc822; ok@example.org"
    for line in data.split(b"\r\n"):
        assert not re.match(rb"(?i)(bcc|x-bare|x-nul|x-nel|x-ls|x-status|mail from)", line)
    assert b"<script>" not in parts(message)[2].as_bytes()


def test_non_ascii_recipient_is_a_utf8_xtext_address() -> None:
    address = "jos\u00e9+tag=1@b\u00fccher.example"
    data = dsn(failures=[Failure(address, "5.1.1", "smtp; 550 unknown")])
    block = status_blocks(parse(data))[1]
    kind, _, value = block["Final-Recipient"].partition("; ")
    assert kind == "utf-8"
    assert value == "jos\\x{E9}\\x{2B}tag\\x{3D}1@b\\x{FC}cher.example"
    assert value.isascii()
    assert xtext_decode(value) == address
    assert f"<{address}>: 550 unknown" in parts(parse(data))[0].get_content()


def test_non_ascii_diagnostic_is_escaped_and_the_part_stays_ascii() -> None:
    diagnostic = "smtp; 550 5.2.2 Postfach voll \u2013 bo\u00eete pleine \U0001f4ed"
    data = dsn(failures=[Failure("one@example.org", "5.2.2", diagnostic)])
    message = parse(data)
    code = status_blocks(message)[1]["Diagnostic-Code"]
    assert code == ("smtp; 550 5.2.2 Postfach voll \\x{2013} bo\\x{EE}te pleine "
                    "\\x{1F4ED}")
    assert parts(message)[1].as_bytes().isascii()
    assert xtext_decode(code) == diagnostic
    # The explanation keeps the characters (quoted-printable UTF-8).
    assert parts(message)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert diagnostic[6:] in parts(message)[0].get_content()


def test_lone_surrogates_are_replaced() -> None:
    data = dsn(failures=[Failure("a\udcff@example.org", "5.1.1", "smtp; 550 \udce9")])
    assert_well_formed(data)
    block = status_blocks(parse(data))[1]
    assert block["Final-Recipient"] == "utf-8; a\\x{FFFD}@example.org"
    assert block["Diagnostic-Code"] == "smtp; 550 \\x{FFFD}"


def test_non_ascii_sender_is_an_rfc6532_to_header() -> None:
    data = dsn(original_mail_from="jos\u00e9@example.com")
    assert "To: <jos\u00e9@example.com>\r\n".encode() in data
    head = status_blocks(parse(data))[0]
    assert head["X-Infobip-Relay-Sender"] == "utf-8; jos\\x{E9}@example.com"


@pytest.mark.parametrize(("diagnostic", "expected"), [
    ("smtp; 550 5.1.1 no such user", "smtp; 550 5.1.1 no such user"),
    ("SMTP;550 5.1.1 no such user", "smtp; 550 5.1.1 no such user"),
    ("infobip; UNDELIVERABLE (6006 INVALID_EMAIL_ADDRESS)",
     "X-infobip; UNDELIVERABLE (6006 INVALID_EMAIL_ADDRESS)"),
    ("X-Infobip; EXPIRED_EXPIRED", "X-Infobip; EXPIRED_EXPIRED"),
    ("550 5.1.1 no such user", "smtp; 550 5.1.1 no such user"),
    ("message older than max_age (5d)", "X-Infobip-Relay; message older than max_age (5d)"),
    ("", "X-Infobip-Relay;"),
    ("smtp; 550-5.1.1 first\r\n550 5.1.1 second", "smtp; 550-5.1.1 first 550 5.1.1 second"),
])
def test_diagnostic_code_type(diagnostic: str, expected: str) -> None:
    data = dsn(failures=[Failure("one@example.org", "5.1.1", diagnostic)])
    assert status_blocks(parse(data))[1]["Diagnostic-Code"] == expected


@pytest.mark.parametrize(("status", "expected"), [
    ("5.1.1", "5.1.1"), ("4.4.7", "4.4.7"), (" 5.7.26 ", "5.7.26"), ("2.0.0", "5.0.0"),
    ("5.1", "5.0.0"), ("5.1.1.1", "5.0.0"), ("", "5.0.0"), ("5.1.1 user unknown", "5.0.0"),
])
def test_status_must_be_a_failure_code(status: str, expected: str) -> None:
    data = dsn(failures=[Failure("one@example.org", status, "smtp; 550 no")])
    assert status_blocks(parse(data))[1]["Status"] == expected


def test_null_sender_and_no_failures_are_refused() -> None:
    with pytest.raises(ValueError, match="null sender"):
        dsn(original_mail_from="")
    with pytest.raises(ValueError, match="null sender"):
        dsn(original_mail_from="<>")
    with pytest.raises(ValueError, match="at least one"):
        dsn(failures=[])


def test_non_ascii_reporting_mta_uses_idna() -> None:
    message = parse(dsn(reporting_mta="r\u00e9lais.example"))
    assert status_blocks(message)[0]["Reporting-MTA"] == "dns; xn--rlais-bsa.example"
    assert message["Message-ID"].endswith("@xn--rlais-bsa.example>")


# ---------------------------------------------------------------------------------------------
# Property: no input breaks the line structure
# ---------------------------------------------------------------------------------------------
HOSTILE = st.sampled_from([*"\r\n\0\t \x85\u2028\u2029\\+=;:<>\"()\udc80\udcff",
                           "\r\n", "\r\n\r\n", "\r\n.\r\n", "\r\n--", "--=_dsn_"])
TEXT = st.lists(st.one_of(st.characters(), HOSTILE), max_size=60).map("".join)
LONG_TEXT = st.one_of(TEXT, st.builds(lambda text, count: text * count, TEXT,
                                      st.integers(1, 200)))


@settings(max_examples=150, deadline=None)
@given(recipients=st.lists(st.tuples(LONG_TEXT, TEXT, LONG_TEXT), min_size=1, max_size=4),
       mail_from=LONG_TEXT, queue_id=TEXT, mta=TEXT, sender=TEXT,
       headers=st.binary(max_size=3000))
def test_no_input_yields_a_long_line_or_a_bare_line_ending(
        recipients: list[tuple[str, str, str]], mail_from: str, queue_id: str, mta: str,
        sender: str, headers: bytes) -> None:
    assume(mail_from.strip().strip("<>").strip())
    failures = [Failure(*recipient) for recipient in recipients]
    data = build_dsn(queue_id=queue_id, original_mail_from=mail_from,
                     original_headers=headers, failures=failures, bounce_sender=sender,
                     reporting_mta=mta, arrival_date=0.0, now=1.5)
    assert_well_formed(data)
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert {name.lower() for name in message} <= TOP_LEVEL
    assert len(parts(message)) == 3
    blocks = status_blocks(message)
    assert [list(block.keys()) for block in blocks] == \
        [PER_MESSAGE] + [PER_RECIPIENT] * len(failures)


@settings(max_examples=200, deadline=None)
@given(header_block=st.binary(max_size=2000), mail_from=TEXT, bounce_sender=TEXT)
def test_may_bounce_never_raises(header_block: bytes, mail_from: str,
                                 bounce_sender: str) -> None:
    assert may_bounce(mail_from=mail_from, header_block=header_block,
                      bounce_sender=bounce_sender) in (True, False)


# ---------------------------------------------------------------------------------------------
# may_bounce
# ---------------------------------------------------------------------------------------------
PLAIN = b"From: app@example.com\r\nSubject: hi\r\n"
DSN_TYPE = b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n"


@pytest.mark.parametrize(("mail_from", "header_block", "expected"), [
    ("app@example.com", PLAIN, True),
    ("", PLAIN, False),
    ("<>", PLAIN, False),
    (BOUNCER, PLAIN, False),
    ("PostMaster@Relay.Example", PLAIN, False),
    (f"<{BOUNCER}>", PLAIN, False),
    ("app@example.com", PLAIN + b"Auto-Submitted: auto-replied\r\n", False),
    ("app@example.com", PLAIN + b"Auto-Submitted: auto-generated\r\n", False),
    ("app@example.com", PLAIN + b"auto-submitted:Auto-Notified\r\n", False),
    ("app@example.com", PLAIN + b"Auto-Submitted: some-future-keyword\r\n", False),
    ("app@example.com", PLAIN + b"Auto-Submitted:\r\n", False),
    ("app@example.com", PLAIN + b"Auto-Submitted: no\r\n", True),
    ("app@example.com", PLAIN + b"AUTO-SUBMITTED: No (a person wrote this)\r\n", True),
    ("app@example.com", PLAIN + b"Auto-Submitted : (obsolete WSP) no\r\n", True),
    ("app@example.com", PLAIN + b"Auto-Submitted: no; x=1\r\n", True),
    ("app@example.com", PLAIN + b"Auto-Submitted:\r\n auto-generated\r\n", False),
    ("app@example.com", PLAIN + b"Auto-Submitted: (no) auto-replied\r\n", False),
    ("app@example.com", b"Auto-Submitted: no\nAuto-Submitted: auto-replied\n", False),
    ("app@example.com", b"Subject: caf\xe9 \xff\xfe\r\nAuto-Submitted: auto-replied\r\n",
     False),
    ("app@example.com", PLAIN + b"\r\nAuto-Submitted: auto-replied\r\n", True),  # body
    ("app@example.com", PLAIN + b"X-Auto-Submitted: auto-replied\r\n", True),
    ("app@example.com", PLAIN + b"Subject: Auto-Submitted: auto-replied\r\n", True),
    ("app@example.com", PLAIN + DSN_TYPE, False),
    ("app@example.com", PLAIN + DSN_TYPE.upper(), False),
    ("app@example.com",
     b"Content-Type: multipart/report;\r\n\treport-type=\"delivery-status\";\r\n\tboundary=b\r\n",
     False),
    ("app@example.com",
     b"Content-Type: multipart/report; boundary=\"a;b\"; (c) report-type=delivery-status\r\n",
     False),
    ("app@example.com", b"Content-Type: multipart/report; report-type*=''delivery-status\r\n",
     False),
    ("app@example.com",
     b"Content-Type: multipart/report; report-type=global-delivery-status\r\n", False),
    ("app@example.com",
     b"Content-Type: multipart/report; report-type=disposition-notification\r\n", True),
    ("app@example.com",
     b"Content-Type: multipart/report; report-type=feedback-report\r\n", True),
    ("app@example.com",
     b"Content-Type: multipart/mixed; boundary=\"report-type=delivery-status\"\r\n", True),
    ("app@example.com",
     b"Content-Type: multipart/report; boundary=\"report-type=delivery-status\"\r\n", True),
    ("app@example.com", PLAIN + b"Precedence: bulk\r\n", True),
    ("app@example.com", PLAIN + b"Precedence: list\r\n", True),
    ("app@example.com", PLAIN + b"Precedence: junk\r\n", True),
    ("app@example.com", b"", True),
    ("app@example.com", b"\r\nAuto-Submitted: auto-replied\r\n", True),
    ("app@example.com", b"\tAuto-Submitted: auto-replied\r\n", True),
    ("app@example.com", b"garbage line\r\n Auto-Submitted: auto-replied\r\n", True),
])
def test_may_bounce(mail_from: str, header_block: bytes, expected: bool) -> None:
    assert may_bounce(mail_from=mail_from, header_block=header_block,
                      bounce_sender=BOUNCER) is expected


def test_no_bounce_without_a_bounce_sender() -> None:
    assert not may_bounce(mail_from="app@example.com", header_block=PLAIN, bounce_sender="")


def test_a_dsn_this_module_built_may_not_bounce() -> None:
    data = dsn()
    head = data[:data.index(b"\r\n\r\n") + 2]
    assert not may_bounce(mail_from=BOUNCER, header_block=head, bounce_sender="other@x.example")
    assert not may_bounce(mail_from="x@y.example", header_block=head, bounce_sender=BOUNCER)


# ---------------------------------------------------------------------------------------------
# Status mapping and diagnostics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("group", "error", "permanent", "expected"), [
    ("UNDELIVERABLE", "INVALID_EMAIL_ADDRESS", True, "5.1.1"),
    ("UNDELIVERABLE", "INBOX_FULL", True, "5.2.2"),
    ("UNDELIVERABLE", "INBOX_FULL", False, "4.2.2"),
    ("REJECTED", "SENDER_DOMAIN_UNVERIFIED", True, "5.7.1"),
    ("UNDELIVERABLE", "SOME_NEW_ERROR", True, "5.0.0"),
    ("UNDELIVERABLE", None, False, "4.0.0"),
    ("UNDELIVERABLE", "NO_ERROR", True, "5.0.0"),
    ("EXPIRED", "NO_ERROR", False, "4.4.7"),
    ("EXPIRED", None, True, "5.4.7"),
    ("REJECTED", "", True, "5.7.1"),
    ("REJECTED", None, False, "4.7.1"),
    ("rejected", "invalid_email_address", True, "5.1.1"),
    (" EXPIRED ", " INBOX_FULL ", False, "4.2.2"),
    ("DELIVERED", "NO_ERROR", False, "2.0.0"),
    ("DELIVERED", "NO_ERROR", True, "2.0.0"),
    ("PENDING", None, False, "4.0.0"),
    ("SOMETHING_NEW", None, True, "5.0.0"),
    ("SOMETHING_NEW", None, False, "4.0.0"),
])
def test_status_for_report(group: str, error: str | None, permanent: bool,
                           expected: str) -> None:
    assert status_for_report(group, error, permanent) == expected


@pytest.mark.parametrize(("reply", "expected"), [
    ("550 5.1.1 no such user", "5.1.1"),
    ("550-5.1.1 first line\r\n550 5.1.1 last line", "5.1.1"),
    ("452 4.2.2 mailbox full", "4.2.2"),
    ("554 5.7.26 unauthenticated", "5.7.26"),
    ("550 no such user", "5.0.0"),
    ("451 try later", "4.0.0"),
    ("550 4.2.2 class disagrees with the reply code", "5.0.0"),
    ("550 5.1.1.1 not an enhanced code", "5.0.0"),
    ("550 5.1.10 ok", "5.1.10"),
    ("5500 5.1.1 not a reply code", "5.0.0"),
    ("354 go ahead", "5.0.0"),
    ("250 2.0.0 ok", "2.0.0"),
    ("5.1.1 no reply code", "5.1.1"),
    ("  550 5.1.1 leading space", "5.1.1"),
    ("", "5.0.0"),
    ("connection reset by peer", "5.0.0"),
])
def test_status_from_reply(reply: str, expected: str) -> None:
    assert status_from_reply(reply) == expected


@pytest.mark.parametrize(("args", "expected"), [
    (("UNDELIVERABLE_REJECTED_OPERATOR", "INVALID_EMAIL_ADDRESS", 6006),
     "X-Infobip; UNDELIVERABLE_REJECTED_OPERATOR (6006 INVALID_EMAIL_ADDRESS)"),
    (("REJECTED_SOURCE", "SENDER_DOMAIN_UNVERIFIED", "6036", "Sender domain not verified"),
     "X-Infobip; REJECTED_SOURCE (6036 SENDER_DOMAIN_UNVERIFIED) - Sender domain not verified"),
    (("EXPIRED_EXPIRED", "NO_ERROR", 0), "X-Infobip; EXPIRED_EXPIRED"),
    (("EXPIRED_EXPIRED",), "X-Infobip; EXPIRED_EXPIRED"),
    (("", None, None, " "), "X-Infobip; UNKNOWN"),
])
def test_diagnostic_for_report(args: tuple[object, ...], expected: str) -> None:
    assert diagnostic_for_report(*args) == expected  # type: ignore[arg-type]


def test_report_helpers_feed_build_dsn() -> None:
    failure = Failure("one@example.org", status_for_report("UNDELIVERABLE",
                                                           "INVALID_EMAIL_ADDRESS", True),
                      diagnostic_for_report("UNDELIVERABLE_REJECTED_OPERATOR",
                                            "INVALID_EMAIL_ADDRESS", 6006))
    block = status_blocks(parse(dsn(failures=[failure])))[1]
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == \
        "X-Infobip; UNDELIVERABLE_REJECTED_OPERATOR (6006 INVALID_EMAIL_ADDRESS)"
