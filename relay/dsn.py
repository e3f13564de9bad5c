"""RFC 3464 bounces (DSNs) for recipients that failed permanently (issue 11, "Bounces (DSN)").

Pure functions: no I/O, no clock, no randomness. The same inputs give the same bytes, so a DSN
rebuilt after a crash carries the same Message-ID and a receiver can recognise the duplicate;
two batches of one message differ in ``now`` or in their failures, hence in Message-ID.

API
- ``Failure(recipient, status, diagnostic)``: one failed recipient. ``status`` is an RFC 3463
  code; anything but ``4.x.x``/``5.x.x`` is reported as ``5.0.0``. ``diagnostic`` is a
  Diagnostic-Code value, ``type; text`` (``smtp; 550 5.1.1 no such user``). Without a type it
  becomes ``smtp;`` when it starts with a reply code, else ``X-Infobip-Relay;``. IANA registers
  only the ``smtp`` diagnostic type; any other type gets the ``X-`` private-use prefix, as
  Postfix's ``X-Postfix;``. So ``infobip; ...`` goes out as ``X-infobip; ...``.
- ``may_bounce(mail_from=, header_block=, bounce_sender=)``: whether a message may get a DSN.
- ``build_dsn(...)``: the whole DSN as CRLF bytes, for DATA from ``bounce_sender`` to
  ``original_mail_from``. When an address in the To header or the attached headers is not
  ASCII, the caller must send with SMTPUTF8, exactly as for the original message (RFC 6532).
- ``status_for_report(group, error_name, permanent)``: an Infobip report's RFC 3463 code.
- ``diagnostic_for_report(status_name, error_name, error_id, description)``: its
  Diagnostic-Code, ``X-Infobip; UNDELIVERABLE_REJECTED_OPERATOR (6006 INVALID_EMAIL_ADDRESS)``.
- ``status_from_reply(reply)``: the enhanced code of an SMTP reply (``550 5.1.1 ...`` gives
  ``5.1.1``); the reply's class ``.0.0`` when it has none or one of another class; ``5.0.0``
  when the text is no reply at all.

Status mapping (``status_for_report``): the class is 5 when Infobip flags the error permanent,
else 4 (RFC 3464 allows ``Action: failed`` with a 4.x.x code: we gave up, the address may be
fine, so list managers do not unsubscribe on a soft failure). A known error name decides the
subject and detail, else the group does:

    error INVALID_EMAIL_ADDRESS (6006)     x.1.1  bad destination mailbox address
    error INBOX_FULL (6010)                x.2.2  mailbox full
    error SENDER_DOMAIN_UNVERIFIED (6036)  x.7.1  delivery not authorized
    group UNDELIVERABLE                    x.0.0  other or undefined status
    group EXPIRED                          x.4.7  delivery time expired
    group REJECTED                         x.7.1  delivery not authorized, message refused
    group DELIVERED                        2.0.0  (PENDING: 4.0.0; unknown group: x.0.0)

Loop rules (``may_bounce``): no DSN to the null sender, to the bounce sender itself, for mail
with an ``Auto-Submitted`` field other than ``no`` (RFC 3834 5), or for a DSN
(``multipart/report`` with ``report-type=delivery-status``, or RFC 6533's
``global-delivery-status``). ``Precedence`` is deliberately ignored: RFC 3834 governs
auto-responders, not DSNs; mailing lists and bulk senders set an envelope sender precisely to
receive bounces and prune dead addresses from them, and Postfix bounces such mail too.

Encoding: the DSN is 7-bit except for the attached original headers (8bit when they are) and
non-ASCII addresses in From and To (UTF-8, RFC 6532).
RFC 3464 fields are US-ASCII and RFC 2047 encoded words are not allowed in them, so:
- non-ASCII in a Diagnostic-Code (and in the queue id) becomes ``\\x{HEX}``, the
  EmbeddedUnicodeChar notation that RFC 6533 already uses for addresses in the same part:
  unlike ``?`` it keeps every character (a lone surrogate becomes U+FFFD) and stays readable;
  controls (CR, LF, NUL...) become spaces;
- a non-ASCII recipient is ``Final-Recipient: utf-8; <utf-8-addr-xtext>`` (RFC 6533 3), an
  ASCII one ``rfc822; addr``; controls, which no valid address holds, are dropped;
- the explanation part is UTF-8, quoted-printable when it is not ASCII.
Every field is folded before a space at 78 columns where it can be (RFC 5322 2.2.3); a word
too long for a 998-octet line is broken with CRLF + space, as relay.message does to any long
line, so no input can produce a line over 998 octets or a line ending of its own.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.address import outside_quotes
from relay.headers import CRLF, MAX_LINE_LENGTH, header_end
from relay.message import fix_lines

SUBJECT = "Undelivered Mail Returned to Sender"
# The original headers are attached up to this size, cut at a field (else a line) boundary:
# enough for any real header block, small enough that a DSN is never a large message.
MAX_ORIGINAL_HEADERS = 64 * 1024
# RFC 5322 2.1.1: lines SHOULD stay within 78 characters; 998 is the hard limit.
FOLD_WIDTH = 78
TEXT_WIDTH = 76
QUEUE_ID_FIELD = "X-Infobip-Relay-Queue-ID"
SENDER_FIELD = "X-Infobip-Relay-Sender"
LOCAL_DIAGNOSTIC_TYPE = "X-Infobip-Relay"
REPORT_DIAGNOSTIC_TYPE = "X-Infobip"
_DSN_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})

_FAILURE_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_DIAGNOSTIC_TYPE = re.compile(r"[ \t]*([A-Za-z0-9][A-Za-z0-9-]*)[ \t]*;(.*)", re.DOTALL)
# A reply code, then optionally an enhanced code (RFC 2034: right after the code and a space).
_REPLY = re.compile(r"\s*([1-5])\d\d(?!\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3})(?![.\d]))?")
_ENHANCED_ONLY = re.compile(r"\s*([45]\.\d{1,3}\.\d{1,3})(?![.\d])")
_C0 = re.compile(r"[\x00-\x1f\x7f]")
# What must never reach a header or a line of text: C0, DEL, C1 and the Unicode line and
# paragraph separators (str.splitlines() and some mail parsers break lines at them).
_LINE_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_FOLD_TOKEN = re.compile(rb" *[^ ]+")
_MESSAGE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9.-]")

# Infobip email error names (infobip-facts.md) -> RFC 3463 subject.detail.
_ERROR_STATUS = {
    "INVALID_EMAIL_ADDRESS": "1.1",
    "INBOX_FULL": "2.2",
    "SENDER_DOMAIN_UNVERIFIED": "7.1",
}
_GROUP_STATUS = {
    "UNDELIVERABLE": "0.0",
    "EXPIRED": "4.7",
    "REJECTED": "7.1",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient that failed permanently, as its per-recipient DSN block reports it."""

    recipient: str  # the failed recipient address
    status: str  # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str  # Diagnostic-Code value, e.g. "smtp; 550 5.1.1 no such user"


