"""Pacing the sends to one upstream: a token bucket, a resizable gate, AIMD on throttling.

Every Infobip account has a sending rate; pushing past it only collects 4xx throttling replies.
One `Pacer` per upstream, shared by all its connections:

- `TokenBucket`: at most ``rate`` sends per second with a burst of `BURST` (one message), so
  no window of t seconds ever sees more than ``rate * t + 1`` sends;
- `Gate`: how many connections may send at once (a semaphore whose size can change);
- `Aimd`: on a throttling reply the effective rate and concurrency halve (down to a floor),
  after `RECOVERY_RUN` replies in a row that are not throttling they grow back by
  `RECOVERY_STEP` of the full rate and one connection, up to the configured values;
- `ThrottleClassifier`: whether a reply is such a throttling reply (code and text).

No I/O and no clock of its own: time and sleeping are injected, so the tests drive it with a
fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("relay.pacing")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# The codes a provider throttles with (RFC 5321 4xx: closing, mailbox busy, local error,
# temporary authentication failure); only together with a throttling text.
THROTTLE_CODES = frozenset({421, 450, 451, 454})
DEFAULT_THROTTLE_PATTERNS = ("rate", "limit", "throttl", "too many")
# One message: the bucket never lets a burst through that the provider's per-second window
# could count twice.
BURST = 1.0
# K: this many replies in a row that are not throttling earn one recovery step. Small enough
# to climb back within seconds at useful rates, large enough that one lucky reply does not.
RECOVERY_RUN = 10
# One recovery step adds this share of the full rate (and one connection).
RECOVERY_STEP = 0.1
# Halving stops here (five halvings): mail keeps moving while the provider still throttles.
FLOOR_FRACTION = 1 / 32
# A throttled message is tried again after at least this long (the spool is polled every 1 s).
MIN_RETRY_DELAY = 1.0
# Without a configured rate, the rate observed over this window is what throttling halves.
_METER_WINDOW = 5.0


class ThrottleClassifier:
    """``(code, text) -> bool``: a 421/450/451/454 whose text matches one of the patterns.

    Patterns are regular expressions searched case-insensitively, so a plain word such as
    ``rate`` matches as a substring. No patterns: nothing is taken for throttling.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        for pattern in patterns:
            _check_pattern(pattern)
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) \
            if patterns else None

    def __call__(self, code: int, text: str) -> bool:
        return code in THROTTLE_CODES and self._regex is not None \
            and self._regex.search(text) is not None

    def reply(self, reply: str) -> bool:
        """The same for a whole reply line, ``"451 4.7.0 rate limit exceeded"``."""
        code = reply[:3]
        return code.isdigit() and self(int(code), reply[3:])


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"expected a non-empty text or regular expression, got {pattern!r}")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    if compiled.search("") is not None:
        # It would take every 421/450/451/454 (a full mailbox, a local error) for throttling.
        raise ValueError(f"{pattern!r} matches an empty text, so every reply")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; None: no limit.

    `acquire` serves waiters in arrival order and sleeps exactly until the next token is due
    (no polling); a rate changed meanwhile applies from the next wake-up.
    """

    def __init__(self, rate: float | None, *, burst: float = BURST, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst  # a fresh relay may send its first message at once
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, rate: float | None) -> None:
        self._refill()  # what accrued so far accrued at the old rate
        self._rate = rate

    async def acquire(self) -> None:
        if self._rate is None:
            return
        async with self._lock:  # FIFO: one waiter at a time takes the next token
            while True:
                self._refill()
                if self._rate is None:  # lifted while we waited
                    return
                # Up to a rounding error: a sleep of exactly the deficit must be enough, or
                # the loop would go on with ever tinier sleeps.
                if self._tokens >= 1 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1)
                    return
                await self._sleep((1 - self._tokens) / self._rate)

    def refund(self) -> None:
        """Give back a token that was acquired and not used (capped at the burst)."""
        self._tokens = min(self._burst, self._tokens + 1)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        else:
            self._tokens = self._burst
        self._stamp = now


class Gate:
    """A semaphore whose size can change while it is held: at most ``limit`` inside at once.

    Shrinking never interrupts those inside; newcomers wait until fewer than the new limit
    are. Waiters enter in arrival order.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._inside = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._admit()

    async def __aenter__(self) -> None:
        if self._inside < self._limit and not self._waiters:
            self._inside += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _admit() counts us inside before it wakes us
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:  # admitted and cancelled in the same turn: hand the place on
                self._inside -= 1
                self._admit()
            raise

    async def __aexit__(self, *_exc_info: object) -> None:
        self._inside -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._inside < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._inside += 1
                waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class Level:
    """A pace: messages per second (None: unlimited) and connections sending at once."""

    rate: float | None
    concurrency: int


