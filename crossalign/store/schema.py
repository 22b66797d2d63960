"""Schemas of the LanceDB output tables, declared once; the table metadata names the mapper and encoders."""

from __future__ import annotations

import json
from typing import Any, get_args

import pyarrow as pa

from crossalign.config import Metric, StoreConfig

IMAGES_TABLE = "images"
CAPTIONS_TABLE = "captions"
METADATA_KEY = b"crossalign"  # JSON: mapper_id, dim, metric, image_encoder, text_encoder
DEFAULT_METRIC: str = StoreConfig().metric
# Query-bank normaliser of each row (crossalign/align/querybank.py), in cosine units: search ranks a row by
# `cosine(query, row) - qb_norm`. Null where the mapper has no query bank (saved before banks were).
NORMALISER_COLUMN = "qb_norm"
METRICS: tuple[str, ...] = get_args(Metric)
# Columns every joint table has; embed writes these, and copies the others from the corpus table by name.
ID_COLUMN = "id"
VECTOR_COLUMN = "vector"
MAPPER_COLUMN = "mapper_id"
SPLIT_COLUMN = "split"
CORPUS_COLUMN = "corpus"
TEXT_COLUMN = "text"  # of captions, also indexed for full-text search


def check_metric(metric: str) -> str:
    """`metric` if LanceDB can search by it, else a ValueError naming the allowed ones."""
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}: use one of {', '.join(METRICS)}")
    return metric


def _vector(dim: int) -> pa.Field:
    return pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim), nullable=False)


def _normaliser() -> pa.Field:
    return pa.field(NORMALISER_COLUMN, pa.float32(), nullable=True)


def images_schema(dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The `images` table: one joint vector per image."""
    fields = [
        pa.field(ID_COLUMN, pa.string(), nullable=False),
        _vector(dim),
        pa.field(MAPPER_COLUMN, pa.string(), nullable=False),
        _normaliser(),
        pa.field("uri", pa.string(), nullable=False),
        pa.field(SPLIT_COLUMN, pa.string(), nullable=False),
        pa.field(CORPUS_COLUMN, pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata=_encode(metadata))


def captions_schema(dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The `captions` table: one joint vector per caption, with the id of the image it describes."""
    fields = [
        pa.field(ID_COLUMN, pa.string(), nullable=False),
        _vector(dim),
        pa.field(MAPPER_COLUMN, pa.string(), nullable=False),
        _normaliser(),
        pa.field(TEXT_COLUMN, pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field(SPLIT_COLUMN, pa.string(), nullable=False),
        pa.field(CORPUS_COLUMN, pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata=_encode(metadata))


def table_schema(table: str, dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The schema of joint table `table` (`IMAGES_TABLE` or `CAPTIONS_TABLE`)."""
    return {IMAGES_TABLE: images_schema, CAPTIONS_TABLE: captions_schema}[table](dim, metadata)


def item_columns(table: str) -> list[str]:
    """The columns of joint table `table` that describe its items (what a search hit shows): all but the vector
    and what the mapper wrote beside it."""
    return [name for name in table_schema(table, 1).names if name not in (VECTOR_COLUMN, MAPPER_COLUMN,
                                                                           NORMALISER_COLUMN)]


def table_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The crossalign metadata stored in a table's schema ({} for a table crossalign did not write)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _encode(metadata: dict[str, Any] | None) -> dict[bytes, bytes] | None:
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
