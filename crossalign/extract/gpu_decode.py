"""JPEG decoding and resizing on the GPU, batch by batch, ahead of the model.

Two decoders plug into one pipeline (`gpu_decoded_batches`):

- `TorchvisionJpegDecoder` (decode "nvjpeg"): `torchvision.io.decode_jpeg` on the device, which sends
  baseline JPEGs to the GPU's hardware JPEG engines where it has them (A100, H100, H200). One call at a
  time per process (torchvision holds a lock), so it tops out at the hardware decoder's rate: measured
  5.9-7.1k images/s on an H200 with 224x224 JPEGs.
- `NvImageCodecDecoder` (decode "nvimgcodec", needs `pip install nvidia-nvimgcodec-cu12` or `-cu13`
  with its nvJPEG wheel): NVIDIA's nvImageCodec, which splits each batch between the hardware engines
  and the CUDA decoder (Huffman decoding on `cpu_threads` CPU threads), as DALI does. Not yet measured
  on a GPU: `benchmarks/extract.py --decode nvjpeg,nvimgcodec` on a GPU machine does.

Images that are not plain upright 8-bit RGB JPEGs (ingest normalised them) and any that the decoder
refuses go through the CPU path (PIL) instead, so every image is seen as the CPU path would see it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from crossalign.encoders.preprocess import JPEG_MAGIC, gpu_resize_center_crop

GPU_DECODE_READERS = 4
"""Threads that read files for the GPU decoders: more only contend for the GIL with the model's thread."""

NVIMGCODEC_HARDWARE_SHARE = 0.9
"""Share of a batch that nvImageCodec sends to the hardware JPEG engines; the CUDA decoder takes the rest
(DALI's default for H100-class GPUs)."""


class GpuJpegDecoder(Protocol):
    """Decodes a batch of JPEG files' bytes to uint8 (3, H, W) RGB tensors on the device; None where it cannot."""

    def decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor | None]: ...


