"""Cached features of one corpus split, paired: images, captions, and which image each caption describes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crossalign.corpus import read_captions, read_images
from crossalign.extract.features import FeatureSet
from crossalign.workspace import Workspace, WorkspaceError


@dataclass
class PairedFeatures:
    """Features of one split.

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


def load_paired_features(workspace: Workspace, corpus: str, split: str, image_encoder: str,
                         text_encoder: str) -> PairedFeatures:
    """Load the cached features of `split` of an ingested corpus.

    Images whose features failed are left out with their captions, and so are images with no caption.

    Raises:
        WorkspaceError: the split is empty, or features are missing (extract first).
    """
    images = read_images(workspace, corpus, split)
    captions = read_captions(workspace, corpus, split)
    if images.num_rows == 0 or captions.num_rows == 0:
        raise WorkspaceError(f"split {split!r} of corpus {corpus!r} has no images or no captions")
    image_features = FeatureSet.open(workspace, corpus, image_encoder)
    text_features = FeatureSet.open(workspace, corpus, text_encoder)
    # The protocol ranks an image by its own captions: images without any (or without features) are left out.
    captioned = set(captions.column("image_id").to_pylist()) - set(image_features.failed)
    image_ids = [i for i in images.column("image_id").to_pylist() if i in captioned]
    position = {image_id: row for row, image_id in enumerate(image_ids)}
    pairs = [(c, position[i]) for c, i in zip(captions.column("caption_id").to_pylist(),
                                              captions.column("image_id").to_pylist()) if i in position]
    caption_ids = [c for c, _ in pairs]
    _, image_vectors = image_features.read(image_ids)
    _, text_vectors = text_features.read(caption_ids)
    return PairedFeatures(
        image_ids, caption_ids, torch.from_numpy(image_vectors), torch.from_numpy(text_vectors),
        torch.tensor([p for _, p in pairs], dtype=torch.long), image_features.encoder, text_features.encoder,
    )
