"""Ingest a corpus into the canonical tables, with content-derived ids and reasons for every reject."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from crossalign.config import CorpusConfig
from crossalign.corpus.accounting import Ledger, accounting_line
from crossalign.corpus.folder import BadRecord, CorpusRecord
from crossalign.corpus.formats import read_records
from crossalign.corpus.probe import ItemRejected, clean_caption, printable, probe_image, read_file_inside
from crossalign.corpus.rows import open_parquet
from crossalign.corpus.schema import CAPTIONS_SCHEMA, IMAGES_SCHEMA, REJECTS_SCHEMA
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)

ID_HEX_DIGITS = 32


@dataclass
class IngestSummary:
    """What an ingest did: small enough to pass between Prefect tasks and print."""

    corpus: str
    images: int = 0
    captions: int = 0
    rejected: int = 0
    normalised: int = 0
    added: int = 0  # images that were not in the previous ingest of this corpus
    removed: int = 0  # images of the previous ingest that are gone (reported, never silently dropped)
    removed_ids: list[str] = field(default_factory=list)  # the first 20 of them
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    normalised_by_reason: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    # {kind: {"in", "accepted", "merged", "rejected"}}: in = accepted + merged + rejected, checked every ingest
    accounting: dict[str, dict[str, int]] = field(default_factory=dict)
    images_table: str = ""
    captions_table: str = ""
    rejects_table: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class _TableWriter:
    """Rows streamed to a Parquet file in batches under a temporary name; `commit` renames it into place.

    Unchanged content leaves the existing file alone (its bytes are compared), so re-ingesting the
    same corpus rewrites nothing.
    """

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int = 16384) -> None:
        self.path, self.schema, self.batch_rows = path, schema, batch_rows
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.rows: list[dict] = []
        self.count = 0
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        if self.path.exists() and _file_digest(self.path) == _file_digest(self.tmp):
            self.tmp.unlink()
        else:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


class _Rejects:
    """The rejects table, the repairs and merges by reason, and the ledger their outcomes are counted in."""

    MERGES = {"duplicate_image_entry": "image", "duplicate_image_merged": "image",
              "duplicate_caption_dropped": "caption"}

    def __init__(self, writer: _TableWriter, ledger: Ledger) -> None:
        self.writer, self.ledger = writer, ledger
        self.by_reason: Counter[str] = Counter()
        self.normalised: Counter[str] = Counter()  # what was repaired or merged, by reason
        self.repaired_captions = 0

    def add(self, kind: str, source: str, reason: str, message: str, captions: int = 0) -> None:
        """One reject row; `captions` more captions (those of a rejected image entry) are rejected with it."""
        if captions:
            message += f" (its {captions} caption{'s' if captions > 1 else ''} not ingested)"
        logger.debug("reject %s %s: %s (%s)", kind, source, reason, message)
        self.by_reason[reason] += 1
        self.ledger.outcome("rejected", kind)
        self.ledger.outcome("rejected", "caption", captions)
        self.writer.add({"kind": kind, "source": printable(source), "reason": reason,
                         "message": printable(message, 1000)})

    def merged(self, reason: str) -> None:
        """One record merged into another (an image listed again, a caption repeated)."""
        self.normalised[reason] += 1
        self.ledger.outcome("merged", self.MERGES[reason])


class _Seen:
    """What ingest remembers per item, kept on disk (SQLite) so memory stays flat however large the corpus.

    Images: id -> (split, the entry that brought it), for dedup; captions: ids, for dedup; and the ids
    of the previous ingest, to report what was added and what is gone.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;"
            "CREATE TABLE images (id BLOB PRIMARY KEY, split TEXT NOT NULL, source TEXT NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE captions (id BLOB PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE previous (id BLOB PRIMARY KEY) WITHOUT ROWID;"
            "BEGIN;"
        )
        self.splits: Counter[str] = Counter()
        self.normalised_images = 0

    def image(self, image_id: bytes) -> tuple[str, str] | None:
        """(split, source) of an image already ingested, or None."""
        return self.db.execute("SELECT split, source FROM images WHERE id = ?", (image_id,)).fetchone()

    def add_image(self, image_id: bytes, split: str, source: str) -> None:
        self.db.execute("INSERT INTO images VALUES (?, ?, ?)", (image_id, split, source))
        self.splits[split] += 1

    def add_caption(self, caption_id: bytes) -> bool:
        """True when the caption is new."""
        return self.db.execute("INSERT OR IGNORE INTO captions VALUES (?)", (caption_id,)).rowcount == 1

    def compare_with(self, images_table: Path) -> tuple[int, int, list[str]]:
        """(added, removed, the first 20 removed ids) against the images table of the previous ingest."""
        if images_table.exists():
            for batch in open_parquet(images_table).iter_batches(columns=["image_id"], batch_size=65536):
                ids = ((bytes.fromhex(image_id),) for image_id in batch.column(0).to_pylist())
                self.db.executemany("INSERT OR IGNORE INTO previous VALUES (?)", ids)
        added = self.db.execute("SELECT COUNT(*) FROM images WHERE id NOT IN (SELECT id FROM previous)").fetchone()[0]
        gone = "FROM previous WHERE id NOT IN (SELECT id FROM images)"
        removed = self.db.execute(f"SELECT COUNT(*) {gone}").fetchone()[0]
        first = [row[0].hex() for row in self.db.execute(f"SELECT id {gone} ORDER BY id LIMIT 20")]
        return added, removed, first

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


