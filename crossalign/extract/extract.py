"""Batched, resumable, incremental feature extraction of a corpus with a frozen encoder."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

from crossalign.config import CompileMode, DecodeMode, ExtractConfig, GpuDecodeMode
from crossalign.corpus import read_captions, read_images
from crossalign.corpus.rows import in_split, read_rows
from crossalign.encoders import ImageEncoder, TextEncoder
from crossalign.encoders.base import can_compile_on_cpu
from crossalign.encoders.composite import composite_parts
from crossalign.encoders.registry import canonical_name
from crossalign.extract.decode_pool import decode_image, decoded_batches
from crossalign.extract.encoding import (
    BackoffEncoder,  # noqa: F401 - importable from here, as before the split
    ExtractSummary,
    load_encoder_once,
    run_extraction,
)
from crossalign.extract.features import features_dirs
from crossalign.extract.gpu_decode import gpu_decoded_batches, gpu_decoder, import_nvimgcodec
from crossalign.extract.manifest import check_identity
from crossalign.extract.plan import (
    ID_COLUMNS,
    PlanUnit,
    combine_shard_summaries,
    corpus_table,
    index_features,
    plan_shards,
)
from crossalign.extract.shards import Scope
from crossalign.workspace import Workspace

logger = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Decode + preprocess images (the threads path); a file that fails yields an error string."""

    def __init__(self, uris: list[str], preprocess: Callable[[Image.Image], torch.Tensor], size: int) -> None:
        self.uris = uris
        self.preprocess = preprocess
        self.size = size

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        return index, *decode_image(self.uris[index], self.preprocess, self.size)


