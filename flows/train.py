"""The `train` flow: a new mapper on cached features, selected and reported on the eval split."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="train")
def train_flow(config: PipelineConfig) -> dict[str, Any]:
    """Train a mapper on `config.train.train_split` and make it the workspace's current one."""
    tasks.preflight(config, ["train"])
    summary = tasks.train(config)
    tasks.publish_metrics(config, summary["metrics"] | {"mapper_id": summary["mapper_id"]}, summary["mapper_id"])
    tasks.publish_training_curve(config, summary["mapper_id"])
    return summary
