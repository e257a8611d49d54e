"""The Open Inference Protocol codec alone: requests in, checked inputs out, answers built."""

from __future__ import annotations

import base64
import json
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_api.errors import MissingFile, ServiceError, TooManyFiles
from mnist_api.imaging.budget import DecodeBudget
from mnist_api.protocol import codec as protocol
from mnist_api.protocol.codec import HEADER_LENGTH, Limits, build_response, parse_request

LIMITS = Limits(max_images=8, max_pixels_batch=16)


def binary_body(document: dict[str, Any], *tensors: bytes) -> tuple[bytes, str]:
    """A JSON header followed by the tensors' bytes, and the header length to send."""
    header = json.dumps(document).encode()
    return header + b"".join(tensors), str(len(header))


def pixels_request(values: np.ndarray, datatype: str, binary: bool) -> tuple[bytes, str | None]:
    tensor: dict[str, Any] = {"name": "pixels", "datatype": datatype, "shape": list(values.shape)}
    if not binary:
        tensor["data"] = values.ravel().tolist()
        return json.dumps({"inputs": [tensor]}).encode(), None
    raw = values.astype("<u1" if datatype == "UINT8" else "<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    return binary_body({"inputs": [tensor]}, raw)


def bytes_elements(*items: bytes) -> bytes:
    """BYTES binary data: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def refused(body: bytes, header_length: str | None = None) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        parse_request(body, header_length, LIMITS)
    return caught.value


# --- inputs ---


def test_image_elements_from_base64_json() -> None:
    files = [b"\x89PNG first", b"GIF89a second"]
    document = {
        "id": "req-1",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ],
    }
    parsed = parse_request(json.dumps(document).encode(), None, LIMITS)
    assert parsed.images == tuple(files) and parsed.pixels is None
    assert parsed.id == "req-1" and parsed.batch_size == 2
    # No outputs named: both, as JSON.
    assert [(o.name, o.binary, o.classification) for o in parsed.outputs] == [
        ("probabilities", False, 0),
        ("digit", False, 0),
    ]


def test_image_elements_from_binary_data() -> None:
    files = [b"\xff\xd8 jpeg", b"", b"BM bmp"][::2]
    raw = bytes_elements(*files)
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"binary_data_size": len(raw)},
    }
    body, length = binary_body({"inputs": [tensor]}, raw)
    assert parse_request(body, length, LIMITS).images == tuple(files)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("trailing_one", [False, True])
def test_pixels_in_both_types_encodings_and_shapes(
    datatype: str, binary: bool, trailing_one: bool
) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    values: np.ndarray = grey if datatype == "UINT8" else grey.astype(np.float32) / 255
    if trailing_one:
        values = values[..., np.newaxis]
    body, length = pixels_request(values, datatype, binary)
    pixels = parse_request(body, length, LIMITS).pixels
    assert pixels is not None and pixels.shape == (3, 28, 28) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, grey.astype(np.float32) / 255, atol=1e-6)


def test_nested_json_data_is_accepted_as_its_natural_shape() -> None:
    grey = (np.arange(784) % 256).astype(np.uint8).reshape(1, 28, 28)
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": grey.tolist()}
    pixels = parse_request(json.dumps({"inputs": [tensor]}).encode(), None, LIMITS).pixels
    assert pixels is not None
    np.testing.assert_allclose(pixels[0], grey[0] / 255, atol=1e-6)


# --- refusals: each a 400 with a sentence ---


def image_json(count: int, data: Any = None, **extra: Any) -> bytes:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [count], **extra}
    tensor["data"] = data if data is not None else ["aGVsbG8="] * count
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("body", "header_length", "words"),
    [
        (b"", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe\x00garbage", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "one input"),
        (b'{"inputs": {}}', None, "one input"),
        (b'{"id": 5, "inputs": []}', None, "'id' must be a string"),
        (image_json(1), "abc", "whole number"),
        (image_json(1), "-3", "whole number"),
        (image_json(1), "0", "says 0 bytes"),
        (image_json(1), "99999", "says 99999 bytes"),
        (image_json(1), "1" * 40, "whole number"),
        (image_json(1)[:-5], None, "not valid JSON"),
        (image_json(2, ["aGVsbG8="]), None, "shape [2] but 1 elements"),
        (image_json(1, ["not base64!"]), None, "not valid base64"),
        (image_json(1, [5]), None, "base64 strings"),
        (image_json(1, "aGVsbG8="), None, "base64 strings"),
        (image_json(0, []), None, "batch of 0"),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}).encode(),
            None,
            "neither 'data' nor",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "photo", "datatype": "BYTES", "shape": [1], "data": []}]}
            ).encode(),
            None,
            "Unknown input 'photo'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "STRING", "shape": [1], "data": []}]}
            ).encode(),
            None,
            "Unknown datatype 'STRING'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "INT32", "shape": [1], "data": [1]}]}
            ).encode(),
            None,
            "not INT32",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": []}]}
            ).encode(),
            None,
            "shape [N]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [True], "data": []}]}
            ).encode(),
            None,
            "whole numbers",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1], "data": []}]}
            ).encode(),
            None,
            "whole numbers",
        ),
    ],
)
def test_malformed_requests_are_refused_with_a_sentence(
    body: bytes, header_length: str | None, words: str
) -> None:
    error = refused(body, header_length)
    assert error.status == 400 and error.code == "invalid_inference_request"
    assert words in error.message, error.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 100_000, "json_too_large"),  # more values than a full batch
        (b"[" * 5000, "json_too_deep"),  # not JSON, but deep enough to crash a parser
        (b"[" * 40 + b"]" * 40, "json_too_deep"),
        (
            b'{"inputs": [{"name": "pixels", "parameters": '
            + b'{"a": ' * 33
            + b"1"
            + b"}" * 34
            + b"]}",
            "json_too_deep",
        ),
        (json.dumps({"inputs": [], "id": [0] * LIMITS.max_values}).encode(), "json_too_large"),
    ],
)
def test_too_deep_or_too_large_json_is_refused_before_parsing(body: bytes, code: str) -> None:
    error = refused(body)
    assert error.status == 400 and error.code == code, error.message


def test_a_body_over_the_decode_budget_is_refused_and_one_within_it_reserves_its_cost() -> None:
    values = np.full((16, 28, 28), 0.123456, np.float32)
    body, _ = pixels_request(values, "FP32", binary=False)
    cost = protocol.parse_cost(protocol.json_limits.measure(body, LIMITS.max_values), 0)
    small = Limits(8, 16, DecodeBudget(cost - 1, 0))
    with pytest.raises(ServiceError) as caught:
        parse_request(body, None, small)
    assert caught.value.code == "json_too_large" and "MiB" in caught.value.message
    budget = DecodeBudget(cost, 0)
    with budget.reserve(1), pytest.raises(ServiceError) as busy:
        parse_request(body, None, Limits(8, 16, budget))
    assert busy.value.code == "server_busy"  # another parse holds part of the budget
    pixels = parse_request(body, None, Limits(8, 16, budget)).pixels
    assert pixels is not None and pixels.shape == (16, 28, 28) and budget.in_use == 0


def pixels_json(values: list[Any], datatype: str = "FP32", count: int = 1) -> bytes:
    tensor = {"name": "pixels", "datatype": datatype, "shape": [count, 28, 28], "data": values}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (pixels_json([float("nan")] + [0.0] * 783), "no NaN or inf"),
        (pixels_json([float("inf")] + [0.0] * 783), "no NaN or inf"),
        (pixels_json([1e300] + [0.0] * 783), "from 0 to 1"),
        (pixels_json([1.5] + [0.0] * 783), "from 0 to 1"),
        (pixels_json([-0.1] + [0.0] * 783), "from 0 to 1"),
        (pixels_json([256] + [0] * 783, "UINT8"), "0 to 255"),
        (pixels_json([-1] + [0] * 783, "UINT8"), "0 to 255"),
        (pixels_json([0.5] + [0] * 783, "UINT8"), "whole numbers"),
        (pixels_json([10**30] + [0] * 783, "UINT8"), "0 to 255"),
        (pixels_json(["a"] + [0] * 783, "UINT8"), "whole numbers"),
        (pixels_json([True] * 784), "numbers from 0 to 1"),
        (pixels_json([0.0] * 783), "needs 784 values, not 783"),
        (pixels_json([[0.0] * 28] * 27), "needs 784 values"),
        (pixels_json([[0.0] * 28, [0.0]]), "regular array"),
        (pixels_json([0.0] * 784, "FP64"), "not FP64"),
        (pixels_json([0.0] * 784, count=0), "batch of 0"),
    ],
)
def test_bad_pixels_are_refused(body: bytes, words: str) -> None:
    error = refused(body)
    assert error.code == "invalid_inference_request" and words in error.message, error.message


def test_binary_sizes_that_do_not_add_up_are_refused() -> None:
    raw = bytes_elements(b"abc", b"defg")
    tensor = {"name": "image", "datatype": "BYTES", "shape": [2]}
    cases = {
        "larger than the body": ({**tensor, "parameters": {"binary_data_size": 999}}, raw),
        "smaller than the body": ({**tensor, "parameters": {"binary_data_size": 3}}, raw),
        "no size, yet bytes follow": (tensor, raw),
        "an element longer than what is left": (
            {**tensor, "parameters": {"binary_data_size": 9}},
            struct.pack("<I", 100) + b"abcde",
        ),
        "a cut length prefix": (
            {**tensor, "parameters": {"binary_data_size": len(raw) + 2}},
            raw + b"\x01\x00",
        ),
        "more elements than the shape": (
            {**tensor, "shape": [1], "parameters": {"binary_data_size": len(raw)}},
            raw,
        ),
        "fewer elements than the shape": (
            {**tensor, "shape": [3], "parameters": {"binary_data_size": len(raw)}},
            raw,
        ),
        "both data and a size": (
            {**tensor, "data": ["YQ=="], "parameters": {"binary_data_size": len(raw)}},
            raw,
        ),
        "a size that is not a number": (
            {**tensor, "parameters": {"binary_data_size": "7"}},
            raw,
        ),
    }
    for case, (document, tail) in cases.items():
        body, length = binary_body({"inputs": [document]}, tail)
        error = refused(body, length)
        assert error.code == "invalid_inference_request", case


def test_pixel_bytes_must_match_the_shape() -> None:
    raw = np.zeros((2, 28, 28), np.uint8).tobytes()
    tensor = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [3, 28, 28],
        "parameters": {"binary_data_size": len(raw)},
    }
    body, length = binary_body({"inputs": [tensor]}, raw)
    assert "needs 2352 bytes" in refused(body, length).message
    nan = np.full((1, 28, 28), np.nan, np.float32).tobytes()
    tensor = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [1, 28, 28],
        "parameters": {"binary_data_size": len(nan)},
    }
    body, length = binary_body({"inputs": [tensor]}, nan)
    assert "no NaN" in refused(body, length).message


def test_batches_over_the_caps_are_too_many_files() -> None:
    assert isinstance(refused(image_json(9)), TooManyFiles)
    huge = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [10**12, 28, 28]}]}
    ).encode()
    error = refused(huge)  # refused from the shape alone: nothing of that size is allocated
    assert isinstance(error, TooManyFiles) and "at most 16" in error.message


def test_an_empty_image_element_is_a_missing_file() -> None:
    assert isinstance(refused(image_json(1, [""])), MissingFile)


def test_two_inputs_are_refused() -> None:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}
    assert "the request has 2" in refused(json.dumps({"inputs": [tensor, tensor]}).encode()).message


@pytest.mark.parametrize(
    ("outputs", "parameters", "words"),
    [
        ([{"name": "logits"}], {}, "Unknown output 'logits'"),
        ([{"name": "digit"}, {"name": "digit"}], {}, "requested twice"),
        ([{"name": "digit", "parameters": {"classification": 2}}], {}, "'probabilities' only"),
        ([{"name": "digit", "parameters": {"binary_data": "yes"}}], {}, "true or false"),
        ([{"name": "probabilities", "parameters": {"classification": -1}}], {}, "at least 0"),
        ([{"name": "probabilities", "parameters": 3}], {}, "JSON object"),
        ("digit", {}, "'outputs' must be a list"),
        ([5], {}, "with a 'name'"),
        (None, {"binary_data_output": 1}, "true or false"),
        (None, "x", "JSON object"),
    ],
)
def test_bad_output_requests_are_refused(outputs: Any, parameters: Any, words: str) -> None:
    document = json.loads(image_json(1))
    document["parameters"] = parameters
    if outputs is not None:
        document["outputs"] = outputs
    error = refused(json.dumps(document).encode())
    assert words in error.message, error.message


# --- answers ---

PROBABILITIES = np.array(
    [
        [0.01, 0.02, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.15],
    ]
)
DIGITS = np.array([2, 9])


def answer(document: dict[str, Any]) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    document.setdefault(
        "inputs", [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["YQ=="] * 2}]
    )
    parsed = parse_request(json.dumps(document).encode(), None, LIMITS)
    body, headers = build_response(parsed, PROBABILITIES, DIGITS, model_version="fe5e4f4d480b")
    length = int(headers.get(HEADER_LENGTH, len(body)))
    return json.loads(body[:length]), body[length:], headers


def test_json_answer_has_both_outputs_the_id_and_the_version() -> None:
    document, tail, headers = answer({"id": "abc"})
    assert tail == b"" and headers == {"Content-Type": "application/json"}
    assert document["model_name"] == "mnist" and document["model_version"] == "fe5e4f4d480b"
    assert document["id"] == "abc"
    probabilities, digit = document["outputs"]
    assert probabilities == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [2, 10],
        "data": PROBABILITIES.ravel().tolist(),
    }
    assert digit == {"name": "digit", "datatype": "INT64", "shape": [2], "data": [2, 9]}


def test_binary_answer_follows_the_json_with_its_sizes() -> None:
    document, tail, headers = answer({"parameters": {"binary_data_output": True}})
    assert headers["Content-Type"] == "application/octet-stream"
    probabilities, digit = document["outputs"]
    assert probabilities["parameters"] == {"binary_data_size": 80} and "data" not in probabilities
    assert digit["parameters"] == {"binary_data_size": 16}
    np.testing.assert_allclose(np.frombuffer(tail[:80], "<f4").reshape(2, 10), PROBABILITIES)
    assert np.frombuffer(tail[80:], "<i8").tolist() == [2, 9]


def test_only_the_requested_outputs_in_their_order_and_encoding() -> None:
    document, tail, _ = answer(
        {
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "digit", "parameters": {"binary_data": False}},
                {"name": "probabilities", "parameters": {"classification": 3}},
            ],
        }
    )
    digit, classes = document["outputs"]
    assert digit["data"] == [2, 9]
    assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 3]
    size = classes["parameters"]["binary_data_size"]
    assert size == len(tail)
    strings, offset = [], 0
    while offset < len(tail):
        (length,) = struct.unpack_from("<I", tail, offset)
        strings.append(tail[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    # Best first; equal scores in index order.
    first = ["0.900000:2", "0.020000:1", "0.010000:0"]
    second = ["0.150000:9", "0.100000:0", "0.100000:1"]
    assert strings == [*first, *second]


def test_classification_in_json_and_more_classes_than_there_are() -> None:
    document, _, _ = answer(
        {"outputs": [{"name": "probabilities", "parameters": {"classification": 50}}]}
    )
    (classes,) = document["outputs"]
    assert classes["shape"] == [2, 10] and classes["data"][0] == "0.900000:2"


def test_request_level_classification_applies_to_probabilities() -> None:
    document, _, _ = answer({"parameters": {"classification": 1}})
    assert document["outputs"][0]["data"] == ["0.900000:2", "0.150000:9"]
    assert document["outputs"][1]["data"] == [2, 9]


# --- fuzzing: never anything but a ServiceError ---


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=512), header=st.one_of(st.none(), st.text(max_size=8)))
def test_random_bodies_raise_only_contract_errors(body: bytes, header: str | None) -> None:
    try:
        parse_request(body, header, LIMITS)
    except ServiceError as error:
        assert error.status == 400
        assert error.code in {"invalid_inference_request", "too_many_files", "missing_file"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["image", "pixels", "x"]),
    datatype=st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", "?"]),
    shape=JSON_VALUES,
    data=JSON_VALUES,
    parameters=JSON_VALUES,
    outputs=JSON_VALUES,
)
def test_random_documents_raise_only_contract_errors(
    name: str, datatype: str, shape: Any, data: Any, parameters: Any, outputs: Any
) -> None:
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    document = {"inputs": [tensor], "parameters": parameters, "outputs": outputs}
    try:
        parsed = parse_request(json.dumps(document).encode(), None, LIMITS)
    except ServiceError as error:
        assert error.status == 400
        return
    assert parsed.batch_size >= 1


def test_module_names_what_the_contract_names() -> None:
    assert protocol.MODEL_NAME == "mnist"
    assert protocol.OUTPUTS == ("probabilities", "digit")


# --- what parsing costs ---


def test_floats_ints_and_floats_elsewhere_keep_their_places() -> None:
    """Float literals are parsed into a compact array and put back in document order."""
    grey = (np.arange(2 * 784) % 7 / 6).reshape(2, 28, 28)  # 0 and 1 are sent as ints
    data = [int(v) if v in (0.0, 1.0) else float(v) for v in grey.ravel()]
    document = {
        "parameters": {"note": 0.25, "more": [1.5, 2.5]},  # floats before the data
        "inputs": [
            {
                "parameters": {"x": 0.75},
                "name": "pixels",
                "datatype": "FP32",
                "shape": [2, 28, 28],
                "data": data,
            }
        ],
        "outputs": [{"name": "digit", "parameters": {"y": 3.5}}],  # and after it
    }
    pixels = parse_request(json.dumps(document).encode(), None, LIMITS).pixels
    assert pixels is not None
    np.testing.assert_allclose(pixels, grey.astype(np.float32), atol=1e-7)


def test_duplicate_keys_and_nan_literals_are_refused() -> None:
    assert "same key twice" in refused(b'{"inputs": [], "inputs": []}').message
    assert "no NaN or inf" in refused(pixels_json([0, 0, 0]).replace(b"0]", b"-Infinity]")).message


def costly_bodies() -> dict[str, tuple[bytes, str | None]]:
    """Bodies of every shape a client may send, at the size of the test limits."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    fp32 = rng.random((16, 28, 28), dtype=np.float32)
    images = [bytes(rng.integers(0, 256, 3000, dtype=np.uint8)) for _ in range(8)]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [8]}
    raw = bytes_elements(*images)
    return {
        "fp32 flat": pixels_request(fp32, "FP32", binary=False),
        "fp32 nested [N,28,28,1]": (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "FP32",
                            "shape": [16, 28, 28, 1],
                            "data": fp32[..., None].tolist(),
                        }
                    ]
                }
            ).encode(),
            None,
        ),
        "uint8 nested": (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [16, 28, 28],
                            "data": grey.tolist(),
                        }
                    ]
                }
            ).encode(),
            None,
        ),
        "uint8 binary": pixels_request(grey, "UINT8", binary=True),
        "fp32 binary": pixels_request(fp32, "FP32", binary=True),
        "base64 images": (
            json.dumps(
                {
                    "id": "é" * 10,
                    "inputs": [{**tensor, "data": [base64.b64encode(i).decode() for i in images]}],
                }
            ).encode(),
            None,
        ),
        "binary images": binary_body(
            {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}, raw
        ),
        "big ints (refused)": (pixels_json([1000] * 784, "UINT8"), None),
        "many strings (refused)": (pixels_json(["x" * 20] * 784, "UINT8"), None),
    }


