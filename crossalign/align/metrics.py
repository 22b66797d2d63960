"""Retrieval evaluation by the standard Flickr "1K test" protocol: one implementation for all callers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from crossalign.align.querybank import GalleryNorm, PairKeys, QueryBank
from crossalign.align.rows import MemoryRows, Rows

RECALL_KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_{m}" for d in ("t2i", "i2t") for m in ("r1", "r5", "r10", "medr")) + ("rsum",)


GALLERY_ROWS = 8192  # gallery rows per similarity block: a (4096, 8192) fp32 block is 128 MB


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor | Rows, text_emb: torch.Tensor | Rows, caption_image: torch.Tensor | np.ndarray,
    chunk: int = 4096, image_norm: GalleryNorm | None = None, text_norm: GalleryNorm | None = None,
    gallery_chunk: int = GALLERY_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the right answers, both directions, in blocks of `chunk` queries x `gallery_chunk`
    gallery rows: memory holds one block of similarities, never the (N_captions, N_images) matrix.

    Args:
        image_emb: (N_images, d) L2-normalised (a tensor, or `Rows` read block by block).
        text_emb: (N_captions, d) L2-normalised.
        caption_image: (N_captions,) index into `image_emb` of each caption's image.
        image_norm / text_norm: how text -> image / image -> text scores are normalised (default: raw cosine).

    Returns:
        (t2i, i2t): for each caption, the rank of its image among all images; for each image, the best
        rank of any of its captions among all captions (ties count in the query's favour).
    """
    images, texts = _as_rows(image_emb), _as_rows(text_emb)
    caption_image = torch.as_tensor(caption_image).long()
    t2i = torch.empty(len(texts), dtype=torch.long)
    for start in range(0, len(texts), chunk):
        own = caption_image[start:start + chunk]
        t2i[start:start + chunk] = _block_ranks(texts[start:start + chunk].float(), images, image_norm, gallery_chunk,
                                                lambda g0, n, own=own: _own_column(own, g0, n))
    i2t = torch.empty(len(images), dtype=torch.long)
    for start in range(0, len(images), chunk):
        queries = images[start:start + chunk].float()
        wanted = torch.arange(start, start + len(queries))
        i2t[start:start + chunk] = _block_ranks(
            queries, texts, text_norm, gallery_chunk,
            lambda g0, n, wanted=wanted: caption_image[None, g0:g0 + n] == wanted[:, None])
    return t2i, i2t


