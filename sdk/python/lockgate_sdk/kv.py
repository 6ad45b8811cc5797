"""Per-handler key-value state: persistent, with optional TTL and compare-and-swap.

On a route with an idempotency key, a message's writes apply together with its key when it
succeeds (a failed call leaves no trace); elsewhere writes take effect immediately and are not
undone when the call fails. Host errors raise
:class:`~lockgate_sdk.Retry` when the store is unavailable (transient) and
:class:`~lockgate_sdk.Reject` for a bad key or an oversized value (it would fail every time).
Values may be given as bytes, bytearray, memoryview or str (stored as UTF-8); they are always
returned as bytes. Anything else goes through ``bytes()``: an int n becomes n zero bytes, not its
digits, so store ``str(n)`` (and read it back with ``int(value)``).
"""

from __future__ import annotations

from typing import Optional, Union

from componentize_py_types import Err
from wit_world.imports import kv as _kv

from .errors import Reject, Retry

Bytes = Union[bytes, bytearray, memoryview, str]


def _b(value: Optional[Bytes]) -> Optional[bytes]:
    if value is None:
        return None
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


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
    _call(_kv.set, key, _b(value), ttl_ms)


def delete(key: str) -> bool:
    """Removes ``key``; True if an entry was present."""
    return _call(_kv.delete, key)


def compare_and_swap(
    key: str, expected: Optional[Bytes], new: Optional[Bytes], ttl_ms: Optional[int] = None
) -> bool:
    """Sets ``key`` to ``new`` (None removes it) only if it currently equals ``expected`` (None
    meaning absent). True if the swap happened."""
    return _call(_kv.compare_and_swap, key, _b(expected), _b(new), ttl_ms)
