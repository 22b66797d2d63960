"""Small tables searched exactly in memory: one version's vectors, normalisers and item columns, read once.

For a table of a few tens of thousands of rows (Flickr8k: 7,000 images, 35,000 captions), a LanceDB
query with the normalised re-rank costs 25-35 ms on 2 cores, nearly all of it per-call overhead and
rows turned into Python dicts, while the product of the query with every vector takes well under a
millisecond. A table whose vectors fit in `RESIDENT_MAX_BYTES` is therefore held in memory per table
version (a `Searcher`, and so each snapshot of `crossalign serve`, sees one version) and ranked
exhaustively: the exact cosine order, and the exact normalised order that `NormalisedRanker` certifies
from ANN candidates on large tables. Larger tables go through their vector index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from crossalign.store.schema import CORPUS_COLUMN, NORMALISER_COLUMN, SPLIT_COLUMN, VECTOR_COLUMN

RESIDENT_MAX_BYTES = 256 * 2**20  # float32 vectors of one table (131,072 rows of 512 dimensions)


def fits_in_memory(rows: int, dim: int) -> bool:
    return rows * dim * 4 <= RESIDENT_MAX_BYTES


class ResidentTable:
    """One version of a joint table in memory: `columns` (what a hit shows) and unit-length vectors."""

    def __init__(self, table: Any, columns: list[str]) -> None:
        self.version = table.version
        wanted = [*columns, VECTOR_COLUMN] + ([NORMALISER_COLUMN] if NORMALISER_COLUMN in table.schema.names else [])
        data = table.to_arrow().select(list(dict.fromkeys(wanted)))
        self.items = data.select(columns)
        flat = data.column(VECTOR_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.asarray(flat, dtype=np.float32).reshape(data.num_rows, -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = torch.from_numpy(vectors / np.where(norms > 0, norms, 1.0))  # cosine, as the tables measure it
        self.normalisers = (data.column(NORMALISER_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64)
                            if NORMALISER_COLUMN in data.column_names else None)  # a null is NaN
        self._filters = {name: data.column(name) for name in (SPLIT_COLUMN, CORPUS_COLUMN) if name in data.column_names}

    def top(self, vector: np.ndarray, limit: int, split: str | None, corpus: str | None,
            floor: float | None) -> list[dict[str, Any]]:
        """The `limit` best rows, each a dict of the item columns with its `cosine` and `score`: the cosine, or
        with `floor` given the cosine less the row's normaliser (`floor` where it has none)."""
        norm = float(np.linalg.norm(vector))
        query = torch.from_numpy(np.ascontiguousarray(vector / norm if norm > 0 else vector, dtype=np.float32))
        # torch's product, not numpy's: it shares the encoder's OpenMP threads (which `crossalign serve` keeps
        # passive) instead of starting a BLAS pool of its own that would spin beside them
        cosine = torch.mv(self.vectors, query).numpy()
        score = cosine.astype(np.float64)
        if floor is not None and self.normalisers is not None:
            score = score - np.where(np.isnan(self.normalisers), floor, self.normalisers)
        keep = np.ones(len(score), dtype=bool)
        for name, value in ((SPLIT_COLUMN, split), (CORPUS_COLUMN, corpus)):
            if value:
                column = self._filters.get(name)
                keep &= (np.zeros(len(score), dtype=bool) if column is None else
                         np.asarray(pc.equal(column, value).fill_null(False)))
        candidates = np.flatnonzero(keep)
        k = min(limit, len(candidates))
        if k == 0:
            return []
        best = candidates[np.argpartition(-score[candidates], k - 1)[:k]] if k < len(candidates) else candidates
        best = best[np.lexsort((best, -score[best]))]  # by score, ties by row order
        rows = self.items.take(pa.array(best)).to_pylist()
        for row, index in zip(rows, best.tolist()):
            row["cosine"], row["score"] = float(cosine[index]), float(score[index])
        return rows