# ---------------------------------------------------------------------------------------------
# Status codes and diagnostics
# ---------------------------------------------------------------------------------------------
def status_for_report(group: str, error_name: str | None, permanent: bool) -> str:
    """The RFC 3463 code for an Infobip report (see the table in the module docstring)."""
    group = group.strip().upper()
    if group == "DELIVERED":
        return "2.0.0"
    if group == "PENDING":
        return "4.0.0"
    klass = "5" if permanent else "4"
    detail = _ERROR_STATUS.get((error_name or "").strip().upper()) or \
        _GROUP_STATUS.get(group, "0.0")
    return f"{klass}.{detail}"


def diagnostic_for_report(status_name: str, error_name: str | None = None,
                          error_id: int | str | None = None,
                          description: str | None = None) -> str:
    """The Diagnostic-Code for an Infobip report: status name, then error id and name."""
    text = status_name.strip() or "UNKNOWN"
    error = " ".join(str(part).strip() for part in (error_id, error_name)
                     if part is not None and str(part).strip())
    if error and (error_name or "").strip().upper() != "NO_ERROR":
        text += f" ({error})"
    if description and description.strip():
        text += f" - {description.strip()}"
    return f"{REPORT_DIAGNOSTIC_TYPE}; {text}"


def status_from_reply(reply: str) -> str:
    """The enhanced status code of an SMTP reply (see the module docstring)."""
    match = _REPLY.match(reply)
    if match is None:
        only = _ENHANCED_ONLY.match(reply)
        return only.group(1) if only else "5.0.0"
    klass, enhanced = match.group(1), match.group(2)
    if klass not in "245":
        return "5.0.0"  # a 1xx/3xx reply is no failure: nothing to derive a class from
    # RFC 2034: the enhanced class matches the reply code's first digit. A reply that says
    # "550 4.2.2" is trusted for its reply code, which is what the client acted on.
    if enhanced and enhanced[0] == klass:
        return enhanced
    return f"{klass}.0.0"


