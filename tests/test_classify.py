"""`crossalign classify`: zero-shot labels for the images in the tables, on the tiny workspace of test_serve (real
encoders and tables) and, end to end, on the demo's Fashion-MNIST tables built as `make demo` builds them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import COLOURS, ENCODER_RUNTIME, draw_picture
from test_serve import built  # noqa: F401 (the fixture: a tiny workspace with memorised tables)
from typer.testing import CliRunner

from crossalign.align.classify import DEFAULT_TEMPLATE, labels_path
from crossalign.cli import app
from crossalign.corpus.fashion_mnist import CLASS_NAMES, DEBIAN_DIR
from crossalign.search import Searcher

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "a picture of a {} shape"
runner = CliRunner()


def _truth(built: dict, path: Path) -> dict[str, str]:  # noqa: F811
    """A captions.jsonl-style truth file: each tiny picture's colour (conftest.draw_picture); image id -> colour."""
    colours, lines = {}, []
    for name, image_id in built["ids"].items():
        colour = draw_picture(int(name[3:6]))[1]
        colours[image_id] = colour
        lines.append(json.dumps({"image": f"images/{name}", "label": colour}))
    path.write_text("\n".join(lines) + "\n")
    return colours


def test_classify_writes_each_images_best_labels_and_prints_the_counts(built: dict, tmp_path: Path) -> None:  # noqa: F811
    truth_file = built["corpus_root"] / "truth.jsonl"
    colours = _truth(built, truth_file)
    result = runner.invoke(app, ["classify", "--workspace", str(built["workspace"].root), "--labels",
                                 ",".join(COLOURS), "--template", TEMPLATE, "--truth", str(truth_file),
                                 "--device", ENCODER_RUNTIME["device"], "--precision", ENCODER_RUNTIME["precision"]])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(labels_path(built["workspace"])).to_pylist()
    assert sorted(row["image_id"] for row in rows) == sorted(built["ids"].values())
    counts = {colour: sum(row["label"] == colour for row in rows) for colour in COLOURS}
    printed = dict(re.findall(r"^(\w+)\s+(\d+)$", result.output, re.MULTILINE))
    assert {k: int(v) for k, v in printed.items()} == counts
    # Each score is the cosine of the stored image vector and the prompt's joint vector, as search embeds it.
    searcher = Searcher(built["workspace"], **ENCODER_RUNTIME)
    prompts = {colour: searcher.embed_text(TEMPLATE.format(colour)) for colour in COLOURS}
    vectors = {row["id"]: np.asarray(row["vector"]) for row in
               lancedb.connect(str(built["workspace"].lancedb_uri)).open_table("images").to_arrow().to_pylist()}
    for row in rows:
        cosines = {colour: float(vectors[row["image_id"]] @ vector) for colour, vector in prompts.items()}
        best = sorted(cosines, key=cosines.get, reverse=True)[:3]
        assert row["top_labels"] == best and row["label"] == best[0]
        assert row["top_scores"] == pytest.approx([cosines[c] for c in best], abs=1e-4)
    accuracy = sum(row["label"] == colours[row["image_id"]] for row in rows) / len(rows)
    assert f"zero-shot top-1 accuracy: {accuracy:.3f} on 12 images" in result.output
    assert accuracy >= 0.5  # 6 colours: chance is 1/6


@pytest.mark.parametrize("labels", [["--labels", ""], ["--labels", " , ,"], ["--labels-file", "EMPTY"], []])
def test_classify_refuses_an_empty_label_list(built: dict, tmp_path: Path, labels: list[str]) -> None:  # noqa: F811
    empty = tmp_path / "labels.txt"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else a for a in labels]
    result = runner.invoke(app, ["classify", "--workspace", str(built["workspace"].root), *args])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        'error: no labels given: pass --labels "dog,cat" or --labels-file with one label per line']


def test_classify_refuses_a_workspace_without_tables(tmp_path: Path) -> None:
    result = runner.invoke(app, ["classify", "--workspace", str(tmp_path / "ws"), "--labels", "dog,cat"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no tables in {(tmp_path / 'ws' / 'lancedb').resolve()}: run `crossalign run` first"]
    assert not (tmp_path / "ws").exists()  # nothing was created


def test_classify_refuses_a_template_without_a_slot(built: dict) -> None:  # noqa: F811
    result = runner.invoke(app, ["classify", "--workspace", str(built["workspace"].root), "--labels", "red",
                                 "--template", "a red shape"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "must hold {} exactly once" in result.output


def test_the_help_states_the_default_template() -> None:
    result = runner.invoke(app, ["classify", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and f"Default: '{DEFAULT_TEMPLATE}'" in result.output


def test_the_demo_classifies_with_the_fashion_mnist_class_names() -> None:
    demo = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    listed = re.search(r'classify .*--labels "([^"]+)"', demo.replace("\\\n", " "))
    assert listed and listed.group(1).split(",") == list(CLASS_NAMES)
    assert "--split dev" in demo and "--truth $(DEMO)/fashion-mnist" in demo and "crossalign serve" in demo


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed: `make system-deps` installs dataset-fashion-mnist")
def test_demo_tables_classify_fashion_mnist_dev_at_80_percent(tmp_path: Path) -> None:
    """The demo's own commands (Makefile `demo`), then `crossalign classify` on its dev images: top-1 >= 0.80."""
    exe = Path(sys.executable).with_name("crossalign")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}

    def crossalign(*args: str) -> str:
        result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=1800)
        assert result.returncode == 0, f"crossalign {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    corpus, workspace = tmp_path / "fashion-mnist", tmp_path / "workspace"
    crossalign("fashion-mnist", "--out", str(corpus), "--train", "2000", "--dev", "500")
    crossalign("run", "--corpus", str(corpus), "--workspace", str(workspace), "--steps", "600",
               "--image-encoder", "efficientnet-lite0")
    result = json.loads(crossalign("classify", "--workspace", str(workspace), "--split", "dev", "--truth", str(corpus),
                                   "--labels", ",".join(CLASS_NAMES), "--json"))
    assert result["images"] == result["compared"] == 500 and sum(result["counts"].values()) == 500
    assert result["accuracy"] >= 0.80, result
