"""The upstream process: frames across the socketpair, sessions in the child, crashes and ends.

Real processes throughout: the relay starts `python -m relay.upstreamchild`, the tests kill it,
kill the relay under it, and check that nothing is lost and nothing is left running.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeupstream import FakeUpstream
from hypothesis import given, settings
from hypothesis import strategies as st
from relayrunner import REPO, ThreadRelay, relay_config, send, spool_messages, wait_until

from relay.config import Config, load_config
from relay.errors import ConfigError
from relay.frames import MAX_FRAME, FrameError, FrameProtocol, encode
from relay.outgoing import SpooledBody
from relay.upstreamchild import message_of
from relay.upstreamproc import RemoteUpstream, usable_cpus, wanted

StartRelay = Callable[..., ThreadRelay]

# -- frames ------------------------------------------------------------------------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=300),
    lambda inner: st.tuples(inner, inner) | st.dictionaries(st.text(max_size=5), inner,
                                                            max_size=3),
    max_leaves=8)
_frames = st.lists(st.tuples(st.sampled_from(["send", "done", "open"]), _values), max_size=8)


def _channel_pair() -> tuple[list[tuple[Any, ...]], list[Exception | None], FrameProtocol]:
    frames: list[tuple[Any, ...]] = []
    lost: list[Exception | None] = []
    return frames, lost, FrameProtocol(frames.append, lost.append)


@settings(max_examples=200, deadline=None)
@given(_frames, st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
def test_frames_arrive_whole_however_the_stream_is_cut(frames: list[tuple[Any, ...]],
                                                       cuts: list[int]) -> None:
    stream = b"".join(encode(frame) for frame in frames)
    received, lost, protocol = _channel_pair()
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        protocol.data_received(stream[start:end])
    assert received == frames
    assert lost == []


async def _receive_raw(raw: bytes) -> tuple[list[tuple[Any, ...]], list[Exception | None]]:
    """What a real FrameProtocol on a socketpair makes of ``raw`` sent by the other end."""
    ours, theirs = socket.socketpair()
    received, lost, protocol = _channel_pair()
    ended = asyncio.Event()

    def on_lost(exc: Exception | None) -> None:
        lost.append(exc)
        ended.set()

    protocol._on_lost = on_lost
    await asyncio.get_running_loop().create_unix_connection(lambda: protocol, sock=ours)
    with theirs:
        theirs.sendall(raw)
        await asyncio.wait_for(ended.wait(), 5)
    return received, lost


def test_a_frame_is_on_the_socket_before_the_loop_turns_again() -> None:
    """Sends and answers do not wait for the next turn of a busy event loop."""
    async def scenario() -> bytes:
        ours, theirs = socket.socketpair()
        _, _, protocol = _channel_pair()
        await asyncio.get_running_loop().create_unix_connection(lambda: protocol, sock=ours)
        with theirs:
            theirs.setblocking(False)
            assert protocol.send(("send", 7, b"x" * 100))
            try:
                arrived = theirs.recv(65536)  # no await since send(): the loop has not turned
            except BlockingIOError:
                arrived = b""
            assert protocol.transport is not None
            protocol.transport.close()
        return arrived

    assert asyncio.run(scenario()) == encode(("send", 7, b"x" * 100))


@pytest.mark.parametrize(("raw", "reason"), [
    ((MAX_FRAME + 1).to_bytes(4, "big") + b"x", "frame of 67108865 octets announced"),
    ((5).to_bytes(4, "big") + b"\x80\x05junk", "undecodable frame"),
])
def test_a_damaged_frame_ends_the_channel(raw: bytes, reason: str) -> None:
    good = encode(("done", 1, None, (False, None, None)))
    received, lost = asyncio.run(_receive_raw(good + raw + good))
    assert received == [("done", 1, None, (False, None, None))]  # nothing after the damage
    [error] = lost
    assert isinstance(error, FrameError) and reason in str(error)


# -- when the process is wanted ------------------------------------------------------------------

def _config(tmp_path: Path, **overrides: Any) -> Config:
    raw = relay_config(tmp_path, None, **overrides)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize(("mode", "workers", "cpus", "expected"), [
    ("auto", 1, 2.0, True),
    ("auto", 1, 1.0, False),     # one core: the hop would only cost
    ("auto", 1, 1.5, True),      # a quota of 1.5 CPUs: half a core to spare
    ("auto", 2, 2.0, False),     # every core already has a worker
    ("auto", 2, 4.0, True),
    ("on", 4, 1.0, True),
    ("off", 1, 8.0, False),
    (True, 1, 1.0, True),        # YAML's booleans
    (False, 1, 8.0, False),
])
def test_when_the_upstream_process_is_wanted(tmp_path: Path, mode: object, workers: int,
                                             cpus: float, expected: bool) -> None:
    config = _config(tmp_path, upstream_process=mode, workers=workers)
    assert wanted(config, cpus) is expected


def test_an_unknown_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream_process: must be auto, on or off"):
        _config(tmp_path, upstream_process="sometimes")


@pytest.mark.parametrize(("cpu_max", "cap"), [
    ("max 100000\n", None),
    ("100000 100000\n", 1.0),
    ("150000 100000\n", 1.5),
    ("garbage\n", None),
    (None, None),                # no cgroup v2 file
])
def test_usable_cpus_follows_a_cgroup_quota(tmp_path: Path, cpu_max: str | None,
                                            cap: float | None) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    mask = float(len(os.sched_getaffinity(0)))
    assert usable_cpus(path) == (mask if cap is None else min(mask, cap))


# -- the body file, by name --------------------------------------------------------------------

def test_the_child_gets_a_body_file_by_name_and_a_small_message_whole(tmp_path: Path) -> None:
    """The relay neither opens nor reads a body file for the child: its session opens it (a
    file gone is then a local temporary failure, tested in test_pipelining.py)."""
    body = tmp_path / "body"
    assert message_of(("file", b"Subject: x\r\n\r\n", str(body), 6014)) == \
        SpooledBody(b"Subject: x\r\n\r\n", body, 6014)
    assert message_of(b"whole message") == b"whole message"


def test_the_child_explains_its_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "relay.upstreamchild"], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "usage: python -m relay.upstreamchild FD" in done.stderr
    assert "Traceback" not in done.stderr


# -- a relay with its sessions in the process ------------------------------------------------------

LARGE = b"From: app@example.com\r\nSubject: large\r\n\r\n" + \
    b"".join(b"%07d .........................................................\r\n" % n
             for n in range(6000))  # ~400 KB: a body file, opened and streamed by the child


def _upstream_pid(relay: ThreadRelay) -> int:
    process = relay.server.upstream_process
    assert process is not None and process.pid is not None
    return process.pid


def test_sessions_live_in_the_upstream_process(fake_upstream: FakeUpstream,
                                               start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream_process="on")
    pid = _upstream_pid(relay)
    assert pid != os.getpid()
    small, large = send(relay), send(relay, message=LARGE)
    received = {m.parsed()["Subject"]: m for m in fake_upstream.wait_for(2)}
    assert received["test"].data.endswith(b"\r\nbody\r\n")
    assert received["large"].data.endswith(LARGE.split(b"\r\n\r\n", 1)[1])
    wait_until(lambda: not spool_messages(relay, ("queued", "deferred")), what="both sent")
    delivery = relay.server.deliveries.default  # type: ignore[union-attr]
    assert all(isinstance(c, RemoteUpstream) for c in delivery._connections)
    assert fake_upstream.open_connections >= 1
    # The sessions are the child's: they end with it.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: fake_upstream.open_connections == 0, what="sessions gone with the child")
    assert {small, large} <= {m.id for m in spool_messages(relay, ("delivered",))}


def test_a_killed_upstream_process_loses_nothing(fake_upstream: FakeUpstream,
                                                 start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream_process="on", upstream={"connections": 1},
                        queue={"retry_initial": "0.3s", "retry_max": "1s"})
    first_pid = _upstream_pid(relay)
    fake_upstream.delay_next("data", 3.0)  # the final dot's reply is held...
    held = send(relay)
    wait_until(lambda: fake_upstream.transactions, what="the send under way")
    time.sleep(0.3)
    os.kill(first_pid, signal.SIGKILL)  # ...and the process sending it dies meanwhile

    def attempted() -> Any:
        record = next((m for m in spool_messages(relay) if m.id == held), None)
        return record if record is not None and record.attempts >= 1 else None

    record = wait_until(attempted, what="the interrupted send recorded")
    assert record.state == "deferred"  # the upstream may have it: retried after retry_max
    assert "outcome unknown after the final dot" in (record.last_reply or "")
    assert f"upstream process {first_pid} ended" in (record.last_reply or "")
    later = send(relay)
    wait_until(lambda: {held, later} <= {m.id for m in spool_messages(relay, ("delivered",))},
               timeout=20, what="both delivered by a new process")
    assert _upstream_pid(relay) != first_pid
    assert "relay_upstream_process_restarts_total 1.0" in \
        relay.server.metrics.render().decode()


def test_upstream_process_off_keeps_the_sessions_here(fake_upstream: FakeUpstream,
                                                      start_relay: StartRelay) -> None:
    relay = start_relay(fake_upstream, upstream_process="off")
    assert relay.server.upstream_process is None
    send(relay)
    fake_upstream.wait_for(1)
    delivery = relay.server.deliveries.default  # type: ignore[union-attr]
    assert not any(isinstance(c, RemoteUpstream) for c in delivery._connections)


# -- the process's life, under a real `infobip-relay serve` --------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_the_process_ignores_group_signals_and_ends_with_the_relay(
        fake_upstream: FakeUpstream, start_relay_process: Callable[..., Any],
        tmp_path: Path) -> None:
    relay = start_relay_process(relay_config(tmp_path, fake_upstream, upstream_process="on"))
    [child] = wait_until(lambda: _children(relay.proc.pid), what="the upstream process")
    # A Ctrl-C or a service manager signals the whole group: the relay decides, not the child.
    os.kill(child, signal.SIGTERM)
    os.kill(child, signal.SIGINT)
    time.sleep(0.5)
    assert _alive(child)
    relay.kill()  # SIGKILL: no "exit" frame, only the socketpair closing
    wait_until(lambda: not _alive(child), timeout=10, what="the child gone with the relay")


@pytest.mark.slow
def test_a_graceful_stop_ends_the_process_too(fake_upstream: FakeUpstream,
                                              start_relay_process: Callable[..., Any],
                                              tmp_path: Path) -> None:
    relay = start_relay_process(relay_config(tmp_path, fake_upstream, upstream_process="on"))
    [child] = wait_until(lambda: _children(relay.proc.pid), what="the upstream process")
    with smtplib.SMTP(*relay.address, timeout=10) as client:
        client.sendmail("app@example.com", ["user@example.net"], b"Subject: s\r\n\r\nb\r\n")
    fake_upstream.wait_for(1)
    assert relay.terminate() == 0
    assert not _alive(child)
    assert "Traceback" not in relay.log()


@pytest.mark.slow
def test_a_reload_brings_new_log_settings_and_secrets_to_both_processes(
        fake_upstream: FakeUpstream, start_relay_process: Callable[..., Any],
        tmp_path: Path) -> None:
    """A reload with a new key and log level: the relay and its upstream process both mask
    the new key and the old one (an upstream echoing them back in its replies here), and the
    upstream process logs at the new level."""
    old, new = "old-api-key-1111", "new-api-key-2222"
    fake_upstream.api_key = old
    config = relay_config(tmp_path, fake_upstream, upstream_process="on",
                          upstream={"password": old},
                          queue={"retry_initial": "0.3s", "retry_max": "1s", "auth_retry": "1s"})
    relay = start_relay_process(config)
    send(relay)
    fake_upstream.wait_for(1)

    fake_upstream.api_key = new
    config["upstream"]["password"] = new
    config["logging"] = {"level": "debug"}
    relay.config_path.write_text(yaml.safe_dump(config))
    relay.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in relay.log(), what="the reload")
    reloaded = len(relay.log())
    # Logged by the relay (an authentication failure), then by the upstream process (a reply
    # out of sequence, tried once more on a new connection).
    fake_upstream.fail_next("auth", 535, f"5.7.8 key {new} refused")
    fake_upstream.fail_next("mail", 503, f"5.5.1 out of sequence for {new} and {old}")
    send(relay)
    fake_upstream.wait_for(2, timeout=20)
    log = relay.log()
    assert old not in log and new not in log
    after = log[reloaded:]
    assert "(535 5.7.8 key ******** refused)" in after
    assert "out of sequence for ******** and ********" in after
    assert "DEBUG relay.upstream: connected to" in after  # the upstream process, at debug now
    assert relay.terminate() == 0


def test_a_session_closed_for_idleness_is_opened_again(fake_upstream: FakeUpstream,
                                                       start_relay: StartRelay) -> None:
    """After upstream.idle_timeout the session is closed (QUIT); the next message opens a new
    one in the same slot at its first attempt."""
    relay = start_relay(fake_upstream, upstream_process="on",
                        upstream={"connections": 1, "idle_timeout": "1s"})
    first = send(relay)
    fake_upstream.wait_for(1)
    wait_until(lambda: fake_upstream.open_connections == 0, timeout=10,
               what="the idle session closed")
    second = send(relay)
    records = wait_until(
        lambda: (found := {m.id: m for m in spool_messages(relay, ("delivered",))}).keys()
        >= {first, second} and found, what="both recorded as delivered")
    assert records[first].attempts == records[second].attempts == 1
    one, two = fake_upstream.wait_for(2)
    assert one.session_id != two.session_id  # a new session in the same slot


def test_a_dropped_session_object_lets_the_process_close_its_slot(
        fake_upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """Probes and reloads make session objects and drop them: the process lets go of each
    slot (and its session) then, instead of keeping them all."""
    relay = start_relay(fake_upstream, upstream_process="on")
    process = relay.server.upstream_process
    assert process is not None
    factory = process.connection_factory(relay.config.upstream, relay.config.hostname)

    async def probe_and_drop() -> None:
        probe = factory()
        await probe.probe()  # a session, opened and left open
        del probe  # dropped without close(), as a replaced connection may be
        gc.collect()

    before = fake_upstream.open_connections
    relay.call(probe_and_drop())
    wait_until(lambda: fake_upstream.open_connections == before + 1 or
               fake_upstream.connections > 0, what="the probe's session")
    wait_until(lambda: fake_upstream.open_connections == before, timeout=10,
               what="the dropped slot's session closed by the process")
