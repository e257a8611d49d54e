"""Measure the memory that preprocessing each kind of large upload really holds.

`python -m tools.decode_memory` prints, per kind of file, the bytes the decode budget
reserves for it (`mnist_api.imaging.decoding.decode_cost`) and the peak resident memory the decode
really added, so the estimate can be checked against reality (tests/imaging/test_decoding.py does).
Each peak is that image's alone: the kernel's peak counter (`VmHWM`) is reset before every
image through /proc/self/clear_refs, and large blocks go back to the system when freed as
they do in a worker (`mnist_api.imaging.native_memory`). Linux only.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mnist_api.errors import ServiceError
from mnist_api.imaging.budget import DecodeBudget
from mnist_api.imaging.native_memory import return_large_blocks_to_os
from mnist_api.imaging.preprocessing import Limits, preprocess, warm_up_upload


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """An image file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def seven(mode: str, size: tuple[int, int], paper: object, ink: object) -> Image.Image:
    """A large, plain drawing of a 7 (it compresses to a few kilobytes in any lossless format)."""
    image = Image.new(mode, size, paper)  # type: ignore[arg-type]
    stroke = max(3, min(size) // 15)
    ImageDraw.Draw(image).line(_corners(size), fill=ink, width=stroke)  # type: ignore[arg-type]
    return image


def _corners(size: tuple[int, int]) -> list[tuple[float, float]]:
    """The three corners of a 7 spanning most of an image of `size`."""
    width, height = size
    return [(width * 0.3, height * 0.2), (width * 0.7, height * 0.2), (width * 0.45, height * 0.8)]


def canvas_png(size: tuple[int, int]) -> bytes:
    """A transparent RGBA canvas with a black 7: what a drawing app exports."""
    return encode(seven("RGBA", size, (0, 0, 0, 0), (0, 0, 0, 255)), compress_level=1)


def photo_webp(size: tuple[int, int]) -> bytes:
    """A lossy RGB WEBP of a dark 7 on white paper."""
    return encode(seven("RGB", size, (255, 255, 255), (20, 20, 20)), "WEBP", quality=80)


def noise(mode: str, size: tuple[int, int]) -> Image.Image:
    """Random pixels with a black 7 on top: the worst case for a decoder's buffers."""
    bands = len(mode)
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    width, height = size
    corners = [
        (width * 0.3, height * 0.2),
        (width * 0.7, height * 0.2),
        (width * 0.45, height * 0.8),
    ]
    ImageDraw.Draw(image).line(corners, fill=(0,) * bands, width=max(3, min(size) // 15))
    return image


def small_digit(fmt: str) -> bytes:
    """A 160 px digit in a 4000x3000 image: decoded a second time at a finer scale."""
    if fmt == "PNG":
        image = Image.new("RGBA", (4000, 3000), (0, 0, 0, 0))
        ink: tuple[int, ...] = (0, 0, 0, 255)
    else:
        image = Image.new("RGB", (4000, 3000), (255, 255, 255))
        ink = (0, 0, 0)
    ImageDraw.Draw(image).line([(2500, 900), (2600, 900), (2540, 1060)], fill=ink, width=14)
    return encode(image, fmt)


def rle8_bmp(size: tuple[int, int]) -> bytes:
    """An 8-bit run-length-encoded BMP of a 7 (Pillow reads these, but does not write them)."""
    width, height = size
    pixels = np.asarray(seven("L", size, 255, 0))
    runs = bytearray()
    for row in pixels[::-1]:  # BMP rows go bottom-up
        edges = np.flatnonzero(np.diff(row)) + 1
        for start, end in zip(np.r_[0, edges], np.r_[edges, width], strict=True):
            value, length = int(row[start]), int(end - start)
            while length > 0:
                runs += bytes((min(length, 255), value))
                length -= 255
        runs += b"\x00\x00"  # end of line
    runs += b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((grey, grey, grey, 0)) for grey in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    header = struct.pack("<2sIHHI", b"BM", offset + len(runs), 0, 0, offset)
    return header + info + palette + bytes(runs)


WHITE, BLACK = (255, 255, 255), (0, 0, 0)
CLEAR, INK = (0, 0, 0, 0), (0, 0, 0, 255)

# One of each way a large upload is decoded: every mode Pillow gives a PNG, a palette with
# and without transparency, 16 bits, interlacing, animation, long strips, WEBP (lossy,
# lossless, with alpha), GIF, BMP (raw and run-length encoded), and JPEG baseline and
# progressive (4:2:0, 4:4:4, CMYK, grey).
SAMPLES: dict[str, Callable[[], bytes]] = {
    "png_rgba_4000x3000": lambda: canvas_png((4000, 3000)),
    "png_rgb_4000x3000": lambda: encode(seven("RGB", (4000, 3000), WHITE, BLACK)),
    "png_grey_4000x3000": lambda: encode(seven("L", (4000, 3000), 255, 0)),
    "png_palette_transparent_4000x3000": lambda: encode(
        seven("RGBA", (4000, 3000), CLEAR, INK).quantize(8)
    ),
    "png_palette_4000x3000": lambda: encode(seven("RGB", (4000, 3000), WHITE, BLACK).quantize(8)),
    "png_bilevel_4000x3000": lambda: encode(seven("1", (4000, 3000), 1, 0)),
    "png_16bit_3000x2000": lambda: encode(
        Image.fromarray(np.asarray(seven("L", (3000, 2000), 255, 0), np.uint16) * 257)
    ),
    "png_grey_alpha_3000x2000": lambda: encode(seven("LA", (3000, 2000), (255, 0), (0, 255))),
    "png_interlaced_3000x2000": lambda: encode(
        seven("RGB", (3000, 2000), WHITE, BLACK), interlace=1
    ),
    "png_animated_3000x2000": lambda: encode(
        seven("RGBA", (3000, 2000), CLEAR, INK),
        save_all=True,
        append_images=[seven("RGBA", (3000, 2000), (*WHITE, 255), INK)],
    ),
    "png_rgba_strip_500x7000": lambda: canvas_png((500, 7000)),
    "png_grey_strip_450x8000": lambda: encode(seven("L", (450, 8000), 255, 0)),
    "png_rgba_small_digit_4000x3000": lambda: small_digit("PNG"),
    "webp_lossy_2000x1500": lambda: photo_webp((2000, 1500)),
    "webp_lossless_2000x2000": lambda: encode(
        seven("RGBA", (2000, 2000), CLEAR, INK), "WEBP", lossless=True
    ),
    "webp_lossless_noise_1500x1500": lambda: encode(
        noise("RGB", (1500, 1500)), "WEBP", lossless=True
    ),
    "webp_lossy_alpha_noise_2000x2000": lambda: encode(
        noise("RGBA", (2000, 2000)), "WEBP", quality=50
    ),
    "gif_3000x3000": lambda: encode(seven("L", (3000, 3000), 255, 0).convert("P"), "GIF"),
    "gif_transparent_3000x3000": lambda: encode(
        seven("RGBA", (3000, 3000), CLEAR, INK).quantize(8), "GIF", transparency=0
    ),
    "bmp_rgb_2000x1500": lambda: encode(seven("RGB", (2000, 1500), WHITE, BLACK), "BMP"),
    "bmp_rle8_4000x3000": lambda: rle8_bmp((4000, 3000)),
    "jpeg_4000x3000": lambda: encode(seven("RGB", (4000, 3000), WHITE, BLACK), "JPEG"),
    "jpeg_progressive_4000x3000": lambda: encode(
        seven("RGB", (4000, 3000), WHITE, BLACK), "JPEG", progressive=True
    ),
    "jpeg_progressive_444_4000x3000": lambda: encode(
        seven("RGB", (4000, 3000), WHITE, BLACK), "JPEG", progressive=True, subsampling=0
    ),
    "jpeg_progressive_cmyk_3000x2000": lambda: encode(
        noise("RGB", (3000, 2000)).convert("CMYK"), "JPEG", progressive=True
    ),
    "jpeg_progressive_grey_3000x2000": lambda: encode(
        noise("L", (3000, 2000)), "JPEG", progressive=True
    ),
    "jpeg_small_digit_4000x3000": lambda: small_digit("JPEG"),
    "jpeg_strip_400x9000": lambda: encode(seven("RGB", (400, 9000), WHITE, BLACK), "JPEG"),
}


class RecordingBudget(DecodeBudget):
    """A real (unbounded) budget that remembers every reservation made from it."""

    def __init__(self) -> None:
        super().__init__(1 << 60, 0.0)
        self.costs: list[int] = []

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Record the cost, then reserve it as the real budget does."""
        self.costs.append(cost)
        with super().reserve(cost):
            yield


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


@dataclass(frozen=True)
class Measurement:
    """One sample: its file size, the bytes reserved for it, the peak it really added."""

    name: str
    file_bytes: int
    reserved: int
    peak: int
    outcome: str


def measure(name: str, data: bytes) -> Measurement:
    """Preprocess `data` twice, measuring the second run (the first loads code paths)."""
    budget = RecordingBudget()
    limits = Limits(budget=budget)
    outcome = "ok"
    try:
        preprocess(data, limits)
    except ServiceError as error:
        outcome = error.code
    budget.costs.clear()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    with suppress(ServiceError):
        preprocess(data, limits)
    peak = _status_bytes("VmHWM") - before
    return Measurement(name, len(data), max(budget.costs, default=0), peak, outcome)


def run(names: list[str]) -> Iterator[Measurement]:
    """Measure each named sample (all of them if `names` is empty)."""
    return_large_blocks_to_os()
    preprocess(warm_up_upload())
    for name in names or list(SAMPLES):
        yield measure(name, SAMPLES[name]())


def main(argv: list[str] | None = None) -> None:
    """Print one line per sample (JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SAMPLES))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SAMPLES))
    if unknown:
        parser.error(f"unknown samples: {', '.join(unknown)}")
    for result in run(args.names):
        if args.json:
            print(json.dumps(asdict(result)), flush=True)
            continue
        print(
            f"{result.name:34} file {result.file_bytes / 1e6:6.2f} MB   "
            f"reserved {result.reserved / 1e6:6.1f} MB   peak {result.peak / 1e6:6.1f} MB "
            f"({result.peak / max(result.reserved, 1):4.0%})   {result.outcome}",
            flush=True,
        )


if __name__ == "__main__":
    main()
