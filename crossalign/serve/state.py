"""What the service answers from: a `Searcher` over the tables' latest versions, swapped when they change.

A watcher thread checks the two tables' versions every `refresh_seconds`. When a run embedded rows (a new
version) or switched the tables to a new mapper, it builds a new `Searcher` beside the old one, warms it
(the encoders are cached per process, so only the mapper, its query bank and the table handles load), and
swaps the reference. A request takes the snapshot current when it starts and keeps it to its end, so
requests in flight finish on the version they began with: LanceDB keeps that version's files until
`crossalign tables cleanup` deletes old versions. While a run is half-way (the images table rebuilt for a
new mapper, the captions table not yet), building fails with a mismatch: the old snapshot keeps serving,
and the next check tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossalign.search import Searcher
from crossalign.serve.batching import QUERY_ENCODER
from crossalign.serve.compiling import QueryCompiler
from crossalign.serve.config import ServeConfig
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE, StoreMismatchError, connect, mapper_versions, open_table
from crossalign.store.tables import table_names
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)
TABLES = (IMAGES_TABLE, CAPTIONS_TABLE)


class UnknownMapperError(LookupError):
    """A request named a mapper whose vectors the tables do not hold."""


@dataclass
class Snapshot:
    """One consistent view: a Searcher and its own handles on the same table versions."""

    searcher: Searcher
    tables: dict[str, Any]  # name -> LanceDB table, at `versions`
    versions: dict[str, int]
    rows: dict[str, int]
    loaded_at: float = field(default_factory=time.time)

    @property
    def mapper_id(self) -> str:
        return self.searcher.metadata["mapper_id"]


def latest_versions(workspace: Workspace) -> dict[str, int]:
    """The latest version of each joint table (a fresh connection: what a new reader would see).

    Raises:
        WorkspaceError: a table is missing.
    """
    db = connect(workspace)
    names = table_names(db)
    missing = [name for name in TABLES if name not in names]
    if missing:
        raise WorkspaceError(f"no {missing[0]} table in {workspace.lancedb_uri}: run `crossalign run` first")
    return {name: db.open_table(name).version for name in TABLES}


class SearcherPool:
    """The current snapshot (and older mappers' ones, built on first use), kept fresh by a watcher thread.

    Raises (at construction):
        WorkspaceError, StoreMismatchError: the tables cannot be searched.
    """

    def __init__(self, workspace: Workspace, config: ServeConfig) -> None:
        self.workspace, self.config = workspace, config
        self._lock = threading.Lock()  # guards the older mappers' cache, not the current reference
        self._older: dict[str, Snapshot] = {}
        self._known_mappers: set[str] = set()
        self.compiler = QueryCompiler(config)
        self.current = self._build(None)
        self._refresh_known()
        self.last_check, self.last_error = time.time(), None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _build(self, mapper_id: str | None) -> Snapshot:
        searcher = Searcher(self.workspace, mapper_id=mapper_id, device=self.config.device,
                            precision=self.config.precision, normalisation=self.config.normalisation)
        db = connect(self.workspace)
        tables = {name: open_table(db, name, mapper_id) for name in TABLES}
        snapshot = Snapshot(searcher, tables, {n: t.version for n, t in tables.items()},
                            {n: t.count_rows() for n, t in tables.items()})
        _warm(searcher)
        self.compiler.submit(searcher)  # a no-op once its encoders are compiled (they are shared)
        return snapshot

    def _refresh_known(self) -> None:
        self._known_mappers = {v.mapper_id for v in mapper_versions(self.workspace)}

    def get(self, mapper_id: str | None = None) -> Snapshot:
        """The snapshot of `mapper_id` (default: the current mapper).

        Raises:
            UnknownMapperError: the tables hold no vectors of `mapper_id`.
        """
        current = self.current
        if mapper_id is None or mapper_id == current.mapper_id:
            return current
        # Only ids the tables' tags name go further: a request's string never reaches a path.
        if mapper_id not in self._known_mappers:
            raise UnknownMapperError(f"unknown mapper {mapper_id[:80]!r}: the tables hold vectors of "
                                     f"{', '.join(sorted(self._known_mappers))}")
        with self._lock:
            if mapper_id not in self._older:
                try:
                    self._older[mapper_id] = self._build(mapper_id)
                except StoreMismatchError as err:  # the tag went away since the last listing
                    raise UnknownMapperError(str(err).splitlines()[0]) from None
            return self._older[mapper_id]

    def refresh(self) -> bool:
        """Swap in a new snapshot when a table has a newer version; True when it did. Errors are logged and
        kept in `last_error` (the old snapshot keeps serving)."""
        self.last_check = time.time()
        try:
            versions = latest_versions(self.workspace)
            if versions == self.current.versions:
                self.last_error = None
                return False
            fresh = self._build(None)
            self._refresh_known()
        except Exception as err:  # a run half-way through, a file being replaced: try again next time
            self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            logger.info("tables changed, not reloaded yet: %s", self.last_error)
            return False
        old, self.current, self.last_error = self.current, fresh, None
        with self._lock:
            self._older.clear()  # tags may have moved with the new versions
        logger.info("tables reloaded: %s -> %s (mapper %s -> %s)", old.versions, fresh.versions, old.mapper_id,
                    fresh.mapper_id)
        return True

    def start(self) -> None:
        """Start the watcher and compiler threads (idempotent)."""
        self.compiler.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="crossalign-serve-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.compiler.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.refresh_seconds):
            self.refresh()


def _warm(searcher: Searcher) -> None:
    """Load the text encoder and read each table's normaliser floor now, not in the first request."""
    vector = np.zeros(searcher.metadata["dim"], dtype=np.float32)
    vector[0] = 1.0
    QUERY_ENCODER.embed_text(searcher, "warm up")  # the encoders are shared with the requests in flight
    for name in TABLES:
        searcher.search_vector(name, vector, 1, normalise=True)
