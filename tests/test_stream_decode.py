"""The streamed path decodes a JPEG at a reduced DCT scale when the crop allows it, and the result
is timm's RandomResizedCrop of the full image up to JPEG's own resampling."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from kdreg.data import transforms
from kdreg.data.transforms import DraftedResizedCrop, reduction


def smooth_jpeg(width: int, height: int) -> bytes:
    """A photo-like (smooth) JPEG: a random 12x9 image upscaled."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_the_reduction_keeps_at_least_the_output_pixels() -> None:
    assert reduction((500, 400), (128, 128)) == 2        # 250x200 still covers 128x128
    assert reduction((255, 400), (128, 128)) == 1        # 127 would be short
    assert reduction((2048, 1100), (128, 128)) == 8      # DCT scales stop at 1/8
    assert reduction((1100, 1100), (128, 128)) == 8
    assert reduction((1000, 1000), (128, 128)) == 4


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_drafted_crop_is_timms_crop_decoded_at_the_scale_it_allows(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = smooth_jpeg(480, 400)
    crop = RandomResizedCropAndInterpolation(96, scale=(0.5, 1.0))
    sizes: list[tuple[int, int, int]] = []
    real = transforms.decode

    def spy(image, mode, factor=1):  # type: ignore[no-untyped-def]
        out = real(image, mode, factor)
        sizes.append((factor, *out.size))
        return out

    monkeypatch.setattr(transforms, "decode", spy)
    random.seed(seed)
    drafted = np.asarray(DraftedResizedCrop(crop, "RGB")(Image.open(io.BytesIO(data))), dtype=float)
    random.seed(seed)                     # the same draws: timm's own call on the decoded image
    full = np.asarray(crop(Image.open(io.BytesIO(data)).convert("RGB")), dtype=float)
    assert drafted.shape == full.shape == (96, 96, 3)
    (factor, width, height), = sizes      # crops of >= 0.5 of 480x400 decode at 1/2 or 1/4
    assert factor in (2, 4) and (width, height) == (480 // factor, 400 // factor)
    assert np.abs(drafted - full).mean() < 2.0, np.abs(drafted - full).mean()


def test_a_crop_too_small_to_reduce_is_decoded_whole() -> None:
    data = smooth_jpeg(300, 300)
    crop = RandomResizedCropAndInterpolation(128, scale=(0.08, 0.1))
    image = Image.open(io.BytesIO(data))
    torch.manual_seed(0)
    random.seed(0)
    out = DraftedResizedCrop(crop, "RGB")(image)
    assert out.size == (128, 128) and image.size == (300, 300)


def test_a_folder_of_several_formats_streams_every_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kdreg.data.streaming import open_image
    from kdreg.data.transforms import decode as decode_image
    from kdreg_plugins.datasets.stream import folder_stream

    formats = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "PPM": ".ppm"}
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k, (fmt, suffix) in enumerate(formats.items()):
                Image.new("RGB", (20 + k, 30), (40 + 100 * c, 10 * k, 0)).save(folder / f"{k}{suffix}", format=fmt)
    stream = folder_stream(tmp_path, in_memory=False, use_cache=False)
    assert len(stream.train) == len(stream.test) == 2 * len(formats)
    seen = set()
    for i in range(len(stream.train)):
        image, label = stream.train[i]
        seen.add(image.format)
        decoded = decode_image(open_image(image), "RGB")
        assert decoded.size[1] == 30 and decoded.mode == "RGB"
        assert (decoded.getpixel((0, 0))[0] > 100) == (label == 1)
    assert seen == set(formats)
