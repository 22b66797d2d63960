"""Store: joint embeddings in LanceDB tables `images` and `captions`, one tagged version per mapper."""

from crossalign.store.schema import (
    CAPTIONS_TABLE,
    IMAGES_TABLE,
    METRICS,
    captions_schema,
    images_schema,
    table_metadata,
)
from crossalign.store.tables import EmbedSummary, embed_corpus, upsert_rows
from crossalign.store.versions import (
    MapperVersion,
    StoreMismatchError,
    cleanup_tables,
    connect,
    mapper_versions,
    open_table,
    table_names,
)

__all__ = [
    "CAPTIONS_TABLE",
    "IMAGES_TABLE",
    "METRICS",
    "EmbedSummary",
    "MapperVersion",
    "StoreMismatchError",
    "captions_schema",
    "cleanup_tables",
    "connect",
    "embed_corpus",
    "images_schema",
    "mapper_versions",
    "open_table",
    "table_metadata",
    "table_names",
    "upsert_rows",
]
