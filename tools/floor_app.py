"""The benchmark's floor: a minimal Flask + LiteRT app with no production features.

What the same gunicorn serves when an app only reads the multipart upload, resizes it
plainly to 28x28, and calls the interpreter once: no auth, rate limits, cache, metrics,
request ids, JSON logs, CORS or MNIST-style preprocessing. `make bench` runs it beside the
service (`gunicorn tools.floor_app:app -c gunicorn.conf.py`) so the service's cost can be
read as a ratio to this floor (issue 16).

It loads the stable model version the service would start with.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from flask import Flask, jsonify, request
from PIL import Image

from mnist_api.config import Settings
from mnist_api.inference.registry import CARD_FILE, TFLITE_FILE, ModelRegistry

app = Flask(__name__)
_settings = Settings.from_env()
_registry = ModelRegistry.discover(_settings.models_dir)
_folder = _settings.models_dir / _registry.default_version(_settings.default_model_version)
_content = (_folder / TFLITE_FILE).read_bytes()
assert (_folder / CARD_FILE).is_file()
_local = threading.local()


def _interpreter() -> Interpreter:
    """This thread's interpreter (a LiteRT interpreter serves one thread at a time)."""
    interpreter = getattr(_local, "interpreter", None)
    if interpreter is None:
        interpreter = Interpreter(model_content=_content, num_threads=1)
        interpreter.allocate_tensors()
        _local.interpreter = interpreter
    return interpreter


@app.post("/predict")
def predict() -> object:
    """Multipart `file` (or the raw body) -> plain 28x28 resize -> one interpreter call."""
    part = request.files.get("file")
    data = part.read() if part is not None else request.get_data()
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    interpreter = _interpreter()
    source = interpreter.get_input_details()[0]
    scale, zero_point = source["quantization"]
    quantized = np.clip(np.round(pixels / scale) + zero_point, -128, 127).astype(np.int8)
    interpreter.set_tensor(source["index"], quantized.reshape(source["shape"]))
    interpreter.invoke()
    target = interpreter.get_output_details()[0]
    logits = interpreter.get_tensor(target["index"])[0].astype(np.float32)
    digit = int(np.argmax(logits))
    return jsonify({"prediccion": digit})


@app.get("/healthz")
def healthz() -> object:
    """Liveness, so the bench can wait for it like for the service."""
    return jsonify({"status": "ok"})


@app.get("/readyz")
def readyz() -> object:
    """Ready as soon as it imports (the model is read at import)."""
    return jsonify({"status": "ready"})
