"""The per-worker decode budget: waiting, deadline, release on error, refusal up front.

No timing thresholds: a waiting thread is observed through `DecodeBudget.waiting`, and the
deadlines used are either zero or far longer than any machine needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from mnist_api.config import MIB, Settings
from mnist_api.errors import ImageTooLarge, Overloaded
from mnist_api.imaging.budget import DecodeBudget
from mnist_api.imaging.decoding import coarsest_scale, decode_cost, open_image, read_header
from mnist_api.imaging.preprocessing import Limits, preprocess
from tests.samples import as_paper, encode, sample
from tools.decode_memory import canvas_png, seven

PATIENT = 60.0  # seconds: long enough that no test run ever reaches it


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition()` holds (bounded, so a broken budget fails instead of hanging)."""
    deadline = time.monotonic() + PATIENT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def test_reservations_that_fit_do_not_wait() -> None:
    budget = DecodeBudget(100, wait_seconds=0.0)
    with budget.reserve(60), budget.reserve(40):
        assert budget.in_use == 100
    assert budget.in_use == 0


def test_a_decode_that_does_not_fit_waits_until_another_releases() -> None:
    budget = DecodeBudget(100, wait_seconds=PATIENT)
    release_first = threading.Event()
    second_entered = threading.Event()

    def first() -> None:
        with budget.reserve(80):
            release_first.wait(PATIENT)

    def second() -> None:
        with budget.reserve(50):
            second_entered.set()

    holder = threading.Thread(target=first)
    holder.start()
    eventually(lambda: budget.in_use == 80, "the first decode holds its bytes")
    waiter = threading.Thread(target=second)
    waiter.start()
    eventually(lambda: budget.waiting == 1, "the second decode waits")
    assert not second_entered.is_set() and budget.in_use == 80
    release_first.set()
    waiter.join(PATIENT)
    holder.join(PATIENT)
    assert second_entered.is_set()
    assert budget.in_use == 0 and budget.waiting == 0


def test_concurrent_decodes_never_hold_more_than_the_budget() -> None:
    budget = DecodeBudget(100, wait_seconds=PATIENT)
    seen: list[int] = []

    def decode() -> None:
        for _ in range(20):
            with budget.reserve(35):
                seen.append(budget.in_use)

    threads = [threading.Thread(target=decode) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENT)
    assert len(seen) == 120
    assert max(seen) <= 100  # at most two of 35 fit at once
    assert budget.in_use == 0


def test_after_the_deadline_the_client_is_told_to_retry() -> None:
    budget = DecodeBudget(100, wait_seconds=0.0)
    with budget.reserve(80):
        with pytest.raises(Overloaded) as raised, budget.reserve(50):
            pytest.fail("must not get the bytes")
        assert budget.in_use == 80  # the refused decode took nothing
    error = raised.value
    assert (error.status, error.code) == (503, "server_busy")
    assert error.headers == {"Retry-After": "1"}
    assert error.to_dict() == {"error": error.message, "code": "server_busy"}


def test_retry_after_is_the_wait_rounded_up() -> None:
    assert DecodeBudget(100, wait_seconds=2.5).retry_after() == "3"
    assert DecodeBudget(100, wait_seconds=0.1).retry_after() == "1"


def test_bytes_are_released_when_the_decode_fails() -> None:
    budget = DecodeBudget(100, wait_seconds=0.0)
    with pytest.raises(ValueError, match="corrupt"), budget.reserve(70):
        raise ValueError("corrupt")
    assert budget.in_use == 0
    with budget.reserve(100):
        assert budget.in_use == 100


def test_one_upload_costing_more_than_the_whole_budget_is_refused_at_once() -> None:
    budget = DecodeBudget(100 * MIB, wait_seconds=PATIENT)
    with pytest.raises(ImageTooLarge) as raised, budget.reserve(100 * MIB + 1):
        pytest.fail("must not get the bytes")
    assert (raised.value.status, raised.value.code) == (413, "image_too_large")
    assert "101 MiB" in raised.value.message and "100 MiB" in raised.value.message
    assert budget.in_use == 0 and budget.waiting == 0


