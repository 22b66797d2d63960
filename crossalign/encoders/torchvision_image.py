"""Any torchvision classifier as a frozen image encoder: classifier head removed, pooled features.

Registry names: `torchvision:<model>` (the model's default weights), `torchvision:<model>@<WEIGHTS>`
(a weights enum member such as IMAGENET1K_V2) and `torchvision:<model>@random` (random
initialisation: for tests of shapes and wiring, and for speed benchmarks). Weights must already be in
the torch hub cache; nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from crossalign.encoders.base import ImageEncoder, Runtime, WeightsUnavailableError, file_digest

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")


def _strip_head(model: nn.Module) -> nn.Module:
    for attribute in HEAD_ATTRIBUTES:
        if isinstance(getattr(model, attribute, None), nn.Module):
            setattr(model, attribute, nn.Identity())
            return model
    raise ValueError(f"{type(model).__name__}: no classifier head ({', '.join(HEAD_ATTRIBUTES)}) to remove")


def _cached_weights(model_name: str, weights_name: str) -> Any:
    """The weights enum member, after checking its file is in the torch hub cache."""
    weights = torchvision.models.get_model_weights(model_name)
    member = weights.DEFAULT if weights_name == "DEFAULT" else weights[weights_name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    if not path.exists():
        raise WeightsUnavailableError(
            f"weights {member} are not in the torch hub cache ({path}); crossalign never downloads at run "
            f"time: copy the file there, or use 'torchvision:{model_name}@random' for a randomly initialised model"
        )
    return member, path


class TorchvisionEncoder(ImageEncoder):
    """A torchvision classifier without its head; the output of the global pool is the feature."""

    def __init__(self, model_name: str, weights_name: str, runtime: Runtime, size: int = 224) -> None:
        self.name = f"torchvision:{model_name}" + ("" if weights_name == "DEFAULT" else f"@{weights_name}")
        self.runtime = runtime
        self.size = size
        if weights_name == "random":
            with torch.random.fork_rng(devices=[]):  # the same "random" model in every process, RNG untouched
                torch.manual_seed(0)
                model, self._digest = torchvision.models.get_model(model_name, weights=None), "random-seed0"
        else:
            member, path = _cached_weights(model_name, weights_name)
            model, self._digest = torchvision.models.get_model(model_name, weights=member), file_digest(path)
        model = _strip_head(model).eval().requires_grad_(False)
        self._model = model.to(runtime.device, memory_format=torch.channels_last)
        with torch.inference_mode():
            self.dim = int(self._model(torch.zeros(1, 3, size, size, device=runtime.device)).shape[1])
        mean = torch.tensor(IMAGENET_MEAN, device=runtime.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=runtime.device).view(1, 3, 1, 1) * 255
        self.pixel_mean, self.pixel_std = mean, std

    @property
    def weights_digest(self) -> str:
        return self._digest

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"resize": "shorter-side bicubic", "crop": "center", "size": self.size,
                "normalise": "imagenet mean/std", "pooling": "model's global pool"}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(x)


def load_torchvision(spec: str, runtime: Runtime) -> TorchvisionEncoder:
    """`spec` is `<model>` or `<model>@<weights>` (see the module docstring)."""
    model_name, _, weights_name = spec.partition("@")
    if model_name not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {model_name!r}; e.g. resnet50, convnext_tiny, vit_b_16")
    return TorchvisionEncoder(model_name, weights_name or "DEFAULT", runtime)
