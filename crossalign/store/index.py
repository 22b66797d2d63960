"""Vector index of the joint tables, chosen and tuned by table size.

Measured with `benchmarks/search.py` and parameter sweeps on the same data, on this project's 2-core box
(shared with other jobs, so times vary by about +-30% between runs): 256-d `ClusteredUnitVectors`, 200
held-out queries, recall@10 against the exact top 10.

* Exact search (LanceDB flat scan, p50): 6 ms at 5k rows, 8-10 ms at 10k, 16 ms at 20k, 72 ms at 50k,
  166 ms at 100k, 0.5 s at 1M. Hence `EXACT_SEARCH_MAX_ROWS` = 10,000: the largest size under ~10 ms.
* IVF_PQ at 1M (244 partitions, 32 sub-vectors): build 2-4 min. LanceDB's default query (nprobes 20, no
  refine) has recall 0.50-0.53. With nprobes 20: refine 10 -> 0.965, refine 15 -> 0.978, refine 20 ->
  0.981-0.988, p50 7.5-8.7 ms; nprobes 30 + refine 20 -> 0.989 at +1 ms; nprobes 30 + refine 5 -> 0.93.
  Both knobs matter; refine is the cheaper one. 16 sub-vectors build ~40% faster but need refine 30-40 and end up
  slower for the same recall.
* IVF_HNSW_SQ at 1M (one partition): build 26 min (14 CPU-min). Default query (ef 15) 0.91 at 2.1 ms; ef 100 + refine 4
  -> 1.000 at p50 3.2 ms.

IVF_PQ is the default: it meets recall@10 >= 0.95 at p50 <= 10 ms with margin and builds ~10x faster on
this machine, which matters because the index is rebuilt whenever a table grows fourfold. IVF_HNSW_SQ
(`index_type="IVF_HNSW_SQ"`) suits large read-heavy tables that can afford its build.

Plan rules (measured at 30k, 200k and 1M rows; beyond that they are extrapolated):

* IVF_PQ: one partition per 4,096 rows; sub-vectors of the smallest length >= 8 dividing dim (dim / 8 for
  256), >= 16 above 256 dims (`_num_sub_vectors`: half the build time at 1024-d, same recall);
  nprobes 8% of the partitions, at least 20; refine_factor 20.
* IVF_HNSW_SQ: one partition per 1,048,576 rows (LanceDB's default), all probed; ef 100; refine_factor 4.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from lancedb.index import HnswSq, IvfPq

from crossalign.store.schema import DEFAULT_METRIC, METRICS, VECTOR_COLUMN

logger = logging.getLogger(__name__)

INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")
EXACT_SEARCH_MAX_ROWS = 10_000
HNSW_PARTITION_ROWS = 1_048_576
PQ_PARTITION_ROWS = 4_096
REBUILD_GROWTH = 4
# `optimize` also deletes table versions older than its `cleanup_older_than` (default 7 days), and fails on
# tagged ones: a century keeps every mapper's tagged version until `crossalign tables cleanup`.
KEEP_VERSIONS = timedelta(days=36_500)
_INDEX_NAME = re.compile(rf"{VECTOR_COLUMN}_[a-z_]+_(?P<rows>\d+)rows")
# Metadata of the vector field: the plan (JSON) `ensure_index` indexed the table by, which search reads back.
PLAN_KEY = "crossalign:index_plan"


@dataclass(frozen=True)
class IndexPlan:
    """How a table's vector column is searched: exactly (`index_type` None) or through a tuned ANN index.

    `num_sub_vectors` is for IVF_PQ and `ef` for IVF_HNSW_SQ (0 otherwise); `planned_rows` is the table size
    the plan was made for.
    """

    index_type: str | None
    num_partitions: int
    num_sub_vectors: int
    nprobes: int
    refine_factor: int
    ef: int
    metric: str
    planned_rows: int

    @property
    def index_name(self) -> str:
        """The index's name; it records `planned_rows`, from which `plan_index` rebuilds the rest."""
        return f"{VECTOR_COLUMN}_{str(self.index_type).lower()}_{self.planned_rows}rows"

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (for logs and summaries)."""
        return asdict(self)


def plan_index(
    n_rows: int, dim: int, metric: str = DEFAULT_METRIC, exact_max_rows: int = EXACT_SEARCH_MAX_ROWS,
    index_type: str = INDEX_TYPES[0],
) -> IndexPlan:
    """The index for `n_rows` vectors of `dim` dimensions (a pure function of its arguments).

    Raises:
        ValueError: an unknown metric or index type.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("index type", index_type, INDEX_TYPES)
    if n_rows <= exact_max_rows:
        return IndexPlan(None, 0, 0, 0, 0, 0, metric, n_rows)
    if index_type == "IVF_PQ":
        partitions = max(1, round(n_rows / PQ_PARTITION_ROWS))
        nprobes = min(partitions, max(20, round(0.08 * partitions)))
        return IndexPlan(index_type, partitions, _num_sub_vectors(dim), nprobes, 20, 0, metric, n_rows)
    partitions = -(-n_rows // HNSW_PARTITION_ROWS)
    return IndexPlan(index_type, partitions, 0, partitions, 4, 100, metric, n_rows)


def _num_sub_vectors(dim: int) -> int:
    """PQ sub-vectors: of the shortest length >= 8 dividing dim up to 256 dims, >= 16 above.

    At 1M x 256-d, length 16 needed refine 30-40 for the recall of length 8 (module docstring). On the
    1024-d joint vectors of Flickr8k's 35k captions (refine 20), 64 sub-vectors of 16 built in 58 s
    against 113 s for 128 of 8, at the same recall@10 (0.997); 32 of 32 dropped to 0.991.
    """
    shortest = 8 if dim <= 256 else 16
    length = next((d for d in range(shortest, dim + 1) if dim % d == 0), dim)
    return dim // length


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")


def ensure_index(
    table: Any, metric: str = DEFAULT_METRIC, exact_max_rows: int = EXACT_SEARCH_MAX_ROWS,
    index_type: str = INDEX_TYPES[0],
) -> IndexPlan:
    """Give `table`'s vector column the index `plan_index` asks for; return the plan to query it with, which is
    also recorded in the table (`recorded_plan`) for search to read.

    Below `exact_max_rows` rows nothing is created. A vector index built by an earlier call is kept when it
    has the planned type and metric and was planned for at least 1/`REBUILD_GROWTH` of today's rows, and the
    plan it was built by is returned. Any other vector index is dropped and the planned one built, blocking
    until it is ready. Either way the table is first compacted by `table.optimize()` (which also adds rows
    written since to a kept index): refine reads rows by id, and that is markedly slower across the many
    small fragments that batched upserts leave.

    Raises:
        ValueError: an unknown metric or index type.
    """
    n_rows = table.count_rows()
    dim = table.schema.field(VECTOR_COLUMN).type.list_size
    plan = plan_index(n_rows, dim, metric, exact_max_rows, index_type)
    if plan.index_type is None:
        _record(table, plan)
        return plan
    existing = _existing_plans(table, dim, metric, exact_max_rows, index_type)
    kept = next((name for name, built in existing.items()
                 if built is not None and built.planned_rows * REBUILD_GROWTH >= n_rows), None)
    for name in existing.keys() - {kept}:
        logger.info("dropping vector index %s: the plan is %s", name, plan.describe())
        table.drop_index(name)
    table.optimize(cleanup_older_than=KEEP_VERSIONS)
    if kept is not None:
        plan = existing[kept]
    else:
        _build(table, plan)
    _record(table, plan)
    return plan


def _existing_plans(
    table: Any, dim: int, metric: str, exact_max_rows: int, index_type: str,
) -> dict[str, IndexPlan | None]:
    """Indices on the vector column, each with its plan if it is one `plan_index` would make today, else None."""
    plans: dict[str, IndexPlan | None] = {}
    for config in table.list_indices():
        if list(config.columns) != [VECTOR_COLUMN]:
            continue
        match = _INDEX_NAME.fullmatch(config.name)
        stats = table.index_stats(config.name)
        built = plan_index(int(match["rows"]), dim, metric, exact_max_rows, index_type) if match else None
        same = built is not None and stats is not None and (stats.index_type, stats.distance_type) == (
            built.index_type, metric)
        plans[config.name] = built if same else None
    return plans


def _build(table: Any, plan: IndexPlan) -> None:
    if plan.index_type == "IVF_PQ":
        config: Any = IvfPq(distance_type=plan.metric, num_partitions=plan.num_partitions,
                            num_sub_vectors=plan.num_sub_vectors)
    else:
        config = HnswSq(distance_type=plan.metric, num_partitions=plan.num_partitions)
    logger.info("building vector index %s: %s", plan.index_name, plan.describe())
    table.create_index(VECTOR_COLUMN, config=config, name=plan.index_name, replace=True)
    table.wait_for_index([plan.index_name])


def _record(table: Any, plan: IndexPlan) -> None:
    if recorded_plan(table) != plan:  # no new table version when nothing changed
        table.update_field_metadata({"path": VECTOR_COLUMN,
                                     "metadata": {PLAN_KEY: json.dumps(plan.describe(), sort_keys=True)}})


def recorded_plan(table: Any) -> IndexPlan | None:
    """The plan `ensure_index` last indexed `table` by, or None for a table it never indexed (or indexed before
    plans were recorded)."""
    raw = (table.schema.field(VECTOR_COLUMN).metadata or {}).get(PLAN_KEY.encode())
    return IndexPlan(**json.loads(raw)) if raw else None


def search_plan(table: Any, metric: str) -> IndexPlan:
    """The plan to search `table` by under `metric`: the one its index was built by (`recorded_plan`), even when
    the table has grown since; for a table without one, or indexed for another metric, `plan_index` of its rows.
    """
    recorded = recorded_plan(table)
    if recorded is not None and recorded.metric == metric:
        return recorded
    return plan_index(table.count_rows(), table.schema.field(VECTOR_COLUMN).type.list_size, metric)


def apply_plan(query: Any, plan: IndexPlan) -> Any:
    """`query` (a LanceDB vector query builder) set up to search as `plan` says: exactly, or tuned."""
    query = query.distance_type(plan.metric)
    if plan.index_type is None:
        return query.bypass_vector_index()
    query = query.nprobes(plan.nprobes).refine_factor(plan.refine_factor)
    return query.ef(plan.ef) if plan.ef else query


@dataclass(frozen=True)
class ClusteredUnitVectors:
    """Synthetic joint embeddings: unit vectors around related cluster centres.

    Centres lie near a low-rank subspace (so clusters are related), cluster sizes vary, and each point is
    normalize(centre + noise), the noise having a decaying spectrum in a random basis (as real embedding
    noise does) and a per-cluster scale that puts a point's cosine to its centre between 0.6 and 0.85.
    """

    centres: np.ndarray
    noise_scale: np.ndarray
    noise_basis: np.ndarray
    weights: np.ndarray

    @classmethod
    def make(cls, dim: int, seed: int = 0, n_clusters: int = 2048, rank: int = 32) -> ClusteredUnitVectors:
        """A distribution over `dim`-d unit vectors with `n_clusters` clusters, fixed by `seed`."""
        rng = np.random.default_rng(seed)
        rank = min(rank, dim)
        subspace = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
        centres = rng.standard_normal((n_clusters, rank)) @ subspace / np.sqrt(rank)
        centres += 0.5 * rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)
        cosine = rng.uniform(0.6, 0.85, n_clusters)
        spectrum = 1.0 / np.arange(1, dim + 1)
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].T * np.sqrt(spectrum / spectrum.sum())[:, None]
        weights = rng.lognormal(0.0, 1.0, n_clusters)
        return cls(
            centres=_normalize(centres).astype(np.float32),
            noise_scale=np.sqrt(1.0 / cosine**2 - 1.0).astype(np.float32),
            noise_basis=basis.astype(np.float32),
            weights=weights / weights.sum(),
        )

    def sample(self, n: int, seed: int) -> np.ndarray:
        """`n` float32 unit vectors drawn with `seed` (different seeds give disjoint draws)."""
        rng = np.random.default_rng(seed)
        cluster = rng.choice(len(self.weights), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.noise_basis.shape[0]), dtype=np.float32) @ self.noise_basis
        return _normalize(self.centres[cluster] + noise * self.noise_scale[cluster, None])


def _normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