# ---------------------------------------------------------------------------------------------
# Loop prevention
# ---------------------------------------------------------------------------------------------
def may_bounce(*, mail_from: str, header_block: bytes, bounce_sender: str) -> bool:
    """Whether a message may get a DSN (the loop rules are in the module docstring).

    ``header_block`` is parsed leniently (folding, any line endings, any case, any bytes):
    whatever it holds, this returns and never raises.
    """
    sender = _bare_address(mail_from)
    if not sender or not _bare_address(bounce_sender):
        return False  # null sender (RFC 5321 4.5.5), or bounces are not configured
    if sender.casefold() == _bare_address(bounce_sender).casefold():
        return False
    for name, value in _header_fields(header_block):
        if name == "auto-submitted":
            keyword = _split_params(_uncomment(value))[0].strip().lower()
            if keyword != "no":
                return False  # auto-generated, auto-replied, auto-notified or unreadable
        elif name == "content-type":
            mime_type, *params = _split_params(_uncomment(value))
            if mime_type.strip().lower() == "multipart/report" and \
                    _param(params, "report-type").lower() in _DSN_REPORT_TYPES:
                return False
    return True


def _bare_address(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def _header_fields(header_block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field; lines that are no field are skipped."""
    head = bytes(header_block)
    # Latin-1 maps every byte to one character: it never fails, and names are ASCII anyway.
    text = head[:header_end(head)].decode("latin-1")
    fields: list[list[str]] = []
    for line in _LINE_SPLIT.split(text):
        if line[:1] in (" ", "\t"):
            if fields:
                fields[-1][1] += line  # unfolding removes the line break, keeps the space
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")  # RFC 5322 4.5: obsolete WSP before the colon
        # A garbage line starts an entry with no name, so its continuations stay out of the
        # field before it.
        fields.append([name.lower() if colon and _FIELD_NAME.fullmatch(name) else "", value])
    return [(name, value.strip()) for name, value in fields if name]


def _uncomment(value: str) -> str:
    """``value`` with its RFC 5322 comments (nested, with quoted pairs) replaced by a space."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
            if not depth:
                out.append(char)
        elif char == "\\":
            escaped = True
            if not depth:
                out.append(char)
        elif quoted:
            out.append(char)
            quoted = char != '"'
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
        elif not depth:
            quoted = char == '"'
            out.append(char)
    return "".join(out)


def _split_params(value: str) -> list[str]:
    """``value`` split at the semicolons that are not inside a quoted string."""
    cuts = [index for index, char in outside_quotes(value) if char == ";"]
    return [value[start + 1:end] for start, end in zip([-1, *cuts], [*cuts, len(value)],
                                                       strict=True)]


def _param(params: list[str], wanted: str) -> str:
    """The value of MIME parameter ``wanted``, unquoted; RFC 2231 ``name*=charset''value`` too."""
    for param in params:
        name, equals, value = param.partition("=")
        name = name.strip().lower()
        if not equals or name.split("*")[0] != wanted:
            continue
        value = value.strip()
        if name.endswith("*"):
            value = value.rsplit("'", 1)[-1]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        return value.strip()
    return ""


# ---------------------------------------------------------------------------------------------
# The DSN
# ---------------------------------------------------------------------------------------------
def build_dsn(*, queue_id: str, original_mail_from: str, original_headers: bytes,
              failures: Sequence[Failure], bounce_sender: str, reporting_mta: str,
              arrival_date: float, now: float) -> bytes:
    """The DSN for ``failures`` of one message, as CRLF bytes ready for DATA.

    Raises ValueError for a null ``original_mail_from`` or no failures: both are caller bugs
    (``may_bounce`` says no to the first), and a DSN to ``<>`` cannot be delivered anyway.
    """
    if not _bare_address(original_mail_from):
        raise ValueError("no DSN goes to the null sender")
    if not failures:
        raise ValueError("a DSN needs at least one failed recipient")
    host = _hostname(reporting_mta)
    digest = _digest(queue_id, original_mail_from, failures, now)
    headers, truncated = _original_headers(original_headers)
    parts = [
        b"Content-Description: Notification\r\n" + _explanation(host, failures, truncated),
        b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
        + b"\r\n" + _delivery_status(queue_id, original_mail_from, failures, host,
                                     arrival_date),
        b"Content-Description: Undelivered Message Headers\r\n"
        b"Content-Type: text/rfc822-headers\r\n"
        + (b"" if headers.isascii() else b"Content-Transfer-Encoding: 8bit\r\n")
        + b"\r\n" + headers,
    ]
    boundary = _boundary(digest, parts)
    message_id = f"<{_message_id_part(queue_id)}.{digest[:20]}@{host}>"
    head = b"".join([
        _field("From", f"Mail Delivery System <{_header_address(bounce_sender)}>"),
        _field("To", f"<{_header_address(original_mail_from)}>"),
        _field("Subject", SUBJECT),
        _field("Date", _date(now)),
        _field("Message-ID", message_id),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type",
               f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
        b"" if headers.isascii() else _field("Content-Transfer-Encoding", "8bit"),
    ])
    delimiter = b"--" + boundary.encode()
    body = b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        # Each part ends with CRLF; the CRLF before a delimiter belongs to the delimiter
        # (RFC 2046 5.1.1), so the parts keep their final line ending.
        body += b"\r\n" + delimiter + b"\r\n" + part
    body += b"\r\n" + delimiter + b"--\r\n"
    return head + b"\r\n" + body


def _delivery_status(queue_id: str, mail_from: str, failures: Sequence[Failure], host: str,
                     arrival_date: float) -> bytes:
    """The message/delivery-status body: per-message fields, then a block per recipient."""
    blocks = [b"".join([
        _field("Reporting-MTA", f"dns; {host}"),
        _field(QUEUE_ID_FIELD, _ascii_text(queue_id)),
        _field(SENDER_FIELD, _typed_address(mail_from)),
        _field("Arrival-Date", _date(arrival_date)),
    ])]
    for failure in failures:
        blocks.append(b"".join([
            _field("Final-Recipient", _typed_address(failure.recipient)),
            _field("Action", "failed"),
            _field("Status", _failure_status(failure.status)),
            _field("Diagnostic-Code", _diagnostic_code(failure.diagnostic)),
        ]))
    # RFC 3464 2.1: blocks are separated by a blank line.
    return b"\r\n".join(blocks)


def _explanation(host: str, failures: Sequence[Failure], truncated: bool) -> bytes:
    """The human-readable part: its Content-Type (and transfer encoding) fields and body."""
    paragraphs = [
        f"This is the mail delivery system at host {host}.",
        "Your message could not be delivered to one or more recipients. The headers of your "
        "message are attached below.",
        "For further assistance, please contact your postmaster and include this report.",
    ]
    if truncated:
        paragraphs.append(f"The attached headers were cut at {MAX_ORIGINAL_HEADERS // 1024} "
                          "KiB.")
    for failure in failures:
        _, text = _split_diagnostic(failure.diagnostic)
        paragraphs.append(f"<{_human(failure.recipient)}>: {_human(text)}")
    lines: list[str] = []
    for index, paragraph in enumerate(paragraphs):
        # The recipients' paragraphs are indented after their first line, so that each
        # address stands out at the left margin.
        indent = "    " if index >= len(paragraphs) - len(failures) else ""
        lines += textwrap.wrap(paragraph, TEXT_WIDTH, break_long_words=True,
                               break_on_hyphens=False, subsequent_indent=indent)
        lines.append("")
    text = "\n".join(lines)
    if text.isascii():
        return (b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                + text.replace("\n", "\r\n").encode("ascii"))
    # Quoted-printable keeps the part 7-bit and its lines short whatever the characters.
    encoded = binascii.b2a_qp(text.encode("utf-8", "replace"), istext=True)
    return (b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            + encoded.replace(b"\n", b"\r\n"))


def _original_headers(original: bytes) -> tuple[bytes, bool]:
    """The header block to attach: body cut off, CRLF, lines <= 998, at most 64 KiB."""
    data = bytes(original)
    # A NUL breaks C mail software; the listener refuses one in a header block anyway.
    head = data[:header_end(data)].replace(b"\0", b"")
    head = fix_lines(head, last=True) if head else b""
    if len(head) <= MAX_ORIGINAL_HEADERS:
        return head, False
    # Cut where a field begins (a CRLF not followed by WSP), so no field is left half
    # folded; a single field larger than the bound is cut at a line boundary instead.
    limit = MAX_ORIGINAL_HEADERS
    while (end := head.rfind(CRLF, 0, limit)) >= 0:
        if head[end + 2:end + 3] not in (b" ", b"\t"):
            return head[:end + 2], True
        limit = end + 1
    return head[:head.rfind(CRLF, 0, MAX_ORIGINAL_HEADERS) + 2], True


def _boundary(digest: str, parts: list[bytes]) -> str:
    """A boundary that occurs in no part, in any case (some parsers compare without case)."""
    content = b"\n".join(parts).lower()
    serial = 0
    while True:
        boundary = f"=_dsn_{digest[:32]}_{serial}" if serial else f"=_dsn_{digest[:32]}"
        if boundary.lower().encode() not in content:
            return boundary
        serial += 1


def _digest(queue_id: str, mail_from: str, failures: Sequence[Failure], now: float) -> str:
    pieces = [queue_id, mail_from, repr(now)]
    for failure in failures:
        pieces += [failure.recipient, failure.status, failure.diagnostic]
    seed = "\0".join(pieces).encode("utf-8", "surrogatepass")
    return hashlib.sha256(seed).hexdigest()


# ---------------------------------------------------------------------------------------------
# Field values
# ---------------------------------------------------------------------------------------------
def _field(name: str, value: str) -> bytes:
    """``name: value`` CRLF, folded before spaces at 78 columns, no line over 998 octets."""
    line = f"{name}:".encode("ascii")
    value_bytes = value.strip(" ").encode("utf-8", "replace")
    lines = [line]
    for token in _FOLD_TOKEN.findall(b" " + value_bytes):
        if len(lines[-1]) + len(token) > FOLD_WIDTH and lines[-1] != line:
            lines.append(token)  # the token starts with its space: a valid fold
        else:
            lines[-1] += token
    out: list[bytes] = []
    for piece in lines:
        # A word with no space to fold at: broken with CRLF + space like relay.message does.
        out.append(piece[:MAX_LINE_LENGTH])
        out += [b" " + piece[start:start + MAX_LINE_LENGTH - 1]
                for start in range(MAX_LINE_LENGTH, len(piece), MAX_LINE_LENGTH - 1)]
    return CRLF.join(out) + CRLF


def _unicode_escape(char: str) -> str:
    """``\\x{HEX}`` (RFC 6533 EmbeddedUnicodeChar); a lone surrogate counts as U+FFFD."""
    point = ord(char)
    if 0xD800 <= point <= 0xDFFF:
        point = 0xFFFD  # surrogate-escaped bytes, which no HEXPOINT may name
    return f"\\x{{{point:02X}}}"


def _ascii_text(text: str) -> str:
    """``text`` on one ASCII line: controls as spaces, non-ASCII as ``\\x{HEX}``."""
    text = _C0.sub(" ", text)
    escaped = "".join(char if char < "\x80" else _unicode_escape(char) for char in text)
    return " ".join(escaped.split())


def _human(text: str) -> str:
    """``text`` for the explanation: line breakers as spaces, runs of spaces as one."""
    return " ".join(_LINE_BREAKERS.sub(" ", text).split())


def _typed_address(address: str) -> str:
    """``rfc822; addr`` for an ASCII address, else ``utf-8;`` + utf-8-addr-xtext (RFC 6533)."""
    address = _C0.sub("", address).strip(" ")
    if address.isascii():
        return f"rfc822; {address}"
    # QCHAR: printable ASCII but SP, "\", "+" and "="; everything else is escaped.
    return "utf-8; " + "".join(
        char if "\x21" <= char <= "\x7e" and char not in "\\+=" else _unicode_escape(char)
        for char in address)


def _header_address(address: str) -> str:
    """An address for From/To: ASCII or UTF-8 (RFC 6532), never a line breaker."""
    return _LINE_BREAKERS.sub("", _bare_address(address))


def _split_diagnostic(diagnostic: str) -> tuple[str, str]:
    """(diagnostic-type, text): a missing type is inferred, an unregistered one gets ``X-``."""
    match = _DIAGNOSTIC_TYPE.match(diagnostic)
    if match is None:
        kind = "smtp" if _REPLY.match(diagnostic) else LOCAL_DIAGNOSTIC_TYPE
        return kind, diagnostic
    kind, text = match.group(1), match.group(2)
    if kind.lower() == "smtp":
        kind = "smtp"
    elif not kind.lower().startswith("x-"):
        kind = "X-" + kind
    return kind, text


def _diagnostic_code(diagnostic: str) -> str:
    kind, text = _split_diagnostic(diagnostic)
    return f"{kind}; {_ascii_text(text)}".rstrip()


def _failure_status(status: str) -> str:
    status = status.strip()
    return status if _FAILURE_STATUS.fullmatch(status) else "5.0.0"


def _hostname(name: str) -> str:
    """The reporting MTA's name as an ASCII DNS name (IDNA when needed)."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        # Not a valid IDN: the filter below keeps what it can.
        with contextlib.suppress(UnicodeError):
            name = name.encode("idna").decode("ascii")
    return _HOST_CHARS.sub("", name)[:255] or "localhost"


def _message_id_part(queue_id: str) -> str:
    return _MESSAGE_ID_CHARS.sub("", queue_id)[:64] or "dsn"


def _date(timestamp: float) -> str:
    """RFC 5322 date in UTC: the output must not depend on the host's time zone."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))