def _own_column(own: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """(Q, n) bool: True at each query's own gallery row, where it lies in rows first..first+n."""
    return own[:, None] == torch.arange(first, first + n)[None, :]


def _block_ranks(queries: torch.Tensor, gallery: Rows, norm: GalleryNorm | None, gallery_chunk: int,
                 mine: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Ranks of `queries` against `gallery`, scored under `norm`: how many gallery rows beat the query's best
    own row (`mine(first, n)`: (Q, n) bool, its own rows among gallery rows first..first+n).

    Two passes over the gallery blocks: the first finds each query's best own score, raw and normalised,
    and its raw best row (the dynamic normalisation gates a query on it); the second counts the rows
    scoring above. Scores are the ones `GalleryNorm.apply` gives over the whole row.
    """
    method = "none" if norm is None else norm.method
    n_queries = len(queries)
    best_raw = torch.full((n_queries,), -math.inf)
    own_raw, own_adjusted = torch.full((n_queries,), -math.inf), torch.full((n_queries,), -math.inf)
    top_row = torch.zeros(n_queries, dtype=torch.long)
    for first, rows in _gallery_blocks(gallery, gallery_chunk):
        sims = queries @ rows.float().T
        own = mine(first, len(rows))
        own_raw = torch.maximum(own_raw, sims.masked_fill(~own, -math.inf).max(1).values)
        if method != "none":
            adjusted = sims - norm.normaliser[first:first + len(rows)].to(sims.dtype)
            own_adjusted = torch.maximum(own_adjusted, adjusted.masked_fill(~own, -math.inf).max(1).values)
        if method == "dynamic":
            block_best, block_row = sims.max(1)
            better = block_best > best_raw  # strictly: the first best row wins ties, as argmax does
            top_row = torch.where(better, block_row + first, top_row)
            best_raw = torch.where(better, block_best, best_raw)
    gate = _gate(norm, method, top_row, n_queries)
    threshold = torch.where(gate, own_adjusted, own_raw)
    ranks = torch.zeros(n_queries, dtype=torch.long)
    for first, rows in _gallery_blocks(gallery, gallery_chunk):
        sims = queries @ rows.float().T
        if method != "none":
            adjusted = sims - norm.normaliser[first:first + len(rows)].to(sims.dtype)
            sims = torch.where(gate[:, None], adjusted, sims)
        ranks += (sims > threshold[:, None]).sum(1)
    return ranks


def _gate(norm: GalleryNorm | None, method: str, top_row: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(Q,) bool: the queries whose scores are normalised (all of them, none, or those whose raw best is a hub)."""
    if method == "dynamic":
        return norm.hub[top_row]
    return torch.full((n_queries,), method != "none")


def _gallery_blocks(gallery: Rows, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for first in range(0, len(gallery), size):
        yield first, gallery[first:first + size]


def _as_rows(x: torch.Tensor | Rows) -> Rows:
    return MemoryRows(x.float()) if isinstance(x, torch.Tensor) else x


def retrieval_metrics(image_emb: torch.Tensor | Rows, text_emb: torch.Tensor | Rows,
                      caption_image: torch.Tensor | np.ndarray,
                      image_norm: GalleryNorm | None = None, text_norm: GalleryNorm | None = None) -> dict[str, float]:
    """R@1/5/10 (percent) and median rank (1-based) in both directions, plus rsum (sum of the six recalls)."""
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, image_norm=image_norm,
                               text_norm=text_norm)
    metrics: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in RECALL_KS:
            metrics[f"{direction}_r{k}"] = round(100.0 * (ranks < k).float().mean().item(), 2)
        metrics[f"{direction}_medr"] = float(ranks.float().median().item() + 1)
    metrics["rsum"] = round(sum(v for key, v in metrics.items() if "_r" in key and "medr" not in key), 2)
    metrics["images"] = float(len(image_emb))
    metrics["captions"] = float(len(text_emb))
    return metrics


def normalised_metrics(image_emb: torch.Tensor | Rows, text_emb: torch.Tensor | Rows,
                       caption_image: torch.Tensor | np.ndarray, bank: QueryBank | None, method: str,
                       image_ids: Sequence[str] | None = None) -> dict[str, float | str]:
    """The metrics search users get under `method` (`METRIC_KEYS`), the raw ones as `<key>_raw`, and the
    method in `normalisation` ("none" when there is no bank). `image_ids` (of the image rows) let rows of
    the bank's own split leave their own pairs out of their normaliser, as the stored normalisers do.
    Everything runs in blocks (`retrieval_ranks`, `bank_normaliser`): embeddings may be `Rows` on disk
    and `image_ids` any sequence read by slices (an `IdColumn`)."""
    raw = retrieval_metrics(image_emb, text_emb, caption_image)
    if bank is None or method == "none":
        metrics, method = raw, "none"
    else:
        caption_keys = None if image_ids is None else PairKeys(image_ids, caption_image)
        metrics = retrieval_metrics(image_emb, text_emb, caption_image,
                                    bank.gallery_norm(method, image_emb, "image", image_ids),
                                    bank.gallery_norm(method, text_emb, "text", caption_keys))
    return {**metrics, **{f"{key}_raw": raw[key] for key in METRIC_KEYS}, "normalisation": method}


def metrics_table(metrics: dict[str, float]) -> str:
    """A Markdown table of the retrieval metrics (for the CLI and Prefect artifacts)."""
    rows = ["| direction | R@1 | R@5 | R@10 | median rank |", "|---|---:|---:|---:|---:|"]
    for direction, label in (("t2i", "text → image"), ("i2t", "image → text")):
        rows.append(f"| {label} | {metrics[f'{direction}_r1']:.1f} | {metrics[f'{direction}_r5']:.1f} | "
                    f"{metrics[f'{direction}_r10']:.1f} | {metrics[f'{direction}_medr']:g} |")
    rows.append(f"\nrsum = {metrics['rsum']:.1f} over {int(metrics['images'])} images, "
                f"{int(metrics['captions'])} captions")
    if metrics.get("normalisation", "none") != "none":
        rows.append(f"scores normalised by {metrics['normalisation']} against the query bank; "
                    f"raw cosine: rsum {metrics['rsum_raw']:.1f}")
    return "\n".join(rows)
