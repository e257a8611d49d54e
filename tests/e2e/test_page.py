"""The browser page, driven in a real headless Chromium against the live server."""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, Page, expect, sync_playwright

# The system Chromium (apt), not Playwright's download: CI and this machine have no internet.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIMEOUT_MS = 5_000
# The first prediction of a fresh worker may take a little longer than a page action.
PREDICT_TIMEOUT_MS = 15_000

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module, closed at the end."""
    if not CHROMIUM.exists():
        # Fail, not skip: a missing browser must not turn the page tests green.
        pytest.fail(f"{CHROMIUM} not found; install it with `apt-get install chromium`")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, live_server) -> Iterator[Page]:
    """A fresh context per test (empty localStorage) on the page; fails on uncaught JS errors."""
    context = browser.new_context(viewport={"width": 900, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    page.goto(live_server.url + "/")
    yield page
    context.close()
    assert not js_errors, f"uncaught JavaScript errors: {js_errors}"


def draw_seven(page: Page, lean: float = 0.0) -> None:
    """Draw a "7" with the mouse: a stroke along the top, then a diagonal down to the left.

    `lean` moves the foot further left (a share of the canvas): other pixels, the same digit.
    Feedback counts the same pixels once per key, so a test that needs a new judgement on the
    shared live server draws its own seven."""
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.25 * w, y + 0.2 * h)
    page.mouse.down()
    page.mouse.move(x + 0.75 * w, y + 0.2 * h, steps=10)
    page.mouse.move(x + 0.6 * w, y + 0.5 * h, steps=8)
    page.mouse.move(x + (0.42 - lean) * w, y + 0.82 * h, steps=8)
    page.mouse.up()


def draw_seven_by_touch(page: Page) -> None:
    """Draw the same "7" with a finger: real touch events sent through Chromium's DevTools.

    Playwright's own touchscreen can only tap; a stroke needs touchStart, touchMoves, touchEnd.
    """
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    corners = [(0.25, 0.2), (0.75, 0.2), (0.6, 0.5), (0.42, 0.82)]
    points = [corners[0]]
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        points += [(x0 + (x1 - x0) * i / 8, y0 + (y1 - y0) * i / 8) for i in range(1, 9)]
    session = page.context.new_cdp_session(page)

    def touch(kind: str, point: tuple[float, float] | None) -> None:
        touches = [] if point is None else [{"x": x + point[0] * w, "y": y + point[1] * h}]
        session.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": touches})

    touch("touchStart", points[0])
    for point in points[1:]:
        touch("touchMove", point)
    touch("touchEnd", None)
    session.detach()


def seven_png() -> bytes:
    """A black-on-white "7" as an uploaded photo would be, larger than the canvas."""
    image = Image.new("RGB", (400, 400), "white")
    pen = ImageDraw.Draw(image)
    pen.line([(110, 80), (290, 80), (240, 200), (170, 330)], fill="black", width=28, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def predict(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#predict-button")


def test_drawn_seven_is_predicted(page: Page, live_server) -> None:
    draw_seven(page)
    predict(page, live_server.api_key)

    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#result-probability")).to_have_text(re.compile(r"^[<>]?\d{1,3}\.\d%$"))
    expect(page.locator("#chart .bar")).to_have_count(10)
    expect(page.locator("#chart .bar.is-predicted .bar-label")).to_have_text("7")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#predict-button")).to_be_enabled()


def test_seven_drawn_with_a_finger_is_predicted(browser: Browser, live_server) -> None:
    """A phone: a touch screen, and the stroke drawn with touch events, not the mouse."""
    context = browser.new_context(
        viewport={"width": 400, "height": 800}, has_touch=True, is_mobile=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        js_errors: list[str] = []
        page.on("pageerror", lambda exc: js_errors.append(str(exc)))
        page.goto(live_server.url + "/")
        draw_seven_by_touch(page)
        predict(page, live_server.api_key)
        expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
        assert page.evaluate("window.scrollY") == 0, "the stroke scrolled the page"
        assert not js_errors, f"uncaught JavaScript errors: {js_errors}"
    finally:
        context.close()


def test_uploaded_file_is_predicted(page: Page, live_server) -> None:
    page.set_input_files(
        "#file-input", {"name": "seven.png", "mimeType": "image/png", "buffer": seven_png()}
    )
    expect(page.locator("#source-hint")).to_contain_text("seven.png")
    predict(page, live_server.api_key)

    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#chart .bar")).to_have_count(10)


def test_api_key_is_remembered_across_reload(page: Page, live_server) -> None:
    page.fill("#api-key", live_server.api_key)
    page.reload()
    expect(page.locator("#api-key")).to_have_value(live_server.api_key)


def test_wrong_key_shows_readable_error(page: Page) -> None:
    draw_seven(page)
    predict(page, "not-a-valid-key")

    error = page.locator("#error")
    expect(error).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(error).to_contain_text("API key")
    expect(error).to_have_attribute("role", "alert")
    expect(page.locator("#result-body")).to_be_hidden()


def test_empty_canvas_shows_blank_image_message(page: Page, live_server) -> None:
    predict(page, live_server.api_key)

    error = page.locator("#error")
    expect(error).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(error).to_contain_text(re.compile("canvas is empty", re.IGNORECASE))


def test_page_makes_no_request_to_another_host(page: Page, live_server) -> None:
    # Record from a reload so the page's own assets are included, then run a prediction.
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.reload()
    draw_seven(page)
    predict(page, live_server.api_key)
    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)

    server = urlsplit(live_server.url).netloc
    foreign = [url for url in urls if urlsplit(url).netloc != server]
    assert not foreign, f"requests to other hosts: {foreign}"
    paths = {urlsplit(url).path for url in urls}
    assert {"/", "/static/app.js", "/static/app.css"} <= paths
    # The answer came from the server (/predict) or from this device, whose runtime and
    # model this server served too.
    on_device = {"/static/device.js", "/static/vendor/litertjs-core-2.5.3/dist/index.js"}
    assert "/predict" in paths or on_device <= paths, paths
    assert "/predict" in paths or any(p.endswith("/browser-model") for p in paths), paths
