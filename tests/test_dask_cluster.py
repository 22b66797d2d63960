"""Extraction on a real Dask cluster: a scheduler and workers started as separate processes on 127.0.0.1
(`dask scheduler`, `dask worker`), as a team runs one across machines, and Dask resources, so that a GPU machine
runs one extraction per GPU (here on the CPU, with a declared resource). Real Prefect backend, real encoders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ENCODER_RUNTIME, IMAGE_ENCODER, TEXT_ENCODER, write_tiny_corpus
from prefect_server import start_logged, stop, tail

from crossalign.config import CorpusConfig, ExtractConfig, PipelineConfig, RunnerConfig, TrainConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.extract import read_features
from crossalign.workspace import Workspace

distributed = pytest.importorskip("distributed", reason="the Dask runner needs prefect-dask (and distributed)")
pytest.importorskip("prefect_dask", reason="the Dask runner needs prefect-dask")

CORPUS = "tiny"
SHARD = 4  # 12 images and 28 captions: 3 image shards and 7 caption shards
REPO = Path(__file__).parents[1]
DASK = Path(sys.executable).with_name("dask")  # the venv's command line, next to its python
START_S = 60


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One `dask worker` process (one worker, behind its nanny)."""

    name: str
    nthreads: int = 1
    resources: str | None = None  # "GPU=1"


@dataclasses.dataclass
class SeparateCluster:
    """A running scheduler and its workers, each a process of its own; `leftovers` is filled at teardown."""

    address: str
    client: distributed.Client
    processes: list = dataclasses.field(default_factory=list)  # the Popen of the scheduler, then of each worker
    leftovers: list[int] = dataclasses.field(default_factory=list)

    def process_tree(self) -> list[psutil.Process]:
        """Every process of the cluster: the ones started here and their children (each nanny's worker)."""
        tree = []
        for popen in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(popen.pid)
                tree += [root, *root.children(recursive=True)]
        return tree

    def worker_names(self) -> dict[str, str]:
        """Worker address -> the name it was started with."""
        return {address: info["name"] for address, info in self.client.scheduler_info()["workers"].items()}


