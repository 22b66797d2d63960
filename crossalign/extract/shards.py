"""Parquet feature shards: written under a temporary name, renamed when complete, then recorded."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossalign.extract.manifest import FeatureManifest
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

    A shard is first written as `.part-NNNNN.parquet.tmp`, renamed, and only then recorded in the
    manifest. A shard file that was renamed but not recorded (killed in between) is overwritten by the
    next shard of the same number, so no row is ever stored twice.
    """

    def __init__(self, directory: Path, manifest: FeatureManifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # held while the manifest changes: shards may be written from a thread
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written shards left by processes that are gone (a killed run)."""
        for tmp in self.directory.glob(".part-*.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                tmp.unlink(missing_ok=True)

    def write(self, ids: list[str], vectors: np.ndarray) -> Path:
        """Write one complete shard and record it; returns its path."""
        if vectors.shape != (len(ids), self.manifest.dim):
            raise ValueError(f"shard vectors have shape {vectors.shape}, expected ({len(ids)}, {self.manifest.dim})")
        name = self.manifest.next_shard_name()
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), vectors_to_arrow(vectors)],
                                     schema=features_schema(self.manifest.dim))
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        with self.lock:
            self.manifest.shards.append({"file": name, "rows": len(ids)})
            self.manifest.save(self.directory)
        return final


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
    manifest = FeatureManifest.load(directory)
    if manifest is None:
        raise WorkspaceError(f"no features in {directory}: run extraction first")
    tables = [pq.read_table(Path(directory) / shard["file"]) for shard in manifest.shards]
    table = pa.concat_tables(tables) if tables else features_schema(manifest.dim).empty_table()
    all_ids = table.column("id").to_pylist()
    vectors = arrow_to_vectors(table.column("vector"), manifest.dim)
    if ids is None:
        return all_ids, vectors
    position = {item: i for i, item in enumerate(all_ids)}
    missing = [item for item in ids if item not in position]
    if missing:
        raise WorkspaceError(f"{len(missing)} ids have no features in {directory} (first: {missing[0]}): extract first")
    return list(ids), vectors[[position[item] for item in ids]]


def done_ids(directory: Path) -> set[str]:
    """Ids that already have features in the finished shards of `directory`."""
    manifest = FeatureManifest.load(directory)
    if manifest is None:
        return set()
    done: set[str] = set()
    for shard in manifest.shards:
        done.update(pq.read_table(Path(directory) / shard["file"], columns=["id"]).column("id").to_pylist())
    return done
