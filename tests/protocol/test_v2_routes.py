"""The Open Inference Protocol routes in the app: health, metadata, infer, and what they share
with the rest of the API (keys, cache, metrics, limits, body size, errors, /openapi.json)."""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import SERVICE
from mnist_api.inference.routing import Route
from mnist_api.inference.service import PredictionService
from mnist_api.protocol.codec import HEADER_LENGTH
from tests.http.test_errors import assert_contract_error
from tests.http.test_metrics import total
from tests.samples import as_paper, encode, sample, upload_like_a_user

INFER = "/v2/models/mnist/infer"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# What a malformed or bad request may get: the protocol's 400, or an upload's own code.
ALLOWED_CODES = {
    400: {"invalid_inference_request", "too_many_files", "missing_file", "invalid_image"},
    413: {"payload_too_large", "image_too_large"},
    415: {"unsupported_media_type"},
    422: {"blank_image"},
}


def image_request(files: list[bytes], **extra: Any) -> dict[str, Any]:
    data = [base64.b64encode(f).decode() for f in files]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}
    return {"inputs": [tensor], **extra}


def binary_request(document: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + tail, {HEADER_LENGTH: str(len(header))}


def split_answer(response: TestResponse) -> tuple[dict[str, Any], bytes]:
    body = response.get_data()
    length = int(response.headers.get(HEADER_LENGTH, len(body)))
    return json.loads(body[:length]), body[length:]


def output(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(o for o in document["outputs"] if o["name"] == name)


def users_uploads(count: int) -> list[bytes]:
    return [upload_like_a_user(sample(i % 10), i) for i in range(count)]


# --- health and metadata ---


def test_health_and_server_metadata_need_no_key(client: FlaskClient) -> None:
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    metadata = client.get("/v2").get_json()
    assert metadata["name"] and metadata["version"]
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])


def test_not_ready_before_the_models_load(settings: Settings, auth: dict[str, str]) -> None:
    client = create_app(settings, load_model=False).test_client()
    assert client.get("/v2/health/live").status_code == 200
    assert_contract_error(client.get("/v2/health/ready"), 503, "not_ready")
    assert_contract_error(client.get("/v2/models/mnist/ready", headers=auth), 503, "not_ready")
    body = json.dumps(image_request([b"x"]))
    assert_contract_error(client.post(INFER, data=body, headers=auth), 503, "not_ready")


def test_model_metadata_and_readiness(
    app: APIFlask, client: FlaskClient, auth: dict[str, str]
) -> None:
    service: PredictionService = app.extensions[SERVICE]
    versions = service.registry.versions()
    metadata = client.get("/v2/models/mnist", headers=auth).get_json()
    assert metadata["name"] == "mnist" and metadata["versions"] == versions
    assert all(len(v) == 12 for v in versions)
    assert metadata["platform"] == "tflite"
    inputs = {t["name"]: t for t in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES" and inputs["image"]["shape"] == [-1]
    assert (
        inputs["pixels"]["shape"] == [-1, 28, 28]
        and "FP32" in inputs["pixels"]["parameters"]["datatypes"]
    )
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, 10]), "digit": ("INT64", [-1])}
    for version in versions:
        pinned = client.get(f"/v2/models/mnist/versions/{version}", headers=auth)
        assert pinned.status_code == 200 and pinned.get_json()["versions"] == versions
        ready = client.get(f"/v2/models/mnist/versions/{version}/ready", headers=auth)
        assert ready.get_json() == {"name": "mnist", "ready": True}
    assert client.get("/v2/models/mnist/ready", headers=auth).get_json()["ready"] is True


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/mnist",
        "/v2/models/mnist/ready",
        "/v2/models/mnist/versions/fe5e4f4d480b",
        "/v2/models/mnist/versions/fe5e4f4d480b/ready",
    ],
)
def test_model_routes_need_the_key(client: FlaskClient, path: str) -> None:
    assert_contract_error(client.get(path), 401, "unauthorized")
    assert_contract_error(client.get(path, headers={"x-api-key": "wrong"}), 401, "unauthorized")
    assert_contract_error(client.post(INFER, data=b"{}"), 401, "unauthorized")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/resnet"),
        ("GET", "/v2/models/resnet/ready"),
        ("POST", "/v2/models/resnet/infer"),
        ("GET", "/v2/models/mnist/versions/0123456789ab"),
        ("GET", "/v2/models/mnist/versions/1/ready"),
        ("POST", "/v2/models/mnist/versions/0123456789ab/infer"),
    ],
)
def test_unknown_models_and_versions_are_404(
    client: FlaskClient, auth: dict[str, str], method: str, path: str
) -> None:
    body = json.dumps(image_request([encode(as_paper(sample(3)))]))
    response = client.open(
        path, method=method, headers=auth, data=body if method == "POST" else None
    )
    assert_contract_error(response, 404, "model_not_found")


