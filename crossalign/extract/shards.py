"""Parquet feature shards: written under a temporary name, renamed when complete, then recorded."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossalign.extract import ledger
from crossalign.extract.manifest import FeatureManifest, ensure_identity, manifest_lock
from crossalign.workspace import WorkspaceError


def features_schema(dim: int) -> pa.Schema:
    """Schema of a feature shard: the item id and its feature vector."""
    return pa.schema([pa.field("id", pa.string(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, dim) float array -> Arrow fixed_size_list<float32>[dim] (no per-row Python objects)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Arrow fixed_size_list column -> (N, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.float32(), dim))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


class Scope(NamedTuple):
    """What a plan already checked: the shards below `since` (None: nothing, check the whole index), and the
    unit of work (`plan`, `unit`: its first table row) whose writers are the only ones that may overlap."""

    since: int | None = None
    plan: str | None = None
    unit: int | None = None


class ShardWriter:
    """Appends complete shards to a features directory; a killed run loses at most the shard in flight.

    Several writers (threads, processes, machines sharing the workspace) may append to one directory at
    once. A shard is first written under a temporary name unique to its writer; then, holding the
    manifest lock, the writer drops the rows whose ids another writer recorded meanwhile, renames the
    file to the next free shard name and records it in the ledger. A shard file that was renamed but not
    recorded (killed in between) is overwritten by the next shard of the same number, so no row is ever
    stored twice.

    "Meanwhile" is what keeps a commit's cost flat: the writer's caller checked its ids against the
    shards numbered below `since` (see `pending`), so only shards recorded from `since` on can hold
    them, and of those not the other units of the writer's own plan (`plan`, `unit`), which cover other
    rows of the corpus. A writer made without `since` checks every shard.

    Items that could not be encoded are noted with `note_failed` and recorded with the next commit.
    """

    def __init__(self, directory: Path, description: dict[str, Any], since: int = 0, plan: str | None = None,
                 unit: int | None = None) -> None:
        self.directory = Path(directory)
        self.description = description
        self.since, self.plan, self.unit = since, plan, unit
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # rows encoded here that another writer had recorded first
        self.commit_seconds: list[float] = []  # time holding the manifest lock, per shard commit
        self._failed: dict[str, str] = {}
        self._failed_lock = threading.Lock()
        self._mine: set[str] = set()  # files of the shards this writer recorded: their ids are not read back
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written shards left by processes of this machine that are gone (a killed run)."""
        host = socket.gethostname()
        for tmp in self.directory.glob(".part-*.tmp-*"):
            writer = tmp.name.split(".tmp-", 1)[1]
            owner, _, pid = writer.rpartition("-")
            if owner in ("", host) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                tmp.unlink(missing_ok=True)

    def note_failed(self, item: str, error: str) -> None:
        """Record with the next commit that `item` could not be encoded, and why."""
        with self._failed_lock:
            self._failed[item] = error

    def write(self, ids: list[str], vectors: np.ndarray) -> Path | None:
        """Write one complete shard and record it; returns its path (None when other writers had recorded every id)."""
        dim = int(self.description["dim"])
        if vectors.shape != (len(ids), dim):
            raise ValueError(f"shard vectors have shape {vectors.shape}, expected ({len(ids)}, {dim})")
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), vectors_to_arrow(vectors)],
                                     schema=features_schema(dim))
        tmp = self.directory / f".part-{uuid.uuid4().hex[:12]}.tmp-{socket.gethostname()}-{os.getpid()}"
        pq.write_table(table, tmp)
        try:
            return self._commit(tmp, table)
        finally:
            tmp.unlink(missing_ok=True)

    def commit_failures(self) -> None:
        """Record the noted failures now (when no shard follows them)."""
        with manifest_lock(self.directory):
            ensure_identity(self.directory, self.description)
            with ledger.connect(self.directory, write=True) as con:
                self._record_failures(con, self._concurrent_ids(con), [])

    def _commit(self, tmp: Path, table: pa.Table) -> Path | None:
        with manifest_lock(self.directory):
            start = time.perf_counter()
            ensure_identity(self.directory, self.description)
            with ledger.connect(self.directory, write=True) as con:
                recorded = self._concurrent_ids(con)
                ids = table.column("id").to_pylist()
                new = [item not in recorded for item in ids]
                if not all(new):  # another writer did some of these ids: keep its rows, drop ours
                    self.dropped += new.count(False)
                    table = table.filter(pa.array(new))
                    pq.write_table(table, tmp)
                    ids = table.column("id").to_pylist()
                final = None
                if table.num_rows:
                    final = self.directory / f"part-{ledger.shard_count(con):05d}.parquet"
                    os.replace(tmp, final)
                    ledger.add_shard(con, final.name, table.num_rows, self.plan, self.unit)
                    self._mine.add(final.name)
                self._record_failures(con, recorded | set(ids), ids)
            self.commit_seconds.append(time.perf_counter() - start)
            return final

    def _concurrent_ids(self, con: Any) -> set[str]:
        """Ids of the shards recorded since this writer's caller checked, that may overlap its work."""
        done: set[str] = set()
        for file in ledger.concurrent_shards(con, self.since, self.plan, self.unit):
            if file not in self._mine:  # its own earlier shards hold other ids (its caller's are distinct)
                done.update(shard_ids(self.directory / file))
        return done

    def _record_failures(self, con: Any, recorded: set[str], encoded: list[str]) -> None:
        with self._failed_lock:
            failed, self._failed = self._failed, {}
        # An item another writer encoded meanwhile has features: it is not failed.
        ledger.record_failures(con, {item: error for item, error in failed.items() if item not in recorded}, encoded)


