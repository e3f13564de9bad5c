"""Smoke test of the benchmark: the upstream sink (bench/sink.py: implicit TLS + AUTH PLAIN with
aiosmtplib, message counting, header detection, duplicate detection, pipelined input), the
cases (parts, the mix's split, time limits), the report and charts (old and new JSON), the
burst harness against the relay, and - where smtp-source (and, as root, Postfix) are installed -
one tiny round of every case.

Full-size runs are not done here (see bench/README.md)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from util import quit_cleanly

from bench import burst
from bench.load import latency_stats, percentile, probe_match, probe_message
from bench.procs import MemorySampler, _port_range, free_port, process_tree
from bench.report import describe_case, draw_chart, format_table, summarize
from bench.runner import MIB, Case, Options, Part, mix_case, run_benchmark, split
from bench.sink import (
    CaseCount,
    SinkCluster,
    SinkStats,
    SMTPSinkProtocol,
    count_case,
    smtp_source_match,
)

API_KEY = "smoke-key"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    directory = tmp_path_factory.mktemp("bench-tls")
    ca_file, cert_file, key_file = (directory / name for name in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file


@pytest.fixture
def sink(tls: tuple[Path, Path, Path]) -> Iterator[SinkCluster]:
    _, cert_file, key_file = tls
    # free_port() only says a port was free a moment ago; with xdist workers starting servers
    # side by side, another may take it first. A sink that cannot bind gets fresh ports.
    for attempt in range(3):
        try:
            cluster = SinkCluster(cert=str(cert_file), key=str(key_file),
                                  password=API_KEY).start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.stop()


def _message(number: int, *, header: bool = True, message_id: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@bench.example.com"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = f"smoke {number}"
    msg["Message-Id"] = message_id or f"<smoke.{number}@bench>"
    if header:
        msg["X-IB-Client-Priority"] = "LOW"
    msg.set_content(f"body {number}\n.leading dot\n" + "x" * 3000 + "\n")
    return msg


async def _send(port: int, ca_file: Path, messages: list[EmailMessage],
                password: str = API_KEY) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=True,
                             tls_context=context, timeout=10)
    await client.connect()
    try:
        await client.auth_plain("App", password)
        for msg in messages:
            await client.send_message(msg, sender="sender@bench.example.com",
                                      recipients=["1rcpt@example.net"])
    finally:
        await quit_cleanly(client)


class _Written:
    def __init__(self) -> None:
        self.replies = b""

    def write(self, data: bytes) -> None:
        self.replies += data

    def close(self) -> None:
        pass


_LINES = st.lists(st.sampled_from([b"", b".", b"..", b"a.b", b".\r", b"x" * 90]), max_size=30)


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.one_of(st.none(), _LINES), min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=400))
def test_the_sink_finds_every_message_in_any_split_of_a_session(
        bodies: list[list[bytes] | None], cuts: list[int]) -> None:
    """The sink streams content (it keeps only the header block and the last octets), so the
    end of data and the header must be found wherever the reads happen to split the input."""
    stream, sizes = b"EHLO x\r\n", []
    for number, lines in enumerate(bodies):
        content = b""
        if lines is not None:  # None: an empty message, "." at once
            head = b"Message-Id: <m%d@x>\r\nX-IB-Client-Priority: LOW\r\n\r\n" % number
            content = head + b"".join(
                (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        stream += b"MAIL FROM:<a@b>\r\nRCPT TO:<r%d@x>\r\nDATA\r\n%s.\r\n" % (number, content)
        sizes.append(len(content))
    stream += b"QUIT\r\n"
    stats = SinkStats()
    sink = SMTPSinkProtocol(stats, tls=False, require_auth=False, password="")
    written = _Written()
    sink.connection_made(written)  # type: ignore[arg-type]
    position = 0
    for cut in itertools.cycle(cuts):
        if position >= len(stream):
            break
        sink.data_received(stream[position:position + cut])
        position += cut
    assert (stats.received, stats.byte_count) == (len(bodies), sum(sizes))
    assert stats.missing_header == bodies.count(None)
    assert sorted(stats.seen) == sorted(
        f"{'' if lines is None else f'<m{number}@x>'}|r{number}@x"
        for number, lines in enumerate(bodies))
    assert written.replies.count(b"250 2.0.0 Message queued") == len(bodies)
    assert written.replies.endswith(b"221 2.0.0 Bye\r\n")


def test_sink_counts_tls_auth_plain_headers_and_duplicates(
        sink: SinkCluster, tls: tuple[Path, Path, Path]) -> None:
    ca_file = tls[0]
    messages = [_message(1), _message(2), _message(3), _message(4, header=False),
                _message(5, message_id="<smoke.1@bench>")]  # same key as message 1
    asyncio.run(_send(sink.tls_port, ca_file, messages))

    stats = sink.stats()
    assert stats["received"] == 5
    assert stats["unique"] == 4
    assert stats["duplicates"] == 1
    assert stats["missing_header"] == 1
    assert stats["auth_ok"] == 1
    assert stats["tls_connections"] == 1

    seen = sink.dump()
    assert seen["<smoke.1@bench>|1rcpt@example.net"] == [2, 1]
    assert seen["<smoke.4@bench>|1rcpt@example.net"] == [1, 0]
    counted = count_case(seen, expected=5, match=lambda key: key.startswith("<smoke."))
    assert (counted.unique, counted.received) == (4, 5)
    assert (counted.lost, counted.duplicates, counted.missing_header) == (1, 1, 1)
    assert not counted.ok
    assert sink.wait_unique(4, timeout=1)["unique"] == 4

    sink.reset()
    assert sink.stats()["received"] == 0


def test_sink_refuses_bad_key_and_mail_before_auth(
        sink: SinkCluster, tls: tuple[Path, Path, Path]) -> None:
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        asyncio.run(_send(sink.tls_port, tls[0], [_message(1)], password="wrong"))

    async def mail_without_auth() -> int:
        context = ssl.create_default_context(cafile=str(tls[0]))
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.tls_port, use_tls=True,
                                   tls_context=context, timeout=10) as client:
            response = await client.execute_command(b"MAIL", b"FROM:<a@b.example>")
            return response.code

    assert asyncio.run(mail_without_auth()) == 530
    stats = sink.stats()
    assert stats["auth_failed"] == 1
    assert stats["received"] == 0


def _recv_replies(sock: socket.socket, count: int) -> list[str]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data.decode().splitlines()


def test_sink_plain_listener_is_pipelining_tolerant(sink: SinkCluster) -> None:
    body = probe_message("pipe", 1, 5000)
    with socket.create_connection(("127.0.0.1", sink.plain_port), timeout=10) as sock:
        assert _recv_replies(sock, 1)[0].startswith("220")
        sock.sendall(b"EHLO client\r\n")
        ehlo = _recv_replies(sock, 7)
        assert "250-PIPELINING" in ehlo
        # everything of two transactions in one write, the second split across writes
        second = probe_message("pipe", 2, 100)
        blob = (b"MAIL FROM:<s@bench.example.com>\r\nRCPT TO:<probe1@example.net>\r\nDATA\r\n"
                + body + b".\r\nMAIL FROM:<s@bench.example.com>\r\n"
                b"RCPT TO:<probe2@example.net>\r\nDATA\r\n" + second + b".\r\nQUI")
        sock.sendall(blob[:777])
        sock.sendall(blob[777:])
        sock.sendall(b"T\r\n")
        replies = _recv_replies(sock, 9)
    assert [line[:3] for line in replies] == ["250", "250", "354", "250",
                                              "250", "250", "354", "250", "221"]
    seen = sink.dump()
    counted = count_case(seen, expected=2, match=probe_match("pipe"), require_header=False)
    assert counted.ok, counted.as_dict()
    assert count_case(seen, expected=2, match=probe_match("pipe")).missing_header == 2


def test_the_process_tree_follows_children_that_come_and_go() -> None:
    """The sampler reads /proc/N/stat only for pids it has not seen: a child started after
    the first sample must still be found, and one that exited must be gone."""
    me = os.getpid()
    before = process_tree([me])
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in process_tree([me])
        with MemorySampler(lambda: [me], interval=0.01, pss_every=5) as sampler:
            time.sleep(0.1)
        assert sampler.peak_processes >= len(before) + 1
        assert sampler.peak_pss_kib > 0  # read on the first sample and every fifth
    finally:
        child.kill()
        child.wait()
    assert child.pid not in process_tree([me])


def test_helpers() -> None:
    assert smtp_source_match(0x26E0)("<26e0.0003.0001@vm>|1rcpt@example.net")
    assert not smtp_source_match(0x26E)("<26e0.0003.0001@vm>|1rcpt@example.net")
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
    assert latency_stats([0.001, 0.002])["p50_ms"] == 1.0
    assert CaseCount(expected=3, received=3, unique=3).ok
    results: dict[str, Any] = {
        "meta": {"cases": [{"name": "small", "messages": 1, "size": 10}], "rounds": 1},
        "rounds": [{"round": 1,
                    "relay": {"cases": {"small": {"accepted_rate": 200.0, "ok": True}},
                              "idle": {}},
                    "postfix": {"cases": {"small": {"accepted_rate": 100.0, "ok": True}},
                                "idle": {}}}],
        "failures": []}
    summary = summarize(results)
    assert summary["ratios"]["small"]["accepted_rate"]["median"] == 2.0
    assert "relay/postfix" in format_table(results)
    results["rounds"][0]["relay"]["cases"]["small"]["ok"] = False  # failed rounds do not count
    summary = summarize(results)
    assert summary["ratios"]["small"]["accepted_rate"]["median"] is None
    assert summary["systems"]["relay"]["small"]["rounds_ok"] == 0


def test_rounds_alternate_which_system_goes_first() -> None:
    """A B, B A, A B: a VM that speeds up or slows down over the run favours neither."""
    options = Options(rounds=3)
    assert [options.systems_in_round(n) for n in (1, 2, 3)] == [
        ("relay", "postfix"), ("postfix", "relay"), ("relay", "postfix")]
    assert Options(systems=("relay",)).systems_in_round(2) == ("relay",)


def test_latency_pooled_over_rounds() -> None:
    """A short case has a few probe samples per round: the median of per-round p99s is the
    median of their maxima; the pool's p99 is taken over every sample."""
    def case(latencies: list[float]) -> dict[str, Any]:
        return {"ok": True, "latency": {**latency_stats(latencies),
                                        "latencies_ms": [x * 1000 for x in latencies]}}
    rounds = [{"round": n, "relay": {"cases": {"huge": case([0.05] * 4 + [0.1 + n / 100])}},
               "postfix": {"cases": {"huge": case([0.08] * 100)}}} for n in range(1, 4)]
    results = {"meta": {"cases": [{"name": "huge", "messages": 1, "size": 10}], "rounds": 3},
               "rounds": rounds, "failures": []}
    summary = summarize(results)
    assert summary["systems"]["relay"]["huge"]["p99_ms"] == 120.0  # the middle round's max
    assert summary["pooled"]["huge"]["relay"] == {"p50_ms": 50.0, "p99_ms": 130.0,
                                                  "samples": 15}
    assert summary["pooled"]["huge"]["postfix"]["samples"] == 300
    assert "all rounds pooled: relay p50 50.0 / p99 130 ms (n=15)" in format_table(results)
    del rounds[0]["relay"]["cases"]["huge"]["latency"]["latencies_ms"]  # an older result
    assert summarize(results)["pooled"]["huge"]["relay"]["samples"] == 10


