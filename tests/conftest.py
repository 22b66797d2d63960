"""Shared fixtures and helpers: a tiny real corpus of synthetic pictures, and an empty workspace."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No telemetry from any library, and a patient start for Prefect's server: set before Prefect is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Library calls outside a flow run log without warning that they have no run to send logs to (as the CLI).
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import prefect  # noqa: F401 - Prefect builds its console log handlers on import: on the session's stderr here,
import pytest  # not inside a CliRunner call, whose stderr is closed once the call returns
from PIL import Image, ImageDraw

from crossalign.config import CorpusConfig, ExtractConfig
from crossalign.corpus import ingest_corpus
from crossalign.extract import extract_image_features, extract_text_features
from crossalign.workspace import Workspace

IMAGE_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "minilm-l6"
# Tests run the encoders on the CPU in fp32 so that features are the same wherever the suite runs;
# load_encoder caches per (name, device, precision), so every module shares one load.
ENCODER_RUNTIME = {"device": "cpu", "precision": "fp32"}

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 10),
}
SHAPES = ("circle", "square", "triangle", "stripes")
BACKGROUNDS = ("white", "black", "grey gradient")


def draw_picture(index: int) -> tuple[Image.Image, str, str, str]:
    """A distinct synthetic picture for `index`: (image, colour, shape, background).

    Colour and shape cycle with periods 6 and 4 (least common multiple 12), so indices 0-11 are 12
    different colour/shape pairs; the background changes every 12 indices, so no two indices give the
    same picture (and no two files the same bytes, which ingest would merge).
    """
    colour_name = list(COLOURS)[index % len(COLOURS)]
    colour = COLOURS[colour_name]
    shape = SHAPES[index % len(SHAPES)]
    background = BACKGROUNDS[(index // 12) % len(BACKGROUNDS)]
    width, height = 96 + (index * 17) % 65, 96 + (index * 29) % 65
    if background == "white":
        img = Image.new("RGB", (width, height), (255, 255, 255))
    elif background == "black":
        img = Image.new("RGB", (width, height), (0, 0, 0))
    else:  # a vertical grey gradient
        img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    box = (width // 5, height // 5, width * 4 // 5, height * 4 // 5)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(width // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    else:
        for y in range(0, height, 16):
            draw.rectangle((0, y, width, y + 7), fill=colour)
    return img, colour_name, shape, background


def write_picture(root: Path, index: int, split: str) -> dict:
    """Write picture `index` under `root/images/` (even indices JPEG, odd PNG); return its captions record."""
    img, colour, shape, background = draw_picture(index)
    suffix, fmt = (".jpg", "JPEG") if index % 2 == 0 else (".png", "PNG")
    relative = f"images/pic{index:03d}{suffix}"
    (root / "images").mkdir(parents=True, exist_ok=True)
    img.save(root / relative, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    captions = [f"a {colour} {shape} on a {background} background", f"a picture of a {colour} {shape}"]
    if index % 3 == 0:
        captions.append(f"{shape} drawn in {colour}")
    return {"image": relative, "captions": captions, "split": split}


def write_records(root: Path, records: list[dict], mode: str = "w") -> None:
    """Write (mode "w") or append (mode "a") records to `root/captions.jsonl`."""
    with (root / "captions.jsonl").open(mode, encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


def read_records(root: Path) -> list[dict]:
    """The records of `root/captions.jsonl`."""
    return [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]


def write_tiny_corpus(root: Path, n_train: int = 8, n_dev: int = 4) -> Path:
    """A "folder + captions.jsonl" corpus of n_train + n_dev distinct pictures; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = [write_picture(root, i, "train" if i < n_train else "dev") for i in range(n_train + n_dev)]
    write_records(root, records)
    return root


def ingest_and_extract(corpus_root: Path, workspace: Workspace, corpus: str = "tiny", shard_size: int = 4096) -> str:
    """Ingest `corpus_root` as `corpus` and extract image and text features (CPU, fp32, no workers)."""
    ingest_corpus(CorpusConfig(root=corpus_root, name=corpus), workspace)
    extract_image_features(workspace, corpus, ExtractConfig(image_encoder=IMAGE_ENCODER, num_workers=0,
                                                            shard_size=shard_size, **ENCODER_RUNTIME))
    extract_text_features(workspace, corpus, ExtractConfig(text_encoder=TEXT_ENCODER, shard_size=shard_size,
                                                           **ENCODER_RUNTIME))
    return corpus


def flush_logs() -> None:
    """Send the log records this process still buffers to the Prefect API (before reading a run's logs back)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def run_logs(flow_run_id) -> list:
    """The logs of flow run `flow_run_id` and of its subflow runs, read back from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(child.id for child in children)]
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))


@pytest.fixture(scope="session")
def prefect_backend():
    """One real Prefect backend (a temporary database and server) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A fresh tiny corpus (8 train + 4 dev pictures) under `tmp_path/corpus`."""
    return write_tiny_corpus(tmp_path / "corpus")


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """An empty workspace under `tmp_path/ws`."""
    return Workspace(tmp_path / "ws")
