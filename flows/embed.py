"""The `embed` flow: joint embeddings of a corpus into the LanceDB tables."""

from typing import Any

from prefect import flow

from crossalign.config import PipelineConfig
from flows import tasks


@flow(name="embed")
def embed_flow(config: PipelineConfig) -> dict[str, Any]:
    """Upsert the current mapper's joint vectors of `config.corpus` into `images` and `captions`."""
    tasks.preflight(config, ["embed"])
    return tasks.embed(config)
