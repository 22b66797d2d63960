"""Vector index planning and building on real LanceDB tables of clustered unit vectors."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from crossalign.store.index import (
    ClusteredUnitVectors,
    IndexPlan,
    apply_plan,
    ensure_index,
    plan_index,
    recorded_plan,
    search_plan,
)

DIM = 64
ROWS = 20_000
K = 10


def _rows(vectors: np.ndarray, start: int = 0) -> pa.Table:
    ids = pa.array([str(row) for row in range(start, start + len(vectors))], pa.string())
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    return pa.table({"id": ids, "vector": column})


def _write(db: lancedb.DBConnection, name: str, vectors: np.ndarray) -> lancedb.table.Table:
    return db.create_table(name, _rows(vectors))


def _search(table: lancedb.table.Table, plan: IndexPlan, queries: np.ndarray) -> np.ndarray:
    results = [apply_plan(table.search(q).limit(K).select(["id", "_distance"]), plan).to_arrow() for q in queries]
    return np.array([[int(i) for i in result.column("id").to_pylist()] for result in results])


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    model = ClusteredUnitVectors.make(DIM, seed=3, n_clusters=256)
    return model.sample(ROWS, seed=1), model.sample(50, seed=2)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, corpus) -> tuple[lancedb.table.Table, IndexPlan]:
    db = lancedb.connect(str(tmp_path_factory.mktemp("lancedb")))
    table = _write(db, "vectors", corpus[0])
    return table, ensure_index(table, "cosine", exact_max_rows=1_000)


def test_clustered_unit_vectors_are_unit_and_clustered(corpus) -> None:
    vectors, queries = corpus
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    nearest = np.sort(queries @ vectors.T, axis=1)[:, -1]
    assert np.median(nearest) > 0.5
    assert np.median(queries @ vectors[:1000].T) < 0.3


def test_plan_is_deterministic_and_sub_vectors_divide_dim() -> None:
    for dim in (7, 64, 100, 256, 384, 768):
        for rows in (60_000, 1_000_000, 10_000_000):
            plan = plan_index(rows, dim, exact_max_rows=50_000)
            assert plan == plan_index(rows, dim, exact_max_rows=50_000)
            assert plan.index_type == "IVF_PQ"
            assert dim % plan.num_sub_vectors == 0 and plan.num_sub_vectors <= max(1, dim // 8)
            assert 1 <= plan.nprobes <= plan.num_partitions
            assert plan.refine_factor >= 1
    assert plan_index(50_000, 256, exact_max_rows=50_000).index_type is None
    # sub-vectors of 8 up to 256 dims, of 16 above (half the build time at 1024-d, the same recall)
    assert plan_index(10**5, 256).num_sub_vectors == 32 and plan_index(10**5, 1024).num_sub_vectors == 64
    assert plan_index(10**6, 256).num_partitions >= plan_index(10**5, 256).num_partitions


def test_unknown_metric_raises_naming_the_allowed_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="cosine, l2, dot"):
        plan_index(100, 8, metric="hamming")
    table = _write(lancedb.connect(str(tmp_path)), "t", np.eye(8, dtype=np.float32))
    with pytest.raises(ValueError, match="cosine, l2, dot"):
        ensure_index(table, metric="euclid")


def test_no_index_below_the_threshold_and_exact_search_uses_the_metric(tmp_path, corpus) -> None:
    vectors = corpus[0][:2_000] * np.random.default_rng(0).uniform(0.5, 2.0, (2_000, 1)).astype(np.float32)
    queries = corpus[1]
    table = _write(lancedb.connect(str(tmp_path)), "small", vectors)
    plan = ensure_index(table, "dot")
    assert plan.index_type is None and plan.metric == "dot"
    assert list(table.list_indices()) == []
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    assert _recall(_search(table, plan, queries), truth) == 1.0


def test_planned_index_reaches_recall(indexed, corpus) -> None:
    table, plan = indexed
    vectors, queries = corpus
    assert plan.index_type is not None
    assert [i.name for i in table.list_indices()] == [plan.index_name]
    stats = table.index_stats(plan.index_name)
    assert stats.index_type == plan.index_type and stats.distance_type == "cosine"
    assert stats.num_indexed_rows == ROWS
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    assert _recall(_search(table, plan, queries), truth) >= 0.9


def test_ensure_index_twice_keeps_the_index(indexed) -> None:
    table, plan = indexed
    before = [(i.name, i.index_uuid) for i in table.list_indices()]
    assert ensure_index(table, "cosine", exact_max_rows=1_000) == plan
    after = [(i.name, i.index_uuid) for i in table.list_indices()]
    # (It failed once in a full local run and never since: the message shows what changed, if it does again.)
    assert after == before, (before, after, table.index_stats(plan.index_name), table.version)


def test_index_of_another_metric_is_replaced(tmp_path, corpus) -> None:
    table = _write(lancedb.connect(str(tmp_path)), "vectors", corpus[0][:5_000])
    ensure_index(table, "cosine", exact_max_rows=1_000)
    plan = ensure_index(table, "l2", exact_max_rows=1_000)
    assert [i.name for i in table.list_indices()] == [plan.index_name]
    assert table.index_stats(plan.index_name).distance_type == "l2"


def test_new_rows_are_folded_in_and_a_fourfold_growth_rebuilds(tmp_path, corpus) -> None:
    vectors = corpus[0]
    table = _write(lancedb.connect(str(tmp_path)), "vectors", vectors[:4_000])
    first = ensure_index(table, "cosine", exact_max_rows=1_000)
    table.add(_rows(vectors[4_000:5_000], start=4_000))
    assert ensure_index(table, "cosine", exact_max_rows=1_000) == first
    assert table.index_stats(first.index_name).num_unindexed_rows == 0
    table.add(_rows(vectors[5_000:], start=5_000))
    grown = ensure_index(table, "cosine", exact_max_rows=1_000)
    assert grown.planned_rows == 20_000 and grown.num_partitions > first.num_partitions
    assert [i.name for i in table.list_indices()] == [grown.index_name]
    assert table.index_stats(grown.index_name).num_indexed_rows == 20_000


def test_a_grown_table_is_searched_by_the_plan_its_index_was_built_by(tmp_path, corpus) -> None:
    vectors = corpus[0]
    table = _write(lancedb.connect(str(tmp_path)), "vectors", vectors[:4_000])
    # never indexed: no recorded plan, so search plans from today's rows, as it always did
    assert recorded_plan(table) is None and search_plan(table, "cosine") == plan_index(4_000, DIM)
    built = ensure_index(table, "cosine", exact_max_rows=1_000)
    assert recorded_plan(table) == built and built.index_type == "IVF_PQ"

    table.add(_rows(vectors[4_000:12_000], start=4_000))  # threefold: the index is kept, and its plan
    assert search_plan(table, "cosine") == built
    assert ensure_index(table, "cosine", exact_max_rows=1_000) == built
    today = plan_index(table.count_rows(), DIM, exact_max_rows=1_000)
    assert (built.num_partitions, built.nprobes) == (1, 1) != (today.num_partitions, today.nprobes) == (3, 3)
    assert search_plan(table, "cosine") == built and recorded_plan(table) == built
    # indexed for another metric than the one asked: planned from today's rows
    assert search_plan(table, "l2") == plan_index(12_000, DIM, "l2")


def test_hnsw_plan_reaches_recall_with_l2(tmp_path, corpus) -> None:
    vectors, queries = corpus[0][:5_000], corpus[1]
    table = _write(lancedb.connect(str(tmp_path)), "vectors", vectors)
    plan = ensure_index(table, "l2", exact_max_rows=1_000, index_type="IVF_HNSW_SQ")
    stats = table.index_stats(plan.index_name)
    assert (stats.index_type, stats.distance_type, plan.ef) == ("IVF_HNSW_SQ", "l2", 100)
    squared_l2 = (vectors**2).sum(axis=1)[None, :] - 2 * queries @ vectors.T
    truth = np.argsort(squared_l2, axis=1)[:, :K]
    assert _recall(_search(table, plan, queries), truth) >= 0.9
