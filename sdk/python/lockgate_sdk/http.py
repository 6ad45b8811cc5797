"""Outbound HTTP from a handler, synchronous like ``handle``::

    from lockgate_sdk import http

    customer = (
        http.get(f"{base}/customers/{cid}", headers={"accept": "application/json"})
        .error_for_status()  # 5xx, 429, 408: Retry (after Retry-After); other 4xx: Reject
        .json()
    )

What a request may reach is the handler's grant in runtime.toml
(``[handlers.<name>.http] allowed_hosts = [...]``); anything else raises :class:`Denied`. The host
never follows a redirect; this helper follows up to five (each hop is checked against the grant
again, a 303, or a 301/302 after a POST, becomes a GET without a body, and ``Authorization`` and
``Cookie`` are dropped when the origin changes) unless ``follow_redirects=False``. Every request
carries an ``Idempotency-Key`` the host derives from the message, the same on every retry and
redelivery, so a receiver that deduplicates applies it once.

A request that gets no response raises an :class:`HttpError`, which is also a
:class:`~lockgate_sdk.Retry` (:class:`Timeout`, :class:`ConnectionFailed`: the dependency may be
back on the next attempt) or a :class:`~lockgate_sdk.Reject` (:class:`Denied`, :class:`TooLarge`,
:class:`Invalid`: it would fail the same way every time), so one left uncaught ends the call with
that outcome. A response with an error status is returned as it is; ``error_for_status()`` turns
it into the outcome.

Importing this module makes ``lockgate build`` build the handler against the ``handler-http``
world (``from lockgate_sdk import http`` or ``import lockgate_sdk.http``).
"""

from __future__ import annotations

import json as _json
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

from componentize_py_types import Err, Ok

from ._convert import Bytes, to_bytes
from .errors import HandlerError, Reject, Retry

try:
    from wit_world.imports import http_types as _ht
    from wit_world.imports import outgoing_handler as _oh
    from wit_world.imports import streams as _streams
except ImportError as _e:  # built against `handler`, which has no wasi:http
    raise ImportError(
        "lockgate_sdk.http needs the handler-http world: `lockgate build` picks it when a source "
        "imports the module as `from lockgate_sdk import http` or `import lockgate_sdk.http`"
    ) from _e

__all__ = [
    "MAX_REDIRECTS",
    "ConnectionFailed",
    "Denied",
    "HttpError",
    "Invalid",
    "Response",
    "Timeout",
    "TooLarge",
    "delete",
    "get",
    "post",
    "put",
    "request",
]

#: Most redirects a request follows by default.
MAX_REDIRECTS = 5

Headers = Union[Mapping[str, Bytes], Iterable[Tuple[str, Bytes]], None]

_MISSING = object()


class HttpError(HandlerError):
    """Why a request got no response. ``kind`` is ``"denied"``, ``"timeout"``, ``"connection"``,
    ``"too_large"`` or ``"invalid"``; each subclass is also a Retry or a Reject (see the module
    docs)."""

    kind = ""
    _prefix = "HTTP request failed"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self._prefix}: {detail}")
        #: The reason without the kind's prefix.
        self.detail = detail


class Denied(HttpError, Reject):
    """The handler's grant does not allow the URL (or it resolves to an internal address a
    wildcard entry may not reach)."""

    kind = "denied"
    _prefix = "HTTP request denied"


class Timeout(HttpError, Retry):
    """No response in time (the request's timeout, the grant's ``timeout_ms``, the call's
    deadline)."""

    kind = "timeout"
    _prefix = "HTTP request timed out"


class ConnectionFailed(HttpError, Retry):
    """The connection failed: refused, reset, DNS, TLS."""

    kind = "connection"
    _prefix = "HTTP connection failed"


class TooLarge(HttpError, Reject):
    """The request or the response is larger than the grant allows."""

    kind = "too_large"
    _prefix = "HTTP message too large"


class Invalid(HttpError, Reject):
    """The request is malformed (a bad URL, method or header)."""

    kind = "invalid"
    _prefix = "invalid HTTP request"


