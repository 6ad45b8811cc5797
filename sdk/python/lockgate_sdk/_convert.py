"""How a value given to the SDK becomes bytes, in one place for payloads, keys, headers and kv."""

from __future__ import annotations

from typing import Union

Bytes = Union[bytes, bytearray, memoryview, str, int]


def to_bytes(value: Bytes, what: str) -> bytes:
    """``str`` as UTF-8, an ``int`` as its decimal digits (``2`` is ``b"2"``, as in every other
    SDK), bytes-like values as they are. Anything else raises ``TypeError`` naming ``what``:
    ``bytes(n)`` would have made an int n into n zero bytes."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError(f"{what} must be bytes, str or int, got bool")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, str or int, got {type(value).__name__}")
