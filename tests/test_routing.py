"""Named upstreams chosen by rules (`upstreams:` and the rule action `route`), issue 12 part 1.

The relay tests run two fake Infobip endpoints with different API keys: each accepts only its
own key, so a message that arrives there was sent with that upstream's credentials.
"""

from __future__ import annotations

import json
import logging
import smtplib
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeupstream import FakeUpstream
from relayrunner import (
    ProcessRelay,
    ThreadRelay,
    relay_config,
    spool_messages,
    wait_until,
    write_config,
)

from relay.cli import main
from relay.config import load_config
from relay.envelope import Envelope, MessageContext
from relay.errors import ConfigError
from relay.rules import apply_rules, compile_rules, render_rules_report
from relay.spool import SpoolDB

MARKETING_KEY = "marketing-api-key"
NEWS_RULE = {"name": "newsletters use the marketing account",
             "when": {"mail_from": "*@news.example.com"}, "route": "marketing"}
MESSAGE = b"From: app@example.com\r\nSubject: routed\r\n\r\nbody\r\n"


def upstream_of(fake: FakeUpstream, password: str, **overrides: Any) -> dict[str, Any]:
    return {"host": fake.host, "port": fake.port, "tls": "starttls", "username": "App",
            "password": password, "ca_file": str(fake.ca_pem_path), "connections": 1,
            "timeout": "10s", **overrides}


def send_from(relay: ThreadRelay | ProcessRelay, sender: str, rcpt: str = "user@example.net"
              ) -> str:
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail(sender)
        client.rcpt(rcpt)
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    return reply.split()[-1].decode()


@pytest.fixture
def marketing(fake_upstream_factory: Any) -> FakeUpstream:
    fake: FakeUpstream = fake_upstream_factory(api_key=MARKETING_KEY)
    return fake


def start_routed(start_relay: Any, default: FakeUpstream, marketing: FakeUpstream,
                 password: str = MARKETING_KEY, **overrides: Any) -> ThreadRelay:
    relay: ThreadRelay = start_relay(default, upstreams={"marketing": upstream_of(
        marketing, password)}, rules=[NEWS_RULE], **overrides)
    return relay


# -- route choice and config errors (pure functions) ------------------------------------------


def ctx(mail_from: str) -> MessageContext:
    return MessageContext("Q1", mail_from, ("user@example.net",), "192.0.2.1", None, "local",
                          len(MESSAGE))


ROUTE_RULES = compile_rules([
    {"name": "news", "when": {"mail_from": "*@news.example.com"}, "route": "marketing"},
    {"name": "billing", "when": {"mail_from": "billing@*"}, "route": "finance"},
    {"name": "vip news", "when": {"mail_from": "vip@news.example.com"}, "route": "finance"},
    {"name": "stopper", "when": {"mail_from": "stop@*"}, "stop": True},
    {"name": "after stop", "when": {"mail_from": "stop@*"}, "route": "marketing"},
])


@pytest.mark.parametrize(("sender", "route"), [
    ("app@example.com", "default"),            # no rule routes it
    ("a@news.example.com", "marketing"),       # one rule
    ("billing@news.example.com", "finance"),   # two match: the last route wins
    ("vip@news.example.com", "finance"),       # likewise, in list order
    ("stop@news.example.com", "marketing"),    # routed before the stop; later rules skipped
    ("stop@example.com", "default"),           # the routing rule after the stop never runs
])
def test_route_choice(sender: str, route: str) -> None:
    assert apply_rules(ROUTE_RULES, ctx(sender), MESSAGE).route == route


def test_a_route_only_rule_is_a_rule() -> None:
    [rule] = compile_rules([{"route": "marketing"}])
    assert rule.route == "marketing" and not rule.conditions


