"""Issue 11: Infobip delivery reports, pulled and pushed, through the real relay; DSNs."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fakeinfobip import FakeInfobipAPI, report
from fakeupstream import FakeUpstream
from relayrunner import ProcessRelay, ThreadRelay, relay_config, send, wait_until, write_config
from util import free_port

from relay.cli import main
from relay.infobip.headers import report_defaults
from relay.infobip.reports import PayloadError, parse_body
from relay.reports.pull import retry_after
from relay.spool import SpoolDB

TOKEN = "s3cret-token-0123456789"
SENDER = "postmaster@example.com"


# --------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize(("item", "expected"), [
    (report("m1", "a@x.org"), ("report", "m1", "a@x.org", "DELIVERED", None)),
    (report(None, "a@x.org", "UNDELIVERABLE", callback_data="Q1"),
     ("report", None, "a@x.org", "UNDELIVERABLE", "Q1")),
    ({"to": "a@x.org", "messageId": 12345, "status": {"groupId": 4}},
     ("report", "12345", "a@x.org", "EXPIRED", None)),
    ({"notificationType": "LATE_BOUNCE", "recipient": "a@x.org", "messageId": 77,
      "eventId": "e1", "sendDateTime": 1700000000000},
     ("tracking", "77", "a@x.org", "LATE_BOUNCE", None)),
    ({"notificationType": "clicked", "to": "a@x.org", "messageId": "m", "url": "https://u"},
     ("tracking", "m", "a@x.org", "CLICKED", None)),
])
def test_parse_items(item: dict[str, Any], expected: tuple[Any, ...]) -> None:
    items, unusable = parse_body(json.dumps({"results": [item]}).encode())
    assert unusable == 0
    got = items[0]
    kind = got.report.group if got.report else got.tracking.type if got.tracking else None
    assert (got.kind, got.message_id, got.to, kind, got.callback_data) == expected


@pytest.mark.parametrize("item", [
    {"messageId": "m"},  # no recipient
    {"to": "a@x.org", "status": {"groupName": "NONSENSE"}},  # no group
    {"notificationType": "SOLD", "recipient": "a@x.org"},  # unknown event
    "text", 5,
])
def test_unusable_items_are_counted_not_kept(item: object) -> None:
    assert parse_body(json.dumps({"results": [item]}).encode()) == ([], 1)


@pytest.mark.parametrize("body", [b"<xml/>", b"[", b'{"x": 1}', b"\xff"])
def test_not_a_batch(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_body(body)


def test_same_item_same_key_and_event_id_decides_for_events() -> None:
    one = parse_body(json.dumps([report("m", "a@x.org")]).encode())[0][0]
    two = parse_body(json.dumps([report("m", "a@x.org")]).encode())[0][0]
    other = parse_body(json.dumps([report("m", "a@x.org", "UNDELIVERABLE")]).encode())[0][0]
    assert one.key == two.key != other.key
    event = {"notificationType": "OPENED", "recipient": "a@x.org", "eventId": "e1"}
    first = parse_body(json.dumps(event).encode())[0][0]
    again = parse_body(json.dumps({**event, "sendDateTime": 5}).encode())[0][0]
    assert first.key == again.key


@pytest.mark.parametrize(("value", "expected"), [
    (None, 30.0), ("7", 7.0), ("0", 1.0), ("999999", 3600.0), ("soon", 30.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),
])
def test_retry_after(value: str | None, expected: float) -> None:
    assert retry_after(value, 30.0) == expected


def test_report_defaults_fill_only_gaps() -> None:
    head = b"From: a@x.org\r\nX-IB-Callback-Data: mine\r\n"
    out = report_defaults(head, "Q1", "{queue_id}", "https://r.example/hook?token=t")
    assert b"X-IB-Callback-Data: mine\r\n" in out and b"Q1" not in out
    assert out.endswith(b"X-IB-Notify-Url: https://r.example/hook?token=t\r\n")
    assert report_defaults(b"From: a@x.org\r\n", "Q1", None, None) == b"From: a@x.org\r\n"
    assert b"X-IB-Callback-Data: Q1\r\n" in report_defaults(b"From: a@x.org\r\n", "Q1",
                                                             "{queue_id}", None)


# --------------------------------------------------------------------------- through the relay

@pytest.fixture
def webhook_relay(fake_upstream: FakeUpstream, start_relay: Callable[..., ThreadRelay]
                  ) -> ThreadRelay:
    return start_relay(fake_upstream, reports={
        "webhook": {"address": "127.0.0.1", "port": free_port(), "token": TOKEN,
                    "public_url": "https://relay.example.com/infobip/reports"},
        "bounces": {"sender": SENDER}})


def post(relay: ThreadRelay, body: bytes, *, token: str | None = TOKEN, bearer: bool = False,
         content_type: str = "application/json") -> int:
    hook = relay.config.reports.webhook
    assert hook is not None and relay.server.webhook_port is not None
    path = hook.path + (f"?token={token}" if token is not None and not bearer else "")
    headers = {"Content-Type": content_type}
    if bearer:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", relay.server.webhook_port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def batch(*items: dict[str, Any]) -> bytes:
    return json.dumps({"results": list(items)}).encode()


def show(relay: ThreadRelay, queue_id: str, capsys: pytest.CaptureFixture[str]
         ) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["queue", "show", queue_id, "--json", "--spool",
                 str(relay.config.queue.path)]) == 0
    return dict(json.loads(capsys.readouterr().out))


def metric(relay: ThreadRelay, name: str) -> float:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{relay.server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name))


def delivered(relay: ThreadRelay, fake: FakeUpstream, rcpts: tuple[str, ...],
              message: bytes | None = None) -> tuple[str, str]:
    """Send one message; (queue id, Infobip id) once the relay has recorded the 250."""
    kwargs = {"message": message} if message is not None else {}
    queue_id = send(relay, rcpts, **kwargs)
    upstream_id = fake.wait_for(1)[-1].message_id

    def recorded() -> bool:
        db = SpoolDB(relay.config.queue.path, create=False)
        try:
            found = db.get(queue_id)
        finally:
            db.close()
        return found is not None and found.state == "delivered"

    wait_until(recorded, what="the delivery to be recorded")
    return queue_id, upstream_id


def test_delivered_report(webhook_relay: ThreadRelay, fake_upstream: FakeUpstream,
                          capsys: pytest.CaptureFixture[str]) -> None:
    queue_id, upstream_id = delivered(webhook_relay, fake_upstream, ("a@example.net",
                                                                      "b@example.net"))
    sent = fake_upstream.messages[0].parsed()
    assert sent["X-IB-Callback-Data"] == queue_id
    assert sent["X-IB-Notify-Url"] == f"https://relay.example.com/infobip/reports?token={TOKEN}"
    assert post(webhook_relay, batch(report(upstream_id, "A@example.net"))) == 200
    shown = show(webhook_relay, queue_id, capsys)
    assert shown["state"] == "delivered"
    first, second = shown["recipients"]
    assert first["report"] == {"group": "DELIVERED", "status": "DELIVERED_TO_HANDSET",
                               "error": "NO_ERROR", "error_id": 0, "permanent": False,
                               "done_at": "2020-09-08T05:27:59.256+0000"}
    assert first["upstream_id"] == upstream_id and second["report"] is None
    assert metric(webhook_relay, 'relay_reports_total{group="DELIVERED"}') == 1


def test_undeliverable_report_bounces_and_sends_a_dsn(
        webhook_relay: ThreadRelay, fake_upstream: FakeUpstream,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    queue_id, upstream_id = delivered(webhook_relay, fake_upstream, ("gone@example.net",))
    bad = report(upstream_id, "gone@example.net", "UNDELIVERABLE",
                 status="UNDELIVERABLE_REJECTED_OPERATOR", error="INVALID_EMAIL_ADDRESS",
                 error_id=6006, permanent=True)
    assert post(webhook_relay, batch(bad)) == 200
    dsn = fake_upstream.wait_for(2)[1]
    assert dsn.mail_from == SENDER and dsn.rcpt_tos == ["app@example.com"]
    text = dsn.data.decode().replace("\r\n ", " ")  # unfolded
    assert "multipart/report" in text and "report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; gone@example.net" in text
    assert TOKEN not in text, text
    assert "6006 INVALID_EMAIL_ADDRESS" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: X-Infobip; UNDELIVERABLE_REJECTED_OPERATOR (6006 " \
        "INVALID_EMAIL_ADDRESS)" in text
    shown = show(webhook_relay, queue_id, capsys)
    assert shown["state"] == "bounced" and shown["recipients"][0]["state"] == "bounced"
    assert main(["queue", "list", "--state", "bounced", "--json", "--spool",
                 str(webhook_relay.config.queue.path)]) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == [queue_id]
    assert metric(webhook_relay, "relay_bounces_sent_total") == 1
    assert any(queue_id in r.getMessage() and upstream_id in r.getMessage()
               and "INVALID_EMAIL_ADDRESS" in r.getMessage() for r in caplog.records)


def test_report_before_the_250_is_committed(webhook_relay: ThreadRelay,
                                            fake_upstream: FakeUpstream,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fake_upstream.delay_next("data", 1.5)
    queue_id = send(webhook_relay, ("early@example.net",))
    upstream_id = fake_upstream.wait_for(1)[0].message_id
    # The upstream has the message but has not answered the final dot yet.
    assert post(webhook_relay, batch(report(upstream_id, "early@example.net"))) == 200
    assert show(webhook_relay, queue_id, capsys)["state"] == "queued"
    wait_until(lambda: show(webhook_relay, queue_id, capsys)["recipients"][0]["report"],
               what="the early report to be matched")


def test_repeated_posts_change_nothing(webhook_relay: ThreadRelay,
                                       fake_upstream: FakeUpstream) -> None:
    _, upstream_id = delivered(webhook_relay, fake_upstream, ("gone@example.net",))
    body = batch(report(upstream_id, "gone@example.net", "REJECTED", status="REJECTED",
                        error="SENDER_DOMAIN_UNVERIFIED", error_id=6036, permanent=True))
    for _ in range(3):
        assert post(webhook_relay, body) == 200
    fake_upstream.wait_for(2)
    time.sleep(1.5)
    assert len(fake_upstream.messages) == 2  # one DSN, not three
    assert metric(webhook_relay, 'relay_reports_total{group="REJECTED"}') == 1


def test_webhook_refusals(webhook_relay: ThreadRelay, caplog: pytest.LogCaptureFixture) -> None:
    body = batch(report("m", "a@example.net"))
    assert post(webhook_relay, body, token=None) == 401
    assert post(webhook_relay, body, token="wrong-token-0123456789") == 401
    assert post(webhook_relay, body, token="wrong", bearer=True) == 401
    assert post(webhook_relay, body, bearer=True) == 200
    assert post(webhook_relay, b"<results/>", content_type="application/xml") == 415
    assert post(webhook_relay, b"{nope", content_type="application/json") == 400
    assert post(webhook_relay, b"[" + b" " * (1024 * 1024) + b"]") == 413
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("message", [
    b"From: app@example.com\r\nContent-Type: multipart/report; report-type=delivery-status;"
    b" boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    b"From: app@example.com\r\nAuto-Submitted: auto-replied\r\nSubject: x\r\n\r\nbody\r\n",
])
def test_no_dsn_for_a_bounce_or_an_auto_reply(webhook_relay: ThreadRelay,
                                              fake_upstream: FakeUpstream,
                                              capsys: pytest.CaptureFixture[str],
                                              message: bytes) -> None:
    queue_id, upstream_id = delivered(webhook_relay, fake_upstream, ("gone@example.net",),
                                      message)
    assert post(webhook_relay, batch(report(upstream_id, "gone@example.net", "UNDELIVERABLE",
                                            permanent=True))) == 200
    wait_until(lambda: show(webhook_relay, queue_id, capsys)["state"] == "bounced",
               what="the bounce")
    time.sleep(1.5)
    assert len(fake_upstream.messages) == 1


def test_a_dsn_that_bounces_gets_no_dsn(webhook_relay: ThreadRelay,
                                        fake_upstream: FakeUpstream) -> None:
    _, upstream_id = delivered(webhook_relay, fake_upstream, ("gone@example.net",))
    assert post(webhook_relay, batch(report(upstream_id, "gone@example.net", "UNDELIVERABLE",
                                            permanent=True))) == 200
    dsn = fake_upstream.wait_for(2)[1]
    # The DSN itself bounces (the original sender is gone too): no DSN about the DSN.
    assert post(webhook_relay, batch(report(dsn.message_id, "app@example.com",
                                            "UNDELIVERABLE", permanent=True))) == 200
    time.sleep(2.5)
    assert len(fake_upstream.messages) == 2


def test_late_bounce_event_bounces(webhook_relay: ThreadRelay, fake_upstream: FakeUpstream,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    queue_id, upstream_id = delivered(webhook_relay, fake_upstream, ("late@example.net",))
    event = {"notificationType": "LATE_BOUNCE", "recipient": "late@example.net",
             "messageId": upstream_id, "eventId": "ev-1", "sendDateTime": 1700000000000}
    assert post(webhook_relay, json.dumps(event).encode()) == 200
    assert post(webhook_relay, json.dumps(event).encode()) == 200
    shown = show(webhook_relay, queue_id, capsys)
    assert shown["state"] == "bounced"
    assert shown["recipients"][0]["tracking"]["type"] == "LATE_BOUNCE"
    assert metric(webhook_relay, 'relay_tracking_events_total{type="LATE_BOUNCE"}') == 1
    assert "Diagnostic-Code: X-Infobip; LATE_BOUNCE" in fake_upstream.wait_for(2)[1].data.decode()


# --------------------------------------------------------------------------- pull

@pytest.fixture
def infobip_api(tls_ca: trustme.CA) -> Iterator[FakeInfobipAPI]:
    api = FakeInfobipAPI(tls_ca).start()
    yield api
    api.stop()


def pull_settings(api: FakeInfobipAPI, ca_pem_path: Path) -> dict[str, Any]:
    return {"pull": {"base_url": api.base_url, "interval": "1s", "ca_file": str(ca_pem_path)}}


def inbox(spool: Path) -> int:
    db = SpoolDB(spool, create=False)
    try:
        return db.inbox_size()
    finally:
        db.close()


def test_pull_drains_full_pages_and_matches(
        fake_upstream: FakeUpstream, start_relay: Callable[..., ThreadRelay],
        infobip_api: FakeInfobipAPI, ca_pem_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    infobip_api.hold.set()  # nothing is handed over before the message is delivered
    relay = start_relay(fake_upstream, reports=pull_settings(infobip_api, ca_pem_path))
    queue_id, upstream_id = delivered(relay, fake_upstream, ("a@example.net",))
    infobip_api.add(*(report(f"other-{n}", "x@example.net") for n in range(1000)),
                    report(upstream_id, "a@example.net"))
    infobip_api.fail_next(429, {"Retry-After": "1"})
    infobip_api.hold.clear()
    wait_until(lambda: show(relay, queue_id, capsys)["recipients"][0]["report"],
               timeout=15, what="the pulled report")
    limits = {r["limit"] for r in infobip_api.requests}
    assert limits == {"1000"} and infobip_api.waiting == 0
    assert {r["authorization"] for r in infobip_api.requests} == {"App test-api-key"}
    assert inbox(relay.config.queue.path) == 1000  # unknown ones wait (48 h)
    assert metric(relay, "relay_reports_pull_last_success_timestamp_seconds") > 0


def test_pull_401_is_a_readiness_detail(fake_upstream: FakeUpstream,
                                        start_relay: Callable[..., ThreadRelay],
                                        infobip_api: FakeInfobipAPI, ca_pem_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    settings = pull_settings(infobip_api, ca_pem_path)
    settings["pull"]["api_key"] = "not-the-key-1234"
    relay = start_relay(fake_upstream, reports=settings)
    send(relay)
    url = f"http://127.0.0.1:{relay.server.metrics_port}/readyz"

    def detail() -> str:
        try:
            return str(urllib.request.urlopen(url, timeout=5).read().decode())
        except urllib.error.HTTPError as exc:
            return str(exc.read().decode())

    text = wait_until(lambda: "refuses the API key" in detail() and detail(), what="401")
    assert "HTTP 401" in text and "not-the-key" not in text
    assert all("not-the-key" not in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_crash_between_pages_loses_no_report(
        fake_upstream: FakeUpstream, infobip_api: FakeInfobipAPI, ca_pem_path: Path,
        tmp_path: Path) -> None:
    """Page 1 is committed before page 2 is asked for: a SIGKILL then loses nothing."""
    infobip_api.add(*(report(f"m-{n}", "x@example.net") for n in range(1005)))
    infobip_api.hold_from = 1
    infobip_api.hold.set()
    config = relay_config(tmp_path, fake_upstream, reports=pull_settings(infobip_api,
                                                                        ca_pem_path))
    relay = ProcessRelay(write_config(tmp_path, config), tmp_path / "relay.log").start()
    try:
        wait_until(lambda: len(infobip_api.requests) >= 2, timeout=15, what="page 2 request")
        relay.kill()
        spool = Path(config["queue"]["path"])
        assert inbox(spool) == 1000 and infobip_api.waiting == 5
        relay = ProcessRelay(write_config(tmp_path, config), tmp_path / "relay.log").start()
        infobip_api.hold.clear()
        wait_until(lambda: inbox(spool) == 1005, timeout=15, what="page 2 after restart")
    finally:
        relay.ensure_stopped()
