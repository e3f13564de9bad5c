"""relay.pacing in tables, with a fake clock: the throttle classifier, the token bucket, the
gate and the AIMD steps; and the `rate` / `throttle_patterns` settings."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path

import pytest

from relay.config import load_config, redacted
from relay.errors import ConfigError
from relay.pacing import (
    DEFAULT_THROTTLE_PATTERNS,
    FLOOR_FRACTION,
    RECOVERY_RUN,
    Aimd,
    Gate,
    Level,
    Pacer,
    ThrottleClassifier,
    TokenBucket,
)
from relay.units import format_rate, parse_rate


class FakeClock:
    """Time stands still until someone sleeps; each sleep is recorded and moves time on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("text", "per_second", "shown"), [
    ("50/s", 50.0, "50/s"),
    ("3000/m", 50.0, "50/s"),
    ("100/h", 100 / 3600, "100/h"),
    ("2.5/s", 2.5, "150/m"),
    (" 10 / S ", 10.0, "10/s"),
    ("90/m", 1.5, "90/m"),
])
def test_rates(text: str, per_second: float, shown: str) -> None:
    assert parse_rate(text) == pytest.approx(per_second)
    assert format_rate(per_second) == shown


@pytest.mark.parametrize("text", ["0/s", "0.0/m", "fast", "10/d", "50", "-1/s", "/s", "1/"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def load(tmp_path: Path, upstream: str) -> object:
    path = tmp_path / "relay.yaml"
    path.write_text("upstream:\n  password: k\n" + textwrap.indent(upstream, "  ") +
                    f"queue:\n  path: {tmp_path / 'spool'}\n", encoding="utf-8")
    return load_config(path, {})


def test_rate_and_patterns_defaults_and_values(tmp_path: Path) -> None:
    default = load_config(None, {"INFOBIP_API_KEY": "k"})
    assert default.upstream.rate is None
    assert default.upstream.throttle_patterns == DEFAULT_THROTTLE_PATTERNS
    assert redacted(default)["upstream"]["rate"] == "unlimited"
    config = load(tmp_path, 'rate: 3000/m\nthrottle_patterns: ["slow down", "4\\\\.7\\\\.28"]\n')
    assert config.upstream.rate == 50.0  # type: ignore[attr-defined]
    assert config.upstream.throttle_patterns == ("slow down", r"4\.7\.28")  # type: ignore[attr-defined]
    assert redacted(config)["upstream"]["rate"] == "50/s"  # type: ignore[arg-type]


@pytest.mark.parametrize(("upstream", "needle"), [
    ("rate: 0/s\n", "upstream.rate: a rate must be more than 0"),
    ("rate: fast\n", "upstream.rate: expected a rate such as 50/s"),
    ("rate: 10/d\n", "upstream.rate: expected a rate such as 50/s"),
    ("rate: 50\n", "upstream.rate: expected a rate such as 50/s"),
    ('throttle_patterns: ["rate", "("]\n', "upstream.throttle_patterns: invalid regular"),
    ('throttle_patterns: [".*"]\n', "matches an empty text"),
    ('throttle_patterns: [""]\n', "non-empty"),
    ("throttle_patterns: [42]\n", "expected a string"),
])
def test_bad_pacing_settings_are_config_errors(tmp_path: Path, upstream: str,
                                               needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, upstream)
    assert needle in str(info.value)


# --------------------------------------------------------------------------- classifier


@pytest.mark.parametrize(("code", "text", "throttling"), [
    (451, "4.7.0 rate limit exceeded", True),
    (421, "4.7.0 Too many connections, slow down", True),
    (450, "4.2.1 You are being THROTTLED", True),
    (454, "4.7.0 Temporary limit reached", True),
    (451, "4.3.0 Local error in processing", False),  # a real temporary failure
    (450, "4.2.0 Mailbox busy", False),
    (452, "4.5.3 Too many recipients", False),  # not a throttling code
    (550, "5.7.1 rate limit exceeded", False),  # permanent: never paced away
    (250, "2.0.0 rate ok", False),
])
def test_default_throttle_classifier(code: int, text: str, throttling: bool) -> None:
    classifier = ThrottleClassifier(DEFAULT_THROTTLE_PATTERNS)
    assert classifier(code, text) is throttling
    assert classifier.reply(f"{code} {text}") is throttling


def test_custom_and_empty_patterns() -> None:
    custom = ThrottleClassifier([r"4\.7\.28", "slow ?down"])
    assert custom(421, "4.7.28 sending rate exceeded")
    assert custom(451, "please SLOWDOWN")
    assert not custom(451, "4.7.0 rate limit exceeded")
    assert not ThrottleClassifier([])(451, "4.7.0 rate limit exceeded")
    assert not custom.reply("") and not custom.reply("garbage")


# --------------------------------------------------------------------------- token bucket


def test_bucket_paces_to_the_rate_with_a_burst_of_one() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20.0, clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        for _ in range(100):
            await bucket.acquire()

    asyncio.run(scenario())
    # The first goes at once, each next one 1/20 s later: exactly one sleep per token.
    assert clock.now - 1000.0 == pytest.approx(99 / 20)
    assert len(clock.sleeps) == 99
    assert clock.sleeps == pytest.approx([0.05] * 99)


def test_bucket_saves_up_no_more_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        await bucket.acquire()
        clock.now += 60  # idle for a minute
        for _ in range(3):
            await bucket.acquire()

    asyncio.run(scenario())
    assert clock.sleeps == pytest.approx([0.5, 0.5])


def test_bucket_serves_waiters_in_arrival_order_and_follows_rate_changes() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, clock=clock, sleep=clock.sleep)
    order: list[tuple[int, float]] = []

    async def take(index: int) -> None:
        await bucket.acquire()
        order.append((index, clock.now - 1000.0))
        if index == 2:
            bucket.rate = 4.0  # a recovery step while others wait

    async def scenario() -> None:
        await asyncio.gather(*(take(index) for index in range(5)))

    asyncio.run(scenario())
    assert [index for index, _ in order] == [0, 1, 2, 3, 4]
    assert [at for _, at in order] == pytest.approx([0, 1, 2, 2.25, 2.5])


def test_unlimited_bucket_never_sleeps_and_a_refund_is_capped() -> None:
    clock = FakeClock()
    unlimited = TokenBucket(None, clock=clock, sleep=clock.sleep)
    paced = TokenBucket(1.0, clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        for _ in range(1000):
            await unlimited.acquire()
        await paced.acquire()
        paced.refund()
        paced.refund()  # no more than the burst comes back
        await paced.acquire()
        await paced.acquire()

    asyncio.run(scenario())
    assert clock.sleeps == [1.0]


# --------------------------------------------------------------------------- gate


def test_gate_resizes_while_held() -> None:
    async def scenario() -> list[int]:
        gate = Gate(3)
        inside = 0
        peaks: list[int] = []
        release = asyncio.Event()

        async def hold() -> None:
            nonlocal inside
            async with gate:
                inside += 1
                peaks.append(inside)
                await release.wait()
                inside -= 1

        tasks = [asyncio.create_task(hold()) for _ in range(6)]
        await asyncio.sleep(0.01)
        assert inside == 3
        gate.limit = 1  # shrinking never throws out those inside
        await asyncio.sleep(0.01)
        assert inside == 3
        gate.limit = 5  # growing admits waiters at once
        await asyncio.sleep(0.01)
        assert inside == 5
        gate.limit = 0  # never below one
        assert gate.limit == 1
        tasks[-1].cancel()  # a cancelled waiter gives its place up
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peaks

    peaks = asyncio.run(scenario())
    assert max(peaks) == 5


# --------------------------------------------------------------------------- AIMD

FULL = Level(20.0, 8)
FLOOR = 20.0 * FLOOR_FRACTION


def run(aimd: Aimd, steps: list[str]) -> list[tuple[float | None, int]]:
    """Apply steps: ``t`` throttle in the current epoch, ``old`` throttle from an earlier
    epoch, ``s`` one success, ``K`` a whole run of successes; the level after each."""
    levels = []
    for step in steps:
        if step == "t":
            aimd.throttle(aimd.epoch, observed_rate=40.0)
        elif step == "old":
            aimd.throttle(aimd.epoch - 1, observed_rate=40.0)
        elif step == "s":
            aimd.success()
        else:
            for _ in range(RECOVERY_RUN):
                aimd.success()
        levels.append((aimd.level.rate, aimd.level.concurrency))
    return levels


@pytest.mark.parametrize(("full", "steps", "levels"), [
    pytest.param(FULL, ["t"], [(10.0, 4)], id="halve rate and connections"),
    pytest.param(FULL, ["t", "old", "old"], [(10.0, 4)] * 3,
                 id="replies to sends of before the cut are the same event"),
    pytest.param(FULL, ["t", "t", "t"], [(10.0, 4), (5.0, 2), (2.5, 1)], id="halving again"),
    pytest.param(FULL, ["t"] * 7, [(10.0, 4), (5.0, 2), (2.5, 1), (1.25, 1), (FLOOR, 1),
                                   (FLOOR, 1), (FLOOR, 1)], id="down to the floor, one conn"),
    pytest.param(FULL, ["t", "K", "K"], [(10.0, 4), (12.0, 5), (14.0, 6)],
                 id="+10 % of the rate and +1 connection per run of K"),
    pytest.param(FULL, ["t", "K", "K", "K", "K", "K"],
                 [(10.0, 4), (12.0, 5), (14.0, 6), (16.0, 7), (18.0, 8), (20.0, 8)],
                 id="back at the configured values"),
    pytest.param(Level(20.0, 2), ["t", "K", "K", "K", "K", "K"],
                 [(10.0, 1), (12.0, 2), (14.0, 2), (16.0, 2), (18.0, 2), (20.0, 2)],
                 id="connections never above the configured ones"),
    pytest.param(FULL, ["t"] + ["s"] * (RECOVERY_RUN - 1) + ["t", "K"],
                 [(10.0, 4)] * RECOVERY_RUN + [(5.0, 2), (7.0, 3)],
                 id="a throttle breaks the run"),
    pytest.param(FULL, ["K", "s"], [(20.0, 8), (20.0, 8)], id="successes at full pace: no-op"),
    pytest.param(Level(None, 4), ["t", "K", "t"], [(20.0, 2), (24.0, 3), (12.0, 1)],
                 id="unlimited: halves the rate it observed"),
    pytest.param(Level(None, 4), ["t"] + ["K"] * 5, [(20.0, 2), (24.0, 3), (28.0, 4),
                                                     (32.0, 4), (36.0, 4), (None, 4)],
                 id="unlimited: unlimited again after climbing back to the observed rate"),
])
def test_aimd_steps(full: Level, steps: list[str], levels: list[tuple[float | None, int]]
                    ) -> None:
    aimd = Aimd(full)
    got = run(aimd, steps)
    assert [(pytest.approx(r) if r is not None else None, c) for r, c in got] == levels
    assert aimd.throttled is (aimd.level != full)


def test_pacer_logs_once_when_throttling_starts_and_once_when_it_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.pacing")
    clock = FakeClock()
    pacer = Pacer(20.0, 4, name="default", clock=clock, sleep=clock.sleep)

    async def scenario() -> list[bool]:
        changed = []
        for _ in range(3):
            ticket = await pacer.acquire()
            changed.append(pacer.throttled(ticket, "451 4.7.0 rate limit exceeded"))
        assert (pacer.rate, pacer.concurrency, pacer.gate.limit) == (2.5, 1, 1)
        while pacer.throttling:
            await pacer.acquire()
            pacer.succeeded()
        return changed

    assert asyncio.run(scenario()) == [True, True, True]
    assert (pacer.rate, pacer.concurrency, pacer.gate.limit) == (20.0, 4, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.pacing"
             and r.levelno >= logging.INFO]
    assert len(lines) == 2, lines
    assert "upstream default is throttling (451 4.7.0 rate limit exceeded)" in lines[0]
    assert "10 messages/s with 2 connection(s)" in lines[0]
    assert "stopped throttling: back at the full pace (20 messages/s" in lines[1]


def test_retry_delay_is_one_token_at_the_current_pace_and_at_least_a_second() -> None:
    assert Pacer(None, 2).retry_delay == 1.0
    assert Pacer(50.0, 2).retry_delay == 1.0
    assert Pacer(0.5, 2).retry_delay == pytest.approx(2.0)
