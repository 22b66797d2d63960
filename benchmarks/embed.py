"""Peak memory and time of `embed` as the corpus grows: synthetic features, a saved mapper, real LanceDB tables.

    python benchmarks/embed.py [--images 20000,80000] [--captions-per-image 5] [--image-dim 1280]
                               [--text-dim 384] [--dim 64] [--workdir DIR]

For each size N, a fresh workspace holds a corpus of N images and `--captions-per-image` x N captions
(the corpus tables only: embed never opens an image file), their features in shards of 4,096 rows as
extraction writes them (seeded Gaussian vectors), and a randomly initialised linear mapper saved as
training saves it. `embed_corpus` then runs in a fresh process, which reports its wall time and peak
RSS. The features alone are N x (image dim + captions per image x text dim) x 4 bytes; embedding
should read them shard by shard, so its peak RSS should not grow with them. A small joint `--dim` keeps
the vector index build (which is not what this measures) short.

The last line is machine-readable: `features_mb=<largest corpus's features> peak_rss_mb=<its embed>
rss_growth=<peak RSS growth / features growth, smallest to largest corpus>`; 1.0 would mean
every feature byte is held at once, 0 that memory is flat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossalign.align.mapper import JointMapper
from crossalign.align.mapper_dir import save_mapper
from crossalign.corpus.schema import CAPTIONS_SCHEMA, IMAGES_SCHEMA
from crossalign.extract.shards import ShardWriter
from crossalign.workspace import Workspace

CORPUS = "bench"
SHARD_ROWS = 4096

CHILD = """
import json, resource, sys, time
from crossalign.store import embed_corpus
from crossalign.workspace import Workspace
start = time.perf_counter()
summary = embed_corpus(Workspace(sys.argv[1]), sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start, "images": summary.images, "captions": summary.captions,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def encoder_description(name: str, modality: str, dim: int) -> dict:
    return {"encoder": name, "modality": modality, "dim": dim,
            "weights_digest": hashlib.sha256(name.encode()).hexdigest()[:16], "preprocessing": {}}


def write_features(directory: Path, description: dict, ids: list[str], seed: int) -> None:
    """Seeded Gaussian features of `ids`, in shards as extraction writes them."""
    writer = ShardWriter(directory, description)
    rng = np.random.default_rng(seed)
    for start in range(0, len(ids), SHARD_ROWS):
        chunk = ids[start:start + SHARD_ROWS]
        writer.write(chunk, rng.standard_normal((len(chunk), description["dim"]), dtype=np.float32))


def build_workspace(root: Path, n_images: int, args: argparse.Namespace) -> tuple[Workspace, float]:
    """A workspace ready to embed: corpus tables, features of both modalities and a current mapper."""
    workspace = Workspace(root)
    image_ids = [f"img{i:09d}" for i in range(n_images)]
    splits = ["train"] * n_images
    images = pa.table({"image_id": image_ids, "uri": [f"/nonexistent/{i}.jpg" for i in image_ids],
                       "sha256": image_ids, "width": pa.array([500] * n_images, pa.int32()),
                       "height": pa.array([375] * n_images, pa.int32()), "split": splits,
                       "status": ["ok"] * n_images}, schema=IMAGES_SCHEMA)
    per = args.captions_per_image
    caption_ids = [f"cap{i:010d}" for i in range(n_images * per)]
    captions = pa.table({"caption_id": caption_ids, "image_id": [i for i in image_ids for _ in range(per)],
                         "text": [f"a photo number {i} of something" for i in range(n_images * per)],
                         "split": ["train"] * (n_images * per)}, schema=CAPTIONS_SCHEMA)
    workspace.corpus_dir(CORPUS).mkdir(parents=True, exist_ok=True)
    pq.write_table(images, workspace.images_table(CORPUS))
    pq.write_table(captions, workspace.captions_table(CORPUS))
    image_encoder = encoder_description("bench-image", "image", args.image_dim)
    text_encoder = encoder_description("bench-text", "text", args.text_dim)
    write_features(workspace.features_dir(CORPUS, "bench-image"), image_encoder, image_ids, seed=1)
    write_features(workspace.features_dir(CORPUS, "bench-text"), text_encoder, caption_ids, seed=2)
    model = JointMapper(args.image_dim, args.text_dim, args.dim)
    config = {"kind": "linear", "depth": 1, "hidden": 2048, "image_dim": args.image_dim, "text_dim": args.text_dim,
              "dim": args.dim, "image_encoder": image_encoder, "text_encoder": text_encoder}
    workspace.set_current_mapper(save_mapper(model, config, workspace.root / "mappers"))
    features_mb = n_images * (args.image_dim + per * args.text_dim) * 4 / 2**20
    return workspace, features_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="20000,80000", help="corpus sizes (images), comma-separated")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--image-dim", type=int, default=1280)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--dim", type=int, default=64, help="joint dimension of the mapper")
    parser.add_argument("--workdir", type=Path, default=None, help="where the workspaces go (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crossalign-embed-", dir=args.workdir))
    results = []
    try:
        for n_images in [int(n) for n in args.images.split(",")]:
            workspace, features_mb = build_workspace(base / f"n{n_images}", n_images, args)
            out = subprocess.run([sys.executable, "-c", CHILD, str(workspace.root), CORPUS],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"embed failed on {n_images} images:\n{out.stderr[-3000:]}")
            stats = json.loads(out.stdout.strip().splitlines()[-1])
            results.append((features_mb, stats["peak_rss_mb"]))
            print(f"{n_images} images, {stats['captions']} captions: features {features_mb:.0f} MB; "
                  f"embed {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_mb']} MB", flush=True)
            shutil.rmtree(workspace.root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    (small_mb, small_rss), (large_mb, large_rss) = results[0], results[-1]
    growth = (large_rss - small_rss) / (large_mb - small_mb) if large_mb > small_mb else 0.0
    print(f"features_mb={large_mb:.0f} peak_rss_mb={large_rss} rss_growth={growth:.3f}")


if __name__ == "__main__":
    main()
