"""Extraction as shards: the ids that still lack features, cut into chunks a task each can encode anywhere.

`plan_shards` is cheap (it reads the corpus table and the feature manifests, loads no model); each
chunk then goes to `extract_image_features` / `extract_text_features` with `only_ids=chunk`, on a
thread, a process or a Dask worker; `combine_shard_summaries` sums their summaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crossalign.corpus import read_captions, read_images
from crossalign.encoders.registry import canonical_name
from crossalign.extract.encoding import ExtractSummary
from crossalign.extract.features import features_dirs
from crossalign.extract.shards import done_ids
from crossalign.workspace import Workspace

MODALITIES = ("image", "text")


class ShardsFailedError(RuntimeError):
    """Some extraction shards failed (after their retry); the others are recorded. Its `__cause__` is the first
    shard's error."""


@dataclass
class ShardPlan:
    """The pending work of one encoder on one corpus (small: passed between Prefect tasks)."""

    encoder: str  # the canonical name
    modality: str
    total: int  # items of the corpus (split)
    already_done: int  # items with features from every part of the encoder
    shards: list[list[str]]  # ids without features, in corpus order, at most shard_size each
    features_dir: str  # comma-separated for a composite encoder

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(
    workspace: Workspace, corpus: str, modality: str, encoder_name: str, shard_size: int, split: str | None = None,
) -> ShardPlan:
    """Cut the `modality` items of `corpus` that lack `encoder_name` features into chunks of `shard_size` ids.

    An item counts as done when every part of a composite encoder (`a,b`) has its features; items
    recorded as failed are planned again (the file may be back), as a whole-corpus extraction does.

    Raises:
        ValueError: unknown modality or a non-positive shard size.
        WorkspaceError: the corpus was not ingested.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if modality == "image":
        ids = read_images(workspace, corpus, split).column("image_id").to_pylist()
    else:
        ids = read_captions(workspace, corpus, split).column("caption_id").to_pylist()
    directories = features_dirs(workspace, corpus, encoder_name)
    done = [done_ids(directory) for directory in directories]
    pending = [item for item in ids if any(item not in part_done for part_done in done)]
    return ShardPlan(
        encoder=canonical_name(encoder_name), modality=modality, total=len(ids), already_done=len(ids) - len(pending),
        shards=[pending[start:start + shard_size] for start in range(0, len(pending), shard_size)],
        features_dir=",".join(str(directory) for directory in directories),
    )


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
    )
