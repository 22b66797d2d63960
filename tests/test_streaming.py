"""Streaming training and blockwise evaluation: the split's cache files, read by row, give the mapper and the
metrics that the whole split in memory gives, and no pass holds more than its chunk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_ENCODER, TEXT_ENCODER, ingest_and_extract, write_tiny_corpus

import crossalign.align.rows as rows_module
import crossalign.align.split_cache as split_cache
from crossalign.align import fit_mapper
from crossalign.align.data import CachedSplit, PairedFeatures, load_paired_features, open_split
from crossalign.align.evaluation import evaluate_normalised, joint_vectors
from crossalign.align.fit import build_querybank
from crossalign.align.metrics import normalised_metrics, retrieval_metrics, retrieval_ranks
from crossalign.align.querybank import GalleryNorm, QueryBank
from crossalign.align.rows import MemoryRows, RowFile, RowWriter, column_statistics
from crossalign.align.train import OneCaptionPerImageSampler, train_mapper
from crossalign.config import QueryBankConfig, TrainConfig
from crossalign.corpus import read_captions, read_images
from crossalign.extract import FeatureManifest
from crossalign.extract.features import FeatureSet
from crossalign.workspace import Workspace

TRAIN_OPTIONS = {"dim": 64, "steps": 120, "batch_size": 8, "eval_every": 40, "warmup_steps": 10,
                 "input_dropout": 0.0, "seed": 3}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str]:
    """The tiny corpus of tests/test_align.py, ingested and extracted once for this module (read only)."""
    root = tmp_path_factory.mktemp("streaming")
    workspace = Workspace(root / "ws")
    return workspace, ingest_and_extract(write_tiny_corpus(root / "corpus"), workspace)


@pytest.fixture
def private(features: tuple[Workspace, str], tmp_path: Path) -> tuple[Workspace, str]:
    workspace, corpus = features
    return Workspace(shutil.copytree(workspace.root, tmp_path / "ws")), corpus


def _load_whole_split(workspace: Workspace, corpus: str, split: str) -> PairedFeatures:
    """The split as the in-memory loader read it before streaming (Python lists, one `read` of every id)."""
    images, captions = read_images(workspace, corpus, split), read_captions(workspace, corpus, split)
    image_features = FeatureSet.open(workspace, corpus, IMAGE_ENCODER)
    text_features = FeatureSet.open(workspace, corpus, TEXT_ENCODER)
    captioned = set(captions.column("image_id").to_pylist()) - set(image_features.failed)
    image_ids = [i for i in images.column("image_id").to_pylist() if i in captioned]
    position = {image_id: row for row, image_id in enumerate(image_ids)}
    pairs = [(c, position[i]) for c, i in zip(captions.column("caption_id").to_pylist(),
                                              captions.column("image_id").to_pylist()) if i in position]
    caption_ids = [c for c, _ in pairs]
    return PairedFeatures(image_ids, caption_ids, torch.from_numpy(image_features.read(image_ids)[1]),
                          torch.from_numpy(text_features.read(caption_ids)[1]),
                          torch.tensor([p for _, p in pairs]), image_features.encoder, text_features.encoder)


def _assert_same_split(cached: CachedSplit | PairedFeatures, whole: PairedFeatures) -> None:
    memory = cached.to_memory() if isinstance(cached, CachedSplit) else cached
    assert memory.image_ids == whole.image_ids and memory.caption_ids == whole.caption_ids
    assert torch.equal(memory.images, whole.images) and torch.equal(memory.captions, whole.captions)
    assert torch.equal(memory.caption_image, whole.caption_image)


# --- the split's cache -----------------------------------------------------------------------------------


def test_the_cached_split_holds_the_rows_the_whole_split_loader_read(private: tuple[Workspace, str]) -> None:
    workspace, corpus = private
    for split in ("train", "dev"):
        whole = _load_whole_split(workspace, corpus, split)
        cached = open_split(workspace, corpus, split, IMAGE_ENCODER, TEXT_ENCODER)
        _assert_same_split(cached, whole)
        _assert_same_split(load_paired_features(workspace, corpus, split, IMAGE_ENCODER, TEXT_ENCODER), whole)
        assert cached.pairs.dtype == np.int32
        assert isinstance(cached.image_rows, RowFile) and cached.directory.parent.parent.parent.name == "cache"


def test_the_cache_is_built_once_and_rebuilt_when_its_inputs_change(private: tuple[Workspace, str]) -> None:
    workspace, corpus = private
    first = open_split(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    built = (first.directory / "images.f32").stat().st_mtime_ns
    again = open_split(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    assert again.directory == first.directory and (again.directory / "images.f32").stat().st_mtime_ns == built

    directory = workspace.features_dir(corpus, IMAGE_ENCODER)  # an image's features failed since
    manifest = FeatureManifest.load(directory)
    dropped = first.image_ids.take(np.array([0]))[0]
    manifest.failed[dropped] = "OSError: gone"
    manifest.save(directory)
    changed = open_split(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)

    assert changed.directory != first.directory and not first.directory.exists()  # the stale one is gone
    assert dropped not in changed.image_ids.to_list() and len(changed.image_rows) == len(first.image_rows) - 1
    _assert_same_split(changed, _load_whole_split(workspace, corpus, "train"))
    assert [p.name for p in changed.directory.parent.iterdir() if p.name.startswith("train-")] == [
        changed.directory.name]


def test_ids_and_rows_read_across_record_batches(private: tuple[Workspace, str], monkeypatch) -> None:
    workspace, corpus = private
    monkeypatch.setattr(split_cache, "ID_BATCH", 3)  # 19 captions in batches of 3
    cached = open_split(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    whole = _load_whole_split(workspace, corpus, "train")

    _assert_same_split(cached, whole)
    rows = np.array([18, 0, 4, 3, 3, 17, 9])
    assert cached.caption_ids.take(rows) == [whole.caption_ids[i] for i in rows]
    assert cached.caption_ids[5:11] == whole.caption_ids[5:11]
    assert torch.equal(cached.caption_rows.take(rows), whole.captions[rows])
    assert torch.equal(cached.caption_rows[7:12], whole.captions[7:12])


# --- training from the cache ------------------------------------------------------------------------------


def test_streaming_training_gives_the_in_memory_mapper(features: tuple[Workspace, str], tmp_path: Path) -> None:
    workspace, corpus = features
    private = Workspace(shutil.copytree(workspace.root, tmp_path / "ws"))
    streamed = train_mapper(open_split(private, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER),
                            open_split(private, corpus, "dev", IMAGE_ENCODER, TEXT_ENCODER), **TRAIN_OPTIONS)
    in_memory = train_mapper(_load_whole_split(workspace, corpus, "train"), _load_whole_split(workspace, corpus, "dev"),
                             **TRAIN_OPTIONS)

    assert streamed.metrics == in_memory.metrics and streamed.history == in_memory.history
    assert streamed.best_step == in_memory.best_step
    for (name, a), (_, b) in zip(streamed.model.state_dict().items(), in_memory.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("options", [{"init": "cca"}, {"mixup_alpha": 0.4, "input_dropout": 0.3},
                                     {"heads": 2, "steps": 40}])
def test_streaming_training_matches_with_other_options(features: tuple[Workspace, str], tmp_path: Path,
                                                       options: dict) -> None:
    workspace, corpus = features
    private = Workspace(shutil.copytree(workspace.root, tmp_path / "ws"))
    train = open_split(private, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    streamed = train_mapper(train, train, **{**TRAIN_OPTIONS, **options})
    memory = train.to_memory()
    in_memory = train_mapper(memory, memory, **{**TRAIN_OPTIONS, **options})

    assert streamed.metrics == in_memory.metrics
    assert torch.equal(streamed.model.text_proj.weight, in_memory.model.text_proj.weight)


def test_no_pass_holds_more_than_its_chunk(features: tuple[Workspace, str], tmp_path: Path, monkeypatch) -> None:
    """With a 3-row chunk, building the cache, the statistics, the CCA, the query bank and evaluation never
    read more than 3 rows at once, and a training step never more than its batch."""
    workspace, corpus = features
    private = Workspace(shutil.copytree(workspace.root, tmp_path / "ws"))
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 3 * 4 * 1280)  # 3 image rows, 10 caption rows of 384
    reads: list[int] = []
    original_read = FeatureSet.read
    monkeypatch.setattr(FeatureSet, "read", lambda self, ids: reads.append(len(ids)) or original_read(self, ids))
    train = open_split(private, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    assert reads and max(reads) <= 10 and sum(reads) == len(train.image_rows) + len(train.caption_rows)

    options = {**TRAIN_OPTIONS, "batch_size": 4, "init": "cca", "steps": 40}
    result = train_mapper(train, train, **options)
    assert train.image_rows.largest_read <= 4 and train.caption_rows.largest_read <= 10
    bank = build_querybank(result.model, train, QueryBankConfig(size=5))
    evaluate_normalised(result.model, train, bank, "dynamic")
    assert train.image_rows.largest_read <= 4 and train.caption_rows.largest_read <= 10

    monkeypatch.undo()  # the same mapper as with whole-split passes, up to the order of float64 sums
    whole = train_mapper(train.to_memory(), train.to_memory(), **options)
    torch.testing.assert_close(result.model.image_proj.weight, whole.model.image_proj.weight, rtol=1e-4, atol=1e-5)


def test_the_sampler_draws_the_batches_of_the_previous_sampler() -> None:
    counts = [1, 5, 3, 0, 2, 4, 1, 1, 0, 6]
    caption_image = torch.tensor([img for img, n in enumerate(counts) for _ in range(n)])[
        torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1))]
    for n_images in (10, 8):  # with images that have no caption, and (the first 8 renumbered) ... all captioned
        pairs = caption_image if n_images == 10 else torch.unique(caption_image, return_inverse=True)[1]
        ours = OneCaptionPerImageSampler(pairs.numpy().astype(np.int32), n_images, 4, torch.Generator().manual_seed(0))
        reference = _previous_sampler(pairs, n_images, 4, torch.Generator().manual_seed(0))
        for _ in range(30):
            (a, b), (c, d) = next(ours), next(reference)
            assert torch.equal(a, c) and torch.equal(b, d)


def _previous_sampler(caption_image: torch.Tensor, n_images: int, batch_size: int, generator: torch.Generator):
    """The sampler as it was before streaming (torch int64 arrays throughout)."""
    order = torch.argsort(caption_image, stable=True)
    counts = torch.bincount(caption_image, minlength=n_images)
    offsets = torch.cumsum(counts, 0) - counts
    images = torch.nonzero(counts > 0).flatten()
    queue = torch.empty(0, dtype=torch.long)
    while True:
        if len(queue) < batch_size:
            queue = images[torch.randperm(len(images), generator=generator)]
        batch, queue = queue[:batch_size], queue[batch_size:]
        pick = (torch.rand(len(batch), generator=generator) * counts[batch]).long()
        yield batch, order[offsets[batch] + pick]


def test_column_statistics_in_blocks_equal_the_whole_matrix() -> None:
    x = torch.randn(1001, 7, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mean, std = column_statistics(MemoryRows(x), size=64)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(std, x.std(0))


def test_fit_mapper_trains_from_the_cache(features: tuple[Workspace, str], tmp_path: Path) -> None:
    workspace, corpus = features
    private = Workspace(shutil.copytree(workspace.root, tmp_path / "ws"))
    summary = fit_mapper(private, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))

    reference = train_mapper(_load_whole_split(workspace, corpus, "train"), _load_whole_split(workspace, corpus, "dev"),
                             **TRAIN_OPTIONS)
    assert summary.best_step == reference.best_step and summary.history == reference.history
    cached = sorted(p.name.split("-")[0] for p in (private.root / "cache" / "splits" / corpus).iterdir())
    assert cached == ["dev", "train"]


# --- blockwise evaluation -----------------------------------------------------------------------------------


def _full_matrix_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                       image_norm: GalleryNorm | None,
                       text_norm: GalleryNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks from the whole similarity matrix, as the evaluation computed them before blocks."""
    sims = text_emb @ image_emb.T
    if image_norm is not None:
        sims = image_norm.apply(sims)
    t2i = (sims > sims.gather(1, caption_image[:, None])).sum(1)
    sims = image_emb @ text_emb.T
    if text_norm is not None:
        sims = text_norm.apply(sims)
    mine = caption_image[None, :] == torch.arange(len(image_emb))[:, None]
    i2t = (sims > sims.masked_fill(~mine, float("-inf")).max(1, keepdim=True).values).sum(1)
    return t2i, i2t


