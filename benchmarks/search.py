"""Vector search on a LanceDB table of synthetic joint embeddings: index build time, recall@10 and latency.

    python benchmarks/search.py [--rows 1000000] [--dim 256] [--queries 200] [--workdir DIR] [--keep]
                                [--index-type IVF_PQ|IVF_HNSW_SQ] [--metric cosine|l2|dot]

Writes `--rows` unit vectors drawn from `ClusteredUnitVectors` (clusters of related centres, a point's
cosine to its centre 0.6-0.85; generated in chunks, seeded) to a table with columns id and vector, then
builds the index `ensure_index` plans for that size. The ground truth is the exact top 10 of each query
(held-out draws from the same distribution, not table rows), computed with numpy chunk by chunk while the
table is written. It prints the plan and, per way of searching, recall@10 against that ground truth and
p50/p95 latency of one query end to end (builder, search, Arrow result; a few warm-up queries are not
counted): exact search (LanceDB flat scan, index bypassed; `--exact-queries` of them, it is slow), the
tuned plan, and the index with LanceDB's default query settings (no refine). Build time is wall and CPU
seconds of `ensure_index`, which compacts the table first. The last line is machine-readable and describes
the tuned plan. At 1M x 256 this takes about 4 minutes and 2 GB of memory.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from crossalign.store.index import INDEX_TYPES, METRICS, ClusteredUnitVectors, apply_plan, ensure_index

CHUNK_ROWS = 100_000
WARMUP_QUERIES = 5
K = 10


def vector_chunks(model: ClusteredUnitVectors, rows: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors) in chunks of CHUNK_ROWS; the same for any caller with the same seed."""
    for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
        yield start, model.sample(min(CHUNK_ROWS, rows - start), seed=seed * 1_000_003 + chunk + 1)


def to_batch(start: int, vectors: np.ndarray) -> pa.RecordBatch:
    """A record batch of the benchmark schema: ids `v<row>` and the vectors."""
    ids = pa.array([f"v{row}" for row in range(start, start + len(vectors))], pa.string())
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    return pa.RecordBatch.from_arrays([ids, column], names=["id", "vector"])


def merge_top_k(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """The running exact top K (scores, rows) of each query, updated with one chunk's scores."""
    part = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    all_scores = np.concatenate([best[0], np.take_along_axis(scores, part, axis=1)], axis=1)
    all_rows = np.concatenate([best[1], part + start], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


def write_table(db: lancedb.DBConnection, model: ClusteredUnitVectors, rows: int, seed: int,
                queries: np.ndarray) -> tuple[object, float, list[set[str]]]:
    """Write the table; return it, the seconds spent in LanceDB writes, and each query's exact top-K ids."""
    best = (np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64))
    table, write_s = None, 0.0
    for start, vectors in vector_chunks(model, rows, seed):
        best = merge_top_k(best, queries @ vectors.T, start)
        batch = to_batch(start, vectors)
        began = time.perf_counter()
        if table is None:
            table = db.create_table("vectors", pa.Table.from_batches([batch]), mode="overwrite")
        else:
            table.add(pa.Table.from_batches([batch]))
        write_s += time.perf_counter() - began
    return table, write_s, [{f"v{row}" for row in top} for top in best[1]]


def measure(search: Callable[[np.ndarray], pa.Table], queries: np.ndarray,
            truth: list[set[str]]) -> tuple[float, float, float]:
    """(recall@K, p50 ms, p95 ms) of `search` over `queries`, after a few uncounted warm-up queries."""
    for vector in queries[:WARMUP_QUERIES]:
        search(vector)
    latencies, hits = [], 0
    for vector, expected in zip(queries, truth):
        began = time.perf_counter()
        result = search(vector)
        latencies.append((time.perf_counter() - began) * 1000)
        hits += len(expected & set(result.column("id").to_pylist()))
    return hits / (K * len(queries)), float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))


def run(rows: int, dim: int, n_queries: int, exact_queries: int, workdir: Path, metric: str, index_type: str,
        seed: int) -> None:
    """Write the table, build its index and print the figures (the last line machine-readable)."""
    model = ClusteredUnitVectors.make(dim, seed=seed)
    queries = model.sample(n_queries, seed=seed * 1_000_003)
    db = lancedb.connect(str(workdir))
    table, write_s, truth = write_table(db, model, rows, seed, queries)
    began, began_cpu = time.perf_counter(), time.process_time()
    plan = ensure_index(table, metric, index_type=index_type)
    build_s, build_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu

    def base(vector: np.ndarray):  # noqa: ANN202 - a LanceDB query builder
        return table.search(vector).limit(K).select(["id", "_distance"])

    searches = {
        "exact (index bypassed)": (lambda v: base(v).distance_type(metric).bypass_vector_index().to_arrow(),
                                   exact_queries),
        "tuned plan": (lambda v: apply_plan(base(v), plan).to_arrow(), n_queries),
    }
    if plan.index_type is not None:
        searches["index, LanceDB defaults"] = (lambda v: base(v).distance_type(metric).to_arrow(), n_queries)
    print(f"rows                {rows}")
    print(f"dim                 {dim}")
    print(f"metric              {metric}")
    print(f"table write s       {write_s:.1f}")
    print(f"index build s       {build_s:.1f} (CPU {build_cpu_s:.1f} s)")
    print(f"plan                {plan.describe()}")
    print(f"\n{'search':<26}{'queries':>8}{'recall@10':>11}{'p50 ms':>9}{'p95 ms':>9}")
    results = {}
    for name, (search, count) in searches.items():
        results[name] = measure(search, queries[:count], truth[:count])
        recall, p50, p95 = results[name]
        print(f"{name:<26}{count:>8}{recall:>11.3f}{p50:>9.2f}{p95:>9.2f}", flush=True)
    recall, p50, p95 = results["tuned plan"]
    print(f"recall_at_10={recall:.4f} p50_ms={p50:.2f} p95_ms={p95:.2f} build_s={build_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=30, help="queries timed for exact search (slow)")
    parser.add_argument("--metric", default="cosine", choices=METRICS)
    parser.add_argument("--index-type", default=INDEX_TYPES[0], choices=INDEX_TYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the table goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the table")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crossalign-search-", dir=tempfile.gettempdir()))
    try:
        run(args.rows, args.dim, args.queries, min(args.exact_queries, args.queries), workdir, args.metric,
            args.index_type, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
