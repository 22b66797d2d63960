"""A split's paired features as files, written once chunk by chunk: what training reads by row.

Training draws random batches of (image, caption) rows for a thousand steps and more; the feature
shards are stored in extraction order and located by id, so reading them per batch would cost a shard
read per row. Instead the split is laid out once, in a directory of the workspace's cache::

    images.f32 / captions.f32     raw float32 rows (`RowFile`), in the split's row order
    caption_image.npy             int32: each caption's image row
    image_ids.arrow / caption_ids.arrow   the rows' ids (Arrow IPC, in batches of `ID_BATCH`)
    split.json                    counts, dims and both encoders' descriptions

Every pass holds a chunk at a time: the corpus tables are read in record batches of their id columns,
the features with `FeatureSet.read` `chunk_rows(dim)` ids at a time. The one per-row structure held
whole is the join of captions to images, as 64-bit hashes of the image ids (two independent SipHash
keys: 16 bytes per image, 4 per caption, against ~64 per id string and ~100 per Python str), so a
10M-pair split joins in ~250 MB. Rows follow the corpus tables' order and the old rule: images whose
features failed, and images without a caption, are left out (with their captions).

The directory is named by a digest of what it is made from (the corpus tables' size and mtime, the
encoders' descriptions, the failed ids), written under a temporary name and renamed when complete,
and built under a workspace lock: a rerun reuses it, a changed corpus or encoder builds a new one and
removes the stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crossalign.align.rows import RowFile, RowWriter, chunk_rows
from crossalign.corpus.rows import open_parquet
from crossalign.extract.features import FeatureSet
from crossalign.workspace import Workspace, WorkspaceError

ID_BATCH = 65_536
CACHE_FORMAT = 1
_HASH_KEYS = ("crossalign-split", "join-image-ids!")  # two independent 64-bit SipHash keys (16 bytes each)


class IdColumn:
    """The ids of a split's rows, read from an Arrow IPC file one record batch (`ID_BATCH` rows) at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with pa.OSFile(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            self._batches = reader.num_record_batches
            # batches hold ID_BATCH rows each but the last (`_IdWriter`): only the last one is read here
            last = reader.get_batch(self._batches - 1).num_rows if self._batches else 0
            self._n = max(0, self._batches - 1) * ID_BATCH + last

    def __len__(self) -> int:
        return self._n

    def batches(self) -> Iterator[pa.StringArray]:
        """The ids in row order, `ID_BATCH` at a time."""
        with pa.OSFile(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(self._batches):
                yield reader.get_batch(i).column(0)

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of `rows`, in that order (reads each record batch that holds one of them, once)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list[str | None] = [None] * len(rows)
        which = rows // ID_BATCH
        with pa.OSFile(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for batch in np.unique(which):
                at = np.flatnonzero(which == batch)
                ids = reader.get_batch(int(batch)).column(0).take(pa.array(rows[at] - batch * ID_BATCH))
                for position, value in zip(at.tolist(), ids.to_pylist()):
                    out[position] = value
        return out  # type: ignore[return-value]

    def __getitem__(self, block: slice) -> list[str]:
        return self.take(np.arange(*block.indices(self._n)))

    def to_list(self) -> list[str]:
        return [value for batch in self.batches() for value in batch.to_pylist()]


class _IdWriter:
    def __init__(self, path: Path) -> None:
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, pa.schema([("id", pa.string())]))
        self._pending: list[pa.Array] = []
        self._count = 0
        self.rows = 0

    def write(self, ids: pa.Array) -> None:
        self._pending.append(ids)
        self._count += len(ids)
        self.rows += len(ids)
        while self._count >= ID_BATCH:  # fixed-size batches: row r lies in batch r // ID_BATCH
            merged = pa.concat_arrays(self._pending)
            self._writer.write_batch(pa.record_batch([merged.slice(0, ID_BATCH)], names=["id"]))
            rest = merged.slice(ID_BATCH)
            self._pending, self._count = [rest], len(rest)

    def close(self) -> None:
        if self._count:
            self._writer.write_batch(pa.record_batch([pa.concat_arrays(self._pending)], names=["id"]))
        self._writer.close()
        self._sink.close()


def split_cache_dir(workspace: Workspace, corpus: str, split: str, image_features: FeatureSet,
                    text_features: FeatureSet) -> Path:
    """Where the split's cache lives: `cache/splits/<corpus>/<split>-<encoders digest>-<data digest>`."""
    encoders = _digest([image_features.encoder, text_features.encoder])
    tables = [workspace.images_table(corpus), workspace.captions_table(corpus)]
    data = _digest([CACHE_FORMAT, [[t.stat().st_size, t.stat().st_mtime_ns] for t in tables if t.exists()],
                    sorted(image_features.failed)])
    return workspace.root / "cache" / "splits" / _safe(corpus) / f"{_safe(split)}-{encoders}-{data}"


def build_split(workspace: Workspace, corpus: str, split: str, image_features: FeatureSet,
                text_features: FeatureSet, directory: Path) -> None:
    """Write the split's cache to `directory` (which must not exist), chunk by chunk (see the module doc).

    Raises:
        WorkspaceError: the corpus was not ingested, the split has no images or no captions, or some
            features are missing (extract first).
    """
    directory.mkdir(parents=True)
    failed = pa.array(sorted(image_features.failed), pa.string())
    candidates = _IdWriter(directory / "candidates.arrow")
    hashes: list[tuple[np.ndarray, np.ndarray]] = []
    split_images = 0
    for ids in _split_column(workspace.images_table(corpus), split, "image_id"):
        split_images += len(ids)
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=failed))) if len(failed) else ids
        candidates.write(ids)
        hashes.append(_id_hashes(ids))
    candidates.close()
    order, first, second = _sorted_hashes(hashes)
    del hashes
    caption_ids, positions = _IdWriter(directory / "caption_ids.arrow"), []
    split_captions = 0
    for batch in _split_batches(workspace.captions_table(corpus), split, ["caption_id", "image_id"]):
        split_captions += batch.num_rows
        found = _lookup(order, first, second, batch.column("image_id"))
        kept = found >= 0
        caption_ids.write(batch.column("caption_id").filter(pa.array(kept)))
        positions.append(found[kept])
    caption_ids.close()
    if split_images == 0 or split_captions == 0:
        raise WorkspaceError(f"split {split!r} of corpus {corpus!r} has no images or no captions")
    del order, first, second
    caption_position = np.concatenate(positions) if positions else np.empty(0, np.int32)
    captioned = np.bincount(caption_position, minlength=len(IdColumn(directory / "candidates.arrow"))) > 0
    new_row = (np.cumsum(captioned, dtype=np.int64) - 1).astype(np.int32)
    np.save(directory / "caption_image.npy", new_row[caption_position])
    image_ids = _IdWriter(directory / "image_ids.arrow")
    for start, ids in _starts(IdColumn(directory / "candidates.arrow").batches()):
        image_ids.write(ids.filter(pa.array(captioned[start:start + len(ids)])))
    image_ids.close()
    (directory / "candidates.arrow").unlink()
    dims = [_write_features(IdColumn(directory / f"{name}_ids.arrow"), features, directory / f"{name}s.f32")
            for name, features in (("image", image_features), ("caption", text_features))]
    meta = {"format": CACHE_FORMAT, "corpus": corpus, "split": split, "images": image_ids.rows,
            "captions": caption_ids.rows, "image_dim": dims[0], "text_dim": dims[1],
            "image_encoder": image_features.encoder, "text_encoder": text_features.encoder}
    (directory / "split.json").write_text(json.dumps(meta, indent=1))


