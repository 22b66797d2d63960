"""Store: joint embeddings in LanceDB tables `images` and `captions`, upserted on id."""

from crossalign.store.schema import CAPTIONS_TABLE, IMAGES_TABLE, captions_schema, images_schema, table_metadata
from crossalign.store.tables import EmbedSummary, connect, embed_corpus, table_names

__all__ = [
    "CAPTIONS_TABLE",
    "IMAGES_TABLE",
    "EmbedSummary",
    "captions_schema",
    "connect",
    "embed_corpus",
    "images_schema",
    "table_metadata",
    "table_names",
]
