"""What runs inside the sandbox, and the wire format between it and the parent.

This file is self-contained on purpose: the sandboxed interpreter runs it as a script with
`python -I -S -B` (no site-packages, no riverllm), and the parent imports it for `encode` and
`decode`, so both sides speak the same format from one source.

Run as `python -c SOURCE ENTRY REQUEST_FD RESPONSE_FD`, it runs program.py (the model's code) and then answers calls to
its function ENTRY: one JSON line in per call (the arguments), one JSON line out (the value, or
the exception it raised). The tests themselves never run here: the parent runs them, with a
stand-in for the function that makes these calls, so nothing in this process decides a verdict.

Only plain data crosses the pipe (None, bool, int, float, complex, str, bytes, and lists, tuples,
sets, frozensets and dicts of them), tagged so that types survive: a tuple stays a tuple, nan and
inf stay floats. `decode` builds only those types, whatever the bytes say.
"""

from __future__ import annotations

import json
import sys
from typing import Any

_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
_SEQUENCE_TAGS = {kind: tag for tag, kind in _SEQUENCES.items()}


def encode(value: Any) -> Any:
    """`value` as JSON-ready data; TypeError for anything but plain data (exact types only, so a
    subclass with its own `__eq__` cannot pass as an int or a str)."""
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return ["float", repr(value)]
    if kind is complex:
        return ["complex", [repr(value.real), repr(value.imag)]]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind in _SEQUENCE_TAGS:
        return [_SEQUENCE_TAGS[kind], [encode(item) for item in value]]
    if kind is dict:
        return ["dict", [[encode(key), encode(item)] for key, item in value.items()]]
    raise TypeError(f"a value of type {kind.__name__} cannot be passed to or from the sandbox")


def decode(data: Any) -> Any:
    """The inverse of `encode`, trusting nothing: ValueError on anything it did not make."""
    if data is None or type(data) in (bool, int, str):
        return data
    if type(data) is not list or len(data) != 2 or type(data[0]) is not str:
        raise ValueError("not a value in the sandbox's format")
    tag, body = data
    if tag == "float" and type(body) is str:
        return float(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is str for x in body):
        return complex(float(body[0]), float(body[1]))
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag in _SEQUENCES and type(body) is list:
        return _SEQUENCES[tag](decode(item) for item in body)
    if tag == "dict" and type(body) is list:
        pairs = [pair for pair in body if type(pair) is list and len(pair) == 2]
        if len(pairs) != len(body):
            raise ValueError("not a value in the sandbox's format")
        return {decode(key): decode(item) for key, item in pairs}
    raise ValueError(f"not a value in the sandbox's format: tag {tag!r}")


def serve(entry: str, request_fd: int, response_fd: int) -> None:
    import os

    requests = os.fdopen(request_fd, "rb")
    responses = os.fdopen(response_fd, "wb")
    namespace = {"__name__": "__sandbox__"}
    with open("program.py", encoding="utf-8") as file:
        exec(compile(file.read(), "program.py", "exec"), namespace)
    function = namespace.get(entry)
    if not callable(function):
        raise SystemExit(f"NameError: the program defines no function {entry}")
    for line in requests:
        args, kwargs = decode(json.loads(line))
        try:
            answer = ["value", encode(function(*args, **kwargs))]
        except Exception as error:  # the function's own failure: the parent's test sees it raised
            answer = ["raise", type(error).__name__, str(error)[:300]]
        responses.write(json.dumps(answer).encode() + b"\n")
        responses.flush()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
