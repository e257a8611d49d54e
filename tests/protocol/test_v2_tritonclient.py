"""The official Open Inference Protocol client, `tritonclient.http`, against gunicorn over HTTP.

First with the client's default settings (binary tensor data both ways), then the same calls
in JSON only (`binary_data=False`), then a few malformed bodies sent by hand.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.samples import sample, upload_like_a_user
from tools.services import LiveServer

MODEL = "mnist"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    """The client as its documentation shows it: a URL without the scheme."""
    connection = triton.InferenceServerClient(url=live_server.url.removeprefix("http://"))
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture(scope="module")
def key(live_server: LiveServer) -> dict[str, str]:
    """The key header. Pass a copy per call (`{**key}`): `infer()` adds its
    Inference-Header-Content-Length to the dict it is given, which would then go out with
    the next, maybe JSON-only, request."""
    return {"x-api-key": live_server.api_key}


def uploads(count: int) -> list[bytes]:
    return [upload_like_a_user(sample(i % 10), 100 + i) for i in range(count)]


def image_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    else:
        # JSON carries BYTES as text: the service takes base64 strings there.
        encoded = [base64.b64encode(f) for f in files]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def pixels_input(grey: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    values = grey if datatype == "UINT8" else (grey / 255).astype(np.float32)
    tensor = triton.InferInput("pixels", list(values.shape), datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    return tensor


def predict_answers(live_server: LiveServer, files: list[bytes]) -> list[dict[str, object]]:
    answers = []
    for data in files:
        response = requests.post(
            f"{live_server.url}/predict",
            data=data,
            headers={"x-api-key": live_server.api_key, "Content-Type": "image/jpeg"},
            timeout=10,
        )
        assert response.status_code == 200
        answers.append(response.json())
    return answers


# --- the client's default settings ---


def test_health_and_metadata(client: triton.InferenceServerClient, key: dict[str, str]) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers={**key})
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL, headers={**key})
    assert metadata["name"] == MODEL and metadata["platform"] == "tflite"
    assert {t["name"] for t in metadata["inputs"]} == {"image", "pixels"}
    for version in metadata["versions"]:
        assert client.is_model_ready(MODEL, version, headers={**key})
        assert client.get_model_metadata(MODEL, version, headers={**key})["name"] == MODEL
    assert not client.is_model_ready(MODEL, "0123456789ab", headers={**key})
    assert not client.is_model_ready("resnet", headers={**key})


def test_image_batch_answers_like_predict(
    client: triton.InferenceServerClient, key: dict[str, str], live_server: LiveServer
) -> None:
    files = uploads(10)
    result = client.infer(MODEL, [image_input(files)], headers={**key}, request_id="imgs-1")
    response = result.get_response()
    assert response["id"] == "imgs-1" and response["model_name"] == MODEL
    # Binary outputs, as the client asked (binary_data_output when no outputs are named).
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    probabilities, digits = result.as_numpy("probabilities"), result.as_numpy("digit")
    assert probabilities.dtype == np.float32 and probabilities.shape == (10, 10)
    assert digits.dtype == np.int64 and digits.shape == (10,)
    for index, answer in enumerate(predict_answers(live_server, files)):
        assert answer["prediccion"] == digits[index]
        assert answer["model_version"] == f"mnist-cnn-int8-{response['model_version']}"
        np.testing.assert_allclose(probabilities[index], answer["probabilities"], atol=1e-6)
    assert (digits == [i % 10 for i in range(10)]).sum() >= 9


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_pixels(client: triton.InferenceServerClient, key: dict[str, str], datatype: str) -> None:
    grey = np.stack([sample(d) for d in range(10)])
    result = client.infer(MODEL, [pixels_input(grey, datatype)], headers={**key})
    assert result.as_numpy("digit").tolist() == list(range(10))
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)


def test_requested_outputs_and_classification(
    client: triton.InferenceServerClient, key: dict[str, str]
) -> None:
    grey = np.stack([sample(7), sample(3)])
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3)]
    result = client.infer(MODEL, [pixels_input(grey, "UINT8")], outputs=outputs, headers={**key})
    assert result.as_numpy("digit") is None  # not asked for
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    best = [row[0].decode().split(":") for row in classes]
    assert [int(index) for _, index in best] == [7, 3]
    scores = [[float(item.decode().split(":")[0]) for item in row] for row in classes]
    assert all(row == sorted(row, reverse=True) for row in scores)


def test_a_pinned_version(client: triton.InferenceServerClient, key: dict[str, str]) -> None:
    grey = np.stack([sample(5)])
    for version in client.get_model_metadata(MODEL, headers={**key})["versions"]:
        result = client.infer(
            MODEL, [pixels_input(grey, "UINT8")], model_version=version, headers={**key}
        )
        assert result.get_response()["model_version"] == version
    with pytest.raises(InferenceServerException) as caught:
        client.infer(
            MODEL, [pixels_input(grey, "UINT8")], model_version="0123456789ab", headers={**key}
        )
    assert caught.value.status() == "404" and "0123456789ab" in caught.value.message()


def test_a_wrong_key_is_unauthorized(client: triton.InferenceServerClient) -> None:
    grey = np.stack([sample(5)])
    for headers in ({"x-api-key": "wrong"}, None):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [pixels_input(grey, "UINT8")], headers=headers)
        # HTTP 401 Unauthorized, with the contract's sentence about the key.
        assert caught.value.status() == "401"
        assert "API key" in caught.value.message()
        with pytest.raises(InferenceServerException) as metadata:
            client.get_model_metadata(MODEL, headers=headers)
        assert metadata.value.status() == "401"


def test_a_bad_image_fails_with_the_code_of_predict(
    client: triton.InferenceServerClient, key: dict[str, str]
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [image_input([uploads(1)[0], b"not an image"])], headers={**key})
    assert caught.value.status() == "400"
    assert caught.value.message().startswith("Element 1 of input 'image'")


# --- the same in JSON only ---


def json_outputs(*names: str, class_count: int = 0) -> list[triton.InferRequestedOutput]:
    return [
        triton.InferRequestedOutput(name, binary_data=False, class_count=class_count)
        for name in names
    ]


def test_json_only_image_batch(
    client: triton.InferenceServerClient, key: dict[str, str], live_server: LiveServer
) -> None:
    files = uploads(4)
    result = client.infer(
        MODEL,
        [image_input(files, binary=False)],
        outputs=json_outputs("probabilities", "digit"),
        headers={**key},
    )
    assert all("data" in o for o in result.get_response()["outputs"])
    digits = result.as_numpy("digit")
    probabilities = result.as_numpy("probabilities")
    for index, answer in enumerate(predict_answers(live_server, files)):
        assert answer["prediccion"] == digits[index]
        np.testing.assert_allclose(probabilities[index], answer["probabilities"], atol=1e-6)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_json_only_pixels_with_classification(
    client: triton.InferenceServerClient, key: dict[str, str], datatype: str
) -> None:
    grey = np.stack([sample(d) for d in (2, 8)])
    result = client.infer(
        MODEL,
        [pixels_input(grey, datatype, binary=False)],
        outputs=json_outputs("digit") + json_outputs("probabilities", class_count=2),
        headers={**key},
        request_id="json-1",
    )
    response = result.get_response()
    assert response["id"] == "json-1"
    assert [o["name"] for o in response["outputs"]] == ["digit", "probabilities"]
    assert result.as_numpy("digit").tolist() == [2, 8]
    classes = result.as_numpy("probabilities")
    assert [str(row[0]).split(":")[1] for row in classes] == ["2", "8"]


def test_json_only_pinned_version(
    client: triton.InferenceServerClient, key: dict[str, str]
) -> None:
    version = client.get_model_metadata(MODEL, headers={**key})["versions"][0]
    result = client.infer(
        MODEL,
        [pixels_input(np.stack([sample(6)]), "UINT8", binary=False)],
        outputs=json_outputs("digit"),
        model_version=version,
        headers={**key},
    )
    assert result.get_response()["model_version"] == version
    assert result.as_numpy("digit").tolist() == [6]


# --- malformed bodies over HTTP, and the log line ---

LYING_SIZE = json.dumps(
    {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [1, 28, 28],
                "parameters": {"binary_data_size": 10**9},  # 784 bytes follow
            }
        ]
    }
).encode()


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", {}),
        (b'{"inputs": []}' + b"\x00" * 8, {"Inference-Header-Content-Length": "100000"}),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "-1"}),
        (LYING_SIZE + b"\x00" * 784, {"Inference-Header-Content-Length": str(len(LYING_SIZE))}),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "pixels", "datatype": "FP32", "shape": [0, 28, 28], "data": []}
                    ]
                }
            ).encode(),
            {},
        ),
    ],
)
def test_malformed_bodies_over_http(
    live_server: LiveServer, key: dict[str, str], body: bytes, headers: dict[str, str]
) -> None:
    response = requests.post(
        f"{live_server.url}/v2/models/{MODEL}/infer",
        data=body,
        headers={**key, **headers},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_inference_request"


def test_infer_is_logged_with_request_id_and_version(
    live_server: LiveServer, key: dict[str, str]
) -> None:
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}
    response = requests.post(
        f"{live_server.url}/v2/models/{MODEL}/infer",
        json={"inputs": [tensor]},
        headers={**key, "X-Request-ID": "v2-log-check"},
        timeout=10,
    )
    assert response.status_code == 200
    version = response.headers["X-Model-Version"]
    records = []
    for _ in range(50):  # the line is written after the answer is sent
        records = [r for r in live_server.records() if r.get("request_id") == "v2-log-check"]
        if records:
            break
        requests.get(f"{live_server.url}/healthz", timeout=5)
    (record,) = records
    assert record["route"] == "/v2/models/<model_name>/infer"
    assert record["model_version"] == version and record["status"] == 200
