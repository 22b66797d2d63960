"""Closed-form regularised CCA: a training-free mapper, and an initialisation for the linear one."""

from __future__ import annotations

import torch

from crossalign.align.data import PairedFeatures
from crossalign.align.mapper import JointMapper


def _inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T


@torch.no_grad()
def fit_cca(train: PairedFeatures, dim: int | None = None, regularisation: float = 1.0,
            power: float = 0.5) -> JointMapper:
    """A `JointMapper` whose linear maps are the top canonical directions of (image, caption) pairs.

    Every caption is paired with its image's features; both sides are standardised first (the
    statistics are saved in the mapper, as for a trained one). `regularisation` is added to the
    diagonal of each covariance (in units of the standardised variance, which is 1); each canonical
    direction is weighted by its correlation to the power `power`, so the strongest directions dominate.
    The defaults were the best of a grid on Flickr8k dev (Lite0 + MiniLM): rsum 287.4 in about 4 s,
    against 264.5 for (0.1, 1.0) and 198.6 for (0.01, 4.0).

    Returns:
        A mapper with `dim` outputs (at most the smaller feature dimension; default: that minimum).
    """
    k = min(train.images.shape[1], train.captions.shape[1], dim or 10**9)
    model = JointMapper(train.images.shape[1], train.captions.shape[1], k)
    model.fit_standardisation(train.images, train.captions)
    x = model.standardise_image(train.images)[train.caption_image].double()
    y = model.standardise_text(train.captions).double()
    n = len(x)
    cxx = x.T @ x / n + regularisation * torch.eye(x.shape[1], dtype=x.dtype)
    cyy = y.T @ y / n + regularisation * torch.eye(y.shape[1], dtype=y.dtype)
    cxy = x.T @ y / n
    wx, wy = _inverse_sqrt(cxx), _inverse_sqrt(cyy)
    u, s, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    weight = s[:k] ** power
    model.image_proj.weight.copy_(((wx @ u[:, :k]) * weight).T.float())
    model.text_proj.weight.copy_(((wy @ vh[:k].T) * weight).T.float())
    model.image_proj.bias.zero_()
    model.text_proj.bias.zero_()
    return model.eval()