def config_file(tmp_path: Path, **extra: Any) -> Path:
    raw = {"upstream": {"password": "key-default"}, "queue": {"path": str(tmp_path / "q")},
           **extra}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(("extra", "where", "words"), [
    ({"upstreams": {"marketing": {"password": "k"}},
      "rules": [{"name": "n", "route": "marketting"}]},
     'rules[0] ("n").route', "unknown upstream 'marketting'; did you mean marketing?"),
    ({"rules": [{"route": "nowhere"}]}, 'rules[0] ("rule 1").route',
     "unknown upstream 'nowhere' (configured: default)"),
    ({"rules": [{"route": ""}]}, 'rules[0] ("rule 1").route', "must be the name of an upstream"),
    ({"upstreams": {"default": {"password": "k"}}}, "upstreams.default",
     "the name of the top-level upstream"),
    ({"upstreams": {"bad name!": {"password": "k"}}}, "upstreams.bad name!", "metrics label"),
    ({"upstreams": ["marketing"]}, "upstreams", "must be a mapping"),
    ({"upstreams": {"marketing": {"region": "mars", "password": "k"}}},
     "upstreams.marketing.region", "unknown region 'mars'"),
    ({"upstreams": {"marketing": {"password": "k", "conections": 4}}},
     "upstreams.marketing.conections", "did you mean connections?"),
])
def test_config_errors_name_the_key(tmp_path: Path, extra: dict[str, Any], where: str,
                                    words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(tmp_path, **extra), environ={})
    assert caught.value.path == where
    assert words in str(caught.value)


def test_named_upstreams_never_inherit_the_environment_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, upstreams={"marketing": {"region": "us"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"INFOBIP_API_KEY": "the-default-accounts-key"})
    assert caught.value.path == "upstreams.marketing.password"
    assert "INFOBIP_API_KEY" not in str(caught.value)


def test_named_upstreams_load_with_their_own_settings(tmp_path: Path) -> None:
    key_file = tmp_path / "marketing_api_key"
    key_file.write_text("marketing-secret\n", encoding="utf-8")
    key_file.chmod(0o600)
    config = load_config(config_file(tmp_path, upstreams={"marketing": {
        "region": "us", "password_file": str(key_file), "connections": 4}},
        rules=[NEWS_RULE]), environ={"INFOBIP_REGION": "europe"})
    default, marketing = config.all_upstreams
    assert (default.name, marketing.name) == ("default", "marketing")
    assert marketing.password.reveal() == "marketing-secret"
    assert marketing.connections == 4 and marketing.region == "us"
    assert default.region == "europe"  # the environment applies to `upstream` only
    assert config.upstream_named("marketing") is marketing
    assert config.upstream_named("finance") is None


def test_rules_test_prints_the_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    message = tmp_path / "mail.eml"
    message.write_bytes(MESSAGE)
    path = config_file(tmp_path, upstreams={"marketing": {"password": "k"}}, rules=[NEWS_RULE])
    for sender, expected in (("a@news.example.com", "Route: upstream 'marketing' (rule "
                                                   "'newsletters use the marketing account')"),
                             ("a@example.com", "Route: upstream 'default' (no matching rule "
                                               "routes it)")):
        assert main(["rules", "test", "-c", str(path), "--mail-from", sender, str(message)]) == 0
        out = capsys.readouterr().out
        assert expected in out
    report = render_rules_report((), ctx("a@example.com"), MESSAGE)
    assert "Route: upstream 'default' (no rule routes)" in report


# -- the spool records the route ---------------------------------------------------------------


def test_an_older_spool_gets_the_route_column_with_default(tmp_path: Path) -> None:
    db = SpoolDB(tmp_path / "spool")
    db.transaction(lambda: db.insert(Envelope(ctx("a@example.com"), MESSAGE), 1, time.time()))
    # As an earlier version left it: no route and no original sender column.
    db.conn.execute("ALTER TABLE messages DROP COLUMN route")
    db.conn.execute("ALTER TABLE messages DROP COLUMN original_mail_from")
    db.close()
    db = SpoolDB(tmp_path / "spool")
    try:
        message = db.get("Q1")
        assert message is not None
        assert (message.route, message.original_mail_from) == ("default", None)
        assert db.due(time.time() + 1, 10, "default") and not db.due(time.time() + 1, 10, "x")
        assert db.waiting_by_route() == {"default": 1}
    finally:
        db.close()


# -- through a real relay, two fake upstreams ----------------------------------------------------


