"""The encoding loop every extraction shares: skip done ids, claim the rest, encode them in batches, write shards.

Safe to run several times at once on one features directory, from threads, processes or machines
sharing the workspace (see `claim` and `ShardWriter`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossalign.encoders import ImageEncoder, TextEncoder, load_encoder
from crossalign.encoders.registry import load_encoder_for
from crossalign.extract.manifest import check_identity, claim
from crossalign.extract.shards import Scope, ShardWriter, pending
from crossalign.progress import ProgressLog

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What one extraction did (small: passed between Prefect tasks)."""

    encoder: str
    modality: str
    encoded: int
    already_done: int
    failed: int
    seconds: float
    items_per_s: float
    features_dir: str
    precision: str
    wait_s: float = 0.0  # waiting for decoded inputs
    encode_s: float = 0.0  # in the encoder's forward
    write_s: float = 0.0  # writing shards
    commit_s: list[float] = field(default_factory=list)  # each shard's commit (manifest lock held), in order

    def to_dict(self) -> dict:
        return asdict(self)


_LOADING = threading.Lock()


def load_encoder_once(name: str, device: str, precision: str,
                      modality: str | None = None) -> ImageEncoder | TextEncoder:
    """`load_encoder` (cached per process), one call at a time: shard tasks on threads would otherwise load
    one model twice, and transformers' lazy imports fail when two threads run them at once.

    Raises:
        EncoderModalityError: `name` is not an encoder of `modality` (when given).
    """
    with _LOADING:
        return load_encoder(name, device, precision) if modality is None else load_encoder_for(
            modality, name, device, precision)


