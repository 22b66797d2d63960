"""The workspace: one directory holding every table a run writes (see DESIGN.md)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class WorkspaceError(RuntimeError):
    """The workspace lacks something a stage needs (a corpus, features, a mapper)."""


@dataclass(frozen=True)
class Workspace:
    """Paths inside a workspace directory.

    Layout::

        corpora/<corpus>/{images,captions,rejects}.parquet
        features/<corpus>/<encoder_id>/part-*.parquet + _manifest.json
        mappers/<mapper_id>/...           one directory per mapper (crossalign.align.mapper_dir)
        mappers/CURRENT                   id of the mapper the tables were built with
        lancedb/                          the LanceDB database
        .locks/                           lock files of work that two runs must not do at once
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def corpus_dir(self, corpus: str) -> Path:
        return self.root / "corpora" / corpus

    def images_table(self, corpus: str) -> Path:
        return self.corpus_dir(corpus) / "images.parquet"

    def captions_table(self, corpus: str) -> Path:
        return self.corpus_dir(corpus) / "captions.parquet"

    def rejects_table(self, corpus: str) -> Path:
        return self.corpus_dir(corpus) / "rejects.parquet"

    def features_dir(self, corpus: str, encoder_name: str) -> Path:
        # Encoder names may hold ':', '@', '#' and '/' (torchvision:resnet50@random, hf:/models/bert#cls).
        return self.root / "features" / corpus / re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_name).strip("_")

    @property
    def lancedb_uri(self) -> Path:
        return self.root / "lancedb"

    # A mapper's layout, `mappers/` included, is `crossalign.align.mapper_dir`'s; these delegate to it.
    def mapper_dir(self, mapper_id: str) -> Path:
        """Directory of mapper `mapper_id` (`MapperDir.of`)."""
        from crossalign.align.mapper_dir import MapperDir

        return MapperDir.of(self, mapper_id).path

    def current_mapper_id(self) -> str | None:
        """The id of the workspace's current mapper, or None when none was trained yet."""
        from crossalign.align.mapper_dir import current_mapper_id

        return current_mapper_id(self)

    def require_current_mapper(self) -> Path:
        """Directory of the current mapper; raises WorkspaceError when there is none."""
        from crossalign.align.mapper_dir import current_mapper

        return current_mapper(self).path

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the workspace-wide lock `name` (blocking) against other processes and threads (see `file_lock`)."""
        with file_lock(self.root / ".locks" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.lock"):
            yield


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) until the block ends; blocks while another holds it.

    Each call opens the file anew, so the lock excludes other threads of this process as well as other
    processes (on other machines too where the shared filesystem supports locks, as NFS v4 does). The
    kernel drops the lock when its holder dies, so a killed run never leaves the workspace locked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # unique per writer
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    """JSON version of `write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
