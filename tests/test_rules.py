"""Tests for relay.rules: compiling, validating, evaluating and applying header rules."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.envelope import MessageContext
from relay.errors import ConfigError
from relay.headers import HeaderBlock, split
from relay.infobip.headers import IB_HEADERS, canonical_header_name, validate_header_value
from relay.rules import (
    CLIENT_HEADER_POLICIES,
    Rule,
    RulesOutcome,
    apply_rules,
    compile_rules,
    render_rules_report,
)

ONE = "List-Unsubscribe=One-Click"
# The path of an unnamed first rule: indexes count from 0, default names from 1.
FIRST = 'rules[0] ("rule 1")'
RECEIVED = datetime(2024, 3, 5, 7, 8, 9, 123456, tzinfo=UTC)

ISSUE_RULES = """
rules:
  - name: newsletters are low-priority bulk
    when:
      mail_from: "*@news.example.com"
    set:
      X-IB-Client-Priority: LOW
      X-IB-Bulk-Id: "newsletter-{date}"
      X-IB-Track: true
  - name: password resets go first
    when:
      header_from: "noreply@example.com"
      subject: "re:(?i)password|reset"
    set: {X-IB-Client-Priority: HIGH}
    stop: true
  - name: defaults for everyone
    default:
      X-IB-Notify-Url: https://hooks.example.com/infobip
      X-IB-Notify-Content-Type: application/json
    remove: ["X-Internal-*"]
