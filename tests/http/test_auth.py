"""API-key authentication: no key, wrong key, each of several keys; keys never logged."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from mnist_api.http.auth import key_fingerprint, key_matches
from tests.http.test_errors import assert_contract_error
from tests.samples import as_paper, encode, sample
from tools.services import API_KEYS

KEYED_ROUTES = [("POST", "/predict"), ("POST", "/predict/batch"), ("GET", "/model")]


@pytest.mark.parametrize(("method", "path"), KEYED_ROUTES)
def test_no_key_is_401(client: FlaskClient, method: str, path: str) -> None:
    assert_contract_error(client.open(path, method=method), 401, "unauthorized")


@pytest.mark.parametrize(("method", "path"), KEYED_ROUTES)
@pytest.mark.parametrize("key", ["wrong", "", API_KEYS[0] + "x", API_KEYS[0][:-1], "Bearer x"])
def test_wrong_key_is_401(client: FlaskClient, method: str, path: str, key: str) -> None:
    response = client.open(path, method=method, headers={"x-api-key": key})
    assert_contract_error(response, 401, "unauthorized")


@pytest.mark.parametrize("key", API_KEYS)
def test_each_configured_key_works(client: FlaskClient, key: str) -> None:
    png = encode(as_paper(sample(4)))
    response = client.post(
        "/predict", data=png, headers={"x-api-key": key, "Content-Type": "image/png"}
    )
    assert response.status_code == 200
    assert client.get("/model", headers={"x-api-key": key}).status_code == 200


def test_header_name_is_case_insensitive(client: FlaskClient) -> None:
    assert client.get("/model", headers={"X-API-KEY": API_KEYS[1]}).status_code == 200


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/openapi.json", "/docs"])
def test_public_routes_need_no_key(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_key_matching() -> None:
    assert key_matches("b", ("a", "b"))
    assert not key_matches("c", ("a", "b"))
    assert not key_matches("", ("a",))
    assert not key_matches("a", ())


def test_fingerprint_is_short_and_not_the_key() -> None:
    fingerprint = key_fingerprint(API_KEYS[0])
    assert len(fingerprint) == 8
    assert fingerprint not in API_KEYS[0]
    assert fingerprint != key_fingerprint(API_KEYS[1])
