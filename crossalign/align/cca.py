"""Closed-form regularised CCA: a training-free mapper, and an initialisation for the linear one."""

from __future__ import annotations

import torch

from crossalign.align.data import PairedSplit
from crossalign.align.mapper import JointMapper
from crossalign.align.rows import blocks, chunk_rows


def _inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T


@torch.no_grad()
def fit_cca(train: PairedSplit, dim: int | None = None, regularisation: float = 1.0,
            power: float = 0.5) -> JointMapper:
    """A `JointMapper` whose linear maps are the top canonical directions of (image, caption) pairs.

    Every caption is paired with its image's features, read in blocks (the covariances are summed block
    by block in float64, so any split size fits in memory); both sides are standardised first (the
    statistics are saved in the mapper, as for a trained one). `regularisation` is added to the
    diagonal of each covariance (in units of the standardised variance, which is 1); each canonical
    direction is weighted by its correlation to the power `power`, so the strongest directions dominate.
    The defaults were the best of a grid on Flickr8k dev (Lite0 + MiniLM): rsum 287.4 in about 4 s,
    against 264.5 for (0.1, 1.0) and 198.6 for (0.01, 4.0).

    Returns:
        A mapper with `dim` outputs (at most the smaller feature dimension; default: that minimum).
    """
    images, captions, pairs = train.image_rows, train.caption_rows, train.pairs
    k = min(images.dim, captions.dim, dim or 10**9)
    model = JointMapper(images.dim, captions.dim, k)
    model.fit_standardisation(images, captions)
    cxx = torch.zeros(images.dim, images.dim, dtype=torch.float64)
    cyy = torch.zeros(captions.dim, captions.dim, dtype=torch.float64)
    cxy = torch.zeros(images.dim, captions.dim, dtype=torch.float64)
    for start, y in blocks(captions, chunk_rows(images.dim + captions.dim)):  # the covariances, block by block
        x = model.standardise_image(images.take(pairs[start:start + len(y)])).double()
        y = model.standardise_text(y).double()
        cxx += x.T @ x
        cyy += y.T @ y
        cxy += x.T @ y
    n = len(captions)
    cxx = cxx / n + regularisation * torch.eye(images.dim, dtype=torch.float64)
    cyy = cyy / n + regularisation * torch.eye(captions.dim, dtype=torch.float64)
    cxy = cxy / n
    wx, wy = _inverse_sqrt(cxx), _inverse_sqrt(cyy)
    u, s, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    # A pair of singular vectors is defined up to a joint sign, which LAPACK picks from rounding: two sums of
    # the same covariances in another order (blocks, another CPU) could flip a direction. Fix it as
    # scikit-learn's svd_flip does: each image-side vector's largest entry is positive.
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    u, vh = u * signs, vh * signs.T
    weight = s[:k] ** power
    model.image_proj.weight.copy_(((wx @ u[:, :k]) * weight).T.float())
    model.text_proj.weight.copy_(((wy @ vh[:k].T) * weight).T.float())
    model.image_proj.bias.zero_()
    model.text_proj.bias.zero_()
    return model.eval()
