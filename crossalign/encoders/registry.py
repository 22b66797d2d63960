"""Encoders by name. Tests and plugins add their own with `register_encoder`.

Names: the bundled `efficientnet-lite0`, `efficientnet-lite2`, `minilm-l6` and `mpnet-base`;
`torchvision:<model>[@weights|@random]` for any torchvision classifier; `hf:<model id or
directory>[#mean|#cls]` for any Hugging Face encoder; `<image encoder>+flip` averages an image
encoder's features over the image and its mirror image; `<encoder>,<encoder>,...` concatenates the
features of several encoders of one modality.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from crossalign.encoders.base import Encoder, ImageEncoder, Runtime, TextEncoder, resolve_runtime
from crossalign.encoders.composite import SEPARATOR, CompositeImageEncoder, CompositeTextEncoder, composite_parts
from crossalign.encoders.efficientnet import FlipAveraged, load_efficientnet_lite0, load_efficientnet_lite2
from crossalign.encoders.hf_text import load_hf, load_minilm_l6
from crossalign.encoders.mpnet import load_mpnet_base
from crossalign.encoders.torchvision_image import load_torchvision

EncoderFactory = Callable[[Runtime], Encoder]


@dataclass(frozen=True)
class _Entry:
    factory: EncoderFactory
    # The reduced precisions "auto" may pick on a CPU that runs them natively, fastest first: only those
    # measured to keep every item's features within cosine 0.999 of fp32 (tests/test_encoders.py checks
    # whatever auto picks). Elsewhere auto runs fp32.
    cpu_precisions: tuple[str, ...] = ()


_ENTRIES: dict[str, _Entry] = {
    # On 256 Flickr8k dev photos: fp16 at cosine >= 0.99995 to fp32 (Lite2: 0.99994), bf16 only 0.9956 with
    # 60 of 256 photos under 0.999. fp16 ran 1.7-2x fp32 here (AVX512-FP16), bf16 barely faster than fp16.
    "efficientnet-lite0": _Entry(load_efficientnet_lite0, cpu_precisions=("fp16",)),
    "efficientnet-lite2": _Entry(load_efficientnet_lite2, cpu_precisions=("fp16",)),
    "minilm-l6": _Entry(load_minilm_l6, cpu_precisions=("bf16",)),
    # On 2,000 Flickr8k captions: bf16 at cosine >= 0.99996 to fp32, 2.4x faster (AMX).
    "mpnet-base": _Entry(load_mpnet_base, cpu_precisions=("bf16",)),
}
_FAMILIES: dict[str, Callable[[str, Runtime], Encoder]] = {"torchvision": load_torchvision, "hf": load_hf}


def register_encoder(name: str, factory: EncoderFactory, cpu_precisions: tuple[str, ...] = ()) -> None:
    """Make `factory(runtime) -> Encoder` loadable as `name` ("auto" on the CPU: see `_Entry`)."""
    _ENTRIES[name] = _Entry(factory, cpu_precisions)
    load_encoder.cache_clear()


def encoder_names() -> list[str]:
    """Names `load_encoder` accepts (families take a model after the colon)."""
    combined = ["<image encoder>+flip", "<encoder>,<encoder> (one modality)"]
    return sorted(_ENTRIES) + [f"{family}:<model>" for family in sorted(_FAMILIES)] + combined


@functools.lru_cache(maxsize=8)
def load_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """Load (once per process) the encoder called `name`.

    Raises:
        ValueError: `name` is not registered and names no known family (the message lists what is).
        WeightsUnavailableError: the weights are not on this machine (nothing is downloaded).
    """
    if SEPARATOR in name:  # several encoders of one modality side by side
        parts = [load_encoder(part, device, precision) for part in composite_parts(name)]
        if all(isinstance(part, ImageEncoder) for part in parts):
            return CompositeImageEncoder(parts)
        if all(isinstance(part, TextEncoder) for part in parts):
            return CompositeTextEncoder(parts)
        raise ValueError(f"{name}: only encoders of one modality can be combined (all image or all text)")
    if name.endswith("+flip"):  # any image encoder, averaged over the image and its mirror image
        inner = load_encoder(name.removesuffix("+flip"), device, precision)
        if not isinstance(inner, ImageEncoder):
            raise ValueError(f"{name}: +flip applies to image encoders only")
        return FlipAveraged(inner)
    family, _, spec = name.partition(":")
    if name in _ENTRIES:
        entry = _ENTRIES[name]
    elif spec and family in _FAMILIES:
        entry = _Entry(functools.partial(_FAMILIES[family], spec))
    else:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(encoder_names())}")
    return entry.factory(resolve_runtime(device, precision, entry.cpu_precisions))
