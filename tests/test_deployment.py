"""The deployments: `deployments/prefect.yaml` deployed to a real `prefect server` and run by a real process worker
(a scheduled incremental run, end to end), and `deployments/serve.py`'s deployments built without serving.

Everything Prefect runs here runs in subprocesses talking to the module's own server, because the session's other
tests hold an in-process `prefect_test_harness`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from conftest import IMAGE_ENCODER, write_picture, write_records, write_tiny_corpus
from prefect_server import running_server, start_logged, stop, tail

from crossalign.search import Searcher
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE, connect
from crossalign.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL = "crossalign"
DEPLOYMENT = "pipeline/pipeline"
DEPLOY = ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]
CLI_TIMEOUT_S = 300  # `prefect deploy` imports the flow, hence torch: slow on a loaded machine
RUN_TIMEOUT_S = 600
LOGS_TIMEOUT_S = 60
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NEW_PICTURES = (12, 13)  # the tiny corpus has pictures 0-11; these are new and distinct
# The deployment's default config extracts with efficientnet-lite2+flip and trains 1500 steps, too slow for a test:
# each run overrides these sections (a run parameter replaces the whole `config`, so it repeats corpus and workspace).
RUN_OVERRIDES = {"extract": {"image_encoder": IMAGE_ENCODER, "device": "cpu", "precision": "fp32"},
                 "train": {"steps": 100}}


def _prefect(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run the `prefect` CLI from the repository root (`check`: fail the test on a non-zero exit)."""
    run = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=CLI_TIMEOUT_S)
    if check:
        assert run.returncode == 0, f"prefect {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The tiny corpus, `prefect.yaml` deployed to a real server, and a process worker polling the pool.

    The worker runs in a directory outside the repository and without CROSSALIGN_REPO: the deployment alone must
    say where the flow's code is. Yields the environment, the API URL, paths, the deployment as registered (before
    its schedule is paused, so that a 03:00 UTC run cannot land in the middle of the test) and the worker's log.
    """
    root = tmp_path_factory.mktemp("deployment")
    corpus, workspace = write_tiny_corpus(root / "corpus"), root / "ws"
    with running_server(tmp_path_factory.mktemp("prefect-home")) as server:
        env = {**server["env"], "CROSSALIGN_CORPUS": str(corpus), "CROSSALIGN_WORKSPACE": str(workspace)}
        env.pop("CROSSALIGN_REPO", None)
        api = server["api"]
        _prefect(["work-pool", "create", POOL, "--type", "process"], env)
        _prefect(DEPLOY, env)
        deployment = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}").raise_for_status().json()
        for schedule in deployment["schedules"]:
            httpx.patch(f"{api}/deployments/{deployment['id']}/schedules/{schedule['id']}",
                        json={"active": False}).raise_for_status()
        worker_log = root / "worker.log"
        worker = start_logged([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                              {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, worker_log, cwd=root)
        try:
            yield {"env": env, "api": api, "corpus": corpus, "workspace": workspace, "deployment": deployment,
                   "worker": worker, "worker_log": worker_log}
        finally:
            stop(worker)


def _flow_run_logs(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    """The logs of a flow run and its tasks (not those of its subflows), oldest first."""
    return httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                  "sort": "TIMESTAMP_ASC", "limit": 200}).raise_for_status().json()


def _flow_finished(logs: list[dict[str, Any]]) -> bool:
    """Whether the flow's own last message ("Finished in state ...", after those of its tasks) is among `logs`."""
    return any(log["task_run_id"] is None and log["message"].startswith("Finished in state") for log in logs)


