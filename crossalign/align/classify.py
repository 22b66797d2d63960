"""Zero-shot labels for the images in the tables: each image's nearest label prompt, written to Parquet.

The images' joint vectors are read from the `images` table (never re-encoded); the labels go through the
text encoder and the mapper that built the table (`zeroshot.class_embeddings`). Scores are cosine
similarities: a row's query-bank normaliser is the same for every label, so it would not change the order.
The result lives at `labels_path(workspace)`, one row per image, with the mapper and prompts in its metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from crossalign.align.mapper import check_encoder
from crossalign.align.mapper_dir import MapperDir
from crossalign.align.zeroshot import class_embeddings
from crossalign.config import ExtractConfig
from crossalign.encoders import load_encoder
from crossalign.store import IMAGES_TABLE, connect, open_table, table_metadata
from crossalign.store.schema import CORPUS_COLUMN, ID_COLUMN, SPLIT_COLUMN, VECTOR_COLUMN
from crossalign.store.tables import quote
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)
_E = ExtractConfig()

DEFAULT_TEMPLATE = "a photo of a {}."
TOP_K = 3
LABELS_DIR = "labels"
LABELS_FILE = "zeroshot.parquet"
METADATA_KEY = b"crossalign:labels"
LABELS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field(SPLIT_COLUMN, pa.string(), nullable=False),
    pa.field(CORPUS_COLUMN, pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),  # cosine of the image and the label's prompts
    pa.field("top_labels", pa.list_(pa.string()), nullable=False),  # best first, up to TOP_K
    pa.field("top_scores", pa.list_(pa.float32()), nullable=False),
])


@dataclass
class ClassifySummary:
    """What one classification wrote: where, by which mapper, and how many images per label."""

    path: str
    mapper_id: str
    labels: list[str]
    templates: list[str]
    images: int
    counts: dict[str, int] = field(default_factory=dict)  # every label, most frequent first
    split: str | None = None
    corpus: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labels_path(workspace: Workspace) -> Path:
    """Where the workspace's zero-shot labels are written (one file, replaced by each classification)."""
    return workspace.root / LABELS_DIR / LABELS_FILE


def parse_labels(text: str | None = None, file_text: str | None = None) -> list[str]:
    """Labels from a comma-separated list and/or a file's text (one label per line, or commas), in order,
    stripped, duplicates dropped.

    Raises:
        ValueError: no label at all.
    """
    labels: list[str] = []
    for source in (text or "", file_text or ""):
        for line in source.splitlines():
            for label in line.split(","):
                label = " ".join(label.split())
                if label and label not in labels:
                    labels.append(label)
    if not labels:
        raise ValueError("no labels given: pass --labels \"dog,cat\" or --labels-file with one label per line")
    return labels


def check_templates(templates: list[str] | tuple[str, ...]) -> list[str]:
    """The prompt templates, each holding `{}` exactly once where the label goes.

    Raises:
        ValueError: no template, or one without (or with several) `{}`.
    """
    if not templates:
        raise ValueError(f"no prompt template: pass --template {DEFAULT_TEMPLATE!r}")
    for template in templates:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            raise ValueError(f"prompt template {template!r} must hold {{}} exactly once, where the label goes")
    return list(templates)


def classify_images(
    workspace: Workspace, labels: list[str], templates: list[str] | tuple[str, ...] = (DEFAULT_TEMPLATE,),
    split: str | None = None, corpus: str | None = None, device: str = _E.device, precision: str = _E.precision,
) -> ClassifySummary:
    """Give each image of the `images` table (of `split`/`corpus` if given) its best label, score and top 3,
    and write them to `labels_path(workspace)` (through a temporary file and a rename).

    Reads the table batch by batch: memory grows with the labels, not with the table.

    Raises:
        ValueError: no labels, or a template without `{}`.
        WorkspaceError: no tables, or the mapper that built them is gone.
        MapperMismatchError: the text encoder differs from the one the mapper was trained on.
    """
    labels, templates = parse_labels(",".join(labels)), check_templates(templates)
    if not workspace.lancedb_uri.is_dir():  # before connecting, which would create it
        raise WorkspaceError(f"no tables in {workspace.lancedb_uri}: run `crossalign run` first")
    table = open_table(connect(workspace), IMAGES_TABLE)
    mapper_id = table_metadata(table.schema).get("mapper_id")
    mapper_dir = MapperDir.of(workspace, mapper_id) if mapper_id else None
    if mapper_dir is None or not mapper_dir.exists():
        raise WorkspaceError(f"the images table names mapper {mapper_id}, which is not in the workspace's mappers")
    model, config = mapper_dir.load()
    encoder = load_encoder(config["text_encoder"]["encoder"], device, precision)
    check_encoder(config, "text", encoder.describe())
    classes = class_embeddings(model, encoder, labels, templates).numpy()  # (labels, dim), unit rows
    path = labels_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    metadata = {"mapper_id": mapper_id, "labels": labels, "templates": templates, "split": split, "corpus": corpus}
    schema = LABELS_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    counts: Counter[str] = Counter()
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in _image_batches(table, split, corpus):
            rows = _label_batch(batch, classes, labels)
            counts.update(rows.column("label").to_pylist())
            writer.write_table(pa.Table.from_batches([rows], schema=schema))
    os.replace(tmp, path)
    ordered = dict(sorted(((label, counts.get(label, 0)) for label in labels), key=lambda kv: -kv[1]))
    logger.info("labelled %d images with %d labels (mapper %s): %s", sum(counts.values()), len(labels), mapper_id, path)
    return ClassifySummary(str(path), mapper_id, labels, templates, sum(counts.values()), ordered, split, corpus)


