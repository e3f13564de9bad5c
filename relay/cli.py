"""The `infobip-relay` command: a thin layer over the modules; every error is one clear line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from email.utils import parseaddr
from pathlib import Path
from typing import IO, TypeVar

import yaml

from relay import __version__
from relay.app import Server, run_server
from relay.bodyfiles import OrphanedBody, SavedEnvelope, is_message_id
from relay.config import (
    Config,
    ListenerConfig,
    iter_secret_values,
    load_config,
    permission_warnings,
    redacted,
)
from relay.envelope import MessageContext
from relay.errors import RelayError, SpoolError
from relay.infobip.regions import format_region_table
from relay.infobip.reports import Report
from relay.logs import configure_logging
from relay.message import Arrival, MessageRefused, prepare
from relay.opscli import add_shape_command, add_status_command
from relay.passwords import hash_password
from relay.pidfile import read_pid
from relay.rules import render_rules_report
from relay.spool import (
    LOCK_FILE,
    STATES,
    QueuedMessage,
    Recipient,
    SpoolDB,
    find_spools,
    open_private,
)
from relay.supervisor import run_workers

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# What `rules test` shows where the live relay puts the message's queue id.
RULES_TEST_QUEUE_ID = "TESTQUEUEID"
T = TypeVar("T")


class CLIError(RelayError):
    """A problem with what the user asked for, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = args.func(args)
        return result
    except RelayError as exc:
        print(f"infobip-relay: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:  # damage that the check at open could not see
        print(f"infobip-relay: error: spool database: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infobip-relay",
        description="SMTP smarthost that relays mail to Infobip's SMTP API over TLS + AUTH.",
        epilog="Without -c, the relay is configured from the environment: INFOBIP_API_KEY "
               "(required), INFOBIP_REGION, INFOBIP_SMTP_HOST, INFOBIP_SMTP_PORT, RELAY_LISTEN.")
    parser.add_argument("--version", action="version", version=f"infobip-relay {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay until SIGTERM")
    _config_option(serve)
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check-config",
                                help="validate the config and print it with secrets redacted")
    _config_option(check)
    check.set_defaults(func=_check_config)

    regions = commands.add_parser("regions", help="list Infobip regions, hosts and ports")
    regions.set_defaults(func=_regions)

    _add_queue_commands(commands)
    _add_rules_commands(commands)
    add_status_command(commands)

    reload = commands.add_parser("reload", help="tell the running relay to reload its config "
                                                "(same as SIGHUP)")
    _config_option(reload)
    _spool_option(reload)
    reload.set_defaults(func=_reload)

    hashpw = commands.add_parser("hash-password",
                                 help="print a password hash for the users: section")
    hashpw.add_argument("--stdin", action="store_true",
                        help="read the password from standard input instead of prompting")
    hashpw.set_defaults(func=_hash_password)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML config file (default: $INFOBIP_RELAY_CONFIG, else the "
                             "environment alone)")


def _spool_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool", metavar="DIR",
                        help="spool directory (default: queue.path of the config)")