def test_each_upstream_receives_only_its_mail_with_its_key(
        fake_upstream: FakeUpstream, marketing: FakeUpstream, start_relay: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    relay = start_routed(start_relay, fake_upstream, marketing)
    news = [send_from(relay, f"n{i}@news.example.com") for i in range(3)]
    plain = [send_from(relay, f"app{i}@example.com") for i in range(2)]
    got_marketing = marketing.wait_for(3)
    got_default = fake_upstream.wait_for(2)
    time.sleep(0.3)  # nothing else arrives late
    assert sorted(m.mail_from for m in marketing.messages) == \
        sorted(m.mail_from for m in got_marketing) == [f"n{i}@news.example.com" for i in range(3)]
    assert sorted(m.mail_from for m in fake_upstream.messages) == \
        sorted(m.mail_from for m in got_default) == ["app0@example.com", "app1@example.com"]
    assert marketing.auth_failures == fake_upstream.auth_failures == 0
    wait_until(lambda: len(spool_messages(relay, ("delivered",))) == 5, what="5 delivered")
    routes = {m.id: m.route for m in spool_messages(relay, ("delivered",))}
    assert routes == {**dict.fromkeys(news, "marketing"), **dict.fromkeys(plain, "default")}
    spool = str(relay.config.queue.path)
    assert main(["queue", "show", "--spool", spool, news[0]]) == 0
    assert "upstream:     marketing" in capsys.readouterr().out
    assert main(["queue", "show", "--spool", spool, "--json", plain[0]]) == 0
    assert json.loads(capsys.readouterr().out)["route"] == "default"
    metrics = relay.server.metrics.render().decode()
    assert 'relay_delivery_attempts_total{state="delivered",upstream="marketing"} 3.0' in metrics
    assert 'relay_delivery_attempts_total{state="delivered",upstream="default"} 2.0' in metrics


def readyz(relay: ThreadRelay) -> tuple[int, str]:
    url = f"http://127.0.0.1:{relay.server.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_a_bad_key_on_one_upstream_does_not_stop_the_other(
        fake_upstream: FakeUpstream, marketing: FakeUpstream, start_relay: Any) -> None:
    relay = start_routed(start_relay, fake_upstream, marketing, password="revoked-key",
                         queue={"auth_retry": "5m"})
    news = send_from(relay, "n@news.example.com")
    wait_until(lambda: any(m.id == news for m in spool_messages(relay, ("deferred",))),
               what="the marketing message deferred")
    for index in range(3):
        send_from(relay, f"app{index}@example.com")
    fake_upstream.wait_for(3)
    [deferred] = spool_messages(relay, ("deferred",))
    assert deferred.id == news and deferred.attempts == 0
    assert (deferred.last_reply or "").startswith("upstream authentication failed")
    assert marketing.messages == [] and marketing.auth_failures >= 1
    assert fake_upstream.auth_failures == 0
    status, body = wait_until(lambda: (r := readyz(relay)) and "upstream default: ready" in r[1]
                              and r, what="readiness of both upstreams")
    assert status == 200  # the default account still relays
    assert "upstream marketing: upstream refuses our credentials" in body
    assert "1 of 2 upstreams ready" in body
    relay.call(relay.server.refresh_stats())
    registry = relay.server.metrics.registry
    assert registry.get_sample_value("relay_upstream_auth_ok", {"upstream": "marketing"}) == 0
    assert registry.get_sample_value("relay_upstream_auth_ok", {"upstream": "default"}) == 1


def rewrite_config(relay: ThreadRelay, change: Any) -> None:
    raw = yaml.safe_load(relay.config_path.read_text(encoding="utf-8"))
    change(raw)
    relay.config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")


def drop_marketing(raw: dict[str, Any]) -> None:
    raw.pop("upstreams")
    raw.pop("rules")


