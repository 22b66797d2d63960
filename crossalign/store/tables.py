"""Write joint embeddings to LanceDB: apply the mapper to cached features, upsert on id."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import torch

from crossalign.align.mapper import check_encoder, load_mapper
from crossalign.corpus import read_captions, read_images
from crossalign.extract.features import FeatureSet
from crossalign.extract.shards import vectors_to_arrow
from crossalign.store.schema import (
    CAPTIONS_TABLE,
    DEFAULT_METRIC,
    IMAGES_TABLE,
    captions_schema,
    images_schema,
    table_metadata,
)
from crossalign.workspace import Workspace

logger = logging.getLogger(__name__)

BATCH_ROWS = 8192


@dataclass
class EmbedSummary:
    """What one embed did (small: passed between Prefect tasks)."""

    mapper_id: str
    images: int
    captions: int
    images_in_table: int
    captions_in_table: int
    lancedb_uri: str

    def to_dict(self) -> dict:
        return asdict(self)


def connect(workspace: Workspace) -> lancedb.DBConnection:
    """The workspace's LanceDB database."""
    return lancedb.connect(str(workspace.lancedb_uri))


def table_names(db: lancedb.DBConnection) -> list[str]:
    """Names of the tables in `db` (across LanceDB API versions)."""
    listed = db.list_tables() if hasattr(db, "list_tables") else db.table_names()
    return list(getattr(listed, "tables", listed))


def embed_corpus(workspace: Workspace, corpus: str, mapper_id: str | None = None) -> EmbedSummary:
    """Map every cached feature of `corpus` into the joint space and upsert it into LanceDB.

    Upserts are keyed on id, so re-running changes nothing. A table built by another mapper is
    rebuilt: vectors of two mappers are never mixed in one table.

    Raises:
        WorkspaceError: no mapper, or missing features.
        MapperMismatchError: the features were made by other encoders than the mapper expects.
    """
    mapper_dir = workspace.mapper_dir(mapper_id) if mapper_id else workspace.require_current_mapper()
    model, config = load_mapper(mapper_dir)
    metadata = {
        "mapper_id": config["mapper_id"], "dim": config["dim"], "metric": DEFAULT_METRIC,
        "image_encoder": config["image_encoder"], "text_encoder": config["text_encoder"],
    }
    db = connect(workspace)
    images = read_images(workspace, corpus)
    captions = read_captions(workspace, corpus)
    n_images = _embed_rows(
        db, IMAGES_TABLE, images_schema(config["dim"], metadata), workspace, corpus, "image", config,
        ids=images.column("image_id").to_pylist(),
        columns={"uri": images.column("uri"), "split": images.column("split")},
        encode=model.encode_image,
    )
    n_captions = _embed_rows(
        db, CAPTIONS_TABLE, captions_schema(config["dim"], metadata), workspace, corpus, "text", config,
        ids=captions.column("caption_id").to_pylist(),
        columns={"text": captions.column("text"), "image_id": captions.column("image_id"),
                 "split": captions.column("split")},
        encode=model.encode_text,
    )
    return EmbedSummary(
        mapper_id=config["mapper_id"], images=n_images, captions=n_captions,
        images_in_table=db.open_table(IMAGES_TABLE).count_rows(),
        captions_in_table=db.open_table(CAPTIONS_TABLE).count_rows(), lancedb_uri=str(workspace.lancedb_uri),
    )


def _open_or_create(db: lancedb.DBConnection, name: str, schema: pa.Schema) -> Any:
    wanted = table_metadata(schema)
    if name in table_names(db):
        table = db.open_table(name)
        if table_metadata(table.schema).get("mapper_id") == wanted["mapper_id"]:
            return table
        logger.warning("table %s was built by another mapper: rebuilding it for %s", name, wanted["mapper_id"])
    return db.create_table(name, schema=schema, mode="overwrite")


def _embed_rows(
    db: lancedb.DBConnection, name: str, schema: pa.Schema, workspace: Workspace, corpus: str, modality: str,
    config: dict[str, Any], ids: list[str], columns: dict[str, pa.ChunkedArray],
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    features_set = FeatureSet.open(workspace, corpus, config[f"{modality}_encoder"]["encoder"])
    check_encoder(config, modality, features_set.encoder)
    failed = features_set.failed
    keep = [i for i, item in enumerate(ids) if item not in failed]
    keep_ids, features = features_set.read([ids[i] for i in keep])
    table = _open_or_create(db, name, schema)
    for start in range(0, len(keep), BATCH_ROWS):
        rows = keep[start:start + BATCH_ROWS]
        with torch.no_grad():
            joint = encode(torch.from_numpy(features[start:start + BATCH_ROWS])).numpy().astype(np.float32)
        take = pa.array(rows)
        arrays = {"id": pa.array(keep_ids[start:start + BATCH_ROWS], pa.string()), "vector": vectors_to_arrow(joint),
                  "mapper_id": pa.array([config["mapper_id"]] * len(rows), pa.string()),
                  "corpus": pa.array([corpus] * len(rows), pa.string()),
                  **{key: column.take(take) for key, column in columns.items()}}
        batch = pa.Table.from_pydict({f.name: arrays[f.name] for f in schema}, schema=schema)
        table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(batch)
    logger.info("%s: upserted %d rows of corpus %s", name, len(keep), corpus)
    return len(keep)
