"""The `crossalign` command line: help, search, evaluate and the one-line error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossalign.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command", [[], ["run"], ["evaluate"], ["search"], ["ingest"], ["extract"], ["train"], ["embed"], ["fashion-mnist"]]
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
        assert -1.0 <= float(score) <= 1.0 and Path(path).exists()


def test_search_image_json(cli_workspace):
    corpus, workspace, _ = cli_workspace
    image = next((corpus / "images").iterdir())
    result = runner.invoke(app, ["search", "--workspace", str(workspace), "--image", str(image), "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1)) and all(h["text"] for h in hits)


def test_evaluate_json(cli_workspace):
    corpus, workspace, _ = cli_workspace
    result = runner.invoke(app, ["evaluate", "--workspace", str(workspace), "--corpus", str(corpus),
                                 "--split", "dev", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    six = [metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert metrics["rsum"] == pytest.approx(sum(six), abs=0.05)
    assert metrics["split"] == "dev" and metrics["t2i_medr"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--workspace", "{empty}", "--text", "a dog"], "no captions or images table"),
        (["search", "--workspace", "{ws}"], "exactly one of --text or --image"),
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