def test_the_default_budget_is_the_configured_one() -> None:
    settings = Settings.from_env({"DECODE_MEMORY_BUDGET_MB": "96", "DECODE_WAIT_SECONDS": "0.5"})
    assert (settings.decode_memory_budget_mb, settings.decode_wait_seconds) == (96, 0.5)
    assert (Settings().decode_memory_budget_mb, Settings().decode_wait_seconds) == (24, 2.0)


# Through the preprocessing: what the service does with real files.


def cost_of(data: bytes) -> int:
    """The bytes preprocessing reserves for its first decode of `data`."""
    header = read_header(open_image(data, 50_000_000), data)
    return decode_cost(header, coarsest_scale(header))


def test_same_pixels_but_more_bands_can_be_too_costly() -> None:
    """A grey PNG and an RGBA PNG of the same size: the pixel cap passes both, the budget
    takes the grey one and refuses the RGBA one (four bytes per pixel), before decoding."""
    grey = encode(seven("L", (3000, 2000), 255, 0))
    rgba = canvas_png((3000, 2000))
    assert cost_of(grey) < cost_of(rgba)
    budget = DecodeBudget((cost_of(grey) + cost_of(rgba)) // 2, wait_seconds=0.0)
    limits = Limits(max_pixels=3000 * 2000, budget=budget)
    assert preprocess(grey, limits).shape == (28, 28)
    with pytest.raises(ImageTooLarge):
        preprocess(rgba, limits)
    assert budget.in_use == 0


def test_a_full_budget_turns_large_decodes_away_but_not_small_ones() -> None:
    large = canvas_png((2000, 2000))
    small = encode(as_paper(sample(7)))
    budget = DecodeBudget(cost_of(large) + cost_of(small), wait_seconds=0.0)
    limits = Limits(budget=budget)
    with budget.reserve(cost_of(large)):  # another request is decoding a large image
        with pytest.raises(Overloaded):
            preprocess(large, limits)
        assert preprocess(small, limits).shape == (28, 28)
    assert np.array_equal(preprocess(large, limits), preprocess(large))  # same answer, later
    assert budget.in_use == 0


def test_the_finer_second_decode_reserves_its_own_bytes() -> None:
    """A small digit in a big image is decoded twice; the second, finer decode costs more and
    is reserved on its own, after the first one's bytes are back."""
    page = as_paper(sample(7), size=160, canvas=(4000, 3000), offset=(2500, 900))
    data = encode(page.convert("RGB"), "JPEG", quality=90)
    seen: list[int] = []

    class Watching(DecodeBudget):
        def reserve(self, cost: int):  # type: ignore[no-untyped-def]
            seen.append(self.in_use)
            return super().reserve(cost)

    budget = Watching(1 << 40, wait_seconds=0.0)
    preprocess(data, Limits(budget=budget))
    assert seen == [0, 0]  # two reservations, each made with nothing else held


def test_a_budget_too_small_for_the_finer_decode_keeps_the_coarse_one() -> None:
    page = as_paper(sample(7), size=160, canvas=(4000, 3000), offset=(2500, 900))
    data = encode(page.convert("RGB"), "JPEG", quality=90)
    coarse_only = DecodeBudget(cost_of(data), wait_seconds=0.0)
    field = preprocess(data, Limits(budget=coarse_only))
    assert field.shape == (28, 28) and field.max() == 1.0


def test_palette_images_are_costed_at_one_byte_per_pixel() -> None:
    palette = encode(Image.new("P", (4000, 3000), 0))
    rgb = encode(Image.new("RGB", (4000, 3000), (0, 0, 0)))
    assert cost_of(palette) < cost_of(rgb) / 2
