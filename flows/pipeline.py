"""The `pipeline` flow: ingest -> extract -> train (or reuse) -> embed -> sample searches."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from crossalign.preflight import STAGES
from crossalign.workspace import Workspace
from flows import tasks
from flows.extract import extract_stage


@flow(name="pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage in order, skipping work already done (features and a compatible mapper are reused).

    Publishes artifacts a person reads in the UI: ingest summary with the first rejects, extraction throughput,
    retrieval metrics with the recall@K plot, the training curve, sample searches.

    Returns small summaries of each stage: counts, throughput, which mapper was used and why (`mapper`: reused or
    trained), the eval-split metrics, sample searches.
    """
    tasks.preflight(config, list(STAGES))
    ingested = tasks.ingest(config)
    extracted = extract_stage(config)
    tasks.publish_throughput(extracted)
    with Workspace(config.workspace).lock("mapper"):  # a run started alongside waits, then reuses this mapper
        choice = tasks.choose(config)
        trained = tasks.train(config) if not choice["reused"] else None
    if trained is not None:
        mapper_id = trained["mapper_id"]
        metrics = trained["metrics"] | {"mapper_id": mapper_id}
    else:
        mapper_id = choice["mapper_id"]
        metrics = tasks.evaluate(config, config.train.eval_split)
    mapper = tasks.mapper_outcome(choice, mapper_id)
    tasks.publish_metrics(config, metrics, mapper_id, mapper["reason"])
    tasks.publish_training_curve(config, mapper_id)
    embedded = tasks.embed(config)
    samples = tasks.sample_searches(config)
    return {"ingest": ingested, "extract": extracted, "mapper": mapper, "train": trained, "metrics": metrics,
            "embed": embedded, "samples": samples}

