"""Per-handler key-value state: persistent, with optional TTL and compare-and-swap.

On a route with an idempotency key, a message's writes apply together with its key when it
succeeds (a failed call leaves no trace); elsewhere writes take effect immediately and are not
undone when the call fails. Host errors raise
:class:`~lockgate_sdk.Retry` when the store is unavailable (transient) and
:class:`~lockgate_sdk.Reject` for a bad key or an oversized value (it would fail every time).
Values may be given as bytes, bytearray, memoryview, str (stored as UTF-8) or int (stored as its
decimal digits, as every SDK stores a number); they are always returned as bytes, so a number
reads back with ``int(kv.get(key) or 0)``. Anything else raises ``TypeError``.
"""

from __future__ import annotations

from typing import Optional

from componentize_py_types import Err
from wit_world.imports import kv as _kv

from ._convert import Bytes, to_bytes
from .errors import Reject, Retry

def _b(value: Optional[Bytes], what: str) -> Optional[bytes]:
    return None if value is None else to_bytes(value, what)


def _call(f, *args):
    try:
        return f(*args)
    except Err as e:
        err = e.value
        if isinstance(err, _kv.KvError_Unavailable):
            raise Retry(f"kv unavailable: {err.value}") from None
        if isinstance(err, _kv.KvError_InvalidKey):
            raise Reject(f"kv: invalid key: {err.value}") from None
        raise Reject(f"kv: value larger than {err.value} bytes") from None


def get(key: str) -> Optional[bytes]:
    """The value under ``key``, or None if absent or expired."""
    return _call(_kv.get, key)


def set(key: str, value: Bytes, ttl_ms: Optional[int] = None) -> None:  # noqa: A001
    """Stores ``value`` under ``key``; with ``ttl_ms`` it expires after that many ms."""
    _call(_kv.set, key, to_bytes(value, "value"), ttl_ms)


def delete(key: str) -> bool:
    """Removes ``key``; True if an entry was present."""
    return _call(_kv.delete, key)


def compare_and_swap(
    key: str, expected: Optional[Bytes], new: Optional[Bytes], ttl_ms: Optional[int] = None
) -> bool:
    """Sets ``key`` to ``new`` (None removes it) only if it currently equals ``expected`` (None
    meaning absent). True if the swap happened."""
    return _call(_kv.compare_and_swap, key, _b(expected, "expected"), _b(new, "new"), ttl_ms)
