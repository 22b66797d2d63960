"""Ingest: turn a corpus on disk into the canonical `images` / `captions` / `rejects` tables."""

from crossalign.corpus.ingest import IngestSummary, first_captions, ingest_corpus, read_captions, read_images
from crossalign.corpus.schema import CAPTIONS_SCHEMA, IMAGES_SCHEMA, REJECTS_SCHEMA

__all__ = [
    "CAPTIONS_SCHEMA",
    "IMAGES_SCHEMA",
    "REJECTS_SCHEMA",
    "IngestSummary",
    "first_captions",
    "ingest_corpus",
    "read_captions",
    "read_images",
]