def test_cases_and_the_mix_split() -> None:
    assert split(20, [700, 250, 25, 15, 10], minimum=1) == [12, 5, 1, 1, 1]
    assert split(3, [1, 1, 1, 1], minimum=1) == [1, 1, 1, 1]  # cannot fit: 1 each
    assert sum(split(1000, [0.7, 0.25, 0.025, 0.015, 0.01])) == 1000
    mix = mix_case(1000)
    assert [(p.messages, p.size) for p in mix.parts] == [
        (700, 4096), (250, 150 * 1024), (25, 2 * MIB), (15, 5 * MIB), (10, 10 * MIB)]
    assert mix.probe_size == 4096
    assert [p.messages for p in mix_case(100).parts] == [70, 25, 3, 1, 1]
    assert [p.messages for p in mix_case(5).parts] == [1, 1, 1, 1, 1]  # every size once
    assert mix_case(3).messages == 3
    assert Options(sessions=20).sessions_for(mix) == [12, 5, 1, 1, 1]
    huge = Case.single("huge", 20, 10 * MIB)
    assert (huge.messages, huge.size, huge.probe_size) == (20, 10 * MIB, 10 * MIB)
    assert huge.time_limit() == 60 + 20 * 10  # 1 s per MiB per message
    assert Case.single("small", 5000, 2048).time_limit() == 60 + 5000 * 0.05
    opts = Options(messages=0, large_messages=1, huge_messages=2, mix_messages=0)
    assert [case.name for case in opts.cases] == ["large", "huge"]
    described = mix.as_dict()
    assert (described["messages"], described["size"]) == (1000, mix.bytes // 1000)
    assert describe_case(described).startswith("1000 messages: 700 x 4 KiB + 250 x 150 KiB")
    assert describe_case({"name": "large", "messages": 100, "size": MIB}) == \
        "100 messages x 1 MiB"  # a result saved before parts existed
    assert Case("x", (Part(1, 10), Part(3, 30))).size == 25


def _case_result(rate: float, ok: bool = True) -> dict[str, Any]:
    return {"accepted_rate": rate, "e2e_rate": rate / 2, "latency": {"p50_ms": 10.0,
            "p99_ms": 20.0}, "peak_rss_kib": 51200, "peak_pss_kib": 40960, "ok": ok}


def test_report_and_charts_old_and_new_results(tmp_path: Path) -> None:
    cases = [Case.single("small", 10, 2048).as_dict(), mix_case(10).as_dict()]
    old = {"meta": {"cases": [{"name": "small", "messages": 10, "size": 2048}], "rounds": 1},
           "rounds": [{"round": 1,
                       "relay": {"cases": {"small": _case_result(300.0)}, "idle": {}},
                       "postfix": {"cases": {"small": _case_result(100.0)}, "idle": {}}}],
           "failures": []}
    new = json.loads(json.dumps(old))
    new["meta"]["cases"] = cases
    for system, rate in (("relay", 40.0), ("postfix", 10.0)):
        new["rounds"][0][system]["cases"]["mix"] = _case_result(rate)
    table = format_table(new)
    assert "mix: 10 messages: 4 x 4 KiB + 3 x 150 KiB" in table
    assert summarize(new)["ratios"]["mix"]["accepted_rate"]["median"] == 4.0
    assert "small: 10 messages x 2 KiB" in format_table(old)
    pytest.importorskip("matplotlib")
    for name, results in (("old", old), ("new", new)):
        draw_chart(results, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_burst_against_the_relay(tmp_path: Path) -> None:
    """The burst harness end to end, relay only (Postfix needs root): a few small uploads."""
    opts = burst.BurstOptions(clients=3, size=MIB, settle=0.5, probe_interval=0.05,
                              systems=("relay",), keep=False)
    assert burst.BurstOptions(clients=100).postfix_process_limit == 120
    lines: list[str] = []
    results = burst.run_burst(opts, log=lines.append)
    relay = results["systems"]["relay"]
    assert results["ok"], (relay, lines)
    assert relay["delivered"] == 3
    assert relay["count"]["duplicates"] == 0
    assert relay["probe"]["samples"] >= 1
    assert relay["peak_rss_mib"] >= relay["idle_rss_mib"] > 0
    assert relay["timeline"]
    table = burst.format_table(results)
    assert "peak PSS MiB" in table and "PASS" in table
    pytest.importorskip("matplotlib")
    burst.draw_chart(results, tmp_path / "burst.png")
    assert (tmp_path / "burst.png").stat().st_size > 10_000


@pytest.mark.skipif(not shutil.which("smtp-source"), reason="smtp-source not installed")
def test_one_tiny_round_of_every_case() -> None:
    """Ceiling, relay and (as root, with Postfix installed) Postfix, every case with a few
    messages: a mix of 5 sends one message of each size from five smtp-source processes."""
    systems = ("relay", "postfix") if os.geteuid() == 0 and shutil.which("postfix") \
        else ("relay",)
    lines: list[str] = []
    results = run_benchmark(Options(
        rounds=1, messages=20, large_messages=2, huge_messages=1, mix_messages=5, sessions=6,
        systems=systems, idle_connections=0, settle=0.5, log=lines.append))
    assert results["ok"], "\n".join(lines)
    assert [c["name"] for c in results["meta"]["cases"]] == ["small", "large", "huge", "mix"]
    for system in systems:
        mix = results["rounds"][0][system]["cases"]["mix"]
        assert [part["count"]["unique"] for part in mix["parts"]] == [1] * 5
        assert len({part["smtp_source"]["pid"] for part in mix["parts"]}) == 5
        assert mix["count"]["unique"] == 5 and mix["latency"]["size"] == 4096
        assert results["rounds"][0][system]["cases"]["huge"]["count"]["unique"] == 1
    assert results["ceiling"]["mix"]["ok"]
    summary = summarize(results)
    assert summary["systems"]["relay"]["mix"]["rounds_ok"] == 1


@pytest.mark.parametrize(("worker", "count", "expected"), [
    ("", "", (20000, 32000)),           # not under xdist: the whole range
    ("gw0", "4", (20000, 23000)),
    ("gw3", "4", (29000, 32000)),
    ("gw1", "6", (22000, 24000)),
    ("master", "4", (20000, 32000)),
])
def test_each_xdist_worker_draws_ports_from_its_own_slice(
        monkeypatch: pytest.MonkeyPatch, worker: str, count: str,
        expected: tuple[int, int]) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    assert _port_range() == expected


def test_free_port_does_not_hand_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay's listener, metrics and upstream ports come from one draw each: two draws that
    gave the same still-unbound port made the second bind fail (EADDRINUSE, seen locally)."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "40")  # a slice of 300 ports
    monkeypatch.setattr("bench.procs._handed_out", set())
    ports = [free_port() for _ in range(150)]
    assert len(set(ports)) == 150
    assert all(20000 <= port < 20300 for port in ports)
    more = [free_port() for _ in range(300)]  # past half the slice it starts over
    assert all(20000 <= port < 20300 for port in more)