"""

BODY = b"Hello\r\n\r\nX-IB-Track: false\r\n.\r\n..dots\r\n\xff\xfe binary\r\n"


def make_ctx(**changes: Any) -> MessageContext:
    values: dict[str, Any] = {
        "queue_id": "Q123",
        "mail_from": "alice@news.example.com",
        "rcpt_tos": ("bob@example.org", "carol@example.net"),
        "client_ip": "10.1.2.3",
        "auth_user": "app1",
        "listener": "internal",
        "size": 5000,
        "received_at": RECEIVED,
    }
    values.update(changes)
    return MessageContext(**values)


def message(*headers: str, body: bytes = BODY) -> bytes:
    return "".join(f"{header}\r\n" for header in headers).encode() + b"\r\n" + body


def compile_one(rule: dict[str, Any]) -> Rule:
    return compile_rules([rule])[0]


def run(
    rules: list[Any] | tuple[Rule, ...],
    data: bytes,
    ctx: MessageContext | None = None,
    client_headers: str = "keep",
) -> RulesOutcome:
    compiled = rules if isinstance(rules, tuple) else compile_rules(rules)
    return apply_rules(compiled, ctx or make_ctx(), data, client_headers, explain=True)


def headers_of(data: bytes) -> HeaderBlock:
    return HeaderBlock.parse(data)[0]


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as caught:
        compile_rules(raw)
    return str(caught.value)


# --- the issue's example -------------------------------------------------------------------


@pytest.fixture
def issue_rules() -> tuple[Rule, ...]:
    return compile_rules(yaml.safe_load(ISSUE_RULES)["rules"])


def test_issue_example_newsletter(issue_rules: tuple[Rule, ...]) -> None:
    data = message("From: News <news@news.example.com>", "Subject: Weekly", "X-Internal-Id: 7")
    outcome = run(issue_rules, data)
    block = headers_of(outcome.data)
    assert outcome.matched == ("newsletters are low-priority bulk", "defaults for everyone")
    assert block.get("X-IB-Client-Priority") == "LOW"
    assert block.get("X-IB-Bulk-Id") == "newsletter-2024-03-05"
    assert block.get("X-IB-Track") == "true"
    assert block.get("X-IB-Notify-Url") == "https://hooks.example.com/infobip"
    assert block.get("X-IB-Notify-Content-Type") == "application/json"
    assert not block.has("X-Internal-Id")
    assert split(outcome.data)[1] == b"\r\n" + BODY


def test_issue_example_password_reset_stops(issue_rules: tuple[Rule, ...]) -> None:
    data = message('From: "No Reply" <noreply@example.com>', "Subject: Your PASSWORD reset")
    outcome = run(issue_rules, data)
    block = headers_of(outcome.data)
    assert outcome.matched[-1] == "password resets go first"
    assert block.get("X-IB-Client-Priority") == "HIGH"
    assert not block.has("X-IB-Notify-Url")
    assert outcome.explanations[2] == (
        "defaults for everyone: not evaluated, rule 'password resets go first' stopped evaluation"
    )


def test_issue_example_error_message() -> None:
    raw = yaml.safe_load(ISSUE_RULES)["rules"]
    raw[1]["set"]["X-IB-Client-Priority"] = "URGENT"
    assert config_error(raw) == (
        'rules[1] ("password resets go first").set.X-IB-Client-Priority: '
        "must be one of HIGH, STANDARD, LOW, got 'URGENT'"
    )


# --- compiling: structure ------------------------------------------------------------------


def test_none_means_no_rules() -> None:
    assert compile_rules(None) == ()


def test_indexes_count_from_zero_and_default_names_from_one() -> None:
    rules = compile_rules([{"stop": True}, {"name": " named ", "stop": True}, {"stop": True}])
    assert [(rule.index, rule.name) for rule in rules] == [
        (0, "rule 1"),
        (1, "named"),
        (2, "rule 3"),
    ]


def test_rules_are_frozen() -> None:
    rule = compile_one({"set": {"X-A": "1"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"a": 1}, "rules: must be a list of rules, got dict"),
        (["x"], f"{FIRST}: must be a mapping"),
        ([{"when": {"mail_from": "*"}}], f"{FIRST}: needs at least one action"),
        ([{"name": "n", "set": {}}], 'rules[0] ("n"): needs at least one action'),
        ([{"stop": False}], f"{FIRST}: needs at least one action"),
        ([{"stop": "yes"}], f"{FIRST}.stop: must be true or false, got 'yes'"),
        ([{"name": "", "stop": True}], "rules[0].name: must be a non-empty string"),
        ([{"name": 5, "stop": True}], "rules[0].name: must be a non-empty string"),
        ([{"stop": True, "defaults": {}}], f"{FIRST}.defaults: unknown key; did you mean default?"),
        ([{"stop": True, "colour": 1}], f"{FIRST}.colour: unknown key; expected one of name, when"),
        (
            [{"when": {"mailfrom": "x"}, "stop": True}],
            f"{FIRST}.when.mailfrom: unknown key; did you mean mail_from?",
        ),
        ([{"when": ["x"], "stop": True}], f"{FIRST}.when: must be a mapping of conditions"),
        ([{"set": ["X-A"]}], f"{FIRST}.set: must be a mapping of header: value, got list"),
        ([{"set": {"X-A": None}}], f"{FIRST}.set.X-A: must be a string, number or boolean"),
        ([{"set": {"X-A": [1]}}], f"{FIRST}.set.X-A: must be a string, number or boolean"),
        ([{"set": {5: "x"}}], f"{FIRST}.set.5: header names must be strings"),
        (
            [{"name": "a", "stop": True}, {"name": "a", "stop": True}],
            "rules[1] (\"a\"): duplicate rule name 'a' (also rules[0])",
        ),
        (
            [{"set": {"X-IB-Track": True, "x-ib-track": False}}],
            f"{FIRST}.set.x-ib-track: header given twice",
        ),
        (
            [{"set": {"X-A": "1"}, "default": {"x-a": "2"}}],
            f"{FIRST}.default.x-a: is also in set",
        ),
    ],
)
def test_structure_errors(raw: object, expected: str) -> None:
    assert config_error(raw).startswith(expected)


def test_compiling_the_same_config_twice_gives_equal_rules() -> None:
    raw = yaml.safe_load(ISSUE_RULES)["rules"] + [
        {"when": {"header": {"X-A": "a"}, "client": "10.0.0.0/8"}, "set": {"X-B": "{date}"}}
    ]
    assert compile_rules(raw) == compile_rules(raw)
    assert hash(compile_rules(raw)) == hash(compile_rules(raw))


def test_stop_alone_is_an_action() -> None:
    assert compile_one({"stop": True}).stop


@pytest.mark.parametrize(("written", "stop"), [("true", True), (" TRUE ", True), ("false", False)])
def test_stop_accepts_what_env_var_expansion_yields(written: str, stop: bool) -> None:
    # `stop: ${STOP}` gives a string; it was refused although `allow_open_relay: ${X}` was not.
    assert compile_one({"stop": written, "remove": "X-A"}).stop is stop


# --- compiling: header names ---------------------------------------------------------------


@pytest.mark.parametrize("name", IB_HEADERS)
def test_every_infobip_header_is_known_in_any_case(name: str) -> None:
    assert canonical_header_name(name.lower()) == name
    assert canonical_header_name(name.upper()) == name


def test_names_are_emitted_in_canonical_case() -> None:
    rule = compile_one({"set": {"x-ib-bulk-id": "b", "list-unsubscribe": "<https://u.example>"}})
    assert [entry.name for entry in rule.set] == ["X-IB-Bulk-Id", "List-Unsubscribe"]
    outcome = run((rule,), message("Subject: s"))
    assert b"X-IB-Bulk-Id: b\r\n" in outcome.data
    assert b"List-Unsubscribe: <https://u.example>\r\n" in outcome.data


def test_other_valid_names_keep_their_spelling() -> None:
    assert canonical_header_name("x-my-Header") == "x-my-Header"


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("X-IB-Track-Click", "did you mean X-IB-Track-Clicks?"),
        ("X-IB-Bulkid", "did you mean X-IB-Bulk-Id?"),
        ("x-ib-notify-uri", "did you mean X-IB-Notify-Url?"),
        ("X-IB-Priority", "did you mean X-IB-Client-Priority?"),
    ],
)
def test_unknown_infobip_header_suggests_the_closest(name: str, suggestion: str) -> None:
    error = config_error([{"set": {name: "x"}}])
    assert error == f"{FIRST}.set.{name}: unknown Infobip header {name!r}; {suggestion}"


def test_unknown_infobip_header_without_close_match() -> None:
    error = config_error([{"set": {"X-IB-Zzzzzzzzzzzzzzzz": "x"}}])
    assert error.endswith("unknown Infobip header 'X-IB-Zzzzzzzzzzzzzzzz'")


@pytest.mark.parametrize("name", ["Bad Name", "a:b", "", "Tëst", "x\x7f"])
def test_invalid_field_names_are_errors(name: str) -> None:
    assert "is not a valid header name" in config_error([{"set": {name: "x"}}])


# --- compiling and validating values -------------------------------------------------------

VALID_VALUES = [
    ("X-IB-Client-Priority", "high", "HIGH"),
    ("X-IB-Client-Priority", " Standard ", "STANDARD"),
    ("X-IB-Client-Priority", "LOW", "LOW"),
    ("X-IB-Notify-Content-Type", "Application/XML", "application/xml"),
    ("X-IB-Notify-Content-Type", "application/json", "application/json"),
    ("X-IB-Track", "TRUE", "true"),
    ("X-IB-Track-Clicks", "False", "false"),
    ("X-IB-Track-Opens", "true", "true"),
    ("X-IB-Intermediate-Report", "false", "false"),
    ("X-IB-Skip-Passive-Storage", "true", "true"),
    ("X-IB-Skip-Active-Storage", "FALSE", "false"),
    ("X-IB-Notify-Url", "https://hooks.example.com/a?b=c", "https://hooks.example.com/a?b=c"),
    ("X-IB-Tracking-Url", "http://10.0.0.1:8080/t", "http://10.0.0.1:8080/t"),
    ("X-IB-Bulk-Id", "b" * 100, "b" * 100),
    ("X-IB-Callback-Data", "d" * 4000, "d" * 4000),
    ("X-IB-Application-Id", "a", "a"),
    ("X-IB-Entity-Id", "e" * 255, "e" * 255),
    ("List-Unsubscribe", "<mailto:u@example.com>", "<mailto:u@example.com>"),
    (
        "List-Unsubscribe",
        " <mailto:u@example.com?subject=a,b> ,<https://u.example/x> ",
        "<mailto:u@example.com?subject=a,b>, <https://u.example/x>",
    ),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click", "List-Unsubscribe=One-Click"),
    ("List-Unsubscribe-Post", "list-unsubscribe=one-click", "List-Unsubscribe=One-Click"),
    ("x-ib-track", "true", "true"),
    ("X-Other", "  anything goes \t", "anything goes"),
]


@pytest.mark.parametrize(("name", "value", "normalised"), VALID_VALUES)
def test_validate_header_value_normalises(name: str, value: str, normalised: str) -> None:
    assert validate_header_value(name, value) == normalised
    assert validate_header_value(name, normalised) == normalised


INVALID_VALUES = [
    ("X-IB-Client-Priority", "URGENT", "must be one of HIGH, STANDARD, LOW, got 'URGENT'"),
    ("X-IB-Notify-Content-Type", "text/plain", "must be one of application/json, application/xml"),
    ("X-IB-Track", "yes", "must be one of true, false, got 'yes'"),
    ("X-IB-Track-Clicks", "1", "must be one of true, false, got '1'"),
    ("X-IB-Track-Opens", "", "must be one of true, false, got ''"),
    ("X-IB-Intermediate-Report", "on", "must be one of true, false"),
    ("X-IB-Skip-Passive-Storage", "no", "must be one of true, false"),
    ("X-IB-Skip-Active-Storage", "0", "must be one of true, false"),
    ("X-IB-Notify-Url", "ftp://hooks.example.com/", "must be an absolute http or https URL"),
    ("X-IB-Notify-Url", "/relative/path", "must be an absolute http or https URL"),
    ("X-IB-Notify-Url", "https:///no-host", "must be an absolute http or https URL"),
    ("X-IB-Notify-Url", "https://exa mple.com/", "must be an absolute http or https URL"),
    ("X-IB-Tracking-Url", "https://[::1/", "must be an absolute http or https URL"),
    ("X-IB-Tracking-Url", "https://bücher.example/", "must be an absolute http or https URL"),
    ("X-IB-Bulk-Id", "b" * 101, "must be at most 100 characters, got 101"),
    ("X-IB-Bulk-Id", "", "must not be empty"),
    ("X-IB-Callback-Data", "d" * 4001, "must be at most 4000 characters, got 4001"),
    ("X-IB-Application-Id", "", "must not be empty"),
    ("X-IB-Application-Id", "a" * 256, "must be at most 255 characters"),
    ("X-IB-Entity-Id", "  ", "must not be empty"),
    ("X-IB-Entity-Id", "e" * 256, "must be at most 255 characters"),
    ("List-Unsubscribe", "https://u.example", "must be one or more <uri> separated by commas"),
    ("List-Unsubscribe", "<https://u.example> <x:y>", "must be one or more <uri>"),
    ("List-Unsubscribe", "<>", "must be one or more <uri>"),
    ("List-Unsubscribe", "<no-scheme>", "must be one or more <uri>"),
    ("List-Unsubscribe-Post", "One-Click", "must be exactly List-Unsubscribe=One-Click"),
    ("X-Other", "a\r\nBcc: victim@example.com", "must not contain CR, LF or NUL"),
    ("X-IB-Bulk-Id", "a\nb", "must not contain CR, LF or NUL"),
    ("X-IB-Bulk-Id", "a\0b", "must not contain CR, LF or NUL"),
]


@pytest.mark.parametrize(("name", "value", "message_start"), INVALID_VALUES)
def test_validate_header_value_rejects(name: str, value: str, message_start: str) -> None:
    with pytest.raises(ValueError) as caught:
        validate_header_value(name, value)
    assert str(caught.value).startswith(message_start)


@pytest.mark.parametrize(("name", "value", "message_start"), INVALID_VALUES)
def test_invalid_values_are_config_errors_naming_rule_and_key(
    name: str, value: str, message_start: str
) -> None:
    error = config_error([{"name": "r", "default": {name: value}}])
    assert error.startswith(f'rules[0] ("r").default.{name}: ')
    assert message_start in error


def test_validate_header_value_rejects_unknown_infobip_name() -> None:
    with pytest.raises(ValueError, match="did you mean X-IB-Track-Clicks"):
        validate_header_value("X-IB-Track-Click", "true")


@pytest.mark.parametrize(
    ("raw", "written"),
    [(True, "true"), (False, "false"), (42, "42"), (1.5, "1.5"), ("text", "text")],
)
def test_yaml_scalars_become_strings(raw: object, written: str) -> None:
    rule = compile_one({"set": {"X-IB-Track" if isinstance(raw, bool) else "X-Num": raw}})
    assert rule.set[0].value == written


def test_number_values_are_validated_as_strings() -> None:
    assert compile_one({"set": {"X-IB-Entity-Id": 12345}}).set[0].value == "12345"


# --- templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{date}", "2024-03-05"),
        ("{datetime}", "2024-03-05T07:08:09Z"),
        ("{queue_id}", "Q123"),
        ("{mail_from}", "alice@news.example.com"),
        ("{mail_from_domain}", "news.example.com"),
        ("{header_from_domain}", "example.org"),
        ("{auth_user}", "app1"),
        ("{listener}", "internal"),
        ("{client_ip}", "10.1.2.3"),
        ("{{literal}} {listener}-{date}", "{literal} internal-2024-03-05"),
        ("}}{{", "}{"),
    ],
)
def test_template_placeholders(template: str, expected: str) -> None:
    outcome = run([{"set": {"X-Tag": template}}], message("From: Org <x@example.org>"))
    assert headers_of(outcome.data).get("X-Tag") == expected


def test_template_values_drop_every_control_character() -> None:
    # \x0b, ESC and C1 controls in a client's From would garble the header they are put in.
    ctx = make_ctx(mail_from="a\x0bb\x1b@example.com")
    outcome = run([{"set": {"X-Tag": "{mail_from}|{header_from_domain}"}}],
                  message("From: x@exa\x0bmple.\u0085org"), ctx)
    assert headers_of(outcome.data).get("X-Tag") == "ab@example.com|example.org"


def test_template_values_when_facts_are_missing() -> None:
    ctx = make_ctx(auth_user=None, mail_from="")
    rule = {"set": {"X-Tag": "[{auth_user}|{mail_from_domain}|{header_from_domain}]"}}
    outcome = run([rule], message("Subject: no from"), ctx)
    assert headers_of(outcome.data).get("X-Tag") == "[||]"


def test_date_uses_utc() -> None:
    east = timezone(timedelta(hours=5))
    ctx = make_ctx(received_at=datetime(2024, 3, 5, 2, 0, tzinfo=east))
    outcome = run([{"set": {"X-Tag": "{date} {datetime}"}}], message("A: 1"), ctx)
    assert headers_of(outcome.data).get("X-Tag") == "2024-03-04 2024-03-04T21:00:00Z"


def test_naive_received_at_is_taken_as_utc() -> None:
    ctx = make_ctx(received_at=datetime(2024, 1, 2, 3, 4, 5))
    outcome = run([{"set": {"X-Tag": "{datetime}"}}], message("A: 1"), ctx)
    assert headers_of(outcome.data).get("X-Tag") == "2024-01-02T03:04:05Z"


@pytest.mark.parametrize(
    ("template", "message_part"),
    [
        ("{nope}", "unknown placeholder {nope}; known: date, datetime"),
        ("{date!r}", "unknown placeholder {date!r}"),
        ("{}", "unknown placeholder {}"),
        ("a { b", "unmatched '{'"),
        ("a } b", "unmatched '}'"),
    ],
)
def test_template_errors(template: str, message_part: str) -> None:
    error = config_error([{"set": {"X-Tag": template}}])
    assert error.startswith(f"{FIRST}.set.X-Tag: ")
    assert message_part in error


def test_templates_are_validated_with_sample_values() -> None:
    assert compile_one({"set": {"X-IB-Bulk-Id": "newsletter-{date}"}}).set[0].template
    error = config_error([{"set": {"X-IB-Bulk-Id": "x" * 95 + "{date}"}}])
    assert "must be at most 100 characters, got 105 (with sample values:" in error
    error = config_error([{"set": {"X-IB-Notify-Url": "{listener}/hook"}}])
    assert "must be an absolute http or https URL" in error


def test_templated_value_invalid_at_runtime_is_skipped_with_warning() -> None:
    rules = [{"name": "bulk", "set": {"X-IB-Bulk-Id": "{mail_from}", "X-Ok": "yes"}}]
    ctx = make_ctx(mail_from="a" * 120 + "@example.com")
    outcome = run(rules, message("A: 1"), ctx)
    block = headers_of(outcome.data)
    assert not block.has("X-IB-Bulk-Id")
    assert block.get("X-Ok") == "yes"
    assert outcome.warnings == (
        "rule 'bulk': X-IB-Bulk-Id not set: must be at most 100 characters, got 132",
    )


def test_templated_value_is_normalised_at_runtime() -> None:
    rule = {"set": {"List-Unsubscribe": "<https://u.example/{queue_id}> ,<mailto:{mail_from}>"}}
    outcome = run([rule], message("A: 1"))
    assert headers_of(outcome.data).get("List-Unsubscribe") == (
        "<https://u.example/Q123>, <mailto:alice@news.example.com>"
    )


def test_substituted_values_cannot_inject_headers() -> None:
    ctx = make_ctx(auth_user="evil\r\nBcc: victim@example.com\0", queue_id="q\nX-Evil: 1")
    outcome = run([{"set": {"X-User": "{auth_user}", "X-Q": "{queue_id}"}}], message("A: 1"), ctx)
    block = headers_of(outcome.data)
    assert block.get("X-User") == "evilBcc: victim@example.com"
    assert block.get("X-Q") == "qX-Evil: 1"
    assert not block.has("Bcc")
    assert not block.has("X-Evil")


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\rb", "a\0b"])
def test_literal_values_with_line_breaks_are_config_errors(value: str) -> None:
    assert config_error([{"set": {"X-A": value}}]) == (
        f"{FIRST}.set.X-A: must not contain CR, LF or NUL characters"
    )


# --- conditions ----------------------------------------------------------------------------

DEFAULT_HEADERS = (
    'From: "Foo, Inc." <Sender@Example.com>',
    "To: bob@example.org",
    "Subject: =?utf-8?q?R=C3=A9initialiser_le_mot_de_passe?=",
    "X-Mailer: LegacyApp 2.1",
    "X-Mailer: Other",
)

CONDITIONS = [
    ({"mail_from": "*@news.example.com"}, {}, True),
    ({"mail_from": "*@NEWS.example.COM"}, {}, True),
    ({"mail_from": "news.example.com"}, {}, False),  # globs match the whole value
    ({"mail_from": "alice@*"}, {}, True),
    ({"mail_from": ["nobody@x", "alice@?ews.example.com"]}, {}, True),
    ({"mail_from": "re:news\\."}, {}, True),
    ({"mail_from": "re:^news"}, {}, False),
    ({"mail_from": "re:ALICE"}, {}, False),  # regexes are case-sensitive unless (?i)
    ({"mail_from": ""}, {"mail_from": ""}, True),
    ({"header_from": "sender@example.com"}, {}, True),
    ({"header_from": "*Foo*"}, {}, False),
    ({"rcpt_to": "carol@*"}, {}, True),
    ({"rcpt_to": ["x@y", "*@example.org"]}, {}, True),
    ({"rcpt_to": "dave@*"}, {}, False),
    ({"client": "10.0.0.0/8"}, {}, True),
    ({"client": ["192.168.0.0/16", "10.1.2.3"]}, {}, True),
    ({"client": "192.168.0.0/16, 10.1.2.3"}, {}, True),  # like access.trusted_networks
    ({"client": "10.1.2.4"}, {}, False),
    ({"client": "2001:db8::/32"}, {"client_ip": "2001:db8::1"}, True),
    ({"client": "2001:db8::1"}, {"client_ip": "2001:db8::2"}, False),
    ({"client": "fe80::/10"}, {"client_ip": "fe80::1%eth0"}, True),
    ({"client": "10.0.0.0/8"}, {"client_ip": "::ffff:10.9.9.9"}, True),
    ({"client": "::/0"}, {"client_ip": "10.0.0.1"}, False),
    ({"client": "0.0.0.0/0"}, {"client_ip": "unix-socket"}, False),
    ({"client": "10.1.2.0/24"}, {}, True),
    ({"auth_user": "app*"}, {}, True),
    ({"auth_user": "*"}, {"auth_user": None}, False),
    ({"listener": ["public", "internal"]}, {}, True),
    ({"listener": "public"}, {}, False),
    ({"subject": "re:mot de passe"}, {}, True),  # decoded RFC 2047
    ({"subject": "*R=C3=A9init*"}, {}, True),  # raw value
    ({"subject": "réinitialiser*"}, {}, True),  # glob, case-insensitive, decoded
    ({"subject": "réinitialiser"}, {}, False),
    ({"header": {"X-Mailer": "LegacyApp *"}}, {}, True),
    ({"header": {"x-mailer": "other"}}, {}, True),  # any occurrence
    ({"header": {"X-Mailer": ["a", "b"]}}, {}, False),
    ({"header": {"X-Absent": "*"}}, {}, False),
    ({"header": {"X-Mailer": "*", "To": "*@example.org"}}, {}, True),
    ({"header": {"X-Mailer": "*", "To": "*@example.com"}}, {}, False),
    ({"size_over": "4KiB"}, {}, True),
    ({"size_over": 5000}, {}, False),
    ({"size_under": "5001"}, {}, True),
    ({"size_under": "1MiB"}, {"size": 2 * 1024 * 1024}, False),
    ({"size_over": "1KB", "size_under": "10KB"}, {}, True),
    ({"mail_from": "*@news.example.com", "listener": "public"}, {}, False),
    ({"mail_from": "*@news.example.com", "client": "10.0.0.0/8"}, {}, True),
    ({}, {}, True),
]


@pytest.mark.parametrize(("when", "ctx_changes", "expected"), CONDITIONS)
def test_conditions(when: dict[str, Any], ctx_changes: dict[str, Any], expected: bool) -> None:
    rule = {"name": "r", "when": when, "set": {"X-Matched": "yes"}}
    outcome = run([rule], message(*DEFAULT_HEADERS), make_ctx(**ctx_changes))
    assert (outcome.matched == ("r",)) is expected
    assert headers_of(outcome.data).has("X-Matched") is expected
    explanation = outcome.explanations[0]
    assert explanation.startswith("r: matched" if expected else "r: not matched because")


def test_rule_without_when_matches_every_message() -> None:
    outcome = run([{"name": "all", "set": {"X-A": "1"}}], message("Subject: x"))
    assert outcome.matched == ("all",)
    assert outcome.explanations == ("all: matched, it has no conditions",)


@pytest.mark.parametrize(
    ("header", "when", "expected"),
    [
        ("From: a@b.example", {"header_from": "a@b.example"}, True),
        ("From: a@b.example (Comment)", {"header_from": "a@b.example"}, True),
        ('From: "x <y@z>" <real@b.example>', {"header_from": "real@b.example"}, True),
        ("Subject: only", {"header_from": "*"}, False),
        ("From: x@y", {"subject": "*"}, False),
        ("Subject: Re: Password reset", {"subject": "re:(?i)password|reset"}, True),
        ("Subject: Re: hello", {"subject": "re:(?i)password|reset"}, False),
        ("Subject: a\r\n  folded", {"subject": "a  folded"}, True),
        ("Subject: =?bogus?q?x?=", {"subject": "=?bogus?q?x?="}, True),
    ],
)
def test_header_based_conditions(header: str, when: dict[str, Any], expected: bool) -> None:
    outcome = run([{"name": "r", "when": when, "stop": True}], message(header))
    assert (outcome.matched == ("r",)) is expected


def test_explanations_name_each_condition() -> None:
    rules = [
        {
            "name": "one",
            "when": {"mail_from": "*@news.example.com", "size_over": "1KiB"},
            "stop": False,
            "set": {"X-A": "1"},
        },
        {
            "name": "two",
            "when": {"listener": "public", "client": "10.0.0.0/8"},
            "set": {"X-B": "1"},
        },
        {"name": "three", "when": {"auth_user": "x"}, "set": {"X-C": "1"}},
    ]
    outcome = run(rules, message("Subject: s"))
    assert outcome.explanations == (
        "one: matched because mail_from 'alice@news.example.com' matches '*@news.example.com'"
        " and size_over: size 5000 > 1KiB",
        "two: not matched because listener 'internal' does not match 'public'",
        "three: not matched because auth_user 'app1' does not match 'x'",
    )
    assert apply_rules(compile_rules(rules), make_ctx(), message("A: 1")).explanations == ()


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({"mail_from": "re:("}, f"{FIRST}.when.mail_from: invalid regular expression '('"),
        ({"subject": ["ok", "re:[a-"]}, f"{FIRST}.when.subject: invalid regular expression"),
        ({"client": "10.0.0.300"}, f"{FIRST}.when.client: invalid network '10.0.0.300'"),
        ({"client": ["10.0.0.0/8", "nonsense"]}, f"{FIRST}.when.client: invalid network"),
        ({"client": "10.0.0.0/33"}, f"{FIRST}.when.client: invalid network"),
        ({"size_over": "lots"}, f"{FIRST}.when.size_over: expected a size"),
        ({"size_under": -1}, f"{FIRST}.when.size_under: a size cannot be negative"),
        ({"mail_from": []}, f"{FIRST}.when.mail_from: must not be an empty list"),
        ({"rcpt_to": {"a": 1}}, f"{FIRST}.when.rcpt_to: expected a string or a list of strings"),
        ({"listener": True}, f"{FIRST}.when.listener: expected a string or a list of strings"),
        ({"header": "X-A"}, f"{FIRST}.when.header: must be a non-empty mapping"),
        ({"header": {}}, f"{FIRST}.when.header: must be a non-empty mapping"),
        ({"header": {"Bad Name": "x"}}, f"{FIRST}.when.header.Bad Name: 'Bad Name' is not a"),
        (
            {"header": {"X-IB-Track-Click": "x"}},
            f"{FIRST}.when.header.X-IB-Track-Click: unknown Infobip header",
        ),
    ],
)
def test_condition_errors(when: dict[str, Any], expected: str) -> None:
    assert config_error([{"when": when, "stop": True}]).startswith(expected)


# --- actions -------------------------------------------------------------------------------


def test_set_replaces_in_place_and_removes_duplicates() -> None:
    data = message("A: 1", "X-IB-Track: false", "B: 2", "x-ib-track: FALSE")
    outcome = run([{"set": {"X-IB-Track": True}}], data)
    assert split(outcome.data)[0] == b"A: 1\r\nX-IB-Track: true\r\nB: 2\r\n"


def test_later_set_wins() -> None:
    rules = [{"set": {"X-IB-Client-Priority": "LOW"}}, {"set": {"X-IB-Client-Priority": "HIGH"}}]
    outcome = run(rules, message("A: 1"))
    assert headers_of(outcome.data).get_all("X-IB-Client-Priority") == ["HIGH"]


def test_default_only_fills_missing_headers() -> None:
    rules = [{"default": {"X-IB-Client-Priority": "LOW", "X-IB-Track": False}}]
    outcome = run(rules, message("x-ib-client-priority: HIGH"))
    block = headers_of(outcome.data)
    assert block.get_all("X-IB-Client-Priority") == ["HIGH"]
    assert block.get("X-IB-Track") == "false"


def test_default_after_earlier_rule_set_does_not_apply() -> None:
    rules = [{"set": {"X-A": "set"}}, {"default": {"X-A": "default"}}]
    assert headers_of(run(rules, message("B: 1")).data).get_all("X-A") == ["set"]


def test_remove_globs_and_names() -> None:
    data = message("X-Internal-Id: 1", "x-internal-host: h", "X-Keep: k", "Received: r")
    outcome = run([{"remove": ["x-INTERNAL-*", "received"]}], data)
    assert split(outcome.data)[0] == b"X-Keep: k\r\n"


def test_remove_accepts_a_single_string() -> None:
    assert compile_one({"remove": "X-A"}).remove == ("X-A",)


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("Bad Name", f"{FIRST}.remove: 'Bad Name' is not a header name or glob"),
        ([], f"{FIRST}.remove: must not be an empty list"),
        ("X-IB-Track-Click", "did you mean X-IB-Track-Clicks?"),
    ],
)
def test_remove_errors(remove: object, expected: str) -> None:
    assert expected in config_error([{"remove": remove}])


def test_order_within_a_rule_is_remove_then_set_then_default() -> None:
    rule = {"remove": ["X-*"], "set": {"X-A": "new"}, "default": {"X-B": "default"}}
    outcome = run([rule], message("X-A: old", "X-B: old", "X-C: old", "Subject: s"))
    assert split(outcome.data)[0] == b"X-A: new\r\nX-B: default\r\nSubject: s\r\n"


def test_stop_ends_evaluation_only_when_the_rule_matches() -> None:
    rules = [
        {"name": "miss", "when": {"listener": "other"}, "stop": True},
        {"name": "hit", "set": {"X-A": "1"}, "stop": True},
        {"name": "never", "set": {"X-B": "1"}},
    ]
    outcome = run(rules, message("S: 1"))
    assert outcome.matched == ("hit",)
    assert not headers_of(outcome.data).has("X-B")


def test_conditions_see_headers_written_by_earlier_rules() -> None:
    rules = [
        {"set": {"X-Stage": "one"}},
        {"name": "chained", "when": {"header": {"X-Stage": "one"}}, "set": {"X-Next": "yes"}},
    ]
    assert run(rules, message("A: 1")).matched[-1] == "chained"


# --- List-Unsubscribe-Post (RFC 8058) ------------------------------------------------------


def test_one_click_needs_https_list_unsubscribe_in_the_same_rule() -> None:
    error = config_error(
        [{"set": {"List-Unsubscribe": "<mailto:u@x.example>", "List-Unsubscribe-Post": ONE}}]
    )
    assert error == (
        f"{FIRST}.set.List-Unsubscribe-Post: needs an https URI in List-Unsubscribe (RFC 8058),"
        " got '<mailto:u@x.example>'"
    )


def test_one_click_with_https_list_unsubscribe_in_the_rule() -> None:
    rule = {
        "set": {"List-Unsubscribe-Post": ONE},
        "default": {
            "List-Unsubscribe": "<mailto:u@x.example>, <https://x.example/u?id={queue_id}>"
        },
    }
    outcome = run([rule], message("A: 1"))
    block = headers_of(outcome.data)
    assert block.get("List-Unsubscribe") == "<mailto:u@x.example>, <https://x.example/u?id=Q123>"
    assert block.get("List-Unsubscribe-Post") == ONE


def test_one_click_alone_relies_on_the_message_header() -> None:
    rules = (compile_one({"name": "oc", "default": {"List-Unsubscribe-Post": ONE}}),)
    with_https = run(rules, message("List-Unsubscribe: <https://x.example/u>"))
    assert headers_of(with_https.data).get("List-Unsubscribe-Post") == ONE
    assert with_https.warnings == ()
    without = run(rules, message("List-Unsubscribe: <mailto:u@x.example>"))
    assert not headers_of(without.data).has("List-Unsubscribe-Post")
    assert without.warnings == (
        "rule 'oc': List-Unsubscribe-Post not added, the message has no https List-Unsubscribe"
        " (RFC 8058)",
    )


def test_message_list_unsubscribe_kept_when_rule_only_defaults_it() -> None:
    rule = {
        "name": "oc",
        "set": {"List-Unsubscribe-Post": ONE},
        "default": {"List-Unsubscribe": "<https://x.example/u>"},
    }
    outcome = run([rule], message("List-Unsubscribe: <mailto:own@x.example>"))
    block = headers_of(outcome.data)
    assert block.get("List-Unsubscribe") == "<mailto:own@x.example>"
    assert not block.has("List-Unsubscribe-Post")
    assert len(outcome.warnings) == 1


# --- client header policy ------------------------------------------------------------------

CLIENT_MESSAGE = message(
    "From: a@example.com",
    "X-IB-Client-Priority: high",
    "x-ib-track: TRUE",
    "X-IB-Bulk-Id: ok",
    "X-IB-Notify-Url: not a url",
    "X-IB-Bulk-Id: second",
    "X-IB-Bogus: 1",
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    "Subject: s",
)


def test_client_headers_policy_names() -> None:
    assert CLIENT_HEADER_POLICIES == ("keep", "fix", "strip")


def test_fix_normalises_drops_and_warns() -> None:
    outcome = apply_rules((), make_ctx(), CLIENT_MESSAGE, "fix")
    assert split(outcome.data)[0] == (
        b"From: a@example.com\r\n"
        b"X-IB-Client-Priority: HIGH\r\n"
        b"X-IB-Track: true\r\n"
        b"X-IB-Bulk-Id: ok\r\n"
        b"Subject: s\r\n"
    )
    # README: `fix` "drops what it cannot" -- a misspelt X-IB-* name included.
    assert (outcome.fixed, outcome.dropped) == (2, 4)
    assert outcome.warnings == (
        "client header X-IB-Notify-Url dropped: must be an absolute http or https URL with a"
        " host, got 'not a url'",
        "client header X-IB-Bulk-Id dropped: duplicate, the first is kept",
        "client header X-IB-Bogus dropped: unknown Infobip header 'X-IB-Bogus'; did you mean"
        " X-IB-Bulk-Id?",
        "client header List-Unsubscribe-Post dropped: no https List-Unsubscribe (RFC 8058)",
    )
    assert split(outcome.data)[1] == b"\r\n" + BODY


def test_fix_is_the_default_policy() -> None:
    assert apply_rules((), make_ctx(), CLIENT_MESSAGE) == apply_rules(
        (), make_ctx(), CLIENT_MESSAGE, "fix"
    )


def test_fix_keeps_valid_folded_and_8bit_client_headers_byte_for_byte() -> None:
    data = (
        b"X-IB-Callback-Data: caf\xe9\r\n"
        b"X-IB-Client-Priority:\r\n HIGH\r\n"
        b"List-Unsubscribe: <mailto:a@b.example>,\r\n <https://b.example/u>\r\n"
        b"\r\nbody"
    )
    outcome = apply_rules((), make_ctx(), data, "fix")
    assert outcome.data is data
    assert (outcome.fixed, outcome.dropped, outcome.warnings) == (0, 0, ())


def test_fix_does_not_respace_a_valid_list_unsubscribe() -> None:
    data = message("List-Unsubscribe: <mailto:a@b.example>,<https://b.example/u>")
    outcome = apply_rules((), make_ctx(), data, "fix")
    assert outcome.data is data
    assert outcome.fixed == 0


def test_explanation_for_a_missing_header() -> None:
    rules = [{"name": "r", "when": {"header": {"X-Absent": "*"}}, "stop": True}]
    assert run(rules, message("A: 1")).explanations == (
        "r: not matched because header.X-Absent: the message has no X-Absent header",
    )


def test_strip_removes_every_infobip_header() -> None:
    outcome = apply_rules((), make_ctx(), CLIENT_MESSAGE, "strip")
    assert b"x-ib" not in split(outcome.data)[0].lower()
    assert outcome.dropped == 6
    assert headers_of(outcome.data).has("List-Unsubscribe-Post")


def test_strip_then_rules_set_their_own() -> None:
    rules = compile_rules([{"set": {"X-IB-Track": False}}])
    outcome = apply_rules(rules, make_ctx(), CLIENT_MESSAGE, "strip")
    assert headers_of(outcome.data).get_all("X-IB-Track") == ["false"]


def test_keep_leaves_everything() -> None:
    outcome = apply_rules((), make_ctx(), CLIENT_MESSAGE, "keep")
    assert outcome.data is CLIENT_MESSAGE
    assert (outcome.fixed, outcome.dropped, outcome.warnings) == (0, 0, ())


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="client_headers must be one of keep, fix, strip"):
        apply_rules((), make_ctx(), CLIENT_MESSAGE, "drop")


# --- outcome and report --------------------------------------------------------------------


def test_nothing_changed_returns_the_same_object() -> None:
    data = message("From: a@example.com", "Subject: s")
    rules = compile_rules([{"when": {"listener": "other"}, "set": {"X-A": "1"}}])
    for policy in CLIENT_HEADER_POLICIES:
        assert apply_rules(rules, make_ctx(), data, policy).data is data
    same = compile_rules([{"set": {"Subject": "s"}}, {"remove": "X-None"}])
    assert apply_rules(same, make_ctx(), data).data is data


def test_folded_and_8bit_headers_and_body_are_preserved() -> None:
    data = (
        b"Subject: =?utf-8?q?caf=C3=A9?= and a\r\n\tfolded tail\r\n"
        b"X-Raw: \xe9\xff\r\n"
        b"X-Utf8: \xc3\xa9\r\n"
        b"\r\n" + BODY
    )
    rules = compile_rules([{"set": {"X-IB-Track": True}, "remove": "X-Gone"}])
    outcome = apply_rules(rules, make_ctx(), data)
    assert outcome.data == data.replace(b"\r\n\r\n", b"\r\nX-IB-Track: true\r\n\r\n", 1)


def test_report_lists_rules_conditions_and_headers(issue_rules: tuple[Rule, ...]) -> None:
    data = message("From: noreply@example.com", "Subject: Reset", "x-ib-track: TRUE")
    report = render_rules_report(issue_rules, make_ctx(mail_from="x@other.example"), data)
    assert "Client headers (fix): 1 fixed, 0 dropped" in report
    assert "1. newsletters are low-priority bulk: not matched" in report
    assert "[ ] mail_from 'x@other.example' does not match '*@news.example.com'" in report
    assert "2. password resets go first: MATCHED" in report
    assert "[x] header_from 'noreply@example.com' matches 'noreply@example.com'" in report
    assert "[x] subject 'Reset' matches 're:(?i)password|reset'" in report
    assert "actions: set X-IB-Client-Priority: HIGH; stop" in report
    assert "3. defaults for everyone: not evaluated" in report
    headers = report.split("Resulting headers:\n", 1)[1]
    assert headers == (
        "  From: noreply@example.com\n"
        "  Subject: Reset\n"
        "  X-IB-Track: true\n"
        "  X-IB-Client-Priority: HIGH\n"
    )


def test_report_without_rules_and_with_warnings() -> None:
    report = render_rules_report((), make_ctx(auth_user=None), CLIENT_MESSAGE, "fix")
    assert "Rules: none configured" in report
    assert "auth user:  -" in report
    assert "Warnings:\n  - client header X-IB-Notify-Url dropped" in report


def test_report_shows_rules_without_conditions() -> None:
    rules = compile_rules([{"name": "all", "default": {"X-A": "1"}, "remove": "X-B"}])
    report = render_rules_report(rules, make_ctx(), message("S: 1"), "keep")
    assert "1. all: MATCHED\n       [x] no conditions: matches every message\n" in report
    assert "actions: remove X-B; default X-A: 1" in report


# --- properties ----------------------------------------------------------------------------

RULE_POOL: list[dict[str, Any]] = [
    {
        "when": {"mail_from": "*@news.example.com"},
        "set": {"X-IB-Client-Priority": "LOW", "X-IB-Bulk-Id": "nl-{date}"},
    },
    {"when": {"header": {"X-App": "re:legacy"}}, "set": {"X-IB-Track": True}},
    {"when": {"size_over": "1KiB"}, "default": {"X-IB-Notify-Url": "https://h.example/{listener}"}},
    {"remove": ["X-Internal-*", "x-ib-track-*"], "default": {"X-IB-Client-Priority": "STANDARD"}},
    {"remove": "X-IB-*", "set": {"X-IB-Entity-Id": "{auth_user}"}},
    {
        "default": {"List-Unsubscribe": "<https://u.example/{queue_id}>"},
        "set": {"List-Unsubscribe-Post": ONE},
    },
    {"when": {"subject": "re:(?i)stop"}, "stop": True},
    {"set": {"X-Relay": "{listener} {client_ip}"}, "default": {"X-IB-Track-Opens": False}},
]
HEADER_NAMES = st.sampled_from(
    [
        "X-IB-Client-Priority",
        "x-ib-track",
        "X-IB-Track-Clicks",
        "X-Internal-Id",
        "X-App",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Subject",
        "From",
        "X-IB-Bulk-Id",
        "X-Relay",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "high",
            "LOW",
            "true",
            "FALSE",
            "legacy",
            "<https://a.example>",
            "<mailto:a@b>",
            "List-Unsubscribe=One-Click",
            "stop now",
            "",
        ]
    ),
    st.text(st.characters(exclude_characters="\r\n\0", codec="utf-8"), max_size=20),
)
RAW_HEADER = st.one_of(
    st.builds(lambda name, value: f"{name}: {value}".encode(), HEADER_NAMES, HEADER_VALUES),
    st.sampled_from([b"X-Folded: a\r\n b", b"X-8bit: \xe9\xff", b"Subject: =?utf-8?q?x?="]),
)
BODY_BYTES = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.sampled_from(
            [
                b"\r\n",
                b"\r\n\r\n",
                b".\r\n",
                b"..\r\n",
                b"X-IB-Track: true\r\n",
                b"From: x@y\r\n\r\n",
                b"\n",
                b"\r",
            ]
        ),
    ),
    max_size=12,
).map(b"".join)


@given(
    st.lists(st.sampled_from(range(len(RULE_POOL))), max_size=5),
    st.lists(RAW_HEADER, max_size=8),
    BODY_BYTES,
    st.sampled_from(CLIENT_HEADER_POLICIES),
    st.sampled_from([100, 5000]),
)
@settings(max_examples=200, deadline=None)
def test_body_is_untouched_and_applying_twice_equals_once(
    picks: list[int], headers: list[bytes], body: bytes, policy: str, size: int
) -> None:
    rules = compile_rules([RULE_POOL[pick] for pick in picks])
    data = b"".join(header + b"\r\n" for header in headers) + b"\r\n" + body
    ctx = make_ctx(size=size)
    once = apply_rules(rules, ctx, data, policy)
    assert split(once.data)[1] == b"\r\n" + body
    twice = apply_rules(rules, ctx, once.data, policy)
    assert twice.data == once.data
    assert (twice.fixed, twice.dropped) == (0, 0) or policy == "strip"
