"""The cross-modal mapper: retrieval metrics, the batch sampler, training, saving and fitting."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, ENCODER_RUNTIME, IMAGE_ENCODER, TEXT_ENCODER, ingest_and_extract, write_tiny_corpus
from safetensors.torch import load_file

from crossalign.align import (
    JointMapper,
    MapperMismatchError,
    evaluate_current_mapper,
    fit_mapper,
    load_mapper,
    metrics_table,
    retrieval_metrics,
    save_mapper,
)
from crossalign.align.cca import fit_cca
from crossalign.align.data import PairedFeatures, load_paired_features
from crossalign.align.loss import ClipLoss, MarginLoss, VSEppLoss, make_loss, negatives_mask
from crossalign.align.mapper import check_encoder
from crossalign.align.mapper_dir import list_mappers, load_querybank
from crossalign.align.train import OneCaptionPerImageSampler, evaluate_mapper, train_mapper
from crossalign.align.zeroshot import class_embeddings, zero_shot_accuracy
from crossalign.config import TrainConfig
from crossalign.corpus import read_captions, read_images
from crossalign.encoders import load_encoder
from crossalign.extract import FeatureManifest
from crossalign.workspace import Workspace, WorkspaceError

# Small and quick, but enough steps for a linear map to separate 8 synthetic pictures.
TRAIN_OPTIONS = {"dim": 64, "steps": 120, "batch_size": 8, "eval_every": 40, "warmup_steps": 10,
                 "input_dropout": 0.0, "seed": 3}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace, str]:
    """A tiny corpus, ingested, with image and text features (extracted once for this module)."""
    root = tmp_path_factory.mktemp("align")
    corpus_root, workspace = write_tiny_corpus(root / "corpus"), Workspace(root / "ws")
    return corpus_root, workspace, ingest_and_extract(corpus_root, workspace)


@pytest.fixture
def features_copy(features: tuple[Path, Workspace, str], tmp_path: Path) -> tuple[Workspace, str]:
    """A private copy of the module's workspace, for tests that write mappers or edit manifests."""
    _, workspace, corpus = features
    shutil.copytree(workspace.root, tmp_path / "ws")
    return Workspace(tmp_path / "ws"), corpus


def _paired(features: tuple[Path, Workspace, str], split: str):
    _, workspace, corpus = features
    return load_paired_features(workspace, corpus, split, IMAGE_ENCODER, TEXT_ENCODER)


# --- retrieval metrics ----------------------------------------------------------------------------


def test_identity_embeddings_are_perfect_retrieval() -> None:
    emb = torch.eye(5)

    metrics = retrieval_metrics(emb, emb, torch.arange(5))

    for direction in ("t2i", "i2t"):
        assert [metrics[f"{direction}_r{k}"] for k in (1, 5, 10)] == [100.0, 100.0, 100.0]
        assert metrics[f"{direction}_medr"] == 1.0
    assert metrics["rsum"] == 600.0
    assert (metrics["images"], metrics["captions"]) == (5.0, 5.0)


