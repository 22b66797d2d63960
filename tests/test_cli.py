"""The `crossalign` command line: help, search, evaluate and the one-line error paths."""

from __future__ import annotations

import json
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
    from crossalign.cli import DEFAULT_TEXT_ENCODER
    from crossalign.workspace import Workspace

    corpus, workspace = write_tiny_corpus(tmp_path / "corpus"), tmp_path / "ws"
    where = ["--corpus", str(corpus), "--workspace", str(workspace)]
    assert runner.invoke(app, ["ingest", *where]).exit_code == 0

    extracted = runner.invoke(app, ["extract", *where, "--image-encoder", IMAGE_ENCODER, "--device", "cpu"])
    assert extracted.exit_code == 0, extracted.output
    summaries = json.loads(extracted.stdout[extracted.stdout.index("["):])
    assert [(s["encoder"], s["encoded"]) for s in summaries] == [(IMAGE_ENCODER, 12), (DEFAULT_TEXT_ENCODER, 28)]
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
