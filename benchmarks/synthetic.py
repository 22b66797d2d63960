"""A synthetic corpus of any size and cheap registered encoders, to drive the pipeline at scale without a model.

    from benchmarks.synthetic import register_synthetic_encoders, write_synthetic_corpus
    image_encoder, text_encoder = register_synthetic_encoders()
    corpus = write_synthetic_corpus(Workspace(path), "synthetic", 100_000)
    # then extract with ExtractConfig(image_encoder=image_encoder, text_encoder=text_encoder, compile="off")

Items are image-caption pairs: `n_items` captions, `captions_per_image` of them per image (default 5, as
Flickr and COCO have), so a corpus of N items has N captions and N / 5 images.

**The corpus tables** (`write_synthetic_corpus`) are written straight into a workspace, with the exact
schemas of `crossalign.corpus.schema`, in row-group batches through `pyarrow.parquet.ParquetWriter` (memory
does not grow with N; 10M items take about a minute). Ids are unique 32-hex strings: the first 64 bits are
a bijective mix of the item's number (so unique by construction), the rest a mix of those. They are not
content hashes as ingest's are (there is no content to hash). Splits are drawn per image by a hash of
its number (98% train, 1% dev, 1% test by default), so the held-out images are spread over every shard
as in a shuffled real corpus; a caption has its image's split. Every image row's `uri` is a hard link to
one tiny PNG (one such file per 50,000 links, under ext4's 65,000-link limit; no inode per image), named
`<image_id>.png`: the image extraction path opens every file with PIL as it would a real image, but
nothing is decoded.

**The encoders** (`register_synthetic_encoders`; not in the product's registry) give deterministic
pseudo-random features of `dim` (64) dimensions, computed from 128-bit keys with a vectorised splitmix64
hash, so that encoding costs microseconds per item:

- `synthetic-image` is a real `ImageEncoder` on the product's image path (files opened, batches of pixel
  tensors): its preprocessing reads the 16 bytes of the image id from the *file name* (`<id>.png`) into
  the tensor instead of decoding pixels, and its forward pass maps them to the image's feature F(id).
  So features depend on the image, not on its (shared) pixels. Any other file name is hashed instead.
- `synthetic-text` reads the image id that every synthetic caption ends with ("synthetic caption 3 of
  image <image_id>") and returns F(image_id) + `noise` x G(caption): each caption is its image's feature
  plus noise of its own. Paired items are therefore correlated, and a trained mapper retrieves better
  than chance (how much better depends on `noise`); a caption that ends with no id gets G alone.

For ingest, `write_synthetic_raw_corpus` writes a raw corpus that `ingest_corpus` reads: one Parquet
table of distinct tiny PNGs embedded as bytes (a base PNG plus a `tEXt` chunk holding the item number,
so every image has its own bytes, hence its own id) with their captions, as img2dataset writes them.
Ingest stores each image under `blobs/<image_id>.png`, so the ingested corpus works with the synthetic
image encoder too, and its captions name the ids ingest gives the images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from crossalign.config import CorpusConfig
from crossalign.corpus.schema import CAPTIONS_SCHEMA, IMAGES_SCHEMA
from crossalign.encoders.base import ImageEncoder, Runtime, TextEncoder
from crossalign.encoders.registry import register_encoder, unregister_encoder
from crossalign.workspace import Workspace

logger = logging.getLogger(__name__)

IMAGE_ENCODER = "synthetic-image"
TEXT_ENCODER = "synthetic-text"
DIM = 64
NOISE = 2.0  # caption noise per dimension, against unit-variance image features (cosine to its image ~0.45)
SPLITS = ("train", "dev", "test")
LINKS_PER_FILE = 50_000  # hard links to one base PNG (ext4 allows 65,000 per inode)
BATCH_IMAGES = 65_536  # images per row group of the images table (their captions: one row group too)
BASE_SIZE = 8  # the base PNG is BASE_SIZE x BASE_SIZE, RGB
KEY_BYTES = 16  # an id's 128 bits

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_IMAGE_SALT, _CAPTION_SALT, _SPLIT_SALT, _NOISE_SALT = (np.uint64(s) for s in (0x1D, 0xCA, 0x5B, 0x7E))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping): a bijection, so distinct inputs stay distinct."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _keys_to_hex(keys: np.ndarray) -> pa.StringArray:
    """(N, 2) uint64 keys -> N strings of 32 hex digits (big-endian), built without a Python object per row."""
    data = np.ascontiguousarray(keys.astype(">u8")).tobytes().hex().encode("ascii")
    offsets = np.arange(0, len(data) + 1, 2 * KEY_BYTES, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(keys), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def synthetic_ids(first: int, stop: int, kind: str, seed: int = 0) -> pa.StringArray:
    """The ids of items `first` to `stop` of `kind` ("image" or "caption"): unique 32-hex strings."""
    salt = (_IMAGE_SALT if kind == "image" else _CAPTION_SALT) + np.uint64(seed) * _GOLDEN
    index = np.arange(first, stop, dtype=np.uint64)
    high = _mix(index ^ salt)  # a bijection of the index: unique
    return _keys_to_hex(np.stack([high, _mix(high + _GOLDEN)], axis=1))


def split_codes(first: int, stop: int, dev_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    """Split of images `first` to `stop` as indices into `SPLITS`, drawn by a hash of each image's number."""
    draw = _mix(np.arange(first, stop, dtype=np.uint64) ^ (_SPLIT_SALT + np.uint64(seed))) % np.uint64(1_000_000)
    draw = draw.astype(np.int64)
    dev, test = round(dev_fraction * 1_000_000), round(test_fraction * 1_000_000)
    return np.where(draw < dev, 1, np.where(draw < dev + test, 2, 0)).astype(np.int8)