def _trigger(deployed: dict[str, Any], name: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Trigger `pipeline/pipeline` with the CLI (its own corpus and workspace, plus `overrides`) and wait for it.

    Returns the flow run, once in a terminal state (or the worker gone, or time up), and its logs.
    """
    api, worker = deployed["api"], deployed["worker"]
    config = deployed["deployment"]["parameters"]["config"] | overrides
    out = _prefect(["deployment", "run", DEPLOYMENT, "--params", json.dumps({"config": config}),
                    "--flow-run-name", name], deployed["env"]).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}").raise_for_status().json()
        if flow_run["state_type"] in TERMINAL or worker.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(2)
    logs, logs_deadline = _flow_run_logs(api, flow_run_id), time.monotonic() + LOGS_TIMEOUT_S
    while flow_run["state_type"] in ("COMPLETED", "FAILED") and not _flow_finished(logs):
        # Logs reach the API in batches, after the state: the flow's last message says that all have arrived.
        assert time.monotonic() < logs_deadline, f"the last logs of {name} never arrived:\n" + "\n".join(
            log["message"] for log in logs[-20:])
        time.sleep(1)
        logs = _flow_run_logs(api, flow_run_id)
    return flow_run, logs


def _run_deployment(deployed: dict[str, Any], name: str) -> dict[str, Any]:
    """Trigger `pipeline/pipeline` with RUN_OVERRIDES (see `_trigger`) and wait for it to complete.

    Returns the finished flow run, its `extract-throughput` table rows and its log messages.
    """
    api, worker = deployed["api"], deployed["worker"]
    flow_run, logs = _trigger(deployed, name, RUN_OVERRIDES)
    flow_run_id = flow_run["id"]
    assert flow_run["state_type"] == "COMPLETED", (
        f"flow run {name} is {flow_run['state_type']} ({flow_run['state']['message']}) after "
        f"{flow_run['total_run_time']:.0f} s; worker exit code {worker.poll()}. Worker log:\n"
        f"{tail(deployed['worker_log'], 80)}\nFlow run log:\n" + "\n".join(log["message"] for log in logs[-40:]))
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {
        "flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["extract-throughput"]}}}).raise_for_status().json()
    assert len(artifacts) == 1, artifacts
    rows = json.loads(artifacts[0]["data"])  # a table artifact keeps its rows as a JSON string
    return {"flow_run": flow_run, "throughput": {row["modality"]: row for row in rows},
            "logs": [log["message"] for log in logs]}


def _table_rows(workspace: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The rows of the LanceDB `images` and `captions` tables by id (without vectors)."""
    db = connect(Workspace(workspace))
    return {table: {row["id"]: row for row in db.open_table(table).to_arrow().drop_columns(["vector"]).to_pylist()}
            for table in (IMAGES_TABLE, CAPTIONS_TABLE)}


@pytest.fixture(scope="module")
def incremental(deployed: dict[str, Any]) -> dict[str, Any]:
    """Run the deployment on the tiny corpus, add NEW_PICTURES with their captions, run it again.

    Returns both runs, the tables' rows after each, and the new pictures' captions records.
    """
    first = _run_deployment(deployed, "first")
    tables_before = _table_rows(deployed["workspace"])
    records = [write_picture(deployed["corpus"], index, "train") for index in NEW_PICTURES]
    write_records(deployed["corpus"], records, mode="a")
    second = _run_deployment(deployed, "incremental")
    return {"first": first, "second": second, "before": tables_before, "after": _table_rows(deployed["workspace"]),
            "records": records}


def test_deploy_registers_the_daily_pipeline_on_the_process_pool(deployed: dict[str, Any]) -> None:
    deployment, api = deployed["deployment"], deployed["api"]
    assert httpx.get(f"{api}/flows/{deployment['flow_id']}").json()["name"] == "pipeline"
    assert deployment["name"] == "pipeline" and deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["work_pool_name"] == POOL
    assert httpx.get(f"{api}/work_pools/{POOL}").json()["type"] == "process"
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in deployment["schedules"]] == [
        ("0 3 * * *", "UTC", True)]
    # `{{ $VAR }}` in parameters is filled in at deploy time; the pull step's directory is the repository itself.
    assert deployment["parameters"] == {"config": {"workspace": str(deployed["workspace"]),
                                                   "corpus": {"root": str(deployed["corpus"])}}}
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]


def test_deploy_refuses_to_register_without_a_corpus(deployed: dict[str, Any]) -> None:
    env = {key: value for key, value in deployed["env"].items() if key != "CROSSALIGN_CORPUS"}
    run = _prefect(DEPLOY, env, check=False)
    assert run.returncode != 0, run.stdout[-3000:]
    assert "set CROSSALIGN_CORPUS and CROSSALIGN_WORKSPACE to absolute paths" in run.stdout + run.stderr, run.stdout
    deployment = httpx.get(f"{deployed['api']}/deployments/name/{DEPLOYMENT}").json()
    assert deployment["parameters"] == deployed["deployment"]["parameters"]  # as registered before


def test_incremental_run_extracts_only_the_new_items(incremental: dict[str, Any]) -> None:
    first, second = incremental["first"]["throughput"], incremental["second"]["throughput"]
    captions_before = len(incremental["before"][CAPTIONS_TABLE])
    new_captions = sum(len(record["captions"]) for record in incremental["records"])
    assert (first["image"]["encoder"], first["image"]["encoded"], first["text"]["encoded"]) == (
        IMAGE_ENCODER, 12, captions_before)
    assert (second["image"]["encoder"], second["image"]["encoded"], second["text"]["encoded"]) == (
        IMAGE_ENCODER, len(NEW_PICTURES), new_captions)
    assert second["image"]["failed"] == second["text"]["failed"] == 0


