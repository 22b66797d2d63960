"""GPU smoke check: extraction runs on CUDA and gives the CPU fp32 features.

Run on a machine with a GPU: `python benchmarks/gpu_smoke.py [N_IMAGES]`. It writes a synthetic corpus,
extracts image features on CUDA (auto precision and decode: processes, pinned memory; bf16 with decode
threads; then nvJPEG decode on the GPU, and nvImageCodec's where it is installed) and on the CPU in
fp32, compares them per item, runs a Hugging Face text encoder (a randomly initialised BERT, so no
weights are needed) on both devices, and prints throughput. The last line is machine-readable.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crossalign.config import CorpusConfig, ExtractConfig
from crossalign.corpus import ingest_corpus
from crossalign.encoders import load_encoder, resolve_runtime
from crossalign.encoders.hf_text import HFTextEncoder
from crossalign.extract import extract_image_features, read_features
from crossalign.extract.gpu_decode import import_nvimgcodec
from crossalign.workspace import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_corpus  # noqa: E402  (the tests' real-image corpus writer)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def tiny_bert_dir(root: Path) -> Path:
    """A randomly initialised 2-layer BERT saved with a word-piece tokenizer (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "a", "dog", "cat", "runs"]
    (root / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256)).save_pretrained(root)
    return root


def add_awkward_images(corpus: Path) -> int:
    """Images nvJPEG must hand to the CPU path: PNG, CMYK, greyscale; and a progressive JPEG it decodes."""
    from PIL import Image

    picture = Image.open(sorted((corpus / "images").glob("*.jpg"))[0]).convert("RGB")
    made = {
        "awkward_png.png": lambda p: picture.save(p),
        "awkward_cmyk.jpg": lambda p: picture.convert("CMYK").save(p, quality=90),
        "awkward_grey.jpg": lambda p: picture.convert("L").save(p, quality=90),
        "awkward_progressive.jpg": lambda p: picture.rotate(90, expand=True).save(p, quality=90, progressive=True),
    }
    with (corpus / "captions.jsonl").open("a") as lines:
        for name, save in made.items():
            save(corpus / "images" / name)
            lines.write(json.dumps({"image": f"images/{name}", "captions": [name], "split": "train"}) + "\n")
    return len(made)


def nvimgcodec_installed() -> bool:
    try:
        import_nvimgcodec()
    except ImportError:
        return False
    return True


def main(n_images: int) -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    root = Path(tempfile.mkdtemp())
    corpus = write_tiny_corpus(root / "corpus", n_train=n_images - n_images // 5, n_dev=n_images // 5)
    extra = add_awkward_images(corpus)
    n_images += extra

    timings = {}
    runs = (("gpu", "cuda", "auto", "auto"), ("gpu-bf16", "cuda", "bf16", "threads"),
            ("gpu-nvjpeg", "cuda", "fp32", "nvjpeg"), ("cpu", "cpu", "fp32", "threads"))
    if nvimgcodec_installed():
        runs += (("gpu-nvimgcodec", "cuda", "fp32", "nvimgcodec"),)
    for name, device, precision, decode in runs:
        ingest_corpus(CorpusConfig(root=corpus, name="c"), Workspace(root / name))
        start = time.perf_counter()
        config = ExtractConfig(image_encoder="efficientnet-lite0", device=device, precision=precision,
                               image_batch_size=128, num_workers=4, shard_size=256, decode=decode)
        summary = extract_image_features(Workspace(root / name), "c", config)
        timings[name] = time.perf_counter() - start
        print(f"{name}: {summary.encoded} images, {summary.items_per_s}/s, precision {summary.precision}, "
              f"decode {decode}, failed {summary.failed}")
        assert summary.encoded == n_images and summary.failed == 0
    ids, gpu = read_features(Workspace(root / "gpu").features_dir("c", "efficientnet-lite0"))
    _, cpu = read_features(Workspace(root / "cpu").features_dir("c", "efficientnet-lite0"), ids)
    image_cos = cosine_rows(gpu, cpu)
    _, bf16 = read_features(Workspace(root / "gpu-bf16").features_dir("c", "efficientnet-lite0"), ids)
    _, nvjpeg = read_features(Workspace(root / "gpu-nvjpeg").features_dir("c", "efficientnet-lite0"), ids)
    nvjpeg_cos = cosine_rows(nvjpeg, cpu)
    if "gpu-nvimgcodec" in timings:
        _, nvimgcodec = read_features(Workspace(root / "gpu-nvimgcodec").features_dir("c", "efficientnet-lite0"), ids)
        cosine = cosine_rows(nvimgcodec, cpu)
        print(f"image features cuda-fp32 nvImageCodec decode vs cpu-fp32 PIL decode: min cosine {cosine.min():.5f}, "
              f"mean {cosine.mean():.5f}, below 0.999: {(cosine < 0.999).sum()} of {len(ids)}")
    print(f"image features cuda-bf16 vs cpu-fp32: min cosine {cosine_rows(bf16, cpu).min():.5f}")
    print(f"image features cuda-auto vs cpu-fp32: min cosine {image_cos.min():.5f}, mean {image_cos.mean():.5f}")
    print(f"image features cuda-fp32 nvJPEG decode vs cpu-fp32 PIL decode: min cosine {nvjpeg_cos.min():.5f}, "
          f"mean {nvjpeg_cos.mean():.5f}, below 0.999: {(nvjpeg_cos < 0.999).sum()} of {len(ids)}")

    # Model-only forward on ready tensors at the same batch size, for the end-to-end ratio.
    encoder = load_encoder("efficientnet-lite0", "cuda", "auto")
    batch = torch.randint(0, 255, (128, 3, 224, 224), dtype=torch.uint8).pin_memory()
    for _ in range(3):
        encoder.encode(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        encoder.encode(batch)
    torch.cuda.synchronize()
    model_only = 20 * 128 / (time.perf_counter() - start)
    print(f"model-only efficientnet-lite0 on cuda ({encoder.runtime.precision}, batch 128): {model_only:.0f} images/s")

    bert = tiny_bert_dir(root / "bert")
    texts = ["a dog runs", "a cat", "dog dog cat runs a"] * 50
    on_gpu = HFTextEncoder("tiny-bert", bert, resolve_runtime("cuda", "fp32")).encode(texts).numpy()
    on_cpu = HFTextEncoder("tiny-bert", bert, resolve_runtime("cpu", "fp32")).encode(texts).numpy()
    text_cos = cosine_rows(on_gpu, on_cpu)
    print(f"text features cuda vs cpu (random BERT, fp32): min cosine {text_cos.min():.5f}")
    assert image_cos.min() >= 0.999 and text_cos.min() >= 0.999
    print(f"image_min_cosine={image_cos.min():.5f} text_min_cosine={text_cos.min():.5f} "
          f"model_only_images_per_s={model_only:.0f} gpu_s={timings['gpu']:.2f} cpu_s={timings['cpu']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
