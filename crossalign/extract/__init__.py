"""Extract: frozen-encoder features of a corpus, in resumable Parquet shards with a manifest."""

from crossalign.extract.extract import ExtractSummary, extract_image_features, extract_text_features
from crossalign.extract.manifest import FeatureManifest, FeatureMismatchError
from crossalign.extract.shards import read_features

__all__ = [
    "ExtractSummary",
    "FeatureManifest",
    "FeatureMismatchError",
    "extract_image_features",
    "extract_text_features",
    "read_features",
]
