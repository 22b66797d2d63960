"""Ingest throughput and peak memory on a synthetic corpus of small real image files.

    python benchmarks/ingest.py [--images 100000] [--out DIR]

Writes N distinct small JPEG/PNG files (coloured noise, 32-64 px) with captions.jsonl (once; reused
when DIR already holds them), then times `ingest_corpus` in a fresh process and prints items/s and
its peak RSS. The same ingest of the first tenth of the corpus runs first, so the two peak RSS
figures show how memory grows with corpus size. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image


def _write_chunk(job: tuple[str, int, int]) -> list[str]:
    folder, start, stop = job
    rng = np.random.default_rng(start)
    lines = []
    for index in range(start, stop):
        size = 32 + index % 33
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        name = f"images/{index // 10000:02d}/img{index:07d}.{'png' if index % 4 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(Path(folder) / name)
        lines.append(json.dumps({"image": name, "captions": [f"picture {index}", f"noise number {index}"],
                                 "split": "train" if index % 10 else "dev"}))
    return lines


def write_corpus(folder: Path, count: int) -> None:
    if (folder / "captions.jsonl").exists() and sum(1 for _ in open(folder / "captions.jsonl")) == count:
        return
    for part in range((count + 9999) // 10000):
        (folder / "images" / f"{part:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), start, min(start + 2000, count)) for start in range(0, count, 2000)]
    with get_context("spawn").Pool() as pool:
        chunks = pool.map(_write_chunk, jobs)
    (folder / "captions.jsonl").write_text("".join(line + "\n" for chunk in chunks for line in chunk))


MEASURE = """
import json, resource, sys, time
from crossalign.corpus import ingest_corpus
from crossalign.workspace import Workspace
start = time.perf_counter()
summary = ingest_corpus(sys.argv[1], Workspace(sys.argv[2]), "bench", captions_file=sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"images": summary.images, "captions": summary.captions, "rejected": summary.rejected,
                  "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "crossalign-ingest-bench")
    args = parser.parse_args()
    start = time.perf_counter()
    write_corpus(args.out, args.images)
    print(f"corpus: {args.images} image files in {args.out} ({time.perf_counter() - start:.0f}s to prepare)")
    small = args.images // 10
    lines = (args.out / "captions.jsonl").read_text().splitlines(keepends=True)
    (args.out / "captions-tenth.jsonl").write_text("".join(lines[:small]))
    results = {}
    for captions_file in ("captions-tenth.jsonl", "captions.jsonl"):
        workspace = Path(tempfile.mkdtemp(prefix="crossalign-ingest-ws-"))
        result = subprocess.run([sys.executable, "-c", MEASURE, str(args.out), str(workspace), captions_file],
                                capture_output=True, text=True, check=True)
        results[captions_file] = stats = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{captions_file}: {stats['images']} images, {stats['captions']} captions, {stats['rejected']} "
              f"rejected in {stats['seconds']:.1f}s: {stats['images'] / stats['seconds']:.0f} images/s, "
              f"peak RSS {stats['peak_rss_mb']} MB")
    tenth, full = results["captions-tenth.jsonl"], results["captions.jsonl"]
    growth_kb = (full["peak_rss_mb"] - tenth["peak_rss_mb"]) * 1024 / max(full["images"] - tenth["images"], 1)
    print(f"peak RSS {tenth['peak_rss_mb']} MB at {tenth['images']} images, {full['peak_rss_mb']} MB at "
          f"{full['images']}: {growth_kb:.2f} KB more per image")
    print(f"items_per_s={full['images'] / full['seconds']:.1f} peak_rss_mb={full['peak_rss_mb']}")


if __name__ == "__main__":
    main()
