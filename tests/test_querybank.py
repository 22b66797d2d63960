"""Query-bank normalisation: the normaliser, inverted softmax, the dynamic variant's gate, and the re-ranker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crossalign.align.metrics import normalised_metrics, retrieval_metrics
from crossalign.align.querybank import (
    GalleryNorm,
    QueryBank,
    bank_normaliser,
    bank_top,
    check_method,
    gallery_norm,
    hub_flags,
    sample_rows,
)
from crossalign.align.train import latent_mixup
from crossalign.search.rerank import NormalisedRanker


def test_normaliser_is_the_soft_maximum_similarity_to_the_bank() -> None:
    # Two gallery rows, a bank of three queries, similarities by hand.
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    beta = 10.0
    expected = [math.log((math.exp(10 * 1.0) + math.exp(10 * 0.6) + math.exp(0.0)) / 3) / 10,
                math.log((math.exp(0.0) + math.exp(10 * 0.8) + math.exp(10 * 1.0)) / 3) / 10]
    assert bank_normaliser(gallery, bank, beta).tolist() == pytest.approx(expected, rel=1e-6)
    # Chunking does not change it.
    assert bank_normaliser(gallery, bank, beta, chunk=1).tolist() == pytest.approx(expected, rel=1e-6)


def test_inverted_softmax_ranks_as_beta_s_minus_logsumexp_over_the_bank() -> None:
    torch.manual_seed(0)
    gallery, bank, queries = (F.normalize(torch.randn(n, 8), dim=-1) for n in (20, 50, 7))
    beta = 20.0
    norm = gallery_norm("inverted_softmax", gallery, bank, beta)
    ours = norm.apply(queries @ gallery.T)
    # The definition: beta * s(q, g) - log sum_b exp(beta * s(b, g)); equal up to the factor beta and a constant.
    reference = beta * (queries @ gallery.T) - torch.logsumexp(beta * (bank @ gallery.T), dim=0)
    torch.testing.assert_close(beta * ours - reference, torch.full_like(ours, math.log(len(bank))), atol=1e-4,
                               rtol=0)
    assert torch.equal(ours.argsort(dim=1, descending=True), reference.argsort(dim=1, descending=True))


def test_a_hub_loses_to_a_slightly_less_similar_item_that_no_typical_query_is_near() -> None:
    # The hub (row 0) is near every bank query; row 1 is near none. A query slightly closer to the hub
    # ranks the hub first by cosine and row 1 first once normalised.
    hub, loner = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    bank = F.normalize(torch.tensor([[1.0, 0.0, 0.3], [1.0, 0.0, -0.3], [1.0, 0.1, 0.0]]), dim=-1)
    query = F.normalize(torch.tensor([[0.72, 0.69, 0.0]]), dim=-1)
    gallery = torch.stack([hub, loner])
    raw = query @ gallery.T
    assert raw.argmax().item() == 0
    assert gallery_norm("inverted_softmax", gallery, bank, 20.0).apply(raw).argmax().item() == 1


def test_bank_top_and_hub_flags_over_chunks() -> None:
    gallery = torch.eye(4)
    bank = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.8, 0.0, 0.0, 0.2]])
    scores, index = bank_top(gallery.split(1), bank, k=1)  # one row per chunk: the running top must merge
    assert index.flatten().tolist() == [0, 2, 0]
    assert scores.flatten().tolist() == pytest.approx([0.9, 1.0, 0.8])
    assert hub_flags(4, index).tolist() == [True, False, True, False]
    _, top2 = bank_top(gallery.split(3), bank, k=2)
    assert hub_flags(4, top2).tolist() == [True, True, True, True]


def test_dynamic_normalises_only_queries_whose_nearest_row_is_a_hub() -> None:
    sims = torch.tensor([[0.9, 0.5, 0.1],   # nearest: row 0, a hub -> normalised
                         [0.2, 0.8, 0.7]])  # nearest: row 1, not a hub -> raw
    normaliser = torch.tensor([0.5, 0.0, 0.0])
    norm = GalleryNorm("dynamic", normaliser, hub=torch.tensor([True, False, False]))
    out = norm.apply(sims)
    assert out[0].tolist() == pytest.approx([0.4, 0.5, 0.1])
    assert out[1].tolist() == pytest.approx([0.2, 0.8, 0.7])
    # inverted softmax normalises both
    assert GalleryNorm("inverted_softmax", normaliser).apply(sims)[1].tolist() == pytest.approx([-0.3, 0.8, 0.7])


def test_dynamic_gate_on_a_column_subset() -> None:
    sims = torch.tensor([[0.1, 0.9]])  # columns are gallery rows 2 and 0: the nearest is row 0, a hub
    norm = GalleryNorm("dynamic", torch.tensor([0.5, 0.0, 0.0]), hub=torch.tensor([True, False, False]))
    assert norm.apply(sims, torch.tensor([2, 0]))[0].tolist() == pytest.approx([0.1, 0.4])


def test_unknown_or_incomplete_normalisations_are_refused() -> None:
    with pytest.raises(ValueError, match="use one of none, inverted_softmax, dynamic"):
        check_method("softmax")
    with pytest.raises(ValueError, match="needs the gallery's normaliser"):
        GalleryNorm("inverted_softmax")
    with pytest.raises(ValueError, match="hub flags"):
        GalleryNorm("dynamic", torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        bank_normaliser(torch.eye(2), torch.empty(0, 2), 20.0)


def test_normalised_metrics_report_both_and_none_equals_raw() -> None:
    torch.manual_seed(1)
    images = F.normalize(torch.randn(30, 16), dim=-1)
    captions = F.normalize(images.repeat_interleave(2, 0) + 0.6 * torch.randn(60, 16), dim=-1)
    caption_image = torch.arange(30).repeat_interleave(2)
    bank = QueryBank(text=F.normalize(torch.randn(40, 16), dim=-1), image=F.normalize(torch.randn(40, 16), dim=-1),
                     beta=20.0)
    raw = retrieval_metrics(images, captions, caption_image)
    both = normalised_metrics(images, captions, caption_image, bank, "inverted_softmax")
    assert both["normalisation"] == "inverted_softmax"
    assert both["rsum_raw"] == raw["rsum"] and both["t2i_r1_raw"] == raw["t2i_r1"]
    expected = retrieval_metrics(images, captions, caption_image,
                                 bank.gallery_norm("inverted_softmax", images, "image"),
                                 bank.gallery_norm("inverted_softmax", captions, "text"))
    assert both["rsum"] == expected["rsum"]
    none = normalised_metrics(images, captions, caption_image, bank, "none")
    assert none["rsum"] == none["rsum_raw"] == raw["rsum"] and none["normalisation"] == "none"
    assert normalised_metrics(images, captions, caption_image, None, "inverted_softmax")["normalisation"] == "none"


def test_sample_rows_is_a_sorted_seeded_subsample() -> None:
    assert sample_rows(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    picked = sample_rows(1000, 50, 7)
    assert len(picked) == len(set(picked.tolist())) == 50 and picked.tolist() == sorted(picked.tolist())
    assert torch.equal(picked, sample_rows(1000, 50, 7)) and not torch.equal(picked, sample_rows(1000, 50, 8))


def test_latent_mixup_with_a_fixed_lambda_mixes_both_modalities_alike() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    texts = torch.tensor([[10.0], [20.0], [30.0]])
    pairing = torch.tensor([1, 2, 0])
    mixed_images, mixed_texts = latent_mixup(images, texts, 0.75, pairing)
    torch.testing.assert_close(mixed_images, torch.tensor([[0.75, 0.25], [0.5, 1.25], [1.75, 1.5]]))
    torch.testing.assert_close(mixed_texts, torch.tensor([[12.5], [22.5], [25.0]]))
    same_images, same_texts = latent_mixup(images, texts, 1.0, pairing)
    assert torch.equal(same_images, images) and torch.equal(same_texts, texts)


class _Table:
    """The part of a LanceDB table the ranker reads: its version and the normaliser column."""

    def __init__(self, normaliser: torch.Tensor) -> None:
        import pyarrow as pa

        self.version = 1
        self._column = pa.table({"qb_norm": pa.array(normaliser.numpy())})

    def search(self) -> _Table:
        return self

    def select(self, columns: list[str]) -> _Table:
        return self

    def limit(self, n: object) -> _Table:
        return self

    def to_arrow(self):
        return self._column


def test_reranked_candidates_equal_exhaustive_normalised_search() -> None:
    torch.manual_seed(2)
    gallery = F.normalize(torch.randn(3000, 32), dim=-1)
    bank = F.normalize(torch.randn(500, 32) + 0.5 * gallery[:1], dim=-1)  # a bank with a direction: real hubs
    normaliser = bank_normaliser(gallery, bank, 20.0)
    ranker = NormalisedRanker(_Table(normaliser), "inverted_softmax", first_depth=20)
    calls = []

    def candidates_for(query: torch.Tensor):
        cosine = gallery @ query

        def candidates(depth: int, extra: list[str]) -> list[dict]:
            calls.append(depth)
            order = cosine.argsort(descending=True)[:depth]
            return [{"id": int(i), "cosine": float(cosine[i]), "qb_norm": float(normaliser[i])} for i in order]
        return candidates

    for query in F.normalize(torch.randn(50, 32), dim=-1):
        hits = ranker.rank(candidates_for(query), 10)
        exhaustive = (gallery @ query - normaliser).argsort(descending=True)[:10]
        assert [h["id"] for h in hits] == exhaustive.tolist()
        assert all(h["score"] == pytest.approx(h["cosine"] - float(normaliser[h["id"]]), abs=1e-4) for h in hits)
    assert max(calls) > 20, "the depth grows until the top 10 is certified"


def test_a_row_is_not_normalised_against_its_own_pairs() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    keys = ["a", "b", "c"]  # bank row 0 belongs to image "a", row 2 to image "c"
    left_out = bank_normaliser(gallery, bank, 10.0, gallery_keys=["a", "z"], bank_keys=keys)
    # row 0 (image "a") against bank rows 1 and 2 only; row 1 (an image not in the bank) against all three
    assert left_out[0].item() == pytest.approx(math.log((math.exp(6.0) + math.exp(0.0)) / 2) / 10, rel=1e-6)
    assert left_out[1].item() == pytest.approx(bank_normaliser(gallery[1:], bank, 10.0)[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="both"):
        bank_normaliser(gallery, bank, 10.0, gallery_keys=["a", "b"])
