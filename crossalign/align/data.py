"""Features of one corpus split, paired: images, captions, and which image each caption describes.

Two stores of the same rows, read through one interface (`PairedSplit`): `CachedSplit`, the split's
cache files (`crossalign.align.split_cache`) read by row, whatever the split's size, which is what
`fit_mapper` trains on; and `PairedFeatures`, the same rows as tensors in memory, for small splits
and tests (`load_paired_features` builds the cache in a temporary directory and reads it back whole).
Training, the CCA, the query bank and evaluation read either alike, so both give the same mapper.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from crossalign.align.rows import MemoryRows, Rows
from crossalign.align.split_cache import IdColumn, build_split, ensure_split, open_split_files
from crossalign.extract.features import FeatureSet
from crossalign.workspace import Workspace


class PairedSplit(Protocol):
    """What training and evaluation read of a split (`PairedFeatures`, `CachedSplit`)."""

    image_encoder: dict[str, Any]
    text_encoder: dict[str, Any]

    @property
    def image_rows(self) -> Rows: ...

    @property
    def caption_rows(self) -> Rows: ...

    @property
    def pairs(self) -> np.ndarray:
        """(N_captions,) integer: the image row of each caption."""

    def image_keys(self) -> Any:
        """The image ids of the image rows: a sequence sliced by block (`ids[start:stop]`) or by `take`."""


@dataclass
class PairedFeatures:
    """Features of one split, in memory.

    Attributes:
        image_ids / caption_ids: ids in row order.
        images: (N_images, D_image) float32.
        captions: (N_captions, D_text) float32.
        caption_image: (N_captions,) row index into `images` of each caption's image.
        image_encoder / text_encoder: the manifests' encoder descriptions.
    """

    image_ids: list[str]
    caption_ids: list[str]
    images: torch.Tensor
    captions: torch.Tensor
    caption_image: torch.Tensor
    image_encoder: dict[str, Any]
    text_encoder: dict[str, Any]

    @property
    def image_rows(self) -> Rows:
        return MemoryRows(self.images)

    @property
    def caption_rows(self) -> Rows:
        return MemoryRows(self.captions)

    @property
    def pairs(self) -> np.ndarray:
        return self.caption_image.numpy()

    def image_keys(self) -> list[str]:
        return self.image_ids

    def subset_images(self, keep: np.ndarray) -> PairedFeatures:
        """The same split restricted to the image rows in `keep` (and their captions)."""
        new_index = np.full(len(self.image_ids), -1)
        new_index[keep] = np.arange(len(keep))
        mapped = new_index[self.caption_image.numpy()]
        rows = np.flatnonzero(mapped >= 0)
        return PairedFeatures(
            [self.image_ids[i] for i in keep], [self.caption_ids[i] for i in rows], self.images[keep],
            self.captions[rows], torch.from_numpy(mapped[rows]), self.image_encoder, self.text_encoder,
        )


@dataclass
class CachedSplit:
    """Features of one split in its cache files (`crossalign.align.split_cache`), read by row on demand.

    Memory holds `pairs` (4 bytes a caption) and nothing else per row.
    """

    directory: Path
    image_rows: Rows
    caption_rows: Rows
    pairs: np.ndarray
    image_ids: IdColumn
    caption_ids: IdColumn
    image_encoder: dict[str, Any]
    text_encoder: dict[str, Any]

    @classmethod
    def open(cls, directory: Path) -> CachedSplit:
        parts = open_split_files(directory)
        meta = parts["meta"]
        return cls(directory, parts["images"], parts["captions"], parts["caption_image"], parts["image_ids"],
                   parts["caption_ids"], meta["image_encoder"], meta["text_encoder"])

    def image_keys(self) -> IdColumn:
        return self.image_ids

    def to_memory(self) -> PairedFeatures:
        """The whole split as tensors (small splits only)."""
        return PairedFeatures(
            self.image_ids.to_list(), self.caption_ids.to_list(), self.image_rows[:], self.caption_rows[:],
            torch.from_numpy(self.pairs.astype(np.int64)), self.image_encoder, self.text_encoder)


def open_split(workspace: Workspace, corpus: str, split: str, image_encoder: str, text_encoder: str) -> CachedSplit:
    """The cached features of `split` of an ingested corpus, built once (chunk by chunk) and then reused.

    Images whose features failed are left out with their captions, and so are images with no caption.

    Raises:
        WorkspaceError: the split is empty, or features are missing (extract first).
    """
    image_features = FeatureSet.open(workspace, corpus, image_encoder)
    text_features = FeatureSet.open(workspace, corpus, text_encoder)
    return CachedSplit.open(ensure_split(workspace, corpus, split, image_features, text_features))


def load_paired_features(workspace: Workspace, corpus: str, split: str, image_encoder: str,
                         text_encoder: str) -> PairedFeatures:
    """The features of `split` in memory: the same rows as `open_split`, read whole (small splits).

    The split is laid out by the cache's builder in a temporary directory, so the workspace is not written.

    Raises:
        WorkspaceError: the split is empty, or features are missing (extract first).
    """
    image_features = FeatureSet.open(workspace, corpus, image_encoder)
    text_features = FeatureSet.open(workspace, corpus, text_encoder)
    with tempfile.TemporaryDirectory(prefix="crossalign-split-") as temporary:
        directory = Path(temporary) / "split"
        build_split(workspace, corpus, split, image_features, text_features, directory)
        return CachedSplit.open(directory).to_memory()
