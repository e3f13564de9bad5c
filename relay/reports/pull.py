"""Poll Infobip's one-time reports API: ``GET {base}/email/1/reports?limit=1000``.

Each report is handed over once, so a page is committed to the spool before the next one is
asked for: a crash can lose at most the page between its arrival and its commit (a few
milliseconds; see README, "Delivery reports"). Full pages are drained at once; a 429 waits as
long as Retry-After says; a 401 is logged once and shown by /readyz, never with the key.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time

import aiohttp

from relay.config import PullConfig
from relay.errors import SpoolError
from relay.infobip.reports import PayloadError, parse_body
from relay.metrics import Metrics
from relay.reports.sink import ReportSink

log = logging.getLogger("relay.reports.pull")

PAGE = 1000  # the API's maximum per call
PATH = "/email/1/reports"
# A page of 1000 reports is well under 2 MiB; a bigger answer is not a page of reports.
_MAX_PAGE_BYTES = 16 * 1024 * 1024
_MAX_RETRY_AFTER = 3600.0
_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=15)


class PullError(Exception):
    """One poll failed; ``delay`` is how long to wait before the next."""

    def __init__(self, message: str, delay: float, kind: str = "other") -> None:
        super().__init__(message)
        self.delay = delay
        self.kind = kind  # the label of relay_reports_pull_errors


class ReportPoller:
    """Polls every ``interval``; one per relay (the supervisor's worker 0 runs it)."""

    def __init__(self, config: PullConfig, sink: ReportSink, metrics: Metrics) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        # Shown by /readyz while the API refuses the key.
        self.auth_error: str | None = None
        self._last_error: str | None = None

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as session:
            while True:
                delay = await self.poll(session)
                await asyncio.sleep(delay)

    async def poll(self, session: aiohttp.ClientSession) -> float:
        """Drain the API (full pages one after another); the delay before the next poll."""
        try:
            while await self._page(session) == PAGE:
                pass
        except PullError as exc:
            self.metrics.reports_pull_errors.labels(kind=exc.kind).inc()
            self._report_error(str(exc))
            return exc.delay
        self.metrics.reports_pull_success.set(time.time())
        if self._last_error is not None:
            log.info("Infobip's reports API answers again")
        self._last_error = self.auth_error = None
        return self.config.interval

    async def _page(self, session: aiohttp.ClientSession) -> int:
        """Fetch one page and commit it; the number of reports it held."""
        url = f"{self.config.base_url}{PATH}"
        headers = {"Authorization": f"App {self.config.api_key.reveal()}",
                   "Accept": "application/json"}
        try:
            async with session.get(url, params={"limit": str(PAGE)}, headers=headers) as reply:
                body = await self._body(reply)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PullError(f"cannot reach {self.config.base_url}: "
                            f"{type(exc).__name__}: {exc}", self.config.interval,
                            "unavailable") from None
        try:
            items, unusable = parse_body(body)
        except PayloadError as exc:
            raise PullError(f"unexpected answer from {url}: {exc}", self.config.interval) from None
        if unusable:
            log.warning("%d pulled report(s) lack a recipient or status; ignored", unusable)
        try:
            # Committed before the next request: Infobip will not hand these over again.
            await self.sink.take(items)
        except SpoolError as exc:
            raise PullError(f"{len(items)} pulled report(s) could not be committed and are "
                            f"lost: {exc}", self.config.interval, "spool") from None
        return len(items) + unusable

    async def _body(self, reply: aiohttp.ClientResponse) -> bytes:
        if reply.status in {401, 403}:
            self.auth_error = (f"Infobip's reports API refuses the API key (HTTP {reply.status});"
                               " check reports.pull.api_key (default: upstream.password)")
            raise PullError(self.auth_error, self.config.interval, "auth")
        if reply.status == 429:
            delay = retry_after(reply.headers.get("Retry-After"), self.config.interval)
            raise PullError(f"rate limited by Infobip's reports API (429); next poll in "
                            f"{delay:.0f}s", delay, "throttled")
        if reply.status != 200:
            raise PullError(f"Infobip's reports API answered HTTP {reply.status}",
                            self.config.interval)
        chunks: list[bytes] = []
        size = 0
        async for chunk in reply.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > _MAX_PAGE_BYTES:
                raise PullError("Infobip's reports API sent an oversized page",
                                self.config.interval)
            chunks.append(chunk)
        return b"".join(chunks)

    def _report_error(self, message: str) -> None:
        """Log a failure when it starts or changes, not at every poll."""
        if message != self._last_error:
            level = logging.ERROR if self.auth_error else logging.WARNING
            log.log(level, "reports poll failed: %s", message)
        self._last_error = message


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), within 1s-1h."""
    if value is None:
        return default
    value = value.strip()
    seconds: float | None = None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            seconds = when.timestamp() - time.time()
    if seconds is None:
        return default
    return min(_MAX_RETRY_AFTER, max(1.0, seconds))

