"""Header rules: compile the ``rules:`` config list, evaluate it per message, edit headers.

Compiling validates everything a rule can get wrong (keys, header names, values, patterns,
networks, templates) so that a bad rule stops the relay at start-up instead of producing
mail that Infobip rejects or misreads.

Evaluation order for one message (``apply_rules``):

1. the header block is parsed once (``relay.headers``);
2. the listener's ``client_headers`` policy runs on the headers the application sent;
3. rules run in order; conditions see the headers as edited by earlier rules, every
   matching rule applies and a matching rule with ``stop: true`` ends evaluation;
4. within one rule: ``remove`` first, then ``set``, then ``default``, and
   ``List-Unsubscribe-Post`` last, and only when the message then carries an https
   ``List-Unsubscribe`` (RFC 8058);
5. the header block is serialised once; the body is never copied into anything but the
   result, and when nothing changed the original ``data`` object is returned.

Applying the same rules to their own output changes nothing (``set`` replaces in place,
``default`` only fills a gap, remove-then-set restores the original position), as long as
no condition tests a header that the rules themselves write.

RFC 8058 at config time: a rule that writes ``List-Unsubscribe-Post`` and also writes
``List-Unsubscribe`` must give the latter an https URI.  A rule that writes only
``List-Unsubscribe-Post`` is accepted: it relies on the message's own header, checked per
message (the header is then skipped with a warning if there is no https URI).

Rule paths in errors are 1-based (``rules[2]`` is the second rule), like the default rule
names (``rule 2``).
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from functools import partial
from typing import Protocol
from urllib.parse import urlsplit

from relay.envelope import MessageContext
from relay.errors import ConfigError
from relay.headers import HeaderBlock, is_field_name
from relay.units import format_size, parse_size

IB_HEADERS = (
    "X-IB-Bulk-Id",
    "X-IB-Callback-Data",
    "X-IB-Intermediate-Report",
    "X-IB-Notify-Content-Type",
    "X-IB-Notify-Url",
    "X-IB-Tracking-Url",
    "X-IB-Track",
    "X-IB-Track-Clicks",
    "X-IB-Track-Opens",
    "X-IB-Client-Priority",
    "X-IB-Application-Id",
    "X-IB-Entity-Id",
    "X-IB-Skip-Passive-Storage",
    "X-IB-Skip-Active-Storage",
)
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"
CLIENT_HEADER_POLICIES = ("keep", "fix", "strip")
TEMPLATE_FIELDS = (
    "date",
    "datetime",
    "queue_id",
    "mail_from",
    "mail_from_domain",
    "header_from_domain",
    "auth_user",
    "listener",
    "client_ip",
)

_CANONICAL = {name.lower(): name for name in (*IB_HEADERS, LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST)}
_RULE_KEYS = ("name", "when", "set", "default", "remove", "stop")
_WHEN_KEYS = (
    "mail_from",
    "header_from",
    "rcpt_to",
    "client",
    "auth_user",
    "listener",
    "subject",
    "header",
    "size_over",
    "size_under",
)
_FORBIDDEN_CHARS = re.compile(r"[\r\n\0]")
# Every control but TAB: CR/LF would add header lines, the rest (\x0b, \x1b, C1) garble them.
_UNSAFE_IN_VALUES = dict.fromkeys([*range(0x09), *range(0x0a, 0x20), 0x7f, *range(0x80, 0xa0)])
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_UNSUBSCRIBE_LIST = re.compile(r"\s*<[^<>]*>\s*(?:,\s*<[^<>]*>\s*)*")
_ANGLE_URI = re.compile(r"<\s*([^<>]*?)\s*>")
_COMMENT = re.compile(r"\([^()]*\)")
_GLOB_CHARS = frozenset("*?[]")

# Values used to validate templated header values at load time.
_SAMPLE_VALUES = {
    "date": "2024-01-31",
    "datetime": "2024-01-31T12:00:00Z",
    "queue_id": "4XK2P9QZ7M1B",
    "mail_from": "sender@example.com",
    "mail_from_domain": "example.com",
    "header_from_domain": "example.com",
    "auth_user": "app",
    "listener": "default",
    "client_ip": "192.0.2.10",
}


# --- header names and values -------------------------------------------------------------


def canonical_header_name(name: str) -> str:
    """Return the canonical spelling of a known header, or ``name`` itself for other headers.

    Raises ValueError for an invalid field name or an unknown ``X-IB-*`` header.
    """
    if not is_field_name(name):
        raise ValueError(f"{name!r} is not a valid header name (printable ASCII except ':')")
    known = _CANONICAL.get(name.lower())
    if known is not None:
        return known
    if name.lower().startswith("x-ib-"):
        raise ValueError(f"unknown Infobip header {name!r}{_did_you_mean(name, IB_HEADERS)}")
    return name


def validate_header_value(name: str, value: str) -> str:
    """Return ``value`` normalised for header ``name`` or raise ValueError saying why not."""
    canonical = canonical_header_name(name)
    if _FORBIDDEN_CHARS.search(value):
        raise ValueError("must not contain CR, LF or NUL characters")
    value = value.strip(" \t")
    check = _VALUE_CHECKS.get(canonical)
    return value if check is None else check(value)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]}?" if close else ""


def _one_of(*allowed: str) -> Callable[[str], str]:
    by_lower = {choice.lower(): choice for choice in allowed}

    def check(value: str) -> str:
        try:
            return by_lower[value.lower()]
        except KeyError:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}") from None

    return check


def _length(low: int, high: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(value) < low:
            raise ValueError("must not be empty")
        if len(value) > high:
            raise ValueError(f"must be at most {high} characters, got {len(value)}")
        return value

    return check


def _check_url(value: str) -> str:
    message = f"must be an absolute http or https URL with a host, got {value!r}"
    if not value.isascii() or any(char.isspace() for char in value):
        raise ValueError(message)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(message) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(message)
    return value


def _check_list_unsubscribe(value: str) -> str:
    message = f"must be one or more <uri> separated by commas, got {value!r}"
    if not _UNSUBSCRIBE_LIST.fullmatch(value):
        raise ValueError(message)
    uris = _ANGLE_URI.findall(value)
    for uri in uris:
        if not uri or any(char.isspace() for char in uri) or not urlsplit(uri).scheme:
            raise ValueError(message)
    return ", ".join(f"<{uri}>" for uri in uris)


def _check_one_click(value: str) -> str:
    if value.lower() != ONE_CLICK.lower():
        raise ValueError(f"must be exactly {ONE_CLICK}, got {value!r}")
    return ONE_CLICK


def _has_https_uri(list_unsubscribe: str) -> bool:
    return any(uri.lower().startswith("https://") for uri in _ANGLE_URI.findall(list_unsubscribe))


_BOOLEAN = _one_of("true", "false")
_VALUE_CHECKS: dict[str, Callable[[str], str]] = {
    "X-IB-Client-Priority": _one_of("HIGH", "STANDARD", "LOW"),
    "X-IB-Notify-Content-Type": _one_of("application/json", "application/xml"),
    "X-IB-Track": _BOOLEAN,
    "X-IB-Track-Clicks": _BOOLEAN,
    "X-IB-Track-Opens": _BOOLEAN,
    "X-IB-Intermediate-Report": _BOOLEAN,
    "X-IB-Skip-Passive-Storage": _BOOLEAN,
    "X-IB-Skip-Active-Storage": _BOOLEAN,
    "X-IB-Notify-Url": _check_url,
    "X-IB-Tracking-Url": _check_url,
    "X-IB-Bulk-Id": _length(1, 100),
    "X-IB-Callback-Data": _length(1, 4000),
    "X-IB-Application-Id": _length(1, 255),
    "X-IB-Entity-Id": _length(1, 255),
    LIST_UNSUBSCRIBE: _check_list_unsubscribe,
    LIST_UNSUBSCRIBE_POST: _check_one_click,
}


# --- per-message facts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    """What conditions and templates look at; headers are the live, edited block."""

    ctx: MessageContext
    headers: HeaderBlock


def _address_in(value: str) -> str:
    """The address of a From-like header: ``"Foo" <a@b>`` -> ``a@b``."""
    angle = _ANGLE_URI.findall(value)
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


def _header_from(facts: _Facts) -> tuple[str, ...] | None:
    value = facts.headers.get("From")
    return None if value is None else (_address_in(value),)


def _subject(facts: _Facts) -> tuple[str, ...] | None:
    raw = facts.headers.get("Subject")
    if raw is None:
        return None
    decoded = _decoded(raw)
    return (raw,) if decoded == raw else (raw, decoded)


def _auth_user(facts: _Facts) -> tuple[str, ...] | None:
    return (facts.ctx.auth_user,) if facts.ctx.auth_user else None


def _header_values(name: str, facts: _Facts) -> tuple[str, ...] | None:
    values = facts.headers.get_all(name)
    return tuple(values) if values else None


_TEMPLATE_VALUES: dict[str, Callable[[_Facts], str]] = {
    "date": lambda facts: _utc(facts.ctx.received_at).strftime("%Y-%m-%d"),
    "datetime": lambda facts: _utc(facts.ctx.received_at).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "queue_id": lambda facts: facts.ctx.queue_id,
    "mail_from": lambda facts: facts.ctx.mail_from,
    "mail_from_domain": lambda facts: _domain_of(facts.ctx.mail_from),
    "header_from_domain": lambda facts: _domain_of((_header_from(facts) or ("",))[0]),
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

    def matches(self, facts: _Facts) -> bool:
        """Whether the message satisfies the condition."""
        ...

    def explain(self, facts: _Facts) -> tuple[bool, str]:
        """Whether it matches and a sentence saying why."""
        ...


_VALUE_SOURCES: dict[str, tuple[Callable[[_Facts], tuple[str, ...] | None], str]] = {
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

    def matches(self, facts: _Facts) -> bool:
        """Whether any value matches any pattern (a missing value never matches)."""
        values = self._values(facts)
        return values is not None and any(
            pattern.matches(value) for value in values for pattern in self.patterns
        )

    def explain(self, facts: _Facts) -> tuple[bool, str]:
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

    def _values(self, facts: _Facts) -> tuple[str, ...] | None:
        if self.header:
            return _header_values(self.header, facts)
        return _VALUE_SOURCES[self.key][0](facts)


def _sources(patterns: tuple[Pattern, ...]) -> str:
    quoted = ", ".join(repr(pattern.source) for pattern in patterns)
    return quoted if len(patterns) == 1 else f"any of {quoted}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClientCondition:
    """The client's IP address is in one of ``networks``."""

    networks: tuple[Network, ...]
    key: str = "client"

    def matches(self, facts: _Facts) -> bool:
        """Whether the client address lies in any network."""
        return self._network_of(facts.ctx.client_ip) is not None

    def explain(self, facts: _Facts) -> tuple[bool, str]:
        """See ``Condition.explain``."""
        ip = facts.ctx.client_ip
        network = self._network_of(ip)
        if network is not None:
            return True, f"client {ip} is in {network}"
        listed = ", ".join(str(network) for network in self.networks)
        return False, f"client {ip!r} is not in {listed}"

    def _network_of(self, client_ip: str) -> Network | None:
        try:
            address = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return None
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        for network in self.networks:
            if any(candidate in network for candidate in candidates):
                return network
        return None


