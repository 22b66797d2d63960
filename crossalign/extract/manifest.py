"""The feature manifest: which encoder made a features directory, and which shards are complete."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crossalign.workspace import write_json_atomic

MANIFEST_NAME = "_manifest.json"


class FeatureMismatchError(ValueError):
    """Features on disk were made by another encoder, other weights or other preprocessing."""


@dataclass
class FeatureManifest:
    """Identity of the features in a directory plus the list of finished shards."""

    encoder: dict[str, Any]
    dtype: str = "float32"
    shards: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # item id -> why it could not be encoded

    @property
    def dim(self) -> int:
        return int(self.encoder["dim"])

    def next_shard_name(self) -> str:
        return f"part-{len(self.shards):05d}.parquet"

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_NAME, asdict(self))

    @classmethod
    def load(cls, directory: Path) -> FeatureManifest | None:
        """The manifest in `directory`, or None when there is none yet."""
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    @classmethod
    def open_for(cls, directory: Path, encoder: dict[str, Any]) -> FeatureManifest:
        """Load the manifest of `directory`, or start one; refuse features of another encoder.

        Raises:
            FeatureMismatchError: the directory holds features whose encoder description differs.
        """
        manifest = cls.load(directory)
        if manifest is None:
            return cls(encoder=encoder)
        if manifest.encoder != encoder:
            changed = sorted(k for k in set(encoder) | set(manifest.encoder)
                             if encoder.get(k) != manifest.encoder.get(k))
            raise FeatureMismatchError(
                f"{directory} holds features of a different encoder setup (differs in: {', '.join(changed)}); "
                "use another workspace or remove that directory to re-extract"
            )
        return manifest
