"""Prefect tasks: each one library call that returns paths or small summaries, never tensors."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from crossalign.align import MapperChoice, choose_mapper, evaluate_current_mapper, fit_mapper, metrics_table
from crossalign.align.mapper_dir import MapperDir
from crossalign.align.report import SavedReport, plot_training_curve, png_data_url, read_report
from crossalign.config import PipelineConfig
from crossalign.corpus import first_captions, ingest_corpus
from crossalign.corpus.accounting import accounting_line
from crossalign.encoders import EncoderModalityError, WeightsUnavailableError
from crossalign.extract import (
    ExtractSummary,
    FeatureMismatchError,
    ShardPlan,
    combine_shard_summaries,
    extract_image_features,
    extract_text_features,
    plan_shards,
)
from crossalign.extract.plan import index_features
from crossalign.preflight import check_config
from crossalign.search import Searcher
from crossalign.store import embed_corpus
from crossalign.workspace import Workspace, WorkspaceError

FIRST_REJECTS = 10  # rejects listed in the ingest artifact; the whole table is in the workspace


def _workspace(config: PipelineConfig) -> Workspace:
    return Workspace(config.workspace)


def _cell(value: object, width: int = 120) -> str:
    """`value` as one Markdown table cell: one line, pipes escaped, at most `width` characters."""
    text = " ".join(str(value).split())
    text = text if len(text) <= width else text[:width - 1] + "…"
    return text.replace("|", "\\|").replace("<", "&lt;")


def _first_rejects_markdown(rejects_table: str, rejected: int) -> str:
    rows = pq.read_table(rejects_table).slice(0, FIRST_REJECTS).to_pylist()
    lines = "".join(f"| {_cell(r['kind'])} | {_cell(r['reason'])} | {_cell(r['source'])} | {_cell(r['message'])} |\n"
                    for r in rows)
    return (f"\n\n#### First {len(rows)} of {rejected} rejects\n\n| kind | reason | source | message |\n"
            f"|---|---|---|---|\n{lines}\nAll rejects: `{rejects_table}`\n")


def _recall_plot_markdown(report: SavedReport) -> str:
    if report.recall_plot is None:
        return (f"No recall@K plot saved for mapper `{report.mapper_id}` (trained before plots were written); "
                "train a new one with `--retrain` to get it.")
    return (f"#### Recall@K of `{report.title}`\n\n"
            f"![recall@K]({png_data_url(Path(report.recall_plot).read_bytes())})\n")


def _training_curve_markdown(report: SavedReport) -> str:
    if not report.history:
        return f"Mapper `{report.mapper_id}` was fitted in closed form: no training curve."
    rows = "".join(f"| {r.get('head', 0)} | {r['step']:g} | {r['loss']:.4f} | {r['dev_rsum']:.1f} |\n"
                   for r in report.history)
    return (f"### Training curve of `{report.title}`\n\n"
            f"![training curve]({png_data_url(plot_training_curve(report.history, report.title))})\n\n"
            f"Dev rsum by raw cosine (model selection); the metrics artifact has the normalised ones.\n\n"
            f"| head | step | loss | dev rsum |\n|---:|---:|---:|---:|\n{rows}")


@task(name="check-config")
def preflight(config: PipelineConfig, stages: list[str]) -> None:
    """Fail the run before any work when this machine or workspace cannot run `config` (`check_config`)."""
    check_config(config, stages)


@task(name="ingest")
def ingest(config: PipelineConfig) -> dict[str, Any]:
    summary = ingest_corpus(config.corpus, _workspace(config)).to_dict()
    reasons = "".join(f"| {reason} | {n} |\n" for reason, n in sorted(summary["rejects_by_reason"].items()))
    create_markdown_artifact(
        key="ingest-summary", description="Ingest: accepted, normalised and rejected items",
        markdown=(f"### Ingest of `{summary['corpus']}`\n\n{summary['images']} images, {summary['captions']} "
                  f"captions accepted; {summary['normalised']} normalised; {summary['rejected']} rejected; "
                  f"{summary['added']} images new since the last ingest, {summary['removed']} gone; "
                  f"splits {summary['splits']}.\n\nEvery input record accounted for: "
                  f"{accounting_line(summary['accounting'])}.\n\n"
                  + (f"| reason | count |\n|---|---:|\n{reasons}" if reasons else "")
                  + (_first_rejects_markdown(summary["rejects_table"], summary["rejected"])
                     if summary["rejected"] else "")),
    )
    return summary


def _encoder_name(config: PipelineConfig, modality: str) -> str:
    return config.extract.image_encoder if modality == "image" else config.extract.text_encoder


@task(name="plan-shards", task_run_name="plan-{modality}-shards")
def plan_extraction(config: PipelineConfig, modality: str) -> dict[str, Any]:
    """The units of work of `modality`: ranges of the corpus table whose items lack features, at most
    `max_tasks` of them (reads the table's ids and the features' id index; loads no model)."""
    e = config.extract
    return plan_shards(_workspace(config), config.corpus.corpus_name, modality, _encoder_name(config, modality),
                       e.shard_size, max_tasks=e.max_tasks, task_shards=e.task_shards).to_dict()


def _retry_unless_setup_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a shard that failed for a passing reason; features of another encoder, a missing corpus, an encoder
    of the other modality or missing weights stay wrong."""
    try:
        state.result()
    except (FeatureMismatchError, WorkspaceError, EncoderModalityError, WeightsUnavailableError):
        return False
    except Exception:  # noqa: BLE001 - anything else may pass (out of memory, a flaky filesystem): retry
        pass
    return True