def parse_peak(header: bytes, tail: Any) -> int:
    """Bytes allocated at the peak of one parse, over what was allocated before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        try:
            result = protocol._parse(header, tail, LIMITS)
        except ServiceError:
            result = None
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    del result
    return peak


@pytest.mark.parametrize("name", list(costly_bodies()))
def test_the_cost_estimate_covers_what_parsing_really_holds(name: str) -> None:
    """What is reserved covers the peak of what is parsed under the reservation (the
    measure before it holds at most one 64 KiB chunk, or a short body's copy)."""
    body, length = costly_bodies()[name]
    header, tail = protocol.split_body(body, length)
    estimate = protocol.parse_cost(
        protocol.json_limits.measure(header, LIMITS.max_values), len(tail), length is not None
    )
    if length is not None:  # the JSON part's copy was made by split_body
        header = bytes(header)
    # tracemalloc counts every thread of the process: in a full run, threads that earlier
    # tests left (log sinks, clients) can allocate during the parse (a CI run measured
    # +230 KB once). The parse's own peak is the same every time and others only add to it,
    # so the smallest of three measures is the parse's.
    peak = min(parse_peak(header, tail) for _ in range(3))
    print(f"{name}: body {len(body)}, estimate {estimate}, peak {peak}")
    assert peak <= estimate, (name, peak, estimate)
