"""Train, save and evaluate a workspace's mapper: the calls the flows and the CLI make."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from crossalign.align.cca import fit_cca
from crossalign.align.data import PairedSplit, open_split
from crossalign.align.evaluation import evaluate_normalised, joint_vectors, model_device
from crossalign.align.mapper import JointMapper, check_encoder
from crossalign.align.mapper_dir import MapperDir, current_mapper, mappers_root, save_mapper, set_current_mapper
from crossalign.align.metrics import metrics_table, normalised_metrics
from crossalign.align.querybank import QueryBank, check_method, ids_at, sample_rows
from crossalign.align.report import recall_curves, write_report
from crossalign.align.reuse import RECORD_KEY, training_record
from crossalign.align.rows import Rows, chunk_rows
from crossalign.align.train import TrainResult, evaluate_mapper, train_mapper
from crossalign.config import QueryBankConfig, TrainConfig
from crossalign.workspace import Workspace

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
    workspace: Workspace, corpus: str, image_encoder: str, text_encoder: str, config: TrainConfig | None = None,
    querybank: QueryBankConfig | None = None,
) -> FitSummary:
    """Train a mapper as `config` says (default `TrainConfig()`) on the cached features of its `train_split`,
    select on its `eval_split`, and save it as the workspace's current mapper.

    The mapper is selected on raw cosine scores; then its query bank (`querybank.size` vectors of each
    modality of the training split) is saved with it, and the reported metrics are those search gives
    under `querybank.method`, with the raw ones beside them (`<key>_raw`).
    Writes the mapper's directory (`MapperDir`): weights, query bank, config (with the training record
    that `choose_mapper` compares), metrics and report.
    """
    config, querybank = config or TrainConfig(), querybank or QueryBankConfig()
    train_split, eval_split, method = config.train_split, config.eval_split, config.method
    train_options = config.model_dump(exclude={"train_split", "eval_split", "method"})
    train = open_split(workspace, corpus, train_split, image_encoder, text_encoder)
    dev = open_split(workspace, corpus, eval_split, image_encoder, text_encoder)
    logger.info("training on %d images / %d captions of %s:%s; selecting on %d images of %s",
                len(train.image_rows), len(train.caption_rows), corpus, train_split, len(dev.image_rows), eval_split)
    if method == "cca":  # closed form, no training: the options that shape it are dim alone
        start = time.perf_counter()
        model = fit_cca(train, config.dim)
        result = TrainResult(model, 0, evaluate_mapper(model, dev), seconds=round(time.perf_counter() - start, 2))
    else:
        result = train_mapper(train, dev, **train_options)
    start = time.perf_counter()
    bank = build_querybank(result.model, train, querybank)
    with joint_vectors(result.model, dev) as (image_emb, text_emb):
        metrics = normalised_metrics(image_emb, text_emb, dev.pairs, bank, querybank.method, dev.image_keys())
        curves = recall_curves(image_emb, text_emb, dev.pairs, bank, querybank.method, dev.image_keys())
    bank_seconds = round(time.perf_counter() - start, 2)
    saved = {
        "kind": _kind(config),
        "depth": config.depth, "hidden": config.hidden, "blocks": config.blocks, "heads": config.heads,
        "loss": None if method == "cca" else config.loss,
        "image_dim": train.image_rows.dim, "text_dim": train.caption_rows.dim,
        "dim": result.model.dim, "image_encoder": train.image_encoder,
        "text_encoder": train.text_encoder, "trained_on": {"corpus": corpus, "split": train_split},
        "selected_on": {"corpus": corpus, "split": eval_split}, "train_options": train_options,
        "best_step": result.best_step, "temperature": _temperature(result.model),
        "querybank": {"split": train_split, "seed": querybank.seed, "method": querybank.method},
        RECORD_KEY: training_record(corpus, config.model_dump(), querybank, train.image_encoder, train.text_encoder),
    }
    mapper_id = save_mapper(result.model, saved, mappers_root(workspace), bank)
    mapper_dir = MapperDir.of(workspace, mapper_id)
    mapper_dir.write_metrics({"split": eval_split, "corpus": corpus, **metrics, "history": result.history})
    write_report(mapper_dir, f"{mapper_id} on {corpus}:{eval_split}", metrics, curves)
    set_current_mapper(workspace, mapper_id)
    logger.info("mapper %s saved (query bank and dev metrics in %.1fs); %s", mapper_id, bank_seconds,
                metrics_table(metrics).replace("\n", " "))
    return FitSummary(mapper_id, str(mapper_dir.path), result.best_step, result.seconds, metrics, result.history)


def _temperature(model: JointMapper) -> float | list[float]:
    temperatures = [round(1.0 / scale, 5) for scale in model.scale().flatten().tolist()]
    return temperatures[0] if len(temperatures) == 1 else temperatures


def _kind(config: TrainConfig) -> str:
    if config.method == "cca":
        return "cca"
    if config.blocks:
        return "residual"
    return "linear" if config.depth == 1 else "mlp"


@torch.no_grad()
def build_querybank(model: JointMapper, train: PairedSplit, config: QueryBankConfig) -> QueryBank:
    """The mapper's query bank: joint vectors of up to `config.size` training captions and images (a random
    subsample of each when there are more, read by row), keyed by the image each belongs to."""
    model.eval()
    device = model_device(model)
    captions = sample_rows(len(train.caption_rows), config.size, config.seed).numpy()
    images = sample_rows(len(train.image_rows), config.size, config.seed).numpy()
    keys = train.image_keys()
    return QueryBank(text=_encode_taken(model.encode_text, train.caption_rows, captions, device),
                     image=_encode_taken(model.encode_image, train.image_rows, images, device),
                     beta=config.beta, text_keys=tuple(ids_at(keys, train.pairs[captions])),
                     image_keys=tuple(ids_at(keys, images)))


def _encode_taken(encode, rows: Rows, taken: np.ndarray, device: torch.device) -> torch.Tensor:
    step = chunk_rows(rows.dim)
    return torch.cat([encode(rows.take(taken[start:start + step]).to(device)).float().cpu()
                      for start in range(0, len(taken), step)])


def evaluate_current_mapper(workspace: Workspace, corpus: str, split: str,
                            method: str | None = None) -> dict[str, Any]:
    """Retrieval metrics of the workspace's current mapper on `split` of `corpus` (features must exist):
    scored as search scores them under `method` (default: `QueryBankConfig().method`), with the raw
    metrics beside them (`<key>_raw`); a mapper saved without a query bank reports raw scores.

    Raises:
        WorkspaceError: no mapper, or no features for the split.
        MapperMismatchError: the corpus features come from other encoders than the mapper's.
    """
    method = check_method(method or QueryBankConfig().method)
    mapper_dir = current_mapper(workspace)
    model, config = mapper_dir.load()
    data = open_split(workspace, corpus, split, config["image_encoder"]["encoder"], config["text_encoder"]["encoder"])
    check_encoder(config, "image", data.image_encoder)
    check_encoder(config, "text", data.text_encoder)
    metrics = evaluate_normalised(model, data, mapper_dir.querybank(config), method)
    return {"mapper_id": config["mapper_id"], "corpus": corpus, "split": split, **metrics}
