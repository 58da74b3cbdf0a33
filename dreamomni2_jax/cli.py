"""The one rule every command follows for errors a user can cause: a clear message, exit code 2, no traceback.

``run(main, argv)`` calls a command's ``main``; a :data:`USER_ERRORS` exception (bad config or file, damaged
checkpoint or cache, a refused resume, ...) prints ``error: <message>`` on stderr (the message names the file,
key or line) and returns 2. Anything else is a bug and keeps its traceback. ``DREAMOMNI2_TRACEBACK=1`` re-raises
user errors too (for bug reports). Commands raise :class:`UserError` for problems that have no better class.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

TRACEBACK_ENV = "DREAMOMNI2_TRACEBACK"


class UserError(ValueError):
    """Bad input or a refused operation; the message says what and where, and what to do."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input (imported lazily: the converters need no JAX)."""
    import json

    # deferred import: the converters run this without JAX
    from dreamomni2_jax.config import ConfigError

    classes: list[type[BaseException]] = [UserError, ConfigError, json.JSONDecodeError, UnicodeDecodeError,
                                          FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                                          PermissionError]
    for module, name in (("dreamomni2_jax.weights.store", "ConversionError"),
                         ("dreamomni2_jax.weights.safetensors_io", "SafetensorsError"),
                         ("dreamomni2_jax.lora.adapters", "LoraError"), ("dreamomni2_jax.checkpoint.items", "CheckpointError"),
                         ("dreamomni2_jax.images.io", "BadInput"), ("dreamomni2_jax.cache.records", "CacheError")):
        mod = sys.modules.get(module)  # a class only matters once its module is imported (it raised it)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            classes.append(getattr(mod, name))
    return tuple(classes)


def message(err: BaseException) -> str:
    """``error: ...`` text for a user error (multi-line problem lists are kept, indented)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return f"error: {text}"


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
        extra: tuple[type[BaseException], ...] = ()) -> int:
    """``main(argv)``; user errors (:data:`USER_ERRORS` + ``extra``) -> one message on stderr and exit code 2."""
    try:
        return main(argv)
    except Exception as e:  # noqa: BLE001 - filtered just below; everything else is re-raised as is
        if os.environ.get(TRACEBACK_ENV) or not isinstance(e, _user_errors() + tuple(extra)):
            raise
        sys.stderr.flush()
        print(message(e), file=sys.stderr, flush=True)
        return 2


__all__ = ["UserError", "run", "message", "TRACEBACK_ENV"]
