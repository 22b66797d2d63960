"""Schemas of the canonical corpus tables, declared once and imported wherever they are touched."""

from __future__ import annotations

import pyarrow as pa

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the bytes, first 32 hex digits
        pa.field("uri", pa.string(), nullable=False),  # absolute path of the image file
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok", or "normalised:<steps>" (crossalign.imaging)
    ]
)

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("caption_id", pa.string(), nullable=False),  # sha256(image_id, text), 32 hex digits
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # "image" | "caption" | "record"
        pa.field("source", pa.string(), nullable=False),  # path, caption text or line number
        pa.field("reason", pa.string(), nullable=False),  # stable code, e.g. missing_file, undecodable, empty_caption
        pa.field("message", pa.string(), nullable=False),
    ]
)