def cluster_env() -> dict[str, str]:
    """The environment of the cluster's processes: they import `crossalign` and `flows` from this checkout, talk to
    the session's Prefect backend, start worker processes by spawning (a process forked after it used LanceDB
    deadlocks) and give torch one thread each (two cores here, shared)."""
    from prefect.settings import PREFECT_API_URL

    api = {"PREFECT_API_URL": PREFECT_API_URL.value()} if PREFECT_API_URL.value() else {}
    return {**os.environ, **api,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "spawn",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _written(path: Path) -> bool:
    try:
        return "address" in json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or half written
        return False


def _wait_for_file(path: Path, process, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while not _written(path):
        if process.poll() is not None:
            pytest.fail(f"dask scheduler exited with {process.returncode}; its log:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"dask scheduler wrote no {path.name} in {START_S} s; its log:\n{tail(log)}")
        time.sleep(0.2)


@contextlib.contextmanager
def separate_process_cluster(root: Path, workers: list[WorkerSpec]) -> Iterator[SeparateCluster]:
    """`dask scheduler` and one `dask worker` per spec, each in its own session, on 127.0.0.1 only (random ports,
    no dashboards); yields once every worker has joined. On exit, even on an error, every process of the cluster
    is stopped (SIGTERM to its session, then SIGKILL) and those still alive after it are in `leftovers` (killed)."""
    root.mkdir(parents=True, exist_ok=True)
    env, scheduler_file = cluster_env(), root / "scheduler.json"
    quiet = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]  # its HTTP server (health, metrics) still runs
    processes = [start_logged([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", *quiet,
                               "--scheduler-file", str(scheduler_file)], env, root / "scheduler.log", cwd=REPO)]
    cluster = None
    try:
        _wait_for_file(scheduler_file, processes[0], root / "scheduler.log")
        for spec in workers:
            command = [str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                       "--nworkers", "1", "--nthreads", str(spec.nthreads), "--name", spec.name, *quiet,
                       "--local-directory", str(root / spec.name), "--death-timeout", str(START_S)]
            command += ["--resources", spec.resources] if spec.resources else []
            processes.append(start_logged(command, env, root / f"{spec.name}.log", cwd=REPO))
        client = distributed.Client(scheduler_file=str(scheduler_file), timeout=START_S)
        cluster = SeparateCluster(client.scheduler.address, client, processes)
        try:
            client.wait_for_workers(len(workers), timeout=START_S)
        except TimeoutError:
            pytest.fail("\n".join(f"{p.name}:\n{tail(p)}" for p in sorted(root.glob("*.log"))))
        yield cluster
    finally:
        tree = cluster.process_tree() if cluster else []
        if cluster:
            cluster.client.close()
        for process in reversed(processes):
            stop(process)
        leftovers = [process for process in tree if _alive(process)]
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if cluster:
            cluster.leftovers = [process.pid for process in leftovers]


def worker_of_each_task(task_stream: list[dict], names: dict[str, str]) -> dict[str, str]:
    """Task key -> name of the worker that computed it, from the scheduler's task stream."""
    return {record["key"]: names[record["worker"]] for record in task_stream}


def executions(cluster: SeparateCluster, keys: list[str]) -> tuple[dict[str, list[tuple[float, float]]], set[str]]:
    """From the workers' own state-machine logs (`Client.story`): worker name -> (start, end) of each time it
    executed one of `keys`, in start order; and the keys that waited in state "constrained", which a worker gives
    only a task with resource restrictions until it holds them.

    The worker's clock, not the task stream's times: those are shifted by each worker's estimate of its offset to
    the scheduler's clock, which a loaded machine makes seconds wrong (two one-at-a-time shards seemed to overlap).
    """
    names, began, spans, constrained = cluster.worker_names(), {}, {}, set()
    transitions = [entry for entry in cluster.client.story(*keys) if entry[0] != "scheduler" and len(entry) == 8]
    for worker, key, start, _, final, _, _, when in sorted(transitions, key=lambda entry: entry[-1]):
        if "constrained" in (start, final):
            constrained.add(key)
        if final == "executing" and start != "executing":
            began[worker, key] = when
        elif start == "executing" and final != "executing":
            spans.setdefault(names[worker], []).append((began.pop((worker, key)), when))
    return {name: sorted(runs) for name, runs in spans.items()}, constrained


def overlapping(spans: list[tuple[float, float]]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The pairs of consecutive spans (in start order) where the later began before the earlier ended."""
    return [(earlier, later) for earlier, later in zip(spans, spans[1:]) if later[0] < earlier[1]]


def make_config(workspace: Path, corpus: Path, **runner) -> PipelineConfig:
    return PipelineConfig(
        workspace=workspace, corpus=CorpusConfig(root=corpus, name=CORPUS),
        extract=ExtractConfig(image_encoder=IMAGE_ENCODER, text_encoder=TEXT_ENCODER, shard_size=SHARD,
                              num_workers=1, **ENCODER_RUNTIME),
        train=TrainConfig(dim=32, steps=20, batch_size=8, eval_every=10, warmup_steps=2, input_dropout=0.0,
                          train_split="train", eval_split="train"),
        runner=RunnerConfig(**runner),
    )


def assert_every_item_once(config: PipelineConfig) -> None:
    workspace = Workspace(config.workspace)
    for encoder, ids in ((IMAGE_ENCODER, read_images(workspace, CORPUS).column("image_id").to_pylist()),
                         (TEXT_ENCODER, read_captions(workspace, CORPUS).column("caption_id").to_pylist())):
        stored, _ = read_features(workspace.features_dir(CORPUS, encoder))
        assert len(stored) == len(set(stored)) and sorted(stored) == sorted(ids), encoder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("dask-cluster") / "corpus")


@pytest.fixture(scope="module")
def thread_features(prefect_backend, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The workspace of an extract run on the default runner (Prefect's thread pool): the reference features."""
    from flows.extract import extract_flow

    config = make_config(tmp_path_factory.mktemp("threads") / "ws", corpus)
    ingest_corpus(config.corpus, Workspace(config.workspace))
    extract_flow(config)
    return Workspace(config.workspace)


def test_the_pipeline_on_a_separate_process_cluster_equals_the_thread_pool(
    thread_features: Workspace, corpus: Path, tmp_path: Path
) -> None:
    """The whole pipeline flow with runner kind "dask" on the address of a scheduler started apart, with two
    one-thread workers: both workers run shards of each modality, the features equal the thread pool's, and the
    tables hold every item; the cluster's processes are all gone afterwards."""
    from flows.pipeline import pipeline

    with separate_process_cluster(tmp_path / "cluster", [WorkerSpec("worker-a"), WorkerSpec("worker-b")]) as cluster:
        config = make_config(tmp_path / "ws", corpus, kind="dask", dask_address=cluster.address)
        with distributed.get_task_stream(client=cluster.client) as stream:
            result = pipeline(config)
        where = worker_of_each_task(stream.data, cluster.worker_names())

    assert [(s["modality"], s["encoded"], s["failed"]) for s in result["extract"]] == [
        ("image", 12, 0), ("text", 28, 0)]
    assert [s["processes"] for s in result["extract"]] == [2, 2]  # both workers ran shards of each modality ...
    assert len(where) == 3 + 7 and set(where.values()) == {"worker-a", "worker-b"}, where  # ... all 10 there
    assert_every_item_once(config)
    for encoder in (IMAGE_ENCODER, TEXT_ENCODER):
        reference_ids, reference = read_features(thread_features.features_dir(CORPUS, encoder))
        _, vectors = read_features(Workspace(config.workspace).features_dir(CORPUS, encoder), reference_ids)
        np.testing.assert_allclose(vectors, reference, atol=1e-5, rtol=0)
    assert (result["embed"]["images_in_table"], result["embed"]["captions_in_table"]) == (12, 28), result["embed"]
    assert cluster.leftovers == []


def test_shards_hold_the_declared_resource_one_at_a_time_and_only_where_it_is(
    prefect_backend, corpus: Path, tmp_path: Path
) -> None:
    """dask_resources {"GPU": 1}: a worker started with `--resources GPU=1` and two threads runs every shard, one at
    a time (the scheduler's task stream shows no two overlapping); the worker without the resource, idle beside
    it, runs none. Without the annotation reaching the scheduler, both workers would run shards, two at once."""
    from flows.extract import extract_flow

    workers = [WorkerSpec("gpu-worker", nthreads=2, resources="GPU=1"), WorkerSpec("cpu-worker", nthreads=2)]
    with separate_process_cluster(tmp_path / "cluster", workers) as cluster:
        config = make_config(tmp_path / "ws", corpus, kind="dask", dask_address=cluster.address,
                             dask_resources={"GPU": 1})
        ingest_corpus(config.corpus, Workspace(config.workspace))
        with distributed.get_task_stream(client=cluster.client) as stream:
            summaries = extract_flow(config)
        where = worker_of_each_task(stream.data, cluster.worker_names())
        runs, constrained = executions(cluster, list(where))

    assert [(s["encoded"], s["failed"], s["processes"]) for s in summaries] == [(12, 0, 1), (28, 0, 1)]
    assert len(where) == 3 + 7 and set(where.values()) == {"gpu-worker"}, where  # every shard, on the GPU worker
    assert constrained == set(where)  # each held back by the worker until the resource was free ...
    assert list(runs) == ["gpu-worker"] and len(runs["gpu-worker"]) == 3 + 7
    assert overlapping(runs["gpu-worker"]) == []  # ... so one at a time, though the worker has two threads
    assert_every_item_once(config)
    assert cluster.leftovers == []


def test_the_cluster_is_torn_down_when_the_test_fails(tmp_path: Path) -> None:
    """An error inside the cluster's block still stops the scheduler, the worker's nanny and the worker process
    the nanny spawned: none of them is left running."""
    with pytest.raises(RuntimeError, match="the test failed"):
        with separate_process_cluster(tmp_path / "cluster", [WorkerSpec("worker-a")]) as cluster:
            started = cluster.process_tree()
            assert len(started) >= 3  # scheduler, nanny, worker (and the spawn method's resource tracker)
            raise RuntimeError("the test failed")

    assert cluster.leftovers == []
    assert [process.pid for process in started if _alive(process)] == []


def test_the_resources_annotate_only_dask_submissions_and_a_local_cluster_declares_them() -> None:
    """`shard_resources` puts `dask_resources` on what is submitted inside it (the annotation `Client.submit`
    merges into the graph it sends), only for the Dask runner; a LocalCluster for the run declares them."""
    import dask

    from flows.runners import shard_resources, task_runner_for

    gpu = RunnerConfig(kind="dask", dask_resources={"GPU": 1})
    with shard_resources(gpu):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    assert dask.get_annotations() == {}
    for runner in (RunnerConfig(kind="threads", dask_resources={"GPU": 1}), RunnerConfig(kind="dask")):
        with shard_resources(runner):
            assert dask.get_annotations() == {}
    assert task_runner_for(gpu).cluster_kwargs["resources"] == {"GPU": 1}
    assert "resources" not in task_runner_for(RunnerConfig(kind="dask")).cluster_kwargs
