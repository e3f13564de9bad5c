"""Infobip's report and tracking POSTs (X-IB-Notify-Url): check, parse, commit, then 200.

Infobip retries a delivery that is not answered 200, so 200 comes only once the batch is
committed; anything else (spool trouble) is a 503 and Infobip tries again. Repeats are
harmless: the spool ignores items it has seen (relay.spool `seen`).
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from relay.config import WebhookConfig
from relay.errors import SpoolError
from relay.infobip.reports import PayloadError, parse_body
from relay.reports.sink import ReportSink

log = logging.getLogger("relay.reports.webhook")

MAX_BODY = 1024 * 1024
_JSON = "application/json"


def webhook_app(config: WebhookConfig, sink: ReportSink) -> web.Application:
    """The webhook at ``config.path``; aiohttp answers 413 beyond MAX_BODY and 405 to a GET."""
    token = config.token.reveal().encode()

    async def receive(request: web.Request) -> web.Response:
        if not hmac.compare_digest(_given_token(request).encode(), token):
            log.warning("report POST from %s refused: missing or wrong token", request.remote)
            return _answer(401, "unauthorized")
        if request.content_type != _JSON:
            return _answer(415, "only application/json reports are accepted")
        body = await request.read()
        try:
            items, unusable = parse_body(body)
        except PayloadError as exc:
            return _answer(400, str(exc))
        if unusable:
            log.warning("%d report item(s) from %s lack a recipient or status; ignored",
                        unusable, request.remote)
        try:
            await sink.take(items)
        except SpoolError as exc:
            log.error("cannot commit %d report(s): %s; Infobip will retry", len(items), exc)
            return _answer(503, "try again later")
        return _answer(200, "ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(config.path, receive)
    return app


def _given_token(request: web.Request) -> str:
    """``?token=...``, else ``Authorization: Bearer ...``; empty when neither."""
    query = request.query.get("token")
    if query:
        return query
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _answer(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n")