def test_metrics_of_a_constructed_case() -> None:
    # Images are the basis vectors, so each caption row *is* its similarities to the six images.
    images = torch.eye(6)
    captions = torch.tensor([
        [0.5, 0.9, 0.7, 0.0, 0.0, 0.0],  # caption 0 of image 0: its image ranks 3rd
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        [0.9, 0.9, 0.9, 0.9, 0.1, 0.9],  # caption 4 of image 4: its image ranks 6th (last)
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    ])

    metrics = retrieval_metrics(images, captions, torch.arange(6))

    # text -> image ranks (1-based): 3, 1, 1, 1, 6, 1
    assert metrics["t2i_r1"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert metrics["t2i_r5"] == pytest.approx(100 * 5 / 6, abs=0.01)
    assert metrics["t2i_r10"] == 100.0
    assert metrics["t2i_medr"] == 1.0
    # image -> text: image 0 sees caption 4 (0.9) above its own caption (0.5): rank 2; the rest rank 1.
    assert metrics["i2t_r1"] == pytest.approx(100 * 5 / 6, abs=0.01)
    assert metrics["i2t_r5"] == 100.0 and metrics["i2t_medr"] == 1.0
    assert metrics["rsum"] == pytest.approx(66.67 + 83.33 + 100 + 83.33 + 100 + 100, abs=0.02)


def test_median_rank_and_best_caption_per_image() -> None:
    images = torch.eye(3)
    captions = torch.tensor([
        [0.1, 0.5, 0.9],  # image 0, ranked 3rd
        [0.5, 0.9, 0.0],  # image 0, ranked 2nd
        [0.0, 0.1, 0.9],  # image 1, ranked 2nd
        [0.0, 0.1, 0.9],  # image 2, ranked 1st
    ])
    caption_image = torch.tensor([0, 0, 1, 2])

    metrics = retrieval_metrics(images, captions, caption_image)

    # t2i 0-based ranks 2, 1, 1, 0: R@1 = 1/4, median (the lower middle value) 1 -> medr 2.
    assert metrics["t2i_r1"] == 25.0 and metrics["t2i_r5"] == 100.0 and metrics["t2i_medr"] == 2.0
    # i2t: image 0's best caption (0.5) beats all others -> rank 1; image 1's only caption (0.1) is
    # beaten by 0.5 and 0.9 -> rank 3; image 2's caption (0.9) ties two others -> counts as rank 1.
    assert metrics["i2t_r1"] == pytest.approx(200 / 3, abs=0.01)
    assert metrics["i2t_medr"] == 1.0


def test_ties_count_in_the_query_favour() -> None:
    same = torch.ones(4, 3) / 3 ** 0.5

    metrics = retrieval_metrics(same, same, torch.arange(4))

    assert metrics["t2i_r1"] == 100.0 and metrics["i2t_r1"] == 100.0


def test_metrics_table_shows_the_numbers() -> None:
    table = metrics_table(retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3)))

    assert "| text → image | 100.0 | 100.0 | 100.0 | 1 |" in table
    assert "rsum = 600.0 over 3 images, 3 captions" in table


# --- loss and sampler -----------------------------------------------------------------------------


def test_clip_loss_is_low_for_aligned_pairs_and_high_for_swapped() -> None:
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    loss, scale = ClipLoss(), torch.tensor(100.0)

    aligned, swapped = loss(emb, emb, scale), loss(emb, emb.roll(1, 0), scale)

    assert aligned < 0.05 < 1.0 < swapped
    assert torch.isclose(loss(emb, emb.roll(1, 0), scale), loss(emb.roll(1, 0), emb, scale))


# Two pairs, scores computed by hand: image rows [1,0], [0,1]; captions [1,0], [0.8,0.6].
# s = [[1.0, 0.8], [0.0, 0.6]], positives on the diagonal (1.0 and 0.6).
TWO_IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TWO_CAPTIONS = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
# Three pairs: images are the unit axes; captions [1,0,0], [.6,.8,0], [0,.6,.8].
# s = [[1, .6, 0], [0, .8, .6], [0, 0, .8]].
THREE_IMAGES = torch.eye(3)
THREE_CAPTIONS = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])


def test_infonce_of_a_hand_computed_case() -> None:
    # rows: log(1 + e^-0.2), log(1 + e^-0.6); columns: log(1 + e^-1), log(1 + e^0.2)
    rows = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(-0.6))) / 2
    columns = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.2))) / 2
    assert ClipLoss()(TWO_IMAGES, TWO_CAPTIONS, torch.tensor(1.0)).item() == pytest.approx((rows + columns) / 2)


def test_vsepp_takes_the_hardest_negative_of_each_pair() -> None:
    # margin 0.5. Image queries: relu(.5-1+.6)=.1, relu(.5-.8+.6)=.3, relu(.5-.8+0)=0;
    # caption queries: relu(.5-1+0)=0, relu(.5-.8+.6)=.3, relu(.5-.8+.6)=.3; sum 1.0 over 3 pairs.
    assert VSEppLoss(margin=0.5)(THREE_IMAGES, THREE_CAPTIONS).item() == pytest.approx(1.0 / 3)
    # two pairs: (relu(.5-1+.8) + relu(.5-1+0) + relu(.5-.6+0) + relu(.5-.6+.8)) / 2 = (.3 + .7) / 2
    assert VSEppLoss(margin=0.5)(TWO_IMAGES, TWO_CAPTIONS).item() == pytest.approx(0.5)


def test_margin_loss_averages_over_every_negative_both_ways() -> None:
    # 3 pairs: 6 negatives per direction; image->text hinges .1 and .3, text->image .3 and .3: 1.0 / 12
    assert MarginLoss(margin=0.5)(THREE_IMAGES, THREE_CAPTIONS).item() == pytest.approx(1.0 / 12)
    # 2 pairs: hinges .3, 0 (image->text) and 0, .7 (text->image): 1.0 / 4
    assert MarginLoss(margin=0.5)(TWO_IMAGES, TWO_CAPTIONS).item() == pytest.approx(0.25)


