"""Write joint embeddings to LanceDB: apply a mapper to cached features, one table version per change.

Each table holds the vectors of one mapper at a time, named in its metadata (the current mapper).
Embedding a corpus with the table's mapper inserts only the items the table lacks (and deletes the
items the corpus no longer has). Embedding with another mapper writes a new table version holding
every corpus of the table re-embedded from its cached features, in one commit; the version each
mapper last wrote is tagged with the mapper id, so older mappers' vectors stay readable
(`crossalign.store.versions.open_table(..., mapper_id=...)`) until `cleanup_tables` compacts the tables and
drops them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lancedb.index import FTS

from crossalign.align.mapper import JointMapper, check_encoder
from crossalign.align.mapper_dir import MapperDir, current_mapper
from crossalign.align.querybank import QueryBank
from crossalign.corpus.rows import iter_batches, table_rows
from crossalign.extract.features import FeatureSet
from crossalign.extract.plan import corpus_table
from crossalign.extract.shards import vectors_to_arrow
from crossalign.progress import ProgressLog
from crossalign.store.index import ensure_index
from crossalign.store.schema import (
    CAPTIONS_TABLE,
    CORPUS_COLUMN,
    DEFAULT_METRIC,
    ID_COLUMN,
    IMAGES_TABLE,
    MAPPER_COLUMN,
    NORMALISER_COLUMN,
    TEXT_COLUMN,
    VECTOR_COLUMN,
    check_metric,
    table_metadata,
    table_schema,
)
from crossalign.store.versions import StoreMismatchError, connect, table_names, tag_version
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)

BATCH_ROWS = 8192
DELETE_CHUNK = 1000


@dataclass
class EmbedSummary:
    """What one embed did (small: passed between Prefect tasks)."""

    mapper_id: str
    images: int  # rows written by this embed
    captions: int
    removed: int  # rows deleted because the corpus no longer has them
    rebuilt: bool  # the tables switched to this mapper (every corpus re-embedded)
    images_in_table: int
    captions_in_table: int
    lancedb_uri: str
    metric: str = DEFAULT_METRIC
    index: dict | None = None
    normalised_rows: int = 0  # rows whose query-bank normaliser this embed computed (0: the mapper has no bank)
    normaliser_seconds: float = 0.0  # time spent computing them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Modality:
    table: str
    modality: str  # "image" or "text": the mapper's side
    id_column: str  # in the corpus table


MODALITIES = (_Modality(IMAGES_TABLE, "image", "image_id"), _Modality(CAPTIONS_TABLE, "text", "caption_id"))


def quote(value: str) -> str:
    """`value` as an SQL string literal for LanceDB filters."""
    return "'" + value.replace("'", "''") + "'"


def embed_corpus(
    workspace: Workspace, corpus: str, mapper_id: str | None = None, metric: str = DEFAULT_METRIC,
) -> EmbedSummary:
    """Map the cached features of `corpus` into the joint space and write what the tables lack.

    With the tables' own mapper and metric, only items new to the tables are mapped and inserted
    (upserts on id), and items gone from the corpus are deleted: re-running changes nothing. With
    another mapper (default: the workspace's current one) or metric, every corpus in the tables is
    re-embedded from cached features into a new version, in one commit per table. Embeds into one
    workspace run one at a time (a workspace lock, across processes), so two runs at once leave
    exactly one row per item.

    Raises:
        WorkspaceError: no mapper, or missing features (of this corpus, or of another corpus the
            tables hold, when switching mapper).
        MapperMismatchError: the features were made by other encoders than the mapper expects.
    """
    check_metric(metric)
    with workspace.lock("tables"):
        return _embed_corpus(workspace, corpus, mapper_id, metric)


def _embed_corpus(workspace: Workspace, corpus: str, mapper_id: str | None, metric: str) -> EmbedSummary:
    mapper_dir = MapperDir.of(workspace, mapper_id) if mapper_id else current_mapper(workspace)
    if not mapper_dir.exists():
        raise WorkspaceError(f"no mapper {mapper_id} in {mapper_dir.path.parent}")
    model, config = mapper_dir.load()
    mapper = _Mapper(model, mapper_dir.querybank(config))
    metadata = {
        "mapper_id": config["mapper_id"], "dim": config["dim"], "metric": metric,
        "image_encoder": config["image_encoder"], "text_encoder": config["text_encoder"],
        "querybank": config.get("querybank"),
    }
    db = connect(workspace)
    current = {m.table: _current_metadata(db, m.table) for m in MODALITIES}
    rebuild = any({k: meta.get(k) for k in ("mapper_id", "metric")} != {k: metadata[k] for k in ("mapper_id", "metric")}
                  for meta in current.values())
    corpora = _corpora_in_tables(db) | {corpus} if rebuild else {corpus}
    sources = {c: _Sources(workspace, c, config) for c in sorted(corpora)}  # all features found before writing
    written, removed, plans = {}, 0, {}
    for spec in MODALITIES:
        schema = table_schema(spec.table, config["dim"], metadata)
        if rebuild:
            table, written[spec.table] = _rebuild(db, spec, schema, sources, mapper)
        else:
            table, written[spec.table], gone = _update(db, spec, schema, sources[corpus], mapper)
            removed += gone
        changed = rebuild or written[spec.table] or removed
        if changed:
            plans[spec.table] = ensure_index(table, metric).describe()
            if spec.table == CAPTIONS_TABLE:
                table.create_index(TEXT_COLUMN, config=FTS(), replace=True)
            tag_version(table, config["mapper_id"])  # last: the tagged version has the indices and their recorded plan
    images, captions = db.open_table(IMAGES_TABLE), db.open_table(CAPTIONS_TABLE)
    logger.info("embedded %s with %s: %d images, %d captions written, %d rows removed%s", corpus,
                config["mapper_id"], written[IMAGES_TABLE], written[CAPTIONS_TABLE], removed,
                " (tables rebuilt for this mapper)" if rebuild else "")
    return EmbedSummary(
        mapper_id=config["mapper_id"], images=written[IMAGES_TABLE], captions=written[CAPTIONS_TABLE],
        removed=removed, rebuilt=rebuild, images_in_table=images.count_rows(), captions_in_table=captions.count_rows(),
        lancedb_uri=str(workspace.lancedb_uri), metric=metric, index=plans.get(IMAGES_TABLE),
        normalised_rows=mapper.normalised_rows, normaliser_seconds=round(mapper.normaliser_seconds, 3),
    )


class _Mapper:
    """A mapper and its query bank, applied to feature chunks; counts the normalisers it computes."""

    def __init__(self, model: JointMapper, bank: QueryBank | None) -> None:
        self.model, self.bank = model, bank
        self.normalised_rows, self.normaliser_seconds = 0, 0.0

    @torch.no_grad()
    def __call__(self, features: np.ndarray, modality: str, keys: list[str]) -> tuple[pa.Array, pa.Array]:
        """Joint vectors of a chunk of `modality` features, and their normalisers (nulls without a bank);
        `keys` are the rows' image ids (`QueryBank.normaliser`)."""
        project = self.model.encode_image if modality == "image" else self.model.encode_text
        joint = project(torch.from_numpy(features))
        if self.bank is None:
            normaliser = pa.nulls(len(joint), pa.float32())
        else:
            start = time.perf_counter()
            normaliser = pa.array(self.bank.normaliser(joint, modality, keys).numpy(), pa.float32())
            self.normaliser_seconds += time.perf_counter() - start
            self.normalised_rows += len(joint)
        return vectors_to_arrow(joint.numpy().astype(np.float32)), normaliser


class _Sources:
    """One corpus's rows and cached features, for both modalities of a mapper, read batch by batch."""

    def __init__(self, workspace: Workspace, corpus: str, config: dict[str, Any]) -> None:
        self.corpus = corpus
        self.tables = {modality: corpus_table(workspace, corpus, modality) for modality in ("image", "text")}
        self.features = {}
        for modality in ("image", "text"):
            features = FeatureSet.open(workspace, corpus, config[f"{modality}_encoder"]["encoder"])
            check_encoder(config, modality, features.encoder)
            self.features[modality] = features

    def rows(self, spec: _Modality) -> Iterator[pa.Table]:
        """The corpus rows of the items that have features (items whose extraction failed are left out), in
        batches of at most `BATCH_ROWS`, in table order."""
        failed = pa.array(sorted(self.features[spec.modality].failed), pa.string())
        for _, table in iter_batches(self.tables[spec.modality], None, BATCH_ROWS):
            if len(failed):
                table = table.filter(pc.invert(pc.is_in(table.column(spec.id_column), value_set=failed)))
            if table.num_rows:
                yield table

    def count(self, spec: _Modality) -> int:
        return table_rows(self.tables[spec.modality]) - len(self.features[spec.modality].failed)

    def batches(self, spec: _Modality, schema: pa.Schema, mapper: _Mapper,
                keep: Callable[[pa.Array], pa.Array] | None = None) -> Iterator[pa.Table]:
        """The joint rows of the items of `rows` (those `keep` marks, if given), `BATCH_ROWS` at a time.

        The corpus table and the features are read batch by batch (the features through their id index,
        `FeatureSet.reader`): memory does not grow with the corpus.
        """
        read = self.features[spec.modality].reader()
        unit = spec.id_column.removesuffix("_id")
        verb = "mapped" if keep is None else "checked for new rows"  # every row of a rebuild is mapped
        progress = ProgressLog(logger, f"embed {self.corpus}", unit, self.count(spec), verb)  # for the run logs
        mapper_id = table_metadata(schema)["mapper_id"]
        for table in self.rows(spec):
            progress.update(table.num_rows)
            if keep is not None:
                table = table.filter(keep(table.column(spec.id_column)))
                if not table.num_rows:
                    continue
            ids = table.column(spec.id_column).to_pylist()
            keys = ids if spec.modality == "image" else table.column("image_id").to_pylist()
            vectors, normaliser = mapper(read(ids), spec.modality, keys)
            arrays = {ID_COLUMN: pa.array(ids, pa.string()), VECTOR_COLUMN: vectors, NORMALISER_COLUMN: normaliser,
                      MAPPER_COLUMN: pa.array([mapper_id] * len(ids), pa.string()),
                      CORPUS_COLUMN: pa.array([self.corpus] * len(ids), pa.string())}
            # the schema's other columns are the corpus table's, by the same name
            yield pa.Table.from_pydict({f.name: arrays[f.name] if f.name in arrays else table.column(f.name)
                                        for f in schema}, schema=schema)


def _rebuild(db: lancedb.DBConnection, spec: _Modality, schema: pa.Schema, sources: dict[str, _Sources],
             mapper: _Mapper) -> tuple[Any, int]:
    """A new version of the table holding every corpus of `sources`, mapped by `model` (one commit)."""
    written = 0

    def tables() -> Iterator[pa.Table]:
        nonlocal written
        for source in sources.values():
            for batch in source.batches(spec, schema, mapper):
                written += batch.num_rows
                yield batch

    with _Streamed(schema, (b for t in tables() for b in t.to_batches())) as data:
        table = db.create_table(spec.table, data=data, schema=schema, mode="overwrite")
    return table, written


def _update(db: lancedb.DBConnection, spec: _Modality, schema: pa.Schema, source: _Sources,
            mapper: _Mapper) -> tuple[Any, int, int]:
    """Insert the items of `source` the table lacks and delete those the corpus lost: (table, inserted, deleted).

    The table's ids of the corpus are held as one sorted fixed-width byte array (33 bytes an id at most
    for crossalign's ids: 330 MB at 10 million), each corpus batch looked up in it by binary search.
    """
    table = db.open_table(spec.table)
    stored = np.sort(np.asarray(table.search().where(f"{CORPUS_COLUMN} = {quote(source.corpus)}")
                                .select([ID_COLUMN]).limit(None).to_arrow().column(ID_COLUMN).cast(pa.binary())
                                .to_numpy(zero_copy_only=False), dtype=bytes))
    seen = np.zeros(len(stored), dtype=bool)

    def new(ids: pa.Array) -> pa.Array:
        wanted = np.asarray(ids.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=bytes)
        at = np.minimum(np.searchsorted(stored, wanted), max(len(stored) - 1, 0))
        found = (stored[at] == wanted) if len(stored) else np.zeros(len(wanted), dtype=bool)
        seen[at[found]] = True
        return pa.array(~found)

    batches = source.batches(spec, schema, mapper, keep=new)
    first = next(batches, None)  # None: no new rows (and every batch read), so no commit: re-running changes nothing
    inserted = 0
    if first is not None:
        def counted() -> Iterator[pa.RecordBatch]:
            nonlocal inserted
            for batch in _chain(first, batches):
                inserted += batch.num_rows
                yield from batch.to_batches()

        upsert_rows(table, counted())
    gone = sorted(item.decode() for item in stored[~seen])
    for start in range(0, len(gone), DELETE_CHUNK):
        listed = ", ".join(quote(item) for item in gone[start:start + DELETE_CHUNK])
        table.delete(f"{CORPUS_COLUMN} = {quote(source.corpus)} AND {ID_COLUMN} IN ({listed})")
    return table, inserted, len(gone)


def _chain(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest


def upsert_rows(table: Any, rows: pa.Table | pa.RecordBatchReader | Iterator[pa.RecordBatch]) -> None:
    """Upsert joint rows on id (one commit). Re-sending a row replaces it; nothing is duplicated.

    Raises:
        StoreMismatchError: the rows' vectors have another dimension than the table's, or were made
            by another mapper than the one the table's metadata names.
    """
    schema, mapper_id = table.schema, table_metadata(table.schema).get("mapper_id")
    have = schema.field(VECTOR_COLUMN).type

    def checked(batch: pa.RecordBatch) -> pa.RecordBatch:
        wanted = batch.schema.field(VECTOR_COLUMN).type
        if not pa.types.is_fixed_size_list(wanted) or (wanted.list_size, wanted.value_type) != (
                have.list_size, have.value_type):
            offered = f"{wanted.list_size}-d {wanted.value_type}" if pa.types.is_fixed_size_list(wanted) else wanted
            raise StoreMismatchError(
                f"table {table.name} holds {have.list_size}-d {have.value_type} vectors; "
                f"refusing rows of {offered} vectors"
            )
        found = set(batch.column(MAPPER_COLUMN).to_pylist()) - {mapper_id}
        if found:
            raise StoreMismatchError(
                f"table {table.name} holds vectors of mapper {mapper_id}; refusing rows of {sorted(found)[0]}: "
                "embed the corpus with that mapper to switch the table to it"
            )
        return batch.select(schema.names).cast(schema)

    batches = rows.to_batches() if isinstance(rows, pa.Table) else rows
    with _Streamed(table.schema, batches, checked) as data:
        table.merge_insert(ID_COLUMN).when_matched_update_all().when_not_matched_insert_all().execute(data)


class _Streamed:
    """A RecordBatchReader over Python-made batches for LanceDB to consume, re-raising the first error
    the batches raised as itself (LanceDB would wrap it in a RuntimeError naming the C data interface)."""

    def __init__(self, schema: pa.Schema, batches: Any, check: Any = None) -> None:
        self.error: BaseException | None = None

        def guarded() -> Iterator[pa.RecordBatch]:
            try:
                for batch in batches:
                    yield check(batch) if check else batch
            except BaseException as err:
                self.error = err
                raise

        self.reader = pa.RecordBatchReader.from_batches(schema, guarded())

    def __enter__(self) -> pa.RecordBatchReader:
        return self.reader

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if value is not None and self.error is not None and value is not self.error:
            raise self.error from None


def _current_metadata(db: lancedb.DBConnection, name: str) -> dict[str, Any]:
    return table_metadata(db.open_table(name).schema) if name in table_names(db) else {}


def _corpora_in_tables(db: lancedb.DBConnection) -> set[str]:
    corpora: set[str] = set()
    for spec in MODALITIES:
        if spec.table in table_names(db):
            column = (db.open_table(spec.table).search().select([CORPUS_COLUMN]).limit(None).to_arrow()
                      .column(CORPUS_COLUMN))
            corpora |= set(column.unique().to_pylist())
    return corpora