# --- infer with images ---


def test_image_batch_gives_the_answers_of_predict(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    files = users_uploads(12)
    response = client.post(INFER, json=image_request(files, id="batch-1"), headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    document = response.get_json()
    assert document["id"] == "batch-1" and document["model_name"] == "mnist"
    assert response.headers["X-Model-Version"] == f"mnist-cnn-int8-{document['model_version']}"
    probabilities = np.array(output(document, "probabilities")["data"]).reshape(12, 10)
    digits = output(document, "digit")["data"]
    for index, data in enumerate(files):
        single = client.post("/predict", data=data, headers={**auth, "Content-Type": "image/jpeg"})
        answer = single.get_json()
        # The same cache: V2 stored the answer that /predict now finds.
        assert answer["cached"] is True
        assert digits[index] == answer["prediccion"]
        np.testing.assert_allclose(probabilities[index], answer["probabilities"], atol=1e-6)
    assert sum(d == i % 10 for i, d in enumerate(digits)) >= 11  # real uploads, right answers


def test_binary_image_batch_with_binary_outputs(client: FlaskClient, auth: dict[str, str]) -> None:
    files = users_uploads(3)
    tail = b"".join(struct.pack("<I", len(f)) + f for f in files)
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [3],
        "parameters": {"binary_data_size": len(tail)},
    }
    body, headers = binary_request(
        {"inputs": [tensor], "parameters": {"binary_data_output": True}}, tail
    )
    response = client.post(INFER, data=body, headers={**auth, **headers})
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    document, data = split_answer(response)
    sizes = [o["parameters"]["binary_data_size"] for o in document["outputs"]]
    assert sizes == [3 * 10 * 4, 3 * 8] and len(data) == sum(sizes)
    assert np.frombuffer(data[120:], "<i8").tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "bad",
    [b"not an image at all", b"%PDF-1.4\n%%EOF\n", encode(as_paper(np.zeros((28, 28), np.uint8)))],
)
def test_a_bad_image_fails_the_batch_with_the_code_of_predict(
    client: FlaskClient, auth: dict[str, str], bad: bytes
) -> None:
    single = client.post("/predict", data=bad, headers={**auth, "Content-Type": "image/png"})
    files = [encode(as_paper(sample(1))), bad]
    response = client.post(INFER, json=image_request(files), headers=auth)
    assert_contract_error(response, single.status_code, single.get_json()["code"])
    assert response.get_json()["error"].startswith("Element 1 of input 'image'")


def test_image_batch_cap_is_batch_max_files(client: FlaskClient, auth: dict[str, str]) -> None:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [65], "data": ["YQ=="] * 65}
    response = client.post(INFER, json={"inputs": [tensor]}, headers=auth)
    assert_contract_error(response, 400, "too_many_files")


# --- infer with pixels ---


def mnist_pixels(count: int) -> tuple[np.ndarray, list[int]]:
    digits = [i % 10 for i in range(count)]
    return np.stack([sample(d) for d in digits]), digits


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_pixels_in_binary(client: FlaskClient, auth: dict[str, str], datatype: str) -> None:
    grey, digits = mnist_pixels(70)  # more than the largest interpreter bucket (64)
    raw = grey.tobytes() if datatype == "UINT8" else (grey / 255).astype("<f4").tobytes()
    tensor = {
        "name": "pixels",
        "datatype": datatype,
        "shape": [70, 28, 28, 1],
        "parameters": {"binary_data_size": len(raw)},
    }
    body, headers = binary_request(
        {"inputs": [tensor], "outputs": [{"name": "digit", "parameters": {"binary_data": True}}]},
        raw,
    )
    response = client.post(INFER, data=body, headers={**auth, **headers})
    assert response.status_code == 200, response.get_data(as_text=True)
    document, data = split_answer(response)
    assert [o["name"] for o in document["outputs"]] == ["digit"]
    predicted = np.frombuffer(data, "<i8")
    assert (predicted == digits).mean() >= 0.95


