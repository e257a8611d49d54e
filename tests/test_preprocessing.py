"""Preprocessing on the kinds of files people really upload, checked against MNIST itself."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mnist_api import preprocessing
from mnist_api.errors import BlankImage, ImageTooLarge, InvalidImage, UnsupportedMediaType
from mnist_api.preprocessing import Limits, normalize_digit, preprocess
from tests.samples import as_paper, encode, sample

DIGIT = 7


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 28x28 arrays."""
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The MNIST test sample as the model sees it."""
    return normalize_digit(sample(DIGIT).astype(np.float32))


def light_on_dark() -> bytes:
    ink = Image.fromarray(sample(DIGIT), mode="L").resize((112, 112), Image.Resampling.BICUBIC)
    return encode(ink)


def dark_on_light() -> bytes:
    return encode(as_paper(sample(DIGIT)))


def off_centre_with_margins() -> bytes:
    return encode(as_paper(sample(DIGIT), size=90, canvas=(640, 420), offset=(520, 300)))


def rgba_transparent() -> bytes:
    """A canvas drawing: black ink whose alpha is the stroke, on a transparent background."""
    alpha = Image.fromarray(sample(DIGIT), mode="L").resize((140, 140), Image.Resampling.BICUBIC)
    stroke = Image.new("RGBA", (140, 140), (0, 0, 0, 0))
    stroke.putalpha(alpha)
    drawing = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    drawing.alpha_composite(stroke, (60, 70))
    return encode(drawing)


def white_strokes_on_transparent() -> bytes:
    """Light strokes on a transparent canvas: on white they vanish, the alpha keeps them."""
    alpha = Image.fromarray(sample(DIGIT), mode="L").resize((140, 140))
    drawing = Image.new("RGBA", (140, 140), (255, 255, 255, 0))
    drawing.putalpha(alpha)
    return encode(drawing)


def palette_png() -> bytes:
    return encode(as_paper(sample(DIGIT)).convert("RGB").quantize(colors=16))


def sixteen_bit_png() -> bytes:
    paper = np.asarray(as_paper(sample(DIGIT)), dtype=np.uint16) * 257
    image = Image.fromarray(paper.astype(np.uint16))
    assert image.mode.startswith("I;16")
    return encode(image)


def upright_photo() -> Image.Image:
    return as_paper(sample(DIGIT), size=200, canvas=(400, 300), offset=(100, 50)).convert("RGB")


def exif_rotated_jpeg() -> bytes:
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)."""
    stored = upright_photo().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=90, exif=exif)


def animated_gif() -> bytes:
    """Two frames: the digit, then another digit; only the first frame counts."""
    first = as_paper(sample(DIGIT)).convert("P")
    second = as_paper(sample(3)).convert("P")
    return encode(first, "GIF", save_all=True, append_images=[second], duration=200, loop=0)


def phone_photo_12mp() -> bytes:
    """A 4000x3000 RGB JPEG of a digit on slightly grey, unevenly lit paper."""
    ramp = np.linspace(215, 245, 4000, dtype=np.float32)[np.newaxis, :].repeat(3000, axis=0)
    ink = np.asarray(
        Image.fromarray(sample(DIGIT), mode="L").resize((1400, 1400), Image.Resampling.BICUBIC),
        dtype=np.float32,
    )
    ramp[800:2200, 1300:2700] -= ink * 0.75
    photo = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return encode(photo, "JPEG", quality=88)


def small_digit_in_big_photo() -> bytes:
    """A 4000x3000 JPEG whose digit is only 160 px tall: decoded again at a finer scale."""
    page = as_paper(sample(DIGIT), size=160, canvas=(4000, 3000), offset=(2500, 900))
    return encode(page.convert("RGB"), "JPEG", quality=90)


UPLOADS = {
    "light_on_dark": light_on_dark,
    "dark_on_light": dark_on_light,
    "off_centre_with_margins": off_centre_with_margins,
    "rgba_transparent": rgba_transparent,
    "white_strokes_on_transparent": white_strokes_on_transparent,
    "palette_png": palette_png,
    "sixteen_bit_png": sixteen_bit_png,
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "animated_gif_first_frame": animated_gif,
    "phone_photo_12mp": phone_photo_12mp,
    "small_digit_in_big_photo": small_digit_in_big_photo,
}


@pytest.mark.parametrize("name", sorted(UPLOADS))
def test_real_uploads_look_like_mnist(name: str, reference: np.ndarray) -> None:
    field = preprocess(UPLOADS[name]())
    assert field.shape == (28, 28)
    assert field.dtype == np.float32
    assert field.min() >= 0.0 and field.max() <= 1.0
    assert similarity(field, reference) > 0.85, name


def test_digit_is_scaled_to_20px_and_centred_by_mass() -> None:
    field = preprocess(dark_on_light())
    rows = np.flatnonzero(field.any(axis=1))
    cols = np.flatnonzero(field.any(axis=0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == 20
    ys, xs = np.indices(field.shape)
    centre = ((ys * field).sum() / field.sum(), (xs * field).sum() / field.sum())
    assert np.allclose(centre, (13.5, 13.5), atol=0.75)


def test_exif_rotation_is_applied() -> None:
    upright = preprocess(encode(upright_photo(), "JPEG", quality=90))
    rotated = preprocess(exif_rotated_jpeg())
    sideways = preprocess(encode(upright_photo().transpose(Image.Transpose.ROTATE_90), "JPEG"))
    assert similarity(upright, rotated) > 0.95
    assert similarity(upright, sideways) < 0.5  # the check would notice a missed rotation


@pytest.fixture
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image the preprocessing actually decoded, in order."""
    seen: list[tuple[int, int]] = []
    original = preprocessing._grey_and_alpha

    def spy(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        seen.append(image.size)
        return original(image)

    monkeypatch.setattr(preprocessing, "_grey_and_alpha", spy)
    return seen


def test_big_jpeg_is_decoded_in_draft_mode(decoded_sizes: list[tuple[int, int]]) -> None:
    preprocess(phone_photo_12mp())
    assert decoded_sizes == [(500, 375)]  # 1/8 scale: never the 12-megapixel full decode


def test_small_digit_in_big_photo_is_decoded_again_finer(
    decoded_sizes: list[tuple[int, int]],
) -> None:
    preprocess(small_digit_in_big_photo())
    assert decoded_sizes[0] == (500, 375)
    assert len(decoded_sizes) == 2 and decoded_sizes[1][0] > 500


@pytest.mark.parametrize("colour", [0, 128, 255])
def test_uniform_image_is_blank(colour: int) -> None:
    with pytest.raises(BlankImage):
        preprocess(encode(Image.new("L", (64, 64), colour)))


def test_random_bytes_are_invalid() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage):
        preprocess(data)


def test_truncated_png_is_invalid() -> None:
    data = dark_on_light()
    with pytest.raises(InvalidImage):
        preprocess(data[: len(data) // 2])


def test_tiff_is_unsupported() -> None:
    with pytest.raises(UnsupportedMediaType):
        preprocess(encode(as_paper(sample(DIGIT)), "TIFF"))


def test_pixel_cap_is_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        preprocess(dark_on_light(), Limits(max_pixels=1000))
