"""Serve the crossalign flows without a work pool: `python deployments/serve.py CORPUS WORKSPACE`.

The same deployment as `deployments/prefect.yaml` - `pipeline/pipeline`, daily at 03:00 UTC, with the corpus and
workspace as parameters - plus each stage on its own (`ingest/ingest`, `extract/extract`, `train/train`,
`embed/embed`), unscheduled, to run by hand: `prefect deployment run extract/extract`. This process polls for
their runs and starts each in a subprocess: keep it running (Ctrl-C stops serving and pauses the schedule).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from crossalign.config import CorpusConfig, PipelineConfig
from flows.embed import embed_flow
from flows.extract import extract_flow
from flows.ingest import ingest_flow
from flows.pipeline import pipeline
from flows.train import train_flow

CRON = "0 3 * * *"
TIMEZONE = "UTC"
STAGES = (ingest_flow, extract_flow, train_flow, embed_flow)


def build_deployments(corpus: Path | str, workspace: Path | str, stages: bool = True) -> list[RunnerDeployment]:
    """The deployments to serve for `corpus` into `workspace`: `pipeline` on the daily schedule, then the stages.

    Each is named after its flow and takes the config {"workspace", "corpus": {"root"}} (absolute paths); every
    other field keeps its default, read when a run starts. Entrypoints are module paths (`flows.pipeline.pipeline`),
    so serving works from any directory. Builds only: nothing is registered or run.

    Raises:
        pydantic.ValidationError: the paths do not make a valid `PipelineConfig`.
    """
    config = PipelineConfig(workspace=Path(workspace), corpus=CorpusConfig(root=Path(corpus).expanduser().resolve()))
    parameters = {"config": {"workspace": str(config.workspace), "corpus": {"root": str(config.corpus.root)}}}
    description = "Daily incremental run - ingest new corpus items, extract only what is missing, embed into LanceDB."
    common = {"parameters": parameters, "tags": ["crossalign"], "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [pipeline.to_deployment(name="pipeline", schedule=Cron(CRON, timezone=TIMEZONE),
                                          description=description, **common)]
    if stages:
        deployments += [flow.to_deployment(name=flow.name, **common) for flow in STAGES]
    return deployments


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="Folder holding the images and the captions file.")
    parser.add_argument("workspace", type=Path, help="Root of every table a run writes.")
    parser.add_argument("--no-stages", dest="stages", action="store_false",
                        help="Serve only the scheduled `pipeline`, not the single-stage flows.")
    args = parser.parse_args(argv)
    serve(*build_deployments(args.corpus, args.workspace, stages=args.stages))


if __name__ == "__main__":
    main(sys.argv[1:])
