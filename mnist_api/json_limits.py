"""JSON bodies measured before they are parsed: how deep, how many values, what parsing costs.

`measure()` looks at the raw bytes with a few C-speed passes (one regular expression finds
the strings, then commas, brackets and colons are counted outside them) and refuses a body nested
deeper than `max_depth` (`JsonTooDeep`) or holding more than `max_values` values
(`JsonTooLarge`) before `json.loads` builds a single object; `loads()` then parses what
passed, and turns the parser's own `RecursionError` into `JsonTooDeep` as well. The counts
are upper bounds, so a body is never measured smaller than it parses. Pure functions: the
app's JSON provider and the Open Inference Protocol codec both use them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mnist_api.errors import JsonTooDeep, JsonTooLarge

# Deeper than any body this service takes (a V2 infer body nests 7 levels): a client that
# sends more is told so, never met with the parser's recursion limit.
MAX_DEPTH = 32
# Values in a JSON body on a route other than V2 infer (a deployment change holds about 10).
MAX_VALUES = 10_000

# A JSON string, escapes included; possessive, so it never backtracks (linear time).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_PAIR = re.compile(rb"\[\]|\{\}")  # an innermost pair of brackets
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

    Nothing is copied but the brackets: counts over the whole text, minus the counts inside
    each string. Malformed JSON is not judged here (the parser refuses it); only a
    well-formed nesting is measured for depth.
    """
    if text.count(b'"') > 2 * max_values:
        raise JsonTooLarge(f"The JSON body holds more than {max_values} strings.")
    if len(text) <= _CHUNK:
        return _measure_small(text, max_values, max_depth)
    counts = dict.fromkeys(_COUNTED, 0)
    spans = []
    for found in _STRING.finditer(text):
        start, end = found.span()
        spans.append((start, end))
        for char in _COUNTED:
            counts[char] -= text.count(char, start, end)
    for char in _COUNTED:
        counts[char] += text.count(char)
    containers = counts[b"["] + counts[b"{"]
    values = 1 + counts[b","] + containers
    if values > max_values:
        raise JsonTooLarge(
            f"The JSON body holds up to {values} values; this route takes at most {max_values}."
        )
    if counts[b"]"] + counts[b"}"] == containers:  # else malformed: left to the parser
        _check_depth(_brackets(text, spans), max_depth)
    string_bytes = sum(end - start for start, end in spans)
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


def _measure_small(text: bytes, max_values: int, max_depth: int) -> JsonSize:
    """`measure` of a short text (most bodies, a binary request's JSON part): its strings
    blanked out in one copy, which costs less time than counting around each of them."""
    skeleton, strings = _STRING.subn(b'""', text)
    containers = skeleton.count(b"[") + skeleton.count(b"{")
    values = 1 + skeleton.count(b",") + containers
    if values > max_values:
        raise JsonTooLarge(
            f"The JSON body holds up to {values} values; this route takes at most {max_values}."
        )
    if skeleton.count(b"]") + skeleton.count(b"}") == containers:
        _check_depth(skeleton.translate(None, _NOT_BRACKETS), max_depth)
    return JsonSize(
        size=len(text),
        ascii=text.isascii(),
        values=values,
        containers=containers,
        members=skeleton.count(b":"),
        strings=strings,
        string_bytes=len(text) - len(skeleton) + 2 * strings,
        floats=skeleton.count(b".") + skeleton.count(b"e") + skeleton.count(b"E"),
    )


def _brackets(text: bytes, spans: list[tuple[int, int]]) -> bytes:
    """The brackets of `text` outside its strings, in order (read in chunks: no full copy)."""
    view = memoryview(text)
    pieces, position = [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for chunk in range(position, start, _CHUNK):
            piece = bytes(view[chunk : min(chunk + _CHUNK, start)])
            pieces.append(piece.translate(None, _NOT_BRACKETS))
        position = end
    return b"".join(pieces)


def _check_depth(brackets: bytes, max_depth: int) -> None:
    """`JsonTooDeep` if the brackets nest deeper than `max_depth`.

    Each pass removes every innermost pair, so a nesting of depth d is gone after d passes;
    brackets that no pass can reduce are malformed, which the parser reports.
    """
    for _ in range(max_depth):
        if not brackets:
            return
        # One scan for both kinds: two replaces in a row would take "{[]}" apart in one pass.
        brackets, pairs = _PAIR.subn(b"", brackets)
        if not pairs:
            return  # mismatched: not JSON
    if brackets and (b"[]" in brackets or b"{}" in brackets):
        raise JsonTooDeep(f"The JSON body is nested deeper than {max_depth} levels.")


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
