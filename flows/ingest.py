"""The `ingest` flow: a corpus on disk -> canonical Parquet tables."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="ingest")
def ingest_flow(config: PipelineConfig) -> dict[str, Any]:
    """Ingest `config.corpus` into `config.workspace`."""
    tasks.preflight(config, ["ingest"])
    return tasks.ingest(config)
