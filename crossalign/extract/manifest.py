"""The feature manifest: which encoder made a features directory, and which shards are complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crossalign.workspace import file_lock, write_json_atomic

MANIFEST_NAME = "_manifest.json"


def _locks_dir(directory: Path) -> Path:
    # Beside the features directory, not in it: the directory holds only the manifest and the shards.
    return Path(directory).parent / ".locks" / Path(directory).name


@contextlib.contextmanager
def manifest_lock(directory: Path) -> Iterator[None]:
    """Hold the lock every read-modify-write of the manifest of `directory` takes (processes and threads)."""
    with file_lock(_locks_dir(directory) / "manifest.lock"):
        yield


@contextlib.contextmanager
def claim(directory: Path, ids: list[str]) -> Iterator[None]:
    """Hold the claim on encoding exactly `ids` into `directory`: a second claimant waits for the first.

    Two runs that planned the same work then do it once: the second finds the ids recorded when its
    wait ends. (Runs whose work only overlaps still both encode the overlap; the shard commit keeps
    one copy.) The claim file is removed once the work is recorded; whoever opened it before that
    finds the work done, so removing it cannot let two claimants encode the same ids.
    """
    path = _locks_dir(directory) / f"claim-{hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:24]}.lock"
    with file_lock(path):
        yield
        path.unlink(missing_ok=True)


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
