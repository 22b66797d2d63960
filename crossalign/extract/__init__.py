"""Extract: frozen-encoder features of a corpus, in resumable Parquet shards with a manifest."""

from crossalign.extract.extract import ExtractSummary, extract_image_features, extract_text_features
from crossalign.extract.manifest import FeatureManifest, FeatureMismatchError
from crossalign.extract.plan import ShardPlan, ShardsFailedError, combine_shard_summaries, plan_shards
from crossalign.extract.shards import read_features

__all__ = [
    "ExtractSummary",
    "FeatureManifest",
    "FeatureMismatchError",
    "ShardPlan",
    "ShardsFailedError",
    "combine_shard_summaries",
    "extract_image_features",
    "extract_text_features",
    "plan_shards",
    "read_features",
]
