"""Joint embeddings in a real LanceDB directory: upserts on id, metadata naming the mapper, rebuilds."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import IMAGE_ENCODER, TEXT_ENCODER, ingest_and_extract, write_picture, write_records, write_tiny_corpus

from crossalign.align import MapperMismatchError, fit_mapper, load_mapper
from crossalign.align.mapper_dir import load_querybank
from crossalign.config import TrainConfig
from crossalign.corpus import read_captions, read_images
from crossalign.extract import FeatureManifest, read_features
from crossalign.store import (
    CAPTIONS_TABLE,
    IMAGES_TABLE,
    StoreMismatchError,
    captions_schema,
    cleanup_tables,
    embed_corpus,
    images_schema,
    mapper_versions,
    open_table,
    table_metadata,
    table_names,
    upsert_rows,
)
from crossalign.store.index import IndexPlan, recorded_plan
from crossalign.store.schema import NORMALISER_COLUMN
from crossalign.workspace import Workspace, WorkspaceError

TRAIN_OPTIONS = {"dim": 32, "steps": 40, "batch_size": 8, "eval_every": 20, "warmup_steps": 5, "input_dropout": 0.0}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace, str]:
    """A tiny corpus with features and a current mapper (built once for the module; tests copy it)."""
    root = tmp_path_factory.mktemp("store")
    corpus_root, workspace = write_tiny_corpus(root / "corpus"), Workspace(root / "ws")
    corpus = ingest_and_extract(corpus_root, workspace)
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    return corpus_root, workspace, corpus


@pytest.fixture
def ws(fitted: tuple[Path, Workspace, str], tmp_path: Path) -> tuple[Path, Workspace, str]:
    """A private copy of the fitted workspace and its corpus, with no LanceDB tables yet."""
    corpus_root, workspace, corpus = fitted
    shutil.copytree(corpus_root, tmp_path / "corpus")
    shutil.copytree(workspace.root, tmp_path / "ws")
    return tmp_path / "corpus", Workspace(tmp_path / "ws"), corpus


def rows(workspace: Workspace, table: str) -> list[dict]:
    return lancedb.connect(str(workspace.lancedb_uri)).open_table(table).to_arrow().to_pylist()


def test_embed_writes_one_row_per_image_and_caption(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws

    summary = embed_corpus(workspace, corpus)

    n_images, n_captions = read_images(workspace, corpus).num_rows, read_captions(workspace, corpus).num_rows
    assert (summary.images, summary.captions) == (n_images, n_captions) == (12, 28)
    assert (summary.images_in_table, summary.captions_in_table) == (12, 28)
    assert summary.mapper_id == workspace.current_mapper_id()
    assert Path(summary.lancedb_uri) == workspace.lancedb_uri
    image_rows, caption_rows = rows(workspace, IMAGES_TABLE), rows(workspace, CAPTIONS_TABLE)
    assert sorted(r["id"] for r in image_rows) == sorted(read_images(workspace, corpus).column("image_id").to_pylist())
    assert {r["mapper_id"] for r in image_rows + caption_rows} == {summary.mapper_id}
    assert {r["corpus"] for r in image_rows + caption_rows} == {corpus}
    images = {r["image_id"]: r for r in read_images(workspace, corpus).to_pylist()}
    for row in image_rows:
        assert (row["uri"], row["split"]) == (images[row["id"]]["uri"], images[row["id"]]["split"])
    captions = {r["caption_id"]: r for r in read_captions(workspace, corpus).to_pylist()}
    for row in caption_rows:
        expected = captions[row["id"]]
        assert [row[k] for k in ("text", "image_id", "split")] == [expected[k] for k in ("text", "image_id", "split")]


def test_embedding_in_chunks_stores_every_row_and_logs_progress(ws: tuple[Path, Workspace, str], monkeypatch,
                                                                 caplog) -> None:
    import crossalign.progress
    import crossalign.store.tables as tables

    _, workspace, corpus = ws
    monkeypatch.setattr(tables, "BATCH_ROWS", 5)  # 12 images and 28 captions in chunks of 5
    monkeypatch.setattr(crossalign.progress, "PROGRESS_LOG_SECONDS", 0.0)  # a line after every chunk but the last
    with caplog.at_level(logging.INFO, logger="crossalign.store.tables"):
        summary = embed_corpus(workspace, corpus)

    assert (summary.images_in_table, summary.captions_in_table) == (12, 28)
    for table, id_column in ((IMAGES_TABLE, "image_id"), (CAPTIONS_TABLE, "caption_id")):
        stored = [r["id"] for r in rows(workspace, table)]
        corpus_table = read_images(workspace, corpus) if table == IMAGES_TABLE else read_captions(workspace, corpus)
        assert sorted(stored) == sorted(corpus_table.column(id_column).to_pylist())
    lines = [r.getMessage() for r in caplog.records if " mapped, " in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == (
        [f"embed {corpus}: {n} of 12 images mapped" for n in (5, 10)]
        + [f"embed {corpus}: {n} of 28 captions mapped" for n in (5, 10, 15, 20, 25)])


def test_stored_vectors_are_the_mapper_applied_to_the_features(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    model, _ = load_mapper(workspace.require_current_mapper())

    for table, encoder, project in ((IMAGES_TABLE, IMAGE_ENCODER, model.encode_image),
                                    (CAPTIONS_TABLE, TEXT_ENCODER, model.encode_text)):
        stored = rows(workspace, table)
        _, features = read_features(workspace.features_dir(corpus, encoder), [r["id"] for r in stored])
        with torch.no_grad():
            expected = project(torch.from_numpy(features)).numpy()
        vectors = np.array([r["vector"] for r in stored], dtype=np.float32)
        assert vectors.shape == (len(stored), TRAIN_OPTIONS["dim"])
        assert np.allclose(vectors, expected, atol=1e-6), table
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_second_embed_changes_nothing(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    before = {table: sorted(rows(workspace, table), key=lambda r: r["id"]) for table in (IMAGES_TABLE, CAPTIONS_TABLE)}

    summary = embed_corpus(workspace, corpus)

    assert (summary.images_in_table, summary.captions_in_table) == (12, 28)
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        assert sorted(rows(workspace, table), key=lambda r: r["id"]) == before[table]


def test_new_corpus_items_are_added_to_the_tables(ws: tuple[Path, Workspace, str]) -> None:
    corpus_root, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    new = write_picture(corpus_root, 12, "train")
    write_records(corpus_root, [new], mode="a")
    ingest_and_extract(corpus_root, workspace, corpus)

    summary = embed_corpus(workspace, corpus)

    assert (summary.images_in_table, summary.captions_in_table) == (13, 28 + len(new["captions"]))
    texts = {r["text"] for r in rows(workspace, CAPTIONS_TABLE)}
    assert set(new["captions"]) <= texts


def test_table_metadata_names_the_mapper_and_the_encoders(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    summary = embed_corpus(workspace, corpus)
    _, config = load_mapper(workspace.require_current_mapper())

    db = lancedb.connect(str(workspace.lancedb_uri))
    assert {IMAGES_TABLE, CAPTIONS_TABLE} <= set(table_names(db))
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        metadata = table_metadata(db.open_table(table).schema)
        assert metadata["mapper_id"] == summary.mapper_id
        assert metadata["dim"] == TRAIN_OPTIONS["dim"] and metadata["metric"] == "cosine"
        assert metadata["image_encoder"] == config["image_encoder"]
        assert metadata["text_encoder"] == config["text_encoder"]
        assert metadata["image_encoder"]["encoder"] == IMAGE_ENCODER
        assert metadata["text_encoder"]["encoder"] == TEXT_ENCODER
    image_schema, caption_schema = (db.open_table(t).schema for t in (IMAGES_TABLE, CAPTIONS_TABLE))
    assert image_schema.names == images_schema(TRAIN_OPTIONS["dim"]).names
    assert caption_schema.names == captions_schema(TRAIN_OPTIONS["dim"]).names
    assert image_schema.field("vector").type == images_schema(TRAIN_OPTIONS["dim"]).field("vector").type


def test_table_metadata_of_a_foreign_table_is_empty(tmp_path: Path) -> None:
    db = lancedb.connect(str(tmp_path / "db"))
    table = db.create_table("other", data=[{"id": "a", "vector": [0.0, 1.0]}])

    assert table_metadata(table.schema) == {}


def test_plain_lancedb_can_search_the_tables(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    db = lancedb.connect(str(workspace.lancedb_uri))
    images = db.open_table(IMAGES_TABLE)
    target = images.to_arrow().to_pylist()[3]

    hits = images.search(target["vector"]).distance_type("cosine").limit(3).to_list()

    assert hits[0]["id"] == target["id"] and hits[0]["_distance"] == pytest.approx(0.0, abs=1e-5)
    assert len(hits) == 3 and hits[1]["_distance"] > 1e-4
    dev = images.search(target["vector"]).distance_type("cosine").where("split = 'dev'", prefilter=True).limit(20)
    assert {hit["split"] for hit in dev.to_list()} == {"dev"} and len(dev.to_list()) == 4


def test_a_new_mapper_rebuilds_the_tables(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    first = embed_corpus(workspace, corpus)
    other = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 7,
                                                                                      "dim": 16}))
    assert other.mapper_id != first.mapper_id

    summary = embed_corpus(workspace, corpus)

    assert summary.mapper_id == other.mapper_id
    assert (summary.images_in_table, summary.captions_in_table) == (12, 28)
    db = lancedb.connect(str(workspace.lancedb_uri))
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        stored = rows(workspace, table)
        assert {r["mapper_id"] for r in stored} == {other.mapper_id}
        assert {len(r["vector"]) for r in stored} == {16}
        assert table_metadata(db.open_table(table).schema)["mapper_id"] == other.mapper_id


def test_embed_with_a_named_mapper_that_is_not_current(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    first_id = workspace.current_mapper_id()
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 9}))
    assert workspace.current_mapper_id() != first_id

    summary = embed_corpus(workspace, corpus, mapper_id=first_id)

    assert summary.mapper_id == first_id
    assert {r["mapper_id"] for r in rows(workspace, IMAGES_TABLE)} == {first_id}


def test_images_whose_features_failed_are_not_stored(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    directory = workspace.features_dir(corpus, IMAGE_ENCODER)
    manifest = FeatureManifest.load(directory)
    failed_id = read_images(workspace, corpus).column("image_id")[0].as_py()
    manifest.failed[failed_id] = "OSError: unreadable"
    manifest.save(directory)

    summary = embed_corpus(workspace, corpus)

    assert summary.images == summary.images_in_table == 11
    assert failed_id not in {r["id"] for r in rows(workspace, IMAGES_TABLE)}


def test_embed_without_a_mapper_raises(fitted: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    corpus_root, _, corpus = fitted
    workspace = Workspace(tmp_path / "fresh")
    ingest_and_extract(corpus_root, workspace, corpus)

    with pytest.raises(WorkspaceError, match="no trained mapper"):
        embed_corpus(workspace, corpus)
    assert not workspace.lancedb_uri.exists() or not table_names(lancedb.connect(str(workspace.lancedb_uri)))


def test_embed_without_features_raises(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    shutil.rmtree(workspace.features_dir(corpus, TEXT_ENCODER))

    with pytest.raises(WorkspaceError, match="no minilm-l6 features"):
        embed_corpus(workspace, corpus)


def test_embed_refuses_features_of_other_encoders(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    directory = workspace.features_dir(corpus, IMAGE_ENCODER)
    manifest = FeatureManifest.load(directory)
    manifest.encoder = {**manifest.encoder, "weights_digest": "ffffffffffffffff"}
    manifest.save(directory)

    with pytest.raises(MapperMismatchError, match="image features"):
        embed_corpus(workspace, corpus)


def _tree_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_embed_writes_no_new_table_version(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    db = lancedb.connect(str(workspace.lancedb_uri))
    versions = {t: db.open_table(t).version for t in (IMAGES_TABLE, CAPTIONS_TABLE)}

    summary = embed_corpus(workspace, corpus)

    assert (summary.images, summary.captions, summary.removed, summary.rebuilt) == (0, 0, 0, False)
    assert {t: db.open_table(t).version for t in (IMAGES_TABLE, CAPTIONS_TABLE)} == versions


def test_a_second_mapper_reembeds_from_cached_features_into_its_own_version(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    first = embed_corpus(workspace, corpus)
    first_vectors = {r["id"]: r["vector"] for r in rows(workspace, IMAGES_TABLE)}
    other = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 7,
                                                                                      "dim": 16}))
    features = _tree_stamps(workspace.root / "features")

    summary = embed_corpus(workspace, corpus)

    assert _tree_stamps(workspace.root / "features") == features  # no extraction, no feature file touched
    assert summary.rebuilt and (summary.images, summary.captions) == (12, 28)
    db = lancedb.connect(str(workspace.lancedb_uri))
    versions = mapper_versions(workspace)
    assert {(v.table, v.mapper_id, v.current, v.rows) for v in versions} == {
        (IMAGES_TABLE, other.mapper_id, True, 12), (IMAGES_TABLE, first.mapper_id, False, 12),
        (CAPTIONS_TABLE, other.mapper_id, True, 28), (CAPTIONS_TABLE, first.mapper_id, False, 28)}
    old = open_table(db, IMAGES_TABLE, first.mapper_id)
    assert table_metadata(old.schema)["mapper_id"] == first.mapper_id
    assert {r["id"]: r["vector"] for r in old.to_arrow().to_pylist()} == first_vectors
    assert recorded_plan(old) == IndexPlan(**first.index)  # the tagged version has its index plan (search reads it)
    assert table_metadata(open_table(db, IMAGES_TABLE).schema)["mapper_id"] == other.mapper_id
    unknown = "mapper-000000000000"
    with pytest.raises(StoreMismatchError, match=f"no vectors of mapper {unknown}: current {other.mapper_id}"):
        open_table(db, CAPTIONS_TABLE, unknown)


def test_switching_mapper_keeps_every_corpus_of_the_tables(ws: tuple[Path, Workspace, str], tmp_path: Path) -> None:
    corpus_root, workspace, corpus = ws
    second_root = tmp_path / "second"
    write_records(second_root, [write_picture(second_root, 40, "train")])
    ingest_and_extract(second_root, workspace, "second")
    embed_corpus(workspace, corpus)
    embed_corpus(workspace, "second")
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 3}))

    summary = embed_corpus(workspace, corpus)

    assert summary.rebuilt and summary.images_in_table == 13
    assert {r["corpus"] for r in rows(workspace, IMAGES_TABLE)} == {corpus, "second"}
    assert {r["mapper_id"] for r in rows(workspace, CAPTIONS_TABLE)} == {summary.mapper_id}


def test_cleanup_compacts_and_drops_older_mappers(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    first = embed_corpus(workspace, corpus)
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 5}))
    current = embed_corpus(workspace, corpus)
    before = rows(workspace, CAPTIONS_TABLE)

    report = cleanup_tables(workspace)

    assert report[IMAGES_TABLE]["dropped_mappers"] == [first.mapper_id]
    assert report[IMAGES_TABLE]["versions_after"] < report[IMAGES_TABLE]["versions_before"]
    assert [(v.mapper_id, v.current) for v in mapper_versions(workspace)] == [(current.mapper_id, True)] * 2
    assert sorted(rows(workspace, CAPTIONS_TABLE), key=lambda r: r["id"]) == sorted(before, key=lambda r: r["id"])
    with pytest.raises(StoreMismatchError, match="no vectors of mapper"):
        open_table(lancedb.connect(str(workspace.lancedb_uri)), IMAGES_TABLE, first.mapper_id)


def test_items_gone_from_the_corpus_leave_the_tables(ws: tuple[Path, Workspace, str]) -> None:
    corpus_root, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    records = [json.loads(line) for line in (corpus_root / "captions.jsonl").read_text().splitlines()]
    (corpus_root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    ingest_and_extract(corpus_root, workspace, corpus)

    summary = embed_corpus(workspace, corpus)

    assert summary.removed == 1 + len(records[0]["captions"])
    assert summary.images_in_table == 11
    assert sorted(r["id"] for r in rows(workspace, IMAGES_TABLE)) == sorted(
        read_images(workspace, corpus).column("image_id").to_pylist())


def _rows_like(workspace: Workspace, table: str, dim: int, mapper_id: str) -> pa.Table:
    stored = lancedb.connect(str(workspace.lancedb_uri)).open_table(table).to_arrow().slice(0, 2)
    vectors = np.full((2, dim), 1.0 / np.sqrt(dim), dtype=np.float32)
    vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    return stored.set_column(stored.schema.get_field_index("vector"), pa.field("vector", vector.type), vector) \
        .set_column(stored.schema.get_field_index("mapper_id"), "mapper_id", pa.array([mapper_id] * 2))


def test_upsert_refuses_vectors_of_another_dimension(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    summary = embed_corpus(workspace, corpus)
    table = lancedb.connect(str(workspace.lancedb_uri)).open_table(IMAGES_TABLE)

    refused = f"holds {TRAIN_OPTIONS['dim']}-d float vectors; refusing rows of 16-d float"
    with pytest.raises(StoreMismatchError, match=refused):
        upsert_rows(table, _rows_like(workspace, IMAGES_TABLE, 16, summary.mapper_id))
    assert table.count_rows() == 12


def test_upsert_refuses_vectors_of_another_mapper(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    summary = embed_corpus(workspace, corpus)
    table = lancedb.connect(str(workspace.lancedb_uri)).open_table(CAPTIONS_TABLE)
    before = table.version

    with pytest.raises(StoreMismatchError, match=f"holds vectors of mapper {summary.mapper_id}; refusing rows of "
                                                 "mapper-someoneelse"):
        upsert_rows(table, _rows_like(workspace, CAPTIONS_TABLE, TRAIN_OPTIONS["dim"], "mapper-someoneelse"))
    assert table.version == before and table.count_rows() == 28


def test_upsert_of_existing_ids_replaces_them(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    summary = embed_corpus(workspace, corpus)
    table = lancedb.connect(str(workspace.lancedb_uri)).open_table(IMAGES_TABLE)
    changed = _rows_like(workspace, IMAGES_TABLE, TRAIN_OPTIONS["dim"], summary.mapper_id)

    upsert_rows(table, changed)
    upsert_rows(table, changed)

    assert table.count_rows() == 12
    stored = {r["id"]: r["vector"] for r in table.to_arrow().to_pylist()}
    for row in changed.to_pylist():
        assert np.allclose(stored[row["id"]], row["vector"])


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_metric_is_selectable_and_recorded(ws: tuple[Path, Workspace, str], metric: str) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)

    summary = embed_corpus(workspace, corpus, metric=metric)

    assert summary.rebuilt and summary.metric == metric
    db = lancedb.connect(str(workspace.lancedb_uri))
    assert table_metadata(db.open_table(IMAGES_TABLE).schema)["metric"] == metric
    with pytest.raises(ValueError, match="unknown distance metric 'hamming'"):
        embed_corpus(workspace, corpus, metric="hamming")


def normalisers(workspace: Workspace, table: str) -> dict[str, float]:
    return {r["id"]: r[NORMALISER_COLUMN] for r in rows(workspace, table)}


def expected_normalisers(workspace: Workspace, table: str) -> dict[str, float]:
    """Each row's normaliser recomputed from its stored vector and the current mapper's query bank."""
    directory = workspace.require_current_mapper()
    _, config = load_mapper(directory)
    bank = load_querybank(directory, config)
    stored = rows(workspace, table)
    vectors = torch.tensor(np.array([r["vector"] for r in stored], dtype=np.float32))
    keys = [r["id"] if table == IMAGES_TABLE else r["image_id"] for r in stored]
    values = bank.normaliser(vectors, "image" if table == IMAGES_TABLE else "text", keys)
    return {r["id"]: float(v) for r, v in zip(stored, values)}


def test_every_row_carries_its_query_bank_normaliser(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws

    summary = embed_corpus(workspace, corpus)

    assert summary.normalised_rows == 12 + 28 and summary.normaliser_seconds >= 0
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        assert normalisers(workspace, table) == pytest.approx(expected_normalisers(workspace, table), abs=1e-5)
        # a plain column of the table: readable and filterable without crossalign
        column = lancedb.connect(str(workspace.lancedb_uri)).open_table(table).schema.field(NORMALISER_COLUMN)
        assert column.type == pa.float32()
    metadata = table_metadata(lancedb.connect(str(workspace.lancedb_uri)).open_table(IMAGES_TABLE).schema)
    assert metadata["querybank"]["beta"] == 20.0


def test_incremental_embed_computes_normalisers_only_for_new_rows(ws: tuple[Path, Workspace, str]) -> None:
    corpus_root, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    before = {table: normalisers(workspace, table) for table in (IMAGES_TABLE, CAPTIONS_TABLE)}
    new = write_picture(corpus_root, 12, "train")
    write_records(corpus_root, [new], mode="a")
    ingest_and_extract(corpus_root, workspace, corpus)

    summary = embed_corpus(workspace, corpus)

    assert summary.normalised_rows == 1 + len(new["captions"])
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        after, expected = normalisers(workspace, table), expected_normalisers(workspace, table)
        added = set(after) - set(before[table])
        assert len(added) == (1 if table == IMAGES_TABLE else len(new["captions"]))
        assert {k: after[k] for k in before[table]} == before[table]  # old rows untouched, bit for bit
        assert {k: after[k] for k in added} == pytest.approx({k: expected[k] for k in added}, abs=1e-5)
    assert embed_corpus(workspace, corpus).normalised_rows == 0  # nothing new: nothing computed


def test_a_new_mapper_recomputes_every_normaliser(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    embed_corpus(workspace, corpus)
    first = {table: normalisers(workspace, table) for table in (IMAGES_TABLE, CAPTIONS_TABLE)}
    fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**{**TRAIN_OPTIONS, "seed": 5}))

    summary = embed_corpus(workspace, corpus)

    assert summary.rebuilt and summary.normalised_rows == 12 + 28
    for table in (IMAGES_TABLE, CAPTIONS_TABLE):
        after = normalisers(workspace, table)
        assert after == pytest.approx(expected_normalisers(workspace, table), abs=1e-5)
        assert after != first[table]


def test_a_mapper_without_a_query_bank_stores_null_normalisers(ws: tuple[Path, Workspace, str]) -> None:
    _, workspace, corpus = ws
    directory = workspace.require_current_mapper()  # as a mapper saved before banks were
    (directory / "querybank.parquet").unlink()

    summary = embed_corpus(workspace, corpus)

    assert summary.normalised_rows == 0
    assert set(normalisers(workspace, IMAGES_TABLE).values()) == {None}
