"""Prefect tasks: each one library call that returns paths or small summaries, never tensors."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from crossalign.align import evaluate_current_mapper, fit_mapper, metrics_table, reusable_mapper
from crossalign.config import PipelineConfig
from crossalign.corpus import first_captions, ingest_corpus
from crossalign.extract import extract_image_features, extract_text_features
from crossalign.search import Searcher
from crossalign.store import embed_corpus
from crossalign.workspace import Workspace


def _workspace(config: PipelineConfig) -> Workspace:
    return Workspace(config.workspace)


@task(name="ingest")
def ingest(config: PipelineConfig) -> dict[str, Any]:
    c = config.corpus
    summary = ingest_corpus(c.root, _workspace(config), c.corpus_name, c.captions_file, c.default_split,
                            c.max_pixels, c.max_caption_chars, fmt=c.format, image_column=c.image_column,
                            caption_column=c.caption_column, split_column=c.split_column).to_dict()
    reasons = "".join(f"| {reason} | {n} |\n" for reason, n in sorted(summary["rejects_by_reason"].items()))
    create_markdown_artifact(
        key="ingest-summary", description="Ingest: accepted, normalised and rejected items",
        markdown=(f"### Ingest of `{summary['corpus']}`\n\n{summary['images']} images, {summary['captions']} "
                  f"captions accepted; {summary['normalised']} normalised; {summary['rejected']} rejected; "
                  f"{summary['added']} images new since the last ingest, {summary['removed']} gone.\n\n"
                  + (f"| reason | count |\n|---|---:|\n{reasons}" if reasons else "")),
    )
    return summary


@task(name="extract-images", retries=1, retry_delay_seconds=5)
def extract_images(config: PipelineConfig, split: str | None = None) -> dict[str, Any]:
    e = config.extract
    return extract_image_features(
        _workspace(config), config.corpus.corpus_name, e.image_encoder, device=e.device, precision=e.precision,
        batch_size=e.image_batch_size, shard_size=e.shard_size, num_workers=e.num_workers, decode=e.decode,
        split=split,
    ).to_dict()


@task(name="extract-captions", retries=1, retry_delay_seconds=5)
def extract_captions(config: PipelineConfig, split: str | None = None) -> dict[str, Any]:
    e = config.extract
    return extract_text_features(
        _workspace(config), config.corpus.corpus_name, e.text_encoder, device=e.device, precision=e.precision,
        batch_size=e.text_batch_size, shard_size=e.shard_size, split=split,
    ).to_dict()


@task(name="publish-throughput")
def publish_throughput(summaries: list[dict[str, Any]]) -> None:
    create_table_artifact(
        key="extract-throughput", description="Extraction throughput per encoder",
        table=[{k: s[k] for k in ("encoder", "modality", "encoded", "already_done", "failed", "items_per_s",
                                   "precision")} for s in summaries],
    )


@task(name="reusable-mapper")
def find_reusable_mapper(config: PipelineConfig) -> str | None:
    if config.retrain:
        return None
    return reusable_mapper(_workspace(config), config.extract.image_encoder, config.extract.text_encoder)


@task(name="train-mapper")
def train(config: PipelineConfig) -> dict[str, Any]:
    t = config.train
    options = t.model_dump(exclude={"train_split", "eval_split"})
    return fit_mapper(_workspace(config), config.corpus.corpus_name, config.extract.image_encoder,
                      config.extract.text_encoder, train_split=t.train_split, eval_split=t.eval_split,
                      **options).to_dict()


@task(name="evaluate")
def evaluate(config: PipelineConfig, split: str) -> dict[str, Any]:
    return evaluate_current_mapper(_workspace(config), config.corpus.corpus_name, split)


@task(name="publish-metrics")
def publish_metrics(metrics: dict[str, Any], split: str) -> None:
    create_markdown_artifact(key="retrieval-metrics", description=f"Retrieval metrics on {split}",
                             markdown=f"### Retrieval on `{split}` (mapper `{metrics.get('mapper_id', '')}`)\n\n"
                                      + metrics_table(metrics))


@task(name="embed")
def embed(config: PipelineConfig) -> dict[str, Any]:
    return embed_corpus(_workspace(config), config.corpus.corpus_name).to_dict()


@task(name="sample-searches")
def sample_searches(config: PipelineConfig, limit: int = 3) -> list[dict[str, Any]]:
    queries = config.queries or first_captions(_workspace(config), config.corpus.corpus_name,
                                               config.train.eval_split, images=3)
    searcher = Searcher(_workspace(config), config.extract.device, config.extract.precision)
    samples = [{"query": q, "hits": [h.to_dict() for h in searcher.text_to_image(q, limit)]} for q in queries]
    lines = [f"**{s['query']}**\n" + "".join(f"{h['rank']}. `{h['uri']}` ({h['score']:.3f})\n" for h in s["hits"])
             for s in samples]
    create_markdown_artifact(key="sample-searches", description="Text -> image samples",
                             markdown="### Sample text → image searches\n\n" + "\n".join(lines))
    return samples
