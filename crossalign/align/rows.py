"""Fixed-width float32 rows, in memory or in a raw file read by offset: what training and evaluation read.

A split's features (or its joint vectors) are a matrix of `n` rows. Training draws random rows per
step and statistics scan all rows in order, so both kinds of store answer two questions: `take(rows)`
(rows by index, in the order asked) and `rows[start:stop]` (a contiguous block). `MemoryRows` wraps a
tensor; `RowFile` reads a raw little-endian float32 file with `os.pread` at `row * dim * 4`, so the
process holds only the rows asked for: the file is never memory-mapped, because the pages of a
mapped file count in the resident set once touched, and random batches over 10M rows would touch
most of them (the kernel's page cache still serves repeated reads, outside the process's RSS).

`RowFile.largest_read` records the most rows one call has materialised, so tests can assert that a
pass over a split never held more than its chunk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

CHUNK_ROWS = 65_536  # rows per sequential read at most (64-d fp32: 16 MB)
CHUNK_BYTES = 64 << 20  # a sequential pass holds at most this much of a split at a time


def chunk_rows(dim: int, budget: int | None = None) -> int:
    """Rows per chunk of a `dim`-wide float32 pass: at most `CHUNK_ROWS`, at most `budget` (default
    `CHUNK_BYTES`) bytes."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, min(CHUNK_ROWS, budget // (4 * dim)))


class Rows(Protocol):
    """A (len, dim) float32 matrix read in blocks or by row index (`MemoryRows`, `RowFile`)."""

    dim: int

    def __len__(self) -> int: ...

    def __getitem__(self, block: slice) -> torch.Tensor: ...

    def take(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor: ...


class MemoryRows:
    """`Rows` over a (n, dim) tensor held in memory (small splits, tests, joint vectors of a dev split)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.dim = matrix.shape[1]

    def __len__(self) -> int:
        return len(self.matrix)

    def __getitem__(self, block: slice) -> torch.Tensor:
        return self.matrix[block]

    def take(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.matrix[torch.as_tensor(rows, dtype=torch.long)]


class RowFile:
    """`Rows` of a raw float32 file (`RowWriter` writes one), read with `os.pread`: nothing is mapped.

    Attributes:
        largest_read: the most rows a single `take` or block read has returned so far.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = Path(path), dim
        self._row_bytes = 4 * dim
        size = self.path.stat().st_size
        if size % self._row_bytes:
            raise ValueError(f"{self.path} holds {size} bytes, not whole rows of {dim} float32")
        self._n = size // self._row_bytes
        self._fd: int | None = None
        self.largest_read = 0

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict:  # a descriptor does not travel to another process: reopen there
        return {**self.__dict__, "_fd": None}

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getitem__(self, block: slice) -> torch.Tensor:
        start, stop, step = block.indices(self._n)
        if step != 1:
            raise ValueError("RowFile reads contiguous blocks only")
        count = max(0, stop - start)
        out = np.empty((count, self.dim), dtype=np.float32)
        self._read_into(out, start)
        self.largest_read = max(self.largest_read, count)
        return torch.from_numpy(out)

    def take(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows `rows` in that order; runs of consecutive rows are read in one call each."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"row out of range for {self._n} rows of {self.path}")
        if len(rows) == 0:
            return torch.empty(0, self.dim)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(unique), self.dim), dtype=np.float32)
        view, fd, size = memoryview(block).cast("B"), self._file(), self._row_bytes
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1  # runs of consecutive rows: one read each
        starts, ends = np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(unique)]]).tolist()
        for first, last, row in zip(starts, ends, unique[starts].tolist()):
            if os.preadv(fd, [view[first * size:last * size]], row * size) != (last - first) * size:
                self._read_into(block[first:last], row)  # a short read: finish it the careful way
        self.largest_read = max(self.largest_read, len(rows))
        return torch.from_numpy(block[inverse.reshape(-1)])

    def _read_into(self, out: np.ndarray, start: int) -> None:
        view, offset = memoryview(out).cast("B"), start * self._row_bytes
        done = 0
        while done < len(view):  # pread may return less than asked
            got = os.preadv(self._file(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from {self.path} at byte {offset + done}")
            done += got


class RowWriter:
    """Appends float32 row blocks to a raw file; `close()` returns the `RowFile`."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim, self.rows = Path(path), dim, 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, block: np.ndarray | torch.Tensor) -> None:
        array = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else block
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} values, got shape {array.shape}")
        self._file.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        self.rows += len(array)

    def close(self) -> RowFile:
        self._file.close()
        return RowFile(self.path, self.dim)


def blocks(rows: Rows, size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) over `rows` in order, `size` rows at a time (default `chunk_rows(rows.dim)`)."""
    size = size or chunk_rows(rows.dim)
    for start in range(0, len(rows), size):
        yield start, rows[start:start + size]


def column_statistics(rows: Rows, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per column of `rows` as float32, std with Bessel's correction, as `Tensor.std(0)` gives them.

    One pass in blocks, merged in float64 (Chan et al.'s pairwise update), so memory holds one block.
    """
    count, mean, m2 = 0, torch.zeros(rows.dim, dtype=torch.float64), torch.zeros(rows.dim, dtype=torch.float64)
    for _, block in blocks(rows, size):
        block = block.double()
        n = len(block)
        if n == 0:
            continue
        block_mean = block.mean(0)
        block_m2 = ((block - block_mean) ** 2).sum(0)
        delta, total = block_mean - mean, count + n
        mean += delta * (n / total)
        m2 += block_m2 + delta ** 2 * (count * n / total)
        count = total
    std = (m2 / (count - 1)).sqrt() if count > 1 else torch.full_like(m2, float("nan"))
    return mean.float(), std.float()