SHARD_IDS_CACHED = 64


@functools.lru_cache(maxsize=SHARD_IDS_CACHED)
def _shard_ids(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The ids of one shard file; the last few cached per process (a recorded shard never changes: the key
    would if it did). Few: a shard's ids take about 0.4 MB, and 4,096 of them cached grew a 10M-item
    extraction by 1.1 GB; commits read only the shards of concurrent writers, and an index refresh each once."""
    return tuple(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def shard_ids(path: Path) -> tuple[str, ...]:
    """The ids of the shard file `path`, in row order."""
    stat = Path(path).stat()
    return _shard_ids(str(path), stat.st_size, stat.st_mtime_ns)


def refreshed_index(directory: Path) -> int:
    """Bring the id index of `directory` up to date with its recorded shards; returns the shards it covers."""
    with ledger.connect(directory) as con:
        if ledger.indexed_through(con) == ledger.shard_count(con):  # up to date: no lock, no write
            return ledger.indexed_through(con)
    with manifest_lock(directory):
        with ledger.connect(directory, write=True) as con:
            ledger.refresh_index(con, lambda file: shard_ids(Path(directory) / file))
            return ledger.indexed_through(con)


def pending(directory: Path, ids: list[str], since: int | None = None, plan: str | None = None,
            unit: int | None = None) -> tuple[list[bool], int]:
    """Which of `ids` have no features in `directory`, and the shard number the answer covers (`since` for a
    `ShardWriter` that encodes them).

    With `since` (a plan's: the index covered the shards below it when the plan was made), the answer
    reads the index and the shards recorded from `since` on that may hold the ids (`concurrent_shards`):
    a cost that does not grow with the directory. Without, the index is first brought up to date.
    """
    if not (Path(directory) / "_manifest.json").exists():
        return [True] * len(ids), 0
    if since is None:
        since = refreshed_index(directory)
    with ledger.connect(directory) as con:
        located = ledger.locate(con, ids)
        recent: set[str] = set()
        for file in ledger.concurrent_shards(con, since, plan, unit):
            recent.update(shard_ids(Path(directory) / file))
    return [item not in located and item not in recent for item in ids], since


def read_features(directory: Path, ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Read the finished shards of a features directory.

    Args:
        directory: a features directory with a manifest.
        ids: when given, return exactly these ids in this order.

    Returns:
        (ids, vectors) with vectors of shape (N, dim), float32.

    Raises:
        WorkspaceError: no manifest, or some requested ids have no features.
    """
    if ids is not None:  # only their rows are kept, shard by shard (a split of a large corpus: not all of it)
        locator = ShardLocator(directory)
        return list(ids), locator.read(locator.locate(pa.array(ids, pa.string())))
    manifest = FeatureManifest.load(directory)
    if manifest is None:
        raise WorkspaceError(f"no features in {directory}: run extraction first")
    tables = [pq.read_table(Path(directory) / shard["file"]) for shard in manifest.shards]
    table = pa.concat_tables(tables) if tables else features_schema(manifest.dim).empty_table()
    return table.column("id").to_pylist(), arrow_to_vectors(table.column("vector"), manifest.dim)


class ShardLocator:
    """Where ids lie in a features directory, read from its id index (see `crossalign.extract.ledger`).

    `read` then fetches the vectors of any rows shard by shard, so reading a corpus in chunks holds a
    chunk and one shard at a time, not the whole directory (1M images x 2560-d is 10 GB).
    """

    def __init__(self, directory: Path) -> None:
        manifest = FeatureManifest.load(directory)
        if manifest is None:
            raise WorkspaceError(f"no features in {directory}: run extraction first")
        refreshed_index(directory)
        self.directory, self.dim = Path(directory), manifest.dim
        self.files = [self.directory / shard["file"] for shard in manifest.shards]
        self.starts = np.cumsum([0] + [shard["rows"] for shard in manifest.shards])  # first row of each shard
        self._cached: tuple[int, np.ndarray] | None = None  # the last shard read: chunks often straddle shards

    def locate(self, ids: pa.Array | list[str]) -> np.ndarray:
        """The row (counted across shards) of each of `ids`.

        Raises:
            WorkspaceError: some ids have no features here.
        """
        ids = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else list(ids)
        with ledger.connect(self.directory) as con:
            found = ledger.locate(con, ids)
        missing = [item for item in ids if item not in found]
        if missing:
            raise WorkspaceError(f"{len(missing)} ids have no features in {self.directory} "
                                 f"(first: {missing[0]}): extract first")
        return np.fromiter((self.starts[found[i][0]] + found[i][1] for i in ids), dtype=np.int64, count=len(ids))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of `rows` (as `locate` gives them), in that order: (len(rows), dim) float32."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shards = np.searchsorted(self.starts, rows, side="right") - 1
        by_shard = np.argsort(shards, kind="stable")
        for where in np.split(by_shard, np.flatnonzero(np.diff(shards[by_shard])) + 1):
            if len(where):
                shard = int(shards[where[0]])
                out[where] = self._shard(shard)[rows[where] - self.starts[shard]]
        return out

    def _shard(self, shard: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != shard:
            column = pq.read_table(self.files[shard], columns=["vector"]).column("vector")
            self._cached = shard, arrow_to_vectors(column, self.dim)
        return self._cached[1]
