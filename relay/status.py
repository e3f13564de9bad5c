"""`infobip-relay status`: is the relay running, is the upstream healthy, what is waiting.

A running relay is asked over its HTTP endpoint (/metrics parsed with prometheus_client's own
text parser, /readyz for the reason it is not ready). When no endpoint answers, the spool is
read directly and the output says so; the spool also gives the details that metrics cannot
carry (which message failed last, and with which reply).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from relay.pidfile import read_pid as read_pid_file
from relay.spool import DB_NAME, SpoolDB, find_spools

STATES = ("queued", "deferred", "failed", "delivered", "bounced")
HTTP_TIMEOUT = 3.0
# Exit statuses, as LSB init scripts' `status` has them: 0 running, 3 not running.
EXIT_RUNNING, EXIT_NOT_READY, EXIT_NOT_RUNNING = 0, 1, 3


@dataclass
class Endpoint:
    """What one relay process (one worker) said over HTTP."""

    url: str
    up: bool = False
    error: str | None = None
    ready: bool | None = None
    ready_reason: str | None = None
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        for sample_labels, value in self.samples.get(name, []):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    def values(self, name: str) -> list[float]:
        """Every sample of ``name``: one per upstream for the ``upstream``-labelled series."""
        return [value for _, value in self.samples.get(name, [])]

    def label(self, name: str, label: str) -> str | None:
        for sample_labels, _ in self.samples.get(name, []):
            if label in sample_labels:
                return sample_labels[label]
        return None


@dataclass
class MessageRef:
    id: str
    at: float
    state: str | None = None
    reply: str | None = None
    upstream_id: str | None = None


@dataclass
class Status:
    source: str                      # "http" or "spool"
    running: bool
    pid: int | None
    pid_alive: bool | None
    spool: str | None
    endpoints: list[str]
    version: str | None = None
    started: float | None = None
    uptime_seconds: float | None = None
    ready: bool | None = None
    ready_reason: str | None = None
    upstream_up: bool | None = None
    upstream_auth_ok: bool | None = None
    upstream_connections: int | None = None
    queue: dict[str, int] = field(default_factory=dict)
    oldest_age_seconds: float | None = None
    oldest: MessageRef | None = None
    last_delivery: float | None = None
    last_delivered: MessageRef | None = None
    last_error: MessageRef | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not self.running:
            return EXIT_NOT_RUNNING
        return EXIT_RUNNING if self.ready is not False else EXIT_NOT_READY

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- gathering


def fetch_endpoint(url: str, timeout: float = HTTP_TIMEOUT) -> Endpoint:
    """GET /metrics and /readyz from one relay; ``up`` is False when nothing answers."""
    endpoint = Endpoint(url.rstrip("/"))
    try:
        text = _get(f"{endpoint.url}/metrics", timeout)[1]
    except (OSError, urllib.error.URLError, ValueError) as exc:
        endpoint.error = str(getattr(exc, "reason", exc))
        return endpoint
    endpoint.up = True
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            endpoint.samples.setdefault(sample.name, []).append((dict(sample.labels),
                                                                 float(sample.value)))
    with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
        status, body = _get(f"{endpoint.url}/readyz", timeout)
        endpoint.ready, endpoint.ready_reason = status == 200, body.strip()
    return endpoint


# The relay's own endpoint, usually on loopback: never through an http_proxy of the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float) -> tuple[int, str]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503 from /readyz is an answer, not a failure
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")


def read_pid(directory: Path) -> tuple[int | None, bool | None]:
    """The pid in ``relay.pid`` and whether that process exists (None: no pid file)."""
    pid = read_pid_file(directory)
    if pid is None:
        return None, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    except PermissionError:
        return pid, True
    return pid, True


def gather(spool_dir: Path | None, urls: list[str], now: float | None = None) -> Status:
    """Ask every endpoint; read the spool for what they cannot say (or for everything)."""
    now = time.time() if now is None else now
    endpoints = [fetch_endpoint(url) for url in urls]
    answering = [e for e in endpoints if e.up]
    pid, alive = read_pid(spool_dir) if spool_dir is not None else (None, None)
    status = Status(source="http" if answering else "spool", running=bool(answering) or
                    bool(alive), pid=pid, pid_alive=alive,
                    spool=str(spool_dir) if spool_dir is not None else None,
                    endpoints=[e.url for e in endpoints])
    if answering:
        _from_metrics(status, answering, now)
    for endpoint in endpoints:
        if not endpoint.up:
            status.notes.append(f"no answer from {endpoint.url}/metrics ({endpoint.error})")
    if not urls:
        status.notes.append("metrics are disabled in the config: reading the spool only")
    if pid is not None and alive is False:
        status.notes.append(f"stale relay.pid: process {pid} does not exist")
    if spool_dir is not None:
        _from_spool(status, spool_dir, now, counts=not answering)
    if not answering:
        status.notes.insert(0, "relay not reachable over HTTP: queue figures read from the "
                               "spool; upstream health unknown")
    return status


def _from_metrics(status: Status, endpoints: list[Endpoint], now: float) -> None:
    first = endpoints[0]
    status.version = first.label("relay_build_info", "version")
    starts = [v for e in endpoints if (v := e.value("relay_start_time_seconds"))]
    if starts:
        status.started = min(starts)
        status.uptime_seconds = max(0.0, now - status.started)
    status.queue = {state: int(sum(e.value("relay_queue_messages", state=state) or 0
                                   for e in endpoints)) for state in STATES}
    status.oldest_age_seconds = max((e.value("relay_queue_oldest_age_seconds") or 0.0)
                                    for e in endpoints)
    # Up and accepted only when every upstream of every worker is.
    ups = [e.values("relay_upstream_up") for e in endpoints]
    status.upstream_up = all(v == 1 for vs in ups for v in vs) if all(ups) else None
    auth = [e.values("relay_upstream_auth_ok") for e in endpoints]
    status.upstream_auth_ok = all(v == 1 for vs in auth for v in vs) if all(auth) else None
    status.upstream_connections = int(sum(sum(e.values("relay_upstream_connections_open"))
                                          for e in endpoints))
    deliveries = [v for e in endpoints if (v := e.value("relay_last_delivery_timestamp_seconds"))]
    status.last_delivery = max(deliveries) if deliveries else None
    readiness = [e.ready for e in endpoints]
    status.ready = all(readiness) if None not in readiness else None
    reasons = [e.ready_reason for e in endpoints if e.ready is False and e.ready_reason]
    status.ready_reason = "; ".join(dict.fromkeys(reasons)) if reasons else (
        "ready" if status.ready else None)


def _from_spool(status: Status, spool_dir: Path, now: float, *, counts: bool) -> None:
    paths = find_spools(spool_dir)
    if not paths:
        status.notes.append(f"no spool at {spool_dir / DB_NAME}")
        return
    totals = dict.fromkeys(STATES, 0)
    oldest: MessageRef | None = None
    delivered: MessageRef | None = None
    error: MessageRef | None = None
    for path in paths:
        db = SpoolDB(path, create=False)
        try:
            for state, count in db.counts().items():
                totals[state] = totals.get(state, 0) + count
            conn = db.conn
            row = conn.execute("SELECT id, created, state FROM messages WHERE state IN "
                               "('queued', 'deferred') ORDER BY created LIMIT 1").fetchone()
            if row and (oldest is None or row[1] < oldest.at):
                oldest = MessageRef(row[0], row[1], row[2])
            row = conn.execute("SELECT id, updated, upstream_id, last_reply FROM messages "
                               "WHERE state = 'delivered' ORDER BY updated DESC LIMIT 1"
                               ).fetchone()
            if row and (delivered is None or row[1] > delivered.at):
                delivered = MessageRef(row[0], row[1], "delivered", row[3], row[2])
            row = conn.execute("SELECT id, updated, state, last_reply FROM messages "
                               "WHERE state IN ('deferred', 'failed') AND last_reply IS NOT NULL"
                               " ORDER BY updated DESC LIMIT 1").fetchone()
            if row and (error is None or row[1] > error.at):
                error = MessageRef(row[0], row[1], row[2], row[3])
        finally:
            db.close()
    status.oldest, status.last_delivered, status.last_error = oldest, delivered, error
    if counts:
        status.queue = totals
        status.oldest_age_seconds = now - oldest.at if oldest else 0.0
        if delivered is not None:
            status.last_delivery = delivered.at


# --------------------------------------------------------------------------- output


def format_status(status: Status, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines: list[str] = []

    def row(name: str, value: str) -> None:
        lines.append(f"{name + ':':<15}{value}")

    if status.running:
        pid = f"pid {status.pid}" if status.pid and status.pid_alive else "pid unknown"
        via = "metrics " + ", ".join(status.endpoints) if status.source == "http" else \
            "no metrics endpoint answered"
        row("relay", f"running ({pid}; {via})")
    else:
        row("relay", "not running")
    if status.version or status.uptime_seconds is not None:
        since = f" since {_stamp(status.started)}" if status.started else ""
        row("version", f"{status.version or '?'}, up {_duration(status.uptime_seconds)}{since}")
    if status.source == "http":
        row("ready", "yes" if status.ready else f"no: {status.ready_reason or 'unknown'}")
        upstream = {True: "up", False: "down", None: "unknown"}[status.upstream_up]
        auth = {True: "accepted", False: "REFUSED (check the API key)",
                None: "unknown"}[status.upstream_auth_ok]
        row("upstream", f"{upstream}; credentials {auth}; "
                        f"{status.upstream_connections or 0} connection(s) open")
    else:
        row("upstream", "unknown (the relay is not answering)")
    queue = ", ".join(f"{status.queue.get(s, 0)} {s}" for s in STATES)
    row("queue", queue + (" (from the spool)" if status.source == "spool" else ""))
    if status.oldest is not None:
        row("oldest", f"{_duration(now - status.oldest.at)} ({status.oldest.id}, "
                      f"{status.oldest.state})")
    elif status.oldest_age_seconds:
        row("oldest", _duration(status.oldest_age_seconds))
    else:
        row("oldest", "nothing waiting")
    row("last delivery", _last_delivery(status, now))
    if status.last_error is not None:
        error = status.last_error
        row("last error", f"{_ago(now, error.at)}: {error.id} {error.state}: {error.reply}")
    else:
        row("last error", "none in the spool")
    if status.spool:
        row("spool", status.spool)
    lines.extend(f"note: {note}" for note in status.notes)
    return "\n".join(lines)


def _last_delivery(status: Status, now: float) -> str:
    ref = status.last_delivered
    if status.last_delivery is None and ref is None:
        return "none yet"
    at = status.last_delivery or (ref.at if ref else now)
    text = _ago(now, at)
    if ref is not None and abs(ref.at - at) < 5:
        detail = f"Infobip id {ref.upstream_id}" if ref.upstream_id else (ref.reply or "")
        text += f" ({ref.id}{'; ' + detail if detail else ''})"
    return text


def _ago(now: float, at: float) -> str:
    return f"{_duration(now - at)} ago ({_stamp(at)})"


def _stamp(at: float | None) -> str:
    if at is None:
        return "-"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
