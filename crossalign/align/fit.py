"""Train, save and evaluate a workspace's mapper: the calls the flows and the CLI make."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from crossalign.align.cca import fit_cca
from crossalign.align.data import load_paired_features
from crossalign.align.mapper import check_encoder, load_mapper, save_mapper
from crossalign.align.metrics import metrics_table, retrieval_metrics
from crossalign.align.report import recall_curves, write_report
from crossalign.align.train import TrainResult, evaluate_mapper, train_mapper
from crossalign.workspace import Workspace, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class FitSummary:
    """A trained mapper: where it is and how good it is on the evaluation split."""

    mapper_id: str
    mapper_dir: str
    best_step: int
    seconds: float
    metrics: dict[str, float]
    history: list[dict[str, float]]

    def to_dict(self) -> dict:
        return asdict(self)


def fit_mapper(
    workspace: Workspace, corpus: str, image_encoder: str, text_encoder: str, *, train_split: str = "train",
    eval_split: str = "dev", **train_options: Any,
) -> FitSummary:
    """Train a mapper on `train_split`'s cached features, select on `eval_split`, save it as current.

    Writes `mappers/<id>/model.safetensors`, `config.json` and `metrics.json`.
    """
    train = load_paired_features(workspace, corpus, train_split, image_encoder, text_encoder)
    dev = load_paired_features(workspace, corpus, eval_split, image_encoder, text_encoder)
    logger.info("training on %d images / %d captions of %s:%s; selecting on %d images of %s",
                len(train.images), len(train.captions), corpus, train_split, len(dev.images), eval_split)
    method = train_options.pop("method", "train")
    if method == "cca":  # closed form, no training: the options that shape it are dim alone
        start = time.perf_counter()
        model = fit_cca(train, train_options.get("dim"))
        result = TrainResult(model, 0, evaluate_mapper(model, dev), seconds=round(time.perf_counter() - start, 2))
    elif method == "train":
        result = train_mapper(train, dev, **train_options)
    else:
        raise ValueError(f"unknown method {method!r}: use train or cca")
    config = {
        "kind": "cca" if method == "cca" else ("linear" if train_options.get("depth", 1) == 1 else "mlp"),
        "depth": train_options.get("depth", 1), "hidden": train_options.get("hidden", 2048),
        "loss": None if method == "cca" else train_options.get("loss", "infonce"),
        "image_dim": train.images.shape[1], "text_dim": train.captions.shape[1],
        "dim": result.model.dim, "image_encoder": train.image_encoder,
        "text_encoder": train.text_encoder, "trained_on": {"corpus": corpus, "split": train_split},
        "selected_on": {"corpus": corpus, "split": eval_split}, "train_options": train_options,
        "best_step": result.best_step, "temperature": round(1.0 / result.model.scale().item(), 5),
    }
    mapper_id = save_mapper(result.model, config, workspace.root / "mappers")
    mapper_dir = workspace.mapper_dir(mapper_id)
    write_json_atomic(mapper_dir / "metrics.json", {"split": eval_split, "corpus": corpus, **result.metrics,
                                                    "history": result.history})
    write_report(mapper_dir, f"{mapper_id} on {corpus}:{eval_split}", result.metrics, recall_curves(result.model, dev))
    workspace.set_current_mapper(mapper_id)
    logger.info("mapper %s saved; %s", mapper_id, metrics_table(result.metrics).replace("\n", " "))
    return FitSummary(mapper_id, str(mapper_dir), result.best_step, result.seconds, result.metrics, result.history)


def evaluate_current_mapper(workspace: Workspace, corpus: str, split: str) -> dict[str, float]:
    """Retrieval metrics of the workspace's current mapper on `split` of `corpus` (features must exist).

    Raises:
        WorkspaceError: no mapper, or no features for the split.
        MapperMismatchError: the corpus features come from other encoders than the mapper's.
    """
    model, config = load_mapper(workspace.require_current_mapper())
    data = load_paired_features(workspace, corpus, split, config["image_encoder"]["encoder"],
                                config["text_encoder"]["encoder"])
    check_encoder(config, "image", data.image_encoder)
    check_encoder(config, "text", data.text_encoder)
    with torch.no_grad():
        metrics = retrieval_metrics(model.encode_image(data.images), model.encode_text(data.captions),
                                    data.caption_image)
    return {"mapper_id": config["mapper_id"], "corpus": corpus, "split": split, **metrics}


def reusable_mapper(workspace: Workspace, image_encoder: str, text_encoder: str) -> str | None:
    """The current mapper's id when it was trained on features of these two encoders, else None."""
    mapper_id = workspace.current_mapper_id()
    if mapper_id is None or not (workspace.mapper_dir(mapper_id) / "config.json").exists():
        return None
    _, config = load_mapper(workspace.mapper_dir(mapper_id))
    names = (config["image_encoder"]["encoder"], config["text_encoder"]["encoder"])
    return mapper_id if names == (image_encoder, text_encoder) else None