@task(name="extract-shard", task_run_name="extract-{modality}-shard-{number}", retries=1, retry_delay_seconds=2,
      retry_condition_fn=_retry_unless_setup_error)
def extract_shard(config: PipelineConfig, modality: str, number: int, unit: dict[str, Any]) -> dict[str, Any]:
    """Encode planned unit `number` of `modality`: its summary, when it started and finished, and where.

    Runs on a thread or a Dask worker alike: it gets names and paths only; the encoder is loaded once per process.
    """
    started = time.time()
    extract = extract_image_features if modality == "image" else extract_text_features
    summary = extract(_workspace(config), config.corpus.corpus_name, config.extract, unit=unit)
    return {"summary": summary.to_dict(), "started": started, "finished": time.time(),
            "process": f"{socket.gethostname()}:{os.getpid()}"}


@task(name="summarise-extraction", task_run_name="summarise-{modality}-extraction")
def summarise_extraction(config: PipelineConfig, modality: str, plan: dict[str, Any],
                         shards: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of a modality's finished shards; its time is theirs from the first start to the last end,
    and `processes` says how many processes (Dask workers, or the flow's own) ran them."""
    seconds = max(s["finished"] for s in shards) - min(s["started"] for s in shards) if shards else 0.0
    index_features(_workspace(config), config.corpus.corpus_name, plan["encoder"])  # once, in bulk: see the ledger
    summary = combine_shard_summaries(ShardPlan(**plan), [ExtractSummary(**s["summary"]) for s in shards], seconds,
                                      config.extract.precision)
    return summary.to_dict() | {"processes": len({s["process"] for s in shards})}


@task(name="publish-throughput")
def publish_throughput(summaries: list[dict[str, Any]]) -> None:
    create_table_artifact(
        key="extract-throughput", description="Extraction throughput per encoder",
        table=[{k: s[k] for k in ("encoder", "modality", "encoded", "already_done", "failed", "items_per_s",
                                   "precision")} for s in summaries],
    )


@task(name="choose-mapper")
def choose(config: PipelineConfig) -> dict[str, Any]:
    """Reuse the current mapper only when it was trained on the same data with the same options (`choose_mapper`)."""
    return choose_mapper(_workspace(config), config.corpus.corpus_name, config.extract.image_encoder,
                         config.extract.text_encoder, config.train, config.querybank, config.retrain).to_dict()


def mapper_outcome(choice: dict[str, Any], mapper_id: str) -> dict[str, Any]:
    """Which mapper the run used and why, as the run's result and its artifact say it."""
    return {"mapper_id": mapper_id, "reused": choice["reused"], "reason": MapperChoice(**choice).outcome(mapper_id)}


@task(name="train-mapper")
def train(config: PipelineConfig) -> dict[str, Any]:
    return fit_mapper(_workspace(config), config.corpus.corpus_name, config.extract.image_encoder,
                      config.extract.text_encoder, config.train, config.querybank).to_dict()


@task(name="evaluate")
def evaluate(config: PipelineConfig, split: str) -> dict[str, Any]:
    return evaluate_current_mapper(_workspace(config), config.corpus.corpus_name, split, config.querybank.method)


@task(name="publish-metrics")
def publish_metrics(config: PipelineConfig, metrics: dict[str, Any], mapper_id: str, note: str = "") -> None:
    """The metrics table on the eval split and the mapper's recall@K plot (inline PNG), in one artifact; `note`
    (which mapper the run used, and why) above them."""
    split = config.train.eval_split
    report = read_report(MapperDir.of(_workspace(config), mapper_id))
    create_markdown_artifact(key="retrieval-metrics", description=f"Retrieval metrics on {split} and recall@K plot",
                             markdown=f"### Retrieval on `{split}` (mapper `{mapper_id}`)\n\n"
                                      + (f"Mapper: {_cell(note, 2000)}\n\n" if note else "")
                                      + metrics_table(metrics) + "\n\n" + _recall_plot_markdown(report))


@task(name="publish-training-curve")
def publish_training_curve(config: PipelineConfig, mapper_id: str) -> None:
    report = read_report(MapperDir.of(_workspace(config), mapper_id))
    create_markdown_artifact(key="training-curve", description=f"Training curve of mapper {mapper_id}",
                             markdown=_training_curve_markdown(report))


@task(name="embed")
def embed(config: PipelineConfig) -> dict[str, Any]:
    return embed_corpus(_workspace(config), config.corpus.corpus_name, mapper_id=config.store.mapper_id,
                        metric=config.store.metric).to_dict()


@task(name="sample-searches")
def sample_searches(config: PipelineConfig, limit: int = 3) -> list[dict[str, Any]]:
    queries = config.queries or first_captions(_workspace(config), config.corpus.corpus_name,
                                               config.train.eval_split, images=3)
    searcher = Searcher(_workspace(config), device=config.extract.device, precision=config.extract.precision,
                        normalisation=config.querybank.method)
    samples = [{"query": q, "hits": [h.to_dict() for h in searcher.text_to_image(q, limit)]} for q in queries]
    lines = [f"**{s['query']}**\n" + "".join(f"{h['rank']}. `{h['uri']}` ({h['score']:.3f})\n" for h in s["hits"])
             for s in samples]
    create_markdown_artifact(key="sample-searches", description="Text -> image samples",
                             markdown="### Sample text → image searches\n\n" + "\n".join(lines))
    return samples
