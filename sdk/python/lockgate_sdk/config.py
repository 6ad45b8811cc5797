"""Read-only configuration from the handler's ``config`` table in runtime.toml (or
``lockgate test -c key=value``)."""

from __future__ import annotations

from typing import Optional

from wit_world.imports import config as _config


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The value configured under ``key`` (always a string), else ``default``."""
    value = _config.get(key)
    return default if value is None else value
