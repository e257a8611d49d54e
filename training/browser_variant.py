"""Write the browser variant of an installed version: the same int8 graph, float32 at its edges.

The page runs models with LiteRT.js (`@litertjs/core` 2.5.3), whose released build refuses
int8 model inputs and outputs (`Element type INT8 is not supported`). The variant is the
version's own `.tflite`, tensor for tensor and weight for weight, with two operators added:
a QUANTIZE in front (float32 [0, 1] in, the int8 input the graph always had out, with the
same scale and zero point) and a DEQUANTIZE behind (the int8 logits out as float32). Nothing
is retrained or re-calibrated, so the browser computes what the server computes; the page
only adds the softmax, as `mnist_api.inference.model.DigitModel.predict` does.

    python -m training.browser_variant models/fe5e4f4d480b models/e983729cbdc9

writes `mnist_cnn_browser.tflite` next to each version's file, checks it against the int8
model on the validation images (same digit, same logits), and lists it in the model card
(`"browser": {"file", "sha256", "size_bytes", ...}`). `quantize_model.py` calls
`write_browser_variant` for every new version. Needs TensorFlow (requirements-train.txt)
for the `.tflite` schema; the service only serves the file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from mnist_api.inference.model import DigitModel, softmax
from training.evaluate import printed_suite

TFLITE_FILE = "mnist_cnn_int8.tflite"
BROWSER_FILE = "mnist_cnn_browser.tflite"
CARD_FILE = "model_card.json"
# What the page runs it with; the card says so, so a reader knows which runtime was checked.
BROWSER_RUNTIME = "@litertjs/core 2.5.3 (WebAssembly, CPU)"
# Operator versions for float32 <-> int8 (TFLite's op versioning: 2 is the int8 kernel).
QUANTIZE_VERSION = 2
DEQUANTIZE_VERSION = 2
MAX_PROBABILITY_GAP = 0.02


def _opcode_index(model: Any, builtin: int, version: int) -> int:
    """Index of the model's operator code for `builtin`, added if the model has none."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            code.version = max(code.version, version)
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(
        builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
    )
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _float_twin(model: Any, subgraph: Any, index: int, suffix: str) -> int:
    """A float32 tensor shaped like tensor `index`, unquantized, with its own empty buffer."""
    source = subgraph.tensors[index]
    tensor = schema.TensorT()
    tensor.shape = np.array(source.shape, dtype=np.int32)
    if source.shapeSignature is not None:
        tensor.shapeSignature = np.array(source.shapeSignature, dtype=np.int32)
    tensor.type = schema.TensorType.FLOAT32
    tensor.name = (source.name.decode() if isinstance(source.name, bytes) else source.name) + suffix
    model.buffers.append(schema.BufferT())
    tensor.buffer = len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def float_io_variant(int8_model: bytes) -> bytes:
    """The int8 `.tflite` with a float32 input and output around the unchanged int8 graph."""
    model = copy.deepcopy(flatbuffer_utils.read_model_from_bytearray(bytearray(int8_model)))
    if len(model.subgraphs) != 1:
        raise ValueError("expected a single-subgraph model")
    subgraph = model.subgraphs[0]
    [int8_in] = subgraph.inputs
    [int8_out] = subgraph.outputs
    for index in (int8_in, int8_out):
        if subgraph.tensors[index].type != schema.TensorType.INT8:
            raise ValueError("expected int8 model input and output")
    float_in = _float_twin(model, subgraph, int8_in, "_float")
    float_out = _float_twin(model, subgraph, int8_out, "_float")

    quantize = schema.OperatorT()
    quantize.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.QUANTIZE, QUANTIZE_VERSION)
    quantize.inputs = np.array([float_in], dtype=np.int32)
    quantize.outputs = np.array([int8_in], dtype=np.int32)
    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = _opcode_index(
        model, schema.BuiltinOperator.DEQUANTIZE, DEQUANTIZE_VERSION
    )
    dequantize.inputs = np.array([int8_out], dtype=np.int32)
    dequantize.outputs = np.array([float_out], dtype=np.int32)
    subgraph.operators = [quantize, *subgraph.operators, dequantize]
    subgraph.inputs = np.array([float_in], dtype=np.int32)
    subgraph.outputs = np.array([float_out], dtype=np.int32)
    # The serving signature names tensors by index: point it at the new edges.
    for signature in model.signatureDefs or []:
        for entry in signature.inputs or []:
            if entry.tensorIndex == int8_in:
                entry.tensorIndex = float_in
        for entry in signature.outputs or []:
            if entry.tensorIndex == int8_out:
                entry.tensorIndex = float_out
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def check_variant(version_dir: Path, images: np.ndarray) -> float:
    """Run both files on `images`; raise unless they agree. Returns the largest probability gap.

    The browser variant's float output is the int8 model's dequantized logits, computed by
    the same kernels, so the two agree to float32 rounding, except where an input pixel
    falls exactly halfway between two int8 steps: the QUANTIZE op rounds it away from zero
    where the server (NumPy) rounds to even, which can move a logit by one step. Hence the
    tolerance (the page's own parity test holds the same bar: 99.5% and 0.02).
    """
    server = DigitModel(version_dir / TFLITE_FILE)
    server.load()
    interpreter = Interpreter(model_path=str(version_dir / BROWSER_FILE), num_threads=1)
    interpreter.allocate_tensors()
    [inp] = interpreter.get_input_details()
    [out] = interpreter.get_output_details()
    if inp["dtype"] != np.float32 or out["dtype"] != np.float32:
        raise ValueError("the browser variant must take and give float32")
    gap, disagree = 0.0, 0
    for image in images:
        interpreter.set_tensor(inp["index"], image.reshape(inp["shape"]).astype(np.float32))
        interpreter.invoke()
        probabilities = softmax(interpreter.get_tensor(out["index"]).astype(np.float64))[0]
        expected = server.predict(image[None])[0]
        disagree += int(np.argmax(probabilities) != np.argmax(expected))
        gap = max(gap, float(np.abs(probabilities - expected).max()))
    if disagree > 0.005 * len(images) or gap > MAX_PROBABILITY_GAP:
        raise ValueError(
            f"{version_dir.name}: the browser variant disagrees with the server "
            f"({disagree} of {len(images)} digits, probability gap {gap:.4f})"
        )
    return gap


