"""Command-line glue for the operator's view: `status` and `queue shape` (relay.cli registers
them). The work is in relay.status and relay.queueshape."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from relay.config import Config, load_config
from relay.errors import ConfigError, RelayError
from relay.queueshape import format_shape, shape, shape_json
from relay.spool import SpoolDB, find_spools
from relay.status import format_status, gather

_STATUS_HELP = """\
Whether the relay is running (pid from relay.pid in the spool), its uptime and version, the
upstream's health and whether it accepts our credentials, the queue by state, the oldest
message, the last delivery and the last error. A running relay is asked over its metrics
endpoint (metrics.address:port; one per worker); when none answers, the spool is read and the
output says so. Exit status: 0 running and ready, 1 running but not ready, 3 not running."""


_MMAP_BYTES = 1 << 30


class StatusError(RelayError):
    """`status` or `queue shape` cannot find what to look at."""


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="is the relay running, the upstream healthy, "
                                                "what is waiting", description=_STATUS_HELP)
    status.add_argument("-c", "--config", metavar="FILE",
                        help="YAML config file (default: $INFOBIP_RELAY_CONFIG, else the "
                             "environment alone)")
    status.add_argument("--spool", metavar="DIR",
                        help="spool directory (default: queue.path of the config)")
    status.add_argument("--url", action="append", metavar="URL",
                        help="the relay's metrics endpoint, e.g. http://127.0.0.1:9465 "
                             "(repeatable; default: metrics.address:port of the config)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run_status)


def add_shape_command(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`queue shape`; relay.cli adds -c/--spool to every queue command."""
    shape_parser = actions.add_parser(
        "shape", help="queued and deferred mail by domain and age (Postfix qshape's layout)",
        description="Pending recipients of queued and deferred messages by recipient domain "
                    "(or sender domain) and age in minutes: T is the total, a column counts "
                    "what is younger than its heading and at least as old as the column "
                    "before it; 1280+ is everything older. Works while the relay runs.")
    shape_parser.add_argument("--by", choices=["recipient", "sender"], default="recipient",
                              help="group by recipient domain (default) or sender domain")
    shape_parser.add_argument("--top", type=int, metavar="N", help="only the N busiest domains")
    shape_parser.add_argument("--json", action="store_true", help="machine-readable output")
    shape_parser.set_defaults(func=run_shape)


def _load(args: argparse.Namespace) -> Config:
    config: Config = load_config(getattr(args, "config", None))
    return config


def run_shape(args: argparse.Namespace) -> int:
    directory = Path(args.spool) if args.spool else _load(args).queue.path
    paths = find_spools(directory)
    if not paths:
        raise StatusError(f"no spool at {directory}")
    databases = [SpoolDB(path, create=False) for path in paths]
    try:
        for db in databases:
            # Reads the rows from the page cache without a copy each: 100,000 messages in
            # about half the time. A setting of this connection only (closed just below).
            db.conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        result = shape((db.conn for db in databases), args.by)
    finally:
        for db in databases:
            db.close()
    print(shape_json(result, args.top) if args.json else format_shape(result, args.top))
    return 0


def run_status(args: argparse.Namespace) -> int:
    config: Config | None = None
    if not (args.spool and args.url):
        try:
            config = _load(args)
        except ConfigError:
            if not args.spool:
                raise
    spool = Path(args.spool) if args.spool else config.queue.path if config else None
    urls = list(args.url or (endpoint_urls(config) if config else ["http://127.0.0.1:9465"]))
    status = gather(spool, urls)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        print(format_status(status))
    sys.stdout.flush()
    return status.exit_code


def endpoint_urls(config: Config) -> list[str]:
    """The metrics endpoint of each worker (metrics.port + K), as a local client reaches it."""
    metrics = config.metrics
    if not metrics.enabled or not metrics.port:
        return []
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = wildcard.get(metrics.address, metrics.address)
    if ":" in host:
        host = f"[{host}]"
    return [f"http://{host}:{metrics.port + k}" for k in range(max(1, config.workers))]
