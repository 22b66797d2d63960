"""Frozen pretrained encoders, picked by name from a registry."""

from crossalign.encoders.base import (
    Encoder,
    ImageEncoder,
    Runtime,
    TextEncoder,
    WeightsUnavailableError,
    resolve_runtime,
)
from crossalign.encoders.registry import encoder_names, load_encoder, register_encoder

__all__ = [
    "Encoder",
    "ImageEncoder",
    "Runtime",
    "TextEncoder",
    "WeightsUnavailableError",
    "encoder_names",
    "load_encoder",
    "register_encoder",
    "resolve_runtime",
]
