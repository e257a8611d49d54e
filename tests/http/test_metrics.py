"""Prometheus metrics: exact across gunicorn workers, protected by a token, counted right."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_api import create_app
from mnist_api.config import Settings
from tests.samples import as_paper, encode, sample
from tools.services import LiveServer, start_web, stop


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            found[(item.name, tuple(sorted(item.labels.items())))] = item.value
    return found


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples(text).items()
        if sample_name == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """gunicorn from the Procfile with 3 workers and 1 thread each, so scrapes spread out."""
    server = start_web(
        tmp_path_factory.mktemp("metrics"), WEB_CONCURRENCY="3", GUNICORN_THREADS="1"
    )
    try:
        yield server
    finally:
        stop(server.process)


def scrape(server: LiveServer) -> str:
    # A new connection each time, so successive scrapes land on different workers.
    response = requests.get(f"{server.url}/metrics", headers={"Connection": "close"}, timeout=5)
    assert response.status_code == 200
    return response.text


def test_counts_are_exact_across_workers(three_workers: LiveServer) -> None:
    uploads = {digit: encode(as_paper(sample(digit))) for digit in range(10)}
    before = scrape(three_workers)
    # New bytes every time (no cache hits), sent concurrently in rounds until more than one
    # worker has answered: which worker accepts a connection is the kernel's choice.
    nonces = iter(range(1, 100_000))

    def post(_: int) -> int:
        nonce = next(nonces)  # a range iterator is safe to share between threads
        data = uploads[nonce % 10] + nonce.to_bytes(4, "big")
        return requests.post(
            f"{three_workers.url}/predict",
            data=data,
            timeout=10,
            headers={
                "x-api-key": three_workers.api_key,
                "Content-Type": "image/png",
                "Connection": "close",
            },
        ).status_code

    sent = 0
    served_by: set[int] = set()
    for _ in range(10):
        with ThreadPoolExecutor(max_workers=12) as pool:
            assert set(pool.map(post, range(40))) == {200}
        sent += 40
        served_by = {r["pid"] for r in three_workers.records() if r.get("route") == "/predict"}
        if len(served_by) >= 2:
            break
    assert len(served_by) >= 2  # the predictions really were spread over workers

    for _ in range(6):  # whichever worker answers the scrape, the sums are the same
        text = scrape(three_workers)
        assert (
            total(text, "mnist_predictions_total") - total(before, "mnist_predictions_total")
            == sent
        )
        assert (
            total(text, "flask_http_request_total", method="POST", status="200")
            - total(before, "flask_http_request_total", method="POST", status="200")
        ) == sent
        assert (
            total(text, "mnist_prediction_confidence_count")
            - total(before, "mnist_prediction_confidence_count")
        ) == sent
        assert (
            total(text, "mnist_cache_lookups_total", result="miss")
            - total(before, "mnist_cache_lookups_total", result="miss")
        ) == sent
        assert total(text, "mnist_model_info") == 1


def test_stale_files_are_cleared_and_dead_workers_marked(
    three_workers: LiveServer, tmp_path: Path
) -> None:
    metrics_dir = (
        Path(three_workers.log_path.parent) / f"metrics-{three_workers.url.rsplit(':', 1)[1]}"
    )
    assert metrics_dir.is_dir()
    pids = three_workers.worker_pids()
    victim = sorted(pids)[0]
    assert list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and list(metrics_dir.glob(f"gauge_livesum_{victim}.db")):
        time.sleep(0.1)
    assert not list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))  # child_exit ran
    assert "mnist_in_flight_requests" in scrape(three_workers)


def test_metrics_folder_is_emptied_before_workers_start(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "m"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")
    server = start_web(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), WEB_CONCURRENCY="1")
    try:
        assert not (metrics_dir / "counter_999999.db").exists()
        assert "mnist_model_info" in scrape(server)
    finally:
        stop(server.process)


def test_single_process_metrics(client: FlaskClient, auth: dict[str, str]) -> None:
    data = encode(as_paper(sample(7)))
    before = client.get("/metrics").get_data(as_text=True)
    client.post("/predict", data=data, headers={**auth, "Content-Type": "image/png"})
    client.post("/predict", data=data, headers={**auth, "Content-Type": "image/png"})
    client.post("/predict", data=b"not an image", headers={**auth, "Content-Type": "image/png"})
    client.get("/model", headers={"x-api-key": "wrong"})
    after = client.get("/metrics").get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("mnist_cache_lookups_total", result="miss") == 2
    assert delta("mnist_cache_lookups_total", result="hit") == 1
    assert delta("mnist_predictions_total") == 2
    assert delta("mnist_errors_total", code="invalid_image") == 1
    assert delta("mnist_errors_total", code="unauthorized") == 1
    assert delta("mnist_inference_seconds_count") == 1  # the hit did not run the model
    assert delta("mnist_preprocess_seconds_count") == 2
    assert delta("flask_http_request_duration_seconds_count", url_rule="/predict") == 3


def test_low_confidence_threshold(settings: Settings, auth: dict[str, str]) -> None:
    client = create_app(settings.replace(low_confidence_threshold=1.01)).test_client()
    before = client.get("/metrics").get_data(as_text=True)
    client.post(
        "/predict", data=encode(as_paper(sample(1))), headers={**auth, "Content-Type": "image/png"}
    )
    after = client.get("/metrics").get_data(as_text=True)
    name = "mnist_low_confidence_predictions_total"
    assert total(after, name) - total(before, name) == 1


def test_metrics_token(settings: Settings) -> None:
    client = create_app(settings.replace(metrics_token="s3cret")).test_client()
    denied = client.get("/metrics")
    assert denied.status_code == 401
    assert denied.get_json()["code"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200
    assert "mnist_predictions" in allowed.get_data(as_text=True)


def test_invented_methods_and_paths_add_no_series(live_server: LiveServer) -> None:
    """Issue 22: `curl -X QWXA /nonexistent-QWXA` made 18 new series per invented method."""

    def invent(word: str) -> None:
        response = requests.request(word, f"{live_server.url}/nonexistent-{word}", timeout=5)
        assert response.status_code in (404, 405), response.status_code

    invent("QWX0")  # the first unknown request may create the "other" series once
    before = samples(scrape(live_server))
    for word in ("QWXA", "QWXB", "QWXC", "PROPFIND", "QWXD"):
        invent(word)
    after = samples(scrape(live_server))
    assert set(after) == set(before)  # counts moved, no series appeared
    assert not any("QWX" in str(key) or "nonexistent" in str(key) for key in after)

    def others(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return sum(
            value
            for (name, labels), value in found.items()
            if name == "flask_http_request_total" and ("method", "other") in labels
        )

    assert others(after) - others(before) == 5
