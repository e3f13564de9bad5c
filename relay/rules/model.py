"""What a compiled rule is made of: conditions, patterns, value templates, and the outcome.

Everything here is frozen and compares by value, so that two compilations of the same config
are equal (a reload can tell whether the rules changed). Conditions and templates read the
message through ``Facts``: the envelope and the live header block, as edited by earlier rules.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.policy import SMTP
from functools import partial
from typing import TYPE_CHECKING, Protocol

from relay.envelope import DEFAULT_UPSTREAM, MessageContext
from relay.headers import HeaderBlock
from relay.infobip.headers import ANGLE_URI, validate_header_value
from relay.netaddr import IPNetwork, network_of
from relay.units import format_size

if TYPE_CHECKING:  # sender builds on this module's templates and facts
    from relay.rules.sender import SenderRewrite

TEMPLATE_FIELDS = (
    "date",
    "datetime",
    "queue_id",
    "mail_from",
    "mail_from_domain",
    "header_from_domain",
    "header_from_name",
    "header_from_local",
    "auth_user",
    "listener",
    "client_ip",
)

# Every control but TAB: CR/LF would add header lines, the rest (\x0b, \x1b, C1) garble them.
_UNSAFE_IN_VALUES = dict.fromkeys([*range(0x09), *range(0x0a, 0x20), 0x7f, *range(0x80, 0xa0)])
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_COMMENT = re.compile(r"\([^()]*\)")
_FROM_POLICY = SMTP


# --- per-message facts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What conditions and templates look at; headers are the live, edited block."""

    ctx: MessageContext
    headers: HeaderBlock


