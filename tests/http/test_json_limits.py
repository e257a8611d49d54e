"""JSON measured on its bytes: the bounds hold for any document, both ways of counting agree."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_api.errors import ServiceError
from mnist_api.http import json_limits

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='[]{},:."\\ é\n', max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=40,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    return 0


def count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(count(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(count(item) for item in value.values())
    return 1


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, pad=st.booleans())
def test_the_measure_bounds_every_document(value: Any, pad: bool) -> None:
    text = json.dumps(value).encode()
    if pad:  # past the short-text path: the strings are counted around instead
        text = b" " * (json_limits._CHUNK + 1) + text
    size = json_limits.measure(text, max_values=10**6, max_depth=10**3)
    assert size.values >= count(value)
    assert size.containers == depth_containers(value)
    assert size.size == len(text)


def depth_containers(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(depth_containers(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(depth_containers(item) for item in value.values())
    return 0


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES, limit=st.integers(1, 6), pad=st.booleans())
def test_depth_is_refused_exactly_past_the_limit(value: Any, limit: int, pad: bool) -> None:
    text = json.dumps(value).encode()
    if pad:
        text = b" " * (json_limits._CHUNK + 1) + text
    try:
        json_limits.measure(text, max_values=10**6, max_depth=limit)
    except ServiceError as error:
        assert error.code == "json_too_deep" and depth(value) > limit
    else:
        assert depth(value) <= limit


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b"[" * 33 + b"]" * 33, "json_too_deep"),
        (b'["' + b"[" * 100 + b'"]', None),  # brackets inside a string do not nest
        (b'["\\"' + b"[" * 100 + b'"]', None),  # nor after an escaped quote
        (b"[" + b"0," * 100 + b"0]", "json_too_large"),
        (b'["a", "b", "c", "d", "e", "f", "g"]', None),
        (b'"' * 400, "json_too_large"),
    ],
)
def test_limits_on_chosen_texts(text: bytes, code: str | None) -> None:
    try:
        json_limits.loads(text, max_values=100)
    except ServiceError as error:
        assert error.code == code
    else:
        assert code is None


def test_the_parsers_recursion_is_a_400() -> None:
    with pytest.raises(ServiceError) as caught:
        json_limits.parse(b"[" * 100_000)
    assert caught.value.code == "json_too_deep"


@pytest.mark.parametrize("pad", [0, json_limits._CHUNK])
def test_depth_with_many_brackets_summed_at_once(pad: int) -> None:
    """Hundreds of brackets go through NumPy's running sum, across chunk borders too."""
    shallow = b" " * pad + json.dumps([[[0]] * 400] * 3).encode()
    assert json_limits.measure(shallow, 10**6, max_depth=3).containers == 1 + 3 + 1200
    with pytest.raises(ServiceError) as caught:
        json_limits.measure(shallow, 10**6, max_depth=2)
    assert caught.value.code == "json_too_deep"
    deep = b" " * pad + b"[" + b"[0]," * 400 + b"[" * 40 + b"]" * 40 + b"]"
    with pytest.raises(ServiceError) as caught:
        json_limits.measure(deep, 10**6, max_depth=32)
    assert caught.value.code == "json_too_deep"
