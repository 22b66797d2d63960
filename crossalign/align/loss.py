"""Losses for the cross-modal mapper: symmetric InfoNCE, VSE++ and the pairwise margin loss (the reference).

Each takes L2-normalised image and text embeddings of one batch, row i of each being a positive pair,
and optionally `image_index`, the image each row belongs to: rows of one image are then never used as
each other's negatives (the training sampler already draws one caption per image; the mask makes
the losses safe for any batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("infonce", "vsepp", "margin")


def negatives_mask(n: int, image_index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(n, n) bool: True where column j is a true negative of row i (another image)."""
    if image_index is None:
        return ~torch.eye(n, dtype=torch.bool, device=device)
    return image_index[:, None] != image_index[None, :]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy over the batch, image -> text and text -> image.

    `logit_scale` is the learnable inverse temperature (the mapper clamps it).
    """

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        logits = logit_scale * image_emb @ text_emb.T
        if image_index is not None:
            positive = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill(~negatives_mask(len(logits), image_index, logits.device) & ~positive,
                                        float("-inf"))
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class _HingeLoss(nn.Module):
    """A hinge loss on cosine scores: positives must beat negatives by `margin` (no temperature)."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        scores = image_emb @ text_emb.T
        return self.hinges(scores, scores.diagonal(), image_index)

    def hinges(self, scores: torch.Tensor, positive: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class VSEppLoss(_HingeLoss):
    """VSE++ (Faghri et al., 2018): max of hinges. Each positive pair is pushed `margin` above its
    hardest in-batch negative, in both directions; the two hinges are summed per pair, averaged over the batch.
    """

    def hinges(self, scores: torch.Tensor, positive: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        negatives = scores.masked_fill(~negatives_mask(len(scores), image_index, scores.device), float("-inf"))
        hardest_text = negatives.max(dim=1).values  # per image: its most similar wrong caption
        hardest_image = negatives.max(dim=0).values  # per caption: its most similar wrong image
        cost = F.relu(self.margin - positive + hardest_text) + F.relu(self.margin - positive + hardest_image)
        return cost.mean()


class MarginLoss(_HingeLoss):
    """The plain pairwise margin loss `mean(relu(margin - s(pos) + s(neg)))` over every in-batch negative,
    both directions (the reference method)."""

    def hinges(self, scores: torch.Tensor, positive: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        valid = negatives_mask(len(scores), image_index, scores.device)
        image_to_text = F.relu(self.margin - positive[:, None] + scores)[valid]
        text_to_image = F.relu(self.margin - positive[None, :] + scores)[valid]
        return torch.cat([image_to_text, text_to_image]).mean()


def make_loss(name: str, margin: float = 0.2) -> nn.Module:
    """The loss called `name` (one of `LOSSES`)."""
    if name == "infonce":
        return ClipLoss()
    if name == "vsepp":
        return VSEppLoss(margin)
    if name == "margin":
        return MarginLoss(margin)
    raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
