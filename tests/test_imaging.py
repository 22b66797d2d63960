"""Every common image mode becomes an upright 8-bit RGB picture, and ingest records what it normalised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus, read_images
from crossalign.encoders.preprocess import ResizeCenterCrop
from crossalign.imaging import normalise_to_rgb
from crossalign.workspace import Workspace


def write_cases(folder: Path) -> dict[str, list[str]]:
    """One file per mode; returns {file name: the normalisation steps expected}."""
    folder.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (40, 20), (200, 20, 20))
    red.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(800, dtype=np.uint16).reshape(20, 40) * 80).save(folder / "deep.png")
    palette = Image.new("P", (40, 20), 1)
    palette.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (40, 20), (200, 20, 20, 128)).save(folder / "rgba.png")
    Image.new("L", (40, 20), 90).save(folder / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    red.save(folder / "rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (40, 20), c) for c in ((200, 20, 20), (20, 20, 200))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    red.save(folder / "plain.jpg")
    return {"cmyk.jpg": ["cmyk"], "deep.png": ["16_bit", "greyscale"], "palette.png": ["palette", "alpha_flattened"],
            "rgba.png": ["alpha_flattened"], "grey.png": ["greyscale"], "rotated.jpg": ["exif_rotated"],
            "animated.gif": ["first_frame", "palette"], "plain.jpg": []}


@pytest.fixture
def cases(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    return tmp_path / "corpus", write_cases(tmp_path / "corpus" / "images")


def test_each_mode_becomes_rgb_with_its_steps_named(cases):
    folder, expected = cases
    for name, steps in expected.items():
        with Image.open(folder / "images" / name) as img:
            rgb, done = normalise_to_rgb(img)
        assert rgb.mode == "RGB" and done == steps, name


def test_sixteen_bit_is_rescaled_not_clipped(cases):
    folder, _ = cases
    with Image.open(folder / "images" / "deep.png") as img:
        rgb, _ = normalise_to_rgb(img)
    values = np.asarray(rgb)[..., 0]
    assert values.min() == 0 and 200 < values.max() <= 255 and len(np.unique(values)) > 100  # a gradient survives


def test_exif_rotated_image_is_stored_upright(cases):
    folder, _ = cases
    with Image.open(folder / "images" / "rotated.jpg") as img:
        rgb, _ = normalise_to_rgb(img)
    assert rgb.size == (20, 40)  # 40x20 on disk, 20x40 as displayed


def test_transparency_is_flattened_onto_white(cases):
    folder, _ = cases
    with Image.open(folder / "images" / "rgba.png") as img:
        rgb, _ = normalise_to_rgb(img)
    assert tuple(np.asarray(rgb)[0, 0]) == (227, 137, 137)  # half red over white


def test_preprocess_uses_the_same_normalisation(cases):
    folder, _ = cases
    with Image.open(folder / "images" / "rotated.jpg") as img:
        pixels = ResizeCenterCrop(64)(img)
    assert pixels.shape == (3, 64, 64) and pixels.dtype.is_floating_point is False


def test_ingest_records_what_it_normalised(cases, tmp_path):
    folder, expected = cases
    lines = [{"image": f"images/{name}", "captions": [f"picture {name}"], "split": "train"} for name in expected]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    workspace = Workspace(tmp_path / "ws")
    summary = ingest_corpus(CorpusConfig(root=folder, name="modes"), workspace)
    statuses = {Path(r["uri"]).name: r["status"] for r in read_images(workspace, "modes").to_pylist()}
    assert statuses == {name: ("normalised:" + ",".join(steps) if steps else "ok") for name, steps in expected.items()}
    assert summary.rejected == 0 and summary.normalised == len(expected) - 1
