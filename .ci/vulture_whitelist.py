"""Names vulture (CI, --min-confidence 60) cannot see being used, each with the reason."""
# ruff: noqa
from relay.app import Server
from relay.delivery import _Job
from relay.headers import HeaderBlock
from relay.infobip.reports import Report
from relay.listener import RelayHandler, RelaySMTP
from relay.pipelining import ReplyReader
from relay.queueshape import bucket_index
from relay.rules.model import RulesOutcome
from relay.spool import QueuedMessage

# aiosmtpd finds these by name: smtp_<VERB> commands, handle_<VERB> and auth_<MECH> hooks.
RelaySMTP.line_length_limit
RelaySMTP.smtp_DATA
RelaySMTP._getaddr
RelayHandler.handle_EHLO
RelayHandler.handle_AUTH
RelayHandler.auth_PLAIN
RelayHandler.auth_LOGIN
RelayHandler.handle_MAIL
RelayHandler.handle_RCPT
RelayHandler.handle_DATA
RelayHandler.handle_exception
# logging.LogRecord fields the filters rewrite.
_.msg
# logging.Handler's own filter list, swapped whole at a reload (relay.logs._dress).
_.filters
# logging's module switches, read by logging itself for every record (relay.logs.configure_logging).
_._srcfile
_.logThreads
_.logProcesses
_.logMultiprocessing
# logging.Formatter's hook for asctime, overridden with its signature (relay.logs.TextFormatter).
TextFormatter.formatTime
datefmt
# Read by the tests (the bound metrics and webhook ports, and records' fields).
Server.metrics_port
Server.webhook_port
Report.done_at  # written out with dataclasses.asdict
QueuedMessage.updated
RulesOutcome.explanations
HeaderBlock.changed
# Set on aiosmtplib's protocol so that a reply arriving mid-upload is kept (upstream._data);
# aiosmtplib is pinned to the minor version this was tested with.
_._response_pending
# A dataclass(order=True) field: it orders the ready queue.
_Job.seq
# The qshape bucketing that the SQL mirrors; its table test keeps the two in step.
bucket_index
# asyncio.StreamReader's flow-control mark, raised while DATA streams (listener._stream_data).
_._limit

# asyncio calls the protocol methods of a transport's protocol (set_protocol) by name.
ReplyReader.data_received
