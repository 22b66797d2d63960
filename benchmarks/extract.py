"""Extraction speed, side by side in one run: model-only limit, crossalign end to end, a naive loop.

    python benchmarks/extract.py [--corpus ../shared/data/flickr8k] [--split dev]
    python benchmarks/extract.py --image-encoder torchvision:resnet50@random --device cuda --precision bf16 \
        --variants 20000 --skip-text --decode threads,nvjpeg

Images: the model-only limit is the encoder's forward on ready uint8 tensors (best batch size,
channels-last, the run's precision); end to end is `extract_image_features` (decode in spawned
workers -> features on disk); the naive loop decodes with PIL in the main process and runs NCHW fp32
batches of 64, as the original design wrote it. Text: the same three for the captions (naive =
fp32 padded batches of 256 in file order). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.encoders import load_encoder
from crossalign.extract import extract_image_features, extract_text_features, read_features
from crossalign.extract.extract import (
    DECODE_MODES,
    NVJPEG_READERS,
    ImageFiles,
    default_num_workers,
    nvjpeg_batches,
    threaded_batches,
)
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


def image_decode_only(encoder, uris: list[str], statuses: list[str], decode: str, batch_size: int,
                      workers: int) -> float:
    """Images/s of the decode path alone (no model): the ceiling of end to end with that path."""
    if decode == "nvjpeg":
        batches = nvjpeg_batches(uris, [s == "ok" for s in statuses], encoder.preprocess, encoder.size, batch_size,
                                 workers, encoder.runtime.device)
    elif decode == "threads":
        batches = threaded_batches(ImageFiles(uris, encoder.preprocess, encoder.size), batch_size, workers,
                                   pin=encoder.runtime.device.type == "cuda")
    else:
        return float("nan")
    start = time.perf_counter()
    for _ in batches:
        pass
    synchronize(encoder.runtime.device)
    return len(uris) / (time.perf_counter() - start)


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


RSS_CHILD = """
import json, resource, sys
from crossalign.extract import extract_image_features
from crossalign.workspace import Workspace
summary = extract_image_features(Workspace(sys.argv[1]), sys.argv[2], sys.argv[3], device=sys.argv[4],
                                 precision=sys.argv[5], split=sys.argv[6])
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"images": summary.encoded, "peak_rss_mb": peak_rss_mb}))
"""


def extraction_rss(corpus: Path, split: str, sizes: list[int], args: argparse.Namespace) -> list[tuple[int, int]]:
    """Peak RSS of image extraction in a fresh process, on the first N images of `split` for each N."""
    import json
    import subprocess
    import sys

    records = [line for line in (corpus / "captions.jsonl").read_text().splitlines()
               if json.loads(line).get("split", "train") == split]
    results = []
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix="crossalign-rss-"))
        (root / "captions.jsonl").write_text("".join(line + "\n" for line in records[:size]))
        for record in records[:size]:  # the images, copied, so the subset is a corpus of its own
            image = json.loads(record)["image"]
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(corpus / image, root / image)
        workspace = root / "ws"
        ingest_corpus(root, Workspace(workspace), "rss")
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(workspace), "rss", args.image_encoder,
                              args.device, args.precision, split], capture_output=True, text=True, check=True)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        results.append((stats["images"], stats["peak_rss_mb"]))
        print(f"extraction of {stats['images']} images in a fresh process: peak RSS {stats['peak_rss_mb']} MB")
    return results


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
    parser.add_argument("--decode", default="threads",
                        help=f"decode mode(s) end to end, comma-separated, from {', '.join(DECODE_MODES)}; "
                        "each is run and the fastest gives the ratios")
    parser.add_argument("--variants", type=int, default=0,
                        help="first build a corpus of this many distinct re-encoded copies (GPU-scale runs)")
    parser.add_argument("--rss-sizes", default="",
                        help="comma-separated corpus sizes: extract the first N images of the split in a fresh "
                        "process each and print its peak RSS (does memory grow with the corpus?)")
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
    rows = [("image", "model-only limit", limit, f"batch {best_batch}, channels-last, {encoder.runtime.precision}")]
    summary, first_features = None, None
    for decode in args.decode.split(","):
        features_dir = workspace.features_dir("bench", encoder.name)
        if first_features is None and features_dir.exists():
            first_features = read_features(features_dir)
        shutil.rmtree(features_dir, ignore_errors=True)
        run = extract_image_features(workspace, "bench", args.image_encoder, device=args.device,
                                     precision=args.precision, batch_size=args.batch_size or best_batch,
                                     num_workers=args.num_workers, split=args.split, decode=decode)
        print(f"end to end, decode {decode}: {run.seconds:.1f}s = waiting for decoded batches {run.wait_s:.1f}s + "
              f"encoder {run.encode_s:.1f}s + shard writes {run.write_s:.1f}s (+ the rest)")
        workers = args.num_workers or default_num_workers()
        notes = {"nvjpeg": f"{min(NVJPEG_READERS, workers)} reader threads, nvJPEG + resize on the GPU",
                 "threads": f"{workers} decode threads, draft-mode JPEG",
                 "processes": f"{workers} spawned decode processes, draft-mode JPEG"}[decode]
        rows.append(("image", f"end to end ({decode})", run.items_per_s, notes))
        statuses = read_images(workspace, "bench", args.split).column("status").to_pylist()
        rows.append(("image", f"decode only ({decode})", image_decode_only(
            encoder, uris, statuses, decode, args.batch_size or best_batch, workers), "no model: the path's ceiling"))
        if first_features is not None:  # the same images through another decode path: features must agree
            ids, reference = first_features
            _, vectors = read_features(features_dir, ids)
            cosine = (torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)
                      * torch.nn.functional.normalize(torch.from_numpy(reference), dim=1)).sum(1)
            print(f"decode {decode} vs the first mode, per image: min cosine {cosine.min():.5f}, "
                  f"mean {cosine.mean():.5f}, below 0.999: {int((cosine < 0.999).sum())} of {len(ids)}")
        summary = run if summary is None or run.items_per_s > summary.items_per_s else summary
    rows.append(("image", "naive loop", naive, "PIL in main process, NCHW, fp32, batch 64"))
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

    if args.rss_sizes:
        extraction_rss(args.corpus, args.split, [int(n) for n in args.rss_sizes.split(",")], args)

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
