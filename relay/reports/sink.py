"""Where pulled and pushed reports go: committed to the spool, counted, bounces logged.

A batch is durable when `take` returns: the webhook answers 200 and the poller asks for the
next page only then. Reports for messages of other worker spools (``workers: N``) wait in the
inbox of this spool until `match_waiting` finds their message in a sibling spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from relay.errors import SpoolError
from relay.infobip.reports import Incoming
from relay.metrics import Metrics
from relay.spool import Applied, Bouncer, Spool, SpoolDB, worker_spools

log = logging.getLogger("relay.reports")


class ReportSink:
    """Commits report batches to one spool; matches waiting ones, here and in sibling spools."""

    def __init__(self, spool: Spool, metrics: Metrics, queue_path: Path, *,
                 siblings: bool, bouncer: Bouncer | None) -> None:
        self.spool = spool
        self.metrics = metrics
        self.queue_path = queue_path
        self.siblings = siblings
        self.bouncer = bouncer
        # Own connections to this spool and its siblings, for matching off the writer thread.
        self._dbs: dict[Path, SpoolDB] = {}

    async def take(self, items: list[Incoming]) -> Applied:
        """Commit ``items`` (SpoolError when the spool cannot); count and log what they did."""
        applied = await self.spool.receive(items)
        for item in applied.new:
            if item.report is not None:
                self.metrics.reports.labels(group=item.report.group).inc()
            elif item.tracking is not None:
                self.metrics.tracking_events.labels(type=item.tracking.type).inc()
        self._log_bounces(applied)
        if applied.unmatched or applied.duplicates:
            log.debug("%d report(s) wait for their message's record; %d repeated one(s) "
                      "ignored", applied.unmatched, applied.duplicates)
        return applied

    async def match_waiting(self) -> None:
        """Apply waiting reports whose message is now known; forget those past 48 hours."""
        if not await self.spool.inbox_size():
            self.metrics.reports_unmatched.set(0)
            return
        if self.siblings:
            applied, expired = await asyncio.to_thread(self._match_across)
        else:
            applied, expired = await self.spool.match_inbox()
        self._log_bounces(applied)
        if expired:
            log.warning("%d report(s) matched no message within 48 hours and were dropped",
                        expired)
        self.metrics.reports_unmatched.set(await self.spool.inbox_size())

    def _match_across(self) -> tuple[Applied, int]:
        """In a thread: the inbox of this spool against it and every sibling worker spool."""
        own = self._db(self.queue_path)
        others = [self._db(path) for _, path in worker_spools(self.queue_path)]
        now = time.time()
        result: tuple[Applied, int] = own.transaction(
            lambda: own.match_inbox(now, others))
        return result

    def _db(self, path: Path) -> SpoolDB:
        db = self._dbs.get(path)
        if db is None:
            db = SpoolDB(path, create=False)
            db.bouncer = self.bouncer
            self._dbs[path] = db
        return db

    def close(self) -> None:
        for db in self._dbs.values():
            with contextlib.suppress(SpoolError, OSError):
                db.close()
        self._dbs.clear()

    @staticmethod
    def _log_bounces(applied: Applied) -> None:
        for bounce in applied.bounced or ():
            log.error("%s bounced for <%s>: Infobip id %s, status %s, error %s",
                      bounce.queue_id, bounce.address, bounce.upstream_id, bounce.status,
                      bounce.error or "none",
                      extra={"queue_id": bounce.queue_id, "recipient": bounce.address,
                             "upstream_id": bounce.upstream_id, "status": bounce.status,
                             "error": bounce.error})
