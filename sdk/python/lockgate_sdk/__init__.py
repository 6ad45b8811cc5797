"""Write lockgate message handlers in Python.

A handler is a plain function decorated with :func:`handler`::

    from lockgate_sdk import handler, publish, config, Reject

    @handler
    def handle(msg):
        target = config.get("target")
        if target is None:
            raise Reject("`target` is not set")
        publish(target, msg.text().upper(), key=msg.key)

Returning normally acknowledges the message and releases what it published. Raising
:class:`Retry` asks for another attempt (optionally not before ``after_ms``), raising
:class:`Reject` sends the message to the dead-letter destination. Any other exception is a bug in
the handler: it is printed to stderr and the call traps, which the host treats like a panic in a
Rust handler (retried unless the route says ``retry_traps = false``).

Outbound HTTP is :mod:`lockgate_sdk.http` (``from lockgate_sdk import http``); it is not
imported here, because a handler that imports it is built against the ``handler-http`` world.

This package sits on top of the bindings that ``componentize-py bindings`` generates from
``wit/handler.wit`` (the ``wit_world`` package); ``lockgate build`` generates them at build
time and puts both on the component's Python path. For an editor, generate them once with
``componentize-py -d lockgate-sdk/wit -w handler-http --import-interface-name
lockgate:handler/types@0.1.0=types --import-interface-name wasi:http/types@0.2.12=http_types
bindings .bindings``.
"""

from __future__ import annotations

import inspect
import json as _json
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple, Union

import wit_world
from componentize_py_types import Err
from wit_world.imports import emit as _emit
from wit_world.imports import types as _types

from . import config, kv, log
from ._convert import Bytes, to_bytes
from .errors import HandlerError, Reject, Retry

__all__ = [
    "HandlerError",
    "Message",
    "Reject",
    "Retry",
    "config",
    "handler",
    "kv",
    "log",
    "publish",
]

Headers = Union[Mapping[str, Bytes], Iterable[Tuple[str, Bytes]], None]


class Message:
    """One delivered message (read-only).

    Attributes: ``id``, ``topic``, ``partition`` (int or None), ``offset`` (int or None),
    ``key`` (bytes or None), ``headers`` (list of ``(name, bytes)`` in broker order, names may
    repeat), ``payload`` (bytes), ``timestamp_ms`` (int or None), ``attempt`` (1 for the first
    attempt), ``reply_to`` (str or None).
    """

    __slots__ = (
        "id",
        "topic",
        "partition",
        "offset",
        "key",
        "headers",
        "payload",
        "timestamp_ms",
        "attempt",
        "reply_to",
    )

    def __init__(self, wit: _types.Message) -> None:
        self.id: str = wit.id
        self.topic: str = wit.topic
        self.partition: Optional[int] = wit.partition
        self.offset: Optional[int] = wit.offset
        self.key: Optional[bytes] = wit.key
        self.headers: list = [(h.name, h.value) for h in wit.headers]
        self.payload: bytes = wit.payload
        self.timestamp_ms: Optional[int] = wit.timestamp_ms
        self.attempt: int = wit.attempt
        self.reply_to: Optional[str] = wit.reply_to

    def text(self) -> str:
        """The payload as UTF-8 text; raises :class:`Reject` if it is not UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"payload is not UTF-8: {e}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; raises :class:`Reject` if it is not valid JSON."""
        try:
            return _json.loads(self.payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject(f"payload is not valid JSON: {e}") from None

    def key_text(self) -> Optional[str]:
        """The key as text (invalid UTF-8 replaced), or None."""
        return None if self.key is None else self.key.decode("utf-8", "replace")

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name`` as text (invalid UTF-8 replaced), or None."""
        value = self.header_bytes(name)
        return None if value is None else value.decode("utf-8", "replace")

    def header_bytes(self, name: str) -> Optional[bytes]:
        """The first header called ``name`` (case-sensitive), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, topic={self.topic!r}, attempt={self.attempt})"


def _headers(headers: Headers) -> list:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [_types.Header(name=str(n), value=to_bytes(v, f"header {n}")) for n, v in items]


def publish(topic: str, payload: Bytes, key: Optional[Bytes] = None, headers: Headers = None) -> None:
    """Buffers one output; it is published only if the handler returns normally.

    ``payload`` and ``key`` may be bytes or str (encoded as UTF-8); ``headers`` a dict or a list
    of ``(name, value)`` pairs. A refusal by the host (topic not in the route's ``outputs``,
    too large, too many) raises :class:`Reject`: the host fails the call anyway, and a retry
    would be refused the same way.
    """
    out = _types.Outgoing(
        topic=topic,
        key=None if key is None else to_bytes(key, "key"),
        headers=_headers(headers),
        payload=to_bytes(payload, "payload"),
    )
    try:
        _emit.publish(out)
    except Err as e:
        err = e.value
        if isinstance(err, _emit.PublishError_NotAllowed):
            why = f"topic `{err.value}` is not in the route's outputs"
        elif isinstance(err, _emit.PublishError_TooLarge):
            why = f"output larger than max_output_bytes ({err.value} bytes)"
        else:
            why = f"more than max_outputs ({err.value}) outputs"
        raise Reject(f"publish failed: {why}") from None


def _to_wit_error(e: HandlerError) -> Err:
    if isinstance(e, Retry):
        return Err(_types.HandlerError_Retry(_types.RetryError(reason=e.reason, after_ms=e.after_ms)))
    return Err(_types.HandlerError_Reject(e.reason))


def handler(fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
    """Makes ``fn(msg)`` the component's ``handle`` export.

    Defines the ``WitWorld`` class that componentize-py looks for in the module where ``fn`` is
    defined (the app module named on its command line) and returns ``fn`` unchanged. ``fn``'s
    return value is ignored.
    """

    # An async def would return a coroutine nobody awaits: its body would never run and every
    # message would be acknowledged. Refused here, at import, so the build fails with the reason.
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"@handler {fn.__qualname__} is an async def: handlers are called synchronously, "
            "so its body would never run; make it a plain def"
        )

    class WitWorld(wit_world.WitWorld):
        def handle(self, message: _types.Message) -> None:
            try:
                result = fn(Message(message))
            except HandlerError as e:
                raise _to_wit_error(e) from None
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(
                    f"{fn.__qualname__} returned an awaitable: handlers are called "
                    "synchronously, so its work would never run"
                )

    WitWorld.__doc__ = f"The `handle` export, calling {fn.__module__}.{fn.__qualname__}."
    setattr(sys.modules[fn.__module__], "WitWorld", WitWorld)
    return fn
