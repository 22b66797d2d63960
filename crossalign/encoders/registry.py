"""Encoders by name. Tests and plugins add their own with `register_encoder`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from crossalign.encoders.base import Encoder, Runtime, resolve_runtime
from crossalign.encoders.efficientnet import load_efficientnet_lite0
from crossalign.encoders.hf_text import load_minilm_l6

EncoderFactory = Callable[[Runtime], Encoder]

_FACTORIES: dict[str, EncoderFactory] = {
    "efficientnet-lite0": load_efficientnet_lite0,
    "minilm-l6": load_minilm_l6,
}


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Make `factory(runtime) -> Encoder` loadable as `name`."""
    _FACTORIES[name] = factory
    load_encoder.cache_clear()


def encoder_names() -> list[str]:
    """Names `load_encoder` accepts."""
    return sorted(_FACTORIES)


@functools.lru_cache(maxsize=8)
def load_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """Load (once per process) the encoder registered as `name`.

    Raises:
        ValueError: `name` is not registered (the message lists the names that are).
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(encoder_names())}") from None
    return factory(resolve_runtime(device, precision))
