"""Ingest a corpus into the canonical tables, with content-derived ids and reasons for every reject."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from crossalign.corpus.folder import BadRecord, CorpusRecord, has_invalid_utf8
from crossalign.corpus.formats import ReaderOptions, read_records
from crossalign.corpus.schema import CAPTIONS_SCHEMA, IMAGES_SCHEMA, REJECTS_SCHEMA
from crossalign.imaging import normalisation_steps
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
    images_table: str = ""
    captions_table: str = ""
    rejects_table: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class _Rejects:
    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []
        self.normalised: Counter[str] = Counter()  # what was repaired or merged, by reason

    def add(self, kind: str, source: str, reason: str, message: str) -> None:
        logger.debug("reject %s %s: %s (%s)", kind, source, reason, message)
        self.rows.append({"kind": kind, "source": source, "reason": reason, "message": message})


def content_id(*parts: str | bytes) -> str:
    """A stable id from content: sha256 over the parts (separated), first 32 hex digits."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:ID_HEX_DIGITS]


def _resolve_inside(root: Path, relative: str) -> Path | None:
    """The real path of `relative` under `root`, or None when it escapes the root (../, absolute, symlink)."""
    if os.path.isabs(relative):
        return None
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) else None


def _probe_image(data: bytes, max_pixels: int) -> tuple[int, int, str, list[str]]:
    """Check an image cheaply: header, pixel count, then a reduced-size decode (JPEG draft mode).

    Returns:
        (width, height, format, the normalisation steps it will need).

    Raises:
        ValueError: with a reject reason code as its first argument.
    """
    if not data:
        raise ValueError("empty_file", "file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:  # before any pixel is decoded
                    raise ValueError("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
                image_format, steps = img.format or "unknown", normalisation_steps(img)
                img.draft("RGB", (64, 64))  # decode at reduced size: catches truncation cheaply
                img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError("not_an_image", str(err)) from err
    except OSError as err:
        raise ValueError("undecodable", str(err)) from err
    return width, height, image_format, steps


def _clean_caption(text: object, max_chars: int) -> tuple[str | None, str | None]:
    """Return (caption, None), or (None, reason) for an unusable caption. Long captions are truncated."""
    if not isinstance(text, str):
        return None, "caption_not_text"
    if has_invalid_utf8(text):
        return None, "caption_not_utf8"
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text:
        return None, "empty_caption"
    return text[:max_chars], None


def ingest_corpus(
    root: Path,
    workspace: Workspace,
    corpus: str | None = None,
    captions_file: str = "captions.jsonl",
    default_split: str = "train",
    max_pixels: int = 40_000_000,
    max_caption_chars: int = 1000,
    fmt: str = "auto",
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str = "split",
) -> IngestSummary:
    """Read a corpus (any format of `crossalign.corpus.formats`) into `workspace`'s canonical tables.

    `fmt="auto"` detects the format when only one fits. Images embedded in the corpus (tar shards,
    Parquet bytes) are stored once under `corpora/<corpus>/blobs/`.

    Images get ids from their bytes, so the same corpus always yields the same tables and duplicate
    files collapse into one image with the captions of both. Anything unusable is written to the
    rejects table with a reason code; it never stops the ingest.

    Returns:
        An `IngestSummary` with counts and the table paths.

    Raises:
        CorpusConfigError: the root or the captions file is missing.
    """
    root = Path(root).expanduser().resolve()
    corpus = corpus or root.name
    rejects = _Rejects()
    images: dict[str, dict] = {}
    captions: dict[str, dict] = {}
    normalised = 0
    options = ReaderOptions(captions_file, default_split, image_column, caption_column, split_column)
    blobs = workspace.corpus_dir(corpus) / "blobs"
    for record in read_records(root, fmt, options):
        if isinstance(record, BadRecord):
            rejects.add("record", record.source or f"{captions_file}:{record.line}", record.reason, record.message)
            continue
        image = _ingest_image(root, record, images, rejects, max_pixels, blobs)
        if image is None:
            continue
        for text in record.captions:
            normalised += _ingest_caption(image, text, captions, rejects, max_caption_chars)
    return _write_tables(workspace, corpus, images, captions, rejects, normalised)


def _ingest_image(
    root: Path, record: CorpusRecord, images: dict[str, dict], rejects: _Rejects, max_pixels: int, blobs: Path
) -> dict | None:
    if record.data is None:
        path = _resolve_inside(root, record.image)
        if path is None:
            rejects.add("image", record.image, "path_outside_root", f"path escapes the corpus root {root}")
            return None
        if not path.is_file():
            rejects.add("image", record.image, "missing_file", f"no file at {path}")
            return None
    data = path.read_bytes() if record.data is None else record.data  # read once: probed and hashed
    try:
        width, height, image_format, steps = _probe_image(data, max_pixels)
    except ValueError as err:
        reason, message = err.args
        rejects.add("image", record.image, reason, message)
        return None
    sha = hashlib.sha256(data).hexdigest()
    image_id = sha[:ID_HEX_DIGITS]
    if record.data is not None and image_id not in images:
        path = blobs / f"{image_id}.{image_format.lower()}"
        if not path.exists():
            blobs.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(record.data)
            os.replace(tmp, path)
    existing = images.get(image_id)
    if existing is not None:
        if existing["split"] != record.split:
            rejects.add(
                "image", record.image, "duplicate_in_other_split",
                f"same bytes as {existing['uri']} (split {existing['split']}): kept there only",
            )
            return None
        logger.info("%s has the same bytes as %s: captions merged", record.image, existing["uri"])
        rejects.normalised["duplicate_image_merged"] += 1
        return existing
    rejects.normalised.update(steps)
    images[image_id] = {
        "image_id": image_id, "uri": str(path), "sha256": sha,
        "width": width, "height": height, "split": record.split,
        "status": "normalised:" + ",".join(steps) if steps else "ok",
    }
    return images[image_id]


def _ingest_caption(image: dict, text: object, captions: dict[str, dict], rejects: _Rejects, max_chars: int) -> int:
    """Add one caption of `image`; returns 1 when it had to be normalised (truncated), else 0."""
    clean, reason = _clean_caption(text, max_chars)
    if clean is None:
        messages = {"caption_not_utf8": "caption is not valid UTF-8", "empty_caption": "caption is empty",
                    "caption_not_text": "caption is not text"}
        rejects.add("caption", f"{image['uri']}: {text!r}"[:300], reason, messages[reason])
        return 0
    caption_id = content_id(image["image_id"], clean)
    if caption_id in captions:  # the same caption twice for one image is kept once
        rejects.normalised["duplicate_caption_dropped"] += 1
    else:
        captions[caption_id] = {
            "caption_id": caption_id, "image_id": image["image_id"], "text": clean, "split": image["split"],
        }
    truncated = len(" ".join(str(text).split())) > max_chars
    rejects.normalised["caption_truncated"] += truncated
    return int(truncated)


def _write_tables(
    workspace: Workspace, corpus: str, images: dict[str, dict], captions: dict[str, dict],
    rejects: _Rejects, normalised: int,
) -> IngestSummary:
    workspace.corpus_dir(corpus).mkdir(parents=True, exist_ok=True)
    image_rows = sorted(images.values(), key=lambda row: row["image_id"])
    caption_rows = sorted(captions.values(), key=lambda row: (row["image_id"], row["caption_id"]))
    before = _previous_ids(workspace.images_table(corpus))
    removed = sorted(before - images.keys())
    if removed:
        logger.warning("%d images of the previous ingest of %s are gone from the corpus (first: %s)",
                       len(removed), corpus, removed[0])
    _write_parquet(workspace.images_table(corpus), image_rows, IMAGES_SCHEMA)
    _write_parquet(workspace.captions_table(corpus), caption_rows, CAPTIONS_SCHEMA)
    _write_parquet(workspace.rejects_table(corpus), rejects.rows, REJECTS_SCHEMA)
    summary = IngestSummary(
        corpus=corpus,
        images=len(image_rows),
        added=len(images.keys() - before),
        removed=len(removed),
        removed_ids=removed[:20],
        captions=len(caption_rows),
        rejected=len(rejects.rows),
        normalised=normalised + sum(row["status"] != "ok" for row in image_rows),
        rejects_by_reason=dict(Counter(row["reason"] for row in rejects.rows)),
        normalised_by_reason={reason: n for reason, n in sorted(rejects.normalised.items()) if n},
        splits=dict(Counter(row["split"] for row in image_rows)),
        images_table=str(workspace.images_table(corpus)),
        captions_table=str(workspace.captions_table(corpus)),
        rejects_table=str(workspace.rejects_table(corpus)),
    )
    logger.info(
        "ingested %s: %d images, %d captions, %d rejected %s",
        corpus, summary.images, summary.captions, summary.rejected, summary.rejects_by_reason,
    )
    return summary


def _previous_ids(images_table: Path) -> set[str]:
    if not images_table.exists():
        return set()
    return set(pq.read_table(images_table, columns=["image_id"]).column("image_id").to_pylist())


def _write_parquet(path: Path, rows: Iterable[dict], schema: pa.Schema) -> None:
    """Write rows atomically; unchanged content leaves the existing file alone (idempotent re-ingest)."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    if path.exists() and pq.read_table(path).equals(table):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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
