"""Reader for the "folder of images + captions.jsonl" layout (the layout of shared/data/flickr8k).

Each line of the captions file is one image::

    {"image": "images/123.jpg", "captions": ["a dog ...", "..."], "split": "train"}

`"caption": "..."` (one string) is accepted in place of `"captions"`; `split` is optional.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UTF8_BOM = b"\xef\xbb\xbf"
# Text inputs are UTF-8 with an optional byte-order mark; undecodable bytes survive as surrogates, so
# the item holding them is rejected (caption_not_utf8, path_not_utf8) rather than silently altered.
TEXT_ENCODING = {"encoding": "utf-8-sig", "errors": "surrogateescape"}


class CorpusConfigError(ValueError):
    """The corpus cannot be read at all (missing root or captions file): raised before any work."""


@dataclass(frozen=True)
class CorpusRecord:
    """One image entry of a corpus as the captions file states it (nothing checked yet)."""

    line: int
    image: str  # a path relative to the corpus root, or a name for embedded bytes
    captions: list[object]
    split: str
    data: bytes | None = None  # the image itself, for formats that embed it (tar shards, Parquet)


@dataclass(frozen=True)
class BadRecord:
    """A captions-file line that cannot be understood."""

    line: int
    message: str
    reason: str = "bad_record"
    source: str | None = None


def inside_root(root: Path, path: Path) -> Path:
    """`path` (a corpus file: captions, token file, split list, shard) when it resolves inside `root`.

    Raises:
        CorpusConfigError: it resolves outside the root (a symlink out), or cannot be resolved.
    """
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError) as err:
        raise CorpusConfigError(f"corpus file {path} cannot be resolved ({type(err).__name__})") from err
    if not real.is_relative_to(Path(root).resolve()):
        raise CorpusConfigError(f"corpus file {path} resolves to {real}, outside the corpus root {root}: "
                                "ingest reads nothing outside the root")
    return real


def read_jsonl_records(root: Path, captions_file: str, default_split: str) -> Iterator[CorpusRecord | BadRecord]:
    """Yield the records of `root/captions_file`, one per line, in file order.

    Raises:
        CorpusConfigError: the root is not a directory or the captions file does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusConfigError(f"corpus root {root} is not a readable directory")
    path = root / captions_file
    if not path.is_file():
        raise CorpusConfigError(
            f"captions file {path} not found: the folder layout needs a JSONL file of "
            '{"image": PATH, "captions": [TEXT, ...], "split": NAME} lines (set captions_file to its name)'
        )
    with inside_root(root, path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)  # files saved by common Windows tools start with one
            if not raw.strip():
                continue
            yield _parse_line(number, raw, default_split)


def _parse_line(number: int, raw: bytes, default_split: str) -> CorpusRecord | BadRecord:
    try:
        # Invalid UTF-8 survives as surrogates, so one bad caption rejects that caption, not its image.
        obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as err:
        return BadRecord(number, f"line is not valid JSON: {err.msg}")
    except RecursionError:
        return BadRecord(number, "line is JSON nested too deeply to read")
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        return BadRecord(number, 'line needs an "image" string')
    if has_invalid_utf8(obj["image"]):
        return BadRecord(number, "the image path is not valid UTF-8")
    captions = obj.get("captions", obj.get("caption", []))
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        return BadRecord(number, '"captions" must be a list of strings')
    split = obj.get("split") or default_split
    return CorpusRecord(line=number, image=obj["image"], captions=captions, split=str(split))


def has_invalid_utf8(text: str) -> bool:
    """True when `text` holds surrogates: decoded with errors="surrogateescape" from bytes that were not
    UTF-8, or a lone surrogate escape from JSON; neither can be stored as UTF-8."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)
