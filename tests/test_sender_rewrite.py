"""Sender identity rewriting (the rule action `rewrite`), issue 12 part 2."""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fakeupstream import FakeUpstream
from relayrunner import spool_messages, wait_until
from util import free_port

from relay.cli import main
from relay.config import load_config
from relay.envelope import MessageContext
from relay.errors import ConfigError
from relay.headers import MAX_LINE_LENGTH, HeaderBlock
from relay.rules import apply_rules, compile_rules, render_rules_report
from relay.rules.model import Facts, lookup_template_value
from relay.rules.sender import FromTemplate

ISSUE_RULE: dict[str, Any] = {
    "name": "old servers send as the verified address",
    "when": {"mail_from": ["root@*", "*@*.internal"]},
    "rewrite": {"mail_from": "noreply@example.com",
                "header_from": "{header_from_name} <noreply@example.com>",
                "reply_to": "original"},
}
RECEIVED = datetime(2024, 3, 5, 7, 8, 9, tzinfo=UTC)


def ctx(mail_from: str = "root@host.internal") -> MessageContext:
    return MessageContext("Q1", mail_from, ("user@example.net",), "192.0.2.1", None, "local",
                          100, RECEIVED)


def message(*headers: str) -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode()


def parsed(data: bytes) -> EmailMessage:
    result = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(result, EmailMessage)
    return result


def rfc2047_display_name(field: str) -> str:
    """The display name as RFC 2047 6.2 reads it: white space between adjacent encoded words
    is ignored. (Python 3.11's headerregistry parser keeps such a space when a word that the
    email package itself folded is split across two encoded words, so long names are compared
    with email.header's decoder, which follows 6.2.)"""
    value = field.replace("\r\n", "").partition(":")[2]  # RFC 5322 unfolding
    decoded = str(make_header(decode_header(value)))
    return decoded.rpartition("<")[0].strip()


def lines_fit(data: bytes) -> bool:
    head = data.split(b"\r\n\r\n", 1)[0]
    return all(len(line) <= MAX_LINE_LENGTH for line in head.split(b"\r\n"))


# -- templates (pure) --------------------------------------------------------------------------


LONG_NAME = "Ünïcödé Operations Team " * 60  # ~1,500 characters of display name


@pytest.mark.parametrize(("template", "original_from", "name", "address"), [
    ("{header_from_name} <noreply@example.com>", '"Jörg Müller" <root@host.internal>',
     "Jörg Müller", "noreply@example.com"),
    ("{header_from_name} <noreply@example.com>", "=?utf-8?q?J=C3=B6rg?= <root@x.internal>",
     "Jörg", "noreply@example.com"),
    ("{header_from_name} <noreply@example.com>", "root@host.internal", "", "noreply@example.com"),
    ("{header_from_name} <noreply@example.com>", '"Ops, Nightly (cron)" <r@x.internal>',
     "Ops, Nightly (cron)", "noreply@example.com"),
    ("{header_from_name} <noreply@example.com>", "日本語の名前 <r@x.internal>",
     "日本語の名前", "noreply@example.com"),
    ("Alerts from {header_from_local} <noreply@example.com>", "root@host.internal",
     "Alerts from root", "noreply@example.com"),
    ("{header_from_local}@example.com", "Cron Daemon <cron@old.internal>", "",
     "cron@example.com"),
    ("{header_from_name} via {mail_from_domain} <noreply@example.com>", "Bob <b@x.internal>",
     "Bob via host.internal", "noreply@example.com"),
    ("noreply@example.com", "Bob <b@x.internal>", "", "noreply@example.com"),
    ("{header_from_name} <noreply@example.com>", f'"{LONG_NAME}" <r@x.internal>',
     " ".join(LONG_NAME.split()), "noreply@example.com"),
])
def test_from_template_rendering(template: str, original_from: str, name: str, address: str
                                 ) -> None:
    data = message(f"From: {original_from}", "Subject: s")
    block = HeaderBlock.parse(data)[0]
    facts = Facts(ctx(), block)
    field = FromTemplate.parse(template).render(lambda key: lookup_template_value(facts, key))
    assert field.isascii()  # RFC 2047 encoded, never raw UTF-8
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    [mailbox] = parsed(field + b"\r\n").get("From").addresses  # type: ignore[union-attr]
    assert mailbox.addr_spec == address
    if len(name) < 60:  # on one line: the email package reads back exactly what it wrote
        assert mailbox.display_name == name
    else:
        assert rfc2047_display_name(field.decode()) == name


def rewrite_rule(**rewrite: Any) -> list[dict[str, Any]]:
    return [{"name": "r", "rewrite": rewrite}]


