"""Search the joint tables: text -> image and image -> text, with the encoders and mapper that built them."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from crossalign.align.mapper import check_encoder, load_mapper
from crossalign.encoders import ImageEncoder, TextEncoder, load_encoder
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE, connect, table_metadata, table_names
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query that cannot be run (an unreadable image, an empty text)."""


@dataclass
class SearchHit:
    """One result: rank (1-based), cosine similarity, and what was found."""

    rank: int
    score: float
    id: str
    uri: str | None = None  # for images
    text: str | None = None  # for captions
    image_id: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Searcher:
    """Embeds queries exactly as the tables were built (mapper and encoders read from table metadata).

    Encoders load lazily: a text-only session never loads the image encoder.
    """

    def __init__(self, workspace: Workspace | Path | str, device: str = "auto", precision: str = "auto") -> None:
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
        self._db = connect(self.workspace)
        missing = {IMAGES_TABLE, CAPTIONS_TABLE} - set(table_names(self._db))
        if missing:
            raise WorkspaceError(
                f"no {' or '.join(sorted(missing))} table in {self.workspace.lancedb_uri}: "
                f"run `crossalign run --corpus DIR --workspace {self.workspace.root}` first"
            )
        self._tables = {name: self._db.open_table(name) for name in (IMAGES_TABLE, CAPTIONS_TABLE)}
        self.metadata = table_metadata(self._tables[IMAGES_TABLE].schema)
        mapper_dir = self.workspace.mapper_dir(self.metadata["mapper_id"])
        if not mapper_dir.exists():
            raise WorkspaceError(
                f"the tables were built by mapper {self.metadata['mapper_id']}, which is not in {mapper_dir}"
            )
        self.mapper, self.mapper_config = load_mapper(mapper_dir)
        self._device, self._precision = device, precision

    def _encoder(self, modality: str) -> ImageEncoder | TextEncoder:
        expected = self.mapper_config[f"{modality}_encoder"]
        encoder = load_encoder(expected["encoder"], self._device, self._precision)
        check_encoder(self.mapper_config, modality, encoder.describe())
        return encoder

    def embed_text(self, text: str) -> np.ndarray:
        """The joint vector of a text query."""
        if not text.strip():
            raise QueryError("the text query is empty")
        features = self._encoder("text").encode([text])
        return _joint(self.mapper.encode_text, features)

    def embed_image(self, path: Path | str) -> np.ndarray:
        """The joint vector of an image file.

        Raises:
            QueryError: the file is missing or not a readable image.
        """
        encoder = self._encoder("image")
        try:
            with Image.open(path) as img:
                features = encoder.encode_images([img])
        except (FileNotFoundError, IsADirectoryError):
            raise QueryError(f"query image {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise QueryError(f"query image {path} cannot be read as an image: {err}") from None
        return _joint(self.mapper.encode_image, features)

    def text_to_image(self, text: str, limit: int = 5, split: str | None = None) -> list[SearchHit]:
        """The `limit` images nearest to a text query."""
        return self._search(IMAGES_TABLE, self.embed_text(text), limit, split)

    def image_to_text(self, path: Path | str, limit: int = 5, split: str | None = None) -> list[SearchHit]:
        """The `limit` captions nearest to an image file."""
        return self._search(CAPTIONS_TABLE, self.embed_image(path), limit, split)

    def _search(self, table: str, vector: np.ndarray, limit: int, split: str | None) -> list[SearchHit]:
        columns = ["id", "uri", "split"] if table == IMAGES_TABLE else ["id", "text", "image_id", "split"]
        query = self._tables[table].search(vector).distance_type("cosine").limit(limit)
        if split is not None:
            query = query.where(f"split = '{split.replace(chr(39), chr(39) * 2)}'", prefilter=True)
        rows = query.select([*columns, "_distance"]).to_list()
        return [SearchHit(rank=i, score=round(1.0 - row.pop("_distance"), 4), **row) for i, row in enumerate(rows, 1)]


def _joint(project: Any, features: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return project(features)[0].numpy().astype(np.float32)


def search_text(workspace: Workspace | Path | str, text: str, limit: int = 5) -> list[SearchHit]:
    """One-shot text -> image search (loads the mapper and text encoder each call)."""
    return Searcher(workspace).text_to_image(text, limit)