def open_split_files(directory: Path) -> dict[str, Any]:
    """The parts of a built split directory: rows, pairing, ids and its `split.json`."""
    meta = json.loads((directory / "split.json").read_text())
    return {"meta": meta, "images": RowFile(directory / "images.f32", meta["image_dim"]),
            "captions": RowFile(directory / "captions.f32", meta["text_dim"]),
            "caption_image": np.load(directory / "caption_image.npy"),
            "image_ids": IdColumn(directory / "image_ids.arrow"),
            "caption_ids": IdColumn(directory / "caption_ids.arrow")}


def ensure_split(workspace: Workspace, corpus: str, split: str, image_features: FeatureSet,
                 text_features: FeatureSet) -> Path:
    """The split's cache directory, built first if missing (under a workspace lock; stale siblings removed)."""
    directory = split_cache_dir(workspace, corpus, split, image_features, text_features)
    if (directory / "split.json").exists():
        return directory
    with workspace.lock(f"split-cache-{corpus}"):
        if (directory / "split.json").exists():
            return directory
        staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build_split(workspace, corpus, split, image_features, text_features, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stale_prefix = directory.name.rsplit("-", 1)[0] + "-"
        for sibling in directory.parent.iterdir():  # same split and encoders, older data
            if sibling.name.startswith(stale_prefix) and sibling != staging:
                shutil.rmtree(sibling, ignore_errors=True)
        staging.rename(directory)
    return directory


def _write_features(ids: IdColumn, features: FeatureSet, path: Path) -> int:
    dim = int(getattr(features, "dim", None) or features.encoder["dim"])
    writer, step = RowWriter(path, dim), chunk_rows(dim)
    for batch in ids.batches():
        for start in range(0, len(batch), step):
            _, vectors = features.read(batch.slice(start, step).to_pylist())
            writer.write(vectors)
    writer.close()
    return dim


def _split_batches(path: Path, split: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist: ingest the corpus first")
    for batch in open_parquet(path).iter_batches(batch_size=ID_BATCH, columns=[*columns, "split"]):
        yield batch.filter(pc.equal(batch.column("split"), split))


def _split_column(path: Path, split: str, column: str) -> Iterator[pa.Array]:
    for batch in _split_batches(path, split, [column]):
        yield batch.column(column)


def _id_hashes(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    from pandas.util import hash_array

    values = ids.to_numpy(zero_copy_only=False).astype(object)
    return tuple(hash_array(values, hash_key=key.ljust(16)[:16], categorize=False) for key in _HASH_KEYS)


def _sorted_hashes(hashes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each sorted hash, first hashes sorted, second hashes in that order); duplicate ids refused."""
    first = np.concatenate([h[0] for h in hashes]) if hashes else np.empty(0, np.uint64)
    order = np.argsort(first, kind="stable").astype(np.int32)
    first = first[order]
    second = np.concatenate([h[1] for h in hashes])[order] if hashes else np.empty(0, np.uint64)
    if len(first) > 1 and (np.diff(first) == 0).any():  # the same id twice (a 64-bit collision: ~N²/2⁶⁵)
        raise WorkspaceError("the images table holds an image id twice (or two ids share a 64-bit hash)")
    return order, first, second


def _lookup(order: np.ndarray, first: np.ndarray, second: np.ndarray, ids: pa.Array) -> np.ndarray:
    """The candidate row of each id (int32), -1 where it is not one: both hashes must match."""
    if len(first) == 0:
        return np.full(len(ids), -1, np.int32)
    h1, h2 = _id_hashes(ids)
    at = np.minimum(np.searchsorted(first, h1), len(first) - 1)
    return np.where((first[at] == h1) & (second[at] == h2), order[at], -1).astype(np.int32)


def _starts(batches: Iterator[pa.Array]) -> Iterator[tuple[int, pa.Array]]:
    start = 0
    for batch in batches:
        yield start, batch
        start += len(batch)


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "_"