def content_id(*parts: str | bytes) -> str:
    """A stable id from content: sha256 over the parts (separated), first 32 hex digits."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:ID_HEX_DIGITS]


def ingest_corpus(config: CorpusConfig, workspace: Workspace) -> IngestSummary:
    """Read a corpus (any format of `crossalign.corpus.formats`) into `workspace`'s canonical tables.

    `config.format="auto"` detects the format when only one fits. Images embedded in the corpus (tar shards,
    Parquet bytes) are stored once under `corpora/<corpus>/blobs/`. Flickr images that the format's
    split lists do not name go to split `config.unlisted_split`.

    Images get ids from their bytes, so the same corpus always yields the same tables and duplicate
    files collapse into one image with the captions of both. Anything unusable (an unreadable path, a
    broken image, a malformed line) is written to the rejects table with a reason code; it never stops
    the ingest. Every input record is accounted for: `summary.accounting` holds, per kind, the records
    in and how many were accepted, merged and rejected, and the two sides must balance.

    Ingest streams: records are read one at a time and rows go to the tables in batches, in input
    order; what it must remember per item (ids for dedup and for the added/removed report) it keeps
    in a SQLite file beside the tables, deleted at the end, so memory does not grow with the corpus.

    Returns:
        An `IngestSummary` with counts and the table paths.

    Raises:
        CorpusConfigError: the root or the captions file is missing.
        IngestAccountingError: the ledger does not balance (a bug; nothing is committed).
    """
    root, corpus = Path(config.root).expanduser().resolve(), config.corpus_name
    records = read_records(root, config)  # config errors raise here, before any work
    workspace.corpus_dir(corpus).mkdir(parents=True, exist_ok=True)
    writers = {
        "images": _TableWriter(workspace.images_table(corpus), IMAGES_SCHEMA),
        "captions": _TableWriter(workspace.captions_table(corpus), CAPTIONS_SCHEMA),
        "rejects": _TableWriter(workspace.rejects_table(corpus), REJECTS_SCHEMA),
    }
    ledger = Ledger()
    rejects = _Rejects(writers["rejects"], ledger)
    seen = _Seen(workspace.corpus_dir(corpus) / f".ingest-index-{os.getpid()}.sqlite")
    blobs = workspace.corpus_dir(corpus) / "blobs"
    try:
        for record in records:
            if isinstance(record, BadRecord):
                ledger.read("record")
                rejects.add("record", record.source or f"{config.captions_file}:{record.line}", record.reason,
                            record.message)
                continue
            ledger.read("image")
            ledger.read("caption", len(record.captions))
            image = _ingest_image(root, record, seen, writers["images"], rejects, config.max_pixels, blobs)
            if image is None:
                continue
            for text in record.captions:
                _ingest_caption(image, record.image, text, seen, writers["captions"], rejects, config.max_caption_chars)
        return _finish(workspace, corpus, writers, seen, rejects)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        seen.close()


def _ingest_image(
    root: Path, record: CorpusRecord, seen: _Seen, images: _TableWriter, rejects: _Rejects, max_pixels: int,
    blobs: Path,
) -> tuple[str, str] | None:
    """Read, probe, hash and (once per content) write the image of `record`; returns (image_id, split) or None.

    A failure of this one item (its path, its file, its bytes) becomes a reject row with its captions.
    """
    try:
        split = _check_split(record.split)
        if record.data is None:
            path, data = read_file_inside(root, record.image)  # read once: probed and hashed
        else:
            path, data = None, record.data
        width, height, image_format, steps = probe_image(data, record.image, max_pixels)
    except ItemRejected as err:
        rejects.add("image", record.image, err.reason, err.message, captions=len(record.captions))
        return None
    digest = hashlib.sha256(data).digest()
    image_id, key = digest.hex()[:ID_HEX_DIGITS], digest[: ID_HEX_DIGITS // 2]
    existing = seen.image(key)
    if existing is not None:
        kept_split, source = existing
        if kept_split != split:
            rejects.add("image", record.image, "duplicate_in_other_split",
                        f"same bytes as {source} (split {kept_split}): kept there only", captions=len(record.captions))
            return None
        same_entry = source == record.image
        logger.info("%s %s: captions merged", printable(record.image), "is listed again" if same_entry else
                    f"has the same bytes as {printable(source)}")
        rejects.merged("duplicate_image_entry" if same_entry else "duplicate_image_merged")
        return image_id, split
    if path is None:
        path = blobs / f"{image_id}.{image_format.lower()}"
        if not path.exists():
            blobs.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    seen.add_image(key, split, printable(record.image))
    seen.normalised_images += bool(steps)
    rejects.normalised.update(steps)
    images.add({
        "image_id": image_id, "uri": str(path), "sha256": digest.hex(),
        "width": width, "height": height, "split": split,
        "status": "normalised:" + ",".join(steps) if steps else "ok",
    })
    return image_id, split


def _check_split(split: str) -> str:
    """A split name fit for the tables: printable UTF-8 text, at most 100 characters."""
    if printable(split, 101) != split or len(split) > 100 or not split.isprintable() or not split.strip():
        raise ItemRejected("bad_split", f"split name {printable(split, 60)!r} is not a short printable text")
    return split


def _ingest_caption(
    image: tuple[str, str], source: str, text: object, seen: _Seen, captions: _TableWriter, rejects: _Rejects,
    max_chars: int,
) -> None:
    """Add one caption of `image`: a row, a merge into the same caption already there, or a reject."""
    image_id, split = image
    try:
        clean, repairs = clean_caption(text, max_chars)
    except ItemRejected as err:
        rejects.add("caption", f"{printable(source)}: {text!r}", err.reason, err.message)
        return
    rejects.normalised.update(repairs)
    rejects.repaired_captions += bool(repairs)
    caption_id = content_id(image_id, clean)
    if not seen.add_caption(bytes.fromhex(caption_id)):  # the same caption twice for one image is kept once
        rejects.merged("duplicate_caption_dropped")
    else:
        captions.add({"caption_id": caption_id, "image_id": image_id, "text": clean, "split": split})


def _finish(
    workspace: Workspace, corpus: str, writers: dict[str, _TableWriter], seen: _Seen, rejects: _Rejects,
) -> IngestSummary:
    rejects.ledger.outcome("accepted", "image", writers["images"].count)
    rejects.ledger.outcome("accepted", "caption", writers["captions"].count)
    accounting = rejects.ledger.check()  # before anything is committed: a lost record is a bug
    added, removed, removed_ids = seen.compare_with(workspace.images_table(corpus))
    if removed:
        logger.warning("%d images of the previous ingest of %s are gone from the corpus (first: %s)",
                       removed, corpus, removed_ids[0])
    for writer in writers.values():
        writer.commit()
    summary = IngestSummary(
        corpus=corpus,
        images=writers["images"].count,
        added=added,
        removed=removed,
        removed_ids=removed_ids,
        captions=writers["captions"].count,
        rejected=writers["rejects"].count,
        normalised=rejects.repaired_captions + seen.normalised_images,
        rejects_by_reason=dict(rejects.by_reason),
        normalised_by_reason={reason: n for reason, n in sorted(rejects.normalised.items()) if n},
        splits=dict(seen.splits),
        accounting=accounting,
        images_table=str(workspace.images_table(corpus)),
        captions_table=str(workspace.captions_table(corpus)),
        rejects_table=str(workspace.rejects_table(corpus)),
    )
    logger.info(
        "ingested %s: %d images, %d captions, %d rejected %s; splits %s; %s",
        corpus, summary.images, summary.captions, summary.rejected, summary.rejects_by_reason, summary.splits,
        accounting_line(accounting),
    )
    return summary


def read_images(workspace: Workspace, corpus: str, split: str | None = None) -> pa.Table:
    """The `images` table of an ingested corpus, optionally one split only."""
    return _read_table(workspace.images_table(corpus), split)


def read_captions(workspace: Workspace, corpus: str, split: str | None = None) -> pa.Table:
    """The `captions` table of an ingested corpus, optionally one split only."""
    return _read_table(workspace.captions_table(corpus), split)


def _read_table(path: Path, split: str | None) -> pa.Table:
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist: ingest the corpus first")
    filters = [("split", "=", split)] if split is not None else None
    return pq.read_table(path, filters=filters)


def first_captions(workspace: Workspace, corpus: str, split: str, images: int = 3) -> list[str]:
    """One caption each of the first `images` images of a split (sample queries for reports)."""
    captions = read_captions(workspace, corpus, split)
    firsts: dict[str, str] = {}
    for image_id, text in zip(captions.column("image_id").to_pylist(), captions.column("text").to_pylist()):
        firsts.setdefault(image_id, text)
        if len(firsts) == images:
            break
    return list(firsts.values())