def base_png() -> bytes:
    """The tiny RGB PNG that every synthetic image file is a link to (and every raw-corpus image starts from)."""
    out = io.BytesIO()
    Image.new("RGB", (BASE_SIZE, BASE_SIZE), (128, 128, 128)).save(out, format="PNG")
    return out.getvalue()


@dataclass
class SyntheticCorpus:
    """What `write_synthetic_corpus` wrote (small: printable, JSON-able)."""

    corpus: str
    images: int
    captions: int
    splits: dict[str, int] = field(default_factory=dict)  # captions per split
    image_splits: dict[str, int] = field(default_factory=dict)
    images_table: str = ""
    captions_table: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_synthetic_corpus(
    workspace: Workspace, corpus: str, n_items: int, *, captions_per_image: int = 5, seed: int = 0,
    dev_fraction: float = 0.01, test_fraction: float = 0.01, link_images: bool = True,
) -> SyntheticCorpus:
    """Write the canonical tables of a synthetic corpus of `n_items` captions into `workspace` (replacing any).

    `captions_per_image` captions per image (the last image may have fewer). Image files are hard links
    (symbolic links where the filesystem has none) to one tiny PNG, named by the image id, under
    `corpora/<corpus>/synthetic-images/`; with `link_images=False` no link is made and every `uri` names
    the base PNG (text extraction, training and embedding never open image files; image extraction with
    `synthetic-image` would then give every image one feature).

    Returns:
        A `SyntheticCorpus` with the counts per split.

    Raises:
        ValueError: a non-positive size or fractions that do not leave a training split.
    """
    if n_items < 1 or captions_per_image < 1:
        raise ValueError(f"need n_items >= 1 and captions_per_image >= 1, got {n_items}, {captions_per_image}")
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError(f"dev_fraction + test_fraction must be in [0, 1), got {dev_fraction} + {test_fraction}")
    start = time.perf_counter()
    directory = workspace.corpus_dir(corpus)
    files = directory / "synthetic-images"
    files.mkdir(parents=True, exist_ok=True)
    base = files / "base.png"
    base.write_bytes(base_png())
    sha256 = hashlib.sha256(base.read_bytes()).hexdigest()
    n_images = -(-n_items // captions_per_image)
    summary = SyntheticCorpus(corpus, n_images, n_items, images_table=str(workspace.images_table(corpus)),
                              captions_table=str(workspace.captions_table(corpus)))
    counts = np.zeros((2, len(SPLITS)), dtype=np.int64)  # images, captions per split
    tables = [(workspace.images_table(corpus), IMAGES_SCHEMA), (workspace.captions_table(corpus), CAPTIONS_SCHEMA)]
    tmps = [path.with_name(f".{path.name}.tmp-{os.getpid()}") for path, _ in tables]
    writers = [pq.ParquetWriter(tmp, schema) for tmp, (_, schema) in zip(tmps, tables)]
    try:
        for first in range(0, n_images, BATCH_IMAGES):
            stop = min(first + BATCH_IMAGES, n_images)
            images, captions, batch_counts = _batch(first, stop, n_items, captions_per_image, seed, dev_fraction,
                                                    test_fraction, files, sha256, link_images)
            writers[0].write_table(images)
            writers[1].write_table(captions)
            counts += batch_counts
    except BaseException:
        for writer, tmp in zip(writers, tmps):
            writer.close()
            tmp.unlink(missing_ok=True)
        raise
    for writer, tmp, (path, _) in zip(writers, tmps, tables):
        writer.close()
        os.replace(tmp, path)
    summary.image_splits = {s: int(n) for s, n in zip(SPLITS, counts[0]) if n}
    summary.splits = {s: int(n) for s, n in zip(SPLITS, counts[1]) if n}
    summary.seconds = round(time.perf_counter() - start, 2)
    logger.info("synthetic corpus %s: %d images, %d captions in %.1fs", corpus, n_images, n_items, summary.seconds)
    return summary


def _batch(
    first: int, stop: int, n_items: int, per_image: int, seed: int, dev_fraction: float, test_fraction: float,
    files: Path, sha256: str, link_images: bool,
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """The image rows of images `first` to `stop`, the rows of their captions (with links made), and the count
    of each per split ((2, len(SPLITS)): images, captions)."""
    n = stop - first
    image_ids = synthetic_ids(first, stop, "image", seed)
    codes = split_codes(first, stop, dev_fraction, test_fraction, seed)
    splits = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(SPLITS)).cast(pa.string())
    uris = _link_images(image_ids.to_pylist(), first, files) if link_images else [str(files / "base.png")] * n
    images = pa.table({
        "image_id": image_ids, "uri": pa.array(uris, pa.string()), "sha256": pa.array([sha256] * n, pa.string()),
        "width": pa.array(np.full(n, BASE_SIZE, np.int32)), "height": pa.array(np.full(n, BASE_SIZE, np.int32)),
        "split": splits, "status": pa.array(["ok"] * n, pa.string()),
    }, schema=IMAGES_SCHEMA)
    first_caption, stop_caption = first * per_image, min(stop * per_image, n_items)
    owner = np.arange(first_caption, stop_caption) // per_image - first  # row of each caption's image
    number = pa.array((np.arange(first_caption, stop_caption) % per_image).astype(str))
    owner_ids = image_ids.take(pa.array(owner))
    captions = pa.table({
        "caption_id": synthetic_ids(first_caption, stop_caption, "caption", seed), "image_id": owner_ids,
        "text": pc.binary_join_element_wise("synthetic caption ", number, " of image ", owner_ids, ""),
        "split": splits.take(pa.array(owner)),
    }, schema=CAPTIONS_SCHEMA)
    counts = np.stack([np.bincount(codes, minlength=len(SPLITS)), np.bincount(codes[owner], minlength=len(SPLITS))])
    return images, captions, counts


def _link_images(image_ids: list[str], first: int, files: Path) -> list[str]:
    """Link `<image_id>.png` to the base PNG of its group of `LINKS_PER_FILE`; returns the links' paths."""
    uris = []
    for number, image_id in enumerate(image_ids, start=first):
        group = files / f"{number // LINKS_PER_FILE:05d}"
        base = group / "base.png"
        if number % LINKS_PER_FILE == 0 or not base.exists():
            group.mkdir(exist_ok=True)
            if not base.exists():
                base.write_bytes((files / "base.png").read_bytes())
        link = group / f"{image_id}.png"
        try:
            os.link(base, link)
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem
            os.symlink(base, link)
        uris.append(str(link))
    return uris


def _png_with_text(base: bytes, text: bytes) -> bytes:
    """`base` (a PNG) with a tEXt chunk after its header: other bytes, the same pixels."""
    chunk = b"tEXt" + b"synthetic\x00" + text
    at = 8 + 25  # the signature, then IHDR (length, type, 13 bytes, CRC)
    return base[:at] + struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk)) + base[at:]


