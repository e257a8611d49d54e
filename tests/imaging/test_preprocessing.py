"""Preprocessing on the kinds of files people really upload, checked against MNIST itself."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from mnist_api.errors import BlankImage, ImageTooLarge, InvalidImage, UnsupportedMediaType
from mnist_api.imaging import preprocessing
from mnist_api.imaging.preprocessing import Limits, normalize_digit, preprocess
from tests import reference_preprocessing
from tests.samples import as_paper, encode, mnist_test_split, sample, upload_like_a_user

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


# The 8-bit fast path (a lookup table and a crop instead of a float copy of every pixel) must
# be a pure speed-up: bit for bit the output of the straightforward version it replaced,
# frozen in tests/reference_preprocessing.py, on every kind of upload.


def _drawn_digit(rng: np.random.Generator, size: int, stroke: int) -> Image.Image:
    """A random handwriting-like polyline, white on black, on a `size` x `size` square."""
    image = Image.new("L", (size, size), 0)
    points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(rng.integers(2, 6))]
    ImageDraw.Draw(image).line(points, fill=255, width=stroke, joint="curve")
    if rng.random() < 0.5:  # soft edges, like a browser's antialiased brush
        image = image.filter(ImageFilter.GaussianBlur(stroke / 4))
    return image


def _canvas_uploads(seed: int, count: int) -> dict[str, bytes]:
    """Browser-canvas-like PNGs in every mode a canvas or an editor saves, thin and thick."""
    rng = np.random.default_rng(seed)
    uploads = {}
    modes = ("L", "RGB", "RGBA-dark", "RGBA-light", "LA", "P-transparent", "I;16", "inverted")
    for index in range(count):
        mode = modes[index % len(modes)]
        side = int(rng.choice([280, 280, 200, 400, 64]))
        stroke = int(rng.choice([1, 3, 12, 24]))
        size = int(rng.integers(side // 6, side))
        ink = _drawn_digit(rng, size, stroke)
        # Anywhere on the canvas: centred, off-centre, or cut by an edge.
        offset = (int(rng.integers(-size // 4, side - size // 2)), int(rng.integers(-5, side - 5)))
        strokes = Image.new("L", (side, side), 0)
        strokes.paste(ink, offset)
        dark = Image.eval(strokes, lambda v: 255 - v)
        if mode == "L":
            image = dark
        elif mode == "inverted":
            image = strokes
        elif mode == "RGB":
            image = Image.merge("RGB", (dark, dark, Image.eval(dark, lambda v: min(255, v + 40))))
        elif mode == "RGBA-dark":  # black brush on a transparent canvas: alpha is the stroke
            image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            image.putalpha(strokes)
        elif mode == "RGBA-light":  # white brush on a transparent canvas: vanishes on white
            image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
            image.putalpha(strokes)
        elif mode == "LA":
            image = Image.merge("LA", (dark, Image.new("L", (side, side), 255)))
            image.putalpha(Image.eval(strokes, lambda v: max(v, 128)))
        elif mode == "P-transparent":
            image = dark.convert("RGB").quantize(colors=8)
            image.info["transparency"] = int(np.asarray(image)[0, 0])  # the paper's index
        else:  # 16-bit greyscale
            image = Image.fromarray(np.asarray(dark, dtype=np.uint16) * 257)
        uploads[f"canvas-{index}-{mode}-{side}px-stroke{stroke}"] = encode(image)
    return uploads


def _photo_uploads(seed: int, count: int) -> dict[str, bytes]:
    """JPEG photos of MNIST digits on textured, unevenly lit paper, in either polarity."""
    rng = np.random.default_rng(seed)
    images, _ = mnist_test_split()
    uploads = {}
    for index in range(count):
        width, height = int(rng.integers(200, 1000)), int(rng.integers(200, 800))
        size = int(rng.integers(40, min(width, height)))
        offset = (int(rng.integers(0, width - size)), int(rng.integers(0, height - size)))
        paper = np.asarray(as_paper(images[index], size, (width, height), offset), np.float32)
        light = np.linspace(rng.uniform(150, 230), rng.uniform(200, 255), width, dtype=np.float32)
        texture = rng.normal(0.0, rng.uniform(0, 12), (height, width)).astype(np.float32)
        pixels = paper / 255.0 * light + texture
        if index % 4 == 3:
            pixels = 255.0 - pixels  # chalk on a blackboard
        photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if index % 2:
            photo = photo.convert("RGB")
        uploads[f"photo-{index}"] = encode(photo, "JPEG", quality=int(rng.integers(60, 95)))
    return uploads


def _big_photos_with_small_digits() -> dict[str, bytes]:
    """Large JPEGs whose digit is a few dozen pixels: decoded again at a finer scale."""
    uploads = {}
    for index, (canvas, size) in enumerate(
        [((2000, 1500), 30), ((2000, 1500), 60), ((3000, 2000), 45), ((1600, 2400), 24)]
    ):
        offset = (canvas[0] * (index + 1) // 6, canvas[1] // 3)
        page = as_paper(sample(index + 2), size=size, canvas=canvas, offset=offset)
        uploads[f"big-{index}-{size}px"] = encode(page.convert("RGB"), "JPEG", quality=85)
    return uploads


def _grey_level_uploads(seed: int, count: int) -> dict[str, bytes]:
    """Every grey value on backgrounds of any level: where the ink starts, to the grey level."""
    rng = np.random.default_rng(seed)
    uploads = {}
    for index in range(count):
        background = int(rng.integers(0, 256))
        # A ramp through all 256 values: the crop's edge is the first grey that counts as ink.
        ramp = np.full((24, 264), background, dtype=np.uint8)
        ramp[4:20, 4:260] = np.arange(256, dtype=np.uint8)[:: 1 if index % 2 else -1]
        uploads[f"ramp-{index}-on-{background}"] = encode(Image.fromarray(ramp))
        page = np.full((40, 48), background, dtype=np.uint8)
        top, left = int(rng.integers(0, 25)), int(rng.integers(0, 33))
        page[top : top + 16, left : left + 16] = rng.permutation(256).reshape(16, 16)
        uploads[f"grey-levels-{index}-on-{background}"] = encode(Image.fromarray(page))
        noise = rng.integers(0, 256, (30, 30), dtype=np.uint8)  # ink anywhere, edges too
        uploads[f"noise-{index}"] = encode(Image.fromarray(noise))
    return uploads


def _blank_and_faint_uploads() -> dict[str, bytes]:
    """Uniform pages, marks too faint to be ink (contrast just under or at the threshold)."""
    uploads = {}
    for level in (0, 1, 127, 128, 200, 255):
        uploads[f"uniform-{level}"] = encode(Image.new("L", (64, 48), level))
    for contrast in (20, 23, 24, 25, 30):
        for background in (0, 250):
            page = Image.new("L", (80, 80), background)
            page.paste(abs(background - contrast), (30, 20, 40, 60))
            uploads[f"faint-{background}-{contrast}"] = encode(page)
    uploads["transparent"] = encode(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))
    uploads["one-pixel-image"] = encode(Image.new("L", (1, 1), 0))
    return uploads


def _mnist_uploads() -> dict[str, bytes]:
    """The 28x28 MNIST samples as they are, inverted, on paper, and as other tests send them."""
    images, _ = mnist_test_split()
    uploads = {}
    for digit in range(10):
        uploads[f"mnist-28-{digit}"] = encode(Image.fromarray(sample(digit)))
        uploads[f"mnist-28-inverted-{digit}"] = encode(Image.fromarray(255 - sample(digit)))
        uploads[f"mnist-paper-{digit}"] = encode(as_paper(sample(digit)))
    for index in range(0, 1000, 20):
        uploads[f"mnist-user-{index}"] = upload_like_a_user(images[index], index)
    uploads.update({f"upload-{name}": make() for name, make in UPLOADS.items()})
    return uploads


def _outcome(function: Callable[[bytes], np.ndarray], data: bytes) -> object:
    """The output's dtype, shape and exact bytes, or the type of the error raised."""
    try:
        field = function(data)
    except Exception as exc:
        return type(exc)
    return field.dtype, field.shape, field.tobytes()


@pytest.mark.parametrize(
    "uploads",
    [
        lambda: _canvas_uploads(seed=1, count=160),
        lambda: _photo_uploads(seed=2, count=40),
        _big_photos_with_small_digits,
        lambda: _grey_level_uploads(seed=3, count=32),
        _blank_and_faint_uploads,
        _mnist_uploads,
    ],
    ids=["canvas", "photos", "big-photos", "grey-levels", "blank", "mnist"],
)
def test_preprocess_is_bit_identical_to_the_reference(
    uploads: Callable[[], dict[str, bytes]],
) -> None:
    cases = uploads()
    differ = [
        name
        for name, data in cases.items()
        if _outcome(preprocess, data) != _outcome(reference_preprocessing.preprocess, data)
    ]
    assert not differ, f"{len(differ)} of {len(cases)} differ: {differ[:10]}"


def test_normalize_digit_is_bit_identical_to_the_reference() -> None:
    images, _ = mnist_test_split()
    for image in [*images[:300], *(255 - images[:20]), np.zeros((28, 28), np.uint8)]:
        for grey in (image.astype(np.float32), image):
            assert _outcome(normalize_digit, grey) == _outcome(
                reference_preprocessing.normalize_digit, grey
            )
