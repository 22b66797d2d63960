"""Extraction speed, side by side in one run: model-only limit, crossalign end to end, a naive loop.

    python benchmarks/extract.py [--corpus ../shared/data/flickr8k] [--split dev]
    python benchmarks/extract.py --image-encoder torchvision:resnet50@random --device cuda --precision bf16

Images: the model-only limit is the encoder's forward on ready uint8 tensors (best batch size,
channels-last, the run's precision); end to end is `extract_image_features` (decode in spawned
workers -> features on disk); the naive loop decodes with PIL in the main process and runs NCHW fp32
batches of 64, as the original design wrote it. Text: the same three for the captions (naive =
fp32 padded batches of 256 in file order). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.encoders import load_encoder
from crossalign.extract import extract_image_features, extract_text_features
from crossalign.extract.extract import default_num_workers
from crossalign.workspace import Workspace

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def image_model_only(encoder, uris: list[str], batch_sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """Best images/s of the encoder's forward on ready tensors, and the batch size that gave it."""
    best = (0.0, 0)
    for batch_size in batch_sizes:
        pixels = torch.stack([encoder.preprocess(Image.open(u)) for u in (uris * batch_size)[:batch_size]])
        if encoder.runtime.device.type == "cuda":
            pixels = pixels.pin_memory()
        encoder.encode(pixels)  # warm-up
        synchronize(encoder.runtime.device)
        start = time.perf_counter()
        for _ in range(repeats):
            encoder.encode(pixels)
        synchronize(encoder.runtime.device)
        best = max(best, (repeats * batch_size / (time.perf_counter() - start), batch_size))
    return best


def image_naive(name: str, device: str, uris: list[str], batch_size: int = 64) -> float:
    """The original design's loop: PIL decode + resize in the main process, NCHW, fp32, fixed batch."""
    encoder = load_encoder(name, device, "fp32")
    size = encoder.preprocessing["size"]
    start = time.perf_counter()
    for first in range(0, len(uris), batch_size):
        batch = []
        for uri in uris[first:first + batch_size]:
            img = Image.open(uri).convert("RGB").resize((size, size), Image.BICUBIC)
            batch.append(TF.pil_to_tensor(img))
        x = torch.stack(batch).to(encoder.runtime.device).float()
        with torch.inference_mode():
            model = encoder._model.to(memory_format=torch.contiguous_format)
            if hasattr(model, "extract_features"):
                model.extract_features((x - 127.0) / 128.0).mean((2, 3)).cpu()
            else:
                model(x / 255.0).cpu()
    synchronize(encoder.runtime.device)
    encoder._model.to(memory_format=torch.channels_last)
    return len(uris) / (time.perf_counter() - start)


