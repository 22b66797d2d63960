"""Extraction as units of work by reference: ranges of the corpus table whose items lack features, a task each.

`plan_shards` is cheap (it reads the corpus table's id column and the features' id index, loads no
model); each unit then goes to `extract_image_features` / `extract_text_features` with `unit=`, on a
thread, a process or a Dask worker; `combine_shard_summaries` sums their summaries. A plan names rows,
not ids, so it stays small however large the corpus (10 million ids would be hundreds of MB of task
parameters), and the number of tasks stays bounded (`ExtractConfig.max_tasks`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossalign.config import ExtractConfig
from crossalign.corpus.rows import in_split, iter_batches, table_identity, table_rows
from crossalign.encoders.registry import canonical_name
from crossalign.extract.encoding import ExtractSummary
from crossalign.extract.features import features_dirs
from crossalign.extract.shards import pending, refreshed_index
from crossalign.workspace import Workspace, WorkspaceError

MODALITIES = ("image", "text")
ID_COLUMNS = {"image": "image_id", "text": "caption_id"}
_E = ExtractConfig()  # the defaults of max_tasks and task_shards (never repeated here)


class ShardsFailedError(RuntimeError):
    """Some extraction shards failed (after their retry); the others are recorded. Its `__cause__` is the first
    shard's error."""


@dataclass(frozen=True)
class PlanUnit:
    """One task's work, by reference: the items of `split` among rows `start` to `stop` of one version
    (`identity`) of a corpus table that lacked features when plan `plan` was made (`pending` of them).

    `since` holds, per part of the encoder, the shards the plan's check covered: the task checks only
    the shards recorded after them (see `crossalign.extract.shards.pending`).
    """

    plan: str
    identity: str
    start: int
    stop: int
    pending: int
    since: tuple[int, ...]
    split: str | None = None
    plan_pending: int = 0  # items of the whole plan without features (the compile decision weighs them)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanUnit:
        return cls(**{**data, "since": tuple(data["since"])})


@dataclass
class ShardPlan:
    """The pending work of one encoder on one corpus, by reference (small: passed between Prefect tasks)."""

    encoder: str  # the canonical name
    modality: str
    total: int  # items of the corpus (split)
    already_done: int  # items with features from every part of the encoder
    units: list[dict[str, Any]]  # `PlanUnit.to_dict()` of each task, in table order
    features_dir: str  # comma-separated for a composite encoder
    pending: int = 0  # items without features

    def to_dict(self) -> dict:
        return asdict(self)


def unit_rows(shard_size: int, table_rows: int, max_tasks: int, task_shards: int) -> int:
    """Pending items per task: `task_shards` shards, or more when that would make over `max_tasks` tasks for a
    table of `table_rows` rows (an upper bound of what can be pending: the count stays bounded)."""
    shards = -(-table_rows // shard_size)
    return shard_size * max(task_shards, -(-shards // max_tasks))


def plan_shards(
    workspace: Workspace, corpus: str, modality: str, encoder_name: str, shard_size: int, split: str | None = None,
    max_tasks: int = _E.max_tasks, task_shards: int = _E.task_shards,
) -> ShardPlan:
    """Cut the `modality` items of `corpus` that lack `encoder_name` features into units of work, each naming
    a range of rows of the corpus table (not its ids): at most `max_tasks` units, each of `task_shards`
    shards of `shard_size` items (more when the table is large).

    An item counts as done when every part of a composite encoder (`a,b`) has its features; items
    recorded as failed are planned again (the file may be back), as a whole-corpus extraction does.
    Reads the table's id and split columns batch by batch and checks them against the features' id
    index: memory does not grow with the corpus.

    Raises:
        ValueError: unknown modality or a non-positive shard size.
        WorkspaceError: the corpus was not ingested.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    path = corpus_table(workspace, corpus, modality)
    identity, per_unit = table_identity(path), unit_rows(shard_size, table_rows(path), max_tasks, task_shards)
    directories = features_dirs(workspace, corpus, encoder_name)
    since = tuple(refreshed_index(directory) if (directory / "_manifest.json").exists() else 0
                  for directory in directories)
    plan_id = hashlib.sha256(json.dumps([identity, canonical_name(encoder_name), split, per_unit, since])
                             .encode()).hexdigest()[:16]
    ranges: list[list[int]] = []  # [start, stop, pending]
    total = 0
    for first, batch in iter_batches(path, [ID_COLUMNS[modality], "split"]):
        mask = in_split(batch, split)
        ids = batch.column(ID_COLUMNS[modality]).filter(mask).to_pylist()
        positions = np.flatnonzero(np.asarray(mask)) + first
        total += len(ids)
        missing = np.zeros(len(ids), dtype=bool)
        for directory, covered in zip(directories, since):
            missing |= np.asarray(pending(directory, ids, covered)[0], dtype=bool)
        for position in positions[missing].tolist():
            if not ranges or ranges[-1][2] == per_unit:
                ranges.append([position, position + 1, 0])
            ranges[-1][1:] = [position + 1, ranges[-1][2] + 1]
    waiting = sum(r[2] for r in ranges)
    units = [PlanUnit(plan_id, identity, start, stop, count, since, split, waiting).to_dict()
             for start, stop, count in ranges]
    return ShardPlan(encoder=canonical_name(encoder_name), modality=modality, total=total,
                     already_done=total - waiting, units=units, pending=waiting,
                     features_dir=",".join(str(directory) for directory in directories))


def index_features(workspace: Workspace, corpus: str, encoder_name: str) -> None:
    """Index the ids of the shards a run wrote (`refreshed_index`), in bulk once it ends: the next plan, and
    readers, then find them without writing."""
    for directory in features_dirs(workspace, corpus, encoder_name):
        if (directory / "_manifest.json").exists():
            refreshed_index(directory)


def corpus_table(workspace: Workspace, corpus: str, modality: str) -> Path:
    """The canonical table of `modality`'s items.

    Raises:
        WorkspaceError: the corpus was not ingested.
    """
    path = workspace.images_table(corpus) if modality == "image" else workspace.captions_table(corpus)
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist: ingest the corpus first")
    return path


def combine_shard_summaries(
    plan: ShardPlan, summaries: list[ExtractSummary], seconds: float, precision: str,
) -> ExtractSummary:
    """One summary for the shards of `plan`, which took `seconds` of wall time together.

    `precision` is reported when no shard ran (nothing to encode); otherwise the shards' own.
    Items a shard found done (another run recorded them meanwhile) count as already done.
    """
    encoded = sum(summary.encoded for summary in summaries)
    return ExtractSummary(
        encoder=plan.encoder, modality=plan.modality, encoded=encoded,
        already_done=plan.already_done + sum(summary.already_done for summary in summaries),
        failed=sum(summary.failed for summary in summaries), seconds=round(seconds, 3),
        items_per_s=round(encoded / seconds, 1) if seconds and encoded else 0.0,
        features_dir=plan.features_dir, precision=summaries[0].precision if summaries else precision,
        wait_s=round(sum(s.wait_s for s in summaries), 3), encode_s=round(sum(s.encode_s for s in summaries), 3),
        write_s=round(sum(s.write_s for s in summaries), 3),
        commit_s=[t for s in summaries for t in s.commit_s],
    )
