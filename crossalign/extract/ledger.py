"""The record of a features directory, in SQLite: its shards in commit order, the items that could not be
encoded, and an index from item id to where its vector is stored.

Why a database and not the JSON list it replaces: at 10 million items a directory holds thousands of
shards, and committing one shard must not cost more as they accumulate. Here a commit appends one row to
`shards` (sequential keys: the B-tree's last page), whatever the directory holds; it never reads every
earlier shard. The id index (`ids`) is what answers "which of these ids are done" without reading the
shards; it is brought up to date in bulk (`refresh_index`, the ids of the shards recorded since, sorted,
in one transaction) by whoever next needs it: the planner of a run, a reader. Inserting each shard's
random-hash ids at commit time instead would cost more the larger the index grows (measured: 4x slower
commits at 2 million ids than at 40 thousand).

Writes happen under the directory's manifest lock (`manifest_lock`): a file lock that works across
processes and machines sharing the workspace, so SQLite's own locking only ever sees one writer.
Readers need no lock (SQLite readers see the last committed state).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LEDGER_NAME = "_manifest.sqlite"
LOOKUP_CHUNK = 900  # ids per `IN (...)` query (SQLite's default limit on parameters is 999)
INDEX_BATCH_SHARDS = 64  # shards indexed per transaction: memory holds their ids, not the directory's
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    number INTEGER PRIMARY KEY, file TEXT NOT NULL, rows INTEGER NOT NULL, plan TEXT, unit INTEGER);
CREATE TABLE IF NOT EXISTS failed (id TEXT PRIMARY KEY, error TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
"""


TABLES = frozenset({"meta", "shards", "failed", "ids"})


def _tables(con: sqlite3.Connection) -> frozenset[str]:
    return frozenset(name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


def ledger_path(directory: Path) -> Path:
    return Path(directory) / LEDGER_NAME


@contextlib.contextmanager
def connect(directory: Path, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to the ledger of `directory` (created with its schema when `write`); closed at the end.

    With `write`, the block runs as one transaction: committed when it ends, rolled back on an error.
    Call it with the manifest lock held.
    """
    path = ledger_path(directory)
    con = None
    if write or path.exists():
        con = sqlite3.connect(path, timeout=60, isolation_level=None)
        con.execute("PRAGMA synchronous=NORMAL")
        if write:
            con.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")  # all tables or none, for a reader
        elif not TABLES <= _tables(con):  # a writer is creating it this instant: nothing recorded yet
            con.close()
            con = None
    if con is None:
        con = sqlite3.connect(":memory:")  # nothing recorded yet: an empty ledger
        con.executescript(SCHEMA)
    try:
        if write:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        else:
            yield con
    finally:
        con.close()


def shard_count(con: sqlite3.Connection) -> int:
    """Shards recorded (their numbers are 0 .. count - 1); O(log n), not a scan."""
    return int(con.execute("SELECT coalesce(max(number) + 1, 0) FROM shards").fetchone()[0])


def shards(con: sqlite3.Connection, since: int = 0) -> list[dict[str, Any]]:
    """The recorded shards numbered `since` and later, in order: {"file", "rows"}."""
    return [{"file": f, "rows": r} for f, r in
            con.execute("SELECT file, rows FROM shards WHERE number >= ? ORDER BY number", (since,))]


def add_shard(con: sqlite3.Connection, file: str, rows: int, plan: str | None, unit: int | None) -> int:
    number = shard_count(con)
    con.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?)", (number, file, rows, plan, unit))
    return number


def concurrent_shards(con: sqlite3.Connection, since: int, plan: str | None, unit: int | None) -> list[str]:
    """Files of the shards recorded from number `since` on that may hold ids of plan `plan`'s unit `unit`: its
    own (a retry, or a concurrent run of the same plan) and those of any other plan or of no plan. The other
    units of the same plan cover other rows of the corpus: they cannot."""
    query = "SELECT file FROM shards WHERE number >= ? AND (plan IS NOT ? OR unit IS ? OR plan IS NULL)"
    return [file for (file,) in con.execute(query, (since, plan, unit))]


def failed(con: sqlite3.Connection) -> dict[str, str]:
    return dict(con.execute("SELECT id, error FROM failed"))


def record_failures(con: sqlite3.Connection, failures: dict[str, str], encoded: Iterable[str]) -> None:
    """Record `failures` (id -> why) and clear the failures of the `encoded` ids: they have features now."""
    encoded = list(encoded)
    for start in range(0, len(encoded), LOOKUP_CHUNK):
        chunk = encoded[start:start + LOOKUP_CHUNK]
        con.execute(f"DELETE FROM failed WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    con.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?)", failures.items())


def indexed_through(con: sqlite3.Connection) -> int:
    """The ids of the shards numbered below this are in the index."""
    row = con.execute("SELECT value FROM meta WHERE key = 'indexed_through'").fetchone()
    return int(row[0]) if row else 0


def refresh_index(con: sqlite3.Connection, shard_ids: Any) -> int:
    """Put the ids of every shard recorded since the last refresh into the index; returns the shards indexed now.

    `shard_ids(file)` gives a shard's ids in row order. Ids go in sorted, a batch of shards per
    statement, so the B-tree is written in key order.
    """
    start, end = indexed_through(con), shard_count(con)
    if start == end:
        return 0
    for first in range(start, end, INDEX_BATCH_SHARDS):
        batch = con.execute("SELECT number, file FROM shards WHERE number >= ? AND number < ? ORDER BY number",
                            (first, min(end, first + INDEX_BATCH_SHARDS))).fetchall()
        rows = sorted((item, number, row) for number, file in batch for row, item in enumerate(shard_ids(file)))
        con.executemany("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)", rows)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('indexed_through', ?)", (end,))
    return end - start


def locate(con: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[int, int]]:
    """(shard number, row) of each of `ids` that the index holds; ids it lacks are absent from the result.

    Looked up in sorted order, so consecutive queries walk the B-tree forwards.
    """
    found: dict[str, tuple[int, int]] = {}
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        chunk = ordered[start:start + LOOKUP_CHUNK]
        query = f"SELECT id, shard, row FROM ids WHERE id IN ({','.join('?' * len(chunk))})"
        found.update((item, (shard, row)) for item, shard, row in con.execute(query, chunk))
    return found


def replace_all(con: sqlite3.Connection, shard_list: list[dict[str, Any]], failures: dict[str, str]) -> None:
    """Make the record say exactly `shard_list` (a prefix of what it holds, or an older manifest's list, in order)
    and `failures`. The index drops the ids of shards no longer recorded; the rest is re-indexed lazily."""
    kept = 0
    for number, (file, rows) in enumerate(con.execute("SELECT file, rows FROM shards ORDER BY number").fetchall()):
        if number < len(shard_list) and shard_list[number] == {"file": file, "rows": rows}:
            kept = number + 1
        else:
            break
    con.execute("DELETE FROM shards WHERE number >= ?", (kept,))
    con.execute("DELETE FROM ids WHERE shard >= ?", (kept,))
    con.executemany("INSERT INTO shards VALUES (?, ?, ?, NULL, NULL)",
                    [(n, s["file"], s["rows"]) for n, s in enumerate(shard_list) if n >= kept])
    con.execute("INSERT OR REPLACE INTO meta VALUES ('indexed_through', ?)", (min(indexed_through(con), kept),))
    con.execute("DELETE FROM failed")
    con.executemany("INSERT INTO failed VALUES (?, ?)", failures.items())
