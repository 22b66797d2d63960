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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crossalign.corpus.folder import BadRecord, CorpusConfigError, CorpusRecord, read_jsonl_records

FORMATS = ("jsonl", "csv", "tsv", "parquet", "flickr", "coco", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
Record = CorpusRecord | BadRecord


@dataclass(frozen=True)
class ReaderOptions:
    """How to read a corpus: the captions file and the column names of table formats."""

    captions_file: str = "captions.jsonl"
    default_split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    split_column: str = "split"


def detect_format(root: Path, options: ReaderOptions) -> str:
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


def read_records(root: Path, fmt: str, options: ReaderOptions) -> Iterator[Record]:
    """Records of the corpus at `root` in format `fmt` ("auto" detects it).

    Raises:
        CorpusConfigError: unknown format, or the files the format needs are missing.
    """
    root = Path(root)
    fmt = detect_format(root, options) if fmt == "auto" else fmt
    if fmt not in _READERS:
        raise CorpusConfigError(f"unknown corpus format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
    return _READERS[fmt](root, options)


def _read_jsonl(root: Path, options: ReaderOptions) -> Iterator[Record]:
    return read_jsonl_records(root, options.captions_file, options.default_split)


def _table_file(root: Path, options: ReaderOptions, suffix: str) -> Path:
    path = root / options.captions_file
    if path.suffix.lower() != f".{suffix}":
        candidates = sorted(root.glob(f"*.{suffix}"))
        if len(candidates) != 1:
            raise CorpusConfigError(f"{root}: name the {suffix} captions file (captions_file); found "
                                    f"{len(candidates)} *.{suffix} files")
        path = candidates[0]
    if not path.is_file():
        raise CorpusConfigError(f"captions file {path} not found")
    return path


def _read_table(root: Path, options: ReaderOptions, fmt: str) -> Iterator[Record]:
    import pandas as pd

    path = _table_file(root, options, fmt)
    frame = (pd.read_parquet(path) if fmt == "parquet" else
             pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                         encoding_errors="surrogateescape"))
    caption_column = options.caption_column
    if caption_column not in frame.columns and f"{caption_column}s" in frame.columns:
        caption_column = f"{caption_column}s"
    missing = [c for c in (options.image_column, caption_column) if c not in frame.columns]
    if missing and not (fmt == "parquet" and _embedded_column(frame) is not None):
        raise CorpusConfigError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns))}); "
                                "set image_column / caption_column")
    if fmt == "parquet" and _embedded_column(frame) is not None:
        yield from _embedded_rows(frame, path, caption_column, options)
        return
    grouped: dict[str, CorpusRecord] = {}
    for line, row in enumerate(frame.to_dict("records"), start=2):
        image, caption = row[options.image_column], row[caption_column]
        if not isinstance(image, str) or not image:
            yield BadRecord(line, f"row has no {options.image_column!r} path")
            continue
        texts = list(caption) if hasattr(caption, "__len__") and not isinstance(caption, str) else [caption]
        split = str(row.get(options.split_column) or options.default_split)
        record = grouped.setdefault(image, CorpusRecord(line=line, image=image, captions=[], split=split))
        record.captions.extend(texts)
    yield from grouped.values()


def _embedded_column(frame) -> str | None:
    """The column holding image bytes: img2dataset's `jpg`/`png`/`webp`, or an `image` struct with bytes."""
    for name in ("jpg", "png", "webp", "image"):
        if name in frame.columns and len(frame):
            value = frame[name].iloc[0]
            if isinstance(value, bytes) or (isinstance(value, dict) and "bytes" in value):
                return name
    return None


def _embedded_rows(frame, path: Path, caption_column: str, options: ReaderOptions) -> Iterator[Record]:
    column = _embedded_column(frame)
    for line, row in enumerate(frame.to_dict("records"), start=1):
        value = row[column]
        data = value.get("bytes") if isinstance(value, dict) else value
        name = (value.get("path") if isinstance(value, dict) else None) or str(row.get("key", line))
        caption = row.get(caption_column, row.get("text", row.get("caption")))
        texts = list(caption) if hasattr(caption, "__len__") and not isinstance(caption, str) else [caption]
        if not isinstance(data, bytes):
            yield BadRecord(line, f"row has no image bytes in column {column!r}")
            continue
        split = str(row.get(options.split_column) or options.default_split)
        yield CorpusRecord(line=line, image=f"{path.name}#{name}", captions=texts, split=split, data=data)


def _read_flickr(root: Path, options: ReaderOptions) -> Iterator[Record]:
    captions: dict[str, list[str]] = {}
    token_files = sorted(root.glob("*.token.txt"))
    if token_files:
        for line in token_files[0].read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, text = line.partition("\t")
            if text:
                captions.setdefault(name.split("#")[0].strip(), []).append(text)
    elif (root / "results.csv").is_file():
        for line in (root / "results.csv").read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = [p.strip() for p in line.split("|", 2)]  # the caption itself may hold a "|"
            if len(parts) == 3:
                captions.setdefault(parts[0], []).append(parts[2])
    else:
        raise CorpusConfigError(f"{root}: no *.token.txt or results.csv for the flickr format")
    splits = {}
    for split_file in sorted(root.glob("*Images.txt")):
        match = re.search(r"\.?(train|dev|val|test)Images\.txt$", split_file.name)
        if match:
            splits.update({name.strip(): match.group(1) for name in split_file.read_text().split()})
    folder = _flickr_image_folder(root, next(iter(captions), ""))
    for line, (name, texts) in enumerate(captions.items(), start=1):
        image = str(folder / name)
        yield CorpusRecord(line=line, image=image, captions=texts, split=splits.get(name, options.default_split))


def _flickr_image_folder(root: Path, first_image: str) -> Path:
    for folder in ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "images", "Images", "."):
        if (root / folder / first_image).exists():
            return Path(folder)
    return Path(".")


def _read_coco(root: Path, options: ReaderOptions) -> Iterator[Record]:
    files = sorted(root.glob("captions_*.json")) + sorted(root.glob("annotations/captions_*.json"))
    if not files:
        raise CorpusConfigError(f"{root}: no captions_*.json for the coco format")
    line = 0
    for path in files:
        part = path.stem.removeprefix("captions_")  # e.g. train2017
        split = re.sub(r"\d+$", "", part) or options.default_split
        data = json.loads(path.read_text(encoding="utf-8"))
        texts: dict[int, list[str]] = {}
        for annotation in data.get("annotations", []):
            texts.setdefault(annotation["image_id"], []).append(annotation.get("caption"))
        folder = next((f for f in (Path(part), Path("images") / part, Path(".")) if (root / f).is_dir()), Path("."))
        for image in data.get("images", []):
            line += 1
            yield CorpusRecord(line=line, image=str(folder / image["file_name"]), captions=texts.get(image["id"], []),
                               split=split)


def _read_webdataset(root: Path, options: ReaderOptions) -> Iterator[Record]:
    from crossalign.corpus.tar_shards import read_tar_shards

    shards = sorted(root.glob("*.tar"))
    if not shards:
        raise CorpusConfigError(f"{root}: no *.tar shards for the webdataset format")
    return read_tar_shards(shards, options.default_split)


_READERS: dict[str, Callable[[Path, ReaderOptions], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "csv": lambda root, options: _read_table(root, options, "csv"),
    "tsv": lambda root, options: _read_table(root, options, "tsv"),
    "parquet": lambda root, options: _read_table(root, options, "parquet"),
    "flickr": _read_flickr,
    "coco": _read_coco,
    "webdataset": _read_webdataset,
}
