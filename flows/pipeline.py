"""The `pipeline` flow: ingest -> extract -> train (or reuse) -> embed -> sample searches."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="pipeline")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage in order, skipping work already done (features and a compatible mapper are reused).

    Returns small summaries of each stage: counts, throughput, the eval-split metrics, sample searches.
    """
    ingested = tasks.ingest(config)
    extracted = [tasks.extract_images(config), tasks.extract_captions(config)]
    tasks.publish_throughput(extracted)
    mapper_id = tasks.find_reusable_mapper(config)
    if mapper_id is None:
        trained = tasks.train(config)
        metrics = trained["metrics"] | {"mapper_id": trained["mapper_id"]}
    else:
        trained = None
        metrics = tasks.evaluate(config, config.train.eval_split)
    tasks.publish_metrics(metrics, config.train.eval_split)
    embedded = tasks.embed(config)
    samples = tasks.sample_searches(config)
    return {"ingest": ingested, "extract": extracted, "train": trained, "metrics": metrics,
            "embed": embedded, "samples": samples}