def write_browser_variant(version_dir: Path) -> dict[str, Any]:
    """Write the variant next to the version's `.tflite` and return its card entry."""
    content = float_io_variant((version_dir / TFLITE_FILE).read_bytes())
    (version_dir / BROWSER_FILE).write_bytes(content)
    return {
        "file": BROWSER_FILE,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size_bytes": len(content),
        "input_dtype": "float32",
        "output_dtype": "float32",
        "output": "logits",
        "runtime": BROWSER_RUNTIME,
        "built_from": TFLITE_FILE,
        "note": "the same int8 graph with a QUANTIZE in front and a DEQUANTIZE behind",
    }


def add_to_card(version_dir: Path, entry: dict[str, Any]) -> None:
    """Record the variant in the version's model card (key `browser`)."""
    card_path = version_dir / CARD_FILE
    card = json.loads(card_path.read_text())
    card["browser"] = entry
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def _sample_images(count: int) -> np.ndarray:
    """MNIST-shaped inputs to compare the two files on: the printed-digit suite's images."""
    return np.asarray(printed_suite().images[:count], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    """Build, check and record the browser variant of each version folder given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", type=Path, help="models/<version> folders")
    parser.add_argument("--check-images", type=int, default=500)
    args = parser.parse_args(argv)
    images = _sample_images(args.check_images)
    for version_dir in args.versions:
        entry = write_browser_variant(version_dir)
        gap = check_variant(version_dir, images)
        add_to_card(version_dir, entry)
        size = entry["size_bytes"]
        print(f"{version_dir}: {BROWSER_FILE} {size} bytes, probability gap {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
