"""Query-bank normalisation against hubness: inverted softmax and its dynamic variant (QB-Norm).

Joint spaces have hubs: gallery items near almost every query. Inverted softmax scores a gallery item
`g` for a query `q` as `β·s(q, g) − log Σ_b exp(β·s(b, g))`, the sum running over a bank of typical
queries (the training split's vectors of the query's modality). The second term depends on `g` alone,
so it is one number per gallery row, computed when the row is embedded and stored with it. Here it is
kept in cosine units, as the soft maximum of the row's similarity to the bank:

    normaliser(g) = (1/β) · log( mean_b exp(β · s(b, g)) )
    score(q, g)   = s(q, g) − normaliser(g)

which ranks exactly as inverted softmax (the two differ by a factor β and a constant `log B / β`).

The dynamic variant (Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022)
normalises a query's scores only when its raw nearest gallery item is a hub: an item that is among
the `k` nearest gallery items of some bank query (`k = 1`, as in the paper's code). Other queries keep
their raw scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import numpy as np
import torch

from crossalign.config import NormaliseMethod

if TYPE_CHECKING:
    from crossalign.align.rows import Rows

METHODS: tuple[str, ...] = get_args(NormaliseMethod)
CHUNK_ROWS = 4096


def check_method(method: str) -> str:
    """`method` if it is a known normalisation, else a ValueError naming the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}: use one of {', '.join(METHODS)}")
    return method


@torch.no_grad()
def bank_normaliser(gallery: torch.Tensor | Rows, bank: torch.Tensor, beta: float, chunk: int = CHUNK_ROWS,
                    gallery_keys: Sequence[str] | None = None, bank_keys: Sequence[str] | None = None) -> torch.Tensor:
    """(G,) float32: each gallery row's soft maximum similarity to the bank, `(1/β) log mean_b exp(β s(b, g))`.

    With keys, a row's own pairs are left out of its mean: bank rows whose key equals the gallery row's
    (the image id: a training image is not normalised against its own captions, nor a training caption
    against its own image), so rows of the bank's split are normalised as unseen rows are.

    Args:
        gallery: (G, d) unit vectors (the rows being normalised).
        bank: (B, d) unit vectors of typical queries; B > 0.
        beta: inverse temperature of the inverted softmax (> 0).
        gallery_keys / bank_keys: pair keys of the gallery and bank rows (both or neither).
    """
    if len(bank) == 0:
        raise ValueError("the query bank is empty")
    if (gallery_keys is None) != (bank_keys is None):
        raise ValueError("give pair keys for both the gallery and the bank, or for neither")
    positions: dict[str, list[int]] = {}
    for index, key in enumerate(bank_keys or ()):
        positions.setdefault(key, []).append(index)
    bank = bank.float()
    out = torch.empty(len(gallery), dtype=torch.float32)
    for start in range(0, len(gallery), chunk):
        sims = beta * (gallery[start:start + chunk].float() @ bank.T)  # (chunk, B)
        counts = torch.full((len(sims),), float(len(bank)))
        if gallery_keys is not None:
            rows, columns = [], []
            for row, key in enumerate(gallery_keys[start:start + chunk]):
                own = positions.get(key, ())
                rows += [row] * len(own)
                columns += own
            if rows:
                sims[rows, columns] = -math.inf
                counts -= torch.bincount(torch.tensor(rows), minlength=len(sims)).float()
        out[start:start + chunk] = (torch.logsumexp(sims, dim=1) - counts.clamp_min(1).log()) / beta
    return out