@dataclass(frozen=True, slots=True)
class SizeCondition:
    """The message is larger (``size_over``) or smaller (``size_under``) than ``limit``."""

    key: str
    limit: int

    def matches(self, facts: _Facts) -> bool:
        """Compare the message size with the limit."""
        size = facts.ctx.size
        return size > self.limit if self.key == "size_over" else size < self.limit

    def explain(self, facts: _Facts) -> tuple[bool, str]:
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

    def render(self, facts: _Facts) -> str:
        """The value for this message; ValueError if a filled-in template is invalid."""
        if self.template is None:
            return self.value
        lookup = partial(_lookup_template_value, facts)
        return validate_header_value(self.name, self.template.render(lookup))


def _lookup_template_value(facts: _Facts, name: str) -> str:
    return _TEMPLATE_VALUES[name](facts)


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule; ``index`` is 1-based, ``remove`` holds header-name globs."""

    name: str
    index: int
    conditions: tuple[Condition, ...]
    set: tuple[HeaderValue, ...] = ()
    default: tuple[HeaderValue, ...] = ()
    remove: tuple[str, ...] = ()
    stop: bool = False


@dataclass(frozen=True, slots=True)
class RulesOutcome:
    """What ``apply_rules`` did to one message."""

    data: bytes
    matched: tuple[str, ...]
    explanations: tuple[str, ...]
    fixed: int
    dropped: int
    warnings: tuple[str, ...]


# --- compiling -----------------------------------------------------------------------------


def compile_rules(raw: object, path: str = "rules") -> tuple[Rule, ...]:
    """Validate the parsed YAML ``rules`` list and compile it; raises ConfigError."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(path, f"must be a list of rules, got {_type_name(raw)}")
    rules = tuple(_compile_rule(item, index, path) for index, item in enumerate(raw, start=1))
    seen: dict[str, int] = {}
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(
                f"{path}[{rule.index}]",
                f"duplicate rule name {rule.name!r} (also rules[{seen[rule.name]}])",
            )
        seen[rule.name] = rule.index
    return rules