_MODEL_LOCKS: dict[int, threading.Lock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(encoder: ImageEncoder | TextEncoder) -> threading.Lock:
    """The lock that lets one forward pass at a time run on `encoder` in this process.

    Calls on threads (shard tasks on a thread pool) share the cached encoder; a fast tokenizer fails
    when two threads use it at once ("Already borrowed"), and two forwards on one device only contend.
    Decoding and shard writing still overlap with the other call's forward.
    """
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(id(encoder), threading.Lock())


class BackoffEncoder:
    """Calls `encode` on a batch; on CUDA out-of-memory, retries in halves instead of failing.

    The smaller size is remembered, so later batches go straight to it.
    """

    def __init__(self, encode: Callable[[Any], torch.Tensor]) -> None:
        self.encode = encode
        self.max_rows: int | None = None

    def __call__(self, inputs: Any) -> torch.Tensor:
        step, start, outputs = self.max_rows or len(inputs), 0, []
        while start < len(inputs):
            chunk = inputs[start:start + step]
            try:
                outputs.append(self.encode(chunk))
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                torch.cuda.empty_cache()
                step = self.max_rows = max(1, step // 2)
                logger.warning("CUDA out of memory: encoding batches of at most %d from now on", step)
                continue
            start += len(chunk)
        return torch.cat(outputs)


def run_extraction(
    encoder: ImageEncoder | TextEncoder, ids: list[str], directory: Path,
    batches: Callable[[list[int]], Iterable[tuple[list[int], object, list[str]]]],
    encode: Callable[[object], torch.Tensor], shard_size: int, description: dict[str, Any] | None = None,
    scope: Scope | None = None, planned: int | None = None,
) -> ExtractSummary:
    """Shared runner: skip done ids, claim the rest, encode them batch by batch, flush complete shards.

    `scope` says what the caller's plan already checked (see `pending`); without one the whole
    directory's index is consulted. `planned`: how many of `ids` the plan found without features (the
    others count as done in the plan's summary, not this one's).
    """
    description, scope = description or encoder.describe(), scope or Scope()
    check_identity(directory, description)  # refuse another encoder's features before any work
    todo, since = _todo(ids, directory, scope)
    with claim(directory, [ids[i] for i in todo]) if todo else contextlib.nullcontext():
        todo, since = _todo(ids, directory, scope)  # what is left once a run that held the same claim has finished
        writer = ShardWriter(directory, description, since, scope.plan, scope.unit)
        summary = _encode_todo(encoder, ids, todo, writer, batches, encode, shard_size)
    if planned is not None:  # done meanwhile (by another run) is what the plan counted pending, less this run's
        summary.already_done = max(0, planned - len(todo)) + writer.dropped
    return summary


def _todo(ids: list[str], directory: Path, scope: Scope) -> tuple[list[int], int]:
    """Positions of the `ids` without features, each id once (a writer never records an id twice)."""
    missing, since = pending(directory, ids, scope.since, scope.plan, scope.unit)
    seen: set[str] = set()
    todo = [i for i, miss in enumerate(missing) if miss and not (ids[i] in seen or seen.add(ids[i]))]
    return todo, since


def _encode_todo(
    encoder: ImageEncoder | TextEncoder, ids: list[str], todo: list[int], writer: ShardWriter,
    batches: Callable[[list[int]], Iterable[tuple[list[int], object, list[str]]]],
    encode: Callable[[object], torch.Tensor], shard_size: int,
) -> ExtractSummary:
    directory = writer.directory
    logger.info("%s: %d to encode, %d already done (%s)", encoder.name, len(todo), len(ids) - len(todo), directory)
    model_lock = _model_lock(encoder)
    encode = BackoffEncoder(encode)
    timing = {"wait": 0.0, "encode": 0.0, "write": 0.0}
    start = time.perf_counter()
    pending_ids: list[str] = []
    pending_vectors: list[np.ndarray] = []
    failed = 0
    # Shards are written by one background thread (in order, at most two queued) while the next batches
    # are encoded: on a GPU, writing in line would take a large share of the time.
    writes: deque[Future] = deque()

    def write(shard_ids: list[str], vectors: np.ndarray) -> None:
        tick = time.perf_counter()
        while len(writes) >= 2:
            writes.popleft().result()
        writes.append(shard_writer.submit(writer.write, shard_ids, vectors))
        timing["write"] += time.perf_counter() - tick

    progress = ProgressLog(logger, encoder.name, encoder.modality, len(todo), "encoded")  # for the run logs
    with tqdm(total=len(todo), desc=f"extract {encoder.name}", unit=encoder.modality, disable=None) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as shard_writer, \
            contextlib.ExitStack() as cleanup:
        batch_iterator = iter(batches(todo) if todo else ())
        # Closed now even on an error, not when the traceback lets go of it: the decode paths hold
        # threads, and the shared decode processes (see `decode_pool`), until then.
        cleanup.callback(getattr(batch_iterator, "close", lambda: None))
        while True:
            tick = time.perf_counter()
            try:
                positions, inputs, errors = next(batch_iterator)
            except StopIteration:
                break
            tock = time.perf_counter()
            with model_lock:
                vectors = encode(inputs).numpy()
            timing["wait"] += tock - tick
            timing["encode"] += time.perf_counter() - tock
            for position, vector, error in zip(positions, vectors, errors):
                if error:
                    writer.note_failed(ids[position], error)
                    failed += 1
                    logger.warning("cannot encode %s: %s", ids[position], error)
                    continue
                pending_ids.append(ids[position])  # committing it clears an earlier failure
                pending_vectors.append(vector)
            while len(pending_ids) >= shard_size:
                write(pending_ids[:shard_size], np.stack(pending_vectors[:shard_size]))
                del pending_ids[:shard_size], pending_vectors[:shard_size]
            bar.update(len(positions))
            progress.update(len(positions))
        last_shard = bool(pending_ids)
        if last_shard:
            write(pending_ids, np.stack(pending_vectors))
        while writes:
            writes.popleft().result()
        if todo and not last_shard:  # only failures changed (added or cleared): record them
            writer.commit_failures()
    seconds = time.perf_counter() - start
    encoded = len(todo) - failed - writer.dropped  # rows another run recorded first count as done
    return ExtractSummary(
        encoder=encoder.name, modality=encoder.modality, encoded=encoded,
        already_done=len(ids) - len(todo) + writer.dropped,
        failed=failed, seconds=round(seconds, 3),
        items_per_s=round(encoded / seconds, 1) if seconds and encoded else 0.0,
        features_dir=str(directory), precision=encoder.runtime.precision,
        commit_s=[round(t, 5) for t in writer.commit_seconds],
        **{f"{key}_s": round(value, 3) for key, value in timing.items()},
    )
