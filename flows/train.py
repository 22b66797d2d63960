"""The `train` flow: a new mapper on cached features, selected and reported on the eval split."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="train")
def train_flow(config: PipelineConfig) -> dict[str, Any]:
    """Train a mapper on `config.train.train_split` and make it the workspace's current one."""
    summary = tasks.train(config)
    tasks.publish_metrics(summary["metrics"], config.train.eval_split)
    return summary
