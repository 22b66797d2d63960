"""The service's searches: what `Searcher` answers, paged, filtered by zero-shot label, and described for a page.

Scores are the Searcher's own (`SearchHit`): the query-bank normalised `score` and the raw `cosine` of text ->
image and image -> text, cosine otherwise, BM25 or fused ranks for full-text and hybrid. Paging asks the
Searcher for `offset + limit` hits and keeps the last `limit`: its top K is exact for every K, so pages
agree with one long list. A label filter keeps the hits whose image carries the label, asking for
deeper lists until enough are found or the table is exhausted: a prefix of an exact ranking stays exact.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossalign.align.classify import read_labels
from crossalign.search import QueryError, SearchHit
from crossalign.search.rerank import MAX_DEPTH
from crossalign.serve.batching import QUERY_ENCODER
from crossalign.serve.images import ImageNotFound, check_image_id
from crossalign.serve.state import Snapshot
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE
from crossalign.store.schema import ID_COLUMN, TEXT_COLUMN, VECTOR_COLUMN
from crossalign.store.tables import quote
from crossalign.workspace import Workspace

CAPTIONS_PER_IMAGE = 5
TARGETS = (IMAGES_TABLE, CAPTIONS_TABLE)


@dataclass(frozen=True)
class Page:
    """What a search request asks for besides its query."""

    limit: int
    offset: int = 0
    split: str | None = None
    corpus: str | None = None
    label: str | None = None
    captions: bool = False  # attach each image's captions (the web page shows them)


class LabelIndex:
    """The workspace's zero-shot labels (`crossalign classify`), re-read when the file changes."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._stamp: float | None = None
        self.by_id: dict[str, dict[str, Any]] = {}
        self.ids: dict[str, set[str]] = {}
        self.metadata: dict[str, Any] = {}
        self._lock = threading.Lock()

    def refresh(self) -> LabelIndex:
        from crossalign.align.classify import labels_path

        try:
            stamp = labels_path(self.workspace).stat().st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                found = read_labels(self.workspace) if stamp is not None else None
                rows = found[0].to_pylist() if found else []
                self.by_id = {row["image_id"]: {k: row[k] for k in ("label", "score", "top_labels", "top_scores")}
                              for row in rows}
                self.ids = {}
                for image_id, row in self.by_id.items():
                    self.ids.setdefault(row["label"], set()).add(image_id)
                self.metadata, self._stamp = (found[1] if found else {}), stamp
        return self

    def counts(self) -> dict[str, int]:
        return dict(sorted(((label, len(ids)) for label, ids in self.ids.items()), key=lambda kv: -kv[1]))


def text_search(snapshot: Snapshot, labels: LabelIndex, text: str, target: str, mode: str, page: Page) -> list[dict]:
    """Text -> images (normalised), or text -> captions by vector, full text or hybrid."""
    searcher = snapshot.searcher
    if target == IMAGES_TABLE and mode != "vector":
        raise QueryError(f"mode {mode} searches caption text: use it with target captions")
    if mode == "vector":
        vector = QUERY_ENCODER.embed_text(searcher, text)
        return _paged(snapshot, labels, target, page, lambda depth: searcher.search_vector(
            target, vector, depth, page.split, page.corpus, normalise=target == IMAGES_TABLE))
    if not text.strip():
        raise QueryError("the text query is empty")
    with QUERY_ENCODER.lock:  # hybrid embeds the text inside the search
        return _paged(snapshot, labels, target, page,
                      lambda depth: searcher.text_to_text(text, depth, page.split, page.corpus, mode=mode))


def image_search(snapshot: Snapshot, labels: LabelIndex, data: bytes, target: str, page: Page) -> list[dict]:
    """An uploaded image (already checked to be one) -> captions (normalised) or images (cosine)."""
    with QUERY_ENCODER.lock:
        vector = snapshot.searcher.embed_image(io.BytesIO(data))  # PIL opens file objects as it opens paths
    return _paged(snapshot, labels, target, page, lambda depth: snapshot.searcher.search_vector(
        target, vector, depth, page.split, page.corpus, normalise=target == CAPTIONS_TABLE))