def test_a_reload_that_would_strand_mail_is_refused_and_the_mail_still_goes(
        fake_upstream: FakeUpstream, marketing: FakeUpstream, start_relay: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.server")
    relay = start_routed(start_relay, fake_upstream, marketing)
    marketing.stop()
    ids = [send_from(relay, f"n{i}@news.example.com") for i in range(2)]
    wait_until(lambda: spool_messages(relay, ("deferred",)), what="a deferral")
    assert len(spool_messages(relay, ("queued", "deferred"))) == 2
    rewrite_config(relay, drop_marketing)
    assert relay.reload() is False
    refusals = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refusals == ["reload refused, keeping the running configuration: 2 queued "
                        "message(s) still use upstream 'marketing'; put the upstream back, or "
                        "let that mail be delivered (or `queue delete` it) first"]
    # The old configuration stays: routing and the marketing delivery go on.
    assert relay.server.config.upstream_named("marketing") is not None
    third = send_from(relay, "n3@news.example.com")
    marketing.start()
    marketing.wait_for(3, timeout=15)
    wait_until(lambda: {m.id for m in spool_messages(relay, ("delivered",))} == {*ids, third},
               what="all three recorded as delivered")
    assert fake_upstream.messages == []
    # Nothing waits for it any more: now the same reload goes through.
    assert relay.reload() is True
    assert relay.server.config.upstream_named("marketing") is None
    assert [d.name for d in relay.server.deliveries or ()] == ["default"]
    send_from(relay, "n4@news.example.com")
    [late] = fake_upstream.wait_for(1)
    assert late.mail_from == "n4@news.example.com"


def test_a_reload_adds_an_upstream_and_its_route(
        fake_upstream: FakeUpstream, marketing: FakeUpstream, start_relay: Any) -> None:
    relay = start_relay(fake_upstream)

    def add(raw: dict[str, Any]) -> None:
        raw["upstreams"] = {"marketing": upstream_of(marketing, MARKETING_KEY)}
        raw["rules"] = [NEWS_RULE]

    rewrite_config(relay, add)
    assert relay.reload() is True
    send_from(relay, "n@news.example.com")
    [got] = marketing.wait_for(1)
    assert got.mail_from == "n@news.example.com" and fake_upstream.messages == []


def test_the_route_survives_a_restart(fake_upstream: FakeUpstream, marketing: FakeUpstream,
                                      start_relay_process: Any, tmp_path: Path) -> None:
    config = relay_config(tmp_path, fake_upstream,
                          upstreams={"marketing": upstream_of(marketing, MARKETING_KEY)},
                          rules=[NEWS_RULE])
    marketing.stop()
    relay = start_relay_process(config)
    queue_id = send_from(relay, "n@news.example.com")
    assert relay.terminate() == 0
    db = SpoolDB(Path(config["queue"]["path"]), create=False)
    try:
        stored = db.get(queue_id)
    finally:
        db.close()
    assert stored is not None and stored.route == "marketing" and stored.state != "delivered"
    # Restarted without the rule: the message still goes where it was routed.
    config.pop("rules")
    marketing.start()
    restarted = ProcessRelay(write_config(tmp_path, config), tmp_path / "relay2.log").start()
    try:
        [got] = marketing.wait_for(1, timeout=15)
        assert got.mail_from == "n@news.example.com"
        assert fake_upstream.messages == []
    finally:
        restarted.terminate()


def test_mail_of_an_upstream_removed_while_stopped_waits_with_a_log_line(
        fake_upstream: FakeUpstream, tmp_path: Path, start_relay: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    db = SpoolDB(spool)
    envelope = Envelope(ctx("n@news.example.com"), MESSAGE, route="gone")
    db.transaction(lambda: db.insert(envelope, 1, time.time()))
    db.close()
    caplog.set_level(logging.ERROR, logger="relay.server")
    relay = start_relay(fake_upstream)
    assert any("1 queued message(s) still use upstream 'gone'" in r.getMessage()
               for r in caplog.records)
    time.sleep(1.5)  # a poll or two
    assert fake_upstream.messages == []
    [waiting] = spool_messages(relay, ("queued",))
    assert waiting.route == "gone"
    # The column is what the pollers read; a foreign value does not break the spool either.
    with sqlite3.connect(spool / "queue.sqlite3") as conn:
        assert conn.execute("SELECT route FROM messages").fetchall() == [("gone",)]