def test_pixels_in_json_with_classification(client: FlaskClient, auth: dict[str, str]) -> None:
    grey, _ = mnist_pixels(2)
    tensor = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [2, 28, 28],
        "data": (grey / 255).tolist(),
    }
    request = {
        "inputs": [tensor],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    document = client.post(INFER, json=request, headers=auth).get_json()
    (classes,) = document["outputs"]
    assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 2]
    best = [int(item.split(":")[1]) for item in classes["data"][::2]]
    assert best == [0, 1]
    scores = [float(item.split(":")[0]) for item in classes["data"]]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]


def test_pixels_cap(settings: Settings, auth: dict[str, str]) -> None:
    client = create_app(settings.replace(v2_max_pixels_batch=2)).test_client()
    grey, _ = mnist_pixels(3)
    tensor = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [3, 28, 28],
        "data": grey.ravel().tolist(),
    }
    response = client.post(INFER, json={"inputs": [tensor]}, headers=auth)
    assert_contract_error(response, 400, "too_many_files")
    assert "at most 2" in response.get_json()["error"]


def test_a_pinned_version_answers(app: APIFlask, client: FlaskClient, auth: dict[str, str]) -> None:
    service: PredictionService = app.extensions[SERVICE]
    grey, _ = mnist_pixels(1)
    tensor = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [1, 28, 28],
        "data": grey.ravel().tolist(),
    }
    for version in service.registry.versions():
        response = client.post(
            f"/v2/models/mnist/versions/{version}/infer", json={"inputs": [tensor]}, headers=auth
        )
        assert response.get_json()["model_version"] == version
        assert response.headers["X-Model-Version"] == f"mnist-cnn-int8-{version}"


# --- what V2 shares with the rest of the API ---


def test_v2_counts_in_the_metrics(client: FlaskClient, auth: dict[str, str]) -> None:
    grey, _ = mnist_pixels(5)
    tensor = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [5, 28, 28],
        "data": grey.ravel().tolist(),
    }
    before = client.get("/metrics").get_data(as_text=True)
    assert client.post(INFER, json={"inputs": [tensor]}, headers=auth).status_code == 200
    client.post(INFER, data=b"{bad json", headers=auth)
    after = client.get("/metrics").get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("mnist_predictions_total") == 5
    assert delta("mnist_inference_seconds_count") == 1  # one interpreter call for the batch
    assert delta("mnist_errors_total", code="invalid_inference_request") == 1
    rule = "/v2/models/<model_name>/infer"
    assert delta("flask_http_request_duration_seconds_count", url_rule=rule) == 2


@dataclass
class ShadowRouter:
    """A real deployment shape: `answer` answers, `shadow` scores the same inputs."""

    answer: str
    shadow: str

    @property
    def stable(self) -> str:
        return self.answer

    def route(self, client: str) -> Route:
        return Route(self.answer, self.shadow)

    def roles(self) -> dict[str, str]:
        return {self.answer: "stable", self.shadow: "candidate"}

    @property
    def deployment_id(self) -> str:
        return ""

    def observe(
        self, version: str, client: str, answers: list[tuple[str, bool]], errors: int = 0
    ) -> None:
        return None

    def record_feedback(
        self, version: str, correct: bool, *, client: str = "", deployment: str = ""
    ) -> None:
        return None