@pytest.mark.parametrize(("rewrite", "where", "words"), [
    ({"mail_from": "not an address"}, "rewrite.mail_from", "not a valid address"),
    ({"mail_from": "noreply@example.com\r\nRCPT TO:<x@y>"}, "rewrite.mail_from",
     "must not contain CR, LF"),
    ({"mail_from": "jörg@example.com"}, "rewrite.mail_from", "must be an ASCII address"),
    ({"mail_from": 5}, "rewrite.mail_from", "must be a string"),
    ({"header_from": "Name <noreply@example.com>\r\nBcc: x@y"}, "rewrite.header_from",
     "must not contain CR, LF"),
    ({"header_from": "Name\n <noreply@example.com>"}, "rewrite.header_from",
     "must not contain CR, LF"),
    ({"header_from": "{header_from_nam} <noreply@example.com>"}, "rewrite.header_from",
     "unknown placeholder {header_from_nam}"),
    ({"header_from": "{header_from_name} <no reply>"}, "rewrite.header_from",
     "not a valid address"),
    ({"header_from": "{header_from_name} {mail_from}"}, "rewrite.header_from",
     "not a valid address"),
    ({"reply_to": "sender"}, "rewrite.reply_to", "must be one of original"),
    ({"mail_frm": "noreply@example.com"}, "rewrite.mail_frm", "did you mean mail_from?"),
])
def test_rewrite_config_errors(rewrite: dict[str, Any], where: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_rules(rewrite_rule(**rewrite))
    assert caught.value.path == f'rules[0] ("r").{where}'
    assert words in str(caught.value)


@pytest.mark.parametrize("rewrite", [{}, "noreply@example.com", None])
def test_rewrite_must_say_what(rewrite: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_rules([{"name": "r", "rewrite": rewrite}])
    assert "rules[0]" in caught.value.path


# -- the engine --------------------------------------------------------------------------------


def test_later_mail_from_conditions_see_the_address_before_rewriting() -> None:
    rules = compile_rules([ISSUE_RULE,
                           {"name": "old", "when": {"mail_from": "root@*"},
                            "set": {"X-IB-Bulk-Id": "legacy"}},
                           {"name": "new", "when": {"mail_from": "noreply@*"},
                            "set": {"X-IB-Bulk-Id": "never"}}])
    outcome = apply_rules(rules, ctx(), message('From: "Jörg" <root@host.internal>'))
    assert outcome.mail_from == "noreply@example.com"
    assert outcome.matched == ("old servers send as the verified address", "old")
    assert parsed(outcome.data)["X-IB-Bulk-Id"] == "legacy"


def test_the_last_mail_from_rewrite_wins_and_no_rewrite_leaves_it() -> None:
    rules = compile_rules([{"name": "a", "rewrite": {"mail_from": "a@example.com"}},
                           {"name": "b", "when": {"rcpt_to": "user@*"},
                            "rewrite": {"mail_from": "b@example.com"}}])
    assert apply_rules(rules, ctx(), message("From: x@y.example")).mail_from == "b@example.com"
    assert apply_rules(compile_rules([{"set": {"X-IB-Track": True}}]), ctx(),
                       message("From: x@y.example")).mail_from is None


def test_reply_to_original_keeps_an_existing_reply_to_and_needs_a_from() -> None:
    rules = compile_rules([ISSUE_RULE])
    kept = apply_rules(rules, ctx(), message("From: Bob <bob@host.internal>",
                                             "Reply-To: helpdesk@example.com"))
    assert parsed(kept.data).get_all("Reply-To") == ["helpdesk@example.com"]
    no_from = apply_rules(rules, ctx(), message("Subject: no from"))
    assert "Reply-To" not in parsed(no_from.data)
    assert parsed(no_from.data)["From"] == "noreply@example.com"


def test_reply_to_is_the_from_before_any_rule_rewrote_it() -> None:
    rules = compile_rules([
        {"name": "first", "rewrite": {"header_from": "First <first@example.com>"}},
        {"name": "second", "rewrite": {"header_from": "{header_from_name} <noreply@example.com>",
                                       "reply_to": "original"}}])
    outcome = apply_rules(rules, ctx(), message("From: Bob <bob@host.internal>"))
    result = parsed(outcome.data)
    assert str(result["Reply-To"]) == "Bob <bob@host.internal>"
    # Headers are live, like every other header edit: the second rule saw the first's From.
    assert str(result["From"]) == "First <noreply@example.com>"


def test_a_template_that_cannot_make_an_address_leaves_the_from_with_a_warning() -> None:
    rules = compile_rules(rewrite_rule(header_from="{header_from_local}@example.com"))
    outcome = apply_rules(rules, ctx(), message("From: undisclosed-recipients:;"))
    assert parsed(outcome.data)["From"] == "undisclosed-recipients:;"
    assert outcome.warnings and "From not rewritten" in outcome.warnings[0]


def test_rules_test_shows_the_rewrite() -> None:
    report = render_rules_report(compile_rules([ISSUE_RULE]), ctx(),
                                 message('From: "Jörg" <root@host.internal>'))
    assert "Envelope sender: noreply@example.com (rewritten from root@host.internal)" in report
    assert "actions: rewrite mail_from: noreply@example.com, header_from: " \
           "{header_from_name} <noreply@example.com>, reply_to: original" in report
    assert "From: =?utf-8?q?J=C3=B6rg?= <noreply@example.com>" in report


# -- through a real relay ----------------------------------------------------------------------


def send(relay: Any, sender: str, data: bytes) -> str:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        assert client.mail(sender)[0] == 250
        assert client.rcpt("user@example.net")[0] == 250
        code, reply = client.data(data)
    assert code == 250, reply
    return reply.split()[-1].decode()


def test_rewriting_through_the_relay(fake_upstream: FakeUpstream, start_relay: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # allowed_senders sees the client's address (it is checked at MAIL, before any rule).
    relay = start_relay(fake_upstream, rules=[ISSUE_RULE],
                        listeners=[{"name": "local", "address": "127.0.0.1",
                                    "port": free_port(), "allowed_senders": ["*@host.internal"]}])
    utf8_name = message('From: "Jörg Müller, Ops" <root@host.internal>', "Subject: nightly")
    encoded_name = message("From: =?iso-8859-1?q?Ren=E9_Fran=E7ois?= <cron@host.internal>",
                           "Reply-To: desk@example.com", "Subject: weekly")
    long_name = message(f'From: "{LONG_NAME}" <batch@host.internal>', "Subject: long")
    first = send(relay, "root@host.internal", utf8_name)
    send(relay, "cron@host.internal", encoded_name)
    send(relay, "batch@host.internal", long_name)
    received = {m.parsed()["Subject"]: m for m in fake_upstream.wait_for(3)}
    for item in received.values():
        assert item.mail_from == "noreply@example.com"
        assert lines_fit(item.data)
        assert item.data.split(b"\r\n\r\n")[0].count(b"\r\nFrom:") == 1
    nightly = received["nightly"].parsed()
    [sender] = nightly["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Jörg Müller, Ops", "noreply@example.com")
    [back] = nightly["Reply-To"].addresses
    assert (back.display_name, back.addr_spec) == ("Jörg Müller, Ops", "root@host.internal")
    weekly = received["weekly"].parsed()
    assert weekly["From"].addresses[0].display_name == "René François"
    assert weekly.get_all("Reply-To") == ["desk@example.com"]  # the message's own one stays
    head = received["long"].data.split(b"\r\n\r\n")[0].decode()
    from_field = head[head.index("\r\nFrom:") + 2:].split("\r\nSubject:")[0]
    assert rfc2047_display_name(from_field) == " ".join(LONG_NAME.split())
    assert from_field.isascii() and max(len(line) for line in from_field.split("\r\n")) <= 78
    wait_until(lambda: len(spool_messages(relay, ("delivered",))) == 3, what="3 delivered")
    records = {m.id: m for m in spool_messages(relay, ("delivered",))}
    assert (records[first].mail_from, records[first].original_mail_from) == \
        ("noreply@example.com", "root@host.internal")
    spool = str(relay.config.queue.path)
    assert main(["queue", "show", "--spool", spool, first]) == 0
    out = capsys.readouterr().out
    assert "sender:       <noreply@example.com>" in out
    assert "rewritten:    from <root@host.internal>" in out
    assert main(["queue", "show", "--spool", spool, "--json", first]) == 0
    assert json.loads(capsys.readouterr().out)["original_mail_from"] == "root@host.internal"


def test_a_sender_no_rule_rewrites_is_recorded_as_it_came(fake_upstream: FakeUpstream,
                                                          start_relay: Any) -> None:
    relay = start_relay(fake_upstream, rules=[ISSUE_RULE])
    send(relay, "app@example.com", message("From: App <app@example.com>", "Subject: s"))
    [got] = fake_upstream.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert str(got.parsed()["From"]) == "App <app@example.com>"
    assert "Reply-To" not in got.parsed()
    [record] = wait_until(lambda: spool_messages(relay, ("delivered",)), what="delivered")
    assert record.original_mail_from is None


def test_rewrite_in_a_config_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps({"upstream": {"password": "k"}, "rules": [ISSUE_RULE],
                                "queue": {"path": str(tmp_path / "q")}}), encoding="utf-8")
    [rule] = load_config(path, environ={}).rules
    assert rule.rewrite is not None and rule.rewrite.mail_from == "noreply@example.com"
