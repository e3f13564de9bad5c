"""Header rules through the real path: client -> relay (rules, spool) -> fake Infobip."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime
from typing import Any

import yaml
from relayrunner import ThreadRelay, spool_messages, wait_until
from util import free_port

from relay.passwords import hash_password

ISSUE_RULES: list[dict[str, Any]] = [
    {
        "name": "newsletters are low-priority bulk",
        "when": {"mail_from": "*@news.example.com"},
        "set": {"X-IB-Client-Priority": "LOW", "X-IB-Bulk-Id": "newsletter-{date}",
                "X-IB-Track": True},
    },
    {
        "name": "password resets go first",
        "when": {"header_from": "noreply@example.com", "subject": "re:(?i)password|reset"},
        "set": {"X-IB-Client-Priority": "HIGH"},
        "stop": True,
    },
    {
        "name": "defaults for everyone",
        "default": {"X-IB-Notify-Url": "https://hooks.example.com/infobip",
                    "X-IB-Notify-Content-Type": "application/json"},
        "remove": ["X-Internal-*"],
    },
]


def send(relay: ThreadRelay, data: bytes, sender: str = "app@example.com",
         rcpts: tuple[str, ...] = ("user@example.net",), address: tuple[str, int] | None = None
         ) -> str:
    with smtplib.SMTP(*(address or relay.address), timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(data)
        assert code == 250, reply
        return reply.split()[-1].decode()


ONE_RULE = [{"name": "one", "set": {"X-IB-Bulk-Id": "v1"}}]


def start_one(start_relay, fake, **overrides: Any) -> ThreadRelay:
    """One upstream connection, so that messages arrive in the order they were sent."""
    return start_relay(fake, upstream={"connections": 1}, **overrides)



def message(headers: str, body: bytes = b"Body line\r\n.dot line\r\n") -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + body


def test_the_issue_example_rules(fake_upstream, start_relay):
    relay = start_one(start_relay, fake_upstream, rules=ISSUE_RULES)
    send(relay, message("From: News <letters@news.example.com>\nSubject: Weekly\n"
                        "X-Internal-Route: a\nX-IB-Notify-Url: https://app.example.com/own\n"),
         sender="letters@news.example.com")
    send(relay, message("From: Example <noreply@example.com>\nSubject: Your password reset\n"
                        "X-Internal-Route: b\n"), sender="noreply@example.com")
    send(relay, message("From: app@example.com\nSubject: Invoice\nX-Internal-Secret: c\n"))
    newsletter, reset, invoice = (m.parsed() for m in fake_upstream.wait_for(3))

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert newsletter["X-IB-Client-Priority"] == "LOW"
    assert newsletter["X-IB-Bulk-Id"] == f"newsletter-{today}"
    assert newsletter["X-IB-Track"] == "true"
    assert newsletter["X-IB-Notify-Url"] == "https://app.example.com/own"  # default kept it
    assert newsletter["X-IB-Notify-Content-Type"] == "application/json"
    assert newsletter["X-Internal-Route"] is None

    assert reset["X-IB-Client-Priority"] == "HIGH"
    assert reset["X-IB-Notify-Url"] is None  # stop: the defaults rule did not run
    assert reset["X-Internal-Route"] == "b"

    assert invoice["X-IB-Client-Priority"] is None
    assert invoice["X-IB-Notify-Url"] == "https://hooks.example.com/infobip"
    assert invoice["X-Internal-Secret"] is None
    for received in fake_upstream.messages:
        assert received.data.endswith(b"\r\n\r\nBody line\r\n.dot line\r\n")

    records = {r.mail_from: r for r in wait_until(
        lambda: spool_messages(relay, ("delivered",)) if len(
            spool_messages(relay, ("delivered",))) == 3 else None, what="3 delivered")}
    assert records["letters@news.example.com"].priority_name == "LOW"
    assert records["noreply@example.com"].priority_name == "HIGH"

    metrics = relay.server.metrics.render().decode()
    assert 'relay_rule_matches_total{rule="newsletters are low-priority bulk"} 1.0' in metrics
    assert 'relay_rule_matches_total{rule="defaults for everyone"} 2.0' in metrics


def test_envelope_client_and_size_conditions(fake_upstream, start_relay):
    rules = [
        {"name": "vip", "when": {"rcpt_to": ["*@vip.example.net"]},
         "set": {"X-IB-Client-Priority": "HIGH"}},
        {"name": "lan", "when": {"client": ["10.0.0.0/8"]}, "set": {"X-IB-Entity-Id": "lan"}},
        {"name": "loopback", "when": {"client": "127.0.0.0/8", "listener": "local"},
         "set": {"X-IB-Application-Id": "{listener}-{client_ip}"}},
        {"name": "big", "when": {"size_over": "10KiB"}, "set": {"X-IB-Bulk-Id": "big"}},
        {"name": "tagged", "when": {"header": {"X-App": "re:^billing-\\d+$"}},
         "set": {"X-IB-Callback-Data": "{queue_id}/{mail_from_domain}/{header_from_domain}"}},
    ]
    relay = start_one(start_relay, fake_upstream, rules=rules)
    send(relay, message("From: a@example.com\nSubject: x\n"),
         rcpts=("a@example.net", "boss@VIP.example.net"))
    send(relay, message("From: a@example.com\nSubject: big\n", b"x" * 20000 + b"\r\n"))
    queue_id = send(relay, message("From: Billing <billing@example.org>\nX-App: billing-42\n"),
                    sender="app@example.com")
    vip, big, tagged = (m.parsed() for m in fake_upstream.wait_for(3))

    assert vip["X-IB-Client-Priority"] == "HIGH"
    assert vip["X-IB-Entity-Id"] is None
    assert vip["X-IB-Application-Id"] == "local-127.0.0.1"
    assert vip["X-IB-Bulk-Id"] is None
    assert big["X-IB-Bulk-Id"] == "big" and big["X-IB-Client-Priority"] is None
    assert tagged["X-IB-Callback-Data"] == f"{queue_id}/example.com/example.org"


def test_client_header_policies(fake_upstream, start_relay):
    ports = [free_port() for _ in range(3)]
    listeners = [{"name": policy, "address": "127.0.0.1", "port": port, "client_headers": policy}
                 for policy, port in zip(("fix", "strip", "keep"), ports, strict=True)]
    relay = start_one(start_relay, fake_upstream, listeners=listeners)
    headers = ("From: a@example.com\nX-IB-Client-Priority: high\nX-IB-Track: TRUE\n"
               "X-IB-Notify-Url: not a url\nX-Other: kept\n")
    for policy, port in zip(("fix", "strip", "keep"), ports, strict=True):
        send(relay, message(f"Subject: {policy}\n{headers}"), address=("127.0.0.1", port))
    # The priority header decides the delivery order here: match messages by subject.
    by_policy = {m.parsed()["Subject"]: m.parsed() for m in fake_upstream.wait_for(3)}
    fixed, stripped, kept = by_policy["fix"], by_policy["strip"], by_policy["keep"]

    assert fixed["X-IB-Client-Priority"] == "HIGH"
    assert fixed["X-IB-Track"] == "true"
    assert fixed["X-IB-Notify-Url"] is None
    assert stripped["X-IB-Client-Priority"] is None and stripped["X-IB-Track"] is None
    assert kept["X-IB-Client-Priority"] == "high" and kept["X-IB-Notify-Url"] == "not a url"
    for received in (fixed, stripped, kept):
        assert received["X-Other"] == "kept"
    metrics = relay.server.metrics.render().decode()
    assert 'relay_client_headers_total{action="fixed"} 2.0' in metrics
    assert 'relay_client_headers_total{action="dropped"} 4.0' in metrics


def test_reload_swaps_rules_and_refuses_bad_ones(fake_upstream, start_relay):
    relay = start_one(start_relay, fake_upstream, rules=ONE_RULE)
    send(relay, message("From: a@example.com\n"))

    config = yaml.safe_load(relay.config_path.read_text())
    config["rules"] = [{"name": "two", "set": {"X-IB-Bulk-Id": "v2"}}]
    relay.config_path.write_text(yaml.safe_dump(config))
    assert relay.reload() is True
    send(relay, message("From: a@example.com\n"))

    config["rules"] = [{"name": "bad", "set": {"X-IB-Track-Click": "true"}}]
    relay.config_path.write_text(yaml.safe_dump(config))
    assert relay.reload() is False  # refused: the old rules stay
    send(relay, message("From: a@example.com\n"))

    bulk_ids = [m.parsed()["X-IB-Bulk-Id"] for m in fake_upstream.wait_for(3)]
    assert bulk_ids == ["v1", "v2", "v2"]


def test_connections_survive_reload(fake_upstream, start_relay):
    relay = start_one(start_relay, fake_upstream, rules=ONE_RULE)
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("client.example.com")
        client.sendmail("a@example.com", ["u@example.net"], message("From: a@example.com\n"))
        config = yaml.safe_load(relay.config_path.read_text())
        config["rules"][0]["set"]["X-IB-Bulk-Id"] = "v2"
        relay.config_path.write_text(yaml.safe_dump(config))
        assert relay.reload() is True
        client.sendmail("a@example.com", ["u@example.net"], message("From: a@example.com\n"))
    bulk_ids = [m.parsed()["X-IB-Bulk-Id"] for m in fake_upstream.wait_for(2)]
    assert bulk_ids == ["v1", "v2"]


def test_auth_user_and_size_under_conditions(fake_upstream, start_relay):
    users = [{"name": "nagios", "password_hash": hash_password("pw")}]
    listeners = [{"name": "submit", "address": "127.0.0.1", "port": free_port(),
                  "auth": "optional"}]
    rules = [
        {"name": "alerts", "when": {"auth_user": "nagios"},
         "set": {"X-IB-Client-Priority": "HIGH", "X-IB-Entity-Id": "ops-{auth_user}"}},
        {"name": "small", "when": {"size_under": "1KiB"}, "set": {"X-IB-Bulk-Id": "small"}},
    ]
    relay = start_one(start_relay, fake_upstream, users=users, listeners=listeners, rules=rules)
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.ehlo("monitor.example.com")
        client.login("nagios", "pw")
        client.sendmail("nagios@example.com", ["ops@example.net"],
                        message("Subject: alert\n", b"x\r\n"))
    send(relay, message("Subject: anonymous\n", b"y" * 4000 + b"\r\n"))
    alert, anonymous = (m.parsed() for m in fake_upstream.wait_for(2))
    assert alert["X-IB-Client-Priority"] == "HIGH" and alert["X-IB-Entity-Id"] == "ops-nagios"
    assert alert["X-IB-Bulk-Id"] == "small"
    assert anonymous["X-IB-Client-Priority"] is None and anonymous["X-IB-Bulk-Id"] is None