def threaded_batches(
    dataset: ImageFiles, batch_size: int, threads: int, pin: bool, prefetch: int = 4
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Batches of `dataset` in order, decoded by a thread pool `prefetch` batches ahead."""
    starts = iter(range(0, len(dataset), batch_size))
    pending: deque[list[Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                stop = min(start + batch_size, len(dataset))
                pending.append([pool.submit(dataset.__getitem__, i) for i in range(start, stop)])

        for _ in range(prefetch):
            submit()
        while pending:
            items = [future.result() for future in pending.popleft()]
            submit()
            pixels = torch.stack([item[1] for item in items])
            yield [item[0] for item in items], pixels.pin_memory() if pin else pixels, [item[2] for item in items]


def gpu_batches(
    uris: list[str], gpu_decodable: list[bool], preprocess: Callable[[Image.Image], torch.Tensor], size: int,
    batch_size: int, threads: int, device: torch.device, decode: str = "nvjpeg",
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Batches decoded and resized on `device` by the GPU decoder of mode `decode`, in order (see
    `crossalign.extract.gpu_decode`); the images with `gpu_decodable` false, and any the decoder refuses,
    go through the PIL path (`preprocess`). `threads` read files (at most `GPU_DECODE_READERS`) and, for
    nvImageCodec, run its host-side decoding."""
    decoder = gpu_decoder(decode, device, threads)
    cpu_path = ImageFiles(uris, preprocess, size).__getitem__
    return gpu_decoded_batches(uris, gpu_decodable, cpu_path, size, batch_size, threads, device, decoder)


GPU_DECODE_MODES: tuple[str, ...] = get_args(GpuDecodeMode)
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
# "auto" compiles the image encoder on the CPU when at least this many images wait for it: compiling
# costs 15-45 s on 2 cores and saves about 6 ms an image (Lite0 fp16: 60 -> 90+ images/s).
COMPILE_MIN_IMAGES = 5_000
# A call without a plan unit runs the corpus in units of at least this many items, one after the other:
# memory holds one unit; tasks of a flow are smaller (`ExtractConfig.task_shards`) to spread over workers.
LIBRARY_UNIT_ROWS = 65_536


def should_compile(setting: str, device: torch.device, pending: Callable[[], int]) -> bool:
    """Whether to `torch.compile` the image encoder: always ("on"), never ("off"), or, for "auto", on the
    CPU when the `pending()` images are enough to repay the compile time and Inductor can build kernels
    here (`pending` is called only then: it reads the corpus)."""
    if setting not in COMPILE_MODES:
        raise ValueError(f"unknown compile setting {setting!r}: use one of {', '.join(COMPILE_MODES)}")
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and can_compile_on_cpu() and pending() >= COMPILE_MIN_IMAGES


def resolve_decode(decode: str, on_gpu: bool) -> str:
    """The decode mode "auto" stands for: processes when feeding a GPU, threads on the CPU, where they were
    faster with the model on the same cores (46 vs 40 images/s here); threads too inside a daemonic
    process (a Dask worker), which may not start processes. Any other mode is itself.

    On a GPU decoding is the bottleneck, and threads share one GIL: 15 of them fed an H200 1,268
    images/s. Processes scale with the cores (two decode 1,600-2,000 images/s here), but the
    persistent pool's rate on a GPU machine is not measured yet (`benchmarks/gpu_check.sh` does).
    They are spawned, so a script that extracts with them needs the `if __name__ == "__main__":` guard.

    Raises:
        ValueError: `decode` is not a mode, or is "processes" inside a daemonic process.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}: use one of {', '.join(DECODE_MODES)}")
    daemonic = multiprocessing.current_process().daemon
    if decode == "processes" and daemonic:
        raise ValueError("decode='processes' cannot start worker processes inside a daemonic process (a Dask worker "
                         "is one, unless distributed.worker.daemon is false): use decode='threads' or 'auto'")
    if decode == "auto":
        return "processes" if on_gpu and not daemonic else "threads"
    return decode


def default_num_workers(decode: str = "threads", on_gpu: bool = False) -> int:
    """Decode workers: CPU cores - 1 (the main process runs the model), at most 8; decode processes
    feeding a GPU take every core but two (the main thread and its memory-pinning thread), at most 32."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    if decode == "processes" and on_gpu:
        return max(1, min(32, cores - 2))
    return max(1, min(8, cores - 1))


def extract_image_features(
    workspace: Workspace, corpus: str, config: ExtractConfig | None = None, *, split: str | None = None,
    only_ids: list[str] | None = None, unit: PlanUnit | dict[str, Any] | None = None,
) -> ExtractSummary:
    """Encode the corpus images that have no features yet for `config.image_encoder` (of them, only `only_ids` if
    given; of `split` if given), as `config` says (default `ExtractConfig()`).

    Decoding runs on `config.num_workers` decoders (default: `default_num_workers`). `batch_size` defaults
    to 32 on the CPU (measured fastest for Lite0 here) and 256 on CUDA, where an out-of-memory batch is
    split instead of failing. `decode="threads"` decodes in a pool of threads (Pillow releases the GIL
    while decoding); "processes" in spawned worker processes, started by the first call of a process
    (about 3 s here) and reused by every later one (see `crossalign.extract.decode_pool`). Both give
    the same pixels. "auto" (the default) is threads on the CPU (faster here, where the model needs
    the cores: 46 vs 40 images/s) and processes on CUDA (see `resolve_decode`).
    "nvjpeg" (CUDA only, opt-in) decodes and resizes on the GPU: on an H200 4,850 images/s end to end
    against 1,268 with threads (ResNet-50 bf16), but its pixels differ from PIL's enough to move
    Lite0's features (cosine 0.991 at worst), so the manifest records it and the two never mix.
    "nvimgcodec" (CUDA only, opt-in, needs nvImageCodec) is the same path with NVIDIA's nvImageCodec
    decoding (see `crossalign.extract.gpu_decode`); it too is recorded in the manifest.
    `compile` ("auto", "on", "off") runs the encoder through `torch.compile` (see `ImageEncoder.compile`):
    "auto" does on the CPU once `COMPILE_MIN_IMAGES` images of the corpus (all shards) wait for it.

    Several calls may run at once on one features directory (threads, processes, machines): each
    writes only ids no other call recorded first (see `ShardWriter`), and a call whose ids another
    call is encoding waits for it and then skips them (see `claim`). `unit` (one unit of a plan, see
    `plan_shards`) lets a task per unit run anywhere; without one (nor `only_ids`) the call plans the
    corpus itself and runs its units in turn, so memory holds one unit, whatever the corpus size.

    Returns:
        An `ExtractSummary`.

    Raises:
        FeatureMismatchError: the features directory belongs to another encoder setup.
    """
    return _extract("image", workspace, corpus, config or ExtractConfig(), split, only_ids, unit)


def _extract(modality: str, workspace: Workspace, corpus: str, config: ExtractConfig, split: str | None,
             only_ids: list[str] | None, unit: PlanUnit | dict[str, Any] | None) -> ExtractSummary:
    """`extract_image_features` / `extract_text_features`: the whole corpus unit by unit, or one unit (or
    `only_ids`), each part of a composite encoder into its own features directory."""
    name = config.image_encoder if modality == "image" else config.text_encoder
    if modality == "image":
        resolve_decode(config.decode, on_gpu=False)  # an unknown mode fails before any work
    parts = composite_parts(canonical_name(name))
    encoders = [load_encoder_once(part, config.device, config.precision, modality=modality) for part in parts]
    if unit is None and only_ids is None:
        start = time.perf_counter()
        task_shards = max(config.task_shards, -(-LIBRARY_UNIT_ROWS // config.shard_size))
        plan = plan_shards(workspace, corpus, modality, name, config.shard_size, split, config.max_tasks, task_shards)
        done = [_extract(modality, workspace, corpus, config, split, None, item) for item in plan.units]
        index_features(workspace, corpus, name)
        return combine_shard_summaries(plan, done, time.perf_counter() - start, encoders[0].runtime.precision)
    if isinstance(unit, dict):
        unit = PlanUnit.from_dict(unit)
    items = _items(workspace, corpus, modality, split, only_ids, unit)
    run = _image_part if modality == "image" else _text_part
    summaries = []
    for number, (encoder, directory) in enumerate(zip(encoders, features_dirs(workspace, corpus, name))):
        scope = Scope() if unit is None else Scope(unit.since[number], unit.plan, unit.start)
        planned = None if unit is None else (unit.pending, unit.plan_pending)
        summaries.append(run(encoder, items, directory, config, scope, planned))
    return summaries[0] if len(parts) == 1 else combine_summaries(canonical_name(name), summaries)


def _items(workspace: Workspace, corpus: str, modality: str, split: str | None, only_ids: list[str] | None,
           unit: PlanUnit | None) -> pa.Table:
    """The corpus rows to encode: a plan unit's rows of its split, else `only_ids` (of `split`)."""
    if unit is None:
        table = read_images(workspace, corpus, split) if modality == "image" else read_captions(workspace, corpus,
                                                                                                  split)
        return _only(table, ID_COLUMNS[modality], only_ids)
    table = read_rows(corpus_table(workspace, corpus, modality), unit.start, unit.stop, identity=unit.identity)
    return table.filter(in_split(table, unit.split))


def _image_part(encoder: ImageEncoder, images: pa.Table, directory: Path, config: ExtractConfig, scope: Scope,
                planned: tuple[int, int] | None) -> ExtractSummary:
    ids, uris = images.column("image_id").to_pylist(), images.column("uri").to_pylist()
    size = encoder.preprocessing.get("size", 224)
    on_gpu = encoder.runtime.device.type == "cuda"
    decode = resolve_decode(config.decode, on_gpu)
    batch_size = config.image_batch_size or (256 if on_gpu else 32)
    waiting = planned[1] if planned else len(ids)  # images of the whole plan without features

    if not encoder.compiled and should_compile(config.compile, encoder.runtime.device, lambda: waiting):
        logger.info("%s: compiling the encoder (once per process)", encoder.name)
        encoder.compile(batch_size)
    num_workers = default_num_workers(decode, on_gpu) if config.num_workers is None else config.num_workers

    if decode in GPU_DECODE_MODES and not on_gpu:
        raise ValueError(f"decode={decode!r} decodes on the GPU: it needs a CUDA device")
    if decode == "nvimgcodec":
        import_nvimgcodec()  # a missing package fails here, before any work, with the command that installs it

    def batches(todo: list[int]) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        if decode in GPU_DECODE_MODES:
            # Only images that needed no normalisation at ingest go to the GPU; the rest take the PIL path.
            statuses = images.column("status").to_pylist()
            batches = gpu_batches([uris[i] for i in todo], [statuses[i] == "ok" for i in todo], encoder.preprocess,
                                  size, batch_size, num_workers or 1, encoder.runtime.device, decode)
            for positions, pixels, errors in batches:
                yield [todo[p] for p in positions], pixels, errors
            return
        dataset = ImageFiles([uris[i] for i in todo], encoder.preprocess, size)
        if decode == "threads":
            for positions, pixels, errors in threaded_batches(dataset, batch_size, num_workers or 1, pin=on_gpu):
                yield [todo[p] for p in positions], pixels, errors
            return
        for positions, pixels, errors in decoded_batches(dataset.uris, encoder.preprocess, size, batch_size,
                                                         num_workers or 1, pin=on_gpu):
            yield [todo[p] for p in positions], pixels, errors

    # With the model on a GPU the main process needs few CPU threads; idle OpenMP threads spinning there
    # would take the cores that the decode workers need.
    with _torch_threads(min(4, torch.get_num_threads()) if on_gpu else None):
        return run_extraction(encoder, ids, directory, batches, encoder.encode, config.shard_size,
                              describe_with_decoder(encoder, decode), scope, planned and planned[0])


def _text_part(encoder: TextEncoder, captions: pa.Table, directory: Path, config: ExtractConfig, scope: Scope,
               planned: tuple[int, int] | None) -> ExtractSummary:
    ids, texts = captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()
    shard_size = config.shard_size

    def batches(todo: list[int]) -> Iterator[tuple[list[int], list[str], list[str]]]:
        # One shard's worth at a time: the encoder sorts by length inside it to avoid padding.
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            yield chunk, [texts[i] for i in chunk], [""] * len(chunk)

    def encode_unique(batch: list[str]) -> torch.Tensor:
        unique, inverse = np.unique(np.asarray(batch, dtype=object), return_inverse=True)
        return encoder.encode(list(unique), batch_size=config.text_batch_size)[torch.from_numpy(inverse)]

    return run_extraction(encoder, ids, directory, batches, encode_unique, shard_size, None, scope,
                          planned and planned[0])


def check_features_match(workspace: Workspace, corpus: str, config: ExtractConfig) -> None:
    """Refuse, before any work, an extraction that the features on disk would refuse in every shard: a features
    directory of `config`'s encoders holding another setup's features (another precision, weights,
    preprocessing or GPU decoder). Loads the encoders (once per process), as extraction will.

    Raises:
        FeatureMismatchError: names the directory and what differs.
        EncoderModalityError, WeightsUnavailableError, ValueError: as loading the encoders does.
    """
    for modality, name in (("image", config.image_encoder), ("text", config.text_encoder)):
        for part, directory in zip(composite_parts(canonical_name(name)), features_dirs(workspace, corpus, name)):
            encoder = load_encoder_once(part, config.device, config.precision, modality=modality)
            on_gpu = encoder.runtime.device.type == "cuda"
            description = (describe_with_decoder(encoder, resolve_decode(config.decode, on_gpu))
                           if modality == "image" else encoder.describe())
            check_identity(directory, description)


def combine_summaries(name: str, parts: list[ExtractSummary]) -> ExtractSummary:
    """One summary for the parts of a composite encoder (items counted once; time summed)."""
    seconds = sum(part.seconds for part in parts)
    encoded = max(part.encoded for part in parts)
    return ExtractSummary(
        encoder=name, modality=parts[0].modality, encoded=encoded,
        already_done=min(part.already_done for part in parts),
        failed=max(part.failed for part in parts), seconds=round(seconds, 3),
        items_per_s=round(encoded / seconds, 1) if seconds and encoded else 0.0,
        features_dir=",".join(part.features_dir for part in parts), precision=parts[0].precision,
        wait_s=sum(p.wait_s for p in parts), encode_s=sum(p.encode_s for p in parts),
        write_s=sum(p.write_s for p in parts), commit_s=[t for p in parts for t in p.commit_s],
    )


def describe_with_decoder(encoder: ImageEncoder, decode: str) -> dict[str, Any]:
    """The features' identity: nvJPEG's pixels differ from PIL's (chroma upsampling), so they are recorded.

    Measured with EfficientNet-Lite0 on 1,000 Flickr8k photos: per-image cosine to the PIL path's
    features 0.991 at worst, 0.998 on average; the two never share a features directory.
    """
    description = encoder.describe()
    if decode in GPU_DECODE_MODES:
        description["preprocessing"] = {**description["preprocessing"], "decoder": decode}
    return description


def _only(table: pa.Table, id_column: str, ids: list[str] | None) -> pa.Table:
    """The rows of `table` whose id is in `ids` (all rows when `ids` is None)."""
    if ids is None:
        return table
    return table.filter(pc.is_in(table.column(id_column), pa.array(ids, pa.string())))


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def extract_text_features(
    workspace: Workspace, corpus: str, config: ExtractConfig | None = None, *, split: str | None = None,
    only_ids: list[str] | None = None, unit: PlanUnit | dict[str, Any] | None = None,
) -> ExtractSummary:
    """Encode the corpus captions that have no features yet for `config.text_encoder` (see
    `extract_image_features`)."""
    return _extract("text", workspace, corpus, config or ExtractConfig(), split, only_ids, unit)
