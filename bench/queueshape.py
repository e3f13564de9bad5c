"""``python -m bench.queueshape [--messages N] [--dir DIR]``: build a spool of N messages (a
backlog of queued and deferred mail spread over three days, 1-3 recipients each, some already
delivered) and time `infobip-relay queue shape` on it: the query alone and the whole command."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from relay.cli import main as relay_main
from relay.queueshape import shape
from relay.spool import SpoolDB

_INSERT = ("INSERT INTO messages (id, state, priority, created, updated, next_attempt, attempts,"
           " mail_from, recipients, mail_options, size, client, listener, last_reply, data)"
           " VALUES (?, ?, 2, ?, ?, ?, ?, ?, ?, '[]', 1024, '127.0.0.1', 'local', ?, ?)")
DOMAINS = [f"domain{i}.example" for i in range(40)] + ["gmail.com", "outlook.com", "yahoo.com"]
SENDERS = [f"app{i}.example.org" for i in range(12)]


def build_spool(directory: Path, messages: int, *, seed: int = 13, now: float | None = None
                ) -> Path:
    """A spool in ``directory`` holding ``messages`` rows; returns the directory."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    body = b"x" * 1024
    db = SpoolDB(directory)
    try:
        rows = []
        for n in range(messages):
            state = rng.choices(["queued", "deferred", "failed", "delivered"], [3, 6, 1, 2])[0]
            created = now - rng.expovariate(1 / 3600) % (3 * 86400)
            recipients = []
            for k in range(rng.choice((1, 1, 1, 2, 3))):
                done = state == "delivered" or (k > 0 and rng.random() < 0.2)
                recipients.append({"a": f"user{n}.{k}@{rng.choice(DOMAINS)}",
                                   "s": "delivered" if done else "pending", "r": None})
            rows.append((f"Q{n:019d}", state, created, created, created + 60,
                         0 if state == "queued" else rng.randint(1, 9),
                         f"sender{n % 97}@{rng.choice(SENDERS)}",
                         json.dumps(recipients, separators=(",", ":")),
                         None if state == "queued" else "451 4.4.1 upstream unavailable",
                         None if state == "delivered" else body))
        db.conn.execute("BEGIN")
        db.conn.executemany(_INSERT, rows)
        db.conn.execute("COMMIT")
    finally:
        db.close()
    return directory


def time_shape(directory: Path, repeat: int = 5) -> dict[str, float]:
    """Median seconds: the query on an open spool, and the whole CLI command (open included)."""
    query, command = [], []
    db = SpoolDB(directory, create=False)
    try:
        db.conn.execute("PRAGMA mmap_size=1073741824")  # as `queue shape` opens it
        for _ in range(repeat):
            started = time.perf_counter()
            shape([db.conn])
            query.append(time.perf_counter() - started)
    finally:
        db.close()
    for _ in range(repeat):
        started = time.perf_counter()
        relay_main(["queue", "shape", "--spool", str(directory), "--json"])
        command.append(time.perf_counter() - started)
    return {"query_s": statistics.median(query), "command_s": statistics.median(command)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queueshape", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, help="where to build the spool (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.dir or Path(scratch) / "spool"
        started = time.perf_counter()
        build_spool(directory, args.messages)
        built = time.perf_counter() - started
        real_stdout = sys.stdout
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - the command prints its table
            timing = time_shape(directory)
        finally:
            sys.stdout.close()
            sys.stdout = real_stdout
    print(f"{args.messages} messages (built in {built:.1f}s): query {timing['query_s']:.3f}s, "
          f"whole command {timing['command_s']:.3f}s (medians of 5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
