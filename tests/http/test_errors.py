"""Every error code of the contract, each from a real bad file or request."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import SERVICE
from tests.samples import as_paper, encode, sample

LEAKS = ("Traceback", "Exception", "Error(", 'File "', "/work/", "site-packages", "line ")


def assert_contract_error(response: TestResponse, status: int, code: str) -> None:
    """The response is the contract's JSON error with this status and code, and leaks nothing."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body == {"error": body["error"], "code": code}
    assert body["error"] and body["error"][0].isupper()
    text = response.get_data(as_text=True)
    assert not any(leak in text for leak in LEAKS), text
    assert response.headers.get("X-Request-ID")


def good_png() -> bytes:
    return encode(as_paper(sample(3)))


def post_file(client: FlaskClient, data: bytes, auth: dict[str, str], name: str = "x.png"):
    return client.post("/predict", data={"file": (io.BytesIO(data), name)}, headers=auth)


def truncated_png() -> bytes:
    data = good_png()
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()


def pdf_file() -> bytes:
    return encode(as_paper(sample(3)).convert("RGB"), "PDF")


def svg_file() -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
        b'<text x="8" y="22" font-size="20">7</text></svg>\n'
    )


def tiff_file() -> bytes:
    return encode(as_paper(sample(3)), "TIFF")


def pixel_bomb() -> bytes:
    """A small file that would decode to 100 million pixels."""
    return encode(Image.new("1", (10_000, 10_000), 1), optimize=True)


BAD_FILES = {
    "truncated_png": (truncated_png, 400, "invalid_image"),
    "random_bytes": (random_bytes, 400, "invalid_image"),
    "pdf": (pdf_file, 415, "unsupported_media_type"),
    "svg": (svg_file, 415, "unsupported_media_type"),
    "tiff": (tiff_file, 415, "unsupported_media_type"),
    "pixel_bomb": (pixel_bomb, 413, "image_too_large"),
    "blank_white": (lambda: encode(Image.new("L", (200, 200), 255)), 422, "blank_image"),
    "blank_colour": (lambda: encode(Image.new("RGB", (50, 80), (30, 90, 200))), 422, "blank_image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_as_multipart(client: FlaskClient, auth: dict[str, str], name: str) -> None:
    make, status, code = BAD_FILES[name]
    assert_contract_error(post_file(client, make(), auth, name="digit.png"), status, code)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_as_raw_body(client: FlaskClient, auth: dict[str, str], name: str) -> None:
    make, status, code = BAD_FILES[name]
    headers = {**auth, "Content-Type": "image/png"}
    assert_contract_error(client.post("/predict", data=make(), headers=headers), status, code)


def test_pixel_bomb_file_is_small() -> None:
    assert len(pixel_bomb()) < 200_000


def test_kind_comes_from_bytes_not_name(client: FlaskClient, auth: dict[str, str]) -> None:
    # A TIFF named .png is still refused; a PNG named .pdf is still read.
    assert_contract_error(
        post_file(client, tiff_file(), auth, "a.png"), 415, "unsupported_media_type"
    )
    assert post_file(client, good_png(), auth, "a.pdf").status_code == 200


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({}, {}),  # multipart with no file part
        ({"file": (io.BytesIO(b""), "")}, {}),  # empty filename
        ({"file": (io.BytesIO(b""), "empty.png")}, {}),  # empty file
        ({"other": (io.BytesIO(b"abc"), "a.png")}, {}),  # wrong field name
    ],
)
def test_missing_file_multipart(
    client: FlaskClient, auth: dict[str, str], data: dict, headers: dict
) -> None:
    response = client.post(
        "/predict", data=data, headers={**auth, **headers}, content_type="multipart/form-data"
    )
    assert_contract_error(response, 400, "missing_file")


def test_missing_file_empty_raw_body(client: FlaskClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Content-Type": "image/png"}
    assert_contract_error(client.post("/predict", data=b"", headers=headers), 400, "missing_file")
    assert_contract_error(client.post("/predict", headers=auth), 400, "missing_file")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"image": "7"}'),
        ("text/plain", b"seven"),
        ("application/pdf", pdf_file()),
        ("application/x-www-form-urlencoded", b"file=abc"),
        ("image/tiff", tiff_file()),
    ],
)
def test_raw_body_of_other_type_is_415(
    client: FlaskClient, auth: dict[str, str], content_type: str, body: bytes
) -> None:
    headers = {**auth, "Content-Type": content_type}
    response = client.post("/predict", data=body, headers=headers)
    assert_contract_error(response, 415, "unsupported_media_type")


@pytest.fixture(scope="module")
def small_limits_client(settings: Settings) -> FlaskClient:
    """An app with a 64 KiB body limit and at most 3 files per batch."""
    app = create_app(settings.replace(max_content_length=64 * 1024, batch_max_files=3))
    return app.test_client()


def test_body_over_limit_is_413(small_limits_client: FlaskClient, auth: dict[str, str]) -> None:
    big = random_bytes() * 5  # 100 KB
    headers = {**auth, "Content-Type": "image/png"}
    response = small_limits_client.post("/predict", data=big, headers=headers)
    assert_contract_error(response, 413, "payload_too_large")
    response = post_file(small_limits_client, big, auth)
    assert_contract_error(response, 413, "payload_too_large")


def test_batch_over_file_limit(small_limits_client: FlaskClient, auth: dict[str, str]) -> None:
    files = [(io.BytesIO(good_png()), f"{i}.png") for i in range(4)]
    response = small_limits_client.post("/predict/batch", data={"files": files}, headers=auth)
    assert_contract_error(response, 400, "too_many_files")


def test_batch_without_files(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/predict/batch", data={}, headers=auth, content_type="multipart/form-data"
    )
    assert_contract_error(response, 400, "missing_file")
    response = client.post(
        "/predict/batch", data=good_png(), headers={**auth, "Content-Type": "image/png"}
    )
    assert_contract_error(response, 415, "unsupported_media_type")


@pytest.fixture
def unloaded_app(settings: Settings) -> APIFlask:
    return create_app(settings, load_model=False)


def test_not_ready_before_the_model_is_loaded(unloaded_app: APIFlask, auth: dict[str, str]) -> None:
    client = unloaded_app.test_client()
    assert_contract_error(client.get("/readyz"), 503, "not_ready")
    assert_contract_error(post_file(client, good_png(), auth), 503, "not_ready")
    assert client.get("/healthz").status_code == 200


@pytest.fixture
def broken_service(app: APIFlask, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fault no real input produces: the service raises something unexpected."""

    def explode(data: bytes, **_options: object) -> dict:
        raise RuntimeError("secret detail at /work/main/mnist_api/inference/service.py")

    monkeypatch.setattr(app.extensions[SERVICE], "predict", explode)
    yield


def test_unexpected_failure_is_a_generic_500(
    client: FlaskClient, auth: dict[str, str], broken_service: None
) -> None:
    response = post_file(client, good_png(), auth)
    assert_contract_error(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True)


def test_unknown_route_and_wrong_method(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_contract_error(client.get("/nowhere"), 404, "not_found")
    assert_contract_error(client.get("/predict", headers=auth), 405, "method_not_allowed")
