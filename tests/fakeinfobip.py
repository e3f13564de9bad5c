"""A fake of Infobip's HTTP reports API (aiohttp over real TLS with a trustme certificate).

``GET /email/1/reports`` hands out the queued reports once each, at most ``limit`` per call, as
Infobip does; ``fail_next(status, headers)`` scripts a 401 or a 429 with Retry-After. It runs
on its own event loop in a thread, so that a relay in another thread or process can poll it.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import deque
from typing import Any

import trustme
from aiohttp import web

PATH = "/email/1/reports"


def report(message_id: str | None, to: str, group: str = "DELIVERED", *,
           status: str = "DELIVERED_TO_HANDSET", error: str = "NO_ERROR", error_id: int = 0,
           permanent: bool = False, callback_data: str | None = None) -> dict[str, Any]:
    """One report shaped as Infobip's (infobip-facts.md)."""
    group_ids = {"PENDING": 1, "UNDELIVERABLE": 2, "DELIVERED": 3, "EXPIRED": 4, "REJECTED": 5}
    item: dict[str, Any] = {
        "bulkId": "bulk-1", "to": to, "sentAt": "2020-09-08T05:27:57.628+0000",
        "doneAt": "2020-09-08T05:27:59.256+0000", "channel": "EMAIL",
        "status": {"id": 5, "groupId": group_ids[group], "groupName": group, "name": status,
                   "description": "..."},
        "error": {"id": error_id, "name": error, "description": "...", "groupId": 0,
                  "groupName": "OK", "permanent": permanent},
    }
    if message_id is not None:
        item["messageId"] = message_id
    if callback_data is not None:
        item["callbackData"] = callback_data
    return item


class FakeInfobipAPI:
    """Serves queued reports once each; records every request's query and Authorization."""

    def __init__(self, ca: trustme.CA, api_key: str = "test-api-key") -> None:
        self.api_key = api_key
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self._lock = threading.Lock()
        self._reports: deque[dict[str, Any]] = deque()
        self._failures: deque[tuple[int, dict[str, str]]] = deque()
        self.requests: list[dict[str, str]] = []
        # Requests after the first ``hold_from`` wait while ``hold`` is set.
        self.hold = threading.Event()
        self.hold_from = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add(self, *reports: dict[str, Any]) -> None:
        with self._lock:
            self._reports.extend(reports)

    def fail_next(self, status: int, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._failures.append((status, headers or {}))

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._reports)

    def start(self) -> FakeInfobipAPI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self.hold.clear()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(PATH, self._reports_page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _reports_page(self, request: web.Request) -> web.Response:
        with self._lock:
            self.requests.append({"limit": request.query.get("limit", ""),
                                  "authorization": request.headers.get("Authorization", "")})
        with self._lock:
            number = len(self.requests)
        while self.hold.is_set() and number > self.hold_from:
            await asyncio.sleep(0.02)
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=499)  # the client is gone: hand nothing over
        if request.headers.get("Authorization") != f"App {self.api_key}":
            return web.json_response({"requestError": {"serviceException": {
                "messageId": "UNAUTHORIZED", "text": "Invalid login details"}}}, status=401)
        with self._lock:
            if self._failures:
                status, headers = self._failures.popleft()
                return web.json_response({}, status=status, headers=headers)
            limit = min(int(request.query.get("limit") or 50), 1000)
            page = [self._reports.popleft() for _ in range(min(limit, len(self._reports)))]
        return web.json_response({"results": page})
