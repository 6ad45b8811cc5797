"""Structured logging, attributed by the host to the route, handler and message.

``print`` works too (stdout and stderr lines are captured), but these carry a level.
"""

from __future__ import annotations

from wit_world.imports import log as _log

_Level = _log.Level


def trace(message: str) -> None:
    _log.log(_Level.TRACE, str(message))


def debug(message: str) -> None:
    _log.log(_Level.DEBUG, str(message))


def info(message: str) -> None:
    _log.log(_Level.INFO, str(message))


def warn(message: str) -> None:
    _log.log(_Level.WARN, str(message))


def error(message: str) -> None:
    _log.log(_Level.ERROR, str(message))