class TorchvisionJpegDecoder:
    """`torchvision.io.decode_jpeg` on `device` (nvJPEG on CUDA; libjpeg on the CPU, which tests use)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad stream fails the whole call: decode one by one
            decoded: list[torch.Tensor | None] = []
            for stream in streams:
                try:
                    decoded.append(decode_jpeg(stream, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def import_nvimgcodec() -> Any:
    """The nvImageCodec module.

    Raises:
        ImportError: it is not installed, with the command that installs it.
    """
    try:
        from nvidia import nvimgcodec
    except ImportError as err:
        raise ImportError(
            "decode 'nvimgcodec' needs NVIDIA nvImageCodec: pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg "
            "(CUDA 13) or nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12 (CUDA 12)"
        ) from err
    return nvimgcodec


class NvImageCodecDecoder:
    """nvImageCodec on a CUDA device: hardware engines, CUDA decoder and `cpu_threads` threads for the host part.

    One per device and thread count in a process (`gpu_decoder` caches them: setting one up allocates
    device buffers), used by one batch at a time.
    """

    def __init__(self, device: torch.device, cpu_threads: int) -> None:
        nvimgcodec = import_nvimgcodec()
        self._nvimgcodec = nvimgcodec
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._decoder = nvimgcodec.Decoder(
            device_id=index, max_num_cpu_threads=cpu_threads,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY, load_hint=NVIMGCODEC_HARDWARE_SHARE),
                      nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU),
                      nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)],
        )
        self._params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.P_RGB)
        self.device = device
        self._lock = threading.Lock()

    def decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor | None]:
        code_streams = [self._nvimgcodec.CodeStream(stream.numpy()) for stream in streams]
        with self._lock:
            images = self._decoder.decode(code_streams, params=self._params,
                                          cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
        # DLPack hands the buffer over without a copy; torch then owns a reference to the decoded image.
        return [None if image is None else torch.from_dlpack(image) for image in images]


@functools.lru_cache(maxsize=None)
def gpu_decoder(name: str, device: torch.device, cpu_threads: int) -> GpuJpegDecoder:
    """The decoder of decode mode `name` ("nvjpeg" or "nvimgcodec") on `device` (one per process)."""
    if name == "nvimgcodec":
        return NvImageCodecDecoder(device, cpu_threads)
    return TorchvisionJpegDecoder(device)


def gpu_decoded_batches(
    uris: list[str], gpu_decodable: list[bool], cpu_path: Callable[[int], tuple[int, torch.Tensor, str]],
    size: int, batch_size: int, threads: int, device: torch.device, decoder: GpuJpegDecoder, prefetch: int = 3,
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Batches of (positions, pixels (N, 3, size, size) uint8 on `device`, errors) decoded on the GPU, in order.

    A pool of at most `GPU_DECODE_READERS` threads reads the files ahead; one thread decodes batch after
    batch on its own CUDA stream while the model runs the previous one. `cpu_path(i)` (decode and
    preprocess with PIL, returning (i, pixels, error)) takes the images with `gpu_decodable[i]` false,
    files that are not JPEGs, and any the decoder refuses.
    """
    threads = max(1, min(GPU_DECODE_READERS, threads))
    # A side stream on CUDA; on the CPU (tests: libjpeg stands in for nvJPEG) the same code runs unchanged.
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def read(index: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str]:
        """(index, encoded bytes for the GPU or None, pixels from the CPU path or None, error)."""
        if gpu_decodable[index]:
            try:
                data = Path(uris[index]).read_bytes()
            except OSError as err:
                return index, None, torch.zeros(3, size, size, dtype=torch.uint8), f"{type(err).__name__}: {err}"
            if data[:2] == JPEG_MAGIC:
                return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, ""
        _, pixels, error = cpu_path(index)
        return index, None, pixels, error

    def decode(reads: list[Future]) -> tuple[list[int], torch.Tensor, list[str]]:
        items = [future.result() for future in reads]
        errors = [error for *_, error in items]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pixels = torch.empty(len(items), 3, size, size, dtype=torch.uint8, device=device)
            encoded = [i for i, (_, data, _, _) in enumerate(items) if data is not None]
            decoded: dict[int, torch.Tensor] = {}
            if encoded:
                images = decoder.decode([items[i][1] for i in encoded])
                decoded = {i: image for i, image in zip(encoded, images) if image is not None}
            if decoded:
                pixels[list(decoded)] = gpu_resize_center_crop(list(decoded.values()), size)
            for i, (index, _, cpu_pixels, _) in enumerate(items):
                if i not in decoded:
                    if cpu_pixels is None:  # the GPU decoder refused it: the CPU path decides
                        _, cpu_pixels, errors[i] = cpu_path(index)
                    pixels[i] = cpu_pixels.to(device, non_blocking=True)
        if stream is not None:
            stream.synchronize()
        return [index for index, *_ in items], pixels, errors

    starts = iter(range(0, len(uris), batch_size))
    with ThreadPoolExecutor(max_workers=threads) as readers, ThreadPoolExecutor(max_workers=1) as gpu:
        reads: deque[list[Future]] = deque()
        decodes: deque[Future] = deque()

        def advance() -> None:
            """Keep `prefetch` batches being read and one being decoded ahead of the model."""
            while len(reads) < prefetch and (start := next(starts, None)) is not None:
                stop = min(start + batch_size, len(uris))
                reads.append([readers.submit(read, i) for i in range(start, stop)])
            if reads and len(decodes) < 2:
                decodes.append(gpu.submit(decode, reads.popleft()))

        advance()
        advance()
        while decodes:
            positions, pixels, errors = decodes.popleft().result()
            advance()
            if stream is not None:  # the model's stream uses memory the side stream allocated
                pixels.record_stream(torch.cuda.current_stream(device))
            yield positions, pixels, errors

