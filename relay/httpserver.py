"""The relay's one HTTP stack (aiohttp): /metrics, /healthz, /readyz and the reports webhook.

Each worker serves its metrics on its own port; the webhook (reports.webhook) is served by one
process only, on an address and port of its own, by the same stack.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.metrics import Metrics, Readiness, StatsRefresher

# Probes and scrapes send no body; anything bigger is not for these endpoints.
_MAX_PROBE_BODY = 4096


class HTTPServer:
    """One aiohttp application on one address and port."""

    def __init__(self, app: web.Application) -> None:
        # No access log: a webhook URL carries its token in the query string.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._started = False

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (``port`` 0 picks a free one). OSError."""
        await self._runner.setup()
        self._started = True
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        return int(self._runner.addresses[-1][1])

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._runner.cleanup()


def health_app(metrics: Metrics, readiness: Readiness, refresh: StatsRefresher
               ) -> web.Application:
    """/metrics for Prometheus, /healthz (alive) and /readyz (ready, or why not)."""

    async def metrics_page(request: web.Request) -> web.Response:
        await refresh()
        metrics.observe_readiness(*await readiness())
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = await readiness()
        return web.Response(status=200 if ready else 503, text=reason + "\n")

    # An unexpected error is logged by aiohttp (aiohttp.server) and answered 500 without
    # details.
    app = web.Application(client_max_size=_MAX_PROBE_BODY)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app

