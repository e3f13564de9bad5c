"""Compile the ``rules:`` config list into frozen ``Rule`` objects, or refuse it.

Compiling validates everything a rule can get wrong (keys, header names, values, patterns,
networks, templates) so that a bad rule stops the relay at start-up instead of producing
mail that Infobip rejects or misreads. It reads the YAML with ``relay.settings``, like the
rest of the config: the same messages, the same ``${VAR}`` spellings, and paths that count
list items from 0 and name the rule (``rules[0] ("newsletters").when.client``).

RFC 8058 at config time: a rule that writes ``List-Unsubscribe-Post`` and also writes
``List-Unsubscribe`` must give the latter an https URI.  A rule that writes only
``List-Unsubscribe-Post`` is accepted: it relies on the message's own header, checked per
message (the header is then skipped with a warning if there is no https URI).
"""

from __future__ import annotations

from functools import partial

from relay.errors import ConfigError
from relay.headers import is_field_name
from relay.infobip.headers import (
    FORBIDDEN_CHARS,
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    canonical_header_name,
    has_https_uri,
    validate_header_value,
)
from relay.rules.model import (
    ClientCondition,
    Condition,
    HeaderValue,
    Pattern,
    PatternCondition,
    Rule,
    SizeCondition,
    Template,
)
from relay.rules.sender import compile_rewrite
from relay.settings import (
    Section,
    boolean,
    convert,
    describe,
    item_path,
    networks,
    reject_unknown_keys,
    string_list,
)
from relay.units import parse_size

_RULE_KEYS = ("name", "when", "set", "default", "remove", "stop", "route", "rewrite")
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
_GLOB_CHARS = frozenset("*?[]")
_one_or_more = partial(string_list, allow_empty=False, numbers=True)

# Values used to validate templated header values at load time.
_SAMPLE_VALUES = {
    "date": "2024-01-31",
    "datetime": "2024-01-31T12:00:00Z",
    "queue_id": "4XK2P9QZ7M1B",
    "mail_from": "sender@example.com",
    "mail_from_domain": "example.com",
    "header_from_domain": "example.com",
    "header_from_name": "Sender Name",
    "header_from_local": "sender",
    "auth_user": "app",
    "listener": "default",
    "client_ip": "192.0.2.10",
}


def default_rule_name(index: int) -> str:
    """The name of a rule that has none: ``rule 1`` for ``rules[0]`` (it is a metric label)."""
    return f"rule {index + 1}"


def rule_path(path: str, index: int, raw_name: object) -> str:
    """``rules[0] ("newsletters")``: the path of a rule, naming it unless its name is invalid."""
    if raw_name is None:
        return item_path(path, index, default_rule_name(index))
    if isinstance(raw_name, str) and raw_name.strip():
        return item_path(path, index, raw_name.strip())
    return item_path(path, index)


def compile_rules(raw: object, path: str = "rules") -> tuple[Rule, ...]:
    """Validate the parsed YAML ``rules`` list and compile it; raises ConfigError."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(path, f"must be a list of rules, got {describe(raw)}")
    rules = tuple(_compile_rule(item, index, path) for index, item in enumerate(raw))
    seen: dict[str, int] = {}
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(
                rule_path(path, rule.index, rule.name),
                f"duplicate rule name {rule.name!r} (also {item_path(path, seen[rule.name])})",
            )
        seen[rule.name] = rule.index
    return rules


def _compile_rule(item: object, index: int, path: str) -> Rule:
    raw_name = item.get("name") if isinstance(item, dict) else None
    where = rule_path(path, index, raw_name)
    if not isinstance(item, dict):
        raise ConfigError(
            where,
            "must be a mapping with when/set/default/remove/stop/route/rewrite, got "
            f"{describe(item)}",
        )
    section = Section(item, where, model=Rule, keys=_RULE_KEYS)
    rule = Rule(
        name=_rule_name(section.get("name"), index, section.at("name")),
        index=index,
        conditions=_compile_when(section.get("when"), section.at("when")),
        set=_compile_header_values(section.get("set"), section.at("set")),
        default=_compile_header_values(section.get("default"), section.at("default")),
        remove=_compile_remove(section.get("remove"), section.at("remove")),
        stop=section.convert("stop", boolean),
        route=section.convert("route", _route_name),
        rewrite=compile_rewrite(section.get("rewrite"), section.at("rewrite"), _SAMPLE_VALUES),
    )
    if not (rule.set or rule.default or rule.remove or rule.stop or rule.route or rule.rewrite):
        raise ConfigError(
            where, "needs at least one action: set, default, remove, route, rewrite or stop: true"
        )
    _check_set_default_overlap(rule, where)
    _check_one_click_rule(rule, where)
    return rule


def _rule_name(raw: object, index: int, where: str) -> str:
    if raw is None:
        return default_rule_name(index)
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(where, "must be a non-empty string")
    return raw.strip()


def _route_name(raw: object) -> str:
    # Whether the name is configured is checked by relay.config, which knows the upstreams.
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be the name of an upstream, got {describe(raw)}")
    return raw.strip()


def _compile_when(raw: object, where: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping of conditions, got {describe(raw)}")
    reject_unknown_keys(raw, _WHEN_KEYS, where)
    conditions: list[Condition] = []
    for key, value in raw.items():
        conditions.extend(_compile_condition(key, value, f"{where}.{key}"))
    return tuple(conditions)


def _compile_condition(key: str, raw: object, where: str) -> list[Condition]:
    if key == "client":
        return [ClientCondition(convert(raw, partial(networks, allow_empty=False), where))]
    if key in ("size_over", "size_under"):
        return [SizeCondition(key, convert(raw, parse_size, where))]
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
    items = convert(raw, _one_or_more, where)
    return tuple(convert(item, Pattern.compile, where) for item in items)


def _header_name(raw: object, where: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(where, f"header names must be strings, got {raw!r}")
    return convert(raw, canonical_header_name, where)


def _compile_header_values(raw: object, where: str) -> tuple[HeaderValue, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping of header: value, got {describe(raw)}")
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
    if FORBIDDEN_CHARS.search(text):
        raise ConfigError(where, "must not contain CR, LF or NUL characters")
    template = convert(text, Template.parse, where)
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
    raise ConfigError(where, f"must be a string, number or boolean, got {describe(raw)}")


def _compile_remove(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    globs = []
    for item in convert(raw, _one_or_more, where):
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
    if not has_https_uri(value):
        section = "set" if post in rule.set else "default"
        raise ConfigError(
            f"{where}.{section}.{LIST_UNSUBSCRIBE_POST}",
            f"needs an https URI in {LIST_UNSUBSCRIBE} (RFC 8058), got {value!r}",
        )