def _add_queue_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="inspect and manage the spool (works while the "
                                              "relay runs)")
    actions = queue.add_subparsers(title="queue commands", metavar="ACTION")
    listing = actions.add_parser("list", help="list messages")
    listing.add_argument("--state", action="append",
                         choices=list(STATES),
                         help="only these states (repeatable; default: queued, deferred, "
                              "failed and bounced)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--limit", type=int, default=1000)
    listing.set_defaults(func=_queue_list)
    for name, help_text, func in (
        ("show", "show one message with its recipients and last replies", _queue_show),
        ("retry", "make a deferred or failed message due now", _queue_retry),
        ("delete", "delete a message from the spool", _queue_delete),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("id", metavar="ID")
        if name == "show":
            action.add_argument("--json", action="store_true")
        action.set_defaults(func=func)
    _add_recover_command(actions)
    add_shape_command(actions)
    for parser in actions.choices.values():
        _config_option(parser)
        _spool_option(parser)
    queue.set_defaults(func=lambda args: _usage(queue))


_RECOVER_HELP = """\
At start the relay moves message bodies that the spool database does not know to
bodies/orphaned/ (it never deletes them) and logs an error. That happens when the database
was lost, emptied or replaced: then every one of them was acknowledged with 250 and must be
sent. It also happens after a crash between writing a body and committing its row: then no
client was told 250, the client probably sent the message again, and re-importing it may
deliver it twice: that is why such bodies wait in quarantine, neither sent nor deleted. Look
with --list and remove from bodies/orphaned/ what must not be sent. Only bodies over 64 KiB
live in files; smaller ones were in the database only.

Without ID: re-import every quarantined body that has its envelope file (<ID>.env) as a queued
message with its original id, and list those without one, which stay in quarantine. With ID:
re-import that one; --from and --to give (or replace) its envelope. The envelope file of a
message streamed to disk also holds its header block (the file, the body only): without it, the
body is sent as it is. Exit status 1 when something stays in quarantine. Works while the relay
runs."""


def _add_recover_command(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recover = actions.add_parser(
        "recover", help="re-import quarantined message bodies (bodies/orphaned/)",
        description=_RECOVER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    recover.add_argument("id", metavar="ID", nargs="?", help="only this quarantined message")
    recover.add_argument("--list", action="store_true",
                         help="only list what is in quarantine; change nothing")
    recover.add_argument("--from", dest="mail_from", metavar="ADDR",
                         help="envelope sender for ID")
    recover.add_argument("--to", dest="rcpt", metavar="ADDR", action="append", default=[],
                         help="envelope recipient for ID (repeatable)")
    recover.set_defaults(func=_queue_recover)


def _add_rules_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = commands.add_parser("rules", help="work with header rules")
    actions = rules.add_subparsers(title="rules commands", metavar="ACTION")
    test = actions.add_parser("test", help="show which rules match a message and the resulting "
                                           "headers, without sending anything")
    _config_option(test)
    test.add_argument("message", metavar="MESSAGE.eml", help="the message file ('-' for stdin)")
    test.add_argument("--mail-from", default=None, help="envelope sender (default: From header)")
    test.add_argument("--rcpt", action="append", default=[], help="envelope recipient "
                                                                  "(repeatable)")
    test.add_argument("--client-ip", default="127.0.0.1")
    test.add_argument("--user", default=None, help="local AUTH user")
    test.add_argument("--listener", default=None, help="listener name (default: the first)")
    test.set_defaults(func=_rules_test)
    rules.set_defaults(func=lambda args: _usage(rules))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


# --------------------------------------------------------------------------- commands


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format, iter_secret_values(config))
    if config.workers > 1:
        return run_workers(config, args.config, run_server)
    run_server(Server(config, args.config))
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for warning in permission_warnings(config):
        print(f"infobip-relay: warning: {warning}", file=sys.stderr)
    print(f"# configuration OK ({config.source}); secrets redacted")
    print(yaml.safe_dump(redacted(config), sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _regions(args: argparse.Namespace) -> int:
    print(format_region_table())
    return EXIT_OK


def _hash_password(args: argparse.Namespace) -> int:
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CLIError("the passwords differ")
    if not password:
        raise CLIError("empty password")
    print(hash_password(password))
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    directory = _spool_dir(args)
    pid = read_pid(directory)
    if pid is None:
        raise CLIError(f"no running relay found for spool {directory} (no relay.pid)")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CLIError(f"relay process {pid} is not running (stale relay.pid)") from None
    except PermissionError:
        raise CLIError(f"not allowed to signal relay process {pid}") from None
    print(f"reload requested (pid {pid}); the relay logs whether the new config was accepted")
    return EXIT_OK


def _spool_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "spool", None):
        return Path(args.spool)
    config: Config = load_config(args.config)
    return config.queue.path


def _open_spools(args: argparse.Namespace) -> list[SpoolDB]:
    """The spool and, with several workers, every worker's spool under it."""
    directory = _spool_dir(args)
    paths = find_spools(directory)
    if not paths:
        raise CLIError(f"no spool at {directory}")
    return [SpoolDB(path, create=False) for path in paths]


def _in_spools(args: argparse.Namespace, action: Callable[[SpoolDB], T | None]) -> T | None:
    """Run ``action`` on each spool until one returns something other than None/False."""
    databases = _open_spools(args)
    try:
        for db in databases:
            result = action(db)
            if result:
                return result
        return None
    finally:
        for db in databases:
            db.close()


def _queue_list(args: argparse.Namespace) -> int:
    states = args.state or ["queued", "deferred", "failed", "bounced"]
    messages: list[QueuedMessage] = []
    databases = _open_spools(args)
    try:
        for db in databases:
            messages.extend(db.list(states, args.limit))
    finally:
        for db in databases:
            db.close()
    messages = sorted(messages, key=lambda message: message.created)[:args.limit]
    if args.json:
        print(json.dumps([_message_dict(m) for m in messages], indent=2))
        return EXIT_OK
    if not messages:
        print("spool is empty" if states != ["delivered"] else "no delivered records")
        return EXIT_OK
    print(f"{'ID':<20} {'STATE':<9} {'PRIO':<8} {'AGE':>6} {'TRIES':>5} {'SIZE':>8}  "
          "SENDER -> RECIPIENTS / LAST REPLY")
    for message in messages:
        recipients = ", ".join(r.address for r in message.recipients)
        print(f"{message.id:<20} {message.state:<9} {message.priority_name:<8} "
              f"{_age(message.created):>6} {message.attempts:>5} {message.size:>8}  "
              f"<{message.mail_from}> -> {recipients}")
        if message.last_reply and message.state != "queued":
            print(f"{'':<20} {message.last_reply}")
    return EXIT_OK


def _queue_show(args: argparse.Namespace) -> int:
    message = _in_spools(args, lambda db: db.get(args.id))
    if message is None:
        raise CLIError(f"no message {args.id} in the spool")
    if args.json:
        print(json.dumps(_message_dict(message), indent=2))
        return EXIT_OK
    print(f"id:           {message.id}")
    print(f"state:        {message.state}")
    print(f"priority:     {message.priority_name}")
    user = f", user {message.auth_user}" if message.auth_user else ""
    print(f"received:     {_stamp(message.created)} from {message.client} "
          f"(listener {message.listener}{user})")
    print(f"size:         {message.size} bytes")
    print(f"attempts:     {message.attempts}")
    if message.state == "deferred":
        print(f"next attempt: {_stamp(message.next_attempt)}")
    print(f"sender:       <{message.mail_from}>")
    if message.original_mail_from is not None:
        print(f"rewritten:    from <{message.original_mail_from}> (the client's sender)")
    print(f"upstream:     {message.route}")
    if message.upstream_id:
        print(f"infobip id:   {message.upstream_id}")
    print(f"last reply:   {message.last_reply or '-'}")
    print("recipients:")
    for recipient in message.recipients:
        print(f"  <{recipient.address}> {recipient.state}: {recipient.reply or '-'}")
        if recipient.report is not None:
            print(f"    report: {_report_line(recipient.report)}")
        if recipient.tracking is not None:
            print(f"    last event: {recipient.tracking.type}"
                  + (f" at {_stamp(recipient.tracking.at)}" if recipient.tracking.at else ""))
    return EXIT_OK


def _report_line(report: Report) -> str:
    """``UNDELIVERABLE UNDELIVERABLE_REJECTED_OPERATOR, error 6006 INVALID_... (permanent)``."""
    error = f"{report.error_id} {report.error}" if report.error_id is not None else report.error
    permanent = " (permanent)" if report.permanent else ""
    done = f", done {report.done_at}" if report.done_at else ""
    return f"{report.group} {report.status}, error {error or '-'}{permanent}{done}"


def _queue_retry(args: argparse.Namespace) -> int:
    now = dt.datetime.now().timestamp()
    done = _in_spools(args, lambda db: db.transaction(lambda: db.retry(args.id, now)))
    if not done:
        raise CLIError(f"no queued, deferred or failed message {args.id} in the spool")
    print(f"{args.id} will be retried now")
    return EXIT_OK


def _queue_delete(args: argparse.Namespace) -> int:
    done = _in_spools(args, lambda db: db.transaction(lambda: db.delete(args.id)))
    if not done:
        raise CLIError(f"no message {args.id} in the spool")
    print(f"{args.id} deleted")
    return EXIT_OK


def _queue_recover(args: argparse.Namespace) -> int:
    given = _given_envelope(args)
    left = 0
    found = False
    databases = _open_spools(args)
    with contextlib.ExitStack() as locks:
        for db in databases:
            locks.callback(db.close)
            lock = None if args.list else _lock_if_stopped(db)
            if lock is not None:
                locks.enter_context(lock)
                _quarantine(db)
            orphans = [o for o in db.orphans() if args.id in (None, o.id)]
            found = found or bool(orphans)
            left += sum(_recover_one(db, orphan, given, dry_run=args.list) for orphan in orphans)
    if args.id is not None and not found:
        raise CLIError(f"no message {args.id} in quarantine (bodies/orphaned/)")
    if not found:
        print("nothing in quarantine")
    elif left and not args.list:
        print(f"{left} message(s) left in quarantine: re-import one with "
              "`infobip-relay queue recover ID --from ADDR --to ADDR`", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _lock_if_stopped(db: SpoolDB) -> IO[str] | None:
    """The spool's lock, held, when no relay runs on it; else None."""
    try:
        lock = open_private(db.directory / LOCK_FILE)
    except OSError:
        return None  # not ours to lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None  # a relay runs
    return lock


def _quarantine(db: SpoolDB) -> None:
    """Do first what the relay's next start would do (only safe while no relay runs: one
    may be between writing a body and committing its row)."""
    try:
        moved = db.quarantine_orphan_bodies()
    except OSError as exc:
        raise CLIError(f"cannot quarantine in {db.bodies}: {exc}") from None
    if moved:
        print(f"moved {len(moved)} body file(s) unknown to {db.path} into quarantine")


def _given_envelope(args: argparse.Namespace) -> SavedEnvelope | None:
    """The envelope from --from/--to, for one ID only; None when not given."""
    if args.mail_from is None and not args.rcpt:
        return None
    if args.id is None:
        raise CLIError("--from and --to need the ID of one quarantined message")
    if args.mail_from is None or not args.rcpt:
        raise CLIError("give both --from and at least one --to")
    if not is_message_id(args.id):
        raise CLIError(f"{args.id!r} is not a message id")
    return SavedEnvelope(args.mail_from, tuple(args.rcpt))


def _recover_one(db: SpoolDB, orphan: OrphanedBody, given: SavedEnvelope | None, *,
                 dry_run: bool) -> int:
    """Re-import one quarantined body, or say why not; 1 when it stays in quarantine."""
    saved = given or orphan.envelope
    if saved is None:
        print(f"{orphan.id}: {orphan.size} bytes, {orphan.problem}; left in {orphan.path}")
        return 1
    recipients = ", ".join(saved.recipients)
    if dry_run:
        print(f"{orphan.id}: {orphan.size} bytes, <{saved.mail_from}> -> {recipients}")
        return 1
    if given is not None:
        saved = _complete(given, orphan)
    try:
        db.recover(orphan, saved, dt.datetime.now().timestamp())
    except (SpoolError, OSError) as exc:
        print(f"{orphan.id}: not re-imported: {exc}", file=sys.stderr)
        return 1
    print(f"{orphan.id}: re-imported as queued, <{saved.mail_from}> -> {recipients}")
    return 0


def _complete(given: SavedEnvelope, orphan: OrphanedBody) -> SavedEnvelope:
    """Fill in what --from/--to cannot say, the way the listener would have."""
    previous = orphan.envelope
    # A streamed body's header block is only in its sidecar: without one, the file is sent as
    # the whole message.
    head = previous.head if previous else None
    ascii_only = (head or b"").isascii() and orphan.path.read_bytes().isascii()
    options = ["BODY=8BITMIME"] if not ascii_only else []
    if not all(address.isascii() for address in (given.mail_from, *given.recipients)):
        options.append("SMTPUTF8")
    return SavedEnvelope(
        given.mail_from, given.recipients, tuple(options),
        created=previous.created if previous else orphan.path.stat().st_mtime,
        priority=previous.priority if previous else given.priority,
        client=previous.client if previous else None,
        auth_user=previous.auth_user if previous else None,
        listener=previous.listener if previous else None, head=head)


def _rules_test(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    raw = _read_message(args.message)
    listener_name = args.listener or config.listeners[0].name
    listener = next((item for item in config.listeners if item.name == listener_name), None)
    if listener is None:
        raise CLIError(f"no listener named {listener_name!r} "
                       f"(have: {', '.join(item.name for item in config.listeners)})")
    print(rules_test_report(config, listener, raw, mail_from=args.mail_from,
                            rcpt_tos=tuple(args.rcpt), client_ip=args.client_ip,
                            user=args.user))
    return EXIT_OK


def rules_test_report(config: Config, listener: ListenerConfig, raw: bytes, *,
                      mail_from: str | None, rcpt_tos: tuple[str, ...], client_ip: str,
                      user: str | None, helo: str | None = None,
                      queue_id: str = RULES_TEST_QUEUE_ID,
                      received_at: dt.datetime | None = None) -> str:
    """What `rules test` prints: ``raw`` prepared as the listener prepares DATA, then the rules.

    The file is taken as the DATA a client would send, byte for byte, so the rules see what
    they would see live (Received, Message-ID and Date included). The queue id and the time
    are the only things the live relay makes up: pass them in to compare with a live message.
    """
    ctx = MessageContext(queue_id=queue_id, mail_from=mail_from or "", rcpt_tos=rcpt_tos,
                         client_ip=client_ip, auth_user=user, listener=listener.name,
                         size=len(raw), received_at=received_at or dt.datetime.now(dt.UTC))
    arrival = Arrival(hostname=config.hostname, helo=helo, tls=listener.tls == "implicit")
    try:
        prepared = prepare(raw, ctx, arrival)
    except MessageRefused as refusal:
        raise CLIError(f"the relay would refuse this message: {refusal.reply}") from None
    if mail_from is None:  # the envelope sender defaults to the From header's address
        ctx = replace(ctx, mail_from=parseaddr(prepared.header("From") or "")[1])
    return render_rules_report(config.rules, ctx, prepared.header_block,
                               client_headers=listener.client_headers)


def _read_message(name: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {name}: {exc.strerror}") from None


def _message_dict(message: QueuedMessage) -> dict[str, object]:
    return {
        "id": message.id, "state": message.state, "priority": message.priority_name,
        "created": _stamp(message.created), "attempts": message.attempts,
        "next_attempt": _stamp(message.next_attempt), "size": message.size,
        "mail_from": message.mail_from, "client": message.client,
        "auth_user": message.auth_user, "listener": message.listener,
        "last_reply": message.last_reply, "upstream_id": message.upstream_id,
        "route": message.route, "original_mail_from": message.original_mail_from,
        "recipients": [_recipient_dict(r) for r in message.recipients],
    }


def _recipient_dict(recipient: Recipient) -> dict[str, object]:
    return {"address": recipient.address, "state": recipient.state, "reply": recipient.reply,
            "upstream_id": recipient.upstream_id,
            "report": recipient.report.as_dict() if recipient.report else None,
            "tracking": recipient.tracking.as_dict() if recipient.tracking else None}


def _stamp(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(created: float) -> str:
    seconds = max(0, int(dt.datetime.now().timestamp() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
