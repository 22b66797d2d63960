"""Parquet feature shards: written under a temporary name, renamed when complete, then recorded."""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crossalign.extract.manifest import FeatureManifest, manifest_lock
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


class ShardWriter:
    """Appends complete shards to a features directory; a killed run loses at most the shard in flight.

    Several writers (threads, processes, machines sharing the workspace) may append to one directory at
    once. A shard is first written under a temporary name unique to its writer; then, holding the
    manifest lock, the writer reloads the manifest, drops the rows whose ids another writer recorded
    meanwhile, renames the file to the next free shard name and records it. A shard file that was
    renamed but not recorded (killed in between) is overwritten by the next shard of the same number,
    so no row is ever stored twice.

    Items that could not be encoded are noted with `note_failed` and recorded with the next commit.
    """

    def __init__(self, directory: Path, description: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.description = description
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # rows encoded here that another writer had recorded first
        self._failed: dict[str, str] = {}
        self._failed_lock = threading.Lock()
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
            manifest = FeatureManifest.open_for(self.directory, self.description)
            self._record_failures(manifest, _recorded_ids(self.directory, manifest))
            manifest.save(self.directory)

    def _commit(self, tmp: Path, table: pa.Table) -> Path | None:
        with manifest_lock(self.directory):
            manifest = FeatureManifest.open_for(self.directory, self.description)
            recorded = _recorded_ids(self.directory, manifest)
            new = [item not in recorded for item in table.column("id").to_pylist()]
            if not all(new):  # another writer did some of these ids: keep its rows, drop ours
                self.dropped += new.count(False)
                table = table.filter(pa.array(new))
                pq.write_table(table, tmp)
            final = None
            if table.num_rows:
                name = manifest.next_shard_name()
                final = self.directory / name
                os.replace(tmp, final)
                manifest.shards.append({"file": name, "rows": table.num_rows})
                recorded.update(table.column("id").to_pylist())
            for item in table.column("id").to_pylist():
                manifest.failed.pop(item, None)  # it was encoded after all: no longer failed
            self._record_failures(manifest, recorded)
            manifest.save(self.directory)
            return final

    def _record_failures(self, manifest: FeatureManifest, recorded: set[str]) -> None:
        with self._failed_lock:
            failed, self._failed = self._failed, {}
        # An item another writer encoded meanwhile has features: it is not failed.
        manifest.failed.update({item: error for item, error in failed.items() if item not in recorded})


@functools.lru_cache(maxsize=65536)
def _shard_ids(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The ids of one shard file; cached per process (a recorded shard never changes: the key would if it did)."""
    return tuple(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def _recorded_ids(directory: Path, manifest: FeatureManifest) -> set[str]:
    done: set[str] = set()
    for shard in manifest.shards:
        path = Path(directory) / shard["file"]
        stat = path.stat()
        done.update(_shard_ids(str(path), stat.st_size, stat.st_mtime_ns))
    return done


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
    """Where each id of a features directory lies, read from the shards' id columns only.

    `read` then fetches the vectors of any rows shard by shard, so reading a corpus in chunks holds a
    chunk and one shard at a time, not the whole directory (1M images x 2560-d is 10 GB).
    """

    def __init__(self, directory: Path) -> None:
        manifest = FeatureManifest.load(directory)
        if manifest is None:
            raise WorkspaceError(f"no features in {directory}: run extraction first")
        self.directory, self.dim = Path(directory), manifest.dim
        self.files = [self.directory / shard["file"] for shard in manifest.shards]
        columns = [pq.read_table(path, columns=["id"]).column("id") for path in self.files]
        self.ids = pa.chunked_array([chunk for column in columns for chunk in column.chunks], pa.string())
        self.starts = np.cumsum([0] + [len(column) for column in columns])  # first row of each shard
        self._cached: tuple[int, np.ndarray] | None = None  # the last shard read: chunks often straddle shards

    def locate(self, ids: pa.Array) -> np.ndarray:
        """The row (counted across shards) of each of `ids`.

        Raises:
            WorkspaceError: some ids have no features here.
        """
        rows = pc.index_in(ids, value_set=self.ids.combine_chunks())
        if rows.null_count:
            missing = ids.filter(rows.is_null())
            raise WorkspaceError(f"{len(missing)} ids have no features in {self.directory} "
                                 f"(first: {missing[0].as_py()}): extract first")
        return rows.to_numpy(zero_copy_only=False).astype(np.int64)

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


def done_ids(directory: Path) -> set[str]:
    """Ids that already have features in the finished shards of `directory`."""
    manifest = FeatureManifest.load(directory)
    return set() if manifest is None else _recorded_ids(directory, manifest)
