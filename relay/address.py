"""Strict parsing of the reverse-path and forward-path of MAIL and RCPT (RFC 5321 4.1.2, RFC 6531).

The address this returns is the exact text between the angle brackets, and it is what the spool
stores and what the upstream receives: nothing re-parses it later, so the address that a policy
checked is byte for byte the address that is sent. Anything a strict MTA (Postfix, Exim) would not
take is refused here, at MAIL/RCPT time, rather than failing the whole message at delivery.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterator

# RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256 including the brackets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# Non-ASCII characters are allowed in atoms and quoted strings only with SMTPUTF8 (RFC 6531
# 3.3); they are screened one by one below, since a regex class cannot express "not a control".
_DOT_STRING = re.compile(rf"[{_ATEXT}\x80-\U0010ffff]+(?:\.[{_ATEXT}\x80-\U0010ffff]+)*")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is a backslash and %d32-126.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"')
_SUB_DOMAIN = re.compile(r"[A-Za-z0-9\x80-\U0010ffff]"
                         r"(?:[A-Za-z0-9\x80-\U0010ffff-]*[A-Za-z0-9\x80-\U0010ffff])?")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# Most addresses are plain ASCII dot-atoms: one regex, no per-character screening.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE = re.compile(rf"<([{_ATEXT}]{{1,64}}(?:\.[{_ATEXT}]+)*@{_LABEL}(?:\.{_LABEL})*)>(?: (.*))?",
                     re.DOTALL)
# A source route (@a,@b:) is obsolete but legal; RFC 5321 says to accept and ignore it.
_SOURCE_ROUTE = re.compile(r"@[^,:<>]+(?:,@[^,:<>]+)*:")


class AddressError(ValueError):
    """Why an address is refused, as the SMTP reply code and enhanced status to answer with."""

    def __init__(self, code: int, enhanced: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.enhanced = enhanced
        self.reason = reason

    def reply(self, what: str) -> str:
        return f"{self.code} {self.enhanced} {what} address rejected: {self.reason}"


def parse_path(argument: str) -> tuple[str, str]:
    """Split ``<mailbox> params`` into the mailbox text and the rest; ``<>`` gives ``""``.

    Raises AddressError. Non-ASCII is accepted here; whether SMTPUTF8 allows it is the caller's
    decision, since the parameters come after the address.
    """
    text = argument.lstrip(" ")
    simple = _SIMPLE.fullmatch(text)
    if simple and len(simple.group(1)) <= MAX_PATH - 2 and \
            len(simple.group(1).partition("@")[0]) <= MAX_LOCAL_PART:
        return simple.group(1), (simple.group(2) or "").strip(" ")
    if not text.startswith("<"):
        raise AddressError(501, "5.5.4", "the address must be enclosed in <>")
    close = _closing_bracket(text)
    inner, rest = text[1:close], text[close + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError(501, "5.5.4", "parameters must follow the address after a space")
    _refuse_controls(inner)
    if len(inner) + 2 > MAX_PATH:
        raise AddressError(553, "5.1.3", f"path longer than {MAX_PATH} octets")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    if inner:
        check_mailbox(inner)
    return inner, rest.strip(" ")


def _closing_bracket(text: str) -> int:
    """The index of the ``>`` that ends the path: one inside a quoted local part does not."""
    for index, char in outside_quotes(text, 1):
        if char == ">":
            return index
    raise AddressError(501, "5.5.4", "the address has no closing >")


def outside_quotes(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, char) for each character of ``text[start:]`` outside a quoted string.

    A quoted string runs from one ``"`` to the next, with backslash escapes inside it
    (RFC 5321 Quoted-string, RFC 5322 quoted-string); the quote marks themselves are outside.
    """
    quoted = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
            yield index, char
        elif not quoted:
            yield index, char


def check_mailbox(mailbox: str) -> None:
    """Raise AddressError unless ``mailbox`` is ``Local-part "@" (Domain / address-literal)``."""
    _refuse_controls(mailbox)
    if not mailbox.isascii():
        _check_utf8(mailbox)
    local, at, domain = mailbox.rpartition("@")
    if not at or not local:
        raise AddressError(553, "5.1.3", "expected local-part@domain")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise AddressError(553, "5.1.3", "invalid local part")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError(553, "5.1.3", f"local part longer than {MAX_LOCAL_PART} octets")
    _check_domain(domain)


def _check_domain(domain: str) -> None:
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError(553, "5.1.2", f"domain longer than {MAX_DOMAIN} octets")
    if domain.startswith("[") and domain.endswith("]"):
        if not _is_address_literal(domain[1:-1]):
            raise AddressError(553, "5.1.2", "invalid address literal")
        return
    labels = domain.split(".")
    if not all(len(label) <= 63 and _SUB_DOMAIN.fullmatch(label) for label in labels):
        raise AddressError(553, "5.1.2", "invalid domain")


def _is_address_literal(literal: str) -> bool:
    try:
        if literal[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(literal[5:])
        elif literal[:1].isdigit():
            ipaddress.IPv4Address(literal)
        else:
            return bool(_GENERAL_LITERAL.fullmatch(literal))
    except ValueError:
        return False
    return True


def _refuse_controls(text: str) -> None:
    # CR and LF would let a re-parser (aiosmtplib's quote_address, a log reader) see another
    # address; NUL truncates in C code. Every control is refused, not just those three.
    for char in text:
        if char < " " or char == "\x7f":
            raise AddressError(501, "5.5.2", f"control character {ord(char):#04x} in address")


def _check_utf8(mailbox: str) -> None:
    try:
        mailbox.encode("utf-8")
    except UnicodeEncodeError:
        # aiosmtpd keeps undecodable bytes as surrogate escapes.
        raise AddressError(553, "5.6.7", "address is not valid UTF-8") from None
    for char in mailbox:
        if ord(char) >= 0x80 and unicodedata.category(char)[0] in "CZ":
            # C1 controls (U+0085), format characters, separators: invisible or line-breaking.
            raise AddressError(553, "5.6.7",
                               f"character U+{ord(char):04X} is not allowed in an address")


def ascii_mailbox(text: str) -> str:
    """``text`` when it is an ASCII address the upstream takes as it is (a configured sender:
    bounces, null senders, rewrites); ValueError saying why not."""
    if any(ord(char) < 0x20 or char == "\x7f" for char in text):
        raise ValueError("must not contain CR, LF or other control characters")
    try:
        check_mailbox(text)
    except AddressError as error:
        raise ValueError(f"not a valid address {text!r}: {error}") from None
    if not text.isascii():
        raise ValueError(f"must be an ASCII address (Infobip has no SMTPUTF8), got {text!r}")
    return text
