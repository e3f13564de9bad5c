"""`infobip-relay queue shape`: the age columns, the domains, the one SQL pass, and its speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.queueshape import build_spool
from relay.cli import main
from relay.queueshape import BUCKETS, HEADINGS, NO_DOMAIN, bucket_index, domain_of, shape
from relay.spool import SpoolDB

NOW = 1_800_000_000.0
INSERT = ("INSERT INTO messages (id, state, priority, created, updated, next_attempt, attempts,"
          " mail_from, recipients, mail_options, size, data)"
          " VALUES (?, ?, 2, ?, ?, ?, 0, ?, ?, '[]', 10, x'00')")


@pytest.mark.parametrize(("minutes", "column"), [
    (0, "5"), (4.99, "5"), (5, "10"), (9.9, "10"), (10, "20"), (19, "20"), (20, "40"),
    (39.5, "40"), (40, "80"), (80, "160"), (159, "160"), (160, "320"), (320, "640"),
    (639, "640"), (640, "1280"), (1279.9, "1280"), (1280, "1280+"), (10_000, "1280+"),
])
def test_age_columns(minutes: float, column: str) -> None:
    assert HEADINGS[bucket_index(minutes)] == column


def test_headings_are_qshapes() -> None:
    assert ["T", *HEADINGS] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]


@pytest.mark.parametrize(("tail", "domain"), [
    ("@Example.COM", "example.com"), ('@b"@example.org', "example.org"), ("postmaster", NO_DOMAIN),
    ("", NO_DOMAIN), ("@", NO_DOMAIN),
])
def test_domain_of(tail: str, domain: str) -> None:
    assert domain_of(tail) == domain


class Spool:
    def __init__(self, directory: Path) -> None:
        self.db = SpoolDB(directory)
        self.count = 0

    def add(self, minutes: float, rcpts: list[tuple[str, str]], state: str = "deferred",
            sender: str = "app@Sender.example") -> None:
        self.count += 1
        recipients = json.dumps([{"a": a, "s": s, "r": None} for a, s in rcpts])
        created = NOW - minutes * 60
        self.db.conn.execute(INSERT, (f"M{self.count:019d}", state, created, created, created,
                                      sender, recipients))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_sql_buckets_match_the_python_table(spool: Spool) -> None:
    """Every boundary lands in the same column in SQL as in bucket_index."""
    ages = [0, 4.99, 5, 5.01, *[b - 0.01 for b in BUCKETS], *BUCKETS, 5000]
    for age in ages:
        spool.add(age, [("u@example.com", "pending")])
    result = shape([spool.db.conn], now=NOW)
    expected = [0] * len(HEADINGS)
    for age in ages:
        expected[bucket_index(age)] += 1
    assert result.rows["example.com"] == expected
    assert result.total == expected


def test_counts_pending_recipients_of_waiting_mail_only(spool: Spool) -> None:
    spool.add(1, [("a@example.com", "pending"), ("b@EXAMPLE.com", "pending"),
                  ("c@example.net", "delivered"), ("d@example.org", "failed")])
    spool.add(30, [("e@example.net", "pending")], state="queued")
    spool.add(30, [('"x@y"@quoted.example', "pending")])
    spool.add(2000, [("f@example.com", "pending")], state="failed")
    spool.add(2000, [("g@example.com", "delivered")], state="delivered")
    result = shape([spool.db.conn], now=NOW)
    col = {heading: index for index, heading in enumerate(HEADINGS)}
    assert sum(result.rows["example.com"]) == 2
    assert result.rows["example.com"][col["5"]] == 2
    assert result.rows["example.net"][col["40"]] == 1
    assert sum(result.rows["quoted.example"]) == 1
    assert set(result.rows) == {"example.com", "example.net", "quoted.example"}
    assert sum(result.total) == 4

    by_sender = shape([spool.db.conn], "sender", now=NOW)
    assert set(by_sender.rows) == {"sender.example"}
    assert by_sender.total == result.total


def test_cli_prints_qshape_layout(spool: Spool, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    now_minutes = (NOW - time.time()) / 60  # NOW is in the future: ages relative to it
    spool.add(now_minutes + 1, [("a@big.example", "pending")] * 3)
    spool.add(now_minutes + 100, [("b@small.example", "pending")])
    spool.db.close()
    assert main(["queue", "shape", "--spool", str(tmp_path / "spool")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["T", *HEADINGS]
    assert lines[1].split() == ["TOTAL", "4", "3", "0", "0", "0", "0", "1", "0", "0", "0", "0"]
    assert lines[2].split() == ["big.example", "3", "3", *["0"] * 9]
    assert lines[3].split()[0] == "small.example"
    # Right-aligned columns, as qshape prints them.
    assert len({len(line) for line in lines}) == 1

    assert main(["queue", "shape", "--spool", str(tmp_path / "spool"), "--by", "sender",
                 "--json", "--top", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["by"] == "sender"
    assert data["total"]["T"] == 4
    assert list(data["domains"]) == ["sender.example"]


def test_no_spool_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queue", "shape", "--spool", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.startswith("infobip-relay: error: no spool at")


def test_counts_every_waiting_message_of_a_100000_message_spool(tmp_path: Path) -> None:
    """Its speed is measured by bench/queueshape.py (0.45 s for the whole command on the
    2-core VM), not here: a timed assertion failed CI at 4.1 s on a VM in a slow phase."""
    directory = build_spool(tmp_path / "spool", 100_000, now=NOW)
    db = SpoolDB(directory, create=False)
    try:
        result = shape([db.conn], now=NOW)
    finally:
        db.close()
    assert sum(result.total) > 80_000
