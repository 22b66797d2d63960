"""Corpus readers by format: each yields `CorpusRecord`s (an image with its captions) or `BadRecord`s.

Formats:
    jsonl       folder + captions.jsonl ({"image", "captions" | "caption", "split"})
    csv, tsv    folder + a table, one caption per row or a list per image (columns configurable)
    parquet     folder + a Parquet table like csv; or images embedded as bytes (img2dataset's `jpg`
                column, a Hugging Face `image` struct of bytes/path)
    flickr      Flickr8k/30k: `*.token.txt` (`name.jpg#N<TAB>caption`) or Flickr30k `results.csv`,
                with the split lists (`Flickr_8k.trainImages.txt` ...) when present
    coco        `captions_<split><year>.json` next to the image folders
    webdataset  `*.tar` shards as img2dataset writes them (`key.jpg` + `key.txt` [+ `key.json`])

Text files are read as UTF-8 with an optional byte-order mark (CRLF or LF); a corpus file that
resolves outside the root is refused, unread. A reader yields a BadRecord for every input record it
cannot use, so that ingest can account for all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from crossalign.config import CORPUS_FORMATS, CorpusConfig
from crossalign.corpus.folder import (
    TEXT_ENCODING,
    BadRecord,
    CorpusConfigError,
    CorpusRecord,
    inside_root,
    read_jsonl_records,
)
from crossalign.corpus.rows import open_parquet

FORMATS = CORPUS_FORMATS  # "auto" aside: it picks one of these
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
Record = CorpusRecord | BadRecord


def detect_format(root: Path, options: CorpusConfig) -> str:
    """The format of the corpus at `root`, when only one fits.

    Raises:
        CorpusConfigError: no format fits, or several do (then `--format` must say which).
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusConfigError(f"corpus root {root} is not a readable directory")
    found = []
    captions = root / options.captions_file
    if captions.is_file():
        suffix = captions.suffix.lower().lstrip(".")
        found.append({"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "tsv": "tsv", "parquet": "parquet"}.get(
            suffix, "jsonl"))
    else:  # the captions file under the same name as a table (captions.csv, captions.tsv)
        found += [fmt for fmt in ("csv", "tsv") if (root / f"{captions.stem}.{fmt}").is_file()]
    if list(root.glob("*.token.txt")) or (root / "results.csv").is_file():
        found.append("flickr")
    if list(root.glob("captions_*.json")) or list(root.glob("annotations/captions_*.json")):
        found.append("coco")
    if list(root.glob("*.tar")):
        found.append("webdataset")
    if not captions.is_file() and list(root.glob("*.parquet")):
        found.append("parquet")
    if len(found) != 1:
        what = ("several formats fit (" + ", ".join(found) + ")" if found else
                f"no captions file {options.captions_file} and no other known corpus layout")
        raise CorpusConfigError(f"{root}: {what}; pass the format explicitly, one of: {', '.join(FORMATS)}")
    return found[0]


