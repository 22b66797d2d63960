"""What every encoder offers, and where and how precisely it runs."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sysconfig
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crossalign.encoders.preprocess import ResizeCenterCrop

logger = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are not on this machine (and are never downloaded at run time)."""


@dataclass(frozen=True)
class Runtime:
    """Device and autocast dtype an encoder runs with (None: plain fp32)."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self) -> Any:
        """Context manager for the encoder's forward pass."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    flags = _cpu_flags()
    return " amx_bf16" in flags or " avx512_bf16" in flags


def cpu_supports_fp16() -> bool:
    """True when this CPU has native fp16 arithmetic (AVX512-FP16 or AMX-FP16: Sapphire Rapids and later)."""
    flags = _cpu_flags()
    return " avx512_fp16" in flags or " amx_fp16" in flags


def can_compile_on_cpu() -> bool:
    """Whether TorchInductor can build CPU kernels here: a C++ compiler and the Python headers."""
    return (shutil.which(os.environ.get("CXX", "g++")) is not None
            and Path(sysconfig.get_paths()["include"], "Python.h").exists())


CPU_PRECISIONS = {"bf16": (torch.bfloat16, cpu_supports_bf16), "fp16": (torch.float16, cpu_supports_fp16)}


def resolve_runtime(device: str = "auto", precision: str = "auto", cpu_precisions: tuple[str, ...] = ()) -> Runtime:
    """Turn config strings into a `Runtime`.

    "auto" device picks CUDA when available. "auto" precision picks fp16 on CUDA. On the CPU it picks
    the first of `cpu_precisions` this CPU runs natively (bf16: AMX/AVX512-BF16; fp16: AVX512-FP16),
    else fp32: `cpu_precisions` lists, per encoder, the reduced precisions measured to keep every
    item's features within cosine 0.999 of fp32, fastest first (registry.py).

    Raises:
        ValueError: an unknown precision, or a precision the device cannot run.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if precision == "auto":
        if dev.type == "cuda":
            # fp16 keeps 3 more mantissa bits than bf16: on an H200 Lite0's features were at cosine
            # >= 0.999 to fp32 in fp16 and only 0.991 in bf16 (benchmarks/gpu_smoke.py).
            return Runtime(dev, torch.float16)
        for name in cpu_precisions:
            dtype, supported = CPU_PRECISIONS[name]
            if supported():
                return Runtime(dev, dtype)
        return Runtime(dev, None)
    if precision == "fp32":
        return Runtime(dev, None)
    if precision == "bf16":
        return Runtime(dev, torch.bfloat16)
    if precision == "fp16":
        if dev.type != "cuda" and not cpu_supports_fp16():
            raise ValueError("precision 'fp16' needs a CUDA device or a CPU with AVX512-FP16; "
                             "use 'bf16', 'fp32' or 'auto' on this CPU")
        return Runtime(dev, torch.float16)
    raise ValueError(f"unknown precision {precision!r}: use 'auto', 'fp32', 'bf16' or 'fp16'")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, hex (computed once per process while the file's size and mtime stay the same)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a weights file, first 16 hex digits (identifies the weights in manifests)."""
    return file_sha256(path)[:16]


class Encoder(ABC):
    """A frozen encoder from the registry.

    Attributes:
        name: registry name; also the features directory name.
        modality: "image" or "text".
        dim: size of the feature vector.
        runtime: where and how precisely it runs.
    """

    name: str
    modality: str
    dim: int
    runtime: Runtime

    @property
    @abstractmethod
    def weights_digest(self) -> str:
        """Identifies the weights: features of other weights never mix with these."""

    @property
    @abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """Everything about input preparation that changes the features."""

    def describe(self) -> dict[str, Any]:
        """The identity of the features this encoder writes (stored in the feature manifest)."""
        return {
            "encoder": self.name,
            "modality": self.modality,
            "dim": self.dim,
            "weights_digest": self.weights_digest,
            "preprocessing": self.preprocessing,
        }


class ImageEncoder(Encoder):
    """Maps a batch of uint8 images (N, 3, H, W) to float32 features (N, dim) on the CPU.

    Subclasses set `size`, `pixel_mean` and `pixel_std` (on the 0-255 scale) and implement
    `_features` on a normalised channels-last batch.
    """

    modality = "image"
    size: int
    pixel_mean: float | torch.Tensor
    pixel_std: float | torch.Tensor
    _compiled: _Compiled | None = None  # set by `compile`

    @property
    def preprocess(self) -> ResizeCenterCrop:
        """A picklable callable PIL.Image -> uint8 tensor (3, size, size); runs in decode workers."""
        return ResizeCenterCrop(self.size)

    @abstractmethod
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised float batch on the encoder's device."""

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Features of PIL images (preprocessed here): what search by image uses."""
        return self.encode(torch.stack([self.preprocess(image) for image in images]))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.runtime.device, non_blocking=True)
        if self._compiled is not None and len(x) > self._compiled.batch_size // 2:
            return self._compiled(x).cpu()
        return self._forward(x).cpu()

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on the device -> float32 features (N, dim) on the device."""
        x = images.float()
        x = ((x - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            return self._features(x).float()

    def compile(self, batch_size: int) -> None:
        """Run `encode` through `torch.compile` (TorchInductor) from now on, for batches of `batch_size`.

        Inductor freezes the weights into the graph, fuses each convolution with its activation and
        lays the weights out for oneDNN: on this 2-core CPU EfficientNet-Lite0 in fp16 went from 60-66
        to 87-112 images/s, with the same features (cosine 0.99995 to fp32 at worst on Flickr8k photos,
        as eager fp16). Compiling costs 15-45 s here, once per process (less with Inductor's disk cache).
        Shorter batches are padded to `batch_size`, so one graph serves them all; a batch of at most
        half that size (a search query) runs eagerly instead. When compiling fails (no C++ compiler,
        say) a warning is logged and the encoder runs eagerly.
        """
        if self._compiled is None:
            self._compiled = _Compiled(self, batch_size)

    @property
    def compiled(self) -> bool:
        """Whether `encode` runs a compiled graph (see `compile`)."""
        return self._compiled is not None


class _Compiled:
    """An image encoder's `_forward` under `torch.compile`, for one batch size (shorter batches padded)."""

    def __init__(self, encoder: ImageEncoder, batch_size: int) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.forward = torch.compile(encoder._forward, dynamic=False, options={"freezing": True})
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        if rows < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - rows, *x.shape[1:]))])
        if self.checked:
            return self.forward(x)[:rows]
        try:
            features = self.forward(x)[:rows]
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager forward is always there
            logger.warning("%s: torch.compile failed, running eagerly (%s: %s)", self.encoder.name,
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.encoder._compiled = None
            return self.encoder._forward(x[:rows])
        self.checked = True
        return features


class TextEncoder(Encoder):
    """Maps a list of strings to float32 features (N, dim) on the CPU."""

    modality = "text"

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...

    def for_queries(self) -> TextEncoder:
        """The encoder to use for a few texts per call (search queries): itself, unless a subclass has a faster
        form for that (`HFTextEncoder.for_queries`)."""
        return self

    def compile_queries(self, autotune: bool = True) -> bool:
        """Compile the form `for_queries` returns, for the calls after this one; False where there is none to
        compile (`HFTextEncoder.compile_queries` has)."""
        return False

    @property
    def queries_compiled(self) -> bool:
        """Whether the form `for_queries` returns runs compiled (`compile_queries`)."""
        return False