def _address_in(value: str) -> str:
    """The address of a From-like header: ``"Foo" <a@b>`` -> ``a@b``."""
    angle = ANGLE_URI.findall(value)
    if angle:
        return str(angle[-1])
    return _COMMENT.sub("", value).strip()


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def _decoded(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _header_from(facts: Facts) -> tuple[str, ...] | None:
    value = facts.headers.get("From")
    return None if value is None else (_address_in(value),)


def from_mailbox(value: str | None) -> tuple[str, str]:
    """(display name, address) of a From value: encoded words and quoting undone, UTF-8 kept.

    Parsed with the email package's RFC 5322 parser, which also decodes RFC 2047 names; a
    value it finds no mailbox in gives ``("", "")``.
    """
    if not value:
        return "", ""
    try:
        parsed = _FROM_POLICY.header_factory("From", value)
        mailbox = parsed.addresses[0] if parsed.addresses else None
    except (HeaderParseError, IndexError, LookupError, TypeError, ValueError):
        mailbox = None
    if mailbox is None:
        return "", ""
    return str(mailbox.display_name), str(mailbox.addr_spec)


def _from_part(index: int, facts: Facts) -> str:
    return from_mailbox(facts.headers.get("From"))[index]


def _subject(facts: Facts) -> tuple[str, ...] | None:
    raw = facts.headers.get("Subject")
    if raw is None:
        return None
    decoded = _decoded(raw)
    return (raw,) if decoded == raw else (raw, decoded)


def _auth_user(facts: Facts) -> tuple[str, ...] | None:
    return (facts.ctx.auth_user,) if facts.ctx.auth_user else None


def _header_values(name: str, facts: Facts) -> tuple[str, ...] | None:
    values = facts.headers.get_all(name)
    return tuple(values) if values else None


_TEMPLATE_VALUES: dict[str, Callable[[Facts], str]] = {
    "date": lambda facts: _utc(facts.ctx.received_at).strftime("%Y-%m-%d"),
    "datetime": lambda facts: _utc(facts.ctx.received_at).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "queue_id": lambda facts: facts.ctx.queue_id,
    "mail_from": lambda facts: facts.ctx.mail_from,
    "mail_from_domain": lambda facts: _domain_of(facts.ctx.mail_from),
    "header_from_domain": lambda facts: _domain_of((_header_from(facts) or ("",))[0]),
    "header_from_name": partial(_from_part, 0),
    "header_from_local": lambda facts: _from_part(1, facts).rpartition("@")[0],
    "auth_user": lambda facts: facts.ctx.auth_user or "",
    "listener": lambda facts: facts.ctx.listener,
    "client_ip": lambda facts: facts.ctx.client_ip,
}


# --- templates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A header value with ``{placeholder}`` fields; ``parts`` alternate literal, field, ..."""

    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Split ``text`` into literals and placeholders; ValueError on bad braces or names."""
        parts: list[str] = []
        literal: list[str] = []
        position = 0
        for token in _TEMPLATE_TOKEN.finditer(text):
            literal.append(text[position : token.start()])
            position = token.end()
            if token.group(0) in ("{{", "}}"):
                literal.append(token.group(0)[0])
            elif token.group(1) is not None:
                parts.extend(("".join(literal), _placeholder(token.group(1))))
                literal = []
            else:
                raise ValueError(f"unmatched {token.group(0)!r} (write {{{{ or }}}} for a brace)")
        literal.append(text[position:])
        parts.append("".join(literal))
        return cls(tuple(parts))

    @property
    def fields(self) -> tuple[str, ...]:
        """Placeholder names in order of appearance."""
        return self.parts[1::2]

    def render(self, lookup: Callable[[str], str]) -> str:
        """Fill the placeholders; controls are dropped so values cannot add or garble headers."""
        if len(self.parts) == 1:
            return self.parts[0]
        pieces = list(self.parts)
        for index in range(1, len(pieces), 2):
            pieces[index] = lookup(pieces[index]).translate(_UNSAFE_IN_VALUES)
        return "".join(pieces)


def _placeholder(name: str) -> str:
    if name not in _TEMPLATE_VALUES:
        raise ValueError(
            f"unknown placeholder {{{name}}}; known: {', '.join(TEMPLATE_FIELDS)}"
            f" (write {{{{ or }}}} for a literal brace)"
        )
    return name


# --- conditions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pattern:
    """A glob (case-insensitive, whole value) or, with a ``re:`` prefix, a regex search."""

    source: str
    regex: re.Pattern[str]
    search: bool

    @classmethod
    def compile(cls, source: str) -> Pattern:
        """Compile ``source``; ValueError for a bad regular expression."""
        if source.startswith("re:"):
            try:
                return cls(source, re.compile(source[3:]), search=True)
            except re.error as error:
                raise ValueError(f"invalid regular expression {source[3:]!r}: {error}") from None
        return cls(source, re.compile(fnmatch.translate(source), re.IGNORECASE), search=False)

    def matches(self, value: str) -> bool:
        """Whether ``value`` matches."""
        found = self.regex.search(value) if self.search else self.regex.match(value)
        return found is not None


class Condition(Protocol):
    """One ``when`` key of a rule."""

    @property
    def key(self) -> str:
        """The ``when`` key, e.g. ``mail_from`` or ``header.X-Mailer``."""
        ...

    def matches(self, facts: Facts) -> bool:
        """Whether the message satisfies the condition."""
        ...

    def explain(self, facts: Facts) -> tuple[bool, str]:
        """Whether it matches and a sentence saying why."""
        ...


_VALUE_SOURCES: dict[str, tuple[Callable[[Facts], tuple[str, ...] | None], str]] = {
    "mail_from": (lambda facts: (facts.ctx.mail_from,), "no envelope sender"),
    "rcpt_to": (lambda facts: facts.ctx.rcpt_tos, "no recipients"),
    "listener": (lambda facts: (facts.ctx.listener,), "no listener"),
    "auth_user": (_auth_user, "the client did not authenticate"),
    "header_from": (_header_from, "the message has no From header"),
    "subject": (_subject, "the message has no Subject header"),
}


@dataclass(frozen=True, slots=True)
class PatternCondition:
    """Any of the message's values for ``key`` (or for ``header``) matches any pattern.

    Values are looked up by name rather than stored as callables so that two compilations
    of the same config compare equal (config reloads can tell whether rules changed).
    """

    key: str
    patterns: tuple[Pattern, ...]
    header: str = ""  # for the ``header`` condition: the header name

    def matches(self, facts: Facts) -> bool:
        """Whether any value matches any pattern (a missing value never matches)."""
        values = self._values(facts)
        return values is not None and any(
            pattern.matches(value) for value in values for pattern in self.patterns
        )

    def explain(self, facts: Facts) -> tuple[bool, str]:
        """See ``Condition.explain``."""
        values = self._values(facts)
        if values is None:
            missing = f"the message has no {self.header} header"
            return False, f"{self.key}: {missing if self.header else _VALUE_SOURCES[self.key][1]}"
        for value in values:
            for pattern in self.patterns:
                if pattern.matches(value):
                    return True, f"{self.key} {value!r} matches {pattern.source!r}"
        shown = repr(values[0]) if len(values) == 1 else repr(list(values))
        return False, f"{self.key} {shown} does not match {_sources(self.patterns)}"

    def _values(self, facts: Facts) -> tuple[str, ...] | None:
        if self.header:
            return _header_values(self.header, facts)
        return _VALUE_SOURCES[self.key][0](facts)


def _sources(patterns: tuple[Pattern, ...]) -> str:
    quoted = ", ".join(repr(pattern.source) for pattern in patterns)
    return quoted if len(patterns) == 1 else f"any of {quoted}"


@dataclass(frozen=True, slots=True)
class ClientCondition:
    """The client's IP address is in one of ``networks``."""

    networks: tuple[IPNetwork, ...]
    key: str = "client"

    def matches(self, facts: Facts) -> bool:
        """Whether the client address lies in any network."""
        return network_of(facts.ctx.client_ip, self.networks) is not None

    def explain(self, facts: Facts) -> tuple[bool, str]:
        """See ``Condition.explain``."""
        ip = facts.ctx.client_ip
        network = network_of(ip, self.networks)
        if network is not None:
            return True, f"client {ip} is in {network}"
        listed = ", ".join(str(network) for network in self.networks)
        return False, f"client {ip!r} is not in {listed}"


@dataclass(frozen=True, slots=True)
class SizeCondition:
    """The message is larger (``size_over``) or smaller (``size_under``) than ``limit``."""

    key: str
    limit: int

    def matches(self, facts: Facts) -> bool:
        """Compare the message size with the limit."""
        size = facts.ctx.size
        return size > self.limit if self.key == "size_over" else size < self.limit

    def explain(self, facts: Facts) -> tuple[bool, str]:
        """See ``Condition.explain``."""
        ok = self.matches(facts)
        relation = (">" if ok else "<=") if self.key == "size_over" else ("<" if ok else ">=")
        limit = format_size(self.limit)
        return ok, f"{self.key}: size {facts.ctx.size} {relation} {limit}"


# --- compiled rules ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderValue:
    """One ``set``/``default`` entry: canonical name and its value or value template."""

    name: str
    value: str  # normalised value; for a template, the template source
    template: Template | None = None

    def render(self, facts: Facts) -> str:
        """The value for this message; ValueError if a filled-in template is invalid."""
        if self.template is None:
            return self.value
        lookup = partial(lookup_template_value, facts)
        return validate_header_value(self.name, self.template.render(lookup))


def lookup_template_value(facts: Facts, name: str) -> str:
    """The value of placeholder ``name`` for this message."""
    return _TEMPLATE_VALUES[name](facts)


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule; ``remove`` holds header-name globs.

    ``index`` is the rule's place in the list counting from 0, as in error paths
    (``rules[0]``); the default ``name`` counts from 1 (``rule 1``), like people do.
    """

    name: str
    index: int
    conditions: tuple[Condition, ...]
    set: tuple[HeaderValue, ...] = ()
    default: tuple[HeaderValue, ...] = ()
    remove: tuple[str, ...] = ()
    stop: bool = False
    route: str | None = None  # the named upstream (checked against the config's upstreams)
    rewrite: SenderRewrite | None = None


@dataclass(frozen=True, slots=True)
class RulesOutcome:
    """What ``apply_rules`` did to one message."""

    data: bytes
    matched: tuple[str, ...]
    explanations: tuple[str, ...]
    fixed: int
    dropped: int
    warnings: tuple[str, ...]
    # The upstream chosen by the last matching rule with ``route``.
    route: str = DEFAULT_UPSTREAM
    # The envelope sender set by the last matching ``rewrite.mail_from`` (None: unchanged).
    mail_from: str | None = None