def write_synthetic_raw_corpus(
    root: Path, n_items: int, *, captions_per_image: int = 5, seed: int = 0, dev_fraction: float = 0.01,
    test_fraction: float = 0.01, name: str | None = None, batch_images: int = 4096,
) -> CorpusConfig:
    """Write a raw corpus that `ingest_corpus` reads: `root/captions.parquet`, one row per image with its bytes
    (a distinct tiny PNG: column `png`), its captions (`captions`, a list), `split` and `key`.

    Each caption ends with the id ingest will give its image (the PNG's SHA-256, 32 hex digits), so the
    synthetic text encoder pairs it with the image after ingest.

    Returns:
        The `CorpusConfig` (format "parquet") to ingest it with.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([pa.field("key", pa.string()), pa.field("png", pa.binary()),
                        pa.field("captions", pa.list_(pa.string())), pa.field("split", pa.string())])
    base = base_png()
    n_images = -(-n_items // captions_per_image)
    path = root / "captions.parquet"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
        for first in range(0, n_images, batch_images):
            stop = min(first + batch_images, n_images)
            pngs = [_png_with_text(base, f"{seed}:{number}".encode()) for number in range(first, stop)]
            ids = [hashlib.sha256(png).hexdigest()[:2 * KEY_BYTES] for png in pngs]
            texts = [[f"synthetic caption {k} of image {image_id}"
                      for k in range(min(captions_per_image, n_items - number * captions_per_image))]
                     for number, image_id in zip(range(first, stop), ids)]
            codes = split_codes(first, stop, dev_fraction, test_fraction, seed)
            writer.write_table(pa.table({
                "key": [f"{number:09d}" for number in range(first, stop)], "png": pngs, "captions": texts,
                "split": [SPLITS[code] for code in codes],
            }, schema=schema))
    os.replace(tmp, path)
    return CorpusConfig(root=root, name=name, format="parquet")


# --- the encoders -------------------------------------------------------------------------------------------


def key_of(name: str) -> bytes:
    """The 16-byte key of an id: its bytes when `name` is 32 hex digits, else a hash of `name`."""
    if len(name) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(name)
        except ValueError:
            pass
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


def keyed_features(keys: bytes, dim: int, salt: np.uint64) -> np.ndarray:
    """Pseudo-random features (N, dim) float32 of N concatenated 16-byte keys: uniform, zero mean, unit variance."""
    words = np.frombuffer(keys, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    columns = np.arange(dim, dtype=np.uint64) * _GOLDEN + salt
    z = _mix(words[:, :1] ^ _mix(words[:, 1:] + columns))
    uniform = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return (uniform - np.float32(0.5)) * np.float32(12 ** 0.5)


@dataclass(frozen=True)
class FileNameKey:
    """PIL image -> uint8 (3, size, size) holding the key of its file name (`<image_id>.png`) in its first 16
    values; no pixel is decoded. An image without a file name (a search query) is keyed by its pixels.
    Picklable, so decode processes can run it."""

    size: int

    def __call__(self, img: Image.Image) -> torch.Tensor:
        filename = getattr(img, "filename", "") or ""
        key = key_of(Path(filename).stem) if filename else hashlib.blake2b(
            img.tobytes(), digest_size=KEY_BYTES).digest()
        out = torch.zeros(3 * self.size * self.size, dtype=torch.uint8)
        out[:KEY_BYTES] = torch.frombuffer(bytearray(key), dtype=torch.uint8)
        return out.view(3, self.size, self.size)


def _identity(kind: str, dim: int, noise: float) -> str:
    return hashlib.sha256(f"{kind}:{dim}:{noise}:v1".encode()).hexdigest()[:16]


class SyntheticImageEncoder(ImageEncoder):
    """F(image id) from the id in the file name (see `FileNameKey`): the product's image path, no model."""

    size = 4  # 48 values per image: room for the 16 key bytes
    pixel_mean = 0.0
    pixel_std = 1.0

    def __init__(self, runtime: Runtime, dim: int = DIM) -> None:
        self.name, self.runtime, self.dim = IMAGE_ENCODER, runtime, dim

    @property
    def weights_digest(self) -> str:
        return _identity("image", self.dim, 0.0)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"size": self.size, "features": "splitmix64 of the image id in the file name", "dim": self.dim}

    @property
    def preprocess(self) -> FileNameKey:
        return FileNameKey(self.size)

    def compile(self, batch_size: int) -> None:
        """Nothing to compile."""

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        keys = images.reshape(len(images), -1)[:, :KEY_BYTES].cpu().numpy().tobytes()
        return torch.from_numpy(keyed_features(keys, self.dim, _IMAGE_SALT))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("synthetic-image maps key bytes in _forward; it has no network")