def _embeddings(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QueryBank, list[str]]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(60, 6, generator=generator), dim=-1)
    images[7] = images[3]  # a tie
    caption_image = torch.randint(0, 60, (150,), generator=generator)
    captions = F.normalize(images[caption_image] + 0.8 * torch.randn(150, 6, generator=generator), dim=-1)
    captions[10] = captions[11]
    ids = [f"img{i}" for i in range(60)]
    bank = QueryBank(text=captions[:40], image=images[:20], beta=20.0,
                     text_keys=tuple(ids[i] for i in caption_image[:40]), image_keys=tuple(ids[:20]))
    return images, captions, caption_image, bank, ids


@pytest.mark.parametrize("method", ["none", "inverted_softmax", "dynamic"])
def test_blockwise_ranks_equal_the_full_matrix(method: str, tmp_path: Path) -> None:
    images, captions, caption_image, bank, ids = _embeddings(0)
    keys = [ids[i] for i in caption_image]
    image_norm = bank.gallery_norm(method, images, "image", ids)
    text_norm = bank.gallery_norm(method, captions, "text", keys)
    expected = _full_matrix_ranks(images, captions, caption_image, image_norm, text_norm)
    if method == "dynamic":
        assert 0 < int(image_norm.hub.sum()) < len(images)  # some queries gated, some not

    for chunk, gallery_chunk in ((4096, 8192), (7, 11), (1, 1), (64, 5)):
        got = retrieval_ranks(images, captions, caption_image, chunk=chunk, image_norm=image_norm,
                              text_norm=text_norm, gallery_chunk=gallery_chunk)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (chunk, gallery_chunk)
    on_disk = [_row_file(tmp_path / name, x) for name, x in (("i.f32", images), ("t.f32", captions))]
    got = retrieval_ranks(*on_disk, caption_image.numpy(), chunk=16, image_norm=image_norm, text_norm=text_norm,
                          gallery_chunk=13)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert max(rows.largest_read for rows in on_disk) <= 16


