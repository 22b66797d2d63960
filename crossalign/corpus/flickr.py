"""Flickr8k / Flickr30k as distributed: a token file (or Flickr30k's results.csv) and the split lists."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from crossalign.corpus.folder import TEXT_ENCODING, BadRecord, CorpusConfigError, CorpusRecord, inside_root

logger = logging.getLogger(__name__)


def read_flickr(root: Path, default_split: str, unlisted_split: str) -> Iterator[CorpusRecord | BadRecord]:
    """One record per image of a Flickr8k/30k corpus, its captions from the token file (or results.csv).

    With split lists, an image no list names goes to split `unlisted_split` (the original Flickr8k
    release has 91 such images); without them, every image goes to `default_split`. A line that is not
    `name#N<TAB>caption` is a `bad_record`, a caption id seen before a `duplicate_caption_id`.

    Raises:
        CorpusConfigError: no token file or results.csv, or one that resolves outside the root.
    """
    token_files = sorted(root.glob("*.token.txt"))
    if token_files:
        path, lines = token_files[0], _flickr_token_lines
    elif (root / "results.csv").is_file():
        path, lines = root / "results.csv", _flickr30k_result_lines
    else:
        raise CorpusConfigError(f"{root}: no *.token.txt or results.csv for the flickr format")
    captions: dict[str, list[str]] = {}
    for item in lines(inside_root(root, path)):
        if isinstance(item, BadRecord):
            yield item
        else:
            captions.setdefault(item[0], []).append(item[1])
    splits = _flickr_split_lists(root)
    if splits:  # the images no list names are kept apart, never silently added to a split
        unlisted = sum(name not in splits for name in captions)
        if unlisted:
            logger.warning("%d images of %s are in no split list: split %r", unlisted, path.name,
                           unlisted_split)
    folder = _flickr_image_folder(root, next(iter(captions), ""))
    for line, (name, texts) in enumerate(captions.items(), start=1):
        split = splits.get(name, unlisted_split) if splits else default_split
        yield CorpusRecord(line=line, image=str(folder / name), captions=texts, split=split)


def _flickr_token_lines(path: Path) -> Iterator[tuple[str, str] | BadRecord]:
    """(image name, caption) per line of a Flickr8k/30k token file (`name.jpg#N<TAB>caption`)."""
    caption_ids: set[str] = set()
    with path.open(**TEXT_ENCODING) as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            caption_id, tab, text = line.partition("\t")
            caption_id = caption_id.strip()
            if not tab or not caption_id:
                yield BadRecord(number, f"{path.name}:{number}: not `name.jpg#N<TAB>caption`: {line!r}"[:300],
                                source=f"{path.name}:{number}")
                continue
            if caption_id in caption_ids:  # `name.jpg#N` names one caption: the first one is kept
                yield BadRecord(number, f"caption id {caption_id} appears again; the first is kept: {text!r}"[:300],
                                reason="duplicate_caption_id", source=f"{path.name}:{number}")
                continue
            caption_ids.add(caption_id)
            yield caption_id.split("#")[0], text


def _flickr30k_result_lines(path: Path) -> Iterator[tuple[str, str] | BadRecord]:
    """(image name, caption) per line of Flickr30k's `results.csv` (`name| number| caption`)."""
    with path.open(**TEXT_ENCODING) as lines:
        next(lines, None)  # the header
        for number, line in enumerate(lines, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|", 2)]  # the caption itself may hold a "|"
            if len(parts) != 3 or not parts[0]:
                yield BadRecord(number, f"{path.name}:{number}: not `name| number| caption`: {line!r}"[:300],
                                source=f"{path.name}:{number}")
                continue
            yield parts[0], parts[2]


def _flickr_split_lists(root: Path) -> dict[str, str]:
    """{image name: split} from the split lists (`Flickr_8k.trainImages.txt` ...); {} when there are none."""
    splits: dict[str, str] = {}
    for split_file in sorted(root.glob("*Images.txt")):
        match = re.search(r"\.?(train|dev|val|test)Images\.txt$", split_file.name)
        if match:
            names = inside_root(root, split_file).read_text(**TEXT_ENCODING).split()
            splits.update({name.strip(): match.group(1) for name in names})
    return splits


def _flickr_image_folder(root: Path, first_image: str) -> Path:
    for folder in ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "images", "Images", "."):
        try:
            if (root / folder / first_image).exists():
                return Path(folder)
        except (OSError, ValueError):  # a name that is no path (a NUL byte): its record is rejected later
            continue
    return Path(".")