def test_captions_of_the_same_image_are_never_negatives_of_each_other() -> None:
    # Rows 0 and 2 are two captions of one image: with the mask, the batch reduces to the two-pair case
    # plus row 2, whose only true negative is row 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    captions = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, -0.8]])
    image_index = torch.tensor([7, 3, 7])
    mask = negatives_mask(3, image_index, images.device)
    assert mask.tolist() == [[False, True, False], [True, False, True], [False, True, False]]

    # margin 0.5, scores s = [[1, .8, .6], [0, .6, -.8], [1, .8, .6]], positives 1, .6, .6; the valid
    # (image i, caption j) negatives are (0,1), (1,0), (1,2), (2,1).
    # Image i as query, relu(.5 - s[i,i] + s[i,j]): .3, 0, 0, .7.
    # Caption j as query, relu(.5 - s[j,j] + s[i,j]): .7, 0, 0, .7. Sum 2.4 over 8 hinges.
    assert MarginLoss(margin=0.5)(images, captions, image_index=image_index).item() == pytest.approx(2.4 / 8)
    unmasked = MarginLoss(margin=0.5)(images, captions).item()
    assert unmasked != pytest.approx(2.4 / 8)  # without the mask, rows 0 and 2 count as negatives

    # InfoNCE: the masked logits drop out of the softmax entirely.
    scale = torch.tensor(1.0)
    masked = ClipLoss()(images, captions, scale, image_index=image_index)
    logits = (images @ captions.T).masked_fill(~mask & ~torch.eye(3, dtype=torch.bool), float("-inf"))
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                      + torch.nn.functional.cross_entropy(logits.T, torch.arange(3)))
    assert masked.item() == pytest.approx(expected.item())
    row0 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.8)))  # row 0 sees only caption 1 as negative
    assert -torch.log_softmax(logits[0], 0)[0].item() == pytest.approx(row0)


def test_unknown_loss_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="use one of infonce, vsepp, margin"):
        make_loss("triplet")


def test_sampler_never_puts_two_captions_of_one_image_in_a_batch() -> None:
    counts = [1, 5, 3, 0, 2, 4, 1, 1, 0, 6]  # images 3 and 8 have no captions
    caption_image = torch.tensor([img for img, n in enumerate(counts) for _ in range(n)])[
        torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1))]
    sampler = OneCaptionPerImageSampler(caption_image, len(counts), batch_size=5,
                                        generator=torch.Generator().manual_seed(0))
    seen_captions: set[int] = set()

    for _ in range(200):
        images, captions = next(sampler)
        assert len(images) == 5
        assert len(set(images.tolist())) == 5, "an image twice in one batch"
        assert torch.equal(caption_image[captions], images), "a caption paired with another image"
        assert not {3, 8} & set(images.tolist())
        seen_captions.update(captions.tolist())

    assert seen_captions == set(range(sum(counts)))


def test_sampler_batch_is_capped_by_the_number_of_images() -> None:
    sampler = OneCaptionPerImageSampler(torch.tensor([0, 0, 1, 2, 2]), 3, batch_size=64,
                                        generator=torch.Generator().manual_seed(0))

    images, captions = next(sampler)

    assert sorted(images.tolist()) == [0, 1, 2] and len(captions) == 3


# --- features and training ------------------------------------------------------------------------


def test_paired_features_line_up_captions_with_images(features: tuple[Path, Workspace, str]) -> None:
    train = _paired(features, "train")

    assert train.images.shape == (8, 1280) and train.captions.shape == (19, 384)
    assert len(train.caption_ids) == 19 and len(train.image_ids) == 8
    _, workspace, corpus = features
    image_of = {r["caption_id"]: r["image_id"] for r in read_captions(workspace, corpus, "train").to_pylist()}
    assert [train.image_ids[i] for i in train.caption_image.tolist()] == [image_of[c] for c in train.caption_ids]
    assert train.image_encoder["encoder"] == IMAGE_ENCODER and train.text_encoder["encoder"] == TEXT_ENCODER


