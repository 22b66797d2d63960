"""Zero-shot classification through the joint space: each image gets the class whose prompts it is nearest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from crossalign.align.mapper import JointMapper
from crossalign.encoders import TextEncoder

DEFAULT_TEMPLATES = ("a photo of {}.", "a picture of {}.", "a product photo of {}.")


def class_embeddings(model: JointMapper, text_encoder: TextEncoder, class_names: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(n_classes, dim): per class, the normalised mean of its prompts' joint embeddings."""
    prompts = [template.format(name) for name in class_names for template in templates]
    model.eval()
    with torch.no_grad():
        embedded = model.encode_text(text_encoder.encode(prompts)).view(len(class_names), len(templates), -1)
    return F.normalize(embedded.mean(1), dim=-1)


@torch.no_grad()
def zero_shot_predict(model: JointMapper, image_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The index of the nearest class embedding for each row of `image_features` (encoder features)."""
    model.eval()
    return (model.encode_image(image_features) @ classes.T).argmax(1)


def zero_shot_accuracy(model: JointMapper, text_encoder: TextEncoder, image_features: torch.Tensor,
                       labels: Sequence[int], class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> float:
    """Top-1 accuracy of zero-shot classification of `image_features` against `labels`."""
    predicted = zero_shot_predict(model, image_features, class_embeddings(model, text_encoder, class_names, templates))
    return (predicted == torch.as_tensor(list(labels))).float().mean().item()
