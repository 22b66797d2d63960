"""Reading extracted features by encoder name, including several image encoders side by side."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from crossalign.encoders.composite import composite_description, composite_parts
from crossalign.extract.manifest import FeatureManifest
from crossalign.extract.shards import ShardLocator, read_features
from crossalign.workspace import Workspace, WorkspaceError


@dataclass
class FeatureSet:
    """The features of one encoder, or of a composite `a,b,...` (each part's features, concatenated)."""

    name: str
    directories: list
    manifests: list[FeatureManifest]

    @classmethod
    def open(cls, workspace: Workspace, corpus: str, name: str) -> FeatureSet:
        """
        Raises:
            WorkspaceError: features of the encoder (or of one of its parts) were never extracted.
        """
        directories = [workspace.features_dir(corpus, part) for part in composite_parts(name)]
        manifests = [FeatureManifest.load(directory) for directory in directories]
        missing = [part for part, manifest in zip(composite_parts(name), manifests) if manifest is None]
        if missing:
            raise WorkspaceError(f"no {missing[0]} features for corpus {corpus!r}: run extraction first")
        return cls(name, directories, manifests)

    @property
    def encoder(self) -> dict[str, Any]:
        """The description of the encoder that made these features (as `Encoder.describe()` gives it)."""
        if len(self.manifests) == 1:
            return self.manifests[0].encoder
        return composite_description(self.name, [manifest.encoder for manifest in self.manifests])

    @property
    def failed(self) -> dict[str, str]:
        """Items that could not be encoded (by any part), with the reason."""
        failed: dict[str, str] = {}
        for manifest in self.manifests:
            failed.update(manifest.failed)
        return failed

    def read(self, ids: list[str]) -> tuple[list[str], np.ndarray]:
        """(ids, vectors) of exactly `ids`, in order; a composite's parts side by side."""
        parts = [read_features(directory, ids)[1] for directory in self.directories]
        return list(ids), parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def chunks(self, ids: list[str], rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors) of `ids`, at most `rows` at a time: each id once, in the order its features are stored.

        Memory holds one chunk and a shard per part, whatever the corpus size (`read` holds everything).
        Every id is located before the first chunk is yielded.

        Raises:
            WorkspaceError: some ids have no features (of some part).
        """
        locators = [ShardLocator(directory) for directory in self.directories]
        wanted = pa.array(ids, pa.string())
        located = [locator.locate(wanted) for locator in locators]
        order = np.argsort(located[0], kind="stable")  # the first part's storage order: each shard read once
        for start in range(0, len(order), rows):
            take = order[start:start + rows]
            parts = [locator.read(at[take]) for locator, at in zip(locators, located)]
            yield [ids[i] for i in take], parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
