"""Search the joint tables: text or image queries against images or captions, embedded exactly as the
tables were built (mapper and encoders read from the table metadata)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from crossalign.align.mapper import check_encoder
from crossalign.align.mapper_dir import MapperDir
from crossalign.align.querybank import check_method
from crossalign.config import ExtractConfig, QueryBankConfig
from crossalign.encoders import ImageEncoder, TextEncoder, load_query_encoder
from crossalign.search.rerank import NormalisedRanker
from crossalign.search.resident import ResidentTable, fits_in_memory
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE, StoreMismatchError, connect, open_table, table_metadata
from crossalign.store.index import apply_plan, search_plan
from crossalign.store.schema import CORPUS_COLUMN, NORMALISER_COLUMN, SPLIT_COLUMN, item_columns
from crossalign.store.tables import quote
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)
_E = ExtractConfig()  # the query encoders' runtime defaults, read from the config

Mode = Literal["vector", "fts", "hybrid"]
MODES = ("vector", "fts", "hybrid")
COLUMNS = {name: item_columns(name) for name in (IMAGES_TABLE, CAPTIONS_TABLE)}


class QueryError(ValueError):
    """A query that cannot be run (an unreadable image, an empty text, a mode the table cannot serve)."""


@dataclass
class SearchHit:
    """One result: rank (1-based), score and what was found.

    The score is what the hits are ranked by: for a cross-modal vector search with query-bank
    normalisation, the cosine similarity less the row's normaliser (`cosine` then holds the raw cosine);
    for other vector searches the cosine similarity (the vectors are unit length, so every metric ranks
    alike); BM25 for full-text search and the reciprocal-rank-fusion score for hybrid search.
    """

    rank: int
    score: float
    id: str
    cosine: float | None = None  # the raw cosine similarity, when `score` is normalised
    uri: str | None = None  # for images
    text: str | None = None  # for captions
    image_id: str | None = None
    split: str | None = None
    corpus: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Searcher:
    """Embeds queries exactly as the tables were built, and searches them.

    `mapper_id` picks an older mapper whose tagged vectors the tables still hold (default: the
    current one). Encoders load lazily: a text-only session never loads the image encoder.
    `normalisation` scores cross-modal searches (text -> image, image -> text) against the mapper's
    query bank: "inverted_softmax" (the default), "dynamic" or "none" (raw cosine). Tables built before
    normalisers were stored, or by a mapper without a bank, search raw; `notice` then says so in one line.
    Same-modality searches (image -> image, text -> text) are always raw cosine. Each table is searched by
    the plan its vector index was built by (`index_plans`, read from the table), however much it grew since.

    Raises:
        WorkspaceError: no tables, or the mapper that built them is gone from the workspace.
        StoreMismatchError: the tables hold no vectors of `mapper_id`, or the two tables (or the
            mapper on disk) disagree about the mapper and encoders.
        ValueError: an unknown normalisation.
    """

    def __init__(self, workspace: Workspace | Path | str, mapper_id: str | None = None,
                 device: str = _E.device, precision: str = _E.precision, normalisation: str | None = None) -> None:
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
        requested = check_method(normalisation or QueryBankConfig().method)
        db = connect(self.workspace)
        self._tables = {name: open_table(db, name, mapper_id) for name in (IMAGES_TABLE, CAPTIONS_TABLE)}
        self.metadata = table_metadata(self._tables[IMAGES_TABLE].schema)
        if table_metadata(self._tables[CAPTIONS_TABLE].schema).get("mapper_id") != self.metadata.get("mapper_id"):
            raise StoreMismatchError(
                "the images and captions tables were built by different mappers: run `crossalign embed` again"
            )
        mapper_dir = MapperDir.of(self.workspace, self.metadata["mapper_id"])
        if not mapper_dir.exists():
            raise WorkspaceError(
                f"the tables were built by mapper {mapper_dir.id}, which is not in {mapper_dir.path.parent}"
            )
        self.mapper, self.mapper_config = mapper_dir.load()
        for modality in ("image", "text"):
            if self.mapper_config[f"{modality}_encoder"] != self.metadata[f"{modality}_encoder"]:
                raise StoreMismatchError(
                    f"mapper {self.metadata['mapper_id']} on disk expects {modality} features of "
                    f"{self.mapper_config[f'{modality}_encoder']['encoder']}, but the tables name "
                    f"{self.metadata[f'{modality}_encoder']['encoder']}"
                )
        self.metric = self.metadata.get("metric", "cosine")
        # the plans the tables' indexes were built by, read once, not per query
        self.index_plans = {name: search_plan(table, self.metric) for name, table in self._tables.items()}
        self.normalisation, self.notice = self._normalisation(requested, mapper_dir)
        self._rankers = {}
        if self.normalisation != "none":
            bank = mapper_dir.querybank(self.mapper_config)
            self._rankers = {name: NormalisedRanker(table, self.normalisation,
                                                    bank.queries_for("image" if name == IMAGES_TABLE else "text")[0])
                             for name, table in self._tables.items()}
        self._device, self._precision = device, precision
        self._encoders: dict[str, ImageEncoder | TextEncoder] = {}
        self._resident: dict[str, ResidentTable | None] = {}  # per table: held in memory when small (per version)

    def _normalisation(self, requested: str, mapper_dir: MapperDir) -> tuple[str, str | None]:
        """The normalisation searches use, and a one-line notice when it is not the one requested."""
        if requested == "none":
            return "none", None
        if mapper_dir.querybank(self.mapper_config) is None:
            return "none", (f"mapper {self.metadata['mapper_id']} has no query bank (trained before banks were "
                            "saved): scores are raw cosine; train a new mapper to normalise them")
        if not all(NORMALISER_COLUMN in table.schema.names for table in self._tables.values()):
            return "none", (f"the tables have no {NORMALISER_COLUMN} column (built before normalisers were "
                            "stored): scores are raw cosine; `crossalign embed` with a new mapper adds it")
        return requested, None

    def _encoder(self, modality: str) -> ImageEncoder | TextEncoder:
        if modality not in self._encoders:
            expected = self.mapper_config[f"{modality}_encoder"]
            encoder = load_query_encoder(expected["encoder"], self._device, self._precision)
            check_encoder(self.mapper_config, modality, encoder.describe())
            self._encoders[modality] = encoder
        return self._encoders[modality]

    def compile_queries(self, autotune: bool = True) -> bool:
        """Compile the text query encoder for the queries after this call (`HFTextEncoder.compile_queries`):
        worth it for a process that answers many queries, as `crossalign serve` does. False where the encoder
        has no compiled form.

        Raises:
            whatever Inductor raises; the eager encoder stays in place.
        """
        return self._encoder("text").compile_queries(autotune)

    @property
    def queries_compiled(self) -> bool:
        """Whether text queries run through a compiled encoder (`compile_queries`)."""
        return self._encoder("text").queries_compiled

    def embed_text(self, text: str) -> np.ndarray:
        """The joint vector of a text query."""
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """The joint vectors of text queries, one row each, encoded in one call (`crossalign serve` batches the
        queries of concurrent requests: `crossalign.serve.batching`).

        Raises:
            QueryError: a query is empty.
        """
        if any(not text.strip() for text in texts):
            raise QueryError("the text query is empty")
        with torch.no_grad():
            return self.mapper.encode_text(self._encoder("text").encode(texts)).numpy().astype(np.float32)

    def embed_image(self, path: Path | str) -> np.ndarray:
        """The joint vector of an image file.

        Raises:
            QueryError: the file is missing or not a readable image.
        """
        encoder = self._encoder("image")
        try:
            with Image.open(path) as img:
                features = encoder.encode_images([img])
        except (FileNotFoundError, IsADirectoryError):
            raise QueryError(f"query image {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise QueryError(f"query image {path} cannot be read as an image: {err}") from None
        return _joint(self.mapper.encode_image, features)

    def text_to_image(self, text: str, limit: int = 5, split: str | None = None,
                      corpus: str | None = None) -> list[SearchHit]:
        """The `limit` images that best match a text query (normalised scores: see the class)."""
        return self.search_vector(IMAGES_TABLE, self.embed_text(text), limit, split, corpus, normalise=True)

    def image_to_text(self, path: Path | str, limit: int = 5, split: str | None = None,
                      corpus: str | None = None) -> list[SearchHit]:
        """The `limit` captions that best match an image file (normalised scores: see the class)."""
        return self.search_vector(CAPTIONS_TABLE, self.embed_image(path), limit, split, corpus, normalise=True)

    def image_to_image(self, path: Path | str, limit: int = 5, split: str | None = None,
                       corpus: str | None = None) -> list[SearchHit]:
        """The `limit` images nearest to an image file (the file itself first, if it is in the table)."""
        return self.search_vector(IMAGES_TABLE, self.embed_image(path), limit, split, corpus)

    def text_to_text(self, text: str, limit: int = 5, split: str | None = None, corpus: str | None = None,
                     mode: Mode = "vector") -> list[SearchHit]:
        """The `limit` captions nearest to a text query: by joint vector, by full text (BM25), or both
        fused by reciprocal rank (`hybrid`)."""
        if mode not in MODES:
            raise QueryError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "vector":
            return self.search_vector(CAPTIONS_TABLE, self.embed_text(text), limit, split, corpus)
        if not text.strip():
            raise QueryError("the text query is empty")
        table = self._tables[CAPTIONS_TABLE]
        if mode == "fts":
            query = table.search(text, query_type="fts").select([*COLUMNS[CAPTIONS_TABLE], "_score"])
            score = "_score"
        else:  # the fused score column cannot be selected: LanceDB adds it after the two searches
            query = table.search(query_type="hybrid").vector(self.embed_text(text)).text(text)
            query, score = query.select(COLUMNS[CAPTIONS_TABLE]), "_relevance_score"
        rows = _filtered(query, split, corpus).limit(limit).to_list()
        return _hits([{k: v for k, v in row.items() if k in (*COLUMNS[CAPTIONS_TABLE], score)} for row in rows],
                     lambda row: row.pop(score))

    def search_vector(self, table: str, vector: np.ndarray, limit: int = 5, split: str | None = None,
                      corpus: str | None = None, normalise: bool = False) -> list[SearchHit]:
        """The `limit` rows of `table` nearest to a joint vector, through the table's tuned ANN index.

        `normalise=True` (for a query of the other modality) ranks by the query-bank normalised score
        when the searcher normalises (`normalisation`), re-ranking ANN candidates (`NormalisedRanker`).

        Raises:
            StoreMismatchError: `vector` has another dimension than the table's vectors.
        """
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.metadata["dim"]:
            raise StoreMismatchError(f"table {table} holds {self.metadata['dim']}-d vectors; "
                                     f"the query vector has {vector.shape[0]}")

        def candidates(depth: int, extra: list[str]) -> list[dict[str, Any]]:
            query = apply_plan(_filtered(self._tables[table].search(vector), split, corpus), self.index_plans[table])
            rows = query.select([*COLUMNS[table], *extra, "_distance"]).limit(depth).to_list()
            for row in rows:
                row["cosine"] = _similarity(row.pop("_distance"), self.metric)
            return rows

        ranker = self._rankers.get(table) if normalise else None
        resident = self._resident_table(table)
        if resident is not None and (ranker is None or ranker.method != "dynamic"):
            rows = resident.top(vector, limit, split, corpus, ranker.floor() if ranker else None)
            for row in rows:
                if ranker is None:
                    del row["cosine"]
                else:
                    row["cosine"] = round(row["cosine"], 4)
            return _hits(rows, lambda row: row.pop("score"))
        if ranker is not None:
            return _hits(ranker.rank(candidates, limit), lambda row: row.pop("score"))
        return _hits(candidates(limit, []), lambda row: row.pop("cosine"))

    def _resident_table(self, name: str) -> ResidentTable | None:
        """Table `name` held in memory for exact search when its vectors are small (`crossalign.search.resident`),
        read once per table version; None for a large table."""
        table = self._tables[name]
        held = self._resident.get(name)
        if name in self._resident and (held is None or held.version == table.version):
            return held
        small = fits_in_memory(table.count_rows(), int(self.metadata["dim"]))
        self._resident[name] = ResidentTable(table, COLUMNS[name]) if small else None
        return self._resident[name]


def _filtered(query: Any, split: str | None, corpus: str | None) -> Any:
    filters = ((SPLIT_COLUMN, split), (CORPUS_COLUMN, corpus))
    clauses = [f"{column} = {quote(value)}" for column, value in filters if value]
    return query.where(" AND ".join(clauses), prefilter=True) if clauses else query


def _similarity(distance: float, metric: str) -> float:
    """Cosine similarity of unit vectors from LanceDB's distance (l2 is the squared distance)."""
    return 1.0 - distance / 2.0 if metric == "l2" else 1.0 - distance


def _hits(rows: list[dict[str, Any]], score: Any) -> list[SearchHit]:
    return [SearchHit(rank=i, score=round(float(score(row)), 4), **row) for i, row in enumerate(rows, 1)]


def _joint(project: Any, features: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return project(features)[0].numpy().astype(np.float32)


def search_text(workspace: Workspace | Path | str, text: str, limit: int = 5) -> list[SearchHit]:
    """One-shot text -> image search (loads the mapper and text encoder each call)."""
    return Searcher(workspace).text_to_image(text, limit)
