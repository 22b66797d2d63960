"""The Prefect flows against a real (session-scoped) Prefect backend, LanceDB and the bundled encoders."""

from __future__ import annotations

from pathlib import Path

import lancedb
import pytest
import yaml

from crossalign.config import CorpusConfig, ExtractConfig, PipelineConfig, TrainConfig


@pytest.fixture(scope="module")
def pipeline_run(prefect_backend, tmp_path_factory):
    """One pipeline run on a tiny real-image corpus, then a second run over the same workspace."""
    from conftest import write_tiny_corpus

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("flows")
    corpus = write_tiny_corpus(root / "corpus")
    config = PipelineConfig(
        workspace=root / "ws", corpus=CorpusConfig(root=corpus),
        train=TrainConfig(dim=64, steps=300, batch_size=8, eval_every=50, input_dropout=0.0, warmup_steps=10,
                          train_split="train", eval_split="train"),
    )
    first = pipeline(config)
    second = pipeline(config)
    return config, first, second


def test_pipeline_runs_every_stage(pipeline_run):
    config, first, _ = pipeline_run
    assert first["ingest"]["images"] > 0 and first["ingest"]["captions"] >= first["ingest"]["images"]
    assert [s["modality"] for s in first["extract"]] == ["image", "text"]
    assert first["extract"][0]["encoded"] == first["ingest"]["images"]
    assert first["extract"][1]["encoded"] == first["ingest"]["captions"]
    assert first["train"] is not None and Path(first["train"]["mapper_dir"], "model.safetensors").exists()
    assert first["embed"]["images_in_table"] == first["ingest"]["images"]
    assert first["embed"]["captions_in_table"] == first["ingest"]["captions"]
    assert first["samples"] and all(sample["hits"] for sample in first["samples"])


def test_second_run_skips_done_work(pipeline_run):
    _, first, second = pipeline_run
    assert [s["encoded"] for s in second["extract"]] == [0, 0]
    assert second["train"] is None  # the compatible mapper is reused
    assert second["metrics"]["mapper_id"] == first["metrics"]["mapper_id"]
    mapper_id = first["mapper"]["mapper_id"]
    assert first["mapper"] == {"mapper_id": first["train"]["mapper_id"], "reused": False,
                               "reason": f"trained a new mapper, {mapper_id}: the workspace has none yet"}
    assert second["mapper"]["reused"] and second["mapper"]["reason"].startswith(
        f"reused {mapper_id}: trained on the same data (corpus:train, selected on train, features of ")
    assert second["metrics"]["rsum"] == pytest.approx(first["metrics"]["rsum"])
    assert second["embed"]["images_in_table"] == first["embed"]["images_in_table"]
    assert second["embed"]["captions_in_table"] == first["embed"]["captions_in_table"]


def test_tables_answer_plain_lancedb(pipeline_run):
    config, first, _ = pipeline_run
    db = lancedb.connect(str(Path(config.workspace) / "lancedb"))
    images, captions = db.open_table("images"), db.open_table("captions")
    assert images.count_rows() == first["ingest"]["images"]
    caption = captions.search().limit(1).select(["vector", "image_id", "text"]).to_list()[0]
    hits = (images.search(caption["vector"]).distance_type("cosine").limit(3)
            .select(["id", "uri", "_distance"]).to_list())
    assert caption["image_id"] in [hit["id"] for hit in hits]  # the memorised training pair comes back
    assert all(Path(hit["uri"]).exists() for hit in hits)


def test_pipeline_publishes_metrics_artifact(pipeline_run):
    from prefect.artifacts import Artifact

    _, first, _ = pipeline_run
    artifact = Artifact.get("retrieval-metrics")
    assert artifact is not None and first["metrics"]["mapper_id"] in artifact.data


def test_a_run_with_other_training_options_trains_a_new_mapper_and_says_why(pipeline_run, tmp_path):
    import shutil

    from prefect.artifacts import Artifact

    from flows.pipeline import pipeline

    config, first, _ = pipeline_run
    shutil.copytree(config.workspace, tmp_path / "ws")
    train = config.train.model_copy(update={"loss": "vsepp", "lr": 0.01})
    other = pipeline(config.model_copy(update={"workspace": tmp_path / "ws", "train": train}))

    old = first["mapper"]["mapper_id"]
    assert other["train"] is not None and other["mapper"]["mapper_id"] == other["train"]["mapper_id"] != old
    assert other["mapper"] == {"mapper_id": other["train"]["mapper_id"], "reused": False, "reason": (
        f"trained a new mapper, {other['train']['mapper_id']}: the current one, {old}, was trained with "
        "loss 'infonce' (this run: 'vsepp'); lr 0.003 (this run: 0.01)")}
    assert [s["encoded"] for s in other["extract"]] == [0, 0]  # the features are reused all the same
    assert f"Mapper: {other['mapper']['reason']}" in Artifact.get("retrieval-metrics").data


def test_an_encoder_of_the_wrong_modality_fails_the_run_before_any_work(prefect_backend, tmp_path):
    from conftest import flush_logs, run_logs, write_tiny_corpus
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from flows.pipeline import pipeline

    config = PipelineConfig(workspace=tmp_path / "ws", corpus=CorpusConfig(root=write_tiny_corpus(tmp_path / "c")),
                            extract=ExtractConfig(image_encoder="minilm-l6", device="cpu", precision="fp32"))
    state = pipeline(config, return_state=True)

    message = "'minilm-l6' is a text encoder, not an image encoder: use one of efficientnet-lite0"
    assert state.is_failed() and message in state.message
    flow_run_id = state.state_details.flow_run_id
    flush_logs()
    logs = [log.message for log in run_logs(flow_run_id)]
    assert any(message in log and "Traceback" in log for log in logs), logs  # the traceback is in the run's logs
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id={"any_": [flow_run_id]}))
    assert [(t.name.rsplit("-", 1)[0], t.state_type.value) for t in tasks] == [("check-config", "FAILED")]
    assert subflows == [] and not (tmp_path / "ws").exists()  # no extraction, nothing written


def test_deployment_file_schedules_the_pipeline_daily():
    spec = yaml.safe_load((Path(__file__).parents[1] / "deployments" / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["entrypoint"] == "flows/pipeline.py:pipeline"]
    assert deployment["schedules"][0]["cron"] == "0 3 * * *"
    assert deployment["work_pool"]["name"]
    from flows.pipeline import pipeline

    assert pipeline.name == "pipeline"