def _compile_rule(item: object, index: int, path: str) -> Rule:
    where = f"{path}[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(
            where, f"must be a mapping with when/set/default/remove/stop, got {_type_name(item)}"
        )
    name = _rule_name(item.get("name"), index, where)
    if "name" in item:
        where = f"{where} ({name})"
    _reject_unknown_keys(item, _RULE_KEYS, where)
    rule = Rule(
        name=name,
        index=index,
        conditions=_compile_when(item.get("when"), f"{where}.when"),
        set=_compile_header_values(item.get("set"), f"{where}.set"),
        default=_compile_header_values(item.get("default"), f"{where}.default"),
        remove=_compile_remove(item.get("remove"), f"{where}.remove"),
        stop=_compile_stop(item.get("stop", False), f"{where}.stop"),
    )
    if not (rule.set or rule.default or rule.remove or rule.stop):
        raise ConfigError(where, "needs at least one action: set, default, remove or stop: true")
    _check_set_default_overlap(rule, where)
    _check_one_click_rule(rule, where)
    return rule


def _rule_name(raw: object, index: int, where: str) -> str:
    if raw is None:
        return f"rule {index}"
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}.name", "must be a non-empty string")
    return raw.strip()


def _reject_unknown_keys(
    mapping: Mapping[object, object], known: Sequence[str], where: str
) -> None:
    for key in mapping:
        if key not in known:
            hint = _did_you_mean(str(key), known)
            raise ConfigError(
                f"{where}.{key}", f"unknown key{hint or '; expected one of ' + ', '.join(known)}"
            )


