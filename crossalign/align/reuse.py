"""Whether a run reuses the workspace's current mapper or trains a new one, and why.

A mapper is reused only when everything that made it is what the run asks for: the training data (corpus,
training and selection splits, and the identity of both feature sets: encoder, weights, preprocessing,
dim) and every training option (`TrainConfig`, and the query bank's size, seed and β). `fit_mapper`
saves that record with the mapper (`training_record`); `choose_mapper` compares it field by field.

New items in the same splits do not make a new mapper: a scheduled run embeds them with the current one
(the point of an incremental run); `retrain` trains anew.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from crossalign.align.mapper_dir import MapperDir, current_mapper_id
from crossalign.config import QueryBankConfig, TrainConfig
from crossalign.extract.features import FeatureSet
from crossalign.workspace import Workspace

RECORD_KEY = "training"  # where `fit_mapper` saves the record in the mapper's config
FEATURE_IDENTITY = ("encoder", "dim", "weights_digest", "preprocessing", "parts")  # parts: of a composite
SPLITS = ("train_split", "eval_split")
RUNTIME_OPTIONS = ("device",)  # where a mapper trains is not what it is: a GPU-trained one serves a CPU run

logger = logging.getLogger(__name__)


@dataclass
class MapperChoice:
    """The mapper a run uses: the current one (`reused`), or None for a new one to train; `reason` says why."""

    mapper_id: str | None
    reused: bool
    reason: str
    current: str | None = None  # the workspace's current mapper when the choice was made

    def to_dict(self) -> dict:
        return asdict(self)

    def outcome(self, mapper_id: str) -> str:
        """One line for people: which mapper the run used, `mapper_id` (the new one, once trained), and why."""
        if self.reused:
            return f"reused {mapper_id}: {self.reason}"
        if mapper_id == self.current:  # ids come from the weights: training ended where the current one had
            return f"trained {mapper_id} again (the same weights as before): {self.reason}"
        return f"trained a new mapper, {mapper_id}: {self.reason}"


def training_record(corpus: str, options: dict[str, Any], querybank: QueryBankConfig,
                    image_features: dict[str, Any], text_features: dict[str, Any]) -> dict[str, Any]:
    """What a mapper was made from: corpus, splits, every training option but the device (defaults filled in
    from `TrainConfig`), the query bank's options, and the identity of both feature sets (their descriptions)."""
    defaults = TrainConfig().model_dump()
    record = {
        "corpus": corpus,
        "options": {k: v for k, v in {**defaults, **options}.items() if k not in RUNTIME_OPTIONS},
        "querybank": querybank.model_dump(exclude={"method"}),  # the method only scores: any bank serves it
        "image_features": {k: image_features.get(k) for k in FEATURE_IDENTITY},
        "text_features": {k: text_features.get(k) for k in FEATURE_IDENTITY},
    }
    return json.loads(json.dumps(record))  # as the saved config holds it (tuples as lists), to compare equal


def choose_mapper(workspace: Workspace, corpus: str, image_encoder: str, text_encoder: str, train: TrainConfig,
                  querybank: QueryBankConfig, retrain: bool = False) -> MapperChoice:
    """Reuse the current mapper when its training record equals this run's, else train a new one.

    The features of both encoders must be extracted (the record holds their identity).

    Raises:
        WorkspaceError: features of an encoder were never extracted.
    """
    choice = _choose(workspace, corpus, image_encoder, text_encoder, train, querybank, retrain)
    logger.info("mapper: %s", choice.outcome(choice.mapper_id) if choice.reused else f"a new one: {choice.reason}")
    return choice


def _choose(workspace: Workspace, corpus: str, image_encoder: str, text_encoder: str, train: TrainConfig,
            querybank: QueryBankConfig, retrain: bool) -> MapperChoice:
    current = current_mapper_id(workspace)
    if retrain:
        return MapperChoice(None, False, "retrain was asked", current)
    if current is None or not MapperDir.of(workspace, current).exists():
        return MapperChoice(None, False, "the workspace has none yet")
    saved = MapperDir.of(workspace, current).config().get(RECORD_KEY)
    if saved is None:
        return MapperChoice(None, False, f"the current one, {current}, was saved without its training "
                                         "configuration (by an older crossalign)", current)
    wanted = training_record(corpus, train.model_dump(), querybank,
                             FeatureSet.open(workspace, corpus, image_encoder).encoder,
                             FeatureSet.open(workspace, corpus, text_encoder).encoder)
    changed = _differences(saved, wanted)
    if changed:
        return MapperChoice(None, False, f"the current one, {current}, was trained with {'; '.join(changed)}",
                            current)
    options = wanted["options"]
    return MapperChoice(current, True, current=current, reason=(
        f"trained on the same data ({corpus}:{options['train_split']}, selected on {options['eval_split']}, "
        f"features of {wanted['image_features']['encoder']} and {wanted['text_features']['encoder']}) with the "
        "same training options"))


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'<field> <saved> (this run: <wanted>)' for each field that differs, data first, options by name."""
    changed = []
    for section in ("corpus", "image_features", "text_features", "querybank", "options"):
        old, new = saved.get(section), wanted[section]
        if isinstance(new, dict):
            old = old if isinstance(old, dict) else {}
            keys = sorted(set(old) | set(new), key=lambda k: (k not in SPLITS, k))  # splits first: data
            changed += [f"{_field(section, k)} {_short(old.get(k))} (this run: {_short(new.get(k))})"
                        for k in keys if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(f"{section} {_short(old)} (this run: {_short(new)})")
    return changed


def _field(section: str, key: str) -> str:
    return key if section == "options" else f"{section}.{key}"


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 60 else text[:59] + "…"