def test_images_whose_features_failed_are_left_out_with_their_captions(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy
    before = load_paired_features(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    directory = workspace.features_dir(corpus, IMAGE_ENCODER)
    manifest = FeatureManifest.load(directory)
    dropped = before.image_ids[0]
    manifest.failed[dropped] = "OSError: gone"
    manifest.save(directory)

    after = load_paired_features(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)

    assert dropped not in after.image_ids and len(after.image_ids) == 7
    n_dropped_captions = int((before.caption_image == 0).sum())
    assert len(after.caption_ids) == len(before.caption_ids) - n_dropped_captions
    assert [after.image_ids[i] for i in after.caption_image.tolist()] == [
        before.image_ids[i] for i in before.caption_image.tolist() if i != 0]


def test_loading_features_of_an_empty_split_raises(features: tuple[Path, Workspace, str]) -> None:
    with pytest.raises(WorkspaceError, match="no images or no captions"):
        _paired(features, "test")


def test_training_is_deterministic_for_a_seed(features: tuple[Path, Workspace, str]) -> None:
    train, dev = _paired(features, "train"), _paired(features, "dev")

    first, second = train_mapper(train, dev, **TRAIN_OPTIONS), train_mapper(train, dev, **TRAIN_OPTIONS)

    assert first.metrics == second.metrics and first.history == second.history
    assert first.best_step == second.best_step
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    other_seed = train_mapper(train, dev, **{**TRAIN_OPTIONS, "seed": 4})
    assert not torch.equal(other_seed.model.image_proj.weight, first.model.image_proj.weight)


@pytest.mark.parametrize("loss", ["infonce", "vsepp", "margin"])
def test_training_improves_retrieval_on_the_training_split(features: tuple[Path, Workspace, str], loss: str) -> None:
    train = _paired(features, "train")
    untrained = JointMapper(train.images.shape[1], train.captions.shape[1], TRAIN_OPTIONS["dim"])
    untrained.fit_standardisation(train.images, train.captions)
    before = evaluate_mapper(untrained, train)

    result = train_mapper(train, train, **TRAIN_OPTIONS, loss=loss)

    assert result.best_step > 0
    assert result.metrics["rsum"] > before["rsum"] + 100
    assert result.metrics["t2i_r5"] == 100.0
    assert result.history[0]["step"] == TRAIN_OPTIONS["eval_every"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_reported_metrics_belong_to_the_returned_model(features: tuple[Path, Workspace, str]) -> None:
    train, dev = _paired(features, "train"), _paired(features, "dev")

    result = train_mapper(train, dev, **TRAIN_OPTIONS)

    assert evaluate_mapper(result.model, dev) == result.metrics
    assert all(result.metrics["rsum"] >= h["dev_rsum"] for h in result.history), "a better state was dropped"
    evaluated_steps = {h["step"]: h["dev_rsum"] for h in result.history}
    assert result.best_step == 0 or evaluated_steps[result.best_step] == result.metrics["rsum"]
    assert not result.model.training


# --- saving, loading and checking -----------------------------------------------------------------


def _config(train) -> dict:
    return {"kind": "linear", "image_dim": train.images.shape[1], "text_dim": train.captions.shape[1],
            "dim": TRAIN_OPTIONS["dim"], "image_encoder": train.image_encoder, "text_encoder": train.text_encoder}


def test_save_and_load_round_trip(features: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    train = _paired(features, "train")
    model = train_mapper(train, train, **{**TRAIN_OPTIONS, "steps": 20}).model

    mapper_id = save_mapper(model, _config(train), tmp_path)
    loaded, config = load_mapper(tmp_path / mapper_id)

    assert mapper_id.startswith("mapper-") and config["mapper_id"] == mapper_id
    assert config["image_encoder"] == train.image_encoder
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(train.images), model.encode_image(train.images))
        assert torch.equal(loaded.encode_text(train.captions), model.encode_text(train.captions))
    assert torch.equal(loaded.scale(), model.scale())
    assert save_mapper(loaded, config, tmp_path / "again") == mapper_id, "same weights, another id"
    assert set(load_file(str(tmp_path / mapper_id / "model.safetensors"))) == set(model.state_dict())


def test_different_weights_give_a_different_id(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = JointMapper(6, 4, 3), JointMapper(6, 4, 3)
    config = {"image_dim": 6, "text_dim": 4, "dim": 3}

    assert save_mapper(a, config, tmp_path) != save_mapper(b, config, tmp_path)


def test_check_encoder_refuses_other_encoders(features: tuple[Path, Workspace, str]) -> None:
    train = _paired(features, "train")
    config = {**_config(train), "mapper_id": "mapper-test"}
    check_encoder(config, "image", train.image_encoder)  # the same encoder passes
    check_encoder(config, "text", train.text_encoder)

    for change in ({"weights_digest": "ffffffffffffffff"}, {"dim": 2048}, {"encoder": "resnet50"},
                   {"preprocessing": {**train.image_encoder["preprocessing"], "size": 260}}):
        with pytest.raises(MapperMismatchError, match="mapper-test expects image features of efficientnet-lite0"):
            check_encoder(config, "image", {**train.image_encoder, **change})
    with pytest.raises(MapperMismatchError):
        check_encoder(config, "text", train.image_encoder)


# --- fit_mapper and evaluate_current_mapper -------------------------------------------------------


def test_fit_mapper_saves_the_mapper_and_makes_it_current(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy
    assert workspace.current_mapper_id() is None

    summary = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))

    directory = workspace.mapper_dir(summary.mapper_id)
    assert Path(summary.mapper_dir) == directory
    assert {p.name for p in directory.iterdir()} == {"model.safetensors", "config.json", "metrics.json",
                                                     "report.md", "recall_at_k.png", "querybank.parquet"}
    assert workspace.current_mapper_id() == summary.mapper_id
    assert workspace.require_current_mapper() == directory
    config = json.loads((directory / "config.json").read_text())
    assert config["mapper_id"] == summary.mapper_id and config["dim"] == TRAIN_OPTIONS["dim"]
    assert config["image_encoder"]["encoder"] == IMAGE_ENCODER and config["text_encoder"]["encoder"] == TEXT_ENCODER
    assert (config["image_dim"], config["text_dim"]) == (1280, 384)
    assert config["trained_on"] == {"corpus": corpus, "split": "train"}
    assert config["selected_on"] == {"corpus": corpus, "split": "dev"}
    options = TrainConfig(**TRAIN_OPTIONS).model_dump(exclude={"train_split", "eval_split", "method"})
    assert config["train_options"] == options
    assert config["best_step"] == summary.best_step
    saved = json.loads((directory / "metrics.json").read_text())
    assert saved["split"] == "dev" and saved["rsum"] == summary.metrics["rsum"]
    assert saved["history"] == summary.history
    assert summary.metrics["images"] == 4.0  # evaluated on the dev split
    # The query bank: the training split's joint vectors (all of them: fewer than the bank size), saved with
    # the mapper; the reported metrics are the normalised ones, the raw ones beside them.
    train = load_paired_features(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    model, _ = load_mapper(directory)
    bank = load_querybank(directory, config)
    with torch.no_grad():
        torch.testing.assert_close(bank.text, model.encode_text(train.captions))
        torch.testing.assert_close(bank.image, model.encode_image(train.images))
    assert bank.image_keys == tuple(train.image_ids)  # each bank row keyed by its image, to leave own pairs out
    assert bank.text_keys == tuple(train.image_ids[i] for i in train.caption_image)
    assert config["querybank"] == {"split": "train", "seed": 0, "method": "inverted_softmax", "beta": 20.0,
                                   "text_size": len(train.captions), "image_size": len(train.images)}
    assert summary.metrics["normalisation"] == "inverted_softmax" and "rsum_raw" in summary.metrics

    evaluated = evaluate_current_mapper(workspace, corpus, "dev")
    assert evaluated["mapper_id"] == summary.mapper_id
    assert {k: evaluated[k] for k in summary.metrics} == summary.metrics


def test_fit_mapper_twice_gives_the_same_mapper(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy

    first = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    second = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    other = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 11}))

    assert first.mapper_id == second.mapper_id != other.mapper_id
    assert workspace.current_mapper_id() == other.mapper_id
    assert list_mappers(workspace) == sorted([first.mapper_id, other.mapper_id])


def test_evaluating_without_a_mapper_raises(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy

    with pytest.raises(WorkspaceError, match="no trained mapper"):
        evaluate_current_mapper(workspace, corpus, "dev")


def test_evaluating_features_of_other_encoders_raises(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "steps": 10}))
    directory = workspace.features_dir(corpus, TEXT_ENCODER)
    manifest = FeatureManifest.load(directory)
    manifest.encoder = {**manifest.encoder, "weights_digest": "0000000000000000"}
    manifest.save(directory)

    with pytest.raises(MapperMismatchError, match="text features"):
        evaluate_current_mapper(workspace, corpus, "dev")


# --- closed-form CCA and zero-shot classification ----------------------------------------------


def _shared_latent_pairs(n: int, seed: int) -> PairedFeatures:
    """Image and text features that are two noisy linear views of one 6-d latent, one caption per image."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.Generator().manual_seed(99)  # the same views for every sample drawn
    to_image, to_text = torch.randn(6, 40, generator=mixing), torch.randn(6, 24, generator=mixing)
    latent = torch.randn(n, 6, generator=generator)
    images = latent @ to_image + 0.3 * torch.randn(n, 40, generator=generator) + 5.0
    captions = latent @ to_text + 0.3 * torch.randn(n, 24, generator=generator) - 2.0
    ids = [f"{seed}-{i}" for i in range(n)]
    return PairedFeatures(ids, ids, images, captions, torch.arange(n), {"encoder": "i"}, {"encoder": "t"})


def test_cca_finds_the_shared_latent_without_training() -> None:
    train, held_out = _shared_latent_pairs(2000, seed=0), _shared_latent_pairs(200, seed=1)

    model = fit_cca(train, dim=6)

    assert model.image_proj.out_features == 6
    metrics = evaluate_mapper(model, held_out)
    assert metrics["t2i_r1"] > 50 and metrics["i2t_r1"] > 50  # chance is 0.5
    random_map = JointMapper(40, 24, 6)
    random_map.fit_standardisation(train.images, train.captions)
    assert evaluate_mapper(random_map, held_out)["rsum"] < metrics["rsum"] / 3
    assert torch.equal(fit_cca(train, dim=6).image_proj.weight, model.image_proj.weight)  # deterministic


def test_cca_dimension_is_capped_by_the_smaller_feature_size() -> None:
    assert fit_cca(_shared_latent_pairs(300, seed=0)).image_proj.out_features == 24


def test_fit_mapper_with_cca_saves_a_mapper_that_evaluates_the_same(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy

    summary = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(method="cca", dim=32))

    _, config = load_mapper(workspace.require_current_mapper())
    assert (config["kind"], config["loss"], config["dim"], summary.best_step) == ("cca", None, 32, 0)
    evaluated = evaluate_current_mapper(workspace, corpus, "dev")
    assert {key: evaluated[key] for key in summary.metrics} == pytest.approx(summary.metrics)


def test_training_can_start_from_the_cca_solution(features: tuple[Path, Workspace, str]) -> None:
    train = _paired(features, "train")
    result = train_mapper(train, train, **{**TRAIN_OPTIONS, "steps": 40, "eval_every": 40}, init="cca")
    assert result.metrics["rsum"] >= evaluate_mapper(fit_cca(train, TRAIN_OPTIONS["dim"]), train)["rsum"] - 1e-6
    with pytest.raises(ValueError, match="use random or cca"):
        train_mapper(train, train, **TRAIN_OPTIONS, init="pretrained")


def test_zero_shot_classifies_the_pictures_by_colour(features: tuple[Path, Workspace, str]) -> None:
    train = _paired(features, "train")
    model = train_mapper(train, train, **TRAIN_OPTIONS).model
    colours = list(COLOURS)
    # The tiny corpus draws picture i in colour i % 6 (conftest.draw_picture), file order = id order here.
    images = read_images(features[1], features[2], "train").to_pylist()
    index = {row["image_id"]: int(Path(row["uri"]).stem.removeprefix("pic")) for row in images}
    labels = [index[image_id] % len(colours) for image_id in train.image_ids]
    encoder = load_encoder(TEXT_ENCODER, **ENCODER_RUNTIME)

    accuracy = zero_shot_accuracy(model, encoder, train.images, labels, colours, templates=("a picture of a {} shape",))

    classes = class_embeddings(model, encoder, colours, ("a picture of a {} shape",))
    assert classes.shape == (6, TRAIN_OPTIONS["dim"])
    assert torch.allclose(classes.norm(dim=1), torch.ones(6))
    assert accuracy >= 0.75  # 8 training pictures, 6 colours: chance is 1/6


def test_mlp_mapper_trains_saves_and_loads(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy
    options = {**TRAIN_OPTIONS, "depth": 2, "hidden": 48, "dropout": 0.1}

    summary = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**options))

    model, config = load_mapper(workspace.require_current_mapper())
    assert (config["kind"], config["depth"], config["hidden"], config["dim"]) == ("mlp", 2, 48, options["dim"])
    assert isinstance(model.image_proj, torch.nn.Sequential) and model.image_proj[0].out_features == 48
    evaluated = evaluate_current_mapper(workspace, corpus, "dev")
    assert {key: evaluated[key] for key in summary.metrics} == pytest.approx(summary.metrics)
    train = load_paired_features(workspace, corpus, "train", IMAGE_ENCODER, TEXT_ENCODER)
    assert evaluate_mapper(model, train)["rsum"] > 300  # it fits the tiny training split


def test_mapper_report_has_the_metrics_table_and_a_recall_plot(features_copy: tuple[Workspace, str]) -> None:
    from PIL import Image

    from crossalign.align.report import recall_curves

    workspace, corpus = features_copy
    summary = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    directory = Path(summary.mapper_dir)

    report = (directory / "report.md").read_text()
    assert metrics_table(summary.metrics) in report and "![recall@K](recall_at_k.png)" in report
    with Image.open(directory / "recall_at_k.png") as plot:
        assert plot.format == "PNG" and plot.size == (600, 400)
    model, config = load_mapper(directory)
    dev = load_paired_features(workspace, corpus, "dev", IMAGE_ENCODER, TEXT_ENCODER)
    with torch.no_grad():
        curves = recall_curves(model.encode_image(dev.images), model.encode_text(dev.captions), dev.caption_image,
                               load_querybank(directory, config), summary.metrics["normalisation"])
    text_to_image = curves["text → image"]
    assert len(text_to_image) == 50 and text_to_image == sorted(text_to_image)  # recall grows with K
    assert round(text_to_image[0], 2) == summary.metrics["t2i_r1"]  # the metrics round to 2 decimals
    assert round(text_to_image[4], 2) == summary.metrics["t2i_r5"]
    assert text_to_image[-1] == 100.0  # 4 dev images: every caption's image is within the first 50


def test_stacked_heads_score_the_mean_of_their_cosines() -> None:
    from crossalign.align.train import stack_heads

    torch.manual_seed(0)
    members = [JointMapper(12, 8, 6) for _ in range(3)]
    images, texts = torch.randn(5, 12), torch.randn(7, 8)
    for member in members:
        member.fit_standardisation(images, texts)
    stacked = stack_heads(members)

    assert stacked.dim == 18 and stacked.heads == 3 and stacked.scale().shape == (3,)
    with torch.no_grad():
        joint = stacked.encode_image(images) @ stacked.encode_text(texts).T
        mean = torch.stack([m.encode_image(images) @ m.encode_text(texts).T for m in members]).mean(0)
        torch.testing.assert_close(joint, mean)
        torch.testing.assert_close(stacked.encode_image(images).norm(dim=1), torch.ones(5))


def test_a_mapper_of_several_heads_trains_saves_and_loads(features_copy: tuple[Workspace, str]) -> None:
    workspace, corpus = features_copy
    options = {**TRAIN_OPTIONS, "heads": 2}

    summary = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**options))

    model, config = load_mapper(workspace.require_current_mapper())
    assert (config["heads"], config["dim"], model.heads) == (2, TRAIN_OPTIONS["dim"], 2)
    assert len(config["temperature"]) == 2
    assert {row["head"] for row in summary.history} == {0, 1}
    # the heads are the mappers trained alone with seeds seed and seed + 1, at half the width
    single = train_mapper(_paired_ws(workspace, corpus, "train"), _paired_ws(workspace, corpus, "dev"),
                          **{**TRAIN_OPTIONS, "dim": TRAIN_OPTIONS["dim"] // 2, "seed": TRAIN_OPTIONS["seed"] + 1})
    torch.testing.assert_close(model.text_proj.weight[TRAIN_OPTIONS["dim"] // 2:], single.model.text_proj.weight)
    evaluated = evaluate_current_mapper(workspace, corpus, "dev")
    assert {key: evaluated[key] for key in summary.metrics} == pytest.approx(summary.metrics)
    with pytest.raises(ValueError, match="equal heads"):
        fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "heads": 5}))


def _paired_ws(workspace: Workspace, corpus: str, split: str) -> PairedFeatures:
    return load_paired_features(workspace, corpus, split, IMAGE_ENCODER, TEXT_ENCODER)


def test_input_dropout_drops_the_rounded_share_and_keeps_the_mean() -> None:
    from crossalign.align.mapper import InputDropout

    torch.manual_seed(0)
    dropout = InputDropout(0.6)  # rounded to 154 / 256
    x = torch.ones(1000, 333)
    out = dropout.train()(x)
    assert out.shape == x.shape
    assert (out == 0).float().mean().item() == pytest.approx(154 / 256, abs=0.005)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert out.unique().tolist() == [0.0, pytest.approx(256 / 102)]
    assert torch.equal(dropout.eval()(x), x)


# --- reuse or train: the mapper a pipeline run uses -----------------------------------------------------


@pytest.fixture(scope="module")
def fitted_copy(features: tuple[Path, Workspace, str],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str, str, dict]:
    """A copy of the module's workspace, its current mapper trained by `fit_mapper` with `options` (read only)."""
    _, original, corpus = features
    workspace = Workspace(shutil.copytree(original.root, tmp_path_factory.mktemp("reuse") / "ws"))
    options = {**TRAIN_OPTIONS, "steps": 20}
    return workspace, corpus, fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER,
                                         TrainConfig(**options)).mapper_id, options