def read_records(root: Path, options: CorpusConfig) -> Iterator[Record]:
    """Records of the corpus at `root` (`options.root`, resolved by the caller) in format `options.format`
    ("auto" detects it), read as `options` says (captions file, column names, default split).

    Raises:
        CorpusConfigError: unknown format, or the files the format needs are missing.
    """
    root = Path(root)
    fmt = detect_format(root, options) if options.format == "auto" else options.format
    if fmt not in _READERS:
        raise CorpusConfigError(f"unknown corpus format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
    return _READERS[fmt](root, options)


def _read_jsonl(root: Path, options: CorpusConfig) -> Iterator[Record]:
    return read_jsonl_records(root, options.captions_file, options.default_split)


def _table_file(root: Path, options: CorpusConfig, suffix: str) -> Path:
    path = root / options.captions_file
    if path.suffix.lower() != f".{suffix}" and (root / f"{path.stem}.{suffix}").is_file():
        path = root / f"{path.stem}.{suffix}"
    if path.suffix.lower() != f".{suffix}":
        candidates = sorted(root.glob(f"*.{suffix}"))
        if len(candidates) != 1:
            raise CorpusConfigError(f"{root}: name the {suffix} captions file (captions_file); found "
                                    f"{len(candidates)} *.{suffix} files")
        path = candidates[0]
    if not path.is_file():
        raise CorpusConfigError(f"captions file {path} not found")
    inside_root(root, path)  # or raises
    return path


def _read_table(root: Path, options: CorpusConfig, fmt: str) -> Iterator[Record]:
    from crossalign.corpus.delimited import read_delimited

    path = _table_file(root, options, fmt)
    if fmt != "parquet":
        yield from _group_rows(read_delimited(path, "\t" if fmt == "tsv" else ","), options, path)
        return
    parquet = open_parquet(path)  # batch by batch, in bounded memory: image bytes included
    names = parquet.schema_arrow.names
    embedded = _embedded_column(parquet.schema_arrow)
    caption_column = _caption_column(names, options)
    if embedded is not None:  # image bytes inside: streamed in small batches, never loaded whole
        yield from _embedded_rows(parquet, embedded, path, caption_column, options)
        return
    _check_columns(path, names, [options.image_column, caption_column])
    wanted = [c for c in (options.image_column, caption_column, options.split_column) if c in names]
    rows = (row for batch in parquet.iter_batches(batch_size=4096, columns=wanted) for row in batch.to_pylist())
    yield from _group_rows(enumerate(rows, start=2), options, path)


def _group_rows(rows: Iterator[tuple[int, dict] | BadRecord], options: CorpusConfig, path: Path) -> Iterator[Record]:
    """One record per run of consecutive rows naming the same image (streamed: a row naming it again later
    is another entry of that image, which ingest merges with a reason).

    Raises:
        CorpusConfigError: the rows lack the image or caption column.
    """
    current: CorpusRecord | None = None
    caption_column = None
    for item in rows:
        if isinstance(item, BadRecord):
            yield item
            continue
        line, row = item
        if caption_column is None:  # the first row shows the columns
            caption_column = _caption_column(list(row), options)
            _check_columns(path, list(row), [options.image_column, caption_column])
        image, caption = row.get(options.image_column), row.get(caption_column)
        if not isinstance(image, str) or not image:
            yield BadRecord(line, f"row has no {options.image_column!r} path", source=f"{path.name}:{line}")
            continue
        split = str(row.get(options.split_column) or options.default_split)
        if current is None or current.image != image or current.split != split:
            if current is not None:
                yield current
            current = CorpusRecord(line=line, image=image, captions=[], split=split)
        current.captions.extend(_texts(caption))
    if current is not None:
        yield current


def _caption_column(names: list[str], options: CorpusConfig) -> str:
    """The caption column: as configured, or its plural (a list of captions per image)."""
    if options.caption_column not in names and f"{options.caption_column}s" in names:
        return f"{options.caption_column}s"
    return options.caption_column


def _check_columns(path: Path, names: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise CorpusConfigError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, names))}); "
                                "set image_column / caption_column")


def _texts(caption: object) -> list[object]:
    """One caption or a list of them (a Parquet list column arrives as an array)."""
    return list(caption) if hasattr(caption, "__len__") and not isinstance(caption, str) else [caption]


def _embedded_column(schema) -> str | None:
    """The column holding image bytes: img2dataset's `jpg`/`png`/`webp`, or an `image` struct with bytes."""
    import pyarrow as pa

    for name in ("jpg", "png", "webp", "image"):
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return name
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return name
    return None


def _embedded_rows(parquet, column: str, path: Path, caption_column: str, options: CorpusConfig,
                   batch_rows: int = 256) -> Iterator[Record]:
    names = parquet.schema_arrow.names
    text_column = next((c for c in (caption_column, "text", "caption") if c in names), None)
    wanted = [c for c in (column, text_column, options.split_column, "key") if c is not None and c in names]
    line = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
        for row in batch.to_pylist():
            line += 1
            value = row[column]
            data = value.get("bytes") if isinstance(value, dict) else value
            name = (value.get("path") if isinstance(value, dict) else None) or str(row.get("key") or line)
            if not isinstance(data, bytes):
                yield BadRecord(line, f"row has no image bytes in column {column!r}", reason="missing_file",
                                source=f"{path.name}#{name}")
                continue
            split = str(row.get(options.split_column) or options.default_split)
            texts = _texts(row.get(text_column)) if text_column else []
            yield CorpusRecord(line=line, image=f"{path.name}#{name}", captions=texts, split=split, data=data)


def _read_flickr(root: Path, options: CorpusConfig) -> Iterator[Record]:
    from crossalign.corpus.flickr import read_flickr

    return read_flickr(root, options.default_split, options.unlisted_split)


