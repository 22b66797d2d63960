"""Retrieval quality of each mapper configuration on Flickr8k dev, raw and query-bank normalised; the
normalisation's β and bank size; data efficiency; Fashion-MNIST zero-shot.

    python benchmarks/quality.py [--corpus ../shared/data/flickr8k] [--workspace DIR] [--skip-fmnist]
                                 [--only NAME-SUBSTRING ...] [--skip-sweeps] [--skip-efficiency]

Features are extracted once into the workspace (default: a folder under the temp dir, reused by
later runs), then every configuration is trained on `train` (selected on `dev` by raw rsum, as
`crossalign train` does), its query bank built from `train` as `crossalign train` builds it, and
evaluated on `dev` with the one retrieval protocol of `crossalign.align.metrics`: raw cosine, and
normalised as search ranks (inverted softmax over the bank, the default). Fashion-MNIST: a mapper is
trained on the train images with their templated captions, then the 10,000 test images are
classified by their nearest class prompt. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crossalign.align.cca import fit_cca
from crossalign.align.data import PairedFeatures, load_paired_features
from crossalign.align.fit import build_querybank
from crossalign.align.metrics import normalised_metrics
from crossalign.align.querybank import METHODS
from crossalign.align.train import split_fraction, train_mapper
from crossalign.align.zeroshot import zero_shot_accuracy
from crossalign.config import CorpusConfig, ExtractConfig, QueryBankConfig
from crossalign.corpus import ingest_corpus, read_images
from crossalign.corpus.fashion_mnist import CLASS_NAMES, TEMPLATES, write_fashion_mnist_corpus
from crossalign.encoders import load_encoder
from crossalign.extract import extract_image_features, extract_text_features
from crossalign.workspace import Workspace

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2+flip"
MINILM, MPNET = "minilm-l6", "mpnet-base"
BOTH, BOTH_TEXT = f"{LITE0},{LITE2}", f"{MINILM},{MPNET}"
DEFAULT_IMAGE, DEFAULT_TEXT = ExtractConfig().image_encoder, ExtractConfig().text_encoder


@dataclass(frozen=True)
class Config:
    name: str
    image_encoder: str = LITE2
    text_encoder: str = MINILM
    method: str = "train"  # or "cca"
    options: dict = field(default_factory=dict)


# The previous defaults (1,024-d, lr 1e-3, input dropout 0.5, 1,500 steps), so that earlier rows keep their meaning.
BEFORE = {"dim": 1024, "lr": 1e-3, "input_dropout": 0.5, "steps": 1500}
TUNED = {"dim": 1024, "lr": 3e-3, "input_dropout": 0.6, "steps": 1500}  # the previous best's options
# The product's default is the row whose encoders and options are the config's defaults (`is_default`).
CONFIGS = (
    Config("reference: margin loss, linear, Lite0, MiniLM (the original design)", image_encoder=LITE0,
           options={**BEFORE, "loss": "margin"}),
    Config("CCA (closed form), Lite0, MiniLM", image_encoder=LITE0, method="cca"),
    Config("VSE++, linear, Lite0, MiniLM", image_encoder=LITE0, options={**BEFORE, "loss": "vsepp"}),
    Config("InfoNCE, MLP (2 layers), Lite0, MiniLM", image_encoder=LITE0,
           options={**BEFORE, "depth": 2, "dropout": 0.2}),
    Config("InfoNCE, linear, Lite0, MiniLM (fast)", image_encoder=LITE0, options=BEFORE),
    Config("InfoNCE, linear, Lite2+flip, MiniLM (the previous default)", options=BEFORE),
    Config("InfoNCE, linear, Lite0 + Lite2+flip, MiniLM, dropout 0.6, lr 3e-3 (the previous best)",
           image_encoder=BOTH, options=TUNED),
    Config("InfoNCE, linear, Lite2+flip, mpnet", text_encoder=MPNET, options=BEFORE),
    Config("InfoNCE, linear, Lite0 + Lite2+flip, mpnet, dropout 0.6, lr 3e-3", image_encoder=BOTH,
           text_encoder=MPNET, options=TUNED),
    Config("same, MiniLM + mpnet", image_encoder=BOTH, text_encoder=BOTH_TEXT, options=TUNED),
    Config("same, 512-d, 1,200 steps (the default)", image_encoder=BOTH, text_encoder=BOTH_TEXT),
    Config("default + latent mixup α 0.4 (FuseMix)", image_encoder=BOTH, text_encoder=BOTH_TEXT,
           options={"mixup_alpha": 0.4}),
    Config("default + 1 residual adapter block (FuseMix), 1,024 wide", image_encoder=BOTH, text_encoder=BOTH_TEXT,
           options={"blocks": 1, "hidden": 1024}),
    Config("default, batch 1,024, 1,500 steps", image_encoder=BOTH, text_encoder=BOTH_TEXT,
           options={"batch_size": 1024, "steps": 1500}),
    Config("3 heads x 1,024-d, batch 1,024, 1,500 steps, input dropout 0.7 (best)", image_encoder=BOTH,
           text_encoder=BOTH_TEXT, options={"heads": 3, "dim": 3072, "batch_size": 1024, "steps": 1500,
                                            "input_dropout": 0.7}),
)


def is_default(config: Config) -> bool:
    return (config.image_encoder, config.text_encoder, config.method, config.options) == (
        DEFAULT_IMAGE, DEFAULT_TEXT, "train", {})


REFERENCE = CONFIGS[0].name


def extract(workspace: Workspace, corpus: str, image_encoders: set[str], text_encoders: set[str]) -> dict[str, float]:
    """Features for every encoder the configurations need (what exists is reused); seconds per encoder."""
    seconds = {}
    for name in sorted(image_encoders):
        summary = extract_image_features(workspace, corpus, ExtractConfig(image_encoder=name))
        seconds[name] = summary.seconds
        print(f"features {name}: {summary.encoded} new, {summary.already_done} reused ({summary.items_per_s}/s)")
    for name in sorted(text_encoders):
        summary = extract_text_features(workspace, corpus, ExtractConfig(text_encoder=name))
        seconds[name] = summary.seconds
        print(f"features {name}: {summary.encoded} new, {summary.already_done} reused ({summary.items_per_s}/s)")
    return seconds


def evaluate(model: torch.nn.Module, train: PairedFeatures, dev: PairedFeatures,
             bank_config: QueryBankConfig) -> dict:
    """Dev metrics normalised as search ranks (and raw, as `<key>_raw`), with the bank built from train."""
    bank = build_querybank(model, train, bank_config)
    with torch.no_grad():
        images, texts = model.encode_image(dev.images), model.encode_text(dev.captions)
    return normalised_metrics(images, texts, dev.caption_image, bank, bank_config.method, dev.image_ids)


def run_config(workspace: Workspace, corpus: str, config: Config) -> dict:
    train = load_paired_features(workspace, corpus, "train", config.image_encoder, config.text_encoder)
    dev = load_paired_features(workspace, corpus, "dev", config.image_encoder, config.text_encoder)
    start = time.perf_counter()
    model = fit_cca(train) if config.method == "cca" else train_mapper(train, dev, **config.options).model
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(model, train, dev, QueryBankConfig())
    return {"config": config.name, **metrics, "seconds": seconds, "bank_seconds": time.perf_counter() - start,
            "model": model}


def sweeps(workspace: Workspace, corpus: str, config: Config, model: torch.nn.Module) -> None:
    """Dev rsum of one trained mapper under each normalisation, β and bank size (the choices of QueryBankConfig)."""
    train = load_paired_features(workspace, corpus, "train", config.image_encoder, config.text_encoder)
    dev = load_paired_features(workspace, corpus, "dev", config.image_encoder, config.text_encoder)
    base = QueryBankConfig()
    print(f"\nnormalisation of {config.name!r} on dev (rsum; raw cosine: "
          f"{evaluate(model, train, dev, replace_method(base, 'none'))['rsum']:.1f})")
    print("| method | β | bank (captions / images) | rsum | t2i R@1 | i2t R@1 |\n|---|---:|---|---:|---:|---:|")
    for method in METHODS[1:]:
        for beta in (10.0, 15.0, 20.0, 30.0, 50.0):
            for size in (1_000, 5_000, base.size, 10**9):
                if beta != base.beta and size != base.size:
                    continue  # β at the default size, sizes at the default β
                bank = base.model_copy(update={"method": method, "beta": beta, "size": size})
                m = evaluate(model, train, dev, bank)
                sizes = f"{min(size, len(train.captions)):,} / {min(size, len(train.images)):,}"
                print(f"| {method} | {beta:g} | {sizes} | {m['rsum']:.1f} | {m['t2i_r1']:.1f} | {m['i2t_r1']:.1f} |",
                      flush=True)


def replace_method(config: QueryBankConfig, method: str) -> QueryBankConfig:
    return config.model_copy(update={"method": method})


def data_efficiency(workspace: Workspace, corpus: str, config: Config) -> list[tuple[float, float, float]]:
    """Dev rsum (normalised, raw) of `config` trained on a fraction of the train images."""
    train = load_paired_features(workspace, corpus, "train", config.image_encoder, config.text_encoder)
    dev = load_paired_features(workspace, corpus, "dev", config.image_encoder, config.text_encoder)
    rows = []
    for fraction in (0.1, 0.25, 0.5, 1.0):
        part = split_fraction(train, fraction)
        metrics = evaluate(train_mapper(part, dev, **config.options).model, part, dev, QueryBankConfig())
        rows.append((fraction, metrics["rsum"], metrics["rsum_raw"]))
    return rows


def fashion_mnist_zero_shot(root: Path, n_train: int) -> float:
    """Top-1 accuracy on the 10,000 Fashion-MNIST test images of a mapper trained on `n_train` train images."""
    corpus_root = write_fashion_mnist_corpus(root / "corpus", n_train=n_train, n_dev=10_000)
    workspace = Workspace(root / "ws")
    ingest_corpus(CorpusConfig(root=corpus_root, name="fmnist"), workspace)
    extract(workspace, "fmnist", {LITE0}, {MINILM})  # 16,000 images: the fast encoders
    train = load_paired_features(workspace, "fmnist", "train", LITE0, MINILM)
    test = load_paired_features(workspace, "fmnist", "dev", LITE0, MINILM)
    model = train_mapper(train, test).model
    labels_by_path = {str((corpus_root / r["image"]).resolve()): CLASS_NAMES.index(r["label"])
                      for r in map(json.loads, (corpus_root / "captions.jsonl").read_text().splitlines())}
    uri_by_id = dict(zip(*(read_images(workspace, "fmnist", "dev").column(c).to_pylist() for c in ("image_id", "uri"))))
    labels = [labels_by_path[uri_by_id[image_id]] for image_id in test.image_ids]
    names = [("an " if name[0] in "aeiou" else "a ") + name for name in CLASS_NAMES]
    return zero_shot_accuracy(model, load_encoder(MINILM), test.images, labels, names, TEMPLATES)


def print_table(rows: list[dict]) -> None:
    print("\nFlickr8k dev, 1,000 images x 5 captions; trained on train (6,000 images). R@K in percent;")
    print("normalised = inverted softmax over the train query bank (what search ranks by); raw = cosine.\n")
    print("| configuration | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | rsum | raw t2i R@1 | raw i2t R@1 "
          "| raw rsum | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | {r['i2t_r1']:.1f} "
              f"| {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} | **{r['rsum']:.1f}** | {r['t2i_r1_raw']:.1f} "
              f"| {r['i2t_r1_raw']:.1f} | {r['rsum_raw']:.1f} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "crossalign-quality")
    parser.add_argument("--corpus-name", default="flickr8k")
    parser.add_argument("--only", nargs="*", default=None, help="Run only configurations whose name contains one "
                        "of these strings (the reference and the default always run).")
    parser.add_argument("--skip-fmnist", action="store_true")
    parser.add_argument("--fmnist-train", type=int, default=6000, help="Fashion-MNIST train images for the mapper")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--skip-sweeps", action="store_true", help="Skip the normalisation / β / bank-size sweep.")
    args = parser.parse_args()

    configs = [c for c in CONFIGS if args.only is None or c.name == REFERENCE or is_default(c)
               or any(s in c.name for s in args.only)]
    if not any(is_default(c) for c in configs):
        configs.append(Config("the default configuration", image_encoder=DEFAULT_IMAGE, text_encoder=DEFAULT_TEXT))
    workspace = Workspace(args.workspace)
    ingest_corpus(CorpusConfig(root=args.corpus, name=args.corpus_name), workspace)
    extraction = extract(workspace, args.corpus_name, {p for c in configs for p in c.image_encoder.split(",")},
                         {c.text_encoder for c in configs})
    rows = []
    for config in configs:
        rows.append(run_config(workspace, args.corpus_name, config))
        row = rows[-1]
        print(f"{row['config']}: rsum {row['rsum']:.1f} (raw {row['rsum_raw']:.1f}; train {row['seconds']:.0f}s, "
              f"bank + normalised evaluation {row['bank_seconds']:.1f}s)", flush=True)
    print_table(rows)
    print("\nfeature extraction this run (s, 0 when reused): "
          + ", ".join(f"{name} {seconds:.0f}" for name, seconds in extraction.items()))

    default_index = next(i for i, c in enumerate(configs) if is_default(c))
    default = rows[default_index]
    if not args.skip_sweeps:
        sweeps(workspace, args.corpus_name, configs[default_index], default["model"])
    if not args.skip_efficiency:
        print("\ndata efficiency (default configuration): dev rsum normalised (raw)")
        for fraction, rsum, raw in data_efficiency(workspace, args.corpus_name, configs[default_index]):
            print(f"  {fraction:>4.0%} of the train images: {rsum:.1f} ({raw:.1f})")

    zero_shot = float("nan")
    if not args.skip_fmnist:
        zero_shot = fashion_mnist_zero_shot(args.workspace / "fashion-mnist", args.fmnist_train)
        print(f"\nFashion-MNIST zero-shot top-1 on the 10,000 test images (Lite0 + MiniLM, mapper trained on "
              f"{args.fmnist_train} train images with templated captions): {zero_shot:.4f}")

    reference = next(r for r in rows if r["config"] == REFERENCE)
    best = max(rows, key=lambda r: r["rsum"])
    print(f"\nbest: {best['config']} (rsum {best['rsum']:.1f}, raw {best['rsum_raw']:.1f}); default: "
          f"{default['config']} (rsum {default['rsum']:.1f}, raw {default['rsum_raw']:.1f})")
    print(f"rsum_dev={default['rsum']:.1f} rsum_best={best['rsum']:.1f} rsum_reference={reference['rsum']:.1f} "
          f"zeroshot_fmnist={zero_shot:.4f} train_seconds={default['seconds']:.1f} "
          f"rsum_dev_raw={default['rsum_raw']:.1f} rsum_best_raw={best['rsum_raw']:.1f}")


if __name__ == "__main__":
    main()
