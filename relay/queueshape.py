"""`infobip-relay queue shape`: waiting mail by domain and age, in Postfix qshape's layout.

Counts are pending recipients of queued and deferred messages (a message to three addresses at
one domain counts three, as in qshape), by recipient domain or, with ``--by sender``, by the
sender's domain. Ages are minutes since the message was accepted; a column counts what is
younger than its heading and at least as old as the column before it (``5``: under 5 minutes,
``10``: 5 to 10 minutes, ..., ``1280+``: 1280 minutes or more). One SQL pass per spool.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

# Upper bounds of the age columns in minutes; one more column holds everything older.
BUCKETS: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
HEADINGS: tuple[str, ...] = (*(str(bound) for bound in BUCKETS), f"{BUCKETS[-1]}+")
By = Literal["recipient", "sender"]
NO_DOMAIN = "(no domain)"


def bucket_index(age_minutes: float) -> int:
    """The age column (0 = ``5`` ... len(BUCKETS) = ``1280+``) for an age in minutes."""
    for index, bound in enumerate(BUCKETS):
        if age_minutes < bound:
            return index
    return len(BUCKETS)


def domain_of(tail: str) -> str:
    """The domain from an address's tail as the query returns it (from its first '@' on).

    The query keeps only the cheap part in SQL; the domain is after the *last* '@' (a quoted
    local part may hold one) and case-insensitive.
    """
    if not tail.startswith("@"):
        return NO_DOMAIN
    return tail[1:].rsplit("@", 1)[-1].lower() or NO_DOMAIN


# Ages are compared as arrival times against cutoffs (``created > now - 5 min``): no arithmetic
# per row. Addresses are cut at their first '@' (or kept whole without one), grouped, and the
# few groups finished in Python by domain_of.
_BUCKET_SQL = "CASE " + " ".join(f"WHEN m.created > :t{index} THEN {index}"
                                 for index in range(len(BUCKETS))) + f" ELSE {len(BUCKETS)} END"
_ADDRESS_SQL = {"recipient": "r.value ->> 'a'", "sender": "m.mail_from"}


def _query(by: By) -> str:
    """The one pass: built from the constants above only, never from input."""
    address = _ADDRESS_SQL[by]
    return (
        f"SELECT substr({address}, instr({address}, '@')) AS tail, "  # noqa: S608
        f"{_BUCKET_SQL} AS bucket, COUNT(*) "
        "FROM messages AS m, json_each(m.recipients) AS r "
        "WHERE m.state IN ('queued', 'deferred') AND r.value ->> 's' = 'pending' "
        "GROUP BY tail, bucket")


@dataclass
class Shape:
    """Counts per domain and age column; ``total`` is the TOTAL row."""

    by: By
    rows: dict[str, list[int]] = field(default_factory=dict)
    total: list[int] = field(default_factory=lambda: [0] * len(HEADINGS))

    def add(self, domain: str, bucket: int, count: int) -> None:
        row = self.rows.setdefault(domain, [0] * len(HEADINGS))
        row[bucket] += count
        self.total[bucket] += count

    def sorted_rows(self, top: int | None = None) -> list[tuple[str, list[int]]]:
        """Busiest domain first (ties by name), as qshape orders them."""
        rows = sorted(self.rows.items(), key=lambda item: (-sum(item[1]), item[0]))
        return rows[:top] if top is not None else rows

    def as_dict(self, top: int | None = None) -> dict[str, object]:
        def entry(counts: list[int]) -> dict[str, int]:
            return {"T": sum(counts), **dict(zip(HEADINGS, counts, strict=True))}

        return {"by": self.by, "columns": ["T", *HEADINGS], "total": entry(self.total),
                "domains": {domain: entry(counts) for domain, counts in self.sorted_rows(top)}}


def shape(connections: Iterable[sqlite3.Connection], by: By = "recipient",
          now: float | None = None) -> Shape:
    """Read queued and deferred mail from each spool database (one query each) into a Shape."""
    result = Shape(by)
    query = _query(by)
    moment = time.time() if now is None else now
    cutoffs = {f"t{index}": moment - 60 * bound for index, bound in enumerate(BUCKETS)}
    for conn in connections:
        for tail, bucket, count in conn.execute(query, cutoffs):
            result.add(domain_of(tail or ""), bucket, count)
    return result


def format_shape(result: Shape, top: int | None = None) -> str:
    """qshape's table: a TOTAL row, then one row per domain, T first then the age columns."""
    rows = [("TOTAL", result.total), *result.sorted_rows(top)]
    width = max(len(name) for name, _ in rows)
    cells = [[str(sum(counts)), *map(str, counts)] for _, counts in rows]
    widths = [max(len(heading), *(len(line[i]) for line in cells))
              for i, heading in enumerate(["T", *HEADINGS])]
    header = " " * width + " " + " ".join(h.rjust(w) for h, w in zip(["T", *HEADINGS], widths,
                                                                      strict=True))
    lines = [header]
    for (name, _), line in zip(rows, cells, strict=True):
        lines.append(name.rjust(width) + " " + " ".join(c.rjust(w)
                                                         for c, w in zip(line, widths,
                                                                         strict=True)))
    return "\n".join(lines)


def shape_json(result: Shape, top: int | None = None) -> str:
    return json.dumps(result.as_dict(top), indent=2)
