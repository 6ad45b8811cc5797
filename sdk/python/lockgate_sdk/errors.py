"""The two ways a handler can fail, mapped to the WIT `handler-error` variant."""

from __future__ import annotations

from typing import Optional


class HandlerError(Exception):
    """Base class of :class:`Retry` and :class:`Reject`; ``reason`` is the text the host records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = str(reason)


class Retry(HandlerError):
    """A transient failure: the host tries the message again.

    ``after_ms`` is the earliest delay before the next attempt in milliseconds (the host waits at
    least its own backoff and at most the route's ``max_backoff_ms``).
    """

    def __init__(self, reason: str, after_ms: Optional[int] = None) -> None:
        super().__init__(reason)
        if after_ms is not None and (not isinstance(after_ms, int) or after_ms < 0):
            raise ValueError(f"after_ms must be a non-negative int, got {after_ms!r}")
        self.after_ms = after_ms


class Reject(HandlerError):
    """The message can never succeed: no retry; it goes to the dead-letter destination."""
