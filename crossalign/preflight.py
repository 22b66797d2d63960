"""The checks a run makes before any work: what the machine and the workspace must offer for its config.

The config validators check what a value decides alone (a known precision, a dim that splits into
heads); these check what the corpus folder, the workspace and the installed encoders decide. The CLI
calls `check_config` before it starts a flow, and every flow calls it first, so a run started from the
Prefect UI or a schedule fails the same way as the command line: before any work, on one line.
"""

from __future__ import annotations

from collections.abc import Collection

from crossalign.config import PipelineConfig
from crossalign.workspace import Workspace, WorkspaceError

STAGES = ("ingest", "extract", "train", "embed")


def check_config(config: PipelineConfig, stages: Collection[str] = STAGES) -> None:
    """Refuse `config` for a run of `stages` (in this order) before any of them starts.

    A stage's inputs are checked only when no earlier stage of the same run makes them:

    - ingest: the corpus folder exists;
    - extract: the corpus folder exists and was ingested; each encoder is of its modality, and, when the
      shards run in this process (runner "threads"), loads here (its weights are on this machine; loads are
      cached, so the shards reuse them) and matches the features it already has on disk (same precision,
      weights, preprocessing, decoder); shards on Dask workers load them there, so here only the names
      are resolved (a worker without the weights fails its first shard, which is not retried);
    - train: both encoders' features of the corpus exist;
    - embed: the mapper to embed with (`config.store.mapper_id`, else the current one) exists, and the
      corpus features it needs exist and come from the encoders it was trained on.

    Raises:
        ValueError: an unknown stage.
        CorpusConfigError: the corpus folder does not exist.
        WorkspaceError: the corpus was not ingested, features were not extracted, or there is no mapper.
        EncoderModalityError: an image encoder named as the text encoder, or the other way round.
        WeightsUnavailableError: an encoder's weights are not on this machine.
        MapperMismatchError: the features come from other encoders than the mapper's.
        FeatureMismatchError: the features on disk were made by another setup of an encoder.
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}: use some of {', '.join(STAGES)}")
    workspace, corpus = Workspace(config.workspace), config.corpus.corpus_name
    if {"ingest", "extract"} & set(stages):
        _check_corpus_folder(config)
    if "extract" in stages:
        if "ingest" not in stages:
            _check_ingested(workspace, corpus)
        _check_encoders(config, workspace, corpus)
    if "train" in stages and "extract" not in stages:
        _check_features(workspace, corpus, [config.extract.image_encoder, config.extract.text_encoder])
    if "embed" in stages and "train" not in stages:
        _check_mapper_features(workspace, corpus, config.store.mapper_id)


def _check_corpus_folder(config: PipelineConfig) -> None:
    from crossalign.corpus.folder import CorpusConfigError

    if not config.corpus.root.is_dir():
        raise CorpusConfigError(f"corpus folder {config.corpus.root} does not exist")


def _check_ingested(workspace: Workspace, corpus: str) -> None:
    if not workspace.images_table(corpus).exists():
        raise WorkspaceError(f"corpus {corpus!r} is not ingested into workspace {workspace.root}: "
                             "run `crossalign ingest` (or `crossalign run`) first")


def _check_encoders(config: PipelineConfig, workspace: Workspace, corpus: str) -> None:
    from crossalign.encoders import check_modality
    from crossalign.extract.extract import check_features_match

    e = config.extract
    if config.runner.kind == "threads":  # load them, as the shards will, and compare with the features on disk
        check_features_match(workspace, corpus, e)
        return
    for modality, name in (("image", e.image_encoder), ("text", e.text_encoder)):
        check_modality(modality, name)  # the device named may be the workers', not this machine's: load nothing


def _check_features(workspace: Workspace, corpus: str, encoders: list[str]) -> None:
    from crossalign.extract.features import FeatureSet

    for name in encoders:
        FeatureSet.open(workspace, corpus, name)  # raises WorkspaceError, naming the encoder


def _check_mapper_features(workspace: Workspace, corpus: str, mapper_id: str | None) -> None:
    from crossalign.align.mapper import check_encoder
    from crossalign.align.mapper_dir import MapperDir, current_mapper
    from crossalign.extract.features import FeatureSet

    directory = MapperDir.of(workspace, mapper_id) if mapper_id else current_mapper(workspace)
    if not directory.exists():
        raise WorkspaceError(f"workspace {workspace.root} has no mapper {mapper_id}")
    mapper = directory.config()
    for modality in ("image", "text"):
        features = FeatureSet.open(workspace, corpus, mapper[f"{modality}_encoder"]["encoder"])
        check_encoder(mapper, modality, features.encoder)
