"""Image preprocessing for the encoders: decode at reduced size, normalise, resize, centre-crop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from crossalign.imaging import normalise_to_rgb


@dataclass(frozen=True)
class ResizeCenterCrop:
    """PIL image -> uint8 tensor (3, size, size): shorter side resized to `size`, then centre-cropped.

    Picklable, so spawned DataLoader workers can run it. JPEGs are decoded at reduced size when
    they are much larger than needed (Pillow's draft mode), which makes decoding several times cheaper.
    """

    size: int

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.format == "JPEG":
            img.draft("RGB", (self.size, self.size))
        img, _ = normalise_to_rgb(img)
        img = TF.resize(img, self.size, interpolation=InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.pil_to_tensor(img)


JPEG_MAGIC = b"\xff\xd8"


def gpu_resize_center_crop(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Decoded uint8 images (3, H, W) on the GPU -> (N, 3, size, size): the resize of `ResizeCenterCrop`.

    Bicubic with antialiasing (torchvision's match for PIL's filter), shorter side to `size`, then the
    centre crop. Images of one shape are resized together, so a batch costs a few kernels, not N.
    """
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    for shape, indices in by_shape.items():
        batch = torch.stack([images[i] for i in indices])
        if min(shape[1:]) != size:  # PIL leaves an image whose shorter side is `size` as it is: so do we
            batch = TF.resize(batch, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        out[indices] = TF.center_crop(batch, [size, size])
    return out
