"""The checks behind the typed config (:mod:`dreamomni2_jax.config`): each raises :class:`ConfigError` naming the
key (or the file and line), the one error class of bad configuration and JSON input."""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


def read_json(path: str | Path) -> Any:
    """A JSON file's content; :class:`ConfigError` naming the file (and line) when missing, not UTF-8 or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``name=value`` must be one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    """``name=value`` must be > 0 (``allow_zero``: >= 0)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def in_range(name: str, value: float, lo: float, hi: float, hi_open: bool = True) -> None:
    """``name=value`` must be in ``[lo, hi)`` (``hi_open=False``: ``[lo, hi]``)."""
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ConfigError(f"{name}={value!r} must be in [{lo}, {hi}{')' if hi_open else ']'}")


def check_type(key: str, value: Any, tp) -> None:
    """``value`` of ``key`` must have the declared type ``tp`` (an int is a float; tuples must be tuples)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if typing.get_origin(tp) is tuple and not isinstance(value, tuple):
        raise ConfigError(f"{key}: expected a tuple, got {type(value).__name__} {value!r}")


__all__ = ["ConfigError", "read_json", "choice", "positive", "in_range", "check_type"]
