"""Encoders by name. Tests and plugins add their own with `register_encoder`.

Names: the bundled `efficientnet-lite0`, `efficientnet-lite2`, `minilm-l6` and `mpnet-base`;
`torchvision:<model>[@weights|@random]` for any torchvision classifier; `hf:<model id or
directory>[#mean|#cls]` for any Hugging Face encoder; `<image encoder>+flip` averages an image
encoder's features over the image and its mirror image; `<encoder>,<encoder>,...` concatenates the
features of several encoders of one modality.

Several spellings name one encoder (`canonical_name` gives the one the loaded encoder reports, which
also names its features directory): spaces around a name or its parts, `torchvision:<model>@DEFAULT`
for `torchvision:<model>`, `hf:<model>#mean` for `hf:<model>`.
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


MODALITIES = ("image", "text")


class EncoderModalityError(ValueError):
    """An encoder of one modality was named where the other one is needed (a text encoder for images, say)."""


@dataclass(frozen=True)
class _Entry:
    factory: EncoderFactory
    modality: str | None = None  # known without loading for the bundled encoders (lists the choices in errors)
    # The reduced precisions "auto" may pick on a CPU that runs them natively, fastest first: only those
    # measured to keep every item's features within cosine 0.999 of fp32 (tests/test_encoders.py checks
    # whatever auto picks). Elsewhere auto runs fp32.
    cpu_precisions: tuple[str, ...] = ()


_ENTRIES: dict[str, _Entry] = {
    # On 256 Flickr8k dev photos: fp16 at cosine >= 0.99995 to fp32 (Lite2: 0.99994), bf16 only 0.9956 with
    # 60 of 256 photos under 0.999. fp16 ran 1.7-2x fp32 here (AVX512-FP16), bf16 barely faster than fp16.
    "efficientnet-lite0": _Entry(load_efficientnet_lite0, "image", cpu_precisions=("fp16",)),
    "efficientnet-lite2": _Entry(load_efficientnet_lite2, "image", cpu_precisions=("fp16",)),
    "minilm-l6": _Entry(load_minilm_l6, "text", cpu_precisions=("bf16",)),
    # On 2,000 Flickr8k captions: bf16 at cosine >= 0.99996 to fp32, 2.4x faster (AMX).
    "mpnet-base": _Entry(load_mpnet_base, "text", cpu_precisions=("bf16",)),
}
_BUNDLED = frozenset(_ENTRIES)
_FAMILIES: dict[str, Callable[[str, Runtime], Encoder]] = {"torchvision": load_torchvision, "hf": load_hf}
_FAMILY_MODALITY = {"torchvision": "image", "hf": "text"}
# The default of each family's option, which the canonical name leaves out (as the loaded encoder's name does).
_FAMILY_DEFAULTS = {"torchvision": ("@", "DEFAULT"), "hf": ("#", "mean")}
FLIP = "+flip"


def register_encoder(name: str, factory: EncoderFactory, cpu_precisions: tuple[str, ...] = (),
                     modality: str | None = None) -> None:
    """Make `factory(runtime) -> Encoder` loadable as `name` ("auto" on the CPU: see `_Entry`); `modality`
    ("image" or "text"), when given, lets errors and pre-flight checks know it without loading."""
    _ENTRIES[name] = _Entry(factory, modality, cpu_precisions=cpu_precisions)
    load_encoder.cache_clear()


def unregister_encoder(name: str) -> None:
    """Undo `register_encoder(name, ...)` (nothing if `name` is not registered); the bundled names stay."""
    if name in _BUNDLED:
        raise ValueError(f"{name!r} is a bundled encoder: it cannot be unregistered")
    if _ENTRIES.pop(name, None) is not None:
        load_encoder.cache_clear()


def encoder_names(modality: str | None = None) -> list[str]:
    """Names `load_encoder` accepts (families take a model after the colon); of one `modality` if given
    (registered encoders whose modality is known only once loaded are listed for both)."""
    def fits(kind: str | None) -> bool:
        return modality is None or kind in (None, modality)

    combined = ([f"<image encoder>{FLIP}"] if fits("image") else []) + [
        "<encoder>,<encoder> (one modality)"]
    return (sorted(name for name, entry in _ENTRIES.items() if fits(entry.modality))
            + [f"{family}:<model>" for family in sorted(_FAMILIES) if fits(_FAMILY_MODALITY[family])] + combined)


def canonical_name(name: str) -> str:
    """The one spelling of encoder `name`: what the loaded encoder calls itself, and what names its features.

    Spaces around the name and its parts go; a family's default option goes (`torchvision:resnet50@DEFAULT`
    is `torchvision:resnet50`, `hf:<model>#mean` is `hf:<model>`); composites and `+flip` are spelt
    part by part. Loads nothing: the planner, the writer and the readers of features all call it.
    """
    parts = composite_parts(name)
    if len(parts) > 1:
        return SEPARATOR.join(canonical_name(part) for part in parts)
    name = parts[0]
    if name.endswith(FLIP):
        return canonical_name(name.removesuffix(FLIP)) + FLIP
    family, _, spec = name.partition(":")
    if name in _ENTRIES or family not in _FAMILY_DEFAULTS or not spec:
        return name
    mark, default = _FAMILY_DEFAULTS[family]
    base, _, option = spec.partition(mark)
    return f"{family}:{base.strip()}" + ("" if option.strip() in ("", default) else f"{mark}{option.strip()}")


def encoder_modality(name: str) -> str | None:
    """The modality of encoder `name` ("image" or "text"), known from its name alone: nothing is loaded.

    None for an encoder registered by a test or plugin (`register_encoder`): only loading it tells.

    Raises:
        ValueError: `name` is not registered and names no known family (as `load_encoder`).
        EncoderModalityError: a composite of both modalities, or `+flip` on a text encoder.
    """
    name = canonical_name(name)
    parts = composite_parts(name)
    if len(parts) > 1:
        kinds = {encoder_modality(part) for part in parts}
        if len(kinds - {None}) > 1:
            raise EncoderModalityError(f"{name}: only encoders of one modality can be combined (all image or all text)")
        return None if None in kinds else kinds.pop()
    if name.endswith(FLIP):
        if encoder_modality(name.removesuffix(FLIP)) == "text":
            raise EncoderModalityError(f"{name}: {FLIP} applies to image encoders only")
        return "image"
    family, _, spec = name.partition(":")
    if name in _ENTRIES:
        return _ENTRIES[name].modality
    if spec and family in _FAMILIES:
        return _FAMILY_MODALITY[family]
    raise ValueError(f"unknown encoder {name!r}; available: {', '.join(encoder_names())}")


def check_modality(modality: str, name: str, actual: str | None = None) -> None:
    """Refuse encoder `name` for features of `modality` when it is of the other one (`actual` if known, else
    as its name says: `encoder_modality`; an encoder whose name does not tell passes).

    Raises:
        EncoderModalityError: the other modality (the message lists this one's encoders).
        ValueError: an unknown modality or encoder name.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
    actual = actual or encoder_modality(name)
    if actual not in (None, modality):
        raise EncoderModalityError(
            f"{name!r} is {'an' if actual == 'image' else 'a'} {actual} encoder, not "
            f"{'an' if modality == 'image' else 'a'} {modality} encoder: use one of "
            f"{', '.join(encoder_names(modality))}")


def load_encoder_for(modality: str, name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """`load_encoder`, for features of `modality` ("image" or "text"); the name is checked before loading.

    Raises:
        EncoderModalityError: `name` is an encoder of the other modality (the message lists this one's).
        ValueError, WeightsUnavailableError: as `load_encoder`.
    """
    check_modality(modality, name)
    encoder = load_encoder(name, device, precision)
    check_modality(modality, name, encoder.modality)  # a registered encoder's name does not tell
    return encoder


@functools.lru_cache(maxsize=8)
def load_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """Load (once per process) the encoder called `name`; any spelling of it (`canonical_name`) gives the same one.

    Raises:
        ValueError: `name` is not registered and names no known family (the message lists what is).
        WeightsUnavailableError: the weights are not on this machine (nothing is downloaded).
    """
    if canonical_name(name) != name:
        return load_encoder(canonical_name(name), device, precision)
    if SEPARATOR in name:  # several encoders of one modality side by side
        parts = [load_encoder(part, device, precision) for part in composite_parts(name)]
        if all(isinstance(part, ImageEncoder) for part in parts):
            return CompositeImageEncoder(parts)
        if all(isinstance(part, TextEncoder) for part in parts):
            return CompositeTextEncoder(parts)
        raise EncoderModalityError(f"{name}: only encoders of one modality can be combined (all image or all text)")
    if name.endswith(FLIP):  # any image encoder, averaged over the image and its mirror image
        inner = load_encoder(name.removesuffix(FLIP), device, precision)
        if not isinstance(inner, ImageEncoder):
            raise EncoderModalityError(f"{name}: {FLIP} applies to image encoders only")
        return FlipAveraged(inner)
    family, _, spec = name.partition(":")
    if name in _ENTRIES:
        entry = _ENTRIES[name]
    elif spec and family in _FAMILIES:
        entry = _Entry(functools.partial(_FAMILIES[family], spec))
    else:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(encoder_names())}")
    return entry.factory(resolve_runtime(device, precision, entry.cpu_precisions))


def load_query_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """`load_encoder`'s encoder in the form for a few texts per call (`TextEncoder.for_queries`): what searches
    encode their queries with. Made once per loaded encoder; an image encoder is itself.

    Raises:
        as `load_encoder`.
    """
    encoder = load_encoder(name, device, precision)
    return encoder.for_queries() if isinstance(encoder, TextEncoder) else encoder
