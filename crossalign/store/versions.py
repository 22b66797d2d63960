"""The joint tables' versions: the LanceDB connection, the tag of each mapper's version, reading an older
mapper's vectors, and compacting the tables down to the current version.

The version each mapper last wrote is tagged with the mapper id (after its indices are built, so the
tagged version searches as it did then); `open_table(..., mapper_id=...)` checks it out.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import lancedb

from crossalign.store.schema import CAPTIONS_TABLE, IMAGES_TABLE, table_metadata
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)
TABLES = (IMAGES_TABLE, CAPTIONS_TABLE)


class StoreMismatchError(ValueError):
    """Vectors of another mapper or dimension offered to a table, or a mapper the table does not hold."""


def connect(workspace: Workspace) -> lancedb.DBConnection:
    """The workspace's LanceDB database."""
    return lancedb.connect(str(workspace.lancedb_uri))


def table_names(db: lancedb.DBConnection) -> list[str]:
    """Names of the tables in `db` (across LanceDB API versions)."""
    listed = db.list_tables() if hasattr(db, "list_tables") else db.table_names()
    return list(getattr(listed, "tables", listed))


def tag_version(table: Any, mapper_id: str) -> None:
    """Tag the table's latest version with the mapper that wrote it."""
    if mapper_id in table.tags.list():
        table.tags.update(mapper_id, table.version)
    else:
        table.tags.create(mapper_id, table.version)


def open_table(db: lancedb.DBConnection, name: str, mapper_id: str | None = None) -> Any:
    """A joint table as the mapper `mapper_id` wrote it (default: the current version).

    Raises:
        WorkspaceError: no such table.
        StoreMismatchError: the table holds no vectors of that mapper (any more), naming those it holds.
    """
    if name not in table_names(db):
        raise WorkspaceError(f"no {name} table in {db.uri}: run `crossalign run` or `crossalign embed` first")
    table = db.open_table(name)
    current = table_metadata(table.schema).get("mapper_id")
    if mapper_id is None or mapper_id == current:
        return table
    if mapper_id not in table.tags.list():
        older = sorted(set(table.tags.list()) - {current})
        raise StoreMismatchError(
            f"table {name} holds no vectors of mapper {mapper_id}: current {current}"
            + (f", older {', '.join(older)}" if older else "")
            + f"; run `crossalign embed --mapper {mapper_id}` to embed with it"
        )
    table.checkout(mapper_id)
    return table


@dataclass
class MapperVersion:
    """One mapper's vectors in one table."""

    table: str
    mapper_id: str
    version: int
    current: bool
    rows: int


def mapper_versions(workspace: Workspace) -> list[MapperVersion]:
    """Every mapper whose vectors the tables hold, the current one first per table."""
    db = connect(workspace)
    found = []
    for name in TABLES:
        if name not in table_names(db):
            continue
        table = db.open_table(name)
        current = table_metadata(table.schema).get("mapper_id")
        for mapper_id, tag in sorted(table.tags.list().items(), key=lambda kv: -kv[1]["version"]):
            rows = table.count_rows() if mapper_id == current else open_table(db, name, mapper_id).count_rows()
            found.append(MapperVersion(name, mapper_id, tag["version"], mapper_id == current, rows))
    return found


def cleanup_tables(workspace: Workspace) -> dict[str, dict[str, Any]]:
    """Compact each table and delete every version but the current one, older mappers' vectors included.

    Older mappers can be re-embedded from the cached features (`crossalign embed --mapper ID`).
    Returns, per table, the versions before and after and the mappers whose vectors were dropped.
    """
    with workspace.lock("tables"):
        return _cleanup_tables(workspace)


def _cleanup_tables(workspace: Workspace) -> dict[str, dict[str, Any]]:
    db = connect(workspace)
    report = {}
    for name in TABLES:
        if name not in table_names(db):
            continue
        table = db.open_table(name)
        current = table_metadata(table.schema).get("mapper_id")
        before, tags = len(table.list_versions()), table.tags.list()
        for tag in tags:
            table.tags.delete(tag)
        with warnings.catch_warnings():  # "removes every version except the latest": what this command is for
            warnings.filterwarnings("ignore", message="optimize.cleanup_older_than=0")
            table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
        if current:
            tag_version(table, current)
        report[name] = {"versions_before": before, "versions_after": len(table.list_versions()),
                              "dropped_mappers": sorted(set(tags) - {current})}
        logger.info("%s: %d versions -> %d", name, before, report[name]["versions_after"])
    return report
