"""Several encoders of one modality at once: features of each, side by side
(`efficientnet-lite0,efficientnet-lite2+flip`, `minilm-l6,mpnet-base`).

Each part is extracted into its own features directory as usual; readers concatenate the parts per
item, and the mapper's per-dimension standardisation then standardises each part's features.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from PIL import Image

from crossalign.encoders.base import ImageEncoder, TextEncoder

SEPARATOR = ","


def composite_parts(name: str) -> list[str]:
    """The encoder names of a composite name (a single name gives itself)."""
    return [part.strip() for part in name.split(SEPARATOR)]


def composite_description(name: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The identity of concatenated features, from the descriptions of their parts (in order)."""
    return {"encoder": name, "modality": parts[0].get("modality", "image"), "dim": sum(part["dim"] for part in parts),
            "parts": parts}


class _Parts:
    """What a composite of encoders of one modality is: its name, size and identity come from its parts."""

    parts: list[Any]

    def _set_parts(self, parts: list[Any]) -> None:
        self.parts = parts
        self.name = SEPARATOR.join(part.name for part in parts)
        self.dim = sum(part.dim for part in parts)
        self.runtime = parts[0].runtime

    @property
    def weights_digest(self) -> str:
        return hashlib.sha256("".join(part.weights_digest for part in self.parts).encode()).hexdigest()

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"parts": [part.preprocessing for part in self.parts]}

    def describe(self) -> dict[str, Any]:
        return composite_description(self.name, [part.describe() for part in self.parts])


class CompositeImageEncoder(_Parts, ImageEncoder):
    """Image features of several encoders, concatenated in the order named.

    Used where a single image is encoded (search by image); corpus features are extracted part by
    part (`crossalign.extract.extract_image_features` splits the name) and concatenated when read.
    """

    def __init__(self, parts: list[ImageEncoder]) -> None:
        self._set_parts(parts)

    @property
    def preprocess(self) -> Any:
        raise TypeError("a composite encoder has no single input size: use encode_images (each part preprocesses)")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a composite encoder encodes PIL images (encode_images): each part has its own input size")

    def compile(self, batch_size: int) -> None:
        for part in self.parts:
            part.compile(batch_size)

    @property
    def compiled(self) -> bool:
        return all(part.compiled for part in self.parts)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([part.encode_images(images) for part in self.parts], dim=1)


class CompositeTextEncoder(_Parts, TextEncoder):
    """Text features of several encoders, concatenated in the order named (see `CompositeImageEncoder`)."""

    def __init__(self, parts: list[TextEncoder]) -> None:
        self._set_parts(parts)

    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        return torch.cat([part.encode(texts, batch_size=batch_size) for part in self.parts], dim=1)

    def for_queries(self) -> CompositeTextEncoder:
        return CompositeTextEncoder([part.for_queries() for part in self.parts])

    def compile_queries(self, autotune: bool = True) -> bool:
        compiled = [part.compile_queries(autotune) for part in self.parts]  # every part, even after a False
        return any(compiled)

    @property
    def queries_compiled(self) -> bool:
        return all(part.queries_compiled for part in self.parts)