def test_pixels_are_scored_in_the_shadow_when_the_deployment_says_so(
    app: APIFlask, client: FlaskClient, auth: dict[str, str]
) -> None:
    service: PredictionService = app.extensions[SERVICE]
    version = service.registry.versions()[-1]
    grey, _ = mnist_pixels(3)
    before = client.get("/metrics").get_data(as_text=True)
    plain = service.router
    service.router = ShadowRouter(version, version)
    try:
        model, probabilities, _ = service.predict_pixels(grey / np.float32(255), client="abc")
    finally:
        service.router = plain
    after = client.get("/metrics").get_data(as_text=True)
    name = "mnist_shadow_predictions_total"
    assert total(after, name, agree="true") - total(before, name, agree="true") == 3
    assert model.version == version and probabilities.shape == (3, 10)


def test_v2_infer_is_rate_limited_like_predict(settings: Settings, auth: dict[str, str]) -> None:
    client = create_app(settings.replace(rate_limit="2/minute")).test_client()
    body = json.dumps(image_request([encode(as_paper(sample(4)))]))
    statuses = [client.post(INFER, data=body, headers=auth).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200]
    assert_contract_error(client.post(INFER, data=body, headers=auth), 429, "rate_limited")
    metadata = [client.get("/v2/models/mnist", headers=auth).status_code for _ in range(3)]
    assert metadata[2] == 429  # the keyed routes, like /model and /models
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert all(client.get(path).status_code == 200 for _ in range(5)), path


def test_body_size_limit_holds(settings: Settings, auth: dict[str, str]) -> None:
    client = create_app(settings.replace(max_content_length=4096)).test_client()
    body = json.dumps(image_request([b"x" * 8000]))
    assert_contract_error(client.post(INFER, data=body, headers=auth), 413, "payload_too_large")


def test_too_deep_or_too_costly_json_is_a_400_before_parsing(
    settings: Settings, auth: dict[str, str]
) -> None:
    """Issue 22: a V2 body's JSON is measured first; past a limit, a 400 with its code."""
    client = create_app(settings.replace(decode_memory_budget_mb=3)).test_client()
    deep = b'{"inputs": [{"name": "pixels", "data": ' + b"[" * 40 + b"]" * 40 + b"}]}"
    assert_contract_error(client.post(INFER, data=deep, headers=auth), 400, "json_too_deep")
    grey, _ = mnist_pixels(256)  # about 4.4 MiB to parse: more than a budget of 3 MiB
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [256, 28, 28], "data": grey.tolist()}
    response = client.post(INFER, json={"inputs": [tensor]}, headers=auth)
    assert_contract_error(response, 400, "json_too_large")
    assert "binary" in response.get_json()["error"]
    grey, digits = mnist_pixels(8)  # a smaller batch fits the budget
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [8, 28, 28], "data": grey.tolist()}
    response = client.post(INFER, json={"inputs": [tensor]}, headers=auth)
    assert response.status_code == 200, response.get_json()
    assert output(response.get_json(), "digit")["data"] == digits


def test_compressed_bodies_are_refused(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post(INFER, data=b"\x1f\x8b", headers={**auth, "Content-Encoding": "gzip"})
    assert_contract_error(response, 415, "unsupported_media_type")


def test_routes_are_documented(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/versions/{model_version}",
        "/v2/models/{model_name}/versions/{model_version}/ready",
    ):
        assert "get" in paths[path], path
    for path in (
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ):
        operation = paths[path]["post"]
        assert set(operation["requestBody"]["content"]) == {
            "application/json",
            "application/octet-stream",
        }
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "application/octet-stream",
        }
        assert any(p["name"] == HEADER_LENGTH for p in operation["parameters"])
        assert {"400", "401", "404", "413", "503"} <= set(operation["responses"])
        assert operation["security"]
    assert "security" not in paths["/v2/health/live"]["get"]
    assert spec["components"]["schemas"]["InferenceRequest"]["required"] == ["inputs"]
    assert client.get("/docs").status_code == 200


# --- malformed bodies (hypothesis): a 400 (or an upload's own code), never a 5xx ---


def assert_refused_well(response: TestResponse) -> None:
    assert response.status_code in ALLOWED_CODES, (response.status_code, response.get_data())
    body = response.get_json()
    assert body == {"error": body["error"], "code": body["code"]}
    assert body["code"] in ALLOWED_CODES[response.status_code]


