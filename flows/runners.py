"""The task runner that a run's shard tasks use, as `config.runner` selects it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from crossalign.config import RunnerConfig

GPU_TAG = "crossalign-gpu"
"""Tag of the extraction tasks that use a GPU: `prefect concurrency-limit create crossalign-gpu 1` lets one
run at a time on the machine's GPU, across every run that talks to the same Prefect server."""


def task_runner_for(runner: RunnerConfig) -> TaskRunner:
    """A new task runner for `runner`: Prefect's thread pool, or prefect-dask's DaskTaskRunner.

    Dask: on the scheduler at `runner.dask_address`, or on a LocalCluster started for the run (and
    closed after it) with `runner.dask_workers` worker processes, spawned, not forked (a process forked
    after it used LanceDB deadlocks), one task at a time each, sharing the CPU cores between them.

    Raises:
        ImportError: kind "dask" without prefect-dask installed.
    """
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ImportError("runner kind 'dask' needs prefect-dask: pip install prefect-dask") from err
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})  # the default; never fork
    threads = str(max(1, (os.cpu_count() or 1) // runner.dask_workers))  # torch's intra-op threads per worker
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runner.dask_workers, "threads_per_worker": 1, "processes": True,
            "local_directory": str(Path(tempfile.gettempdir()) / "crossalign-dask"),
            "dashboard_address": ":0",  # any free port: two runs at once must not clash
            "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
            **({"resources": dict(runner.dask_resources)} if runner.dask_resources else {}),
        },
    )


@contextlib.contextmanager
def shard_resources(runner: RunnerConfig) -> Iterator[None]:
    """Submit the extraction tasks inside this: on Dask, each then holds `runner.dask_resources` on its worker
    (`{"GPU": 1}` with workers started `--resources GPU=1`: one extraction per GPU at a time)."""
    if runner.kind != "dask" or not runner.dask_resources:
        yield
        return
    import dask

    with dask.annotate(resources=dict(runner.dask_resources)):
        yield