class Aimd:
    """Additive increase, multiplicative decrease of the pace on throttling replies.

    Each grant carries the epoch it was made in; a decrease starts a new epoch, and throttling
    replies to sends granted before it are the same congestion event, not a new one (the
    in-flight sends of one moment would otherwise halve the pace once each).
    """

    def __init__(self, full: Level) -> None:
        self.full = full
        self.level = full
        self.epoch = 0
        # What recovery climbs back to: the configured rate, or the rate observed when
        # throttling began if none is configured.
        self._ceiling = full.rate
        self._successes = 0

    @property
    def throttled(self) -> bool:
        return self.level != self.full

    def throttle(self, epoch: int, observed_rate: float) -> bool:
        """A throttling reply to a send granted in ``epoch``; True if the pace dropped."""
        self._successes = 0
        if epoch != self.epoch:
            return False
        if not self.throttled:
            self._ceiling = self.full.rate or max(observed_rate, 1.0 / _METER_WINDOW)
        ceiling = self._ceiling or 1.0
        rate = self.level.rate or ceiling
        lower = Level(max(ceiling * FLOOR_FRACTION, rate / 2),
                      max(1, self.level.concurrency // 2))
        if lower == self.level:
            return False
        self.level = lower
        self.epoch += 1
        return True

    def success(self) -> bool:
        """A reply that was not throttling; True if it completed a run and the pace grew."""
        if not self.throttled:
            return False
        self._successes += 1
        if self._successes < RECOVERY_RUN:
            return False
        self._successes = 0
        ceiling = self._ceiling or 1.0
        rate = min(ceiling, (self.level.rate or ceiling) + ceiling * RECOVERY_STEP)
        concurrency = min(self.full.concurrency, self.level.concurrency + 1)
        if rate >= ceiling * (1 - 1e-9) and concurrency >= self.full.concurrency:
            self.level = self.full
        else:
            self.level = Level(rate, concurrency)
        return True


class _Meter:
    """Grants per second over the last few seconds (what an unlimited pace actually was)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._stamps: deque[float] = deque()

    def record(self) -> None:
        now = self._clock()
        self._stamps.append(now)
        while self._stamps[0] < now - _METER_WINDOW:
            self._stamps.popleft()

    def rate(self) -> float:
        if not self._stamps:
            return 0.0
        span = max(1.0, self._clock() - self._stamps[0])
        return len(self._stamps) / span


class Pacer:
    """The pace of one upstream: `gate` around each send, `acquire` before it, then report
    the reply with `throttled` or `succeeded`."""

    def __init__(self, rate: float | None, concurrency: int,
                 patterns: Sequence[str] = DEFAULT_THROTTLE_PATTERNS, *, name: str = "default",
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.name = name
        self.classifier = ThrottleClassifier(patterns)
        self._clock = clock
        self.gate = Gate(concurrency)
        self._bucket = TokenBucket(rate, clock=clock, sleep=sleep)
        self._aimd = Aimd(Level(rate, concurrency))
        self._meter = _Meter(clock)

    @property
    def rate(self) -> float | None:
        """The effective rate in messages per second (None: unlimited)."""
        return self._aimd.level.rate

    @property
    def concurrency(self) -> int:
        return self._aimd.level.concurrency

    @property
    def throttling(self) -> bool:
        return self._aimd.throttled

    @property
    def retry_delay(self) -> float:
        """How long a throttled message waits: one token's time at the current pace."""
        rate = self.rate
        return MIN_RETRY_DELAY if rate is None else max(MIN_RETRY_DELAY, 1.0 / rate)

    async def acquire(self) -> int:
        """Wait for the next send's token; returns the ticket to report its reply with."""
        await self._bucket.acquire()
        self._meter.record()
        return self._aimd.epoch

    def refund(self) -> None:
        """A token from `acquire` that no send used (nothing was left to send)."""
        self._bucket.refund()

    def throttled(self, ticket: int, reply: str) -> bool:
        """The send of ``ticket`` got a throttling reply; True if the pace changed."""
        started = not self._aimd.throttled
        if not self._aimd.throttle(ticket, self._meter.rate()):
            return False
        self._apply()
        if started:
            log.warning("upstream %s is throttling (%s): slowing down to %s with %d "
                        "connection(s)", self.name, reply, _describe_rate(self.rate),
                        self.concurrency)
        else:
            log.debug("upstream %s still throttling: %s with %d connection(s)", self.name,
                      _describe_rate(self.rate), self.concurrency)
        return True

    def succeeded(self) -> bool:
        """A send got a reply that was not throttling; True if the pace changed."""
        if not self._aimd.success():
            return False
        self._apply()
        if not self._aimd.throttled:
            log.info("upstream %s stopped throttling: back at the full pace (%s with %d "
                     "connection(s))", self.name, _describe_rate(self.rate), self.concurrency)
        return True

    def _apply(self) -> None:
        self._bucket.rate = self.rate
        self.gate.limit = self.concurrency


def _describe_rate(rate: float | None) -> str:
    return "no rate limit" if rate is None else f"{rate:.3g} messages/s"
