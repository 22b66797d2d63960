"""What every encoder offers, and where and how precisely it runs."""

from __future__ import annotations

import functools
import hashlib
import logging
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
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_runtime(device: str = "auto", precision: str = "auto", cpu_bf16: bool = True) -> Runtime:
    """Turn config strings into a `Runtime`.

    "auto" device picks CUDA when available. "auto" precision picks fp16 on CUDA; on the CPU, bf16
    when the CPU has native bf16 instructions (AMX/AVX512-BF16) and `cpu_bf16` says the encoder keeps
    its features within cosine 0.999 of fp32 in bf16 (measured per encoder), else fp32.

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
        return Runtime(dev, torch.bfloat16 if cpu_bf16 and cpu_supports_bf16() else None)
    if precision == "fp32":
        return Runtime(dev, None)
    if precision == "bf16":
        return Runtime(dev, torch.bfloat16)
    if precision == "fp16":
        if dev.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16', 'fp32' or 'auto' on the CPU")
        return Runtime(dev, torch.float16)
    raise ValueError(f"unknown precision {precision!r}: use 'auto', 'fp32', 'bf16' or 'fp16'")


@functools.cache
def file_digest(path: Path) -> str:
    """sha256 of a weights file, first 16 hex digits (identifies the weights in manifests)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


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
        x = images.to(self.runtime.device, non_blocking=True).float()
        x = ((x - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            features = self._features(x)
        return features.float().cpu()


class TextEncoder(Encoder):
    """Maps a list of strings to float32 features (N, dim) on the CPU."""

    modality = "text"

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...