@st.composite
def malformed(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A request broken in one of the ways the issue names."""
    count = draw(st.integers(1, 4))
    grey = np.zeros((count, 28, 28), np.float32)
    raw = grey.tobytes()
    tensor: dict[str, Any] = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [count, 28, 28],
        "parameters": {"binary_data_size": len(raw)},
    }
    kind = draw(
        st.sampled_from(
            ["bad json", "lying header", "size past the body", "shape", "datatype", "nan", "zero"]
        )
    )
    header_shift = 0
    if kind == "bad json":
        junk = draw(st.binary(min_size=1, max_size=200))
        return junk, draw(st.sampled_from([{}, {HEADER_LENGTH: str(len(junk))}]))
    if kind == "lying header":
        header_shift = draw(st.integers(-30, 10_000).filter(lambda n: n != 0))
    elif kind == "size past the body":
        tensor["parameters"]["binary_data_size"] = len(raw) + draw(st.integers(1, 10**12))
    elif kind == "shape":
        tensor["shape"] = [count + draw(st.integers(1, 5)), 28, 28]
    elif kind == "datatype":
        tensor["datatype"] = draw(
            st.text(min_size=1, max_size=8).filter(lambda s: s not in {"FP32", "UINT8"})
        )
    elif kind == "nan":
        values = grey.copy()
        values.flat[draw(st.integers(0, values.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        raw = values.tobytes()
    else:
        tensor["shape"] = [0, 28, 28]
    header = json.dumps({"inputs": [tensor]}).encode()
    length = max(len(header) + header_shift, 0)
    return header + raw, {HEADER_LENGTH: str(length)}


@FUZZ
@given(case=malformed())
def test_malformed_bodies_get_a_400(
    client: FlaskClient, auth: dict[str, str], case: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = case
    response = client.post(INFER, data=body, headers={**auth, **headers})
    assert_refused_well(response)


@FUZZ
@given(
    files=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    binary=st.booleans(),
)
def test_random_image_elements_get_an_upload_code(
    client: FlaskClient, auth: dict[str, str], files: list[bytes], binary: bool
) -> None:
    if binary:
        tail = b"".join(struct.pack("<I", len(f)) + f for f in files)
        tensor = {
            "name": "image",
            "datatype": "BYTES",
            "shape": [len(files)],
            "parameters": {"binary_data_size": len(tail)},
        }
        body, headers = binary_request({"inputs": [tensor]}, tail)
    else:
        body, headers = json.dumps(image_request(files)).encode(), {}
    response = client.post(INFER, data=body, headers={**auth, **headers})
    if response.status_code != 200:
        assert_refused_well(response)


def test_the_documented_example_answers(client: FlaskClient, auth: dict[str, str]) -> None:
    spec = client.get("/openapi.json").get_json()
    example = spec["components"]["schemas"]["InferenceRequest"]["example"]
    document = client.post(INFER, json=example, headers=auth).get_json()
    assert document["id"] == example["id"]
    assert output(document, "digit")["data"] == [7]
    (best, *_) = output(document, "probabilities")["data"]
    assert best.endswith(":7")


# --- prediction ids (issue 21) ---


def test_infer_answers_carry_prediction_ids_that_feedback_takes(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    files = users_uploads(3)
    response = client.post(INFER, json=image_request(files), headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    document = response.get_json()
    ids = document["parameters"]["prediction_ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    digits = output(document, "digit")["data"]
    judged = client.post(
        "/feedback",
        data={
            "prediction_id": ids[1],
            "label": str(digits[1]),
            "file": (io.BytesIO(files[1]), "1.png"),
        },
        headers=auth,
        content_type="multipart/form-data",
    )
    assert judged.status_code in (200, 201), judged.get_json()
    assert judged.get_json()["predicted"] == digits[1]
    mismatched = client.post(
        "/feedback",
        data={"prediction_id": ids[0], "label": "1", "file": (io.BytesIO(files[2]), "2.png")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert_contract_error(mismatched, 400, "prediction_mismatch")
    pixels = client.post(
        INFER,
        json={
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [2, 28, 28],
                 "data": np.stack([sample(3), sample(4)]).reshape(-1).tolist()}
            ]
        },
        headers=auth,
    )  # fmt: skip
    assert len(pixels.get_json()["parameters"]["prediction_ids"]) == 2
