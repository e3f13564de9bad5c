"""The rule action ``rewrite``: send old applications' mail under a verified sender identity.

```yaml
rewrite:
  mail_from: noreply@example.com                          # the envelope sender
  header_from: "{header_from_name} <noreply@example.com>" # the From: header, a template
  reply_to: original                                      # Reply-To: the original From
```

Everything is checked when the config loads (addresses parse, no CR/LF, known placeholders);
per message only the filled-in template can still be wrong, and then the From is left alone
with a warning, like any other header a rule could not set.

The From field is written by the email package (RFC 5322 quoting, RFC 2047 encoded words for a
non-ASCII display name, folded at 78 columns), never by hand: Infobip and the recipients'
mailers decode it as the standard says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.policy import SMTP

from relay.address import ascii_mailbox
from relay.errors import ConfigError
from relay.headers import MAX_LINE_LENGTH, format_field
from relay.rules.model import Template, from_mailbox
from relay.settings import Section, choice, describe

_REWRITE_KEYS = ("mail_from", "header_from", "reply_to")
# ``Name <address>``: the name part (possibly empty) and the address inside the last brackets.
_NAME_ADDR = re.compile(r"(?s)(.*)<([^<>]*)>\s*")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
# 78 columns (RFC 5322 2.1.1's SHOULD), well under the 998 octets every line MUST keep to.
_FIELD_POLICY = SMTP.clone(max_line_length=78)


@dataclass(frozen=True, slots=True)
class FromTemplate:
    """A ``header_from`` value: an optional display-name template and an address template."""

    source: str
    name: Template | None
    address: Template

    @classmethod
    def parse(cls, text: str) -> FromTemplate:
        """``{header_from_name} <noreply@example.com>`` or a bare address; ValueError if bad."""
        match = _NAME_ADDR.fullmatch(text)
        if match is None:
            return cls(text, None, _address_template(text))
        name = match.group(1).strip()
        return cls(text, Template.parse(name) if name else None,
                   _address_template(match.group(2)))

    def render(self, lookup: Callable[[str], str]) -> bytes:
        """The whole ``From:`` field, folded and encoded; ValueError for a bad address."""
        address = self.address.render(lookup).strip()
        ascii_mailbox(address)
        name = " ".join(self.name.render(lookup).split()) if self.name is not None else ""
        return format_from_field(name, address)


def _address_template(text: str) -> Template:
    template = Template.parse(text.strip())
    if not template.fields:
        ascii_mailbox(text.strip())  # a fixed address is checked as it is
    return template


def format_from_field(display_name: str, address: str, name: str = "From") -> bytes:
    """``From: =?utf-8?q?J=C3=B6rg?= <noreply@example.com>\\r\\n``, by the email package.

    ValueError when the email package cannot make a mailbox of it or a line would exceed 998
    octets (an address that long).
    """
    try:
        value = str(Address(display_name=display_name, addr_spec=address))
        field = _FIELD_POLICY.header_factory(name, value).fold(policy=_FIELD_POLICY)
    except (HeaderParseError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f"cannot write {name}: {error}") from None
    raw = str(field).encode("ascii")
    if any(len(line) > MAX_LINE_LENGTH for line in raw.split(b"\r\n")):
        raise ValueError(f"{name} would have a line over {MAX_LINE_LENGTH} octets")
    return raw


def reply_to_field(original_from: str) -> bytes:
    """``Reply-To:`` with the original From: as it was when it is ASCII (it may be signed or
    list several mailboxes), re-encoded like the new From when it carries raw UTF-8."""
    if original_from.isascii():
        return format_field("Reply-To", original_from)
    display_name, address = from_mailbox(original_from)
    try:
        return format_from_field(display_name, ascii_mailbox(address), "Reply-To")
    except ValueError:  # an internationalised address: nothing to encode it as, kept as sent
        return format_field("Reply-To", original_from)


@dataclass(frozen=True, slots=True)
class SenderRewrite:
    """A compiled ``rewrite``: what to replace (None/False: leave it)."""

    mail_from: str | None = None
    header_from: FromTemplate | None = None
    reply_to_original: bool = False

    def describe(self) -> str:
        """For the ``rules test`` report."""
        parts = []
        if self.mail_from is not None:
            parts.append(f"mail_from: {self.mail_from}")
        if self.header_from is not None:
            parts.append(f"header_from: {self.header_from.source}")
        if self.reply_to_original:
            parts.append("reply_to: original")
        return "rewrite " + ", ".join(parts)


def compile_rewrite(raw: object, where: str, samples: Mapping[str, str]) -> SenderRewrite | None:
    """Validate a rule's ``rewrite`` mapping; ConfigError naming the key at fault.

    ``samples``: placeholder values to fill a template with, so that a template whose result
    could never be an address is refused now.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(where, "must be a mapping with mail_from, header_from and/or reply_to,"
                                 f" got {describe(raw)}")
    section = Section(raw, where, keys=_REWRITE_KEYS)
    mail_from = section.get("mail_from")
    header_from = section.get("header_from")
    reply_to = section.get("reply_to")
    return SenderRewrite(
        mail_from=None if mail_from is None else _text(mail_from, section.at("mail_from"),
                                                       ascii_mailbox),
        header_from=None if header_from is None else _from_template(
            header_from, section.at("header_from"), samples),
        reply_to_original=reply_to is not None and _text(
            reply_to, section.at("reply_to"), choice("original")) == "original",
    )


def _text(raw: object, where: str, parse: Callable[[str], str]) -> str:
    if not isinstance(raw, str):
        raise ConfigError(where, f"must be a string, got {describe(raw)}")
    if _CONTROLS.search(raw):
        raise ConfigError(where, "must not contain CR, LF or other control characters")
    try:
        return parse(raw.strip())
    except ValueError as error:
        raise ConfigError(where, str(error)) from None


def _from_template(raw: object, where: str, samples: Mapping[str, str]) -> FromTemplate:
    template = _text(raw, where, lambda text: text)
    try:
        parsed = FromTemplate.parse(template)
        parsed.render(samples.__getitem__)
    except ValueError as error:
        raise ConfigError(where, str(error)) from None
    return parsed
