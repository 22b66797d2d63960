"""Extraction at a size where the plan, the ledger and resume matter: 100,000 synthetic items (the cheap encoders
and corpus writer of `benchmarks/synthetic.py`), killed mid-run and resumed through the `extract` flow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossalign.config import CorpusConfig, ExtractConfig, PipelineConfig
from crossalign.extract import FeatureManifest, extract_image_features, extract_text_features, read_features
from crossalign.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts, not an installed package
from benchmarks.synthetic import (  # noqa: E402
    register_synthetic_encoders,
    unregister_synthetic_encoders,
    write_synthetic_corpus,
)

ITEMS = 100_000  # captions; 20,000 images
CORPUS = "synthetic"

EXTRACT_IN_A_PROCESS = """
import sys
sys.path.insert(0, sys.argv[2])
from benchmarks.synthetic import register_synthetic_encoders
from crossalign.config import PipelineConfig
from flows.extract import extract_flow

if __name__ == "__main__":
    register_synthetic_encoders()
    extract_flow(PipelineConfig.model_validate_json(open(sys.argv[1]).read()))
"""


@pytest.fixture
def synthetic_encoders():
    """The synthetic encoders, registered for one test: the registry is the same for the tests after it."""
    yield register_synthetic_encoders()
    unregister_synthetic_encoders()


def _config(workspace: Path, image: str, text: str) -> PipelineConfig:
    return PipelineConfig(workspace=workspace, corpus=CorpusConfig(root=workspace, name=CORPUS),
                          extract=ExtractConfig(image_encoder=image, text_encoder=text, device="cpu",
                                                precision="fp32", compile="off", num_workers=1))


def _features(workspace: Path, encoder: str) -> tuple[list[str], np.ndarray]:
    return read_features(Workspace(workspace).features_dir(CORPUS, encoder))


def test_a_killed_100k_item_extraction_resumes_to_the_same_features_without_duplicates(prefect_backend, tmp_path,
                                                                                      synthetic_encoders):
    from prefect.settings import PREFECT_API_URL

    from flows.extract import extract_flow

    image, text = synthetic_encoders
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for root in (killed, clean):
        write_synthetic_corpus(Workspace(root), CORPUS, ITEMS)
    config = _config(killed, image, text)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "extract.py").write_text(EXTRACT_IN_A_PROCESS)
    text_dir = Workspace(killed).features_dir(CORPUS, text)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen([sys.executable, str(tmp_path / "extract.py"), str(tmp_path / "config.json"),
                                str(REPO)], env=env, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:  # images first (5 shards), then captions (25)
        if (text_dir / "_manifest.json").exists() and len(FeatureManifest.load(text_dir).shards) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    recorded = len(FeatureManifest.load(text_dir).shards)
    assert 3 <= recorded < 25, "the run was not killed in the middle (100,000 captions make 25 shards)"

    summaries = extract_flow(config)  # the resumed run
    runtime = ExtractConfig(image_encoder=image, text_encoder=text, device="cpu", precision="fp32", compile="off")
    extract_image_features(Workspace(clean), CORPUS, runtime)  # an uninterrupted run, for reference
    extract_text_features(Workspace(clean), CORPUS, runtime)

    (_, resumed_text) = summaries
    assert resumed_text["already_done"] >= 4096 * recorded and resumed_text["encoded"] == ITEMS - resumed_text[
        "already_done"] and resumed_text["failed"] == 0
    for encoder, count in ((image, ITEMS // 5), (text, ITEMS)):
        ids, vectors = _features(killed, encoder)
        assert len(ids) == len(set(ids)) == count  # every item once: nothing lost, nothing twice
        clean_ids, _ = _features(clean, encoder)
        assert set(ids) == set(clean_ids)
        _, reference = read_features(Workspace(clean).features_dir(CORPUS, encoder), ids)
        assert np.array_equal(vectors, reference)
    assert FeatureManifest.load(text_dir).failed == {}


@pytest.mark.parametrize("max_tasks", [4])
def test_a_large_corpus_gets_at_most_max_tasks_tasks(tmp_path, max_tasks, synthetic_encoders):
    from crossalign.extract import plan_shards

    _, text = synthetic_encoders
    write_synthetic_corpus(Workspace(tmp_path), CORPUS, ITEMS)
    plan = plan_shards(Workspace(tmp_path), CORPUS, "text", text, shard_size=1000, max_tasks=max_tasks)
    assert len(plan.units) == max_tasks and sum(unit["pending"] for unit in plan.units) == ITEMS
    assert {unit["pending"] for unit in plan.units} == {25_000}  # 100 shards of 1,000 in 4 tasks of 25 shards
