"""The `extract` flow: frozen-encoder features of every ingested image and caption, one task per shard."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.futures import PrefectFuture

from crossalign.config import PipelineConfig
from crossalign.extract.plan import MODALITIES, ShardsFailedError
from flows import tasks
from flows.runners import GPU_TAG, shard_resources, task_runner_for


@flow(name="extract-shards")
def extract_shards(config: PipelineConfig) -> list[dict[str, Any]]:
    """Plan the missing work of each modality and map `extract-shard` over its units on this flow's task runner.

    Every shard runs to its end before a failure is raised, so a rerun encodes only the failed shards.

    Returns:
        One summary per modality (image, then text).

    Raises:
        ShardsFailedError: a shard failed twice (or once, for a setup error); the message names it.
    """
    shard_task = tasks.extract_shard
    if config.extract.device != "cpu":  # 'auto' may pick the GPU: let a concurrency limit on the tag guard it
        shard_task = shard_task.with_options(tags={GPU_TAG})
    summaries, failures, shard_count = [], [], 0
    for modality in MODALITIES:
        plan = tasks.plan_extraction(config, modality)
        with shard_resources(config.runner):
            futures = shard_task.map(unmapped(config), unmapped(modality), range(len(plan["units"])),
                                     plan["units"])
        results = _wait(futures)
        shard_count += len(futures)
        failures += [(f"extract-{modality}-shard-{number}", result) for number, result in enumerate(results)
                     if isinstance(result, BaseException)]
        done = [result for result in results if not isinstance(result, BaseException)]
        summaries.append(tasks.summarise_extraction(config, modality, plan, done))
    if failures:
        name, error = failures[0]
        raise ShardsFailedError(
            f"{len(failures)} of {shard_count} extraction shards failed ({', '.join(n for n, _ in failures)}); "
            f"first, {name}: {type(error).__name__}: {error}. The other {shard_count - len(failures)} finished and are "
            "recorded in the feature manifests: a rerun extracts only what is missing."
        ) from error
    return summaries


def _wait(futures: list[PrefectFuture]) -> list[Any]:
    """Each future's result, or its exception: every shard finishes, failed or not."""
    for future in futures:
        future.wait()
    return [future.result(raise_on_failure=False) for future in futures]


def extract_stage(config: PipelineConfig) -> list[dict[str, Any]]:
    """`extract-shards` as a subflow on the task runner that `config.runner` selects (threads or Dask).

    A subflow, because a flow's task runner is fixed when it starts, and the runner is a run parameter.
    """
    return extract_shards.with_options(task_runner=task_runner_for(config.runner))(config)


@flow(name="extract")
def extract_flow(config: PipelineConfig) -> list[dict[str, Any]]:
    """Extract the image and caption features the workspace lacks for `config.corpus`."""
    tasks.preflight(config, ["extract"])
    summaries = extract_stage(config)
    tasks.publish_throughput(summaries)
    return summaries