def test_the_same_training_configuration_reuses_the_mapper(fitted_copy) -> None:
    from crossalign.align import choose_mapper
    from crossalign.config import QueryBankConfig, TrainConfig

    workspace, corpus, mapper_id, options = fitted_copy
    for image, text in ((IMAGE_ENCODER, TEXT_ENCODER), (f" {IMAGE_ENCODER}", f"{TEXT_ENCODER} ")):  # any spelling
        choice = choose_mapper(workspace, corpus, image, text, TrainConfig(**options), QueryBankConfig())
        assert (choice.mapper_id, choice.reused) == (mapper_id, True)
    assert choice.outcome(mapper_id) == (
        f"reused {mapper_id}: trained on the same data ({corpus}:train, selected on dev, features of {IMAGE_ENCODER} "
        f"and {TEXT_ENCODER}) with the same training options")


@pytest.mark.parametrize("change, reason", [
    ({"train": {"loss": "vsepp"}}, "loss 'infonce' (this run: 'vsepp')"),
    ({"train": {"lr": 0.01}}, "lr 0.003 (this run: 0.01)"),
    ({"train": {"train_split": "dev"}}, "train_split 'train' (this run: 'dev')"),
    ({"train": {"eval_split": "train", "steps": 30}}, "eval_split 'dev' (this run: 'train'); steps 20 (this run: 30)"),
    ({"querybank": {"size": 5}}, "querybank.size 10000 (this run: 5)"),
    ({"image_encoder": f"{IMAGE_ENCODER},{IMAGE_ENCODER}"}, "image_features.dim 1280 (this run: 2560)"),
    ({"retrain": True}, "retrain was asked"),
])
def test_other_training_data_or_options_train_a_new_mapper(fitted_copy, change: dict, reason: str) -> None:
    from crossalign.align import choose_mapper
    from crossalign.config import QueryBankConfig, TrainConfig

    workspace, corpus, mapper_id, options = fitted_copy
    choice = choose_mapper(workspace, corpus, change.get("image_encoder", IMAGE_ENCODER), TEXT_ENCODER,
                           TrainConfig(**{**options, **change.get("train", {})}),
                           QueryBankConfig(**change.get("querybank", {})), retrain=change.get("retrain", False))
    assert (choice.mapper_id, choice.reused) == (None, False)
    assert reason in choice.reason, choice.reason
    if "retrain" not in change:
        assert choice.reason.startswith(f"the current one, {mapper_id}, was trained with ")
    assert choice.outcome("mapper-new") == f"trained a new mapper, mapper-new: {choice.reason}"
    assert choice.outcome(mapper_id) == f"trained {mapper_id} again (the same weights as before): {choice.reason}"


def test_a_mapper_saved_without_its_training_record_is_not_reused(fitted_copy, tmp_path: Path) -> None:
    from crossalign.align import choose_mapper
    from crossalign.align.reuse import RECORD_KEY
    from crossalign.config import QueryBankConfig, TrainConfig

    fitted, corpus, mapper_id, options = fitted_copy
    workspace = Workspace(shutil.copytree(fitted.root, tmp_path / "ws"))
    config_file = workspace.mapper_dir(mapper_id) / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in saved.items() if k != RECORD_KEY}))  # as older versions
    choice = choose_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**options), QueryBankConfig())
    assert not choice.reused and "saved without its training configuration" in choice.reason
