"""Turning any decodable image into the upright 8-bit RGB picture the encoders expect.

Shared by ingest (which records what it had to normalise) and the encoders' preprocessing (which
applies the same steps), so a corpus image is seen the same way at both stages. PIL and NumPy only:
ingest never imports torch (it alone would take half a gigabyte of memory).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def normalisation_steps(img: Image.Image) -> list[str]:
    """The steps `normalise_to_rgb` will take for `img`, read from its header alone (no pixels decoded).

    Steps: `first_frame` (animations), `exif_rotated` (EXIF orientation applied), `16_bit` (rescaled
    to 8 bits, not clipped), `palette` (converted), `alpha_flattened` (RGBA, LA and palette
    transparency, onto white), `cmyk` and `greyscale` (converted to RGB).
    """
    steps = []
    if getattr(img, "n_frames", 1) > 1:
        steps.append("first_frame")
    if img.getexif().get(0x0112, 1) != 1:  # Orientation
        steps.append("exif_rotated")
    mode = img.mode
    if mode in HIGH_BIT_MODES:
        steps.append("16_bit")
        mode = "L"
    if mode == "P":
        steps.append("palette")
        mode = "RGBA" if "transparency" in img.info else "RGB"
    if mode in ("RGBA", "LA", "PA"):
        steps.append("alpha_flattened")
    elif mode == "CMYK":
        steps.append("cmyk")
    elif mode in ("L", "1"):
        steps.append("greyscale")
    return steps


def normalise_to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Upright, 8-bit, RGB: returns the image and the `normalisation_steps` it took."""
    steps = normalisation_steps(img)
    if "first_frame" in steps:
        img.seek(0)
    if "exif_rotated" in steps:
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 or img.mode != "I" else 255.0
        img = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, steps
