"""Text query encoding eager against compiled (`TextEncoder.compile_queries`, what `crossalign serve` runs), side by
side in one process: each caption (and each batch of 8) goes through both forms, one after the other.

    python benchmarks/query_compile.py [--encoder minilm-l6,mpnet-base] [--corpus DIR] [--queries 300]
                                       [--device cpu] [--precision auto] [--no-autotune]

The compiled form is built first (a minute or two the first time; Inductor's disk cache keeps its kernels);
the eager form is the same query encoder before the swap (the same weights, in the same precision). Captions
are the corpus's own (Flickr8k's by default). It prints the compile time and, per batch size, the two p50s, then
one line:

    eager_ms_1=… compiled_ms_1=… speedup_1=… eager_ms_8=… compiled_ms_8=… speedup_8=… min_cosine=…

`min_cosine` is the lowest cosine between the two forms' features over the captions.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "flickr8k"


def read_captions(corpus: Path, count: int) -> list[str]:
    """The first `count` distinct captions of a corpus folder's captions.jsonl (records with `captions`, a list,
    as Flickr8k's, or `text`)."""
    path = corpus / "captions.jsonl"
    if not path.is_file():
        raise SystemExit(f"no captions.jsonl in {corpus}")
    texts: dict[str, None] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            for text in record.get("captions") or [record.get("text", "")]:
                if text.strip():
                    texts.setdefault(text, None)
            if len(texts) >= count:
                break
    return list(texts)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="minilm-l6,mpnet-base", help="a text encoder registry name")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from crossalign.encoders import TextEncoder, load_query_encoder
    from crossalign.encoders.composite import CompositeTextEncoder

    texts = read_captions(args.corpus, args.queries + 20)
    compiled = load_query_encoder(args.encoder, args.device, args.precision)
    if not isinstance(compiled, TextEncoder):
        raise SystemExit(f"{args.encoder} is not a text encoder")
    parts = compiled.parts if isinstance(compiled, CompositeTextEncoder) else [compiled]
    eager_parts = [copy.copy(part) for part in parts]  # keep the eager models: compiling swaps the parts' own
    eager = CompositeTextEncoder(eager_parts) if isinstance(compiled, CompositeTextEncoder) else eager_parts[0]
    started = time.perf_counter()
    if not compiled.compile_queries(args.autotune):
        raise SystemExit(f"{args.encoder} has no compiled form")
    print(f"{args.encoder}: compiled in {time.perf_counter() - started:.0f} s (autotune {args.autotune}); "
          f"{torch.get_num_threads()} threads, {len(texts) - 20} captions of {args.corpus}", flush=True)
    for text in texts[:20]:  # warm both
        eager.encode([text]), compiled.encode([text])
    results, lowest = {}, 1.0
    for size in (1, 8):
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for at in range(20, len(texts) - size + 1, size):
            batch = texts[at:at + size]
            features = {}
            for name, encoder in (("eager", eager), ("compiled", compiled)):
                began = time.perf_counter()
                features[name] = encoder.encode(batch)
                times[name].append(time.perf_counter() - began)
            cosine = torch.nn.functional.cosine_similarity(features["eager"], features["compiled"], dim=-1)
            lowest = min(lowest, float(cosine.min()))
        results[size] = {name: 1000 * statistics.median(values) for name, values in times.items()}
        print(f"batch {size}: eager p50 {results[size]['eager']:.1f} ms, compiled p50 {results[size]['compiled']:.1f} "
              f"ms ({len(times['eager'])} calls each)", flush=True)
    print(" ".join(f"eager_ms_{size}={r['eager']:.1f} compiled_ms_{size}={r['compiled']:.1f} "
                   f"speedup_{size}={r['eager'] / r['compiled']:.2f}" for size, r in results.items())
          + f" min_cosine={lowest:.5f}")


if __name__ == "__main__":
    main()
