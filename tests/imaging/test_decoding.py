"""Decoding large uploads: same pixels as before, and the memory estimate holds in reality."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnist_api.config import PROJECT_ROOT
from mnist_api.imaging import decoding
from mnist_api.imaging.decoding import Header, coarsest_scale, decode_cost, open_image, read_header
from tests.samples import as_paper, encode, sample
from tools.decode_memory import SAMPLES


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels in `mode` (palette images get a random palette and a transparent index)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode in ("P", "P+transparency"):
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image = image.convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            image.info["transparency"] = 7
        return image
    if mode == "1":
        return Image.fromarray(
            rng.integers(0, 2, (height, width), dtype=np.uint8) * 255, "L"
        ).convert("1")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P+transparency", "1", "I;16"])
@pytest.mark.parametrize("factor", [2, 3, 8])
def test_reducing_in_bands_gives_the_same_pixels_as_at_once(
    mode: str, factor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Odd sizes (a partial last box in both directions) and bands of a few rows, so there
    # are many bands and a short last one.
    image = random_image(mode, (203, 157))
    monkeypatch.setattr(decoding, "BAND_PIXELS", 203 * 20)
    assert decoding.band_rows(203, factor) < 157
    whole = decoding._reducible(image).reduce(factor)
    banded = decoding._reduce(image, factor)
    assert banded.mode == whole.mode and banded.size == whole.size
    assert np.array_equal(np.asarray(banded), np.asarray(whole))


def test_bands_carry_the_exif_a_whole_reduction_would() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(random_image("RGBA", (1200, 900)), exif=exif)
    image = open_image(data, 50_000_000)
    image.load()
    assert decoding._reduce(image, 4).getexif()[0x0112] == 6


def test_a_large_png_is_upright_after_its_reduced_decode() -> None:
    """Reduced in bands, then the EXIF orientation still applies (a sideways phone export)."""
    upright = as_paper(sample(7), size=600, canvas=(1600, 1200), offset=(500, 300)).convert("RGBA")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decoding.decode_reduced(open_image(encode(stored, exif=exif), 50_000_000), 4)
    assert image.size == (400, 300)


def test_working_scale_as_before_for_ordinary_sizes() -> None:
    def scale(width: int, height: int) -> int:
        return coarsest_scale(Header(width, height, "RGB", "PNG"))

    assert [scale(280, 280), scale(600, 400), scale(1200, 900), scale(4000, 3000)] == [1, 1, 2, 8]
    assert scale(7071, 7071) == 8


def test_a_long_strip_is_reduced_until_its_working_copy_is_bounded() -> None:
    header = Header(400, 100_000, "L", "PNG")
    scale = coarsest_scale(header)
    assert decoding.work_pixels(header, scale) <= decoding.MAX_WORK_PIXELS
    assert decoding.work_pixels(header, scale // 2) > decoding.MAX_WORK_PIXELS


def test_a_coarser_scale_is_chosen_when_it_fits_the_budget() -> None:
    header = Header(400, 9000, "RGB", "JPEG")
    scale = coarsest_scale(header)
    fitted = decoding.fit_scale(header, scale, decode_cost(header, scale) - 1)
    assert fitted > scale and decode_cost(header, fitted) < decode_cost(header, scale)
    # A PNG's full-size decode does not shrink with the scale: nothing coarser makes it fit,
    # and the search stops (the budget then refuses it).
    png = Header(4000, 3000, "RGBA", "PNG")
    assert decode_cost(png, decoding.fit_scale(png, 8, 1000)) > 4000 * 3000 * 4


def header_of(data: bytes) -> Header:
    return read_header(open_image(data, 50_000_000), data)


def test_baseline_jpeg_keeps_no_coefficients_progressive_does() -> None:
    photo = as_paper(sample(7), size=600, canvas=(1600, 1200), offset=(500, 300)).convert("RGB")
    assert header_of(encode(photo, "JPEG")).decoder_bytes == 0
    progressive = header_of(encode(photo, "JPEG", progressive=True))
    # 4:2:0: one full-resolution luma plane and two quarter chroma planes, 2 bytes a sample.
    assert progressive.decoder_bytes == 1600 * 1200 * 3 // 2 * 2
    full_chroma = header_of(encode(photo, "JPEG", progressive=True, subsampling=0))
    assert full_chroma.decoder_bytes == 1600 * 1200 * 3 * 2


def test_a_webp_costs_its_decoder_copies() -> None:
    data = encode(Image.new("RGB", (1000, 1000), (255, 255, 255)), "WEBP")
    header = header_of(data)
    assert decode_cost(header, 1) > 1000 * 1000 * 4 * 4  # at least four RGBA copies


@pytest.mark.slow
def test_the_estimate_covers_the_memory_really_used() -> None:
    """Every way a large upload is decoded, measured in a process of its own: the peak
    resident memory it added stays under what the budget reserved for it."""
    run = subprocess.run(
        [sys.executable, "-m", "tools.decode_memory", "--json"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [result["name"] for result in results] == list(SAMPLES)
    for result in results:
        assert result["outcome"] == "ok", result
        # A draft-mode JPEG may fit in memory the process already had: a peak of 0 is real.
        assert 0 <= result["peak"] <= result["reserved"], result