def text_model_only(encoder, texts: list[str], batch_size: int = 256) -> float:
    """Captions/s of the forward on ready (tokenised, length-sorted) batches."""
    ordered = sorted(texts, key=len)
    batches = [encoder._tokenize(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]
    encoder._forward(batches[0])
    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            encoder._forward(tokens)
    return len(texts) / (time.perf_counter() - start)


def text_naive(name: str, device: str, texts: list[str], batch_size: int = 256) -> float:
    """fp32, padded batches of 256 in file order, tokenised in the loop."""
    encoder = load_encoder(name, device, "fp32")
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            tokens = encoder._tokenizer(texts[first:first + batch_size], padding=True, truncation=True,
                                        max_length=128, return_tensors="pt").to(encoder.runtime.device)
            hidden = encoder._model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            ((hidden * mask).sum(1) / mask.sum(1)).cpu()
    return len(texts) / (time.perf_counter() - start)


def _variant(job: tuple[str, str, int]) -> dict:
    """Re-encode one image with a small change per copy, so every copy has its own bytes (its own id)."""
    source, target, copy = job
    img = Image.open(source).convert("RGB")
    if copy % 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(target, quality=95 - copy // 2 % 20)
    return {"image": Path(target).name, "captions": ["an image"], "split": "train"}


def write_variants(corpus: Path, count: int, out: Path) -> Path:
    """A corpus of `count` distinct JPEGs made from `corpus`'s images (to measure throughput at scale)."""
    import json
    from multiprocessing import get_context

    sources = sorted(str(p) for p in (corpus / "images").glob("*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(sources[i % len(sources)], str(out / f"v{i:07d}.jpg"), i // len(sources)) for i in range(count)]
    with get_context("spawn").Pool() as pool:
        records = pool.map(_variant, jobs, chunksize=256)
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--split", default="dev", help="corpus split to run end to end (dev: 1,000 images)")
    parser.add_argument("--image-encoder", default="efficientnet-lite0")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--num-workers", type=int, default=None, help="default: CPU cores - 1, at most 8")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    parser.add_argument("--naive-images", type=int, default=320, help="images for the (slow) naive loop")
    parser.add_argument("--decode", choices=["processes", "threads"], default="threads")
    parser.add_argument("--variants", type=int, default=0,
                        help="first build a corpus of this many distinct re-encoded copies (GPU-scale runs)")
    args = parser.parse_args()
    if args.variants:
        start = time.perf_counter()
        args.corpus = write_variants(args.corpus, args.variants, Path(tempfile.mkdtemp(prefix="variants-")))
        args.split = "train"
        print(f"built {args.variants} distinct images in {time.perf_counter() - start:.1f}s")

    workspace = Workspace(Path(tempfile.mkdtemp(prefix="crossalign-bench-")))
    ingest_corpus(args.corpus, workspace, "bench")
    uris = read_images(workspace, "bench", args.split).column("uri").to_pylist()
    encoder = load_encoder(args.image_encoder, args.device, args.precision)
    on_gpu = encoder.runtime.device.type == "cuda"
    print(f"{args.image_encoder} on {encoder.runtime.device} ({encoder.runtime.precision}), "
          f"{len(uris)} images of {args.corpus.name}:{args.split}, torch threads {torch.get_num_threads()}")

    limit, best_batch = image_model_only(encoder, uris, (64, 128, 256) if on_gpu else (32, 64), 30 if on_gpu else 8)
    naive = image_naive(args.image_encoder, args.device, uris[:args.naive_images])
    summary = extract_image_features(workspace, "bench", args.image_encoder, device=args.device,
                                     precision=args.precision, batch_size=args.batch_size or best_batch,
                                     num_workers=args.num_workers, split=args.split, decode=args.decode)
    print(f"end to end: {summary.seconds:.1f}s = waiting for decoded batches {summary.wait_s:.1f}s + encoder "
          f"{summary.encode_s:.1f}s + shard writes {summary.write_s:.1f}s (+ the rest)")
    rows = [("image", "model-only limit", limit, f"batch {best_batch}, channels-last, {encoder.runtime.precision}"),
            ("image", "crossalign end to end", summary.items_per_s,
             f"{args.num_workers or default_num_workers()} decode {args.decode}, draft-mode JPEG"),
            ("image", "naive loop", naive, "PIL in main process, NCHW, fp32, batch 64")]
    text_ratio = float("nan")
    if not args.skip_text:
        texts = read_captions(workspace, "bench", args.split).column("text").to_pylist()
        text_encoder = load_encoder(args.text_encoder, args.device, args.precision)
        text_limit = text_model_only(text_encoder, texts)
        text_naive_rate = text_naive(args.text_encoder, args.device, texts[:2048])
        text = extract_text_features(workspace, "bench", args.text_encoder, device=args.device,
                                     precision=args.precision, split=args.split)
        rows += [("text", "model-only limit", text_limit, f"length-sorted batches of 256, {text.precision}"),
                 ("text", "crossalign end to end", text.items_per_s, "dedup, length-sorted, threaded tokeniser"),
                 ("text", "naive loop", text_naive_rate, "fp32, padded batches of 256 in file order")]
        text_ratio = text.items_per_s / text_naive_rate

    print(f"\n{'modality':<9}{'path':<24}{'items/s':>10}  notes")
    for modality, path, rate, notes in rows:
        print(f"{modality:<9}{path:<24}{rate:>10.1f}  {notes}")
    image_vs_limit, image_vs_naive = summary.items_per_s / limit, summary.items_per_s / naive
    print(f"\nimage end to end / model-only limit: {image_vs_limit:.2f}x   image end to end / naive: "
          f"{image_vs_naive:.2f}x   text end to end / naive: {text_ratio:.2f}x   peak RSS {peak_rss_mb()} MB")
    print(f"image_vs_limit={image_vs_limit:.3f} image_vs_naive={image_vs_naive:.3f} "
          f"text_vs_naive={text_ratio:.3f} peak_rss_mb={peak_rss_mb()}")


if __name__ == "__main__":
    main()