def _image_batches(table: Any, split: str | None, corpus: str | None) -> Any:
    clauses = [f"{column} = {quote(value)}" for column, value in ((SPLIT_COLUMN, split), (CORPUS_COLUMN, corpus))
               if value]
    query = table.search().select([ID_COLUMN, VECTOR_COLUMN, "uri", SPLIT_COLUMN, CORPUS_COLUMN])
    if clauses:
        query = query.where(" AND ".join(clauses))
    return query.limit(None).to_batches()


def _label_batch(batch: pa.RecordBatch, classes: np.ndarray, labels: list[str]) -> pa.RecordBatch:
    """One batch of image rows, labelled: best label and score, and the top `TOP_K` of each."""
    flat = batch.column(VECTOR_COLUMN).flatten().to_numpy(zero_copy_only=False)
    scores = torch.from_numpy(flat.reshape(batch.num_rows, -1).astype(np.float32)) @ torch.from_numpy(classes).T
    top = scores.topk(min(TOP_K, len(labels)), dim=1)
    names = [[labels[i] for i in row] for row in top.indices.tolist()]
    values = top.values.numpy().astype(np.float32)
    return pa.RecordBatch.from_pydict({
        "image_id": batch.column(ID_COLUMN), "uri": batch.column("uri"), SPLIT_COLUMN: batch.column(SPLIT_COLUMN),
        CORPUS_COLUMN: batch.column(CORPUS_COLUMN), "label": pa.array([row[0] for row in names], pa.string()),
        "score": pa.array(values[:, 0], pa.float32()), "top_labels": pa.array(names, pa.list_(pa.string())),
        "top_scores": pa.array(values.tolist(), pa.list_(pa.float32())),
    }, schema=LABELS_SCHEMA)


def read_labels(workspace: Workspace) -> tuple[pa.Table, dict[str, Any]] | None:
    """The workspace's zero-shot labels and their metadata (mapper, labels, templates), or None if never run."""
    path = labels_path(workspace)
    if not path.exists():
        return None
    table = pq.read_table(path)
    return table, json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def accuracy_against(workspace: Workspace, truth: Path) -> tuple[float, int]:
    """Top-1 accuracy of the workspace's labels against a captions.jsonl (or a corpus folder holding one)
    whose records carry `image` (relative to its folder) and `label`; over the labelled images it names.

    Returns:
        (accuracy, number of images compared).

    Raises:
        FileNotFoundError: no labels yet, or no truth file.
        ValueError: no labelled image has a true label in the file.
    """
    truth = Path(truth)
    truth_file = truth / "captions.jsonl" if truth.is_dir() else truth
    found = read_labels(workspace)
    if found is None:
        raise FileNotFoundError(f"no labels in {labels_path(workspace)}: run `crossalign classify` first")
    true: dict[str, str] = {}
    with truth_file.open(encoding="utf-8-sig") as lines:
        for line in lines:
            record = json.loads(line) if line.strip() else {}
            if isinstance(record.get("image"), str) and isinstance(record.get("label"), str):
                true[str((truth_file.parent / record["image"]).resolve())] = record["label"]
    pairs = [(label, true[uri]) for uri, label in zip(*(found[0].column(c).to_pylist() for c in ("uri", "label")))
             if uri in true]
    if not pairs:
        raise ValueError(f"none of the labelled images has a label in {truth_file}")
    return sum(predicted == expected for predicted, expected in pairs) / len(pairs), len(pairs)
