"""Query-bank normalisation in search: re-rank agreement with exhaustive normalised search on Flickr8k, and
what computing the normalisers costs at embed time.

    python benchmarks/querybank.py [--workspace DIR] [--corpus ../shared/data/flickr8k] [--queries 1000]
                                   [--rows 1000000] [--bank 10000] [--dim 512]

1. Agreement: the default pipeline's mapper and tables on Flickr8k (train + dev: 6,999 images, 34,991
   captions; the captions table has an IVF_PQ index). For 1,000 dev captions as text queries (the first
   caption of each dev image) and the 1,000 dev images as image queries, the top 10 that `Searcher`
   returns (ANN candidates re-ranked by `cosine - qb_norm`, with the depth certificate of
   `crossalign/search/rerank.py`) against the exhaustive normalised top 10 computed from every stored
   vector and normaliser. Also the agreement of a fixed candidate depth without the certificate.
2. Cost: normalisers of `--rows` synthetic unit vectors against a bank of `--bank` ones, in rows/s, as
   embed computes them (chunks of 8,192 rows), beside mapping the same rows (the linear map alone).

Features come from the quality benchmark's workspace when present (python benchmarks/quality.py
extracts them); the last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crossalign.align.querybank import bank_normaliser
from crossalign.config import CorpusConfig, ExtractConfig, TrainConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.extract import extract_image_features, extract_text_features
from crossalign.search import Searcher
from crossalign.search.rerank import FIRST_DEPTH
from crossalign.store import CAPTIONS_TABLE, IMAGES_TABLE, connect, embed_corpus
from crossalign.store.index import ClusteredUnitVectors
from crossalign.store.schema import NORMALISER_COLUMN
from crossalign.workspace import Workspace

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
CHUNK = 8192


def build(workspace: Workspace, corpus_root: Path, corpus: str) -> None:
    """Ingest, extract with the default encoders, train the default mapper (unless one is current), embed."""
    from crossalign.align import fit_mapper

    extract = ExtractConfig()
    ingest_corpus(CorpusConfig(root=corpus_root, name=corpus), workspace)
    extract_image_features(workspace, corpus, extract)
    extract_text_features(workspace, corpus, extract)
    summary = fit_mapper(workspace, corpus, extract.image_encoder, extract.text_encoder, TrainConfig())
    print(f"mapper {summary.mapper_id}: dev rsum {summary.metrics['rsum']:.1f} (raw {summary.metrics['rsum_raw']:.1f})")
    embedded = embed_corpus(workspace, corpus)
    print(f"tables: {embedded.images_in_table} images, {embedded.captions_in_table} captions; normalisers of "
          f"{embedded.normalised_rows} rows in {embedded.normaliser_seconds:.1f}s")


def stored(workspace: Workspace, table: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    rows = connect(workspace).open_table(table).to_arrow()
    vectors = rows.column("vector").combine_chunks()
    matrix = vectors.flatten().to_numpy().reshape(len(rows), vectors.type.list_size)
    return (rows.column("id").to_pylist(), torch.from_numpy(matrix.copy()),
            torch.tensor(rows.column(NORMALISER_COLUMN).to_numpy(zero_copy_only=False)))


def agreement(searcher: Searcher, table: str, queries: list[np.ndarray], limit: int = 10) -> dict[str, float]:
    """Share of queries whose re-ranked top `limit` equals the exhaustive normalised top `limit` (as ordered
    lists), and the same for fixed depths without the certificate."""
    ids, vectors, normaliser = stored(searcher.workspace, table)
    depths = (limit, 20, 50, FIRST_DEPTH)
    same, same_fixed = 0, dict.fromkeys(depths, 0)
    start = time.perf_counter()
    for vector in queries:
        cosine = vectors @ torch.from_numpy(vector)
        exhaustive = [ids[i] for i in (cosine - normaliser).argsort(descending=True)[:limit]]
        hits = searcher.search_vector(table, vector, limit, normalise=True)
        same += [h.id for h in hits] == exhaustive
        by_cosine = cosine.argsort(descending=True)
        for depth in depths:
            candidates = by_cosine[:depth]
            reranked = candidates[(cosine[candidates] - normaliser[candidates]).argsort(descending=True)[:limit]]
            same_fixed[depth] += [ids[i] for i in reranked] == exhaustive
    seconds = time.perf_counter() - start
    n = len(queries)
    return {"certified": same / n, **{f"depth_{d}": same_fixed[d] / n for d in depths},
            "ms_per_query": 1000 * seconds / n, "rows": len(ids)}


def normaliser_cost(rows: int, bank_size: int, dim: int) -> dict[str, float]:
    """Rows/s of computing normalisers against a bank, and of the linear map embed applies anyway."""
    data = ClusteredUnitVectors.make(dim, seed=0)
    bank = torch.from_numpy(data.sample(bank_size, seed=1))
    weight = torch.randn(dim, dim) / dim ** 0.5
    normalise_s = map_s = 0.0
    for start in range(0, rows, CHUNK):
        chunk = torch.from_numpy(data.sample(min(CHUNK, rows - start), seed=2 + start))
        t0 = time.perf_counter()
        torch.nn.functional.normalize(chunk @ weight, dim=-1)
        t1 = time.perf_counter()
        bank_normaliser(chunk, bank, 20.0)
        t2 = time.perf_counter()
        map_s, normalise_s = map_s + (t1 - t0), normalise_s + (t2 - t1)
    return {"rows": rows, "bank": bank_size, "dim": dim, "normaliser_rows_per_s": rows / normalise_s,
            "map_rows_per_s": rows / map_s, "normaliser_s": normalise_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "crossalign-quality")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--corpus-name", default="flickr8k")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--bank", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=TrainConfig().dim)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()

    results: dict[str, float] = {}
    if not args.skip_agreement:
        workspace = Workspace(args.workspace)
        build(workspace, args.corpus, args.corpus_name)
        searcher = Searcher(workspace, device="cpu")
        dev_images = read_images(workspace, args.corpus_name, "dev").to_pylist()[:args.queries]
        first_caption = {}
        for row in read_captions(workspace, args.corpus_name, "dev").to_pylist():
            first_caption.setdefault(row["image_id"], row["text"])
        texts = [first_caption[row["image_id"]] for row in dev_images if row["image_id"] in first_caption]
        text_queries = [searcher.embed_text(t) for t in texts]
        image_queries = [searcher.embed_image(row["uri"]) for row in dev_images]
        print("\n| queries | table (rows) | top 10 = exhaustive: certified re-rank | fixed depth 10 | 20 | 50 "
              f"| {FIRST_DEPTH} | ms/query |\n|---|---|---:|---:|---:|---:|---:|---:|")
        for label, table, queries in (("dev captions -> images", IMAGES_TABLE, text_queries),
                                      ("dev images -> captions", CAPTIONS_TABLE, image_queries)):
            a = agreement(searcher, table, queries)
            print(f"| {label} ({len(queries)}) | {table} ({a['rows']:,}) | {a['certified']:.1%} | {a['depth_10']:.1%} "
                  f"| {a['depth_20']:.1%} | {a['depth_50']:.1%} | {a[f'depth_{FIRST_DEPTH}']:.1%} "
                  f"| {a['ms_per_query']:.1f} |", flush=True)
            results[f"agreement_{table}"] = a["certified"]

    cost = normaliser_cost(args.rows, args.bank, args.dim)
    print(f"\nnormalisers of {cost['rows']:,} {cost['dim']}-d rows against a bank of {cost['bank']:,}: "
          f"{cost['normaliser_rows_per_s']:,.0f} rows/s ({cost['normaliser_s']:.0f} s in all); the linear map "
          f"alone: {cost['map_rows_per_s']:,.0f} rows/s")
    results.update(normaliser_rows_per_s=round(cost["normaliser_rows_per_s"]), bank=args.bank, rows=args.rows)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    json.dumps(results)


if __name__ == "__main__":
    main()