class Response:
    """A response, read to its end: ``status`` (int), ``headers`` (list of ``(name, value)``,
    names lower-cased, values text, in order), ``body`` (bytes)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name`` (any case), or None."""
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def text(self) -> str:
        """The body as UTF-8 text (invalid sequences replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; a body that is not JSON raises :class:`~lockgate_sdk.Reject`."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject(f"HTTP {self.status}: the response is not the expected JSON: {e}") from None

    def error_for_status(self) -> "Response":
        """The response if its status is below 400; otherwise raises the handler's error for it: a
        5xx, a 429 or a 408 raises :class:`~lockgate_sdk.Retry` (not before ``Retry-After``
        seconds when the server sends them), any other 4xx :class:`~lockgate_sdk.Reject`. So an
        outage of the dependency retries and opens the route's breaker, and nothing is
        dead-lettered while it is down."""
        s = self.status
        if s < 400:
            return self
        reason = f"HTTP {s}: {self.text()[:200].strip()}"
        if s >= 500 or s in (429, 408):
            after = self.header("retry-after")
            after_ms = None
            if after is not None and after.strip().isdigit():
                after_ms = int(after.strip()) * 1000
            raise Retry(reason, after_ms=after_ms)
        raise Reject(reason)

    def __repr__(self) -> str:
        return f"Response(status={self.status}, {len(self.body)} bytes)"


def get(url: str, headers: Headers = None, **options: Any) -> Response:
    """A ``GET`` of ``url``; ``options`` as for :func:`request`."""
    return request("GET", url, headers=headers, **options)


def post(url: str, headers: Headers = None, **options: Any) -> Response:
    """A ``POST`` to ``url``; ``options`` as for :func:`request` (``body=`` or ``json=``)."""
    return request("POST", url, headers=headers, **options)


def put(url: str, headers: Headers = None, **options: Any) -> Response:
    """A ``PUT`` to ``url``; ``options`` as for :func:`request`."""
    return request("PUT", url, headers=headers, **options)


def delete(url: str, headers: Headers = None, **options: Any) -> Response:
    """A ``DELETE`` of ``url``; ``options`` as for :func:`request`."""
    return request("DELETE", url, headers=headers, **options)


def request(
    method: str,
    url: str,
    headers: Headers = None,
    body: Optional[Bytes] = None,
    json: Any = _MISSING,
    timeout: Optional[float] = None,
    follow_redirects: bool = True,
) -> Response:
    """Sends ``method`` to ``url`` (``http://`` or ``https://``) and reads the whole response.

    ``headers`` is a dict or a list of ``(name, value)`` pairs; ``body`` bytes or str (UTF-8);
    ``json`` a value sent as JSON with ``content-type: application/json`` (instead of ``body``).
    ``timeout`` bounds the wait for the response headers in seconds (the grant's ``timeout_ms``
    and the call's deadline bound it too). Raises an :class:`HttpError` when there is no
    response; an error status is returned (see :meth:`Response.error_for_status`).
    """
    if not isinstance(method, str) or not method:
        raise Invalid(f"{url}: the method must be a non-empty string, got {method!r}")
    hs: List[Tuple[str, bytes]] = []
    if headers is not None:
        items = headers.items() if isinstance(headers, Mapping) else headers
        hs = [(str(n), to_bytes(v, f"header {n}")) for n, v in items]
    data = b""
    if json is not _MISSING:
        if body is not None:
            raise TypeError("give a request body or json, not both")
        data = _json.dumps(json, separators=(",", ":")).encode("utf-8")
        hs = [(n, v) for n, v in hs if n.lower() != "content-type"]
        hs.append(("content-type", b"application/json"))
    elif body is not None:
        data = to_bytes(body, "body")
    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    method = method.upper()
    redirects = MAX_REDIRECTS if follow_redirects else 0
    while True:
        response = _send(method, url, hs, data, timeout)
        if response.status not in (301, 302, 303, 307, 308) or redirects == 0:
            return response
        location = response.header("location")
        if location is None:
            return response
        redirects -= 1
        nxt = _resolve(url, location)
        if response.status == 303 or (response.status not in (307, 308) and method == "POST"):
            method, data = "GET", b""
            hs = [(n, v) for n, v in hs if n.lower() != "content-type"]
        if _origin(nxt) != _origin(url):
            # Credentials are for the host they were written for.
            hs = [(n, v) for n, v in hs if n.lower() not in ("authorization", "cookie")]
        url = nxt


# ---- URLs ------------------------------------------------------------------------------------


def _split_url(url: str) -> Tuple[bool, str, str]:
    """(https, authority, path with query) of an absolute http(s) URL, without its fragment."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise Invalid(f"`{url}`: not an absolute http:// or https:// URL")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise Invalid(f"`{url}`: the scheme must be http or https")
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i != -1:
            end = min(end, i)
    authority, path = rest[:end], rest[end:]
    if not authority:
        raise Invalid(f"`{url}`: the host is missing")
    path = path.split("#", 1)[0] or "/"
    if path.startswith("?"):
        path = "/" + path
    return scheme == "https", authority, path


def _origin(url: str) -> Optional[Tuple[str, str]]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i != -1:
            end = min(end, i)
    return scheme.lower(), rest[:end].lower()


def _resolve(base: str, location: str) -> str:
    """``location`` against ``base``: absolute as it is, ``//host/..`` with the base's scheme,
    ``/path`` on the same origin, anything else relative to the base's directory."""
    if "://" in location:
        return location
    scheme, sep, rest = base.partition("://")
    if not sep:
        raise Invalid(f"bad URL `{base}`")
    if location.startswith("//"):
        return f"{scheme}:{location}"
    _, authority, path = _split_url(base)
    if location.startswith("/"):
        return f"{scheme}://{authority}{location}"
    path = path.split("?", 1)[0]
    return f"{scheme}://{authority}{path[: path.rfind('/') + 1] or '/'}{location}"


# ---- the host --------------------------------------------------------------------------------

_METHODS = {
    "GET": _ht.Method_Get,
    "HEAD": _ht.Method_Head,
    "POST": _ht.Method_Post,
    "PUT": _ht.Method_Put,
    "DELETE": _ht.Method_Delete,
    "PATCH": _ht.Method_Patch,
    "OPTIONS": _ht.Method_Options,
}


def _error(code: Any, url: str) -> HttpError:
    """The error for a wasi:http ``error-code``."""
    if isinstance(code, _ht.ErrorCode_HttpRequestDenied):
        return Denied(f"{url} is not allowed by the handler's grant (allowed_hosts)")
    if isinstance(code, _ht.ErrorCode_DestinationIpProhibited):
        return Denied(
            f"{url} resolves to an internal address its allowed_hosts entry does not name"
        )
    if isinstance(
        code,
        (
            _ht.ErrorCode_ConnectionTimeout,
            _ht.ErrorCode_ConnectionReadTimeout,
            _ht.ErrorCode_HttpResponseTimeout,
        ),
    ):
        return Timeout(url)
    if isinstance(code, _ht.ErrorCode_HttpRequestBodySize):
        limit = "?" if code.value is None else code.value
        return TooLarge(f"the request body is over the grant's max_request_bytes ({limit})")
    if isinstance(code, _ht.ErrorCode_HttpResponseBodySize):
        limit = "?" if code.value is None else code.value
        return TooLarge(f"the response of {url} is over the grant's max_response_bytes ({limit})")
    if isinstance(code, (_ht.ErrorCode_HttpRequestMethodInvalid, _ht.ErrorCode_HttpRequestUriInvalid)):
        return Invalid(f"{url}: {type(code).__name__[len('ErrorCode_'):]}")
    return ConnectionFailed(f"{url}: {type(code).__name__[len('ErrorCode_'):]}")


def _send(
    method: str, url: str, headers: List[Tuple[str, bytes]], data: bytes, timeout: Optional[float]
) -> Response:
    """One request and its whole response, through ``wasi:http`` (no redirects)."""
    https, authority, path = _split_url(url)
    fields = _ht.Fields()
    for name, value in headers:
        try:
            fields.append(name, value)
        except Err as e:
            raise Invalid(f"{url}: header `{name}`: {type(e.value).__name__}") from None
    if data and not any(n.lower() == "content-length" for n, _ in headers):
        fields.append("content-length", str(len(data)).encode("ascii"))
    out = _ht.OutgoingRequest(fields)
    try:
        known = _METHODS.get(method)
        out.set_method(known() if known is not None else _ht.Method_Other(method))
    except Err:
        raise Invalid(f"{url}: bad method `{method}`") from None
    for what, call, value in (
        ("scheme", out.set_scheme, _ht.Scheme_Https() if https else _ht.Scheme_Http()),
        ("host", out.set_authority, authority),
        ("path", out.set_path_with_query, path),
    ):
        try:
            call(value)
        except Err:
            raise Invalid(f"{url}: bad {what}") from None
    body = out.body()
    options = None
    if timeout is not None:
        options = _ht.RequestOptions()
        options.set_first_byte_timeout(int(timeout * 1_000_000_000))
    # Sent first, written after: the host reads the body while it is written.
    try:
        future = _oh.handle(out, options)
    except Err as e:
        raise _error(e.value, url) from None
    with future:
        with body.write() as stream:
            for i in range(0, len(data), 4096):
                try:
                    stream.blocking_write_and_flush(data[i : i + 4096])
                except Err:
                    break  # the response says why (too large, the connection)
        try:
            _ht.OutgoingBody.finish(body, None)
        except Err:
            pass
        while True:
            result = future.get()
            if result is not None:
                break
            with future.subscribe() as ready:
                ready.block()
    if isinstance(result, Err):
        raise ConnectionFailed(f"{url}: response taken twice")
    inner = result.value
    if isinstance(inner, Err):
        raise _error(inner.value, url)
    with inner.value as response:
        status = response.status()
        with response.headers() as fields:
            entries = [(n.lower(), v.decode("utf-8", "replace")) for n, v in fields.entries()]
        try:
            incoming = response.consume()
        except Err:
            raise ConnectionFailed(f"{url}: no body") from None
        chunks: List[bytes] = []
        failure: Optional[HttpError] = None
        with incoming.stream() as stream:
            while True:
                try:
                    chunks.append(stream.blocking_read(65536))
                except Err as e:
                    if isinstance(e.value, _streams.StreamError_LastOperationFailed):
                        with e.value.value as io_error:
                            code = _ht.http_error_code(io_error)
                            failure = (
                                _error(code, url)
                                if code is not None
                                else ConnectionFailed(
                                    f"{url}: reading the response failed: "
                                    f"{io_error.to_debug_string()}"
                                )
                            )
                    break
        if failure is not None:
            incoming.__exit__(None, None, None)
            raise failure
        with _ht.IncomingBody.finish(incoming):
            pass
    return Response(status, entries, b"".join(chunks))
