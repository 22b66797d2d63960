"""Serve the `pipeline` flow on a daily schedule without a work pool: `python deployments/serve.py CORPUS WORKSPACE`."""

import sys

from crossalign.config import CorpusConfig, PipelineConfig
from flows.pipeline import pipeline

if __name__ == "__main__":
    corpus, workspace = sys.argv[1], sys.argv[2]
    config = PipelineConfig(workspace=workspace, corpus=CorpusConfig(root=corpus))
    pipeline.serve(name="daily", cron="0 3 * * *", parameters={"config": config.model_dump(mode="json")})
