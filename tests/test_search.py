"""Text -> image and image -> text search over a real trained and embedded tiny workspace."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import ENCODER_RUNTIME, IMAGE_ENCODER, TEXT_ENCODER, draw_picture, ingest_and_extract, write_tiny_corpus

from crossalign.align import fit_mapper
from crossalign.config import CorpusConfig, ExtractConfig, TrainConfig
from crossalign.corpus import read_captions, read_images
from crossalign.search import QueryError, Searcher, search_text
from crossalign.search.search import SearchHit
from crossalign.store import (
    CAPTIONS_TABLE,
    IMAGES_TABLE,
    StoreMismatchError,
    connect,
    embed_corpus,
    table_metadata,
    upsert_rows,
)
from crossalign.store.index import ensure_index, plan_index
from crossalign.store.schema import NORMALISER_COLUMN, item_columns
from crossalign.workspace import Workspace, WorkspaceError

# Enough steps to memorise the 8 training pictures. Selection runs on the training split too, so the
# kept state is one that retrieves the training set (the point of these tests), not an early one.
TRAIN_OPTIONS = {"dim": 64, "steps": 300, "eval_every": 50, "batch_size": 8, "input_dropout": 0.0,
                 "warmup_steps": 20, "eval_split": "train"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace, str]:
    """Ingest, extract, fit and embed the tiny corpus once for the module."""
    root = tmp_path_factory.mktemp("search")
    corpus_root, workspace = write_tiny_corpus(root / "corpus"), Workspace(root / "ws")
    corpus = ingest_and_extract(corpus_root, workspace)
    fit = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    assert fit.metrics["rsum"] == 600.0, "the tiny training set was not memorised: the tests below would be moot"
    embed_corpus(workspace, corpus)
    return corpus_root, workspace, corpus


@pytest.fixture(scope="module")
def searcher(built: tuple[Path, Workspace, str]) -> Searcher:
    return Searcher(built[1], **ENCODER_RUNTIME)


def captions_by_image(workspace: Workspace, corpus: str, split: str) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for row in read_captions(workspace, corpus, split).to_pylist():
        grouped.setdefault(row["image_id"], []).append(row["text"])
    return grouped


def test_searcher_reads_the_mapper_from_the_tables(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, _ = built

    assert searcher.metadata["mapper_id"] == workspace.current_mapper_id()
    assert searcher.mapper_config["image_encoder"]["encoder"] == IMAGE_ENCODER
    assert not searcher.mapper.training


def test_a_training_caption_finds_its_image(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, corpus = built

    for image_id, texts in captions_by_image(workspace, corpus, "train").items():
        for text in texts:
            hits = searcher.text_to_image(text, limit=3)
            assert image_id in [hit.id for hit in hits], f"{text!r} did not find its image"


def test_a_training_image_finds_one_of_its_captions(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, corpus = built
    grouped = captions_by_image(workspace, corpus, "train")
    images = read_images(workspace, corpus, "train").to_pylist()

    for row in images[:4]:
        hits = searcher.image_to_text(row["uri"], limit=3)
        assert {hit.text for hit in hits} & set(grouped[row["image_id"]]), f"{row['uri']} found none of its captions"
        assert all(hit.image_id for hit in hits)


def test_an_unseen_file_of_a_known_picture_finds_its_captions(
    built: tuple[Path, Workspace, str], searcher: Searcher, tmp_path: Path,
) -> None:
    _, workspace, corpus = built
    img, colour, shape, background = draw_picture(0)
    query = tmp_path / "query.png"
    img.resize((img.width * 2, img.height * 2)).save(query)  # other size and format: other bytes
    own = {f"a {colour} {shape} on a {background} background", f"a picture of a {colour} {shape}",
           f"{shape} drawn in {colour}"}  # picture 0's three captions (conftest.write_picture)

    hits = searcher.image_to_text(query, limit=3)

    assert {hit.text for hit in hits[:2]} <= own, [hit.text for hit in hits]


def test_hits_are_ranked_by_the_normalised_score(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    hits = searcher.text_to_image("a blue triangle on a white background", limit=5)

    assert searcher.normalisation == "inverted_softmax" and searcher.notice is None
    assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(hit.uri).is_file() and hit.split in {"train", "dev"} for hit in hits)
    assert set(hits[0].to_dict()) == {"rank", "score", "cosine", "id", "uri", "split", "corpus"}  # no None fields
    stored = {r["id"]: r[NORMALISER_COLUMN] for r in connect(built[1]).open_table(IMAGES_TABLE).to_arrow().to_pylist()}
    for hit in hits:  # what a plain lancedb reader computes from the column
        assert hit.score == pytest.approx(hit.cosine - stored[hit.id], abs=2e-4) and -1.0 <= hit.cosine <= 1.0


def test_raw_search_ranks_by_cosine_similarity(built: tuple[Path, Workspace, str]) -> None:
    raw = Searcher(built[1], normalisation="none", **ENCODER_RUNTIME)
    hits = raw.text_to_image("a blue triangle on a white background", limit=5)

    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert set(hits[0].to_dict()) == {"rank", "score", "id", "uri", "split", "corpus"}
    query = raw.embed_text("a blue triangle on a white background")
    table = connect(built[1]).open_table(IMAGES_TABLE)
    vectors = {r["id"]: np.array(r["vector"]) for r in table.to_arrow().to_pylist()}
    assert scores == pytest.approx([float(vectors[h.id] @ query) for h in hits], abs=1e-4)


@pytest.mark.parametrize("normalisation", ["inverted_softmax", "none"])
def test_a_small_table_searched_in_memory_gives_the_hits_of_its_vector_index(
        built: tuple[Path, Workspace, str], normalisation: str, monkeypatch) -> None:
    """Tables that fit in memory are ranked exhaustively there (`crossalign.search.resident`): the same hits, scores
    and filters as the LanceDB path with its normalised re-rank, which larger tables take."""
    from crossalign.search import resident

    def search_all(searcher: Searcher) -> list[list[dict]]:
        return [[hit.to_dict() for hit in hits] for hits in (
            searcher.text_to_image("a blue triangle on a white background", limit=6),
            searcher.text_to_image("a red circle", limit=4, split="dev"),
            searcher.text_to_text("a green square", limit=5),
            searcher.text_to_image("a red circle", limit=3, split="no-such-split"),
        )]

    in_memory = Searcher(built[1], normalisation=normalisation, **ENCODER_RUNTIME)
    held = search_all(in_memory)
    assert all(table is not None for table in in_memory._resident.values())
    monkeypatch.setattr(resident, "RESIDENT_MAX_BYTES", 0)
    through_index = Searcher(built[1], normalisation=normalisation, **ENCODER_RUNTIME)
    assert search_all(through_index) == held and set(through_index._resident.values()) == {None}
    assert held[1] and all(hit["split"] == "dev" for hit in held[1]) and held[3] == []


def test_hits_show_the_item_columns_of_the_table_schemas(searcher: Searcher) -> None:
    # the columns a hit shows are derived from store/schema.py, and each has a SearchHit field to land in
    assert item_columns(IMAGES_TABLE) == ["id", "uri", "split", "corpus"]
    assert item_columns(CAPTIONS_TABLE) == ["id", "text", "image_id", "split", "corpus"]
    hit = searcher.text_to_text("a red circle", limit=1)[0]
    assert {"id", "text", "image_id", "split", "corpus"} <= set(hit.to_dict())
    assert set(item_columns(IMAGES_TABLE)) | set(item_columns(CAPTIONS_TABLE)) <= {f.name for f in fields(SearchHit)}


def test_limit_caps_the_number_of_hits(searcher: Searcher) -> None:
    assert len(searcher.text_to_image("a red circle", limit=2)) == 2
    assert len(searcher.text_to_image("a red circle", limit=50)) == 12


def test_split_filter_keeps_only_that_split(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, corpus = built
    dev_ids = set(read_images(workspace, corpus, "dev").column("image_id").to_pylist())
    train_image = read_images(workspace, corpus, "train").column("uri")[0].as_py()

    image_hits = searcher.text_to_image("a red circle on a white background", limit=10, split="dev")
    caption_hits = searcher.image_to_text(train_image, limit=10, split="dev")

    assert {hit.id for hit in image_hits} == dev_ids
    assert caption_hits and {hit.split for hit in caption_hits} == {"dev"}
    assert {hit.image_id for hit in caption_hits} <= dev_ids


def test_split_names_are_quoted_safely(searcher: Searcher) -> None:
    assert searcher.text_to_image("a red circle", split="it's") == []


def test_embed_text_and_image_give_unit_vectors(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    uri = read_images(built[1], built[2]).column("uri")[0].as_py()
    for vector in (searcher.embed_text("a green square"), searcher.embed_image(uri)):
        assert vector.shape == (TRAIN_OPTIONS["dim"],) and vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_query_is_refused(searcher: Searcher, text: str) -> None:
    with pytest.raises(QueryError, match="empty"):
        searcher.text_to_image(text)


def test_missing_query_image_is_refused(searcher: Searcher, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="does not exist"):
        searcher.image_to_text(tmp_path / "nothing-here.jpg")
    with pytest.raises(QueryError, match="does not exist"):
        searcher.image_to_text(tmp_path)  # a directory


@pytest.mark.parametrize("content", [b"", b"plain text, not an image\n" * 10, "truncated"])
def test_unreadable_query_image_is_refused(
    built: tuple[Path, Workspace, str], searcher: Searcher, tmp_path: Path, content: bytes | str,
) -> None:
    if content == "truncated":
        content = (built[0] / "images/pic000.jpg").read_bytes()[:600]
    query = tmp_path / "query.jpg"
    query.write_bytes(content)

    with pytest.raises(QueryError, match="cannot be read as an image"):
        searcher.image_to_text(query)


def test_search_text_one_shot_with_default_runtime(built: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = built
    pic = read_images(workspace, corpus).to_pylist()
    red_circle = next(r["image_id"] for r in pic if Path(r["uri"]).name == "pic000.jpg")

    hits = search_text(str(workspace.root), "a red circle on a white background", limit=3)

    assert red_circle in [hit.id for hit in hits]


def test_workspace_without_tables_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="no images table in .*: run `crossalign run`"):
        Searcher(Workspace(tmp_path / "empty"), **ENCODER_RUNTIME)


def test_tables_whose_mapper_is_gone_are_refused(built: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    _, workspace, _ = built
    shutil.copytree(workspace.root, tmp_path / "ws")
    copy = Workspace(tmp_path / "ws")
    shutil.rmtree(copy.require_current_mapper())

    with pytest.raises(WorkspaceError, match=f"built by mapper {copy.current_mapper_id()}"):
        Searcher(copy, **ENCODER_RUNTIME)


def test_several_image_encoders_side_by_side_end_to_end(tmp_path: Path) -> None:
    """`a,b`: each part extracted on its own, concatenated for training, embedding and search by image."""
    from crossalign.align.data import load_paired_features
    from crossalign.extract import extract_image_features, extract_text_features, read_features

    composite = f"{IMAGE_ENCODER},{IMAGE_ENCODER}+flip"
    corpus_root, workspace = write_tiny_corpus(tmp_path / "corpus"), Workspace(tmp_path / "ws")
    from crossalign.corpus import ingest_corpus

    ingest_corpus(CorpusConfig(root=corpus_root, name="tiny"), workspace)
    summary = extract_image_features(workspace, "tiny", ExtractConfig(image_encoder=composite, num_workers=0,
                                                                      **ENCODER_RUNTIME))
    extract_text_features(workspace, "tiny", ExtractConfig(text_encoder=TEXT_ENCODER, **ENCODER_RUNTIME))
    assert (summary.encoder, summary.encoded) == (composite, 12)
    parts = [workspace.features_dir("tiny", name) for name in (IMAGE_ENCODER, f"{IMAGE_ENCODER}+flip")]
    assert all((part / "_manifest.json").exists() for part in parts)

    data = load_paired_features(workspace, "tiny", "train", composite, TEXT_ENCODER)
    plain, flipped = (read_features(part, data.image_ids)[1] for part in parts)
    assert np.array_equal(data.images.numpy(), np.concatenate([plain, flipped], axis=1))
    assert data.image_encoder["encoder"] == composite and data.image_encoder["dim"] == 2560
    assert [p["encoder"] for p in data.image_encoder["parts"]] == [IMAGE_ENCODER, f"{IMAGE_ENCODER}+flip"]

    fit = fit_mapper(workspace, "tiny", composite, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    assert fit.metrics["rsum"] == 600.0
    embed_corpus(workspace, "tiny")
    searcher = Searcher(workspace, **ENCODER_RUNTIME)
    image = corpus_root / read_images(workspace, "tiny", "train").column("uri").to_pylist()[0]
    hits = searcher.image_to_text(image, limit=2)
    assert len(hits) == 2 and hits[0].score > hits[1].score


def test_several_text_encoders_side_by_side_end_to_end(built: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    """`minilm-l6,mpnet-base`: each part extracted on its own, concatenated for training, embedding and text queries."""
    import torch

    from crossalign.align.data import load_paired_features
    from crossalign.extract import extract_text_features, read_features

    composite = f"{TEXT_ENCODER},mpnet-base"
    shutil.copytree(built[1].root, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    summary = extract_text_features(workspace, "tiny", ExtractConfig(text_encoder=composite, **ENCODER_RUNTIME))
    assert (summary.encoder, summary.modality, summary.encoded) == (composite, "text", 28)
    data = load_paired_features(workspace, "tiny", "train", IMAGE_ENCODER, composite)
    parts = [read_features(workspace.features_dir("tiny", name), data.caption_ids)[1]
             for name in (TEXT_ENCODER, "mpnet-base")]
    assert np.array_equal(data.captions.numpy(), np.concatenate(parts, axis=1))
    assert data.text_encoder["encoder"] == composite and data.text_encoder["modality"] == "text"
    assert data.text_encoder["dim"] == 384 + 768

    fit = fit_mapper(workspace, "tiny", IMAGE_ENCODER, composite, TrainConfig(**TRAIN_OPTIONS))
    assert fit.metrics["rsum_raw"] == 600.0
    embed_corpus(workspace, "tiny")
    searcher = Searcher(workspace, **ENCODER_RUNTIME)
    captions = read_captions(workspace, "tiny", "train")
    texts = dict(zip(captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()))
    text = texts[data.caption_ids[0]]
    query = torch.from_numpy(searcher.embed_text(text))
    with torch.no_grad():  # the query is embedded with both text encoders, as the corpus was
        stored = searcher.mapper.encode_text(torch.from_numpy(np.concatenate(
            [read_features(workspace.features_dir("tiny", name), data.caption_ids[:1])[1]
             for name in (TEXT_ENCODER, "mpnet-base")], axis=1)))[0]
    assert float(query @ stored) > 0.999
    assert searcher.text_to_image(text, limit=1)[0].id == data.image_ids[int(data.caption_image[0])]


def test_an_image_query_finds_itself_first(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, corpus = built
    for row in read_images(workspace, corpus).to_pylist()[:3]:
        hits = searcher.image_to_image(row["uri"], limit=3)
        assert hits[0].id == row["image_id"] and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[0].uri == row["uri"] and hits[1].score < hits[0].score


def test_a_text_query_finds_the_same_caption_first(searcher: Searcher) -> None:
    hits = searcher.text_to_text("a picture of a red circle", limit=3)

    assert hits[0].text == "a picture of a red circle" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert all(hit.image_id for hit in hits)


def test_full_text_search_finds_the_captions_with_the_word(built: tuple[Path, Workspace, str],
                                                           searcher: Searcher) -> None:
    _, workspace, corpus = built
    expected = {r["text"] for r in read_captions(workspace, corpus).to_pylist() if "drawn" in r["text"]}

    hits = searcher.text_to_text("drawn", limit=10, mode="fts")

    assert len(expected) == 4 and {hit.text for hit in hits} == expected
    assert [hit.rank for hit in hits] == [1, 2, 3, 4] and all(hit.score > 0 for hit in hits)


def test_hybrid_search_ranks_the_caption_with_both_signals_first(searcher: Searcher) -> None:
    hits = searcher.text_to_text("circle drawn in red", limit=5, mode="hybrid")

    assert hits[0].text == "circle drawn in red"
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)


def test_full_text_search_respects_filters(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, workspace, corpus = built
    expected = [r["text"] for r in read_captions(workspace, corpus, "dev").to_pylist() if "drawn" in r["text"]]

    hits = searcher.text_to_text("drawn", limit=10, mode="fts", split="dev")

    assert len(expected) == 1 and [hit.text for hit in hits] == expected  # picture 9: the only dev one with "drawn"
    assert searcher.text_to_text("drawn", mode="fts", corpus="another") == []


def test_corpus_filter(built: tuple[Path, Workspace, str], searcher: Searcher) -> None:
    _, _, corpus = built
    assert {hit.corpus for hit in searcher.text_to_image("a red circle", limit=20, corpus=corpus)} == {corpus}
    assert searcher.text_to_image("a red circle", corpus="another") == []


def test_unknown_mode_is_refused(searcher: Searcher) -> None:
    with pytest.raises(QueryError, match="unknown search mode 'fuzzy'"):
        searcher.text_to_text("a dog", mode="fuzzy")


def test_a_query_vector_of_another_dimension_is_refused(searcher: Searcher) -> None:
    with pytest.raises(StoreMismatchError, match=f"holds {TRAIN_OPTIONS['dim']}-d vectors; the query vector has 8"):
        searcher.search_vector(IMAGES_TABLE, np.ones(8, dtype=np.float32))


def test_an_older_mapper_is_searched_at_its_own_version(built: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    _, workspace, corpus = built
    shutil.copytree(workspace.root, tmp_path / "ws")
    copy = Workspace(tmp_path / "ws")
    first = copy.current_mapper_id()
    second = fit_mapper(copy, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "dim": 32,
                                                                                  "steps": 20}))
    embed_corpus(copy, corpus)

    old, new = Searcher(copy, mapper_id=first, **ENCODER_RUNTIME), Searcher(copy, **ENCODER_RUNTIME)

    assert old.metadata["mapper_id"] == first and new.metadata["mapper_id"] == second.mapper_id
    assert old.embed_text("a red circle").shape == (TRAIN_OPTIONS["dim"],)
    assert new.embed_text("a red circle").shape == (32,)
    assert old.text_to_image("a picture of a red circle", limit=1)[0].uri.endswith("pic000.jpg")
    with pytest.raises(StoreMismatchError, match="holds no vectors of mapper mapper-nope"):
        Searcher(copy, mapper_id="mapper-nope", **ENCODER_RUNTIME)


def test_a_table_that_grew_since_its_index_was_built_is_searched_by_the_built_plan(
        built: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    _, workspace, corpus = built
    shutil.copytree(workspace.root, tmp_path / "ws")
    copy = Workspace(tmp_path / "ws")
    table = connect(copy).open_table(IMAGES_TABLE)
    upsert_rows(table, _unrelated_rows(table, 1_500, 0))
    plan = ensure_index(table, "cosine", exact_max_rows=1_000)  # what `embed_corpus` does, at a smaller size
    upsert_rows(table, _unrelated_rows(table, 1_500, 1))  # grown by less than fourfold since

    searcher = Searcher(copy, **ENCODER_RUNTIME)

    assert plan.index_type == "IVF_PQ" and plan.planned_rows == 1_512 and table.count_rows() == 3_012
    assert searcher.index_plans[IMAGES_TABLE] == plan  # not today's plan (exact, for 3,012 rows)
    assert plan_index(3_012, TRAIN_OPTIONS["dim"]).index_type is None
    assert searcher.text_to_image("a picture of a red circle", limit=1, corpus=corpus)[0].uri.endswith("pic000.jpg")


def _unrelated_rows(table: Any, n: int, seed: int) -> pa.Table:
    """`n` rows of random unit vectors in corpus `unrelated`, written by the table's mapper."""
    vectors = np.random.default_rng(seed).standard_normal((n, table.schema.field("vector").type.list_size))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"unrelated-{seed}-{i}" for i in range(n)]
    return pa.table({
        "id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        "mapper_id": [table_metadata(table.schema)["mapper_id"]] * n, NORMALISER_COLUMN: [1.0] * n,
        "uri": ids, "split": ["train"] * n, "corpus": ["unrelated"] * n,
    }, schema=table.schema)


