"""Accuracy through the whole HTTP path on the 1,000 held-out samples, uploaded as users do."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from tests.samples import mnist_test_split, upload_like_a_user
from tools.services import LiveServer


def test_accuracy_on_user_style_uploads(live_server: LiveServer) -> None:
    images, labels = mnist_test_split()
    uploads = [upload_like_a_user(image, index) for index, image in enumerate(images)]
    headers = {"x-api-key": live_server.api_key, "Content-Type": "image/jpeg"}

    def predict(data: bytes) -> int:
        response = requests.post(
            f"{live_server.url}/predict", data=data, headers=headers, timeout=10
        )
        assert response.status_code == 200, response.text
        return int(response.json()["prediccion"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        predictions = np.array(list(pool.map(predict, uploads)))
    accuracy = float((predictions == labels).mean())
    print(f"accuracy through HTTP on {len(labels)} user-style JPEG uploads: {accuracy:.4f}")
    assert accuracy >= 0.98