def test_incremental_run_embeds_only_the_new_items(incremental: dict[str, Any]) -> None:
    before, after = incremental["before"], incremental["after"]
    new_images = {i: row for i, row in after[IMAGES_TABLE].items() if i not in before[IMAGES_TABLE]}
    assert sorted(Path(row["uri"]).name for row in new_images.values()) == [
        Path(record["image"]).name for record in incremental["records"]]
    assert set(before[IMAGES_TABLE]) < set(after[IMAGES_TABLE])
    new_captions = {i: row for i, row in after[CAPTIONS_TABLE].items() if i not in before[CAPTIONS_TABLE]}
    assert sorted(row["text"] for row in new_captions.values()) == sorted(
        caption for record in incremental["records"] for caption in record["captions"])
    assert {row["image_id"] for row in new_captions.values()} == set(new_images)
    assert set(before[CAPTIONS_TABLE]) < set(after[CAPTIONS_TABLE])
    # The library's own record of the embed, in the run's logs: only the new rows written, with the same mapper.
    written = [m for m in incremental["second"]["logs"] if m.startswith("embedded ")]
    assert len(written) == 1 and (f": {len(new_images)} images, {len(new_captions)} captions written, "
                                  "0 rows removed") in written[0] and "rebuilt" not in written[0], written


def test_tables_answer_queries_about_the_new_pictures(deployed: dict[str, Any], incremental: dict[str, Any]) -> None:
    searcher = Searcher(deployed["workspace"], device="cpu", precision="fp32")
    new_ids = {Path(row["uri"]).name: i for i, row in incremental["after"][IMAGES_TABLE].items()
               if i not in incremental["before"][IMAGES_TABLE]}
    for record in incremental["records"]:
        image_id, caption = new_ids[Path(record["image"]).name], record["captions"][0]
        found = searcher.image_to_image(deployed["corpus"] / record["image"], limit=3)
        assert found[0].id == image_id and found[0].score > 0.99, [h.to_dict() for h in found]
        found = searcher.text_to_text(caption, limit=1)
        assert (found[0].text, found[0].image_id) == (caption, image_id), [h.to_dict() for h in found]
    # Only the new pictures have a black background (conftest's draw_picture): the refreshed full-text index finds
    # exactly their "... on a black background" captions.
    found = searcher.text_to_text("black", limit=10, mode="fts")
    expected = [(new_ids[Path(record["image"]).name], record["captions"][0]) for record in incremental["records"]]
    assert sorted((h.image_id, h.text) for h in found) == sorted(expected), [h.to_dict() for h in found]


def test_a_run_with_an_encoder_of_the_wrong_modality_fails_before_extraction(deployed: dict[str, Any]) -> None:
    """The check the CLI makes before a run, made by the run itself: a run from the UI or a schedule fails the
    same way, before any work, with the CLI's message in its logs."""
    overrides = {**RUN_OVERRIDES, "extract": {**RUN_OVERRIDES["extract"], "image_encoder": "minilm-l6"}}
    flow_run, logs = _trigger(deployed, "wrong-modality", overrides)

    message = "'minilm-l6' is a text encoder, not an image encoder: use one of efficientnet-lite0"
    assert flow_run["state_type"] == "FAILED" and message in flow_run["state"]["message"], flow_run["state"]
    assert any(message in log["message"] and log["task_run_id"] is not None for log in logs), logs  # check-config's
    task_runs = httpx.post(f"{deployed['api']}/task_runs/filter", json={"flow_runs": {"id": {"any_": [
        flow_run["id"]]}}}).raise_for_status().json()
    assert [(run["name"].rsplit("-", 1)[0], run["state_type"]) for run in task_runs] == [("check-config", "FAILED")]
    subflows = httpx.post(f"{deployed['api']}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {
        "any_": [flow_run["id"]]}}}).raise_for_status().json()
    assert subflows == []  # no extraction started


def _load_serve() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crossalign_serve", REPO / "deployments" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_builds_the_same_scheduled_pipeline_and_the_stages(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the paths are made absolute, the entrypoints need no working directory
    serve = _load_serve()
    deployments = serve.build_deployments("corpus", "ws")
    parameters = {"config": {"workspace": str(tmp_path / "ws"), "corpus": {"root": str(tmp_path / "corpus")}}}
    assert [(d.flow_name, d.name, d.entrypoint) for d in deployments] == [
        ("pipeline", "pipeline", "flows.pipeline.pipeline"), ("ingest", "ingest", "flows.ingest.ingest_flow"),
        ("extract", "extract", "flows.extract.extract_flow"), ("train", "train", "flows.train.train_flow"),
        ("embed", "embed", "flows.embed.embed_flow")]
    assert all(d.parameters == parameters and d.work_pool_name is None for d in deployments)
    pipeline, stages = deployments[0], deployments[1:]
    # The same schedule as prefect.yaml's `pipeline` deployment, and the same parameters (paths templated there).
    spec = next(d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"] if d["name"] == "pipeline")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == [
        (spec["schedules"][0]["cron"], spec["schedules"][0]["timezone"], True)]
    assert spec["parameters"] == {"config": {"workspace": "{{ $CROSSALIGN_WORKSPACE }}",
                                             "corpus": {"root": "{{ $CROSSALIGN_CORPUS }}"}}}
    assert all(not d.schedules for d in stages)
    assert [d.name for d in serve.build_deployments("corpus", "ws", stages=False)] == ["pipeline"]

