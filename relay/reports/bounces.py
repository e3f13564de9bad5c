"""RFC 3464 DSNs for recipients that failed for good (reports.bounces.sender).

`DsnBouncer` is the spool's bouncer: it runs inside the transaction that makes recipients fail
(a 5xx at send time, max_age, a report in UNDELIVERABLE/EXPIRED/REJECTED, a LATE_BOUNCE), so a
DSN is queued exactly once per message and batch of failures. relay.dsn decides whether a
message may be bounced at all (never a bounce, an Auto-Submitted message or mail from the
bounce sender) and writes the DSN.
"""

from __future__ import annotations

import time

from prometheus_client import Counter

from relay import dsn
from relay.headers import HeaderBlock
from relay.infobip.headers import NOTIFY_URL
from relay.listener import new_queue_id
from relay.spool import Failed, Generated, QueuedMessage


class DsnBouncer:
    """Turns permanent failures into one DSN to the original envelope sender."""

    def __init__(self, sender: str, reporting_mta: str, sent: Counter) -> None:
        self.sender = sender
        self.reporting_mta = reporting_mta
        self.sent = sent

    def __call__(self, message: QueuedMessage, headers: bytes, failed: list[Failed]
                 ) -> Generated | None:
        if not dsn.may_bounce(mail_from=message.mail_from, header_block=headers,
                              bounce_sender=self.sender):
            return None
        data = dsn.build_dsn(
            queue_id=message.id, original_mail_from=message.mail_from,
            original_headers=_without_notify_url(headers),
            failures=[self._failure(f) for f in failed],
            bounce_sender=self.sender, reporting_mta=self.reporting_mta,
            arrival_date=message.created, now=time.time())
        # Counted when queued: a rolled-back transaction (disk full) may count one too many.
        self.sent.inc()
        return Generated(new_queue_id(), self.sender, (message.mail_from,), data)

    @staticmethod
    def _failure(failed: Failed) -> dsn.Failure:
        """The status code and Diagnostic-Code for one recipient."""
        report = failed.report
        if report is not None:
            status = dsn.status_for_report(report.group, report.error, report.permanent)
            diagnostic = dsn.diagnostic_for_report(report.status, report.error or None,
                                                   report.error_id)
        elif failed.tracking is not None:  # LATE_BOUNCE: the mailbox bounced after delivery
            status = "5.0.0"
            diagnostic = f"{dsn.REPORT_DIAGNOSTIC_TYPE}; {failed.tracking.type}"
        else:
            reply = failed.reply or "failed"
            status = "4.4.7" if failed.expired else dsn.status_from_reply(reply)
            diagnostic = f"smtp; {reply}"
        return dsn.Failure(recipient=failed.address, status=status, diagnostic=diagnostic)


def _without_notify_url(headers: bytes) -> bytes:
    """The original headers less X-IB-Notify-Url: it carries the webhook's token."""
    block, offset = HeaderBlock.parse(headers)
    return block.to_bytes() + headers[offset:] if block.remove(NOTIFY_URL) else headers
