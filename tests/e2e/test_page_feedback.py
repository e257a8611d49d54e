"""The page's feedback controls in a real headless Chromium against the live server:
"Right?" after each answer, the ten digits after "No", the row in the database, a thank-you.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Route, expect

from mnist_api.http.auth import key_fingerprint
from tests.e2e import test_page
from tests.e2e.test_page import PREDICT_TIMEOUT_MS, draw_seven, predict
from tools.services import LiveServer

# The page module's fixtures (one Chromium per module, a fresh context per test).
browser = test_page.browser
page = test_page.page

pytestmark = pytest.mark.timeout(60)


def feedback_rows(server: LiveServer) -> list[tuple[str, str, int, int, bytes]]:
    """The live server's feedback rows (tools/services.start_web gives it its own SQLite file)."""
    port = urlsplit(server.url).port
    database = Path(server.log_path).parent / f"feedback-{port}.db"
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "select key_fingerprint, model_version, label, predicted, input from feedback"
            " order by id"
        ).fetchall()


def test_no_then_a_digit_stores_the_label_and_thanks(page: Page, live_server: LiveServer) -> None:
    before = len(feedback_rows(live_server))
    draw_seven(page, lean=0.03)
    predict(page, live_server.api_key)
    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
    model = page.locator("#result-model").inner_text()
    assert model.startswith("mnist-cnn-int8-")

    expect(page.locator("#feedback-question")).to_have_text("Right?")
    expect(page.locator("#feedback-digits")).to_be_hidden()
    with page.expect_response(lambda response: response.url.endswith("/feedback")) as sent:
        page.click("#feedback-no")
        expect(page.locator("#feedback-digits button")).to_have_count(10)
        page.click("#feedback-digits button[data-digit='1']")
    answer = sent.value.json()
    # The version that answered, the drawing it answered (scored 7 again), the digit picked.
    assert sent.value.status == 201
    assert (answer["model_version"], answer["predicted"], answer["label"]) == (model, 7, 1)

    thanks = page.locator("#feedback-thanks")
    expect(thanks).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(thanks).to_contain_text("Thank you")
    expect(thanks).to_contain_text("1")
    expect(page.locator("#feedback-ask")).to_be_hidden()
    expect(page.locator("#feedback-error")).to_be_hidden()

    rows = feedback_rows(live_server)
    assert len(rows) == before + 1
    fingerprint, version, label, predicted, image = rows[-1]
    assert fingerprint == key_fingerprint(live_server.api_key)
    assert model.endswith(version)
    assert (label, predicted) == (1, 7)
    assert len(image) == 28 * 28 * 2  # the normalised input, not the drawing


def test_yes_sends_the_predicted_digit(page: Page, live_server: LiveServer) -> None:
    draw_seven(page, lean=0.06)
    predict(page, live_server.api_key)
    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)
    page.click("#feedback-yes")
    expect(page.locator("#feedback-thanks")).to_contain_text(
        "Thank you", timeout=PREDICT_TIMEOUT_MS
    )
    assert feedback_rows(live_server)[-1][2:4] == (7, 7)
    # A new prediction asks again.
    predict(page, live_server.api_key)
    expect(page.locator("#feedback-ask")).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#feedback-thanks")).to_be_hidden()


def test_feedback_failure_is_readable_and_can_be_retried(
    page: Page, live_server: LiveServer
) -> None:
    """The database is down (the service's 503, replayed here): a sentence, not a crash."""
    draw_seven(page)
    predict(page, live_server.api_key)
    expect(page.locator("#result-digit")).to_have_text("7", timeout=PREDICT_TIMEOUT_MS)

    def unavailable(route: Route) -> None:
        route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error": "The feedback store is unavailable.", "code": "feedback_unavailable"}',
        )

    page.route("**/feedback", unavailable)
    page.click("#feedback-yes")
    error = page.locator("#feedback-error")
    expect(error).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(error).to_contain_text("could not be saved")
    expect(page.locator("#feedback-yes")).to_be_enabled()
    page.unroute("**/feedback")
    page.click("#feedback-yes")
    expect(page.locator("#feedback-thanks")).to_contain_text(
        "Thank you", timeout=PREDICT_TIMEOUT_MS
    )
    expect(error).to_be_hidden()
