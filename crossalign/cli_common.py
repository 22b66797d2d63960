"""What every `crossalign` command shares: its options (each default read from the config, never repeated
here), the pre-flight and flow-run calls, and how errors reach people: one line on stderr and exit code 2
for anything a user can cause, never a traceback (`--debug` shows it).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer
from pydantic import ValidationError

from crossalign.config import (
    CORPUS_FORMATS,
    CorpusConfig,
    ExtractConfig,
    PipelineConfig,
    Precision,
    QueryBankConfig,
    RunnerConfig,
    StoreConfig,
    TrainConfig,
)

Workspace_ = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace directory (all tables).")]
Corpus_ = Annotated[Path, typer.Option("--corpus", "-c", help="Corpus folder holding captions.jsonl and images.")]
TrainSplit = Annotated[str, typer.Option(help="Split to train on.")]
EvalSplit = Annotated[str, typer.Option(help="Split to select the mapper on and report.")]
# The extraction and training options, shared by `run` and the stage commands (`extract`, `train`).
ImageEncoder_ = Annotated[str, typer.Option(
    help="efficientnet-lite0, efficientnet-lite2, torchvision:<model>\\[@weights]; +flip averages over the "
    "mirror image; a,b concatenates several")]
TextEncoder_ = Annotated[str, typer.Option(help="minilm-l6, mpnet-base, hf:<model id or dir>\\[#cls]; a,b concatenates "
                                               "several")]
Device_ = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")]
Precision_ = Annotated[str, typer.Option(help=", ".join(get_args(Precision)))]
Compile_ = Annotated[str, typer.Option(
    help="torch.compile the image encoder: auto (on the CPU for 5,000+ images), on, off")]
Decode_ = Annotated[str, typer.Option(
    help="Image decoding: auto (threads on the CPU, processes on CUDA), threads, processes, or on the GPU: "
    "nvjpeg, nvimgcodec.")]
Runner_ = Annotated[str, typer.Option(help="Where extraction shards run: threads, or dask.")]
DaskResources_ = Annotated[str, typer.Option(
    help="With --runner dask: resources each extraction task holds on its worker, e.g. GPU=1 (start the workers "
    "with --resources GPU=1): one extraction per GPU.")]
DaskAddress_ = Annotated[Optional[str], typer.Option(
    help="With --runner dask: a running scheduler (tcp://host:8786); default a new LocalCluster.")]
Steps_ = Annotated[int, typer.Option(help="Training steps (early stopping may end sooner).")]
Loss_ = Annotated[str, typer.Option(help="infonce, vsepp or margin (the reference).")]
Lr_ = Annotated[float, typer.Option(help="Peak learning rate of the mapper.")]
InputDropout_ = Annotated[float, typer.Option(help="Dropout on the standardised input features.")]
Dim_ = Annotated[int, typer.Option(help="Joint embedding dimension (split evenly between --heads).")]
BatchSize_ = Annotated[int, typer.Option(help="Training batch (pairs per step).")]
Heads_ = Annotated[int, typer.Option(help="An ensemble in one mapper: this many linear maps, trained one after "
                                          "the other, their joint vectors concatenated.")]
Normalise_ = Annotated[str, typer.Option(
    "--normalise", help="Scores of text -> image and image -> text: inverted_softmax (against the mapper's query "
    "bank, against hubs), dynamic (QB-Norm), or none (raw cosine).")]
# Every option default is read from the config (never repeated here).
CORPUS = CorpusConfig(root=".")
EXTRACT = ExtractConfig()
TRAIN = TrainConfig()
QUERYBANK = QueryBankConfig()
STORE = StoreConfig()
RUNNER = RunnerConfig()
WORKSPACE: Path = PipelineConfig.model_fields["workspace"].default
RETRAIN: bool = PipelineConfig.model_fields["retrain"].default
console = {"debug": False}  # set by the `--debug` option, for the command that follows


def user_errors() -> tuple[type[BaseException], ...]:
    from crossalign.align import MapperMismatchError
    from crossalign.corpus.folder import CorpusConfigError
    from crossalign.encoders import WeightsUnavailableError
    from crossalign.extract import FeatureMismatchError
    from crossalign.search import QueryError
    from crossalign.store import StoreMismatchError
    from crossalign.workspace import WorkspaceError

    return (CorpusConfigError, WorkspaceError, QueryError, MapperMismatchError, FeatureMismatchError,
            StoreMismatchError, WeightsUnavailableError, ValidationError, ValueError, FileNotFoundError)


def friendly(command: Callable[..., None]) -> Callable[..., None]:
    """Turn the errors a user can cause into one line on stderr and exit code 2, and failed extraction shards
    into one line too (their tracebacks are in the run's logs)."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from crossalign.extract import ShardsFailedError

        try:
            command(*args, **kwargs)
        except (*user_errors(), ShardsFailedError) as err:
            if console["debug"]:
                traceback.print_exc()
            message = str(err).splitlines()[0] if not isinstance(err, ValidationError) else validation_message(err)
            typer.secho(f"error: {message}", err=True, fg="red")
            # Shards that failed for a passing reason (out of memory, a flaky disk) exit 1: a rerun may pass.
            passing = isinstance(err, ShardsFailedError) and not isinstance(err.__cause__, user_errors())
            raise typer.Exit(1 if passing else 2) from None

    return wrapper


def preflight(config: PipelineConfig, *stages: str) -> None:
    """Fail before any work, as the flows' first task would (`crossalign.preflight.check_config`): for `stages`,
    or for the whole pipeline's."""
    from crossalign.preflight import STAGES, check_config

    check_config(config, stages or STAGES)


def run_flow(flow: Callable[[PipelineConfig], Any], config: PipelineConfig) -> Any:
    """Run `flow`; a failure's records stay in the run's logs, off the console, unless `--debug`."""
    from flows.console import quiet_run_failures

    quiet_run_failures(not console["debug"])
    return flow(config)


def validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


Format = Annotated[str, typer.Option("--format", help="auto, " + ", ".join(CORPUS_FORMATS))]


def dask_resources(text: str) -> dict[str, float]:
    """`GPU=1,MEM=2` as {"GPU": 1.0, "MEM": 2.0}; empty text, none.

    Raises:
        ValueError: an entry that is not NAME=NUMBER.
    """
    resources = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, amount = entry.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"--dask-resources: {entry!r} is not NAME=NUMBER (e.g. GPU=1)") from None
        if not name.strip():
            raise ValueError(f"--dask-resources: {entry!r} is not NAME=NUMBER (e.g. GPU=1)")
    return resources
