"""Turning any decodable image into the upright 8-bit RGB picture the encoders expect.

Shared by ingest (which records what it had to normalise) and the encoders' preprocessing (which
applies the same steps), so a corpus image is seen the same way at both stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode


def normalise_to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Upright, 8-bit, RGB: returns the image and the names of the steps it needed.

    Steps: `exif_rotated` (EXIF orientation applied), `first_frame` (animations), `16_bit`
    (rescaled to 8 bits, not clipped), `alpha_flattened` (RGBA, LA and palette transparency, onto
    white), `cmyk`, `greyscale` and `palette` (converted to RGB).
    """
    steps = []
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        steps.append("first_frame")
    if img.getexif().get(0x0112, 1) != 1:  # Orientation
        img = ImageOps.exif_transpose(img)
        steps.append("exif_rotated")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 or img.mode != "I" else 255.0
        img = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        steps.append("16_bit")
    if img.mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        steps.append("palette")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        steps.append("alpha_flattened")
    if img.mode == "CMYK":
        steps.append("cmyk")
    elif img.mode in ("L", "1"):
        steps.append("greyscale")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, steps


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
