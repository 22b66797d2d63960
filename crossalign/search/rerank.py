"""Search by query-bank normalised score: ANN candidates in cosine order, re-ranked by `cosine - qb_norm`.

The vector index ranks by cosine; the normalised score subtracts each row's stored normaliser
(`crossalign/align/querybank.py`). A row the index did not return among the first `depth` candidates
has a cosine of at most the `depth`-th candidate's and a normaliser of at least the table's smallest,
so its score is at most `cosine[depth] - min(qb_norm)`. Once the `limit`-th best re-ranked candidate
scores at least that bound, no row outside the candidates can enter the top `limit`: the result is
that of exhaustive normalised search (as far as the index returns the true cosine order). Otherwise
the depth grows until `MAX_DEPTH`.

The dynamic variant (QB-Norm) normalises a query only when its raw nearest row is a hub: the nearest
row of some bank query among the table's rows. Which rows are hubs depends on the whole table, so it
is not stored: the ranker finds them by one pass over the table's vectors per table version, when a
dynamic search first needs them (about B x N x d multiply-adds for a bank of B and a table of N rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc
import torch

from crossalign.align.querybank import bank_top, check_method
from crossalign.store.schema import ID_COLUMN, NORMALISER_COLUMN, VECTOR_COLUMN

logger = logging.getLogger(__name__)

FIRST_DEPTH = 100
MAX_DEPTH = 10_000
GROWTH = 4

Candidates = Callable[[int, list[str]], list[dict[str, Any]]]


class NormalisedRanker:
    """Ranks one table's rows for a query by the normalised score of `method` ("inverted_softmax" or
    "dynamic"; the latter needs `bank`, the queries of the other modality).

    `rank` takes a function returning the first `depth` candidates in cosine order, each a row dict
    with its `id`, its raw `cosine` and the extra columns asked for.
    """

    def __init__(self, table: Any, method: str, bank: torch.Tensor | None = None, first_depth: int = FIRST_DEPTH,
                 max_depth: int = MAX_DEPTH) -> None:
        if check_method(method) == "none":
            raise ValueError("NormalisedRanker needs a normalisation, not 'none'")
        if method == "dynamic" and bank is None:
            raise ValueError("the dynamic normalisation needs the query bank")
        self.table, self.method, self.bank = table, method, bank
        self.first_depth, self.max_depth = first_depth, max_depth
        self._floor: tuple[int, float] | None = None  # (table version, smallest normaliser)
        self._hubs: tuple[int, set[str]] | None = None  # (table version, ids of the hub rows)

    def hubs(self) -> set[str]:
        """Ids of the rows that are the nearest row of some bank query (once per table version)."""
        version = self.table.version
        if self._hubs is None or self._hubs[0] != version:
            ids: list[str] = []

            def vectors():
                for batch in self.table.search().select([ID_COLUMN, VECTOR_COLUMN]).limit(None).to_batches():
                    ids.extend(batch.column(ID_COLUMN).to_pylist())
                    flat = batch.column(VECTOR_COLUMN).flatten().to_numpy(zero_copy_only=False)
                    yield torch.from_numpy(flat.reshape(batch.num_rows, -1).copy())

            _, top = bank_top(vectors(), self.bank, k=1)
            self._hubs = (version, {ids[i] for i in top.flatten().tolist() if i >= 0})
            logger.info("dynamic normalisation: %d hub rows among %d", len(self._hubs[1]), len(ids))
        return self._hubs[1]

    def floor(self) -> float:
        """The smallest normaliser in the table (read once per table version)."""
        version = self.table.version
        if self._floor is None or self._floor[0] != version:
            column = self.table.search().select([NORMALISER_COLUMN]).limit(None).to_arrow().column(NORMALISER_COLUMN)
            smallest = pc.min(column).as_py()
            self._floor = (version, 0.0 if smallest is None else float(smallest))
        return self._floor[1]

    def rank(self, candidates: Candidates, limit: int) -> list[dict[str, Any]]:
        """The `limit` best rows by normalised score, each with `score` and `cosine` (rounded to 4 places)."""
        depth, floor = max(self.first_depth, limit), self.floor()
        if self.method == "dynamic":
            nearest = candidates(1, [])
            if not nearest or nearest[0][ID_COLUMN] not in self.hubs():  # not a hub query: raw cosine order
                rows = candidates(limit, [])
                for row in rows:
                    row["score"] = row["cosine"] = round(row["cosine"], 4)
                return rows
        while True:
            rows = candidates(depth, [NORMALISER_COLUMN])
            for row in rows:
                normaliser = row.pop(NORMALISER_COLUMN)
                row["score"] = row["cosine"] - (normaliser if normaliser is not None else floor)
            ranked = sorted(rows, key=lambda row: -row["score"])
            exhausted = len(rows) < depth  # every row that passes the filters is a candidate
            certified = len(ranked) >= limit and ranked[limit - 1]["score"] >= rows[-1]["cosine"] - floor
            if exhausted or certified or depth >= self.max_depth:
                break
            depth = min(depth * GROWTH, self.max_depth)
        if not (exhausted or certified):
            logger.debug("normalised top %d not certified at the largest depth (%d candidates)", limit, depth)
        for row in ranked[:limit]:
            row["cosine"] = round(row["cosine"], 4)
        return ranked[:limit]
