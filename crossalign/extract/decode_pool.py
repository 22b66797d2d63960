"""Image decoding in spawned worker processes that outlive the call that started them.

Starting spawned workers costs seconds (each imports torch and the encoders: about 3-5 s on the
2-core machine here), which made `decode="processes"` pay off only in long calls: a flow, which
extracts a shard per call, paid it for every shard. A `DecodePool` is started once per process and
reused by every later call: a torch `DataLoader` with persistent workers whose "index" is a whole
batch job, (preprocess, size, [(position, path), ...]), so any encoder and any list of files go
through the same workers. The DataLoader keeps what it does well: batches return in order, through
shared memory, pinned for CUDA.

One call uses the pool at a time; a call that finds it in use (two flow tasks in threads) waits.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]
Batch = tuple[list[int], torch.Tensor, list[str]]


def decode_image(path: str, preprocess: Preprocess, size: int) -> tuple[torch.Tensor, str]:
    """(pixels (3, size, size) uint8, "") of the image file at `path`, or (zeros, reason) when it fails."""
    try:
        with Image.open(path) as img:
            return preprocess(img), ""
    except Exception as err:  # noqa: BLE001 - any decode failure becomes a recorded failure
        return torch.zeros(3, size, size, dtype=torch.uint8), f"{type(err).__name__}: {err}"


Job = tuple[Preprocess, int, list[tuple[int, str]]]


class _BatchJobs(Dataset):
    """The workers' side: `jobs[(preprocess, size, [(position, path), ...])]` is that batch, decoded."""

    def __getitem__(self, job: Job) -> Batch:
        preprocess, size, items = job
        decoded = [decode_image(path, preprocess, size) for _, path in items]
        return [position for position, _ in items], torch.stack([p for p, _ in decoded]), [e for _, e in decoded]


class _CurrentJobs(Sampler):
    """The jobs of the call using the pool: the DataLoader iterates this anew for each call."""

    def __init__(self) -> None:
        self.jobs: Iterable[Job] = ()

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)


def _identity(batch: Batch) -> Batch:
    return batch


class DecodePool:
    """`workers` spawned processes that decode batches of image files (pinned for CUDA when `pin`)."""

    def __init__(self, workers: int, pin: bool) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, not {workers}")
        self._jobs = _CurrentJobs()
        self._loader = DataLoader(
            _BatchJobs(), batch_size=None, sampler=self._jobs, collate_fn=_identity, num_workers=workers,
            pin_memory=pin, multiprocessing_context="spawn", persistent_workers=True,
        )
        self.lock = threading.Lock()  # held by the call using the pool

    def batches(self, paths: list[str], preprocess: Preprocess, size: int, batch_size: int) -> Iterator[Batch]:
        """(positions, pixels (N, 3, size, size) uint8, errors) of `paths` in batches, in order (one call
        at a time: hold `lock`)."""
        self._jobs.jobs = (
            (preprocess, size, [(i, paths[i]) for i in range(start, min(start + batch_size, len(paths)))])
            for start in range(0, len(paths), batch_size)
        )
        try:
            yield from self._loader
        finally:
            self._jobs.jobs = ()

    def disown(self) -> None:
        """Forget the workers without stopping them (in a forked child: they are the parent's)."""
        iterator: Any = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown = True  # its shutdown, run by close or the finaliser, now does nothing

    def close(self) -> None:
        """Stop the workers (a later call starts them again)."""
        iterator: Any = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None


_pools: dict[tuple[int, bool], DecodePool] = {}
_pools_lock = threading.Lock()


_inherited: list[DecodePool] = []


def _forget_pools() -> None:
    """In a forked child: the pools' workers belong to the parent, and a lock may have been held at the fork.

    The inherited pools are disowned (and kept): the DataLoader's finaliser would otherwise tell the
    parent's workers, through the queues both processes hold, to stop.
    """
    global _pools_lock
    for pool in _pools.values():
        pool.disown()
        _inherited.append(pool)
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def decoded_batches(paths: list[str], preprocess: Preprocess, size: int, batch_size: int, workers: int,
                    pin: bool) -> Iterator[Batch]:
    """`DecodePool.batches` on this process's pool of `workers` processes, started on first use.

    A call that finds the pool in use (a flow's shard tasks run in threads) waits for it: the pool
    already has the cores, and the model is shared too. The caller must finish or close the iterator
    (`_encode_todo` does), or later calls wait. A pool that failed (a worker died) is closed, and the
    next call starts a new one.
    """
    key = (workers, pin)
    while True:
        with _pools_lock:
            pool = _pools.get(key) or _pools.setdefault(key, DecodePool(workers, pin))
        if not pool.lock.acquire(blocking=False):
            logger.info("waiting for the decode processes: another extraction in this process is using them")
            pool.lock.acquire()
        with _pools_lock:
            if _pools.get(key) is pool:  # not closed after a failure while this call waited
                break
        pool.lock.release()
    try:
        yield from pool.batches(paths, preprocess, size, batch_size)
    except Exception:
        with _pools_lock:
            if _pools.get(key) is pool:
                del _pools[key]
        pool.close()
        raise
    finally:
        pool.lock.release()


@atexit.register
def close_decode_pools() -> None:
    """Stop every pool's workers (they also stop on their own when this process dies)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()
