"""ONE answer type for both V2 input kinds (mnist_api/protocol/service.py `Answers`): the same
image sent as an encoded file (`image`) and as its preprocessed pixels (`pixels`) gets the
same probabilities, at the same precision (6 decimals, like /predict), and the same digit."""

from __future__ import annotations

import base64
from typing import Any

from flask.testing import FlaskClient

from mnist_api.config import Settings
from mnist_api.imaging.preprocessing import preprocess
from mnist_api.inference.service import limits_from
from tests.samples import as_paper, encode, sample

INFER = "/v2/models/mnist/infer"


def answer(client: FlaskClient, auth: dict[str, str], tensor: dict[str, Any]) -> dict[str, Any]:
    response = client.post(INFER, json={"inputs": [tensor]}, headers=auth)
    assert response.status_code == 200, response.get_json()
    outputs = response.get_json()["outputs"]
    return {output["name"]: output["data"] for output in outputs}


def test_image_and_pixels_inputs_answer_alike(
    client: FlaskClient, auth: dict[str, str], settings: Settings
) -> None:
    upload = encode(as_paper(sample(7)))
    pixels = preprocess(upload, limits_from(settings))
    from_image = answer(
        client,
        auth,
        {
            "name": "image",
            "datatype": "BYTES",
            "shape": [1],
            "data": [base64.b64encode(upload).decode()],
        },
    )
    from_pixels = answer(
        client,
        auth,
        {
            "name": "pixels",
            "datatype": "FP32",
            "shape": [1, 28, 28],
            "data": pixels.reshape(-1).tolist(),
        },
    )
    assert from_image == from_pixels
    assert all(value == round(value, 6) for value in from_pixels["probabilities"])
