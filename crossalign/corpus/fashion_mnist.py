"""Turn Fashion-MNIST (Debian package `dataset-fashion-mnist`) into a "folder + captions.jsonl" corpus.

Real photographs of clothes, offline and reproducible: the demo corpus. Captions are templated from
the class names, a few per image.
"""

from __future__ import annotations

import gzip
import json
import logging
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from crossalign.corpus.folder import CorpusConfigError

logger = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = ("a photo of {}.", "a black and white photo of {}.", "a product photo of {}.",
             "a low resolution photo of {}.", "{} on a dark background.", "a picture of {}.")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "dev": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        _, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: unsupported IDX dtype {dtype_code:#x}")
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def write_fashion_mnist_corpus(
    out: Path, n_train: int = 2000, n_dev: int = 500, captions_per_image: int = 2,
    source: Path = DEBIAN_DIR, seed: int = 0,
) -> Path:
    """Write `n_train` training and `n_dev` test images (split "dev") as PNGs plus captions.jsonl.

    Idempotent: existing identical files are kept. Returns the corpus root.

    Raises:
        CorpusConfigError: the Fashion-MNIST files are not at `source`.
    """
    source, out = Path(source), Path(out)
    missing = [name for pair in FILES.values() for name in pair if not (source / name).exists()]
    if missing:
        raise CorpusConfigError(
            f"Fashion-MNIST not found in {source} (missing {missing[0]}): install the Debian package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass its folder as source"
        )
    rng = np.random.default_rng(seed)
    lines = []
    for split, count in (("train", n_train), ("dev", n_dev)):
        images, labels = (read_idx(source / name) for name in FILES[split])
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(min(count, len(images))):
            name = CLASS_NAMES[labels[index]]
            relative = f"images/{split}/{name.replace(' ', '_')}_{index:05d}.png"
            if not (out / relative).exists():
                Image.fromarray(images[index]).save(out / relative)
            templates = rng.choice(len(TEMPLATES), size=captions_per_image, replace=False)
            with_article = ("an " if name[0] in "aeiou" else "a ") + name
            captions = [TEMPLATES[t].format(with_article) for t in templates]
            lines.append({"image": relative, "captions": [c[0].upper() + c[1:] for c in captions],
                          "split": split, "label": name})
    (out / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    logger.info("wrote Fashion-MNIST corpus to %s: %d images", out, len(lines))
    return out
