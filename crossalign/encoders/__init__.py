"""Frozen pretrained encoders, picked by name from a registry."""

from crossalign.encoders.base import (
    Encoder,
    ImageEncoder,
    Runtime,
    TextEncoder,
    WeightsUnavailableError,
    resolve_runtime,
)
from crossalign.encoders.registry import (
    EncoderModalityError,
    canonical_name,
    check_modality,
    encoder_modality,
    encoder_names,
    load_encoder,
    load_encoder_for,
    load_query_encoder,
    register_encoder,
    unregister_encoder,
)

__all__ = [
    "Encoder",
    "EncoderModalityError",
    "ImageEncoder",
    "Runtime",
    "TextEncoder",
    "WeightsUnavailableError",
    "canonical_name",
    "check_modality",
    "encoder_modality",
    "encoder_names",
    "load_encoder",
    "load_encoder_for",
    "load_query_encoder",
    "register_encoder",
    "unregister_encoder",
    "resolve_runtime",
]
