"""The happy paths of the contract: /predict, /predict/batch, /model, ops routes, docs, CORS."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient
from loguru import logger

from mnist_api.app import create_app
from mnist_api.config import Settings
from mnist_api.extensions import SERVICE
from mnist_api.inference.model import DigitModel
from tests.http.test_errors import truncated_png
from tests.samples import as_paper, encode, sample

EXTERNAL_ASSET = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)


def png_of(digit: int) -> bytes:
    return encode(as_paper(sample(digit)))


def assert_prediction(body: dict, model_version: str) -> None:
    assert list(body)[:2] == ["prediccion", "probabilidad"]  # existing clients read these first
    assert set(body) == {
        "prediccion", "probabilidad", "probabilities", "model_version", "cached", "prediction_id"
    }  # fmt: skip
    assert body["prediccion"] in range(10)
    assert len(body["probabilities"]) == 10
    assert abs(sum(body["probabilities"]) - 1.0) < 1e-3
    assert body["probabilidad"] == max(body["probabilities"])
    assert body["probabilities"][body["prediccion"]] == body["probabilidad"]
    assert body["model_version"] == model_version
    assert body["cached"] is False


@pytest.fixture
def model(app: APIFlask) -> DigitModel:
    return app.extensions[SERVICE].model


def test_predict_multipart(client: FlaskClient, auth: dict[str, str], model: DigitModel) -> None:
    response = client.post(
        "/predict", data={"file": (io.BytesIO(png_of(3)), "three.png")}, headers=auth
    )
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "MISS"
    assert_prediction(response.get_json(), model.full_version)


@pytest.mark.parametrize(
    ("fmt", "mimetype"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("GIF", "image/gif"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
    ],
)
def test_predict_raw_body_each_format(
    client: FlaskClient, auth: dict[str, str], model: DigitModel, fmt: str, mimetype: str
) -> None:
    data = encode(as_paper(sample(5)).convert("RGB"), fmt)
    response = client.post("/predict", data=data, headers={**auth, "Content-Type": mimetype})
    assert response.status_code == 200, response.get_json()
    assert_prediction(response.get_json(), model.full_version)


def test_multipart_and_raw_agree(client: FlaskClient, auth: dict[str, str]) -> None:
    data = png_of(8)
    multipart = client.post("/predict", data={"file": (io.BytesIO(data), "a.png")}, headers=auth)
    raw = client.post("/predict", data=data, headers={**auth, "Content-Type": "image/png"})
    first, second = multipart.get_json(), raw.get_json()
    assert (first["cached"], second["cached"]) == (False, True)  # same bytes: a cache hit
    # The same answer; each carries its own prediction id (it holds the time it was given).
    assert {**first, "cached": True, "prediction_id": ""} == {**second, "prediction_id": ""}


def test_request_id_is_echoed_sanitised_or_generated(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "image/png"}
    echoed = client.post("/predict", data=png_of(1), headers={**headers, "X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    dirty = client.get("/healthz", headers={"X-Request-ID": "bad id\t<script>" + "x" * 500})
    assert dirty.headers["X-Request-ID"] == ("badidscript" + "x" * 500)[:128]
    generated = client.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 32


def test_batch_keeps_order_and_isolates_bad_files(
    client: FlaskClient, auth: dict[str, str], model: DigitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = model.predict

    def counting(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(model, "predict", counting)
    files = [(io.BytesIO(png_of(d)), f"{d}.png") for d in (0, 1, 2)]
    files.insert(1, (io.BytesIO(truncated_png()), "bad.png"))
    response = client.post("/predict/batch", data={"files": files}, headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_version"] == model.full_version
    items = body["predictions"]
    assert len(items) == 4
    assert items[1] == {"error": items[1]["error"], "code": "invalid_image"}
    for item in (items[0], items[2], items[3]):
        assert_prediction(item, model.full_version)
    assert calls == [3]  # one interpreter call for the whole batch, not one per image


def test_batch_answers_match_single_answers(client: FlaskClient, auth: dict[str, str]) -> None:
    images = [png_of(d) for d in range(10)]
    files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]
    batch = client.post("/predict/batch", data={"files": files}, headers=auth).get_json()
    for data, item in zip(images, batch["predictions"], strict=True):
        single = client.post(
            "/predict", data=data, headers={**auth, "Content-Type": "image/png"}
        ).get_json()
        assert single["prediccion"] == item["prediccion"]
        assert single["probabilities"] == pytest.approx(item["probabilities"], abs=1e-5)


def test_model_route_reads_the_card(
    client: FlaskClient, auth: dict[str, str], model: DigitModel
) -> None:
    body = client.get("/model", headers=auth).get_json()
    for key in (
        "name",
        "version",
        "sha256",
        "input_shape",
        "input_dtype",
        "quantization",
        "size_bytes",
        "labels",
        "metrics",
        "created",
    ):
        assert key in body, key
    assert body["version"] == model.version == body["sha256"][:12]
    assert body["card_matches_file"] is True
    assert body["labels"] == list(range(10))
    assert set(body["metrics"]) >= {"accuracy_float", "accuracy_int8", "test_samples"}


def test_health_and_readiness(client: FlaskClient, model: DigitModel) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["model"] == model.full_version


def test_openapi_is_generated_from_the_code(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for path in ("/predict", "/predict/batch", "/model", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(
        predict["requestBody"]["content"]
    )
    assert predict["security"] == [{"ApiKeyAuth": []}]
    scheme = spec["components"]["securitySchemes"]["ApiKeyAuth"]
    assert scheme == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": scheme["description"],
    }


def test_docs_page_uses_only_local_assets(client: FlaskClient) -> None:
    page = client.get("/docs").get_data(as_text=True)
    assert "swagger-ui" in page
    assert not EXTERNAL_ASSET.search(page)
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        assert client.get(f"/docs/assets/{asset}").status_code == 200


def test_index_page_uses_only_local_assets(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert "<canvas" in page
    assert not EXTERNAL_ASSET.search(page)


def test_cors_preflight_and_headers(client: FlaskClient, auth: dict[str, str]) -> None:
    preflight = client.options(
        "/predict",
        headers={
            "Origin": "https://digits.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] in ("*", "https://digits.example")
    assert "x-api-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    response = client.post(
        "/predict",
        data=png_of(2),
        headers={**auth, "Content-Type": "image/png", "Origin": "https://digits.example"},
    )
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    assert "X-RateLimit-Remaining" in response.headers["Access-Control-Expose-Headers"]
    # curl and services send no Origin: no CORS headers to compute or send
    plain = client.post("/predict", data=png_of(2), headers={**auth, "Content-Type": "image/png"})
    assert not [name for name, _ in plain.headers.items() if name.startswith("Access-Control")]


def test_cors_with_a_list_of_origins(settings: Settings, auth: dict[str, str]) -> None:
    listed = "https://digits.example"
    client = create_app(settings.replace(cors_origins=(listed, "https://other.example")))
    browser = client.test_client()
    preflight = browser.options(
        "/predict",
        headers={"Origin": listed, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == listed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in preflight.headers["Vary"]
    answer = browser.post(
        "/predict", data=png_of(2), headers={**auth, "Content-Type": "image/png", "Origin": listed}
    )
    assert answer.headers["Access-Control-Allow-Origin"] == listed
    stranger = browser.post(
        "/predict",
        data=png_of(2),
        headers={**auth, "Content-Type": "image/png", "Origin": "https://evil.example"},
    )
    assert stranger.status_code == 200  # served, but the browser keeps it from that page
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_request_log_line_has_no_key(
    client: FlaskClient, auth: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(json.dumps(m.record["extra"], default=str)), level="INFO"
    )
    try:
        client.post("/predict", data=png_of(6), headers={**auth, "Content-Type": "image/png"})
    finally:
        logger.remove(sink)
    request_lines = [json.loads(line) for line in lines if '"route"' in line]
    assert request_lines and request_lines[-1]["route"] == "/predict"
    assert request_lines[-1]["status"] == 200
    assert all(auth["x-api-key"] not in line for line in lines)
