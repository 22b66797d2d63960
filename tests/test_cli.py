"""The `crossalign` command line: help, search, evaluate and the one-line error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossalign.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command", [[], ["run"], ["evaluate"], ["search"], ["ingest"], ["extract"], ["train"], ["embed"], ["fashion-mnist"],
                ["tables"], ["tables", "list"], ["tables", "cleanup"]]
)
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.fixture(scope="module")
def cli_workspace(prefect_backend, tmp_path_factory):
    """A workspace built by `crossalign run` on a tiny real-image corpus."""
    from conftest import write_tiny_corpus

    root = tmp_path_factory.mktemp("cli")
    corpus = write_tiny_corpus(root / "corpus")
    workspace = root / "ws"
    result = runner.invoke(app, ["run", "--corpus", str(corpus), "--workspace", str(workspace), "--steps", "200",
                                 "--query", "a red circle"])
    assert result.exit_code == 0, result.output
    assert "rsum =" in result.output and "a red circle" in result.output
    return corpus, workspace, result.output


def test_run_prints_metrics_samples_and_tables(cli_workspace):
    _, workspace, output = cli_workspace
    assert "text → image" in output and "image → text" in output
    assert str(workspace / "lancedb") in output
    (line,) = [line for line in output.splitlines() if line.startswith("mapper: ")]
    assert line.startswith("mapper: trained a new mapper, mapper-") and line.endswith(": the workspace has none yet")


def test_a_run_with_other_training_options_trains_a_new_mapper_and_says_why(cli_workspace, tmp_path):
    import shutil

    from crossalign.workspace import Workspace

    corpus, workspace, _ = cli_workspace
    copy = tmp_path / "ws"
    shutil.copytree(workspace, copy)
    old = Workspace(copy).current_mapper_id()

    result = runner.invoke(app, ["run", "--corpus", str(corpus), "--workspace", str(copy), "--steps", "200",
                                 "--loss", "vsepp", "--dim", "256"])

    assert result.exit_code == 0, result.output
    new = Workspace(copy).current_mapper_id()
    assert new != old
    assert (f"mapper: trained a new mapper, {new}: the current one, {old}, was trained with dim 512 (this run: "
            "256); loss 'infonce' (this run: 'vsepp')\n") in result.output


def test_search_text_lists_images_with_scores(cli_workspace):
    corpus, workspace, _ = cli_workspace
    result = runner.invoke(app, ["search", "--workspace", str(workspace), "--text", "a blue square", "--limit", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        rank, score, path = line.split(maxsplit=2)
        # cosine less the row's query-bank normaliser (both in [-1, 1])
        assert -2.0 <= float(score) <= 2.0 and Path(path).exists()


def test_search_image_json(cli_workspace):
    corpus, workspace, _ = cli_workspace
    image = next((corpus / "images").iterdir())
    result = runner.invoke(app, ["search", "--workspace", str(workspace), "--image", str(image), "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1)) and all(h["text"] for h in hits)


def test_search_image_to_image_finds_the_image_first(cli_workspace):
    corpus, workspace, _ = cli_workspace
    image = corpus / "images" / "pic003.png"
    result = runner.invoke(app, ["search", "--workspace", str(workspace), "--image", str(image), "--in", "images",
                                 "--json", "--limit", "2"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.strip().splitlines()]
    assert Path(hits[0]["uri"]).name == "pic003.png" and hits[0]["score"] > hits[1]["score"]


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_search_text_to_text(cli_workspace, mode):
    _, workspace, _ = cli_workspace
    result = runner.invoke(app, ["search", "square drawn in yellow", "-w", str(workspace), "--in", "captions",
                                 "--mode", mode, "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.strip().splitlines()]
    assert "square drawn in yellow" in [h["text"] for h in hits[:3]] and all(h["image_id"] for h in hits)


def test_search_that_finds_nothing_exits_1(cli_workspace):
    _, workspace, _ = cli_workspace
    result = runner.invoke(app, ["search", "a dog", "-w", str(workspace), "--split", "nosuchsplit"])
    assert result.exit_code == 1
    assert "no results in images for split 'nosuchsplit'" in result.output and "Traceback" not in result.output


def test_tables_list_and_cleanup(cli_workspace, tmp_path):
    import shutil

    _, workspace, _ = cli_workspace
    copy = tmp_path / "ws"
    shutil.copytree(workspace, copy)
    listed = runner.invoke(app, ["tables", "list", "-w", str(copy), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.strip().splitlines()]
    assert {(r["table"], r["current"]) for r in rows} == {("images", True), ("captions", True)}
    assert {r["rows"] for r in rows if r["table"] == "images"} == {12}

    cleaned = runner.invoke(app, ["tables", "cleanup", "-w", str(copy)])
    assert cleaned.exit_code == 0, cleaned.output
    assert "images:" in cleaned.output and "vectors dropped of: none" in cleaned.output
    again = runner.invoke(app, ["search", "a red circle", "-w", str(copy), "--limit", "1"])
    assert again.exit_code == 0 and again.output.count("\n") == 1


def test_stage_commands_take_the_encoder_options(prefect_backend, tmp_path):
    """`ingest`, `extract`, `train`, `embed` one by one, with the fast image encoder rather than the default."""
    from conftest import IMAGE_ENCODER, write_tiny_corpus

    from crossalign.align import load_mapper
    from crossalign.config import ExtractConfig
    from crossalign.workspace import Workspace

    corpus, workspace = write_tiny_corpus(tmp_path / "corpus"), tmp_path / "ws"
    where = ["--corpus", str(corpus), "--workspace", str(workspace)]
    assert runner.invoke(app, ["ingest", *where]).exit_code == 0

    extracted = runner.invoke(app, ["extract", *where, "--image-encoder", IMAGE_ENCODER, "--device", "cpu"])
    assert extracted.exit_code == 0, extracted.output
    summaries = json.loads(extracted.stdout[extracted.stdout.index("["):])
    default_text = ExtractConfig().text_encoder
    assert [(s["encoder"], s["encoded"]) for s in summaries] == [(IMAGE_ENCODER, 12), (default_text, 28)]
    trained = runner.invoke(app, ["train", *where, "--image-encoder", IMAGE_ENCODER, "--steps", "40"])
    assert trained.exit_code == 0, trained.output
    _, mapper = load_mapper(Workspace(workspace).require_current_mapper())
    assert mapper["image_encoder"]["encoder"] == IMAGE_ENCODER
    embedded = runner.invoke(app, ["embed", *where])
    assert embedded.exit_code == 0, embedded.output
    assert json.loads(embedded.stdout[embedded.stdout.index("{"):])["images_in_table"] == 12


def test_evaluate_json(cli_workspace):
    corpus, workspace, _ = cli_workspace
    result = runner.invoke(app, ["evaluate", "--workspace", str(workspace), "--corpus", str(corpus),
                                 "--split", "dev", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])  # logs go to stderr
    six = [metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert metrics["rsum"] == pytest.approx(sum(six), abs=0.05)
    assert metrics["split"] == "dev" and metrics["t2i_medr"] >= 1
    # what search ranks by (normalised by default), and the raw cosine metrics beside them
    assert metrics["normalisation"] == "inverted_softmax"
    raw_six = [metrics[f"{d}_r{k}_raw"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert metrics["rsum_raw"] == pytest.approx(sum(raw_six), abs=0.05) and "t2i_medr_raw" in metrics
    raw = runner.invoke(app, ["evaluate", "--workspace", str(workspace), "--corpus", str(corpus), "--split", "dev",
                              "--json", "--normalise", "none"])
    raw_metrics = json.loads(raw.stdout.strip().splitlines()[-1])
    assert raw_metrics["normalisation"] == "none"
    assert raw_metrics["rsum"] == raw_metrics["rsum_raw"] == metrics["rsum_raw"]


def test_tables_built_before_normalisers_search_raw_with_a_one_line_notice(cli_workspace, tmp_path):
    import shutil

    import lancedb

    from crossalign.store.schema import NORMALISER_COLUMN

    _, workspace, _ = cli_workspace
    old = tmp_path / "ws"
    shutil.copytree(workspace, old)
    db = lancedb.connect(str(old / "lancedb"))
    for name in ("images", "captions"):  # as tables written before the column existed
        db.open_table(name).drop_columns([NORMALISER_COLUMN])

    result = runner.invoke(app, ["search", "--workspace", str(old), "--text", "a blue square", "--json"])

    assert result.exit_code == 0, result.output
    notices = result.stderr.strip().splitlines()
    assert len(notices) == 1 and notices[0].startswith("notice: ") and "raw cosine" in notices[0]
    hits = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert hits and all("cosine" not in h and -1.0 <= h["score"] <= 1.0 for h in hits)


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--workspace", "{empty}", "--text", "a dog"], "no images table in"),
        (["search", "--workspace", "{ws}"], "give exactly one query"),
        (["search", "a dog", "--workspace", "{ws}", "--text", "a cat"], "give the text query once"),
        (["search", "a dog", "--workspace", "{ws}", "--in", "people"], "unknown table 'people' for --in"),
        (["search", "--workspace", "{ws}", "--image", "{notimage}", "--mode", "fts"], "--mode fts searches caption"),
        (["search", "a dog", "--workspace", "{ws}", "--mode", "hybrid"], "use it with a text query and --in captions"),
        (["search", "a dog", "--workspace", "{ws}", "--in", "captions", "--mode", "fuzzy"], "unknown search mode"),
        (["search", "a dog", "-w", "{ws}", "--mapper", "mapper-nope"], "holds no vectors of mapper mapper-nope"),
        (["search", "a dog", "-w", "{ws}", "--normalise", "softmax"], "unknown normalisation 'softmax'"),
        (["tables", "list", "--workspace", "{empty}"], "no tables in"),
        (["tables", "cleanup", "--workspace", "{empty}"], "no tables in"),
        (["search", "--workspace", "{ws}", "--image", "{missing}"], "does not exist"),
        (["search", "--workspace", "{ws}", "--image", "{notimage}"], "cannot be read as an image"),
        (["run", "--corpus", "{missing}", "--workspace", "{empty}"], "does not exist"),
        (["evaluate", "--corpus", "{corpus}", "--workspace", "{empty}"], "no trained mapper"),
        (["run", "--corpus", "{corpus}", "--workspace", "{empty}", "--image-encoder", "torchvision:nope@random"],
         "unknown torchvision model"),
        (["run", "--corpus", "{corpus}", "--workspace", "{empty}", "--text-encoder", "hf:no-org/no-model"],
         "never downloads"),
        (["run", "--corpus", "{corpus}", "--workspace", "{empty}", "--precision", "fp8"],
         "invalid precision: Input should be 'auto'"),
        (["extract", "--corpus", "{corpus}", "--workspace", "{empty}", "--decode", "fibres"],
         "invalid decode: Input should be 'auto', 'threads', 'processes', 'nvjpeg' or 'nvimgcodec'"),
        (["extract", "--corpus", "{missing}", "--workspace", "{empty}"], "does not exist"),
        (["extract", "--corpus", "{corpus}", "--workspace", "{empty}"], "is not ingested into workspace"),
        (["run", "--corpus", "{corpus}", "--workspace", "{empty}", "--text-encoder", "efficientnet-lite0"],
         "'efficientnet-lite0' is an image encoder, not a text encoder: use one of minilm-l6, mpnet-base"),
        (["train", "--corpus", "{corpus}", "--workspace", "{empty}"], "no efficientnet-lite0 features for corpus"),
        (["embed", "--corpus", "{corpus}", "--workspace", "{empty}"], "has no trained mapper yet"),
    ],
)
def test_user_errors_are_one_line(cli_workspace, tmp_path, args, message):
    corpus, workspace, _ = cli_workspace
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    values = {"empty": tmp_path / "empty", "ws": workspace, "missing": tmp_path / "missing.jpg",
              "notimage": not_image, "corpus": corpus}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_extract_with_an_encoder_of_the_wrong_modality_fails_before_any_task_runs(cli_workspace):
    from prefect import get_client

    corpus, workspace, _ = cli_workspace
    features = sorted(path.name for path in (workspace / "features" / "corpus").iterdir())
    with get_client(sync_client=True) as client:
        runs_before = client.count_flow_runs()

    result = runner.invoke(app, ["extract", "--corpus", str(corpus), "--workspace", str(workspace),
                                 "--image-encoder", "minilm-l6", "--device", "cpu"])

    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "error: 'minilm-l6' is a text encoder, not an image encoder: use one of efficientnet-lite0, "
        "efficientnet-lite2, torchvision:<model>, <image encoder>+flip, <encoder>,<encoder> (one modality)"]
    with get_client(sync_client=True) as client:
        assert client.count_flow_runs() == runs_before  # no flow run started, so no task ran
    assert sorted(path.name for path in (workspace / "features" / "corpus").iterdir()) == features


def test_extract_over_features_of_another_encoder_setup_fails_before_any_task_runs(cli_workspace, tmp_path):
    """Every shard would refuse them (FeatureMismatchError): the pre-flight refuses them first, in one line."""
    import shutil

    from prefect import get_client

    from crossalign.extract import FeatureManifest

    corpus, workspace, _ = cli_workspace
    shutil.copytree(workspace, tmp_path / "ws")
    manifest_path = min((tmp_path / "ws" / "features" / "corpus").glob("*/_manifest.json"))
    manifest = FeatureManifest.load(manifest_path.parent)
    manifest.encoder["weights_digest"] = "0123456789abcdef"
    manifest.shards.pop()  # work for a run to do
    manifest.save(manifest_path.parent)
    with get_client(sync_client=True) as client:
        runs_before = client.count_flow_runs()

    result = runner.invoke(app, ["extract", "--corpus", str(corpus), "--workspace", str(tmp_path / "ws")])

    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: {manifest_path.parent} holds features of a different encoder setup (differs in: weights_digest); "
        "use another workspace or remove that directory to re-extract"]
    with get_client(sync_client=True) as client:
        assert client.count_flow_runs() == runs_before
    assert FeatureManifest.load(manifest_path.parent) == manifest


def test_a_user_error_inside_a_run_is_one_line_and_its_traceback_stays_in_the_run_logs(prefect_backend, tmp_path):
    """A corpus file the ingest task refuses (no caption column): the console shows the CLI's one line, and
    Prefect's records of the failure, tracebacks included, are in the run's logs (the UI), not on the console."""
    from conftest import IMAGE_ENCODER, TEXT_ENCODER, write_picture
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStateType, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    corpus = tmp_path / "corpus"
    record = write_picture(corpus, 0, "train")
    (corpus / "captions.csv").write_text(f"image,text\n{record['image']},{record['captions'][0]}\n")
    command = [sys.executable, "-m", "crossalign.cli", "run", "--corpus", str(corpus), "--workspace",
               str(tmp_path / "ws"), "--image-encoder", IMAGE_ENCODER, "--text-encoder", TEXT_ENCODER,
               "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's backend
    env.pop("PREFECT_LOGGING_LEVEL", None)
    run = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                         timeout=300)

    message = f"{corpus / 'captions.csv'}: no column 'caption' (columns: image, text)"
    console = run.stdout + run.stderr
    assert run.returncode == 2, console[-3000:]
    assert [line for line in console.splitlines() if "no column 'caption'" in line] == [
        f"error: {message}; set image_column / caption_column"], console[-3000:]
    assert "Traceback" not in console and "| ERROR" not in console and "Failed" not in console, console[-3000:]
    assert "Beginning flow run" in console  # Prefect's progress lines stay
    with get_client(sync_client=True) as client:
        failed = client.read_flow_runs(flow_run_filter=FlowRunFilter(state={"type": FlowRunFilterStateType(
            any_=["FAILED"])}))
        (flow_run,) = [r for r in failed if r.parameters["config"].get("workspace") == str(tmp_path / "ws")]
        logs = [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))]
    assert flow_run.state_type.value == "FAILED" and message in flow_run.state.message
    assert any("Traceback" in log and "CorpusConfigError" in log and message in log for log in logs), logs


def test_debug_shows_the_traceback_before_the_one_line(tmp_path):
    result = runner.invoke(app, ["--debug", "run", "--corpus", str(tmp_path / "missing"), "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert "Traceback" in result.output and result.output.splitlines()[-1] == (
        f"error: corpus folder {tmp_path / 'missing'} does not exist")
    quiet = runner.invoke(app, ["run", "--corpus", str(tmp_path / "missing"), "-w", str(tmp_path)])
    assert quiet.exit_code == 2 and quiet.output.splitlines() == [
        f"error: corpus folder {tmp_path / 'missing'} does not exist"]


def test_the_console_filter_drops_a_runs_failure_records_only_while_quiet():
    import logging

    from flows.console import RunFailureFilter

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    progress = record("prefect.task_runs", logging.INFO, "Finished in state Completed()")
    failures = [record("prefect.task_runs", logging.ERROR, "Task run failed with exception: ValueError('x')"),
                record("prefect.flow_runs", logging.INFO, "Finished in state Failed('Flow run encountered ...')")]
    other = record("crossalign.extract.encoding", logging.ERROR, "not a run's record")
    run_filter = RunFailureFilter()
    assert [run_filter.filter(r) for r in (progress, *failures, other)] == [True, False, False, True]
    run_filter.quiet = False  # --debug
    assert all(run_filter.filter(r) for r in (progress, *failures, other))


def test_dask_resources_are_read_as_name_equals_number(tmp_path):
    from crossalign.cli_common import dask_resources

    assert dask_resources("GPU=1, MEM=2.5") == {"GPU": 1.0, "MEM": 2.5} and dask_resources("") == {}
    result = runner.invoke(app, ["extract", "--corpus", str(tmp_path), "-w", str(tmp_path / "ws"), "--runner", "dask",
                                 "--dask-resources", "GPU"])
    assert result.exit_code == 2 and result.output.splitlines() == [
        "error: --dask-resources: 'GPU' is not NAME=NUMBER (e.g. GPU=1)"]
