"""The int8 MNIST model in LiteRT: built once, `load()`ed once per process, then `predict()`ed.

A LiteRT interpreter must not be used by two threads at once, so each thread gets its own
(`threading.local`), one per batch size bucket: resizing an interpreter's input means
re-allocating its tensors, which costs more than keeping a few small ones around.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

MODEL_NAME = "mnist-cnn-int8"
NUM_CLASSES = 10
# Batches are padded up to the next of these sizes so a thread keeps at most a few interpreters.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ModelNotLoaded(RuntimeError):
    """`predict()` was called before `load()` finished."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and affine quantization of one model tensor."""

    index: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> TensorSpec:
        """Build from one entry of LiteRT's `get_input_details()`/`get_output_details()`."""
        scale, zero_point = details["quantization"]
        return cls(
            index=int(details["index"]),
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]),
            scale=float(scale),
            zero_point=int(zero_point),
        )

    @property
    def quantized(self) -> bool:
        """True when the tensor holds integers standing for `scale * (q - zero_point)`."""
        return self.dtype.kind in "iu" and self.scale > 0.0


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def full_version(version: str) -> str:
    """The `model_version` of an answer for a 12-hex `version`: `mnist-cnn-int8-<version>`."""
    return f"{MODEL_NAME}-{version}"


@dataclass
class DigitModel:
    """A LiteRT digit classifier read from a `.tflite` file and its model card."""

    model_path: Path
    card_path: Path | None = None
    num_threads: int = 1
    card: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    input_spec: TensorSpec | None = None
    output_spec: TensorSpec | None = None
    _content: bytes = b""
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _loaded_pid: int | None = None

    @property
    def version(self) -> str:
        """First 12 hex digits of the model file's SHA-256 (what the card calls `version`)."""
        return self.sha256[:12]

    @property
    def full_version(self) -> str:
        """The `model_version` string of every answer, e.g. `mnist-cnn-int8-3f2a9c1b7d4e`."""
        return full_version(self.version)

    @property
    def ready(self) -> bool:
        """True once the model is loaded and a warm-up inference ran.

        A forked child inherits this, but never an interpreter: `_interpreter()` makes new
        ones per process, so the model stays safe to use after gunicorn forks.
        """
        return self._loaded_pid is not None

    def load(self) -> None:
        """Read the model and its card, check the input layout, and run a warm-up inference."""
        self._content = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(self._content).hexdigest()
        if self.card_path is not None and self.card_path.exists():
            self.card = json.loads(self.card_path.read_text())
        self._local = threading.local()
        probe = self._new_interpreter(1)
        self.input_spec = TensorSpec.from_details(probe.get_input_details()[0])
        self.output_spec = TensorSpec.from_details(probe.get_output_details()[0])
        if self.input_spec.shape[1:3] != (28, 28) or self.output_spec.shape[-1] != NUM_CLASSES:
            raise ValueError(f"{self.model_path.name} is not a 28x28 -> 10 classifier")
        self._loaded_pid = os.getpid()
        self.predict(np.zeros((1, 28, 28), dtype=np.float32))  # warm-up: first call is slow

    def describe(self) -> dict[str, Any]:
        """Facts read from the loaded model itself (not from its card): what /model shows."""
        if self.input_spec is None or self.output_spec is None:
            raise ModelNotLoaded("call load() first")
        return {
            "name": self.card.get("name", MODEL_NAME),
            "version": self.version,
            "model_version": self.full_version,
            "sha256": self.sha256,
            "input_shape": list(self.input_spec.shape),
            "input_dtype": self.input_spec.dtype.name,
            "quantization": {
                "input": {"scale": self.input_spec.scale, "zero_point": self.input_spec.zero_point},
                "output": {
                    "scale": self.output_spec.scale,
                    "zero_point": self.output_spec.zero_point,
                },
            },
            "size_bytes": len(self._content),
            "labels": list(range(NUM_CLASSES)),
            "metrics": self.card.get("metrics", {}),
            "created": self.card.get("created", ""),
            "card_matches_file": bool(self.card) and not self.card_mismatch(),
        }

    def card_mismatch(self) -> bool:
        """True when the card names another file than the one loaded (a stale or wrong card)."""
        return bool(self.card) and self.card.get("sha256") != self.sha256

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n, 10), for images of shape (n, 28, 28) in [0, 1], ink = 1.

        The whole batch goes through the interpreter in one `invoke()`.
        """
        if not self.ready or self.input_spec is None or self.output_spec is None:
            raise ModelNotLoaded("call load() first")
        count = images.shape[0]
        bucket = next((b for b in BATCH_BUCKETS if b >= count), count)
        interpreter = self._interpreter(bucket)
        batch = np.zeros((bucket, *self.input_spec.shape[1:]), dtype=np.float32)
        batch[:count] = images.reshape(count, *self.input_spec.shape[1:])
        interpreter.set_tensor(self.input_spec.index, self._quantize(batch))
        interpreter.invoke()
        logits = interpreter.get_tensor(self.output_spec.index)[:count]
        return softmax(self._dequantize(np.asarray(logits)))

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        spec = self.input_spec
        assert spec is not None
        if not spec.quantized:
            return batch.astype(spec.dtype)
        info = np.iinfo(spec.dtype)
        values = np.round(batch / spec.scale) + spec.zero_point
        return np.clip(values, info.min, info.max).astype(spec.dtype)

    def _dequantize(self, values: np.ndarray) -> np.ndarray:
        spec = self.output_spec
        assert spec is not None
        if not spec.quantized:
            return values.astype(np.float64)
        return (values.astype(np.float64) - spec.zero_point) * spec.scale

    def _interpreter(self, batch_size: int) -> Interpreter:
        """This thread's interpreter for a batch size, created on first use."""
        pool: dict[int, Interpreter] | None = getattr(self._local, "pool", None)
        if pool is None or getattr(self._local, "pid", None) != os.getpid():
            # A new thread, or a forked child that inherited its parent's thread state.
            pool = {}
            self._local.pool = pool
            self._local.pid = os.getpid()
        interpreter = pool.get(batch_size)
        if interpreter is None:
            interpreter = self._new_interpreter(batch_size)
            pool[batch_size] = interpreter
        return interpreter

    def _new_interpreter(self, batch_size: int) -> Interpreter:
        interpreter = Interpreter(model_content=self._content, num_threads=self.num_threads)
        if batch_size != 1:
            details = interpreter.get_input_details()[0]
            shape = [batch_size, *[int(d) for d in details["shape"][1:]]]
            interpreter.resize_tensor_input(details["index"], shape)
        interpreter.allocate_tensors()
        return interpreter


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities
