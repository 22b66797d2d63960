"""Orchestration of extraction: shard tasks on Prefect's thread pool and on a Dask cluster, retries, two pipeline
runs at once on one workspace, the GPU concurrency tag, and library logs in the run logs (real Prefect backend)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pytest
from conftest import ENCODER_RUNTIME, IMAGE_ENCODER, TEXT_ENCODER, flush_logs, run_logs, write_tiny_corpus

from crossalign.config import CorpusConfig, ExtractConfig, PipelineConfig, RunnerConfig, TrainConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.extract import FeatureManifest, read_features
from crossalign.workspace import Workspace

CORPUS = "tiny"
SHARD = 4  # 12 images and 28 captions: 3 image shards and 7 caption shards
REPO = Path(__file__).parents[1]


def make_config(workspace: Path, corpus: Path, extract: dict | None = None, **runner) -> PipelineConfig:
    return PipelineConfig(
        workspace=workspace, corpus=CorpusConfig(root=corpus, name=CORPUS),
        extract=ExtractConfig(**{"image_encoder": IMAGE_ENCODER, "text_encoder": TEXT_ENCODER, "shard_size": SHARD,
                                 "num_workers": 1, **ENCODER_RUNTIME, **(extract or {})}),
        train=TrainConfig(dim=32, steps=60, batch_size=8, eval_every=20, warmup_steps=5, input_dropout=0.0,
                          train_split="train", eval_split="train"),
        runner=RunnerConfig(**runner),
    )


def ingested_config(tmp_path: Path, corpus: Path, **options) -> PipelineConfig:
    config = make_config(tmp_path / "ws", corpus, **options)
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), Workspace(config.workspace))
    return config


def features(config: PipelineConfig, encoder: str) -> tuple[list[str], np.ndarray]:
    return read_features(Workspace(config.workspace).features_dir(CORPUS, encoder))


def expected_ids(config: PipelineConfig) -> dict[str, list[str]]:
    workspace = Workspace(config.workspace)
    return {IMAGE_ENCODER: read_images(workspace, CORPUS).column("image_id").to_pylist(),
            TEXT_ENCODER: read_captions(workspace, CORPUS).column("caption_id").to_pylist()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("orchestration") / "corpus")


@pytest.fixture(scope="module")
def thread_run(prefect_backend, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """The extract flow on the default runner (threads), in shards of 4: (config, flow run state)."""
    from flows.extract import extract_flow

    config = ingested_config(tmp_path_factory.mktemp("threads"), corpus)
    state = extract_flow(config, return_state=True)
    return config, state


def test_extraction_is_one_named_task_per_shard(thread_run) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    config, state = thread_run
    summaries = state.result()
    assert [(s["modality"], s["encoded"], s["already_done"], s["failed"]) for s in summaries] == [
        ("image", 12, 0, 0), ("text", 28, 0, 0)]
    for encoder, ids in expected_ids(config).items():
        stored, _ = features(config, encoder)
        assert len(stored) == len(set(stored)) and sorted(stored) == sorted(ids)
        manifest = FeatureManifest.load(Workspace(config.workspace).features_dir(CORPUS, encoder))
        assert [shard["rows"] for shard in manifest.shards] == [SHARD] * (len(ids) // SHARD)
    with get_client(sync_client=True) as client:
        (child,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        names = {run.name for run in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [child.id]}))}
    assert {f"extract-image-shard-{n}" for n in range(3)} | {f"extract-text-shard-{n}" for n in range(7)} <= names
    assert {"plan-image-shards", "plan-text-shards"} <= names


def test_library_logs_reach_the_flow_run_logs(thread_run) -> None:
    config, state = thread_run
    flush_logs()

    logs = run_logs(state.state_details.flow_run_id)

    library = [log for log in logs if log.name == "crossalign.extract.encoding" and str(config.workspace) in
               log.message]
    assert any(f"{IMAGE_ENCODER}: 4 to encode, 0 already done" in log.message for log in library), [
        (log.name, log.message) for log in logs]
    assert all(log.task_run_id is not None for log in library)  # each under its shard task


def test_a_rerun_extracts_nothing_and_runs_no_shard(thread_run) -> None:
    from flows.extract import extract_flow

    config, _ = thread_run
    files = {p: p.stat().st_mtime_ns for p in (Path(config.workspace) / "features").rglob("part-*.parquet")}

    summaries = extract_flow(config)

    assert [(s["encoded"], s["already_done"]) for s in summaries] == [(0, 12), (0, 28)]
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_shards_on_a_two_worker_dask_cluster_equal_the_thread_pool(thread_run, corpus: Path, tmp_path: Path) -> None:
    """runner kind "dask" starts a 2-worker LocalCluster (spawned processes) for the run: the shards spread over
    both workers, which load the encoders themselves, and the features equal those of the thread pool."""
    from crossalign.encoders import load_encoder
    from flows.extract import extract_flow

    threads_config, _ = thread_run
    config = ingested_config(tmp_path, corpus, kind="dask", dask_workers=2)
    loads_here = load_encoder.cache_info()

    state = extract_flow(config, return_state=True)

    summaries = state.result()
    assert [(s["encoded"], s["failed"]) for s in summaries] == [(12, 0), (28, 0)]
    assert [s["processes"] for s in summaries] == [2, 2]  # both workers ran shards of each modality ...
    assert load_encoder.cache_info() == loads_here  # ... and no shard ran in this process
    for encoder in (IMAGE_ENCODER, TEXT_ENCODER):
        reference_ids, reference = features(threads_config, encoder)
        ids, _ = features(config, encoder)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(reference_ids)
        _, vectors = read_features(Workspace(config.workspace).features_dir(CORPUS, encoder), reference_ids)
        np.testing.assert_allclose(vectors, reference, atol=1e-5, rtol=0)
    # The workers' library log records reach the run's logs too (sent by each worker on its own schedule).
    deadline, logs = time.monotonic() + 20, []
    while time.monotonic() < deadline and not any(log.name == "crossalign.extract.encoding" for log in logs):
        time.sleep(1)
        logs = run_logs(state.state_details.flow_run_id)
    assert any(log.name == "crossalign.extract.encoding" and str(config.workspace) in log.message for log in logs)


def test_the_runner_setting_picks_the_task_runner() -> None:
    import dask
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import task_runner_for

    threads = task_runner_for(RunnerConfig(max_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    existing = task_runner_for(RunnerConfig(kind="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(existing, DaskTaskRunner) and existing.address == "tcp://10.0.0.5:8786"
    local = task_runner_for(RunnerConfig(kind="dask", dask_workers=2))
    assert local.address is None and local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["processes"] and local.cluster_kwargs["threads_per_worker"] == 1
    assert dask.config.get("distributed.worker.multiprocessing-method") == "spawn"
    with pytest.raises(ValueError, match="set kind to 'dask'"):
        RunnerConfig(dask_address="tcp://10.0.0.5:8786")


def test_a_shard_that_fails_twice_fails_the_run_and_the_others_stay_done(
    prefect_backend, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.tasks
    from flows.extract import ShardsFailedError, extract_flow

    config = ingested_config(tmp_path, corpus)
    doomed = expected_ids(config)[IMAGE_ENCODER][SHARD]  # first id of image shard 1
    real, attempts = flows.tasks.extract_image_features, []

    def flaky_disk(*args, unit, **kwargs):
        if unit["start"] <= SHARD < unit["stop"]:  # the unit of table row SHARD: the doomed image
            attempts.append(1)
            raise OSError("Input/output error (simulated)")
        return real(*args, unit=unit, **kwargs)

    monkeypatch.setattr(flows.tasks, "extract_image_features", flaky_disk)
    with pytest.raises(ShardsFailedError, match=r"1 of 10 extraction shards failed \(extract-image-shard-1\); "
                                                r"first, extract-image-shard-1: OSError: Input/output error"):
        extract_flow(config)

    assert len(attempts) == 2  # tried, retried once, then the run failed
    image_ids, _ = features(config, IMAGE_ENCODER)
    assert len(image_ids) == 8 and doomed not in image_ids  # the two other image shards are recorded
    assert len(features(config, TEXT_ENCODER)[0]) == 28  # and so are the caption shards, run after the failure
    monkeypatch.setattr(flows.tasks, "extract_image_features", real)
    summaries = extract_flow(config)
    assert [(s["encoded"], s["already_done"]) for s in summaries] == [(4, 8), (0, 28)]  # only what was missing
    assert sorted(features(config, IMAGE_ENCODER)[0]) == sorted(expected_ids(config)[IMAGE_ENCODER])


def test_features_of_another_encoder_setup_fail_the_run_without_retries(
    thread_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.tasks
    from crossalign.extract import FeatureMismatchError
    from flows.extract import ShardsFailedError, extract_flow, extract_stage

    real, calls = flows.tasks.extract_image_features, []
    monkeypatch.setattr(flows.tasks, "extract_image_features", lambda *a, **k: calls.append(1) or real(*a, **k))

    threads_config, _ = thread_run
    shutil.copytree(threads_config.workspace, tmp_path / "ws")
    config = threads_config.model_copy(update={"workspace": tmp_path / "ws"})
    directory = Workspace(config.workspace).features_dir(CORPUS, IMAGE_ENCODER)
    manifest = FeatureManifest.load(directory)
    manifest.encoder["weights_digest"] = "0123456789abcdef"
    manifest.shards.pop()  # work for the run to do
    manifest.save(directory)

    with pytest.raises(FeatureMismatchError, match=r"\(differs in: weights_digest\)"):
        extract_flow(config)  # its pre-flight loads the encoders and compares them with the features on disk
    assert not calls
    mismatch = r"1 of 1 extraction shards failed .*FeatureMismatchError: .*\(differs in: weights_digest\)"
    with pytest.raises(ShardsFailedError, match=mismatch):
        extract_stage(config)  # the shards check too (on Dask workers the pre-flight loads no encoder)
    assert len(calls) == 1  # a setup error is not retried: it would fail again
    assert FeatureManifest.load(directory) == manifest


RUN_PIPELINE = """
import json
import sys
import time
from pathlib import Path

from crossalign.config import PipelineConfig
from crossalign.extract.encoding import BackoffEncoder
from flows.pipeline import pipeline

# Each forward pass takes a second longer, so that the two runs' extraction tasks surely overlap.
forward = BackoffEncoder.__call__
BackoffEncoder.__call__ = lambda self, inputs: time.sleep(1) or forward(self, inputs)

if __name__ == "__main__":
    config_file, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:  # start together, once both processes have imported everything
        time.sleep(0.05)
    state = pipeline(PipelineConfig.model_validate_json(config_file.read_text()), return_state=True)
    result = state.result()
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "mapper_id": result["metrics"]["mapper_id"],
                      "trained": result["train"] is not None, "extract": result["extract"]}))
"""


@pytest.fixture
def one_gpu_task_at_a_time(prefect_backend):
    """The concurrency limit the README documents: `prefect concurrency-limit create crossalign-gpu 1`."""
    from prefect import get_client

    from flows.runners import GPU_TAG

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=1)
    try:
        yield GPU_TAG
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(GPU_TAG)


def test_two_pipeline_runs_at_once_on_one_workspace(prefect_backend, corpus: Path, tmp_path: Path) -> None:
    """Two processes run the whole pipeline on one workspace at once: each item is stored once, in the features
    and in both tables, by the one mapper that the first run trained and the second reused."""
    from prefect.settings import PREFECT_API_URL

    config = make_config(tmp_path / "ws", corpus)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    script = tmp_path / "run_pipeline.py"
    script.write_text(RUN_PIPELINE)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    (tmp_path / "barrier").mkdir()
    command = [sys.executable, str(script), str(tmp_path / "config.json"), str(tmp_path / "barrier")]
    runs = [subprocess.Popen([*command, str(number)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for number in range(2)]
    outputs = [run.communicate(timeout=400) for run in runs]

    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    workspace = Workspace(config.workspace)
    for encoder, ids in expected_ids(config).items():
        stored, _ = features(config, encoder)
        assert len(stored) == len(set(stored)) and sorted(stored) == sorted(ids), encoder
        manifest = FeatureManifest.load(workspace.features_dir(CORPUS, encoder))
        assert sum(shard["rows"] for shard in manifest.shards) == len(ids) and not manifest.failed
    encoded = [[s["encoded"] for s in r["extract"]] for r in results]
    assert [a + b for a, b in zip(*encoded)] == [12, 28]  # between them, each item encoded once
    assert all([s["encoded"] + s["already_done"] for s in r["extract"]] == [12, 28] for r in results)
    assert sorted(r["trained"] for r in results) == [False, True]  # the second run reused the first one's mapper
    current = workspace.current_mapper_id()
    assert {r["mapper_id"] for r in results} == {current}
    db = lancedb.connect(str(workspace.lancedb_uri))
    for table, ids in (("images", expected_ids(config)[IMAGE_ENCODER]),
                       ("captions", expected_ids(config)[TEXT_ENCODER])):
        rows = db.open_table(table).to_arrow()
        assert sorted(rows.column("id").to_pylist()) == sorted(ids), table  # no duplicates, none lost
        assert set(rows.column("mapper_id").to_pylist()) == {current}, table


def test_a_concurrency_limit_on_the_gpu_tag_runs_one_extraction_task_at_a_time(
    one_gpu_task_at_a_time: str, corpus: Path, tmp_path: Path
) -> None:
    """With device 'auto' the shard tasks carry the GPU tag; with the limit the README documents, two of them
    never run at once, though the thread pool would run two."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

    from flows.extract import extract_flow

    config = ingested_config(tmp_path, corpus, extract={"device": "auto", "shard_size": 8}, max_workers=2)

    state = extract_flow(config, return_state=True)

    assert [s["encoded"] for s in state.result()] == [12, 28]
    with get_client(sync_client=True) as client:
        tagged = client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(
            all_=[one_gpu_task_at_a_time])))
    spans = sorted((run.start_time, run.end_time) for run in tagged
                   if run.flow_run_id in _subflow_runs([state.state_details.flow_run_id]))
    assert len(spans) == 2 + 4  # every shard task is tagged: 2 image and 4 caption shards of 8
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), "two GPU tasks ran at once"


def _subflow_runs(flow_run_ids: list) -> set:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return {run.id for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=flow_run_ids)))}
