"""A mapper's joint vectors of a split, made block by block, and the retrieval metrics on them.

The joint vectors of a split stay in memory up to `JOINT_MEMORY_BYTES` (a 1K-image dev split is
12 MB); beyond that they are written to a temporary `RowFile` and read back in blocks by the metrics,
so evaluating a large split holds a block of features, a block of vectors and a block of similarities.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crossalign.align.data import PairedSplit
from crossalign.align.mapper import JointMapper
from crossalign.align.metrics import normalised_metrics, retrieval_metrics
from crossalign.align.querybank import QueryBank
from crossalign.align.rows import MemoryRows, Rows, RowWriter, blocks, chunk_rows

JOINT_MEMORY_BYTES = 256 << 20


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_rows(encode, rows: Rows, dim: int, device: torch.device, spill: Path | None = None) -> Rows:
    """`encode` (features -> joint vectors) over `rows` in blocks: `MemoryRows`, or a `RowFile` at `spill`."""
    writer = RowWriter(spill, dim) if spill is not None else None
    parts = []
    for _, block in blocks(rows, chunk_rows(max(rows.dim, dim))):
        joint = encode(block.to(device)).float().cpu()
        if writer is not None:
            writer.write(joint)
        else:
            parts.append(joint)
    if writer is not None:
        return writer.close()
    return MemoryRows(torch.cat(parts) if parts else torch.empty(0, dim))


@contextlib.contextmanager
def joint_vectors(model: JointMapper, data: PairedSplit,
                  memory_bytes: int = JOINT_MEMORY_BYTES) -> Iterator[tuple[Rows, Rows]]:
    """(image, caption) joint vectors of `data` under `model` (in eval mode), for the length of the block."""
    model.eval()
    device, dim = model_device(model), model.dim
    images, captions = data.image_rows, data.caption_rows
    if (len(images) + len(captions)) * dim * 4 <= memory_bytes:
        yield (encode_rows(model.encode_image, images, dim, device),
               encode_rows(model.encode_text, captions, dim, device))
        return
    with tempfile.TemporaryDirectory(prefix="crossalign-joint-") as directory:
        image_emb = encode_rows(model.encode_image, images, dim, device, Path(directory) / "images.f32")
        text_emb = encode_rows(model.encode_text, captions, dim, device, Path(directory) / "captions.f32")
        try:
            yield image_emb, text_emb
        finally:
            image_emb.close()
            text_emb.close()


@torch.no_grad()
def evaluate_mapper(model: JointMapper, data: PairedSplit) -> dict[str, float]:
    """Retrieval metrics of `model` on a split's features (the standard protocol), in blocks."""
    with joint_vectors(model, data) as (image_emb, text_emb):
        return retrieval_metrics(image_emb, text_emb, data.pairs)


@torch.no_grad()
def evaluate_normalised(model: JointMapper, data: PairedSplit, bank: QueryBank | None,
                        method: str) -> dict[str, Any]:
    """The metrics search users get under `method`, the raw ones beside them (`normalised_metrics`)."""
    with joint_vectors(model, data) as (image_emb, text_emb):
        return normalised_metrics(image_emb, text_emb, data.pairs, bank, method, data.image_keys())