class SyntheticTextEncoder(TextEncoder):
    """F(image id named at the end of the caption) + `noise` x G(caption text): correlated with the image's."""

    def __init__(self, runtime: Runtime, dim: int = DIM, noise: float = NOISE) -> None:
        self.name, self.runtime, self.dim, self.noise = TEXT_ENCODER, runtime, dim, noise

    @property
    def weights_digest(self) -> str:
        return _identity("text", self.dim, self.noise)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"features": "splitmix64 of the image id the caption ends with, plus noise from the caption",
                "dim": self.dim, "noise": self.noise}

    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Features (N, dim) of `texts` (`batch_size` is accepted for the interface; all are done at once)."""
        if not texts:
            return torch.zeros(0, self.dim)
        tails = [text[-2 * KEY_BYTES:] for text in texts]
        try:  # the common case: every text ends with an id
            image_keys = bytes.fromhex("".join(tails)) if all(len(t) == 2 * KEY_BYTES for t in tails) else None
        except ValueError:
            image_keys = None
        named = np.ones(len(texts), dtype=bool)
        if image_keys is None:
            named = np.array([_is_hex_id(tail) for tail in tails])
            image_keys = b"".join(key_of(tail) for tail in tails)
        text_keys = b"".join(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()
                             for text in texts)
        features = np.float32(self.noise) * keyed_features(text_keys, self.dim, _NOISE_SALT)
        features[named] += keyed_features(image_keys, self.dim, _IMAGE_SALT)[named]
        return torch.from_numpy(features)


def _is_hex_id(text: str) -> bool:
    return len(text) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in text)


def register_synthetic_encoders(dim: int = DIM, noise: float = NOISE) -> tuple[str, str]:
    """Register `synthetic-image` and `synthetic-text` (of `dim` dimensions, captions with `noise`) with the
    encoder registry of this process; returns their names (image, text).

    Features of other `dim` or `noise` are another encoder setup: extraction refuses to mix them in one
    features directory (`FeatureMismatchError`).
    """
    register_encoder(IMAGE_ENCODER, lambda runtime: SyntheticImageEncoder(runtime, dim), modality="image")
    register_encoder(TEXT_ENCODER, lambda runtime: SyntheticTextEncoder(runtime, dim, noise), modality="text")
    return IMAGE_ENCODER, TEXT_ENCODER


def unregister_synthetic_encoders() -> None:
    """Take them out of the registry again (a test that registered them leaves the registry as it found it)."""
    unregister_encoder(IMAGE_ENCODER)
    unregister_encoder(TEXT_ENCODER)
