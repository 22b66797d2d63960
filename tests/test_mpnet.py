"""all-mpnet-base-v2 from its PyPI packages: assembled once, checked by hash before every load, equal to
the folder loaded directly with transformers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_corpus

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus
from crossalign.encoders import TextEncoder, WeightsUnavailableError, load_encoder, mpnet, resolve_runtime
from crossalign.encoders.base import file_sha256
from crossalign.workspace import Workspace

SENTENCES = ["a dog runs on the beach", "two children play football in a park", "a bowl of hot soup on a table",
             "a man rides a bicycle down a steep mountain road at sunset"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return mpnet.model_dir()


def test_the_registry_loads_mpnet_base_768_mean_pooled(model_dir: Path) -> None:
    encoder = load_encoder("mpnet-base", "cpu", "fp32")
    assert isinstance(encoder, TextEncoder) and encoder.dim == 768
    described = encoder.describe()
    assert described["encoder"] == "mpnet-base" and described["preprocessing"]["pooling"] == "mean"
    assert described["weights_digest"] == mpnet.EXPECTED_SHA256["model.safetensors"][:16]


def test_features_equal_the_folder_loaded_with_transformers(model_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    ours = load_encoder("mpnet-base", "cpu", "fp32").encode(SENTENCES)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        tokens = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        theirs = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # and the features mean something: each sentence is nearest to itself among the others' paraphrases
    similar = F.cosine_similarity(ours[0], load_encoder("mpnet-base", "cpu", "fp32").encode(
        ["a dog running along the sand by the sea"])[0], dim=0)
    assert similar > F.cosine_similarity(ours[0], ours[2], dim=0)


def test_every_file_matches_its_vetted_hash(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(mpnet.EXPECTED_SHA256)
    for name, expected in mpnet.EXPECTED_SHA256.items():
        assert file_sha256(model_dir / name) == expected


def test_assembles_from_the_installed_packages_into_an_empty_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSALIGN_CACHE", str(tmp_path / "cache"))

    directory = mpnet.model_dir()

    assert directory == tmp_path / "cache" / "all-mpnet-base-v2"
    assert sorted(p.name for p in directory.iterdir()) == sorted(mpnet.EXPECTED_SHA256)
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".all-mpnet-base-v2-")]  # no scratch left
    assert mpnet.model_dir() == directory  # the second call finds it assembled


def corrupted_cache(source: Path, cache: Path) -> Path:
    """A cache holding a copy of the model whose weights differ in one byte."""
    target = cache / "all-mpnet-base-v2"
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return weights


def test_a_corrupted_copy_is_refused_naming_both_hashes(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    weights = corrupted_cache(model_dir, tmp_path / "cache")
    monkeypatch.setenv("CROSSALIGN_CACHE", str(tmp_path / "cache"))

    with pytest.raises(mpnet.WeightsIntegrityError) as err:
        mpnet.load_mpnet_base(resolve_runtime("cpu", "fp32"))

    message = str(err.value)
    assert file_sha256(weights) in message and mpnet.EXPECTED_SHA256["model.safetensors"] in message
    assert "\n" not in message


def test_the_cli_refuses_a_corrupted_copy_in_one_line_with_exit_2(model_dir: Path, tmp_path: Path) -> None:
    corrupted_cache(model_dir, tmp_path / "cache")
    corpus = write_tiny_corpus(tmp_path / "corpus")
    env = {**os.environ, "CROSSALIGN_CACHE": str(tmp_path / "cache"), "PREFECT_HOME": str(tmp_path / "prefect")}
    exe = Path(sys.executable).with_name("crossalign")
    # extract's pre-flight wants an ingested corpus
    ingest_corpus(CorpusConfig(root=corpus, name="corpus"), Workspace(tmp_path / "ws"))

    result = subprocess.run([str(exe), "extract", "--corpus", str(corpus), "--workspace", str(tmp_path / "ws"),
                             "--text-encoder", "mpnet-base"], capture_output=True, text=True, env=env, timeout=600)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mpnet-base:") and "SHA-256" in lines[0]
    assert mpnet.EXPECTED_SHA256["model.safetensors"] in lines[0]
    assert not (tmp_path / "ws" / "features").exists()  # refused before any work


def test_missing_packages_are_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSALIGN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(mpnet, "PARTS", ("no-such-package-part-001",))

    with pytest.raises(WeightsUnavailableError, match="requirements/mpnet-base.txt"):
        mpnet.model_dir()