def test_tables_naming_other_encoders_than_their_mapper_are_refused(built: tuple[Path, Workspace, str],
                                                                     tmp_path: Path) -> None:
    _, workspace, _ = built
    shutil.copytree(workspace.root, tmp_path / "ws")
    copy = Workspace(tmp_path / "ws")
    config_path = copy.require_current_mapper() / "config.json"
    config = json.loads(config_path.read_text())
    config["image_encoder"] = {**config["image_encoder"], "encoder": "efficientnet-lite2"}
    config_path.write_text(json.dumps(config))

    with pytest.raises(StoreMismatchError, match="expects image features of efficientnet-lite2, but the tables name"):
        Searcher(copy, **ENCODER_RUNTIME)
    assert table_metadata(connect(copy).open_table(IMAGES_TABLE).schema)["image_encoder"]["encoder"] == IMAGE_ENCODER


@pytest.mark.parametrize("method", ["inverted_softmax", "dynamic"])
def test_normalised_search_equals_exhaustive_scoring_of_the_table(built: tuple[Path, Workspace, str],
                                                                   method: str) -> None:
    from crossalign.align.mapper_dir import load_querybank
    from crossalign.align.querybank import GalleryNorm, bank_top, hub_flags

    workspace = built[1]
    searcher = Searcher(workspace, normalisation=method, **ENCODER_RUNTIME)
    stored = connect(workspace).open_table(IMAGES_TABLE).to_arrow().to_pylist()
    vectors = torch.tensor(np.array([r["vector"] for r in stored], dtype=np.float32))
    bank = load_querybank(workspace.mapper_dir(searcher.metadata["mapper_id"]), searcher.mapper_config)
    _, top = bank_top([vectors], bank.text)
    norm = GalleryNorm(method, torch.tensor([r[NORMALISER_COLUMN] for r in stored]), hub_flags(len(stored), top))
    for text in ("a blue triangle on a white background", "stripes", "a picture of a green square"):
        hits = searcher.text_to_image(text, limit=6)
        scores = norm.apply(torch.from_numpy(searcher.embed_text(text))[None, :] @ vectors.T)[0]
        expected = [stored[i]["id"] for i in scores.argsort(descending=True)[:6]]
        assert [hit.id for hit in hits] == expected, text
        assert [hit.score for hit in hits] == pytest.approx(scores.sort(descending=True).values[:6].tolist(), abs=2e-4)