@torch.no_grad()
def bank_top(gallery: Iterable[torch.Tensor], bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bank query's `k` best gallery rows: (scores (B, k), row indices (B, k)), over gallery chunks.

    `gallery` yields (rows, d) chunks in row order, so a table can be scanned without holding it whole.
    """
    bank = bank.float()
    best = torch.full((len(bank), k), -math.inf)
    index = torch.full((len(bank), k), -1, dtype=torch.long)
    seen = 0
    for rows in gallery:
        sims = bank @ rows.float().T  # (B, chunk)
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_scores = torch.cat([best, top.values], 1)
        merged_index = torch.cat([index, top.indices + seen], 1)
        keep = merged_scores.topk(k, dim=1)
        best, index = keep.values, merged_index.gather(1, keep.indices)
        seen += len(rows)
    return best, index


def hub_flags(n_gallery: int, top_index: torch.Tensor) -> torch.Tensor:
    """(G,) bool: True for gallery rows that are among the top rows of some bank query (`bank_top`)."""
    flags = torch.zeros(n_gallery, dtype=torch.bool)
    rows = top_index[top_index >= 0]
    flags[rows] = True
    return flags


@dataclass(frozen=True)
class GalleryNorm:
    """How one gallery's raw scores become the scores search ranks by.

    Attributes:
        method: "none", "inverted_softmax" or "dynamic" (`METHODS`).
        normaliser: (G,) per-row normaliser (`bank_normaliser`); unused with "none".
        hub: (G,) bool hub flags (`hub_flags`); needed by "dynamic" only.
    """

    method: str
    normaliser: torch.Tensor | None = None
    hub: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.method != "none" and self.normaliser is None:
            raise ValueError(f"normalisation {self.method!r} needs the gallery's normaliser")
        if self.method == "dynamic" and self.hub is None:
            raise ValueError("the dynamic normalisation needs the gallery's hub flags")

    def apply(self, sims: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of (Q, C) raw similarities against gallery rows `columns` (default: all G rows, in order).

        With "dynamic", a query's row is normalised only if its raw best column is a hub.
        """
        if self.method == "none":
            return sims
        normaliser = self.normaliser if columns is None else self.normaliser[columns]
        adjusted = sims - normaliser.to(sims.dtype)
        if self.method == "inverted_softmax":
            return adjusted
        hub = self.hub if columns is None else self.hub[columns]
        gate = hub[sims.argmax(dim=1)]
        return torch.where(gate[:, None], adjusted, sims)


def gallery_norm(method: str, gallery: torch.Tensor | Rows, bank: torch.Tensor | None, beta: float,
                 k: int = 1) -> GalleryNorm:
    """The `GalleryNorm` of `gallery` (G, d) against `bank` under `method` (`bank` unused with "none")."""
    if check_method(method) == "none":
        return GalleryNorm("none")
    if bank is None:
        raise ValueError(f"normalisation {method!r} needs a query bank")
    normaliser = bank_normaliser(gallery, bank, beta)
    hub = None
    if method == "dynamic":
        _, top_index = bank_top(gallery_blocks(gallery), bank, k)
        hub = hub_flags(len(gallery), top_index)
    return GalleryNorm(method, normaliser, hub)


@dataclass(frozen=True)
class QueryBank:
    """Typical queries of each modality, as joint vectors of a mapper's training split, and the β to use.

    `text` normalises image rows (text -> image search), `image` normalises caption rows. `text_keys`
    and `image_keys` are the image ids the bank rows belong to (a caption's image, an image itself), so
    a row is not normalised against its own pairs (`bank_normaliser`).
    """

    text: torch.Tensor
    image: torch.Tensor
    beta: float
    text_keys: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()

    def queries_for(self, gallery_modality: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The bank that normalises a gallery of `gallery_modality` ("image" or "text"), the other
        modality's vectors, and their keys."""
        if gallery_modality not in ("image", "text"):
            raise ValueError(f"unknown modality {gallery_modality!r}: use image or text")
        return (self.text, self.text_keys) if gallery_modality == "image" else (self.image, self.image_keys)

    def normaliser(self, gallery: torch.Tensor | Rows, gallery_modality: str,
                   gallery_keys: Sequence[str] | None = None) -> torch.Tensor:
        """(G,) normalisers of joint vectors of `gallery_modality` (`bank_normaliser`); `gallery_keys` are
        the rows' image ids (an image's own, a caption's image's), to leave their own pairs out."""
        bank, bank_keys = self.queries_for(gallery_modality)
        if gallery_keys is None or not bank_keys:
            return bank_normaliser(gallery, bank, self.beta)
        return bank_normaliser(gallery, bank, self.beta, gallery_keys=gallery_keys, bank_keys=bank_keys)

    def gallery_norm(self, method: str, gallery: torch.Tensor | Rows, gallery_modality: str,
                     gallery_keys: Sequence[str] | None = None, k: int = 1) -> GalleryNorm:
        """The `GalleryNorm` of a whole gallery (evaluation: every row at hand)."""
        if check_method(method) == "none":
            return GalleryNorm("none")
        normaliser = self.normaliser(gallery, gallery_modality, gallery_keys)
        hub = None
        if method == "dynamic":
            _, top_index = bank_top(gallery_blocks(gallery), self.queries_for(gallery_modality)[0], k)
            hub = hub_flags(len(gallery), top_index)
        return GalleryNorm(method, normaliser, hub)


def gallery_blocks(gallery: torch.Tensor | Rows, rows: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
    """`gallery` (a tensor or `Rows` on disk) in blocks of `rows`, in order."""
    for start in range(0, len(gallery), rows):
        yield gallery[start:start + rows]


def ids_at(ids: Sequence[str], rows: np.ndarray | torch.Tensor) -> list[str]:
    """The ids at `rows` of `ids`: a list, or a column read by index (`IdColumn.take`)."""
    rows = np.asarray(rows)
    take = getattr(ids, "take", None)
    return take(rows) if callable(take) else [ids[i] for i in rows.tolist()]


class PairKeys(Sequence[str]):
    """The pair key (image id) of each caption row: `image_ids[caption_image[row]]`, computed per slice, so
    a large split's caption keys are never held as one list of strings."""

    def __init__(self, image_ids: Sequence[str], caption_image: torch.Tensor | np.ndarray) -> None:
        self.image_ids = image_ids
        self.caption_image = np.asarray(caption_image)

    def __len__(self) -> int:
        return len(self.caption_image)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return ids_at(self.image_ids, self.caption_image[index])
        return ids_at(self.image_ids, self.caption_image[[index]])[0]


def sample_rows(n: int, size: int, seed: int) -> torch.Tensor:
    """Indices of a random subsample of `size` of `n` rows (all of them, in order, when `size >= n`)."""
    if size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
