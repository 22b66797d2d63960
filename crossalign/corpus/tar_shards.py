"""WebDataset tar shards (img2dataset's output): `key.jpg` + `key.txt` [+ `key.json`], read as a stream."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from crossalign.corpus.folder import UTF8_BOM, BadRecord, CorpusRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


def read_tar_shards(shards: list[Path], default_split: str) -> Iterator[CorpusRecord | BadRecord]:
    """One record per sample key, shard by shard, member by member (the tars are streamed, not loaded).

    A member whose name is absolute or climbs with `..` is never read: it becomes a BadRecord with
    reason `unsafe_tar_member`, as does a link or device member (`tar_member_not_a_file`). A shard
    that is not a readable tar, or breaks off, is a `bad_shard` BadRecord after the samples read
    before the damage. The split comes from `key.json`'s "split" when present.
    """
    line = 0
    for shard in shards:
        sample: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    line += 1
                    if member.isdir():
                        continue
                    if _unsafe(member.name) or not member.isfile():
                        yield _bad_member(shard, member, line)
                        continue
                    stem, _, suffix = member.name.partition(".")
                    if key is not None and stem != key:
                        yield _sample_record(shard, key, sample, line, default_split)
                        sample = {}
                    key = stem
                    sample["." + suffix.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            yield BadRecord(line, f"{shard.name}: not a readable tar shard past member {line} "
                            f"({type(err).__name__}: {err})"[:300], reason="bad_shard", source=shard.name)
        if key is not None:
            yield _sample_record(shard, key, sample, line, default_split)


def _bad_member(shard: Path, member: tarfile.TarInfo, line: int) -> BadRecord:
    source = f"{shard.name}#{member.name}"
    if _unsafe(member.name):
        return BadRecord(line, f"{shard.name}: member {member.name!r} escapes the shard", reason="unsafe_tar_member",
                         source=source)
    return BadRecord(line, f"{shard.name}: member {member.name!r} is a link or device, not a file",
                     reason="tar_member_not_a_file", source=source)


def _sample_record(shard: Path, key: str, sample: dict[str, bytes], line: int,
                   default_split: str) -> CorpusRecord | BadRecord:
    source = f"{shard.name}#{key}"
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    if image is None:
        return BadRecord(line, f"{source}: sample has no image member", reason="missing_file", source=source)
    meta = {}
    if ".json" in sample:
        try:
            meta = json.loads(sample[".json"])
        except (ValueError, RecursionError):
            meta = {}
    captions: list[object] = []
    if ".txt" in sample:  # invalid UTF-8 survives as surrogates: ingest rejects it as caption_not_utf8
        text = sample[".txt"].removeprefix(UTF8_BOM).decode("utf-8", errors="surrogateescape")
        captions = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    split = str(meta.get("split") or default_split) if isinstance(meta, dict) else default_split
    return CorpusRecord(line=line, image=source, captions=captions, split=split, data=image)
