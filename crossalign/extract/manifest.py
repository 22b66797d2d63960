"""The feature manifest: which encoder made a features directory, and which shards are complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossalign.extract import ledger
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
    """Identity of the features in a directory (the encoder's description: `_manifest.json`), with the
    finished shards and the failed items as its ledger records them (`crossalign.extract.ledger`).

    Loading it reads the whole record (O(shards + failures)): for readers and tools. The extraction path
    itself checks the identity (`check_identity`) and appends to the ledger without loading it.
    """

    encoder: dict[str, Any]
    dtype: str = "float32"
    shards: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # item id -> why it could not be encoded

    @property
    def dim(self) -> int:
        return int(self.encoder["dim"])

    def save(self, directory: Path) -> None:
        """Write this manifest: its identity, and its shards and failures as the ledger's whole record (a tool's
        repair; extraction appends instead)."""
        with manifest_lock(directory):
            write_identity(directory, self.encoder, self.dtype)
            with ledger.connect(directory, write=True) as con:
                ledger.replace_all(con, self.shards, self.failed)

    @classmethod
    def load(cls, directory: Path) -> FeatureManifest | None:
        """The manifest in `directory`, or None when there is none yet."""
        identity = _read_identity(directory)
        if identity is None:
            return None
        with ledger.connect(directory) as con:
            return cls(identity["encoder"], identity.get("dtype", "float32"), ledger.shards(con), ledger.failed(con))

    @classmethod
    def open_for(cls, directory: Path, encoder: dict[str, Any]) -> FeatureManifest:
        """Load the manifest of `directory`, or start one; refuse features of another encoder.

        Raises:
            FeatureMismatchError: the directory holds features whose encoder description differs.
        """
        check_identity(directory, encoder)
        return cls.load(directory) or cls(encoder=encoder)


def check_identity(directory: Path, encoder: dict[str, Any]) -> None:
    """Refuse to add `encoder`'s features to `directory` when it holds another encoder setup's (reads only the
    identity, whatever the directory holds).

    Raises:
        FeatureMismatchError: names the directory and the fields of the description that differ.
    """
    identity = _read_identity(directory)
    if identity is not None and identity["encoder"] != encoder:
        saved = identity["encoder"]
        changed = sorted(k for k in set(encoder) | set(saved) if encoder.get(k) != saved.get(k))
        raise FeatureMismatchError(
            f"{directory} holds features of a different encoder setup (differs in: {', '.join(changed)}); "
            "use another workspace or remove that directory to re-extract"
        )


def ensure_identity(directory: Path, encoder: dict[str, Any]) -> None:
    """Refuse another encoder's directory (`check_identity`); write the identity of a new one (lock held)."""
    check_identity(directory, encoder)
    if not (Path(directory) / MANIFEST_NAME).exists():
        write_identity(directory, encoder)


def write_identity(directory: Path, encoder: dict[str, Any], dtype: str = "float32") -> None:
    """Write the identity file of `directory` (with the manifest lock held)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(directory) / MANIFEST_NAME, {"encoder": encoder, "dtype": dtype})


def _read_identity(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if "shards" in data:  # written by an older crossalign: its record moves to the ledger once
        _migrate(directory)
        data = json.loads(path.read_text())
    return data


def _migrate(directory: Path) -> None:
    """Move an older manifest's shard list and failures into the ledger, then drop them from the JSON."""
    with manifest_lock(directory):
        path = Path(directory) / MANIFEST_NAME
        data = json.loads(path.read_text())
        if "shards" not in data:  # another process migrated it while this one waited for the lock
            return
        with ledger.connect(directory, write=True) as con:
            ledger.replace_all(con, data["shards"], data.get("failed", {}))
        write_identity(directory, data["encoder"], data.get("dtype", "float32"))
