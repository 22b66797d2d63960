"""The `extract` flow: frozen-encoder features of every ingested image and caption."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="extract")
def extract_flow(config: PipelineConfig) -> list[dict[str, Any]]:
    """Extract the image and caption features the workspace lacks for `config.corpus`."""
    summaries = [tasks.extract_images(config), tasks.extract_captions(config)]
    tasks.publish_throughput(summaries)
    return summaries
