"""Retrieval evaluation by the standard Flickr "1K test" protocol: one implementation for all callers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crossalign.align.querybank import GalleryNorm, QueryBank

RECALL_KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_{m}" for d in ("t2i", "i2t") for m in ("r1", "r5", "r10", "medr")) + ("rsum",)


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor, chunk: int = 4096,
    image_norm: GalleryNorm | None = None, text_norm: GalleryNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the right answers, both directions.

    Args:
        image_emb: (N_images, d) L2-normalised.
        text_emb: (N_captions, d) L2-normalised.
        caption_image: (N_captions,) index into `image_emb` of each caption's image.
        image_norm / text_norm: how text -> image / image -> text scores are normalised (default: raw cosine).

    Returns:
        (t2i, i2t): for each caption, the rank of its image among all images; for each image, the best
        rank of any of its captions among all captions (ties count in the query's favour).
    """
    caption_image = caption_image.long()
    t2i = torch.empty(len(text_emb), dtype=torch.long)
    for start in range(0, len(text_emb), chunk):
        sims = text_emb[start:start + chunk] @ image_emb.T
        if image_norm is not None:
            sims = image_norm.apply(sims)
        own = sims.gather(1, caption_image[start:start + chunk, None])
        t2i[start:start + chunk] = (sims > own).sum(1)
    i2t = torch.empty(len(image_emb), dtype=torch.long)
    for start in range(0, len(image_emb), chunk):
        sims = image_emb[start:start + chunk] @ text_emb.T  # (chunk, N_captions)
        if text_norm is not None:
            sims = text_norm.apply(sims)
        mine = caption_image[None, :] == torch.arange(start, start + len(sims))[:, None]
        best_own = sims.masked_fill(~mine, float("-inf")).max(1, keepdim=True).values
        i2t[start:start + chunk] = (sims > best_own).sum(1)
    return t2i, i2t


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                      image_norm: GalleryNorm | None = None, text_norm: GalleryNorm | None = None) -> dict[str, float]:
    """R@1/5/10 (percent) and median rank (1-based) in both directions, plus rsum (sum of the six recalls)."""
    t2i, i2t = retrieval_ranks(image_emb.float(), text_emb.float(), caption_image, image_norm=image_norm,
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


def normalised_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                       bank: QueryBank | None, method: str,
                       image_ids: Sequence[str] | None = None) -> dict[str, float | str]:
    """The metrics search users get under `method` (`METRIC_KEYS`), the raw ones as `<key>_raw`, and the
    method in `normalisation` ("none" when there is no bank). `image_ids` (of the image rows) let rows of
    the bank's own split leave their own pairs out of their normaliser, as the stored normalisers do."""
    raw = retrieval_metrics(image_emb, text_emb, caption_image)
    if bank is None or method == "none":
        metrics, method = raw, "none"
    else:
        caption_keys = None if image_ids is None else [image_ids[i] for i in caption_image.tolist()]
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
