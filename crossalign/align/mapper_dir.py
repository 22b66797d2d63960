"""A mapper on disk: the one module that knows the layout of a workspace's `mappers/` and reads and writes it.

Layout::

    mappers/<mapper_id>/model.safetensors   weights, standardisation statistics included
    mappers/<mapper_id>/config.json         architecture, encoders, training record, mapper_id (written last)
    mappers/<mapper_id>/querybank.parquet   the query bank (absent for mappers saved before banks were)
    mappers/<mapper_id>/metrics.json        metrics on the selection split and the training history
    mappers/<mapper_id>/report.md           metrics table and recall@K plot (`crossalign.align.report`)
    mappers/<mapper_id>/recall_at_k.png
    mappers/CURRENT                         id of the workspace's current mapper

A mapper exists once its `config.json` does: `save_mapper` writes it after the weights and the bank.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from crossalign.align.mapper import JointMapper
from crossalign.align.querybank import QueryBank
from crossalign.workspace import Workspace, WorkspaceError, write_json_atomic, write_text_atomic

MAPPERS_DIR = "mappers"
CURRENT_FILE = "CURRENT"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUERYBANK_FILE = "querybank.parquet"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
RECALL_PLOT_FILE = "recall_at_k.png"


@dataclass(frozen=True)
class MapperDir:
    """One mapper's directory: its files' paths and readers (whether or not the mapper exists yet)."""

    path: Path

    @classmethod
    def of(cls, workspace: Workspace, mapper_id: str) -> MapperDir:
        """The directory of mapper `mapper_id` in `workspace`."""
        return cls(mappers_root(workspace) / mapper_id)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def querybank_path(self) -> Path:
        return self.path / QUERYBANK_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def recall_plot_path(self) -> Path:
        return self.path / RECALL_PLOT_FILE

    def exists(self) -> bool:
        """Whether a saved mapper is here (its config, written last, is)."""
        return self.config_path.exists()

    def config(self) -> dict[str, Any]:
        """The mapper's saved config. Raises FileNotFoundError when there is no mapper here."""
        return json.loads(self.config_path.read_text())

    def load(self) -> tuple[JointMapper, dict[str, Any]]:
        """The mapper (in eval mode) and its config. Raises FileNotFoundError when there is no mapper here."""
        config = self.config()
        model = JointMapper(config["image_dim"], config["text_dim"], config["dim"], depth=config.get("depth", 1),
                            hidden=config.get("hidden", 2048), blocks=config.get("blocks", 0),
                            heads=config.get("heads", 1))
        model.load_state_dict(load_file(str(self.model_path)))
        return model.eval(), config

    def querybank(self, config: dict[str, Any]) -> QueryBank | None:
        """The query bank saved with the mapper (`config` is its config), or None for a mapper saved before
        banks were."""
        if "querybank" not in config or not self.querybank_path.exists():
            return None
        table = pq.read_table(self.querybank_path)
        parts = {}
        for modality in ("text", "image"):
            rows = table.filter(pc.equal(table.column("modality"), modality))
            vectors = rows.column("vector").combine_chunks()
            keys = rows.column("key").to_pylist()
            parts[modality] = (_torch_matrix(vectors), tuple(keys) if None not in keys else ())
        return QueryBank(text=parts["text"][0], image=parts["image"][0], beta=config["querybank"]["beta"],
                         text_keys=parts["text"][1], image_keys=parts["image"][1])

    def metrics(self) -> dict[str, Any]:
        """The metrics `fit_mapper` saved. Raises FileNotFoundError when there are none (no trained mapper)."""
        return json.loads(self.metrics_path.read_text())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.metrics_path, metrics)


def _torch_matrix(vectors: pa.FixedSizeListArray) -> torch.Tensor:
    return torch.from_numpy(vectors.flatten().to_numpy().reshape(-1, vectors.type.list_size).copy())


def mappers_root(workspace: Workspace) -> Path:
    """The directory holding every mapper of `workspace`."""
    return workspace.root / MAPPERS_DIR


def list_mappers(workspace: Workspace) -> list[str]:
    """Ids of the mappers saved in `workspace`, sorted."""
    root = mappers_root(workspace)
    return sorted(p.name for p in root.iterdir() if MapperDir(p).exists()) if root.is_dir() else []


def current_mapper_id(workspace: Workspace) -> str | None:
    """The id of the workspace's current mapper, or None when none was trained yet."""
    try:
        return (mappers_root(workspace) / CURRENT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def set_current_mapper(workspace: Workspace, mapper_id: str) -> None:
    """Make `mapper_id` the workspace's current mapper (atomically)."""
    write_text_atomic(mappers_root(workspace) / CURRENT_FILE, mapper_id + "\n")


def current_mapper(workspace: Workspace) -> MapperDir:
    """The current mapper's directory.

    Raises:
        WorkspaceError: the workspace has no current mapper.
    """
    mapper_id = current_mapper_id(workspace)
    if mapper_id is None:
        raise WorkspaceError(
            f"workspace {workspace.root} has no trained mapper yet: run `crossalign run --corpus DIR "
            f"--workspace {workspace.root}` first"
        )
    return MapperDir.of(workspace, mapper_id)


def save_mapper(model: JointMapper, config: dict[str, Any], directory_root: Path,
                querybank: QueryBank | None = None) -> str:
    """Save weights (safetensors), config (JSON) and the query bank under `directory_root/<mapper_id>/`.

    The mapper id is derived from the weights and the bank, so the same training gives the same id, and
    a bank is versioned with the mapper it belongs to (`querybank.parquet`, its β in the config).

    Returns:
        The mapper id.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    bank = None
    if querybank is not None:
        bank = _querybank_table(querybank)
        digest.update(f"querybank beta={querybank.beta!r}".encode())
        for column in bank.columns:
            for chunk in column.chunks:
                for buffer in chunk.buffers():
                    digest.update(b"" if buffer is None else buffer)
        config = {**config, "querybank": {**config.get("querybank", {}), "beta": querybank.beta,
                                          "text_size": len(querybank.text), "image_size": len(querybank.image)}}
    mapper_id = "mapper-" + digest.hexdigest()[:12]
    directory = MapperDir(Path(directory_root) / mapper_id)
    directory.path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory.model_path))
    if bank is not None:
        pq.write_table(bank, directory.querybank_path)
    write_json_atomic(directory.config_path, {**config, "mapper_id": mapper_id})
    return mapper_id


def _querybank_table(bank: QueryBank) -> pa.Table:
    """The bank as one table: modality, key (the image id a row belongs to) and joint vector."""
    parts = []
    for modality, vectors, keys in (("text", bank.text, bank.text_keys), ("image", bank.image, bank.image_keys)):
        array = vectors.detach().cpu().float().contiguous().numpy()
        parts.append(pa.table({
            "modality": pa.array([modality] * len(array), pa.string()),
            "key": pa.array(list(keys) if keys else [None] * len(array), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1]),
        }))
    return pa.concat_tables(parts)


def load_mapper(directory: Path | MapperDir) -> tuple[JointMapper, dict[str, Any]]:
    """Load a saved mapper (in eval mode) and its config (`MapperDir.load`)."""
    return _mapper_dir(directory).load()


def load_querybank(directory: Path | MapperDir, config: dict[str, Any]) -> QueryBank | None:
    """The query bank saved with a mapper, or None for a mapper trained before banks were saved."""
    return _mapper_dir(directory).querybank(config)


def _mapper_dir(directory: Path | MapperDir) -> MapperDir:
    return directory if isinstance(directory, MapperDir) else MapperDir(Path(directory))
