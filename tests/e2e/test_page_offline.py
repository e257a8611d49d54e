"""The page after one visit, in a real headless Chromium: offline reloads still predict on
the device, feedback given offline is sent once when the connection returns, and a new
stable version replaces the kept model on the next online visit.

Runs its own server (one worker, an admin key): the tests change the deployment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect

from mnist_api.config import PROJECT_ROOT
from tests.e2e import test_page
from tests.e2e.test_page import PREDICT_TIMEOUT_MS, TIMEOUT_MS, draw_seven
from tests.e2e.test_page_feedback import feedback_rows
from tools.services import LiveServer, start_web, stop

browser = test_page.browser

pytestmark = pytest.mark.timeout(180)

ADMIN_KEY = "offline-test-admin-key"
DEVICE_READY_MS = 30_000
STABLE, OTHER = "fe5e4f4d480b", "e983729cbdc9"

KEPT_MODELS = """
async () => {
  const cache = await caches.open("mnist-models-v1");
  return (await cache.keys()).map((request) => new URL(request.url).pathname);
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service with an admin key, one worker (a deployment change is seen at once)."""
    live = start_web(
        tmp_path_factory.mktemp("offline"),
        WEB_CONCURRENCY="1",
        ADMIN_API_KEYS=ADMIN_KEY,
        DEFAULT_MODEL_VERSION=STABLE,
    )
    try:
        yield live
    finally:
        stop(live.process)


def set_stable(server: LiveServer, version: str) -> None:
    response = requests.put(
        f"{server.url}/deployment",
        headers={"x-api-key": ADMIN_KEY},
        json={"strategy": "single", "stable": version},
        timeout=10,
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def context(browser: Browser, server: LiveServer) -> Iterator[BrowserContext]:
    set_stable(server, STABLE)
    context = browser.new_context(viewport={"width": 900, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


def first_visit(context: BrowserContext, server: LiveServer) -> Page:
    """Open the page online, enter the key, wait until the model runs on the device."""
    page = context.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", server.api_key)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("html")).to_have_attribute("data-device", "ready", timeout=DEVICE_READY_MS)
    assert page.evaluate("!!navigator.serviceWorker.controller"), "no service worker"
    return page


def test_offline_reload_still_predicts_on_the_device(
    context: BrowserContext, server: LiveServer
) -> None:
    page = first_visit(context, server)
    context.set_offline(True)
    try:
        page.reload()
        expect(page.locator("html")).to_have_attribute(
            "data-device", "ready", timeout=DEVICE_READY_MS
        )
        draw_seven(page)
        page.click("#predict-button")
        expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
        expect(page.locator("#result-where")).to_have_text("on this device")
        expect(page.locator("#result-model")).to_have_text(f"mnist-cnn-int8-{STABLE}")
        expect(page.locator("#error")).to_be_hidden()
    finally:
        context.set_offline(False)


def test_feedback_given_offline_is_sent_once_when_the_connection_returns(
    context: BrowserContext, server: LiveServer
) -> None:
    page = first_visit(context, server)
    before = len(feedback_rows(server))
    context.set_offline(True)
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-device", "ready", timeout=DEVICE_READY_MS)
    draw_seven(page)
    page.click("#predict-button")
    expect(page.locator("#result-where")).to_have_text("on this device", timeout=PREDICT_TIMEOUT_MS)
    page.click("#feedback-no")
    page.click("#feedback-digits button[data-digit='1']")
    expect(page.locator("#feedback-thanks")).to_contain_text("offline")
    assert len(feedback_rows(server)) == before

    with page.expect_response(lambda r: r.url.endswith("/feedback"), timeout=15_000) as sent:
        context.set_offline(False)  # the page's "online" event sends the queue
    assert sent.value.status == 201
    answer = sent.value.json()
    assert (answer["label"], answer["predicted"]) == (1, 7)
    assert answer["model_version"] == f"mnist-cnn-int8-{STABLE}"
    rows = feedback_rows(server)
    assert len(rows) == before + 1
    # Sent once: a reload (which also sends whatever is queued) sends nothing more.
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-device", "ready", timeout=DEVICE_READY_MS)
    page.wait_for_timeout(500)
    assert len(feedback_rows(server)) == before + 1
    assert page.evaluate(QUEUED) == 0


QUEUED = """
() => new Promise((resolve, reject) => {
  const request = indexedDB.open("mnist-page", 1);
  request.onsuccess = () => {
    const store = request.result.transaction("feedback-queue").objectStore("feedback-queue");
    const count = store.count();
    count.onsuccess = () => resolve(count.result);
    count.onerror = () => reject(count.error);
  };
  request.onerror = () => reject(request.error);
})
"""


def test_a_new_stable_version_replaces_the_kept_model(
    context: BrowserContext, server: LiveServer
) -> None:
    page = first_visit(context, server)
    assert page.evaluate(KEPT_MODELS) == [f"/models/{STABLE}/browser-model"]
    set_stable(server, OTHER)
    try:
        page.reload()
        expect(page.locator("#device-status")).to_contain_text(OTHER, timeout=DEVICE_READY_MS)
        assert page.evaluate(KEPT_MODELS) == [f"/models/{OTHER}/browser-model"]
        draw_seven(page)
        page.click("#predict-button")
        expect(page.locator("#result-model")).to_have_text(
            f"mnist-cnn-int8-{OTHER}", timeout=PREDICT_TIMEOUT_MS
        )
        expect(page.locator("#result-where")).to_have_text("on this device")
        # ... and offline it is the one kept.
        context.set_offline(True)
        page.reload()
        expect(page.locator("#device-status")).to_contain_text(OTHER, timeout=DEVICE_READY_MS)
    finally:
        context.set_offline(False)
        set_stable(server, STABLE)


def test_the_service_worker_is_served_from_the_root(server: LiveServer) -> None:
    response = requests.get(f"{server.url}/sw.js", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/javascript")
    assert response.headers["Cache-Control"] == "no-cache"
    assert PROJECT_ROOT.joinpath("static", "sw.js").read_bytes() == response.content
