"""Batched, resumable, incremental feature extraction of a corpus with a frozen encoder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from crossalign.corpus import read_captions, read_images
from crossalign.encoders import ImageEncoder, TextEncoder, load_encoder
from crossalign.extract.manifest import FeatureManifest
from crossalign.extract.shards import ShardWriter, done_ids
from crossalign.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What one extraction did (small: passed between Prefect tasks)."""

    encoder: str
    modality: str
    encoded: int
    already_done: int
    failed: int
    seconds: float
    items_per_s: float
    features_dir: str
    precision: str

    def to_dict(self) -> dict:
        return asdict(self)


class ImageFiles(Dataset):
    """Decode + preprocess images in DataLoader workers; a file that fails yields an error string."""

    def __init__(self, uris: list[str], preprocess: Callable[[Image.Image], torch.Tensor], size: int) -> None:
        self.uris = uris
        self.preprocess = preprocess
        self.size = size

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            with Image.open(self.uris[index]) as img:
                return index, self.preprocess(img), ""
        except Exception as err:  # noqa: BLE001 - any decode failure becomes a recorded failure
            return index, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(err).__name__}: {err}"


def extract_image_features(
    workspace: Workspace, corpus: str, encoder_name: str = "efficientnet-lite0", *, device: str = "auto",
    precision: str = "auto", batch_size: int = 64, shard_size: int = 4096, num_workers: int = 2,
    split: str | None = None,
) -> ExtractSummary:
    """Encode the corpus images that have no features yet for `encoder_name`.

    Returns:
        An `ExtractSummary`.

    Raises:
        FeatureMismatchError: the features directory belongs to another encoder setup.
    """
    encoder = load_encoder(encoder_name, device, precision)
    assert isinstance(encoder, ImageEncoder), f"{encoder_name} is not an image encoder"
    images = read_images(workspace, corpus, split)
    ids, uris = images.column("image_id").to_pylist(), images.column("uri").to_pylist()
    size = encoder.preprocessing.get("size", 224)
    directory = workspace.features_dir(corpus, encoder.name)

    def batches(todo: list[int]) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        loader = DataLoader(
            ImageFiles([uris[i] for i in todo], encoder.preprocess, size), batch_size=batch_size,
            num_workers=num_workers, pin_memory=encoder.runtime.device.type == "cuda",
            multiprocessing_context="spawn" if num_workers > 0 else None,
            persistent_workers=False,
        )
        for positions, pixels, errors in loader:
            yield [todo[p] for p in positions.tolist()], pixels, list(errors)

    return _run_extraction(encoder, ids, directory, batches, encoder.encode, shard_size)


def extract_text_features(
    workspace: Workspace, corpus: str, encoder_name: str = "minilm-l6", *, device: str = "auto",
    precision: str = "auto", batch_size: int = 256, shard_size: int = 4096, split: str | None = None,
) -> ExtractSummary:
    """Encode the corpus captions that have no features yet for `encoder_name` (see `extract_image_features`)."""
    encoder = load_encoder(encoder_name, device, precision)
    assert isinstance(encoder, TextEncoder), f"{encoder_name} is not a text encoder"
    captions = read_captions(workspace, corpus, split)
    ids, texts = captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()
    directory = workspace.features_dir(corpus, encoder.name)

    def batches(todo: list[int]) -> Iterator[tuple[list[int], list[str], list[str]]]:
        # One shard's worth at a time: the encoder sorts by length inside it to avoid padding.
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            yield chunk, [texts[i] for i in chunk], [""] * len(chunk)

    def encode_unique(batch: list[str]) -> torch.Tensor:
        unique, inverse = np.unique(np.asarray(batch, dtype=object), return_inverse=True)
        return encoder.encode(list(unique), batch_size=batch_size)[torch.from_numpy(inverse)]

    return _run_extraction(encoder, ids, directory, batches, encode_unique, shard_size)


def _run_extraction(
    encoder: ImageEncoder | TextEncoder, ids: list[str], directory: Path,
    batches: Callable[[list[int]], Iterable[tuple[list[int], object, list[str]]]],
    encode: Callable[[object], torch.Tensor], shard_size: int,
) -> ExtractSummary:
    """Shared runner: skip done ids, encode the rest batch by batch, flush complete shards."""
    manifest = FeatureManifest.open_for(directory, encoder.describe())
    writer = ShardWriter(directory, manifest)
    done = done_ids(directory)
    todo = [i for i, item in enumerate(ids) if item not in done]
    logger.info("%s: %d to encode, %d already done (%s)", encoder.name, len(todo), len(ids) - len(todo), directory)
    start = time.perf_counter()
    pending_ids: list[str] = []
    pending_vectors: list[np.ndarray] = []
    failed = 0
    with tqdm(total=len(todo), desc=f"extract {encoder.name}", unit=encoder.modality, disable=None) as bar:
        for positions, inputs, errors in batches(todo) if todo else ():
            vectors = encode(inputs).numpy()
            for position, vector, error in zip(positions, vectors, errors):
                if error:
                    manifest.failed[ids[position]] = error
                    failed += 1
                    logger.warning("cannot encode %s: %s", ids[position], error)
                    continue
                manifest.failed.pop(ids[position], None)  # it decodes again: no longer failed
                pending_ids.append(ids[position])
                pending_vectors.append(vector)
            while len(pending_ids) >= shard_size:
                writer.write(pending_ids[:shard_size], np.stack(pending_vectors[:shard_size]))
                del pending_ids[:shard_size], pending_vectors[:shard_size]
            bar.update(len(positions))
        if pending_ids:
            writer.write(pending_ids, np.stack(pending_vectors))
        elif todo:  # only failures changed (added or cleared): record them
            manifest.save(directory)
    seconds = time.perf_counter() - start
    encoded = len(todo) - failed
    return ExtractSummary(
        encoder=encoder.name, modality=encoder.modality, encoded=encoded, already_done=len(ids) - len(todo),
        failed=failed, seconds=round(seconds, 3),
        items_per_s=round(encoded / seconds, 1) if seconds and encoded else 0.0,
        features_dir=str(directory), precision=encoder.runtime.precision,
    )
