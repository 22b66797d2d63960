"""Contrastive losses for the cross-modal mapper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): row i of each batch is the positive pair, every other row a negative.

    The caller must not put two captions of one image into one batch (they would be false negatives);
    `crossalign.align.train` samples one caption per image.
    """

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        logits = logit_scale * image_emb @ text_emb.T
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