def similar_images(snapshot: Snapshot, labels: LabelIndex, image_id: str, page: Page) -> list[dict]:
    """"More like this": the images nearest to a stored image's own vector (itself first)."""
    vector = stored_vector(snapshot, image_id)
    return _paged(snapshot, labels, IMAGES_TABLE, page,
                  lambda depth: snapshot.searcher.search_vector(IMAGES_TABLE, vector, depth, page.split, page.corpus))


def stored_vector(snapshot: Snapshot, image_id: str) -> np.ndarray:
    rows = (snapshot.tables[IMAGES_TABLE].search().where(f"{ID_COLUMN} = {quote(check_image_id(image_id))}")
            .select([VECTOR_COLUMN]).limit(1).to_list())
    if not rows:
        raise ImageNotFound(f"unknown image id {image_id!r}: no such image in the tables")
    return np.asarray(rows[0][VECTOR_COLUMN], dtype=np.float32)


def image_record(snapshot: Snapshot, labels: LabelIndex, image_id: str) -> dict[str, Any]:
    """An image's row (without its vector), captions and label."""
    rows = (snapshot.tables[IMAGES_TABLE].search().where(f"{ID_COLUMN} = {quote(check_image_id(image_id))}")
            .select([ID_COLUMN, "uri", "split", "corpus"]).limit(1).to_list())
    if not rows:
        raise ImageNotFound(f"unknown image id {image_id!r}: no such image in the tables")
    record = _describe(rows[0], labels.refresh())
    record["captions"] = captions_of(snapshot, [image_id]).get(image_id, [])
    return record


def captions_of(snapshot: Snapshot, image_ids: list[str]) -> dict[str, list[str]]:
    """Up to CAPTIONS_PER_IMAGE caption texts of each image (one filtered read of the captions table)."""
    if not image_ids:
        return {}
    listed = ", ".join(quote(i) for i in image_ids)
    rows = (snapshot.tables[CAPTIONS_TABLE].search().where(f"image_id IN ({listed})")
            .select(["image_id", TEXT_COLUMN]).limit(None).to_list())
    grouped: dict[str, list[str]] = {}
    for row in rows:
        texts = grouped.setdefault(row["image_id"], [])
        if len(texts) < CAPTIONS_PER_IMAGE:
            texts.append(row[TEXT_COLUMN])
    return {key: sorted(texts) for key, texts in grouped.items()}


def _paged(snapshot: Snapshot, labels: LabelIndex, target: str, page: Page,
           run: Callable[[int], list[SearchHit]]) -> list[dict]:
    need = page.offset + page.limit
    if page.label is None:
        hits = run(need)[page.offset:]
    else:
        wanted = labels.refresh().ids.get(page.label, set())
        key = (lambda hit: hit.id) if target == IMAGES_TABLE else (lambda hit: hit.image_id)
        depth, rows = max(need * 4, 100), snapshot.rows[target]
        while True:
            found = run(depth)
            hits = [hit for hit in found if key(hit) in wanted]
            if len(hits) >= need or len(found) < depth or depth >= min(rows, MAX_DEPTH):
                break
            depth = min(depth * 4, rows, MAX_DEPTH)
        hits = hits[page.offset:need]
        for rank, hit in enumerate(hits, page.offset + 1):
            hit.rank = rank  # the rank among the images of the label
    index = labels.refresh()
    described = [_describe(hit.to_dict(), index) for hit in hits]
    if page.captions and target == IMAGES_TABLE:
        texts = captions_of(snapshot, [hit["id"] for hit in described])
        for hit in described:
            hit["captions"] = texts.get(hit["id"], [])
    return described


def _describe(row: dict[str, Any], labels: LabelIndex) -> dict[str, Any]:
    """A hit or row as the API shows it: links to its image, and its zero-shot label when there is one."""
    image_id = row.get("image_id") or row["id"]
    row["image"], row["thumbnail"] = f"/images/{image_id}", f"/images/{image_id}/thumbnail"
    if image_id in labels.by_id:
        row["label"] = labels.by_id[image_id]["label"]
        row["label_score"] = round(float(labels.by_id[image_id]["score"]), 4)
    return row
