"""Reading extracted features by encoder name, including several image encoders side by side."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossalign.encoders.composite import composite_description, composite_parts
from crossalign.encoders.registry import canonical_name
from crossalign.extract.manifest import FeatureManifest
from crossalign.extract.shards import ShardLocator, read_features
from crossalign.workspace import Workspace, WorkspaceError


def features_dirs(workspace: Workspace, corpus: str, encoder_name: str) -> list[Path]:
    """The features directory of each part of `encoder_name` (one, unless it is a composite `a,b`) in `corpus`.

    Named by the registry's canonical name of the part (`canonical_name`), the one the loaded encoder
    reports: any spelling of an encoder finds the features that another spelling wrote. The planner,
    the writer and the readers of features all call this.
    """
    return [workspace.features_dir(corpus, part) for part in composite_parts(canonical_name(encoder_name))]


@dataclass
class FeatureSet:
    """The features of one encoder, or of a composite `a,b,...` (each part's features, concatenated)."""

    name: str
    directories: list
    manifests: list[FeatureManifest]

    @classmethod
    def open(cls, workspace: Workspace, corpus: str, name: str) -> FeatureSet:
        """
        `name` in any spelling; the set's `name` is the canonical one.

        Raises:
            WorkspaceError: features of the encoder (or of one of its parts) were never extracted.
        """
        name = canonical_name(name)
        directories = features_dirs(workspace, corpus, name)
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

    def reader(self) -> Callable[[list[str]], np.ndarray]:
        """A function from ids to their vectors (a composite's parts side by side), located through the id index
        and read shard by shard: call it chunk by chunk, and memory holds a chunk and a shard per part,
        whatever the corpus size. Ids given in corpus order read each shard about once (extraction stores
        them in that order).

        Raises (when called):
            WorkspaceError: some ids have no features (of some part).
        """
        locators = [ShardLocator(directory) for directory in self.directories]

        def read(ids: list[str]) -> np.ndarray:
            parts = [locator.read(locator.locate(ids)) for locator in locators]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

        return read

    def chunks(self, ids: list[str], rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors) of `ids`, `rows` at a time in their order (see `reader`)."""
        read = self.reader()
        for start in range(0, len(ids), rows):
            chunk = list(ids[start:start + rows])
            yield chunk, read(chunk)