def _read_coco(root: Path, options: CorpusConfig) -> Iterator[Record]:
    files = sorted(root.glob("captions_*.json")) + sorted(root.glob("annotations/captions_*.json"))
    if not files:
        raise CorpusConfigError(f"{root}: no captions_*.json for the coco format")
    line = 0
    for path in files:
        part = path.stem.removeprefix("captions_")  # e.g. train2017
        split = re.sub(r"\d+$", "", part) or options.default_split
        try:
            data = json.loads(inside_root(root, path).read_text(**TEXT_ENCODING))
        except (OSError, ValueError, RecursionError) as err:
            yield BadRecord(0, f"{path.name}: the annotations file cannot be read as JSON ({type(err).__name__})",
                            source=path.name)
            continue
        lists = [data.get(key) for key in ("images", "annotations")] if isinstance(data, dict) else [None]
        if not isinstance(data, dict) or any(value is not None and not isinstance(value, list) for value in lists):
            yield BadRecord(0, f"{path.name}: not a COCO captions object (lists of images and annotations)",
                            source=path.name)
            continue
        texts: dict[object, list[object]] = {}
        yield from _coco_annotations(path, data.get("annotations"), texts)
        folder = next((f for f in (Path(part), Path("images") / part, Path(".")) if (root / f).is_dir()), Path("."))
        for item in _coco_images(path, data.get("images"), texts, line):
            line += 1
            yield item if isinstance(item, BadRecord) else CorpusRecord(
                line=line, image=str(folder / item[0]), captions=item[1], split=split)
        for image_id, orphans in texts.items():  # annotations of an image the file does not list
            for caption in orphans:
                yield BadRecord(0, f"annotation of image id {image_id}, which {path.name} does not list: "
                                f"{caption!r}"[:300], reason="unknown_image_id", source=f"{path.name}:image {image_id}")


def _coco_annotations(path: Path, annotations: object, texts: dict[object, list[object]]) -> Iterator[BadRecord]:
    """Collect captions by image id into `texts`; yield a BadRecord for each annotation that cannot be used."""
    annotation_ids: set[object] = set()
    for number, annotation in enumerate(annotations if isinstance(annotations, list) else [], start=1):
        if not isinstance(annotation, dict):
            yield BadRecord(number, f"annotation #{number} is not an object",
                            source=f"{path.name}:annotation #{number}")
            continue
        annotation_id = annotation.get("id", f"#{number}")
        if not isinstance(annotation_id, (int, str)):
            annotation_id = f"#{number}"
        if annotation_id in annotation_ids:  # an id names one caption: the first one is kept
            yield BadRecord(number, f"annotation id {annotation_id} appears again; the first is kept: "
                            f"{annotation.get('caption')!r}"[:300], reason="duplicate_caption_id",
                            source=f"{path.name}:annotation {annotation_id}")
            continue
        annotation_ids.add(annotation_id)
        image_id = annotation.get("image_id")
        if not isinstance(image_id, (int, str)):
            yield BadRecord(number, f"annotation {annotation_id} names no image id: "
                            f"{annotation.get('caption')!r}"[:300], reason="no_image_id",
                            source=f"{path.name}:annotation {annotation_id}")
            continue
        texts.setdefault(image_id, []).append(annotation.get("caption"))


def _coco_images(path: Path, images: object, texts: dict[object, list[object]],
                 line: int) -> Iterator[tuple[str, list[object]] | BadRecord]:
    """(file name, captions) per image entry, taking its captions out of `texts`; BadRecords for bad entries."""
    image_ids: set[object] = set()
    for number, image in enumerate(images if isinstance(images, list) else [], start=line + 1):
        image_id = image.get("id") if isinstance(image, dict) else None
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(image_id, (int, str)) or not isinstance(name, str) or not name:
            yield BadRecord(number, f"image entry {image!r} needs an id and a file_name"[:300],
                            source=f"{path.name}:image #{number - line}")
            continue
        if image_id in image_ids:
            yield BadRecord(number, f"image id {image_id} appears again ({name}); the first entry is kept",
                            reason="duplicate_image_id", source=f"{path.name}:image {image_id}")
            continue
        image_ids.add(image_id)
        yield name, texts.pop(image_id, [])


def _read_webdataset(root: Path, options: CorpusConfig) -> Iterator[Record]:
    from crossalign.corpus.tar_shards import read_tar_shards

    shards = [shard for shard in sorted(root.glob("*.tar")) if inside_root(root, shard)]  # or raises
    if not shards:
        raise CorpusConfigError(f"{root}: no *.tar shards for the webdataset format")
    return read_tar_shards(shards, options.default_split)


_READERS: dict[str, Callable[[Path, CorpusConfig], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "csv": lambda root, options: _read_table(root, options, "csv"),
    "tsv": lambda root, options: _read_table(root, options, "tsv"),
    "parquet": lambda root, options: _read_table(root, options, "parquet"),
    "flickr": _read_flickr,
    "coco": _read_coco,
    "webdataset": _read_webdataset,
}