def _compile_stop(raw: object, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(where, f"must be true or false, got {raw!r}")
    return raw


def _compile_when(raw: object, where: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping of conditions, got {_type_name(raw)}")
    _reject_unknown_keys(raw, _WHEN_KEYS, where)
    conditions: list[Condition] = []
    for key, value in raw.items():
        conditions.extend(_compile_condition(key, value, f"{where}.{key}"))
    return tuple(conditions)


def _compile_condition(key: str, raw: object, where: str) -> list[Condition]:
    if key == "client":
        return [ClientCondition(_compile_networks(raw, where))]
    if key in ("size_over", "size_under"):
        try:
            return [SizeCondition(key, parse_size(raw))]
        except ValueError as error:
            raise ConfigError(where, str(error)) from None
    if key == "header":
        return _compile_header_conditions(raw, where)
    return [PatternCondition(key, _compile_patterns(raw, where))]


def _compile_header_conditions(raw: object, where: str) -> list[Condition]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(where, "must be a non-empty mapping of header name: pattern(s)")
    conditions: list[Condition] = []
    for name, patterns in raw.items():
        canonical = _header_name(name, f"{where}.{name}")
        conditions.append(
            PatternCondition(
                f"header.{canonical}", _compile_patterns(patterns, f"{where}.{name}"), canonical
            )
        )
    return conditions


def _compile_patterns(raw: object, where: str) -> tuple[Pattern, ...]:
    patterns = []
    for item in _one_or_many(raw, where):
        try:
            patterns.append(Pattern.compile(item))
        except ValueError as error:
            raise ConfigError(where, str(error)) from None
    return tuple(patterns)


def _compile_networks(raw: object, where: str) -> tuple[Network, ...]:
    networks = []
    for item in _one_or_many(raw, where):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as error:
            raise ConfigError(where, f"invalid network {item!r}: {error}") from None
    return tuple(networks)


def _one_or_many(raw: object, where: str) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(where, "must not be an empty list")
    strings = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ConfigError(where, f"expected a string or a list of strings, got {item!r}")
        strings.append(str(item))
    return strings


def _header_name(raw: object, where: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(where, f"header names must be strings, got {raw!r}")
    try:
        return canonical_header_name(raw)
    except ValueError as error:
        raise ConfigError(where, str(error)) from None


def _compile_header_values(raw: object, where: str) -> tuple[HeaderValue, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping of header: value, got {_type_name(raw)}")
    entries: dict[str, HeaderValue] = {}
    for name, value in raw.items():
        entry = _compile_header_value(name, value, f"{where}.{name}")
        if entry.name.lower() in entries:
            raise ConfigError(f"{where}.{name}", "header given twice (names are case-insensitive)")
        entries[entry.name.lower()] = entry
    return tuple(entries.values())


def _compile_header_value(name: object, raw: object, where: str) -> HeaderValue:
    canonical = _header_name(name, where)
    text = _scalar_text(raw, where)
    if _FORBIDDEN_CHARS.search(text):
        raise ConfigError(where, "must not contain CR, LF or NUL characters")
    try:
        template = Template.parse(text)
    except ValueError as error:
        raise ConfigError(where, str(error)) from None
    sample = template.render(_SAMPLE_VALUES.__getitem__)
    try:
        value = validate_header_value(canonical, sample)
    except ValueError as error:
        note = f" (with sample values: {sample!r})" if template.fields else ""
        raise ConfigError(where, f"{error}{note}") from None
    if template.fields:
        return HeaderValue(canonical, text, template)
    return HeaderValue(canonical, value)


def _scalar_text(raw: object, where: str) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str | int | float):
        return str(raw)
    raise ConfigError(where, f"must be a string, number or boolean, got {_type_name(raw)}")


def _compile_remove(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    globs = []
    for item in _one_or_many(raw, where):
        if not is_field_name(item):
            raise ConfigError(where, f"{item!r} is not a header name or glob")
        # A plain name is checked like a set key, so a typo in an X-IB name is caught.
        globs.append(item if _GLOB_CHARS.intersection(item) else _header_name(item, where))
    return tuple(globs)


def _check_set_default_overlap(rule: Rule, where: str) -> None:
    in_set = {entry.name.lower() for entry in rule.set}
    for entry in rule.default:
        if entry.name.lower() in in_set:
            raise ConfigError(
                f"{where}.default.{entry.name}", "is also in set, so the default never applies"
            )


def _check_one_click_rule(rule: Rule, where: str) -> None:
    entries = {entry.name: entry for entry in (*rule.default, *rule.set)}
    post = entries.get(LIST_UNSUBSCRIBE_POST)
    unsubscribe = entries.get(LIST_UNSUBSCRIBE)
    if post is None or unsubscribe is None:
        return  # without List-Unsubscribe in the rule, the message's own one is checked later
    value = unsubscribe.value
    if unsubscribe.template is not None:
        value = unsubscribe.template.render(_SAMPLE_VALUES.__getitem__)
    if not _has_https_uri(value):
        section = "set" if post in rule.set else "default"
        raise ConfigError(
            f"{where}.{section}.{LIST_UNSUBSCRIBE_POST}",
            f"needs an https URI in {LIST_UNSUBSCRIBE} (RFC 8058), got {value!r}",
        )


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


# --- applying ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Edits:
    """Counters and warnings gathered while editing one message."""

    fixed: int = 0
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Trace:
    """How one rule fared, for explanations and the ``rules test`` report."""

    rule: Rule
    status: str  # "matched", "not matched" or "skipped"
    checks: tuple[tuple[bool, str], ...] = ()
    stopped_by: str = ""

    def sentence(self) -> str:
        if self.status == "skipped":
            return f"{self.rule.name}: not evaluated, rule {self.stopped_by!r} stopped evaluation"
        if not self.checks:
            return f"{self.rule.name}: matched, it has no conditions"
        wanted = self.status == "matched"
        reasons = " and ".join(text for ok, text in self.checks if ok == wanted)
        return f"{self.rule.name}: {self.status} because {reasons}"


def apply_rules(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str = "fix",
    explain: bool = False,
) -> RulesOutcome:
    """Apply the client-header policy and the rules to one message (see module docstring)."""
    outcome, _ = _evaluate(rules, ctx, data, client_headers, explain)
    return outcome


def _evaluate(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str,
    explain: bool,
) -> tuple[RulesOutcome, list[_Trace]]:
    if client_headers not in CLIENT_HEADER_POLICIES:
        raise ValueError(f"client_headers must be one of {', '.join(CLIENT_HEADER_POLICIES)}")
    if not rules and client_headers == "keep":
        return RulesOutcome(data, (), (), 0, 0, ()), []
    block, offset = HeaderBlock.parse(data)
    edits = _Edits()
    _apply_client_policy(block, client_headers, edits)
    traces = _run_rules(rules, _Facts(ctx, block), edits, explain)
    head = block.to_bytes()
    result = data if head == block.original else head + data[offset:]
    outcome = RulesOutcome(
        data=result,
        matched=tuple(trace.rule.name for trace in traces if trace.status == "matched"),
        explanations=tuple(trace.sentence() for trace in traces) if explain else (),
        fixed=edits.fixed,
        dropped=edits.dropped,
        warnings=tuple(edits.warnings),
    )
    return outcome, traces


def _run_rules(
    rules: tuple[Rule, ...], facts: _Facts, edits: _Edits, explain: bool
) -> list[_Trace]:
    traces: list[_Trace] = []
    stopped_by = ""
    for rule in rules:
        if stopped_by:
            if explain:
                traces.append(_Trace(rule, "skipped", stopped_by=stopped_by))
            continue
        checks: tuple[tuple[bool, str], ...] = ()
        if explain:
            checks = tuple(condition.explain(facts) for condition in rule.conditions)
            matched = all(ok for ok, _ in checks)
        else:
            matched = all(condition.matches(facts) for condition in rule.conditions)
        if matched:
            _apply_actions(rule, facts, edits)
            stopped_by = rule.name if rule.stop else ""
        if matched or explain:
            traces.append(_Trace(rule, "matched" if matched else "not matched", checks))
    return traces


def _apply_actions(rule: Rule, facts: _Facts, edits: _Edits) -> None:
    block = facts.headers
    for glob in rule.remove:
        block.remove(glob)
    one_click: list[tuple[HeaderValue, bool]] = []
    for entries, replace in ((rule.set, True), (rule.default, False)):
        for entry in entries:
            if entry.name == LIST_UNSUBSCRIBE_POST:
                one_click.append((entry, replace))
            else:
                _write_header(rule, entry, replace, facts, edits)
    for entry, replace in one_click:
        if _message_has_https_unsubscribe(block):
            _write_header(rule, entry, replace, facts, edits)
        else:
            edits.warnings.append(
                f"rule {rule.name!r}: {LIST_UNSUBSCRIBE_POST} not added, the message has no"
                f" https {LIST_UNSUBSCRIBE} (RFC 8058)"
            )


def _write_header(
    rule: Rule, entry: HeaderValue, replace: bool, facts: _Facts, edits: _Edits
) -> None:
    if not replace and facts.headers.has(entry.name):
        return
    try:
        value = entry.render(facts)
    except ValueError as error:
        edits.warnings.append(f"rule {rule.name!r}: {entry.name} not set: {error}")
        return
    facts.headers.set(entry.name, value)


def _message_has_https_unsubscribe(block: HeaderBlock) -> bool:
    return any(_has_https_uri(value) for value in block.get_all(LIST_UNSUBSCRIBE))


# --- client header policy ------------------------------------------------------------------


def _apply_client_policy(block: HeaderBlock, policy: str, edits: _Edits) -> None:
    if policy == "strip":
        edits.dropped += block.remove("x-ib-*")
    elif policy == "fix":
        _fix_client_headers(block, edits)


def _is_checked_client_header(name: str) -> bool:
    lower = name.lower()
    return lower.startswith("x-ib-") or lower in (
        LIST_UNSUBSCRIBE.lower(),
        LIST_UNSUBSCRIBE_POST.lower(),
    )


def _fix_client_headers(block: HeaderBlock, edits: _Edits) -> None:
    seen: set[str] = set()
    for header in block.fields():
        if not _is_checked_client_header(header.name):
            continue
        try:
            name = canonical_header_name(header.name)
        except ValueError as error:
            # A misspelt X-IB-* name would reach Infobip and be ignored there: drop it loudly,
            # as `fix` does with every other value it cannot repair.
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {header.name} dropped: {error}")
            continue
        if name in seen:
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {name} dropped: duplicate, the first is kept")
            continue
        seen.add(name)
        try:
            value = validate_header_value(name, header.value)
        except ValueError as error:
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {name} dropped: {error}")
            continue
        # List-Unsubscribe normalisation only respaces the list: not worth rewriting a
        # header that the application may have signed.
        if value != header.value and name != LIST_UNSUBSCRIBE:
            block.replace(header.index, name, value)
            edits.fixed += 1
    _drop_orphan_one_click(block, edits)


def _drop_orphan_one_click(block: HeaderBlock, edits: _Edits) -> None:
    if not block.has(LIST_UNSUBSCRIBE_POST) or _message_has_https_unsubscribe(block):
        return
    edits.dropped += block.remove(LIST_UNSUBSCRIBE_POST)
    edits.warnings.append(
        f"client header {LIST_UNSUBSCRIBE_POST} dropped: no https {LIST_UNSUBSCRIBE} (RFC 8058)"
    )


# --- rules test report ---------------------------------------------------------------------


def render_rules_report(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str = "fix",
) -> str:
    """Text for ``infobip-relay rules test``: each rule and condition, then the headers."""
    outcome, traces = _evaluate(rules, ctx, data, client_headers, explain=True)
    lines = [
        "Message:",
        f"  mail from:  {ctx.mail_from or '<>'}",
        f"  rcpt to:    {', '.join(ctx.rcpt_tos) or '-'}",
        f"  client:     {ctx.client_ip}",
        f"  auth user:  {ctx.auth_user or '-'}",
        f"  listener:   {ctx.listener}",
        f"  size:       {ctx.size}",
        "",
        f"Client headers ({client_headers}): {outcome.fixed} fixed, {outcome.dropped} dropped",
        "",
        "Rules:" if rules else "Rules: none configured",
    ]
    for trace in traces:
        lines.extend(_trace_lines(trace))
    if outcome.warnings:
        lines.extend(["", "Warnings:", *(f"  - {warning}" for warning in outcome.warnings)])
    head = HeaderBlock.parse(outcome.data)[0].to_bytes()
    lines.extend(["", "Resulting headers:", _printable_headers(head)])
    return "\n".join(lines) + "\n"


def _trace_lines(trace: _Trace) -> list[str]:
    rule = trace.rule
    verdict = {"matched": "MATCHED", "not matched": "not matched", "skipped": "not evaluated"}
    lines = [f"  {rule.index}. {rule.name}: {verdict[trace.status]}"]
    if trace.status == "skipped":
        lines.append(f"       rule {trace.stopped_by!r} matched with stop: true")
        return lines
    if not trace.checks:
        lines.append("       [x] no conditions: matches every message")
    lines.extend(f"       [{'x' if ok else ' '}] {text}" for ok, text in trace.checks)
    if trace.status == "matched":
        lines.append(f"       actions: {_describe_actions(rule)}")
    return lines


def _describe_actions(rule: Rule) -> str:
    parts = [f"remove {glob}" for glob in rule.remove]
    parts += [f"set {entry.name}: {entry.value}" for entry in rule.set]
    parts += [f"default {entry.name}: {entry.value}" for entry in rule.default]
    if rule.stop:
        parts.append("stop")
    return "; ".join(parts)


def _printable_headers(head: bytes) -> str:
    text = head.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    return "\n".join(f"  {line}" for line in text.split("\n"))
