"""JSON bodies measured before they are parsed: how deep, how many values, what parsing costs.

`measure()` looks at the raw bytes with a few C-speed passes (one regular expression finds
the strings, then commas, brackets and colons are counted outside them) and refuses a body
nested deeper than `max_depth` (`JsonTooDeep`) or holding more than `max_values` values
(`JsonTooLarge`) before `json.loads` builds a single object; `loads()` then parses what
passed, and turns the parser's own `RecursionError` into `JsonTooDeep` as well. The counts
are upper bounds, so a body is never measured smaller than it parses, and measuring holds
at most a chunk of 64 KiB besides the body (a short body: one copy of it). Pure functions:
the app's JSON provider and the Open Inference Protocol codec both use them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api.errors import JsonTooDeep, JsonTooLarge

# Deeper than any body this service takes (a V2 infer body nests 7 levels): a client that
# sends more is told so, never met with the parser's recursion limit.
MAX_DEPTH = 32
# Values in a JSON body on a route other than V2 infer (a deployment change holds about 10).
MAX_VALUES = 10_000

# A JSON string, escapes included; possessive, so it never backtracks (linear time).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
# Each bracket's step in nesting depth, looked up for a chunk at once.
_STEPS = np.zeros(256, dtype=np.int64)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1
_OPENING = frozenset(b"[{")
_FEW = 256
_CHUNK = 1 << 16
# What `measure` counts outside strings: separators, containers, members, float signs.
_COUNTED = (b",", b"[", b"]", b"{", b"}", b":", b".", b"e", b"E")


@dataclass(frozen=True)
class JsonSize:
    """Upper bounds on what a JSON text holds, read from its bytes without parsing it."""

    size: int  # bytes
    ascii: bool  # all ASCII: Python's str of it takes one byte per character
    values: int  # values of any kind (1 + commas + containers)
    containers: int  # arrays and objects
    members: int  # object members (key: value)
    strings: int
    string_bytes: int  # bytes inside strings (keys included)
    floats: int  # numbers with a fraction or an exponent


def measure(text: bytes, max_values: int, max_depth: int = MAX_DEPTH) -> JsonSize:
    """Bounds of `text`; `JsonTooLarge` over `max_values` values, `JsonTooDeep` past `max_depth`.

    Malformed JSON is not judged here (the parser refuses it). A short text is measured on
    one copy with its strings blanked out; a long one is counted around each string.
    """
    if text.count(b'"') > 2 * max_values:
        raise JsonTooLarge(f"The JSON body holds more than {max_values} strings.")
    if len(text) <= _CHUNK:
        skeleton, strings = _STRING.subn(b'""', text)
        counts = {char: skeleton.count(char) for char in _COUNTED}
        spans = [(0, 0)] * strings
        string_bytes = len(text) - len(skeleton) + 2 * strings
        outside = [skeleton]
    else:
        counts = dict.fromkeys(_COUNTED, 0)
        spans = [found.span() for found in _STRING.finditer(text)]
        for start, end in spans:
            for char in _COUNTED:
                counts[char] -= text.count(char, start, end)
        for char in _COUNTED:
            counts[char] += text.count(char)
        string_bytes = sum(end - start for start, end in spans)
        outside = _between(text, spans)
    containers = counts[b"["] + counts[b"{"]
    values = 1 + counts[b","] + containers
    if values > max_values:
        raise JsonTooLarge(
            f"The JSON body holds up to {values} values; this route takes at most {max_values}."
        )
    _check_depth(outside, max_depth)
    return JsonSize(
        size=len(text),
        ascii=text.isascii(),
        values=values,
        containers=containers,
        members=counts[b":"],
        strings=len(spans),
        string_bytes=string_bytes,
        floats=counts[b"."] + counts[b"e"] + counts[b"E"],
    )


def _between(text: bytes, spans: list[tuple[int, int]]) -> Any:
    """The text outside its strings, as chunks of at most 64 KiB (copied one at a time)."""
    view = memoryview(text)
    position = 0
    for start, end in [*spans, (len(text), len(text))]:
        for chunk in range(position, start, _CHUNK):
            yield bytes(view[chunk : min(chunk + _CHUNK, start)])
        position = end


def _check_depth(pieces: Any, max_depth: int) -> None:
    """`JsonTooDeep` if the brackets of the text outside strings (`pieces`, in order) ever
    stand open more than `max_depth` deep; a chunk's brackets are summed at once."""
    level = 0
    for piece in pieces:
        brackets = piece.translate(None, _NOT_BRACKETS)
        if len(brackets) <= _FEW:  # a small body's few brackets: NumPy would cost more
            for byte in brackets:
                level += 1 if byte in _OPENING else -1
                if level > max_depth:
                    raise JsonTooDeep(f"The JSON body is nested deeper than {max_depth} levels.")
            continue
        levels = np.cumsum(_STEPS[np.frombuffer(brackets, dtype=np.uint8)]) + level
        if int(levels.max()) > max_depth:
            raise JsonTooDeep(f"The JSON body is nested deeper than {max_depth} levels.")
        level = int(levels[-1])


def loads(
    text: bytes | str, max_values: int = MAX_VALUES, max_depth: int = MAX_DEPTH, **options: Any
) -> Any:
    """`json.loads` of a body measured first; `ValueError` for malformed JSON as usual."""
    measure(text.encode() if isinstance(text, str) else bytes(text), max_values, max_depth)
    return parse(text, **options)


def parse(text: bytes | str, **options: Any) -> Any:
    """`json.loads`, with the parser's `RecursionError` reported as `JsonTooDeep`."""
    try:
        return json.loads(text, **options)
    except RecursionError as error:
        raise JsonTooDeep("The JSON body is nested too deeply.") from error