def test_normalised_metrics_from_rows_on_disk_equal_those_of_tensors(tmp_path: Path) -> None:
    images, captions, caption_image, bank, ids = _embeddings(1)
    expected = normalised_metrics(images, captions, caption_image, bank, "dynamic", ids)
    on_disk = [_row_file(tmp_path / name, x) for name, x in (("i.f32", images), ("t.f32", captions))]

    assert normalised_metrics(*on_disk, caption_image.numpy(), bank, "dynamic", ids) == expected
    assert expected["rsum"] != expected["rsum_raw"]
    assert retrieval_metrics(*on_disk, caption_image) == retrieval_metrics(images, captions, caption_image)


def test_large_splits_are_evaluated_from_spilled_joint_vectors(features: tuple[Workspace, str], tmp_path: Path) -> None:
    workspace, corpus = features
    private = Workspace(shutil.copytree(workspace.root, tmp_path / "ws"))
    train = open_split(private, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    model = train_mapper(train, train, **{**TRAIN_OPTIONS, "steps": 20}).model
    bank = build_querybank(model, train, QueryBankConfig())
    with joint_vectors(model, train, memory_bytes=0) as (image_emb, text_emb):
        assert isinstance(image_emb, RowFile) and isinstance(text_emb, RowFile)
        spilled = normalised_metrics(image_emb, text_emb, train.pairs, bank, "inverted_softmax", train.image_keys())
    in_memory = train.to_memory()
    with torch.no_grad():
        expected = normalised_metrics(model.encode_image(in_memory.images), model.encode_text(in_memory.captions),
                                      in_memory.caption_image, bank, "inverted_softmax", in_memory.image_ids)
    assert spilled == expected


def _row_file(path: Path, matrix: torch.Tensor) -> RowFile:
    writer = RowWriter(path, matrix.shape[1])
    for block in matrix.split(17):
        writer.write(block)
    return writer.close()


def test_reading_a_table_batch_by_batch_holds_one_batch_not_the_file(tmp_path: Path) -> None:
    """`iter_batches` (what extraction plans, embedding and the split cache read corpus tables with) holds a
    batch at a time: pyarrow's default pre-buffering kept every row group it had read until the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossalign.corpus.rows import iter_batches

    path, rows = tmp_path / "captions.parquet", 400_000
    text = pa.array([f"caption {i:07d} " + "x" * 80 for i in range(rows)])
    pq.write_table(pa.table({"caption_id": pa.array([f"{i:032x}" for i in range(rows)]), "text": text}), path,
                   row_group_size=20_000, compression="none")
    file_mb = path.stat().st_size / 2**20
    before, most, seen = pa.total_allocated_bytes(), 0, 0
    for first, batch in iter_batches(path, None, rows=10_000):
        assert first == seen
        seen += batch.num_rows
        most = max(most, pa.total_allocated_bytes() - before)
        del batch
    assert seen == rows and file_mb > 40
    assert most / 2**20 < file_mb / 4, f"held {most / 2**20:.1f} MB reading a {file_mb:.0f} MB file"
